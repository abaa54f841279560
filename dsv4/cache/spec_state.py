"""Rolling back rejected draft tokens (speculative decoding, engine/spec_decode.py).

A verify step runs a request's last token and its drafts as one chunk. Most of what that writes is indexed
by position and so harmless once the request's length is cut back: compressed entries and indexer keys of
positions past the kept tokens are invisible (visibility follows the length) and rewritten later. Two kinds
of per-slot state are not: the window ring (slot position % W: a draft's row replaces the row of the
position W earlier, which the next tokens still attend) and the compressors' online-softmax accumulators
(a draft may even complete a window and reset them). For those, `StateSnapshot` keeps, before the step, the
ring rows the chunk will overwrite and the accumulator rows of each speculating slot; after the step
`rollback` puts them back for the requests that lost drafts and redoes, from the step's own recorded
inputs (ForwardMeta.redo), the writes of the tokens they keep.
"""

from __future__ import annotations

import torch

from dsv4.cache.model_cache import LayerCache
from dsv4.ops.kv_format import Fp8KV
from dsv4.ops.meta import ForwardMeta


def _parts(store) -> list[torch.Tensor]:
    """The tensors of a KV store (kv_format.py)."""
    return [store.nope, store.scale, store.rope] if isinstance(store, Fp8KV) else [store]


class StateSnapshot:
    """Copies of the ring rows positions starts[b] .. starts[b] + num_new[b] - 1 will overwrite in slot
    slots[b], and of the compressor accumulators of those slots, in `layers` (the model's layer caches, or
    the MTP block's)."""

    def __init__(self, layers: list[LayerCache], slots: list[int], starts: list[int], num_new: list[int]):
        self.layers, self.slots = layers, list(slots)
        dev = layers[0].window.device if layers else torch.device("cpu")
        W = layers[0].window.shape[1] if layers else 1
        rs, rp = [], []
        self._ring_rows: dict[int, list[int]] = {}  # slot -> its rows among the saved ones
        self._index = {s: b for b, s in enumerate(slots)}
        for s, p, n in zip(slots, starts, num_new):
            lo = max(p, p + n - W)  # (a chunk longer than the ring writes only its last W rows)
            self._ring_rows[s] = list(range(len(rs), len(rs) + p + n - lo))
            rs += [s] * (p + n - lo)
            rp += [q % W for q in range(lo, p + n)]
        self.ring_slot = torch.tensor(rs, dtype=torch.int64, device=dev)
        self.ring_pos = torch.tensor(rp, dtype=torch.int64, device=dev)
        self.slot_t = torch.tensor(list(slots), dtype=torch.int64, device=dev)
        self.rings = [[t[self.ring_slot, self.ring_pos] for t in _parts(lc.window)] for lc in layers]
        self.states = [[None if t is None else t[self.slot_t] for t in _state_tensors(lc)] for lc in layers]

    def restore(self, slots: list[int]) -> None:
        """Put back what the snapshot holds for `slots` (a subset of its slots)."""
        if not slots:
            return
        dev = self.slot_t.device
        rows = torch.tensor([i for s in slots for i in self._ring_rows[s]], dtype=torch.int64, device=dev)
        idx = torch.tensor([self._index[s] for s in slots], dtype=torch.int64, device=dev)
        sl = self.slot_t[idx]
        for lc, ring, states in zip(self.layers, self.rings, self.states):
            for t, saved in zip(_parts(lc.window), ring):
                t[self.ring_slot[rows], self.ring_pos[rows]] = saved[rows]
            for t, saved in zip(_state_tensors(lc), states):
                if t is not None:
                    t[sl] = saved[idx]


def _state_tensors(lc: LayerCache) -> list[torch.Tensor | None]:
    return [lc.state, lc.prev, lc.idx_state, lc.idx_prev]


def rollback(snapshot: StateSnapshot, meta: ForwardMeta, keep: dict[int, int]) -> None:
    """After a verify step (run with meta.redo recording): sequence b of `meta` keeps its first keep[b]
    tokens of the step (keep[b] < its scheduled count: drafts were rejected; sequences not in `keep` kept
    all). Restores the snapshot of those sequences and redoes the kept tokens' writes."""
    if not keep:
        return
    bs = sorted(keep)
    snapshot.restore([meta.seq_slots_host[b] for b in bs])
    rows = [t for b in bs for t in range(meta.query_start_host[b], meta.query_start_host[b] + keep[b])]
    sub = ForwardMeta.build([meta.seq_slots_host[b] for b in bs], [meta.seq_start_host[b] for b in bs],
                            [keep[b] for b in bs], device=meta.positions.device, block_table=meta.block_table)
    r = torch.tensor(rows, dtype=torch.int64, device=meta.positions.device)
    for redo in meta.redo:
        redo(r, sub)
