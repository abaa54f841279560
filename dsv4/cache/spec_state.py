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
from dsv4.config import CSA, SWA, ModelConfig
from dsv4.ops.kv_format import kv_tensors as _parts
from dsv4.ops.meta import ForwardMeta


class StateSnapshot:
    """Copies of the ring rows positions starts[b] .. starts[b] + num_new[b] - 1 will overwrite in slot
    slots[b], and of the compressor accumulators of those slots, in `layers` (the model's layer caches, or
    the MTP block's)."""

    def __init__(self, layers: list[LayerCache], slots: list[int], starts: list[int], num_new: list[int]):
        dev = layers[0].window.device if layers else torch.device("cpu")
        W = layers[0].window.shape[1] if layers else 1
        rs, rp = [], []
        ring_rows: dict[int, range] = {}  # slot -> its rows among the saved ones
        for s, p, n in zip(slots, starts, num_new):
            lo = max(p, p + n - W)  # (a chunk longer than the ring writes only its last W rows)
            ring_rows[s] = range(len(rs), len(rs) + p + n - lo)
            rs += [s] * (p + n - lo)
            rp += [q % W for q in range(lo, p + n)]
        self._take(layers, torch.tensor(rs, dtype=torch.int64, device=dev),
                   torch.tensor(rp, dtype=torch.int64, device=dev),
                   torch.tensor(list(slots), dtype=torch.int64, device=dev))
        self.bind(list(slots), ring_rows)

    def _take(self, layers, ring_slot: torch.Tensor, ring_pos: torch.Tensor, slot_t: torch.Tensor) -> None:
        self.layers, self.ring_slot, self.ring_pos, self.slot_t = layers, ring_slot, ring_pos, slot_t
        self.rings = [[t[ring_slot, ring_pos] for t in _parts(lc.window)] for lc in layers]
        self.states = [[None if t is None else t[slot_t] for t in state_tensors(lc)] for lc in layers]

    @classmethod
    def uniform(cls, layers: list[LayerCache], slots: torch.Tensor, starts: torch.Tensor, q: int) -> "StateSnapshot":
        """The snapshot of a step where each of the Bb sequences (device `slots`, `starts` [Bb]) adds `q`
        tokens (q <= the ring size), taken by device ops only (captured in verify graphs,
        engine/cuda_graphs.py). Sequence b's ring rows are b*q .. b*q + q - 1; `bind` says which slot is
        which before a restore."""
        self = cls.__new__(cls)
        W = layers[0].window.shape[1]
        offs = torch.arange(q, dtype=torch.int64, device=slots.device)
        ring_pos = ((starts[:, None] + offs[None, :]) % W).reshape(-1)
        self._take(layers, slots[:, None].expand(-1, q).reshape(-1), ring_pos, slots)
        self.q = q
        return self

    def bind(self, slots: list[int], ring_rows: dict[int, range] | None = None) -> "StateSnapshot":
        """Which slot each saved sequence is (the b-th holds slots[b]); `ring_rows` (default: the uniform
        layout) maps each slot to its rows among the saved ring rows."""
        self.slots = slots
        self._index = {s: b for b, s in enumerate(slots)}
        self._ring_rows = ring_rows if ring_rows is not None else {
            s: range(b * self.q, (b + 1) * self.q) for b, s in enumerate(slots)}
        return self

    def restore(self, slots: list[int]) -> None:
        """Put back what the snapshot holds for `slots` (a subset of its slots)."""
        if not slots:
            return
        dev = self.slot_t.device
        rows = torch.tensor([i for s in slots for i in self._ring_rows[s]], dtype=torch.int64, device=dev)
        idx = torch.tensor([self._index[s] for s in slots], dtype=torch.int64, device=dev)
        self.put_back(rows, idx)

    def put_back(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        """Device ops only: put back the saved ring rows `rows` and the accumulators of saved sequences `idx`
        (device index tensors; verify graphs' rollback graphs call this with staged ones)."""
        sl = self.slot_t[idx]
        rsl, rps = self.ring_slot[rows], self.ring_pos[rows]
        for lc, ring, states in zip(self.layers, self.rings, self.states):
            for t, saved in zip(_parts(lc.window), ring):
                t[rsl, rps] = saved[rows]
            for t, saved in zip(state_tensors(lc), states):
                if t is not None:
                    t[sl] = saved[idx]


def state_tensors(lc: LayerCache) -> list[torch.Tensor | None]:
    """A layer cache's compressor accumulators (None where the layer has none), in snapshot order."""
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


def redo_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes a verify step's redo functions hold per token (a verify graph keeps them with the graph): each
    layer's K=V row, and the float32 inputs (kv, score) of its compressors."""
    eb = torch.empty((), dtype=dtype).element_size()
    n = 0
    for t in cfg.layer_types:
        n += cfg.head_dim * eb
        if t != SWA:
            n += 2 * (2 if t == CSA else 1) * cfg.head_dim * 4
        if t == CSA:
            n += 2 * 2 * cfg.index_head_dim * 4
    return n
