"""Per-request model state on the device (design.md §3).

Fixed-size state, one row per cache slot (a slot is held by one request from admission to finish):
  - `window`   [S, W, D]: ring of the last W raw K=V vectors, slot position % W (every layer; also each MTP
               block's own ring in `mtp_layers`, allocated with `with_mtp`: the MTP block is SWA-only);
  - `state`    [S, 3, c*D] float32: the compressor's online-softmax accumulator of the open window
               (CSA, HCA), `prev` [S, 3, D]: CSA's A-series statistics of the last completed window;
  - `idx_state`/`idx_prev`: the same for the indexer's private compressor (CSA).
Growing state in paged pools shared through ONE block table per slot: a page covers `page_tokens` raw
tokens (a multiple of every compress ratio), so page p of a sequence holds, in the pool of a layer with
ratio m, that sequence's entries p*page_tokens/m .. (p+1)*page_tokens/m - 1:
  - `pool`     [P, page_tokens/m, D]: compressed KV entries (CSA, HCA);
  - `idx_pool` [P, page_tokens/4, d_I]: indexer keys (CSA).
Window rings and compressed pools are KV stores (ops/kv_format.py): float rows, or FP8 (`kv_fp8`) with
per-64 power-of-two scales on the non-rotary dims and float rotary dims. Indexer keys stay float.

Page NULL_PAGE (0) is reserved: no request ever owns it. It fills every block-table entry not
(yet) assigned, so a stray read of an unassigned entry reads the null page, never another request's
data; `num_pages` counts the pages requests can own (1..num_pages).

This class holds storage only. Who owns which slot and page, and how many tokens each slot holds, is
the KVCacheManager's (cache/kv_manager.py); tests and benchmarks that drive the model directly use
dsv4.cache.direct.DirectCache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.config import CSA, SWA, ModelConfig
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.compressor import reset_compressor_state
from dsv4.ops.kv_format import KVStore, kv_alloc, kv_row_bytes, kv_tensors

NULL_PAGE = 0  # reserved: the block-table filler for pages not (yet) assigned; no request owns it


@dataclass
class LayerCache:
    window: KVStore
    pool: KVStore | None = None
    state: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    idx_pool: torch.Tensor | None = None
    idx_state: torch.Tensor | None = None
    idx_prev: torch.Tensor | None = None

    def states(self):
        return [(self.state, self.prev), (self.idx_state, self.idx_prev)]


def default_page_tokens(cfg: ModelConfig) -> int:
    ratios = [r for r in cfg.compress_ratios if r] or [1]
    unit = math.lcm(128, *ratios)
    return unit * max(1, math.ceil(256 / unit))


@dataclass(frozen=True)
class CacheLayout:
    """Bytes of the cache, per slot (fixed state) and per page (growing state)."""

    page_tokens: int
    slot_bytes: int
    page_bytes: int

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype, kv_fp8: bool, page_tokens: int | None = None,
           with_mtp: bool = False) -> "CacheLayout":
        """`with_mtp`: count the MTP blocks' window rings too (ModelCache(with_mtp=True))."""
        pt = page_tokens or default_page_tokens(cfg)
        D, W, dI, r = cfg.head_dim, cfg.sliding_window, cfg.index_head_dim, cfg.rope_head_dim
        row = kv_row_bytes(D, r, kv_fp8, dtype)
        fb = torch.empty((), dtype=dtype).element_size()
        slot = page = 0
        for t, m in zip(cfg.layer_types, cfg.compress_ratios):
            slot += W * row
            if t != SWA:
                c = 2 if t == CSA else 1
                slot += 3 * c * D * 4 + (3 * D * 4 if t == CSA else 0)
                page += (pt // m) * row
            if t == CSA:
                slot += 3 * 2 * dI * 4 + 3 * dI * 4
                page += (pt // m) * dI * fb
        if with_mtp:
            slot += cfg.num_mtp_layers * W * row
        return cls(pt, slot, page)


class ModelCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_seq_len: int, device, dtype: torch.dtype,
                 page_tokens: int | None = None, num_pages: int = 0, kv_fp8: bool = False,
                 dialect: Fp8Dialect = Fp8Dialect.OCP, with_mtp: bool = False):
        """`num_pages`: pages requests can own (one more, the null page, is allocated). `with_mtp`: also
        allocate `mtp_layers`, one window ring per MTP block of `cfg` (otherwise it is empty)."""
        if num_slots < 1 or max_seq_len < 1 or num_pages < 0:
            raise ValueError(f"num_slots and max_seq_len must be positive and num_pages >= 0, got {num_slots}, "
                             f"{max_seq_len}, {num_pages}")
        self.cfg, self.num_slots, self.max_seq_len = cfg, num_slots, max_seq_len
        self.page_tokens = page_tokens or default_page_tokens(cfg)
        for r in cfg.compress_ratios:
            if r and self.page_tokens % r:
                raise ValueError(f"page_tokens {self.page_tokens} is not a multiple of compress ratio {r}")
        self.pages_per_seq = math.ceil(max_seq_len / self.page_tokens)
        self.num_pages = num_pages
        self.block_table = torch.full((num_slots, self.pages_per_seq), NULL_PAGE, dtype=torch.int64, device=device)
        self.kv_fp8, self.dtype, self.device = kv_fp8, dtype, torch.device(device)
        D, W, dI, r = cfg.head_dim, cfg.sliding_window, cfg.index_head_dim, cfg.rope_head_dim
        P = 1 + self.num_pages  # the null page first

        def store(lead):
            return kv_alloc(lead, D, r, kv_fp8, dtype, device, dialect)

        f32 = dict(device=device, dtype=torch.float32)
        self.layers: list[LayerCache] = []
        for t, m in zip(cfg.layer_types, cfg.compress_ratios):
            lc = LayerCache(window=store((num_slots, W)))
            if t != SWA:
                c = 2 if t == CSA else 1
                lc.pool = store((P, self.page_tokens // m))
                lc.state = torch.empty(num_slots, 3, c * D, **f32)
                lc.prev = torch.empty(num_slots, 3, D, **f32) if t == CSA else None
            if t == CSA:
                lc.idx_pool = torch.zeros(P, self.page_tokens // m, dI, device=device, dtype=dtype)
                lc.idx_state = torch.empty(num_slots, 3, 2 * dI, **f32)
                lc.idx_prev = torch.empty(num_slots, 3, dI, **f32)
            self.layers.append(lc)
        self.with_mtp = with_mtp
        self.mtp_layers: list[LayerCache] = [LayerCache(window=store((num_slots, W)))
                                             for _ in range(cfg.num_mtp_layers if with_mtp else 0)]
        self.reset(list(range(num_slots)))

    @staticmethod
    def pages_needed(cfg: ModelConfig, num_tokens: int, page_tokens: int | None = None) -> int:
        """Pages covering `num_tokens` tokens of one sequence."""
        return math.ceil(num_tokens / (page_tokens or default_page_tokens(cfg)))

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout.of(self.cfg, self.dtype, self.kv_fp8, self.page_tokens, self.with_mtp)

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor holding per-slot state (indexed by slot in dim 0): window rings (the MTP blocks' too)
        and compressor accumulators."""
        out = []
        for lc in self.layers + self.mtp_layers:
            out += kv_tensors(lc.window)
            out += [t for pair in lc.states() for t in pair if t is not None]
        return out

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the fixed state of slot src[i] into slot dst[i] (prefix caching: a snapshot taken at a page
        boundary, or restored into a request's slot). Device ops on the current stream, ordered with steps."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.int64).to(self.device, non_blocking=True)
        d = torch.tensor(dst, dtype=torch.int64).to(self.device, non_blocking=True)
        for t in self.slot_tensors():
            t.index_copy_(0, d, t.index_select(0, s))

    def reset(self, slots: list[int]) -> None:
        """Empty the per-slot state (compressor accumulators) of `slots`. Window rings, the MTP blocks' too,
        need nothing: they are indexed by position and read only below a sequence's length."""
        for lc in self.layers + self.mtp_layers:
            for state, prev in lc.states():
                if state is not None:
                    reset_compressor_state(state, prev, slots)
