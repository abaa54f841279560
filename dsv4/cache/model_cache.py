"""Per-request model state (design.md §3).

Fixed-size state, one row per cache slot (a slot is held by one request from admission to finish):
  - `window`   [S, W, D]: ring of the last W raw K=V vectors, slot position % W (every layer);
  - `state`    [S, 3, c*D] float32: the compressor's online-softmax accumulator of the open window
               (CSA, HCA), `prev` [S, 3, D]: CSA's A-series statistics of the last completed window;
  - `idx_state`/`idx_prev`: the same for the indexer's private compressor (CSA).
Growing state in paged pools shared through ONE block table per slot: a page covers `page_tokens` raw
tokens (a multiple of every compress ratio), so page p of a sequence holds, in the pool of a layer with
ratio m, that sequence's entries p*page_tokens/m .. (p+1)*page_tokens/m - 1:
  - `pool`     [P, page_tokens/m, D]: compressed KV entries (CSA, HCA);
  - `idx_pool` [P, page_tokens/4, d_I]: indexer keys (CSA).
This class assigns pages to slots statically (slot s owns pages s*pps .. s*pps+pps-1); the serving
engine replaces that with an allocator over the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.config import CSA, SWA, ModelConfig
from dsv4.ops.compressor import reset_compressor_state
from dsv4.ops.meta import ForwardMeta


@dataclass
class LayerCache:
    window: torch.Tensor
    pool: torch.Tensor | None = None
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


class ModelCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_seq_len: int, device, dtype: torch.dtype,
                 page_tokens: int | None = None):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"num_slots and max_seq_len must be positive, got {num_slots}, {max_seq_len}")
        self.cfg, self.num_slots, self.max_seq_len = cfg, num_slots, max_seq_len
        self.page_tokens = page_tokens or default_page_tokens(cfg)
        for r in cfg.compress_ratios:
            if r and self.page_tokens % r:
                raise ValueError(f"page_tokens {self.page_tokens} is not a multiple of compress ratio {r}")
        pps = math.ceil(max_seq_len / self.page_tokens)
        self.block_table = torch.arange(num_slots * pps, device=device, dtype=torch.int64).view(num_slots, pps)
        D, W, dI = cfg.head_dim, cfg.sliding_window, cfg.index_head_dim
        P = num_slots * pps
        f32 = dict(device=device, dtype=torch.float32)
        self.layers: list[LayerCache] = []
        for t, m in zip(cfg.layer_types, cfg.compress_ratios):
            lc = LayerCache(window=torch.zeros(num_slots, W, D, device=device, dtype=dtype))
            if t != SWA:
                c = 2 if t == CSA else 1
                lc.pool = torch.zeros(P, self.page_tokens // m, D, device=device, dtype=dtype)
                lc.state = torch.empty(num_slots, 3, c * D, **f32)
                lc.prev = torch.empty(num_slots, 3, D, **f32) if t == CSA else None
            if t == CSA:
                lc.idx_pool = torch.zeros(P, self.page_tokens // m, dI, device=device, dtype=dtype)
                lc.idx_state = torch.empty(num_slots, 3, 2 * dI, **f32)
                lc.idx_prev = torch.empty(num_slots, 3, dI, **f32)
            self.layers.append(lc)
        self._free = list(range(num_slots - 1, -1, -1))
        self._lens = [0] * num_slots
        self.reset(list(range(num_slots)))

    def reset(self, slots: list[int]) -> None:
        for lc in self.layers:
            for state, prev in lc.states():
                if state is not None:
                    reset_compressor_state(state, prev, slots)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} cache slots are in use")
        s = self._free.pop()
        self.reset([s])
        self._lens[s] = 0
        return s

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    def begin_step(self, meta: ForwardMeta) -> None:
        """Check that each sequence continues exactly where its slot stopped and fits the cache, and
        record the new lengths."""
        for s, p0, p1 in zip(meta.seq_slots_host, meta.seq_start_host, meta.seq_lens_host):
            if s in self._free:
                raise ValueError(f"slot {s} is not allocated")
            if p0 != self._lens[s]:
                raise ValueError(f"slot {s} holds {self._lens[s]} tokens but the step starts at position {p0}")
            if p1 > self.max_seq_len:
                raise ValueError(f"sequence in slot {s} would reach {p1} tokens; this cache holds {self.max_seq_len}")
        for s, p1 in zip(meta.seq_slots_host, meta.seq_lens_host):
            self._lens[s] = p1

    def seq_len(self, slot: int) -> int:
        return self._lens[slot]
