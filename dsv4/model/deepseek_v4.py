"""The DeepSeek-V4 transformer (spec §2): embedding -> mHC streams -> blocks -> hc_head -> norm -> head.
Also the MTP block (spec §6): Transformer.mtp_forward / mtp_logits / mtp_draft_tokens, for speculative decoding."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import SWA, ModelConfig
from dsv4.model.attention import Attention
from dsv4.model.linear import Linear, RMSNorm
from dsv4.model.moe import MoE
from dsv4.model.options import ModelOptions
from dsv4.numerics.fp8 import quantize_fp8_blocks
from dsv4.ops.meta import ForwardMeta


def _hc_buffers(mod: nn.Module, prefix: str, rows: int, width: int, scales: int) -> None:
    mod.register_buffer(f"{prefix}_fn", torch.empty(rows, width, dtype=torch.float32))
    mod.register_buffer(f"{prefix}_base", torch.empty(rows, dtype=torch.float32))
    mod.register_buffer(f"{prefix}_scale", torch.empty(scales, dtype=torch.float32))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, ratio: int, mlp_type: str, opts: ModelOptions):
        super().__init__()
        self.cfg = cfg
        n, D = cfg.hc_mult, cfg.hidden_size
        _hc_buffers(self, "hc_attn", cfg.hc_mix_dim, n * D, 3)
        _hc_buffers(self, "hc_ffn", cfg.hc_mix_dim, n * D, 3)
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, opts)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, opts)
        self.attn = Attention(cfg, layer_type, ratio, opts)
        self.ffn = MoE(cfg, mlp_type, opts)
        self._pre, self._post = opts.ops.hc_pre, opts.ops.hc_post
        self.official, self.dialect = opts.official, opts.fp8_dialect

    def forward(self, X, input_ids, meta: ForwardMeta, lc, prev=None, defer: bool = False, rows=None):
        """The block's output streams; or, with `defer`, (X, (f, post, comb)) whose hc_post the next block's first
        hc_pre applies (`prev`): a provider may do that hc_post and the mixing in one pass. `rows` (int64 [R], on
        the device): only those rows go on after the attention (which still reads and writes every row's cache
        entries): the FFN runs on R rows and the output is [R, hc, D], row r = the full output's row rows[r]
        (R = 0: nothing runs after the attention)."""
        c = self.cfg
        # hc_pre hands out u through the norm that follows it (attn_norm / ffn_norm), and in official numerics its
        # act_quant for the FP8 linears that read it: one pass for all three
        kw = {"quant": self.dialect} if self.official else {}
        X, h, post, comb, *hq = self._pre_after(prev, X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                                c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters,
                                                norm=self.attn_norm.params(), **kw)
        f = self.attn(h, meta, lc, meta.block_table, *hq)
        ep_tokens = meta.ep_tokens
        if rows is not None and rows.numel() == 0 and not defer:  # no row goes on: the attention's cache writes only
            return X[:0]
        if rows is not None:  # (every op after this point is row-wise: the kept rows' values are unchanged)
            f, X, post, comb, input_ids = f[rows], X[rows], post[rows], comb[rows], input_ids[rows]
            ep_tokens = rows.shape[0] if ep_tokens is not None else None  # (padded alike on every rank)
        X, h, post, comb, *hq = self._pre_after((f, post, comb), X, self.hc_ffn_fn, self.hc_ffn_scale,
                                                self.hc_ffn_base, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters,
                                                norm=self.ffn_norm.params(), **kw)
        f = self.ffn(h, input_ids, ep_tokens, *hq)
        return (X, (f, post, comb)) if defer else self._post(f, X, post, comb)

    def _pre_after(self, prev, X, *args, **kw):
        """(X', *hc_pre(X', ...)) with X' = X after the pending hc_post `prev` (none: X)."""
        if prev is None:
            return (X, *self._pre(X, *args, **kw))
        return self._pre(X, *args, prev=prev, **kw)


class MTPBlock(Block):
    """Multi-token prediction block: a sliding-window block fed by e_proj(enorm(embed(t))) +
    h_proj(hnorm(main streams)), with its own hc_head and norm; shares embed and head (spec §6)."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions):
        super().__init__(cfg, SWA, 0, "moe", opts)
        D = cfg.hidden_size
        fmt = "fp8" if cfg.quantization is not None else "dense"
        self.e_proj = Linear(D, D, fmt, opts)
        self.h_proj = Linear(D, D, fmt, opts)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, opts)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, opts)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, opts)
        _hc_buffers(self, "hc_head", cfg.hc_mult, cfg.hc_mult * D, 1)


class Transformer(nn.Module):
    """forward(input_ids [T], meta, cache) -> residual streams [T, hc_mult, D] before the hc_head;
    logits(streams[rows]) -> float32 logits; mtp_forward / mtp_logits: the same for the MTP block. The
    model keeps no per-request state itself: the window rings, compressor states and compressed pools
    live in the cache it is given, paged through meta.block_table. It reads and checks no lengths: whoever
    builds the step's metadata (the engine's runner, or dsv4.cache.direct.DirectCache) owns them."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions, with_mtp: bool = False):
        super().__init__()
        self.cfg, self.opts = cfg, opts
        D = cfg.hidden_size
        self.embed = nn.Module()
        self.embed.register_buffer("weight", torch.empty(cfg.vocab_size, D, dtype=opts.dtype))
        self.layers = nn.ModuleList(
            Block(cfg, t, r, m, opts) for t, r, m in zip(cfg.layer_types, cfg.compress_ratios, cfg.mlp_layer_types))
        self.norm = RMSNorm(D, cfg.rms_norm_eps, opts)
        self.head = nn.Module()
        # the checkpoint's head is BF16, so holding it in the activation dtype (bf16) is exact; logits stay fp32
        # (lm_head op). The official code upcasts it to fp32: same values, twice the bytes read per step.
        self.head.register_buffer("weight", torch.empty(cfg.vocab_size, D, dtype=opts.dtype))
        _hc_buffers(self, "hc_head", cfg.hc_mult, cfg.hc_mult * D, 1)
        self.mtp = nn.ModuleList(MTPBlock(cfg, opts) for _ in range(cfg.num_mtp_layers if with_mtp else 0))
        self._hc_head = opts.ops.hc_head
        self.draft_head: tuple[torch.Tensor, torch.Tensor] | None = None  # build_draft_head

    def forward(self, input_ids: torch.Tensor, meta: ForwardMeta, cache) -> torch.Tensor:
        x = self.embed.weight[input_ids].to(self.opts.dtype)
        X = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        prev = None  # each block's last hc_post is applied by the next block's first hc_pre (one pass)
        for i, layer in enumerate(self.layers):
            X, prev = layer(X, input_ids, meta, cache.layers[i], prev, defer=True)
        return self.layers[-1]._post(prev[0], X, prev[1], prev[2])

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        h = self._hc_head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.rms_norm_eps, c.hc_eps,
                          norm=self.norm.params())
        return self.opts.ops.lm_head(h, self.head.weight)

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, meta: ForwardMeta, cache,
                    k: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """MTP block k (spec §6 steps 1-3) on rows aligned by the caller: streams[t] [hc_mult, D] are the
        main model's streams (forward's output) at position meta.positions[t], next_ids[t] the token at the
        position after it. Writes the block's window ring, cache.mtp_layers[k]; returns its output streams
        [T, hc_mult, D] (before its hc_head: mtp_logits, or the next draft step's `streams`). `rows`: the
        rows whose output is wanted (the last kept row of each drafting sequence): every row still writes
        its ring entry, but the block's MoE runs on those rows only, and the output is [len(rows), hc, D]."""
        blk = self.mtp[k]
        T, n, D = streams.shape
        # the official MTPBlock does not zero the embedding at position 0 (vLLM does): neither do we
        e = blk.e_proj(blk.enorm(self.embed.weight[next_ids].to(self.opts.dtype)))
        h = blk.h_proj(blk.hnorm(streams.reshape(T * n, D))).view(T, n, D)
        X = (h + e.unsqueeze(1)).contiguous()
        return blk(X, next_ids, meta, cache.mtp_layers[k], rows=rows)

    def _mtp_hidden(self, X: torch.Tensor, k: int) -> torch.Tensor:
        blk, c = self.mtp[k], self.cfg
        return self._hc_head(X, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, c.rms_norm_eps, c.hc_eps,
                             norm=blk.norm.params())

    def mtp_logits(self, X: torch.Tensor, k: int = 0) -> torch.Tensor:
        """float32 logits [T, V] of MTP block k's output streams X: its own hc_head and norm, the shared head."""
        return self.opts.ops.lm_head(self._mtp_hidden(X, k), self.head.weight)

    def mtp_draft_logits(self, X: torch.Tensor, k: int = 0) -> torch.Tensor:
        """The drafter's logits [T, V] from MTP block k's output streams X: mtp_logits, or, once build_draft_head
        ran, the same hidden state times the FP8 copy of the head (FP8 GEMM with activations quantised per 1x128,
        as the model's FP8 linears)."""
        if self.draft_head is None:
            return self.mtp_logits(X, k)
        w, s = self.draft_head
        return self.opts.ops.linear(self._mtp_hidden(X, k), w, s, True, self.opts.fp8_dialect)

    def mtp_draft_tokens(self, X: torch.Tensor, k: int = 0) -> torch.Tensor:
        """The drafter's greedy tokens [T]: the argmax of mtp_draft_logits."""
        return self.mtp_draft_logits(X, k).argmax(dim=-1)

    def build_draft_head(self, rows_per_chunk: int = 8192) -> None:
        """An FP8 copy of the shared head (128 x 128 blocks, E8M0 scales, the platform's dialect) for
        mtp_draft_tokens: half the bytes each draft pass reads (0.5 GiB instead of 1 GiB for Flash). Drafts are
        chosen greedily and verification is exact (engine/spec_decode.py), so the drafter's head changes which
        drafts are proposed, never the output. Quantised in row chunks (no full-size float32 copy)."""
        w = self.head.weight
        V, D = w.shape
        q = torch.empty((V, D), dtype=self.opts.fp8_dtype, device=w.device)
        s = torch.empty((-(-V // 128), -(-D // 128)), dtype=torch.uint8, device=w.device)
        step = max(128, rows_per_chunk // 128 * 128)
        for r0 in range(0, V, step):
            qb, sb = quantize_fp8_blocks(w[r0:r0 + step].float(), (128, 128), self.opts.fp8_dialect)
            q[r0:r0 + step] = qb.view(self.opts.fp8_dtype)
            s[r0 // 128:r0 // 128 + sb.shape[0]] = sb
        self.draft_head = (q, s)
