"""One engine step's batch, derived once: the runner turns the scheduler's (request, new tokens) pairs into
a `StepBatch` (token ids, positions, the token -> sequence map, slots, start / end lengths, query starts,
the block table, the graph bucket, expert parallelism's agreed token count) and the model receives its one
`ForwardMeta`. Eager and graph steps are built alike, through one pinned host staging buffer and ONE host
-> device copy per step (`StepBuffers`); a decode graph reads the same device buffer at the offsets of its
bucket, so replaying it needs nothing else written.

Lengths are the KV manager's (cache/kv_manager.py: `begin_step` checks that each sequence continues where
its slot stopped); the model reads none itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.engine.request import Request
from dsv4.ops.meta import ForwardMeta

_FIELDS = ("ids", "positions", "token_seq", "slots", "seq_start", "seq_lens", "query_start")


def _aligned(n: int) -> int:
    """Each field starts on a 128-byte boundary (16 int64), as a tensor of its own would: kernels see the
    same pointer alignment (Triton specialises on it) as with separate allocations."""
    return (n + 15) // 16 * 16


class StepBuffers:
    """Per-step int64 values in one device buffer, written through one pinned staging buffer of the same
    size. A step of Tp token rows and Bp sequence rows lays them out one after another (each 128-byte
    aligned): ids, positions, token_seq ([Tp] each), slots, seq_start, seq_lens ([Bp] each), query_start
    ([Bp + 1]); the layout depends only on
    (Tp, Bp), so a graph captured for a bucket (Tp = Bp = batch) finds its inputs at fixed addresses."""

    def __init__(self, max_tokens: int, max_seqs: int, device):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.device = torch.device(device)
        n = self.size(max_tokens, max_seqs)
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self.host_np = self.host.numpy()  # (the same memory: numpy writes cost ~1 us, torch ops on it ~5)
        self.dev = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._copied: torch.cuda.Event | None = None
        self.copies = 0  # host -> device copies made (one per step)
        self._view_cache: dict[tuple, dict] = {}  # (buffer, Tp, Bp) -> views (a decode loop reuses a few layouts)

    def _views(self, buf, Tp: int, Bp: int) -> dict:
        key = (id(buf), Tp, Bp)
        got = self._view_cache.get(key)
        if got is not None:
            return got
        if Tp > self.max_tokens or Bp > self.max_seqs:
            raise ValueError(f"a step of {Tp} tokens / {Bp} sequences exceeds the step buffers' "
                             f"{self.max_tokens} / {self.max_seqs}")
        out, o = {}, 0
        for name, n in zip(_FIELDS, self._sizes(Tp, Bp)):
            out[name] = buf[o:o + n]
            o += _aligned(n)
        if len(self._view_cache) >= 256:  # (bounded: eager steps' layouts vary with their token counts)
            self._view_cache.clear()
        self._view_cache[key] = out
        return out

    @staticmethod
    def _sizes(Tp: int, Bp: int) -> tuple[int, ...]:
        return (Tp, Tp, Tp, Bp, Bp, Bp, Bp + 1)

    def size(self, Tp: int, Bp: int) -> int:
        return sum(_aligned(n) for n in self._sizes(Tp, Bp))

    def stage(self, Tp: int, Bp: int) -> dict[str, torch.Tensor]:
        """Host views to fill (waits until the previous step's copy has left the staging buffer)."""
        self._wait_copied()
        return self._views(self.host, Tp, Bp)

    def stage_np(self, Tp: int, Bp: int) -> dict[str, np.ndarray]:
        """`stage` as numpy views of the same memory."""
        self._wait_copied()
        return self._views(self.host_np, Tp, Bp)

    def _wait_copied(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def send(self, Tp: int, Bp: int) -> dict[str, torch.Tensor]:
        """Copy what was staged to the device (one copy); the device views."""
        n = self.size(Tp, Bp)
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.copies += 1
        return self._views(self.dev, Tp, Bp)

    def device_views(self, Tp: int, Bp: int) -> dict[str, torch.Tensor]:
        return self._views(self.dev, Tp, Bp)


@dataclass
class StepBatch:
    reqs: list[Request]
    starts: list[int]  # tokens in each request's cache before the step
    num_new: list[int]  # tokens each request adds
    ids: torch.Tensor  # [T] (graph steps: [bucket batch]) int64, on the device
    meta: ForwardMeta | None  # None for a graph step (the graph holds its own)
    graph: tuple[int, int] | None = None  # the decode graph bucket (batch, context) replayed, or None
    piecewise: int | None = None  # the piecewise graph token bucket the step runs in, or None

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


def _token_ids(reqs: list[Request], starts: list[int], ns: list[int]) -> list[int]:
    return list(itertools.chain.from_iterable(r.token_slice(s, s + n) for r, s, n in zip(reqs, starts, ns)))


_TOKEN_FIELDS = ("ids", "positions", "token_seq")


def _first_rows(views: dict[str, torch.Tensor], T: int) -> dict[str, torch.Tensor]:
    """The views of a padded layout with the token fields cut to the step's T real tokens."""
    return {k: (v[:T] if k in _TOKEN_FIELDS else v) for k, v in views.items()}


def build_eager(buffers: StepBuffers, reqs: list[Request], starts: list[int], ns: list[int], slots: list[int],
                block_table: torch.Tensor, ep_tokens: int | None = None,
                ids: list[int] | None = None, pad_to: int | None = None) -> StepBatch:
    """A varlen step of T = sum(ns) tokens. `slots`: each sequence's cache slot (the requests' own, or a
    scratch slot); `ids` (default: the requests' tokens) for steps with no requests. `pad_to` (a piecewise
    graph bucket, engine/piecewise_graphs.py): the token fields are laid out for that many rows, rows T.. being
    token 0 at position 0; the batch's ids and meta cover the T real tokens only."""
    B = len(slots)
    if not (B == len(starts) == len(ns)) or B == 0:
        raise ValueError("a step needs one slot, start and token count per sequence, and at least one")
    qs = [0]
    for n in ns:
        if n < 1:
            raise ValueError(f"every scheduled sequence needs at least one new token, got {ns}")
        qs.append(qs[-1] + n)
    T = qs[-1]
    lens = [s + n for s, n in zip(starts, ns)]
    tok = _token_ids(reqs, starts, ns) if ids is None else ids
    Tp = T if pad_to is None else pad_to
    if Tp < T:
        raise ValueError(f"a step of {T} tokens cannot be padded to {Tp}")
    h = buffers.stage(Tp, B)
    if Tp > T:
        for name in _TOKEN_FIELDS:
            h[name][T:].zero_()
        h = _first_rows(h, T)
    h["ids"].copy_(torch.tensor(tok, dtype=torch.int64))
    n_t = torch.tensor(ns, dtype=torch.int64)
    h["slots"].copy_(torch.tensor(slots, dtype=torch.int64))
    h["seq_start"].copy_(torch.tensor(starts, dtype=torch.int64))
    h["seq_lens"].copy_(torch.tensor(lens, dtype=torch.int64))
    h["query_start"].copy_(torch.tensor(qs, dtype=torch.int64))
    h["token_seq"].copy_(torch.repeat_interleave(torch.arange(B, dtype=torch.int64), n_t))
    # position of token t of sequence b: seq_start[b] + (t - query_start[b])
    h["positions"].copy_(torch.arange(T, dtype=torch.int64)
                         + torch.repeat_interleave(h["seq_start"] - h["query_start"][:-1], n_t))
    d = buffers.send(Tp, B)
    if Tp > T:
        d = _first_rows(d, T)
    meta = ForwardMeta(positions=d["positions"], token_seq=d["token_seq"], seq_slots=d["slots"],
                       query_start=d["query_start"], seq_start=d["seq_start"], seq_lens=d["seq_lens"],
                       query_start_host=qs, seq_start_host=list(starts), seq_lens_host=lens,
                       seq_slots_host=list(slots), block_table=block_table, ep_tokens=ep_tokens)
    return StepBatch(reqs, starts, ns, d["ids"], meta, piecewise=pad_to)


def stage_decode(buffers: StepBuffers, Bb: int, scratch: int, ids: list[int], slots: list[int],
                 positions: list[int], q: int = 1) -> torch.Tensor:
    """Stage and send a decode step of B = len(slots) sequences padded to bucket Bb, each adding `q` tokens
    (q > 1: a verify step, the last token and its q - 1 drafts): sequence b's tokens ids[b*q:(b+1)*q] sit at
    positions positions[b] .. positions[b] + q - 1. Rows B..Bb-1 are q-token sequences at positions 0..q-1
    of the scratch slot. Returns the device ids [Bb * q]."""
    B = len(slots)
    if len(ids) != B * q or len(positions) != B or B > Bb:
        raise ValueError(f"a decode step of {B} sequences x {q} tokens in bucket {Bb}: got {len(ids)} ids and "
                         f"{len(positions)} positions")
    h = buffers.stage_np(Bb * q, Bb)  # (numpy views of the pinned staging buffer: a few us in all)
    start = h["seq_start"]
    start[:B] = positions
    start[B:] = 0
    h["ids"][:B * q] = ids
    h["ids"][B * q:] = 0
    h["positions"].reshape(Bb, q)[:] = start[:, None] + np.arange(q)
    h["token_seq"].reshape(Bb, q)[:] = np.arange(Bb)[:, None]
    h["slots"][:B] = slots
    h["slots"][B:] = scratch
    np.add(start, q, out=h["seq_lens"])
    h["query_start"][:] = np.arange(0, Bb * q + 1, q)
    return buffers.send(Bb * q, Bb)["ids"]
