"""The KV compressors of CSA / HCA layers and the lightning indexer (spec §2.5, §2.6)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.linear import Linear
from dsv4.model.options import ModelOptions
from dsv4.ops.meta import ForwardMeta


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one `dim`-wide entry; `overlap` (CSA) uses two series.
    Projections and pooling run in float32 (the official code upcasts these weights; they stay bf16 in memory when
    they are bf16 values and x is bf16: model.linear.compact_dense_weights)."""

    def __init__(self, cfg: ModelConfig, dim: int, ratio: int, overlap: bool, post: str, inv_freq: torch.Tensor,
                 opts: ModelOptions):
        super().__init__()
        c = 2 if overlap else 1
        self.dim, self.ratio, self.overlap, self.post = dim, ratio, overlap, post
        self.eps = cfg.rms_norm_eps
        self.register_buffer("ape", torch.empty(ratio, c * dim, dtype=torch.float32))
        self.wkv = Linear(cfg.hidden_size, c * dim, "dense", opts, fp8_gemm=False, dense_dtype=torch.float32,
                          compact=True)
        self.wgate = Linear(cfg.hidden_size, c * dim, "dense", opts, fp8_gemm=False, dense_dtype=torch.float32,
                            compact=True)
        self.norm = nn.Module()
        self.norm.register_buffer("weight", torch.empty(dim, dtype=torch.float32))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._compress = opts.ops.compress_kv
        self.act_dtype = opts.dtype
        self.dialect = opts.fp8_dialect

    def forward(self, x: torch.Tensor, meta: ForwardMeta, state, prev, pool, block_table) -> None:
        self.compress(*self.project(x), meta, state, prev, pool, block_table)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token part (no step metadata): the kv and score projections, float32 [T, c * dim] each (x times
        the weights in float32: x and the weights upcast, or bf16 weights times bf16 x into a float32 result, the
        same exact products)."""
        return self.wkv(x, out_dtype=torch.float32), self.wgate(x, out_dtype=torch.float32)

    def compress(self, kv, score, meta: ForwardMeta, state, prev, pool, block_table) -> None:
        """The per-sequence part: pool the projections into the slot state and the compressed entries."""
        self._compress(kv, score, self.ape, self.norm.weight, self.inv_freq, state, prev, pool, block_table, meta,
                       self.ratio, self.eps, self.act_dtype, self.post, self.dialect)
        if meta.redo is not None:  # the accumulators are not indexed by position: a rejected draft must be undone
            meta.redo.append(lambda rows, m: self._compress(
                kv[rows], score[rows], self.ape, self.norm.weight, self.inv_freq, state, prev, pool, m.block_table, m,
                self.ratio, self.eps, self.act_dtype, self.post, self.dialect))


class Indexer(nn.Module):
    """Scores compressed entries for each query and keeps the top `index_topk` (CSA layers)."""

    def __init__(self, cfg: ModelConfig, ratio: int, inv_freq: torch.Tensor, opts: ModelOptions):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.ratio, self.topk = ratio, cfg.index_topk
        qfmt = "fp8" if cfg.quantization is not None else "dense"
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, qfmt, opts)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, "dense", opts, fp8_gemm=False)
        self.compressor = Compressor(cfg, self.head_dim, ratio, True, "hadamard_fp4" if opts.official else "none",
                                     inv_freq, opts)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.weight_scale = (self.head_dim ** -0.5) * (self.n_heads ** -0.5)
        self.official = opts.official
        self._rope = opts.ops.apply_rope
        self._topk = opts.ops.indexer_topk
        self._rope_fp4 = opts.ops.rope_hadamard_fp4

    def forward(self, x, qr, meta: ForwardMeta, lc, block_table) -> torch.Tensor:
        return self.select(*self.project(x, qr, meta.positions), meta, lc, block_table)

    def project(self, x, qr, positions, kv_score=None, qr_q=None) -> tuple[torch.Tensor, ...]:
        """The per-token part (no step metadata beyond positions): the compressor's projections, the RoPE'd
        (and, official, Hadamard + FP4 simulated) index queries [T, H, d] and the head weights [T, H] (before
        their scale, which indexer_topk applies).
        `kv_score`: the compressor's projections when the caller computed them (fused with its own
        projections of the same input); `qr_q`: qr's act_quant (made by the q norm) or None."""
        kv, score = kv_score if kv_score else self.compressor.project(x)
        q = self.wq_b(qr, qr_q).view(x.shape[0], self.n_heads, self.head_dim)
        if self.official:  # RoPE, Hadamard rotation, FP4 round trip (one launch in Triton)
            q = self._rope_fp4(q, positions, self.inv_freq)
        else:
            q = self._rope(q, positions, self.inv_freq)
        w = self.weights_proj(x)  # indexer_topk applies float32(w) * weight_scale as it reads them
        return kv, score, q, w

    def select(self, kv, score, q, w, meta: ForwardMeta, lc, block_table) -> torch.Tensor:
        """The per-sequence part: compress this step's index keys, then each query's top entries [T, topk]."""
        self.compressor.compress(kv, score, meta, lc.idx_state, lc.idx_prev, lc.idx_pool, block_table)
        return self._topk(q, w, lc.idx_pool, block_table, meta, self.ratio, self.topk, self.weight_scale)
