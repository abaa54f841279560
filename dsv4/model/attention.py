"""DeepSeek-V4 attention sub-layer (spec §2.3): Q-LoRA, shared K=V, partial interleaved RoPE, per-head
q norm, sink, sliding window plus CSA / HCA compressed entries, inverse RoPE, grouped output projection."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dsv4.config import CSA, HCA, SWA, ModelConfig
from dsv4.model.compressor import Compressor, Indexer
from dsv4.model.linear import Linear, LinearGroup, RMSNorm
from dsv4.model.options import ModelOptions
from dsv4.ops.meta import ForwardMeta
from dsv4.ops.rope import rope_inv_freq


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, ratio: int, opts: ModelOptions):
        super().__init__()
        self.layer_type, self.ratio = layer_type, ratio
        self.n_heads, self.head_dim, self.rope_dim = cfg.num_heads, cfg.head_dim, cfg.rope_head_dim
        self.o_groups, self.eps = cfg.o_groups, cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5
        fmt = "fp8" if cfg.quantization is not None else "dense"
        D, H, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.register_buffer("attn_sink", torch.empty(H, dtype=torch.float32))
        self.wq_a = Linear(D, cfg.q_lora_rank, fmt, opts)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, opts)
        self.wq_b = Linear(cfg.q_lora_rank, H * d, fmt, opts)
        self.wkv = Linear(D, d, fmt, opts)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps, opts)
        self.wo_a = Linear(H * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, fmt, opts, fp8_gemm=False)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D, fmt, opts)
        rope = cfg.rope_for(layer_type)
        inv_freq = rope_inv_freq(rope.theta, cfg.rope_head_dim, rope.yarn)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.compressor = None
        self.indexer = None
        if layer_type != SWA:
            self.compressor = Compressor(cfg, d, ratio, layer_type == CSA, "fp8" if opts.official else "none",
                                         inv_freq, opts)
        if layer_type == CSA:
            self.indexer = Indexer(cfg, ratio, inv_freq, opts)
        # projections that read the same input, one GEMM each once fused (model.linear.fuse_linear_groups)
        self._x_proj = LinearGroup(self.wq_a, self.wkv)
        # (wq_b and the indexer's wq_b also share qr, but a fused output's q rows would be strided, and the
        # [T, H, d] q norm copies strided rows at T > 1)
        comp = [self.compressor.wkv, self.compressor.wgate] if self.compressor is not None else []
        if self.indexer is not None:
            comp += [self.indexer.compressor.wkv, self.indexer.compressor.wgate]
        self._xf_proj = LinearGroup(*comp) if comp else None  # float32 results (the compressors' projections)
        self.official = opts.official
        self.dialect = opts.fp8_dialect
        o = opts.ops
        self._attn, self._write = o.sparse_attention, o.write_window
        self._grouped = o.grouped_linear
        self._norm_rope_qkv = o.norm_rope_qkv

    def forward(self, x: torch.Tensor, meta: ForwardMeta, lc, block_table, x_q=None) -> torch.Tensor:
        """x_q: x's act_quant from its producer (hc_pre's `quant`), for the FP8 input projections; or None."""
        T = x.shape[0]
        pos = meta.positions
        qr, kv = self._x_proj(x, x_q)
        qr_q = None
        if self.wq_b.act_quant and qr.dim() == 2:  # the normed qr and its act_quant for wq_b in one pass
            qr, qr_q = self.q_norm(qr, quant=self.wq_b.dialect)
        else:
            qr = self.q_norm(qr)
        q = self.wq_b(qr, qr_q).view(T, self.n_heads, self.head_dim)
        # q: per-head norm, then RoPE; kv: kv_norm, RoPE and (official) the non-RoPE channels through FP8, the RoPE
        # ones as they are: one op
        nope = self.head_dim - self.rope_dim if self.official else 0
        q, kv = self._norm_rope_qkv(q, kv, self.kv_norm.weight, self.eps, self.kv_norm.eps, pos, self.inv_freq, nope,
                                    self.dialect)
        proj = [q, kv]
        if self.compressor is not None:
            kvs = self._xf_proj(x, out_dtype=torch.float32)  # compressor kv, score (+ the indexer's compressor's)
            proj += kvs[:2]
        if self.indexer is not None:
            proj += self.indexer.project(x, qr, pos, kv_score=kvs[2:], qr_q=qr_q)
        # everything above reads only per-token values (and positions); the core reads the step's sequences
        core = partial(self._core, lc=lc, block_table=block_table)
        o = core(meta, *proj) if meta.islands is None else meta.islands(core, *proj)  # de-rotated (inverse RoPE)
        z = self._grouped(o.view(T, self.o_groups, -1), self.wo_a.weight, self.wo_a.scale)
        return self.wo_b(z.flatten(1))

    def _core(self, meta: ForwardMeta, q, kv, *proj, lc, block_table) -> torch.Tensor:
        """The part of the layer that reads the step's sequences (slots, lengths, the cache): compression,
        index selection, sparse attention and the window write. Its token inputs are the projections; under
        piecewise graphs (engine/piecewise_graphs.py) it runs eagerly between captured pieces."""
        topk_idx = None
        if self.compressor is not None:
            self.compressor.compress(proj[0], proj[1], meta, lc.state, lc.prev, lc.pool, block_table)
            proj = proj[2:]
        if self.indexer is not None:
            topk_idx = self.indexer.select(*proj, meta, lc, block_table)
        o = self._attn(q, kv, lc.window, self.attn_sink, self.scale, meta, lc.pool, block_table, topk_idx, self.ratio,
                       self.inv_freq)
        self._write(lc.window, kv, meta)
        if meta.redo is not None:
            meta.redo.append(lambda rows, m, w=lc.window, kv=kv: self._write(w, kv[rows], m))
        return o


__all__ = ["Attention", "SWA", "CSA", "HCA"]
