"""Decode steps replayed from captured device graphs (CUDA graphs; HIP graphs through the same torch API).

A decode step (every scheduled sequence adds exactly one token) of B sequences runs the graph of the
smallest batch bucket Bb >= B captured for the smallest context bucket C >= the longest sequence:

- Every per-step value lives in the engine's step buffers (engine/step_batch.py: one device buffer written
  by one copy per step), at offsets fixed by the bucket: token ids, positions, sequence slots, start / end
  lengths, the token -> sequence map and query starts. Block tables are the cache's own tensor (updated
  in place by the KV manager). Logits come back in a static [Bmax, V] buffer.
- Rows B..Bb-1 (bucket padding) are one-token sequences at position 0 of a scratch cache slot that no
  request ever holds; they write only that slot's window row and compressor state, and read nothing
  else (a one-token sequence sees no compressed entries). Their logits are never read.
- Kernels size work from shapes, num_tokens / num_seqs and `meta.max_seq_len`, which a captured meta sets
  to its context bucket C (ForwardMeta.seq_len_bound): the indexer scores C / ratio entries, masking
  invisible ones on the device, so one graph serves every length up to C.
- Guards, so that nothing per-step is frozen silently: (1) graphs are refused unless every op runs a
  provider declared capturable (the PyTorch references loop over host values); (2) during capture the
  host mirrors of the per-step values raise when read (a kernel wrapper that reads them fails loudly);
  (3) torch's sync debug mode is "error" during capture (any device -> host sync raises); (4) each bucket
  runs eagerly once before its capture so lazily built caches (weight layouts, expert tables, Triton
  compilation) exist before capture.
- Verify graphs (speculative decoding, engine/spec_decode.py): the same with `query_len` q > 1, every
  sequence adding its last token and q - 1 drafts (padding rows: q tokens at positions 0..q-1 of the scratch
  slot, which owns one page for the compressed entries they complete). The graph also takes the state
  snapshot of its sequences (cache/spec_state.py StateSnapshot.uniform, device ops) before the forward and
  records the forward's redo functions, whose inputs are the graph's own tensors (valid after a replay until
  the next one): `spec_state` hands both to the runner's rollback.
- The engine captures every bucket at start-up (`capture_all`, largest first so that one memory pool sized
  by the largest serves all); a bucket missing at run time is captured then, with a warning.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from dsv4.cache.spec_state import StateSnapshot
from dsv4.engine.step_batch import StepBuffers, stage_decode
from dsv4.ops.meta import ForwardMeta

log = logging.getLogger("dsv4.graphs")

# providers whose wrappers launch fixed work from shapes and meta.max_seq_len, with no host syncs
CAPTURABLE_PROVIDERS = frozenset({"triton", "triton_w4a8", "scaled_mm", "cublas_f32out", "humming", "humming_w4a8"})
CAPTURABLE_REFERENCES = frozenset({"lm_head"})  # references with no host reads (plain torch on whole tensors)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 1024
# verify graphs (speculative decoding) up to this batch: each holds its redo inputs, and speculation pays at
# small batches
MAX_VERIFY_GRAPH_BATCH = 32


class GraphCaptureError(RuntimeError):
    pass


class _FrozenMirror(list):
    """A host mirror that must not be read inside a captured region: len() works (it is the bucket
    size, fixed for the graph), reading any value raises."""

    def _fail(self, *a, **k):
        raise GraphCaptureError("a per-step host value (ForwardMeta host mirror) was read during graph capture; "
                                "the captured graph would replay it frozen. Size work by shapes and "
                                "meta.max_seq_len instead.")

    __getitem__ = __iter__ = _fail  # type: ignore[assignment]

    def __repr__(self):
        return f"<frozen host mirror of {len(self)} values>"


def capture_blockers(ops) -> list[str]:
    """Ops whose chosen provider is not declared capturable (empty: graphs are allowed)."""
    return [f"{c.op}={c.provider}" for c in ops.choices.values()
            if c.provider not in CAPTURABLE_PROVIDERS and not (c.op in CAPTURABLE_REFERENCES and c.provider == "torch")]


def context_buckets(max_len: int, smallest: int = MIN_CONTEXT_BUCKET) -> list[int]:
    """Powers of two from `smallest` below max_len, then max_len."""
    out, c = [], smallest
    while c < max_len:
        out.append(c)
        c *= 2
    out.append(max_len)
    return out


class DecodeGraphs:
    """Captured decode graphs of `model` over `cache` (see the module docstring). The engine's runner stages
    a step into `buffers` (step_batch.stage_decode) and calls `replay(bucket)`; `run(ids, slots, positions)`
    does both (direct use: tests, benchmarks). Logits: float32 [B, V], a view of a static buffer valid until
    the next step. `ep_tokens`: under expert parallelism, every rank replays the same bucket, so the MoE
    exchange pads to the bucket's batch (no per-layer count exchange)."""

    def __init__(self, model, cache, scratch_slot: int, max_batch: int,
                 batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS, min_context: int = MIN_CONTEXT_BUCKET,
                 capture: bool = True, buffers: StepBuffers | None = None, expert_parallel: bool = False,
                 query_len: int = 1, keep_streams: bool = False, pool=None):
        blockers = capture_blockers(model.opts.ops)
        if blockers:
            raise GraphCaptureError("graph capture needs capturable providers for every op; these run "
                                    f"references: {', '.join(blockers)} (use eager mode)")
        self.model, self.cache, self.scratch = model, cache, scratch_slot
        self.device = cache.device
        buckets = sorted({b for b in batch_buckets if b < max_batch} | {max_batch})
        self.batch_buckets = buckets
        self.ctx_buckets = context_buckets(cache.max_seq_len, min_context)
        self.use_capture = capture  # False: run the same padded static-buffer step eagerly (tests, debugging)
        self.expert_parallel = expert_parallel
        if query_len < 1:
            raise ValueError(f"query_len must be >= 1, got {query_len}")
        self.q = Q = query_len
        Bm = buckets[-1]
        self.buffers = buffers or StepBuffers(Bm * Q, Bm, self.device)
        if self.buffers.max_tokens < Bm * Q or self.buffers.max_seqs < Bm:
            raise ValueError(f"step buffers of {self.buffers.max_tokens} tokens / {self.buffers.max_seqs} sequences "
                             f"cannot hold the largest graph bucket ({Bm} sequences of {Q} tokens)")
        self.logits = torch.empty(Bm * Q, model.head.weight.shape[0], dtype=torch.float32, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_s: dict[tuple[int, int], float] = {}  # seconds each start-up capture took
        self.pool = pool  # (verify graphs share the decode graphs' memory pool: never replayed at once)
        # keep_streams: every graph also copies its final streams into the static `streams` [Bm * q, hc, D] (the
        # MTP drafter reads them); verify graphs: the state snapshot and redo functions of each captured forward
        self.streams = None
        if keep_streams:
            self.streams = torch.empty(Bm * Q, model.cfg.hc_mult, model.cfg.hidden_size, dtype=model.opts.dtype,
                                       device=self.device)
        self._spec: dict[tuple[int, int], tuple] = {}
        self._eager_spec: tuple | None = None  # (capture=False: the last run's)
        # rollback graphs (verify graphs): (bucket, kept count) -> graph over the staged (sequence, slot, start)
        self._rb = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._rb_host = torch.zeros(3, dtype=torch.int64)
        self._rb_ar = torch.arange(Q, dtype=torch.int64, device=self.device)
        self._rb_zeros = torch.zeros(Q, dtype=torch.int64, device=self.device)
        self._rb_qs = [torch.tensor([0, k], dtype=torch.int64, device=self.device) for k in range(Q + 1)]
        self._rb_graphs: dict[tuple, object] = {}
        self._rb_failed: set[tuple] = set()  # (bucket, kept count) whose capture failed: eager
        self._rb_pool = None

    # ---- buckets ------------------------------------------------------------------------------------
    def bucket(self, batch: int, max_len: int) -> tuple[int, int]:
        if batch > self.batch_buckets[-1]:
            raise ValueError(f"decode batch {batch} exceeds the largest graph bucket {self.batch_buckets[-1]}")
        if max_len > self.ctx_buckets[-1]:
            raise ValueError(f"sequence length {max_len} exceeds the cache's {self.ctx_buckets[-1]}")
        return (self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch)],
                self.ctx_buckets[bisect.bisect_left(self.ctx_buckets, max_len)])

    def all_buckets(self) -> list[tuple[int, int]]:
        return [(b, c) for b in self.batch_buckets for c in self.ctx_buckets]

    def _meta(self, Bb: int, C: int, frozen: bool) -> ForwardMeta:
        mirror = _FrozenMirror if frozen else list
        Q = self.q
        d = self.buffers.device_views(Bb * Q, Bb)
        return ForwardMeta(
            positions=d["positions"], token_seq=d["token_seq"], seq_slots=d["slots"], query_start=d["query_start"],
            seq_start=d["seq_start"], seq_lens=d["seq_lens"], query_start_host=list(range(0, Bb * Q + 1, Q)),
            seq_start_host=mirror([0] * Bb), seq_lens_host=mirror([Q] * Bb), seq_slots_host=mirror([self.scratch] * Bb),
            seq_len_bound=C, block_table=self.cache.block_table, ep_tokens=Bb * Q if self.expert_parallel else None)

    def _forward(self, Bb: int, C: int, frozen: bool):
        """(streams X, logits, snapshot, redo functions) of one step over the staged buffers."""
        d = self.buffers.device_views(Bb * self.q, Bb)
        meta = self._meta(Bb, C, frozen)
        snap = None
        if self.q > 1:
            snap = StateSnapshot.uniform(self.cache.layers, d["slots"], d["seq_start"], self.q)
            meta.redo = []
        X = self.model(d["ids"], meta, self.cache)
        return X, self.model.logits(X), snap, meta.redo

    def capture_all(self, progress: bool = False) -> float:
        """Capture every (batch, context) bucket not captured yet, largest first; the seconds it took."""
        t0 = time.perf_counter()
        todo = [k for k in sorted(self.all_buckets(), reverse=True) if k not in self.graphs]
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="capturing decode graphs", unit="graph", disable=None)  # None: TTY only
        for k in todo:
            t = time.perf_counter()
            self.capture(*k)
            self.capture_s[k] = time.perf_counter() - t
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return time.perf_counter() - t0

    def capture(self, Bb: int, C: int) -> None:
        key = (Bb, C)
        stage_decode(self.buffers, Bb, self.scratch, [], [], [], self.q)  # every row a scratch row
        torch.cuda.synchronize(self.device)
        self._forward(Bb, C, frozen=False)  # warm-up: compile kernels, build lazy caches
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(g, pool=self.pool):
                X, logits, snap, redo = self._forward(Bb, C, frozen=True)
                self.logits[:Bb * self.q].copy_(logits)
                if self.streams is not None:
                    self.streams[:Bb * self.q].copy_(X)
            del logits, X
            if snap is not None:
                self._spec[key] = (snap, redo)
        except Exception as e:
            raise GraphCaptureError(f"capture of decode batch {Bb}, context {C} failed: {type(e).__name__}: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        self.pool = g.pool()
        self.graphs[key] = g
        log.debug("captured decode graph: batch %d, context %d", Bb, C)
        if snap is not None:
            self._capture_rollbacks(key)

    def _capture_rollbacks(self, key: tuple[int, int]) -> None:
        """The rollback graphs of verify bucket `key`, one per kept count, now (at start-up), not at their first
        use in a step (which compiled and captured inside a live step: ~100 ms each, measured)."""
        self.graphs[key].replay()  # (scratch rows are staged: its snapshot now indexes the scratch slot)
        self._rb_host = torch.tensor([0, self.scratch, 0], dtype=torch.int64)
        for k in range(1, self.q):
            self._rb.copy_(self._rb_host.to(self.device))
            try:
                self._rollback_one(key, k, frozen=False)  # warm-up (compiles), on the scratch slot
                self._capture_rollback(key, k)
            except Exception as e:  # (a verify step then rolls this bucket back eagerly, and captures nothing)
                log.warning("rollback of verify bucket %s keeping %d runs eagerly: %s", key, k, e)
                self._rb_failed.add((key, k))

    # ---- one step -----------------------------------------------------------------------------------
    def ensure(self, key: tuple[int, int]) -> None:
        """Capture bucket `key` if it was not (call before staging the step: capturing stages scratch rows)."""
        if self.use_capture and key not in self.graphs:
            log.warning("decode graph bucket %s was not captured at start-up: capturing it now", key)
            self.capture(*key)

    def replay(self, key: tuple[int, int]) -> torch.Tensor:
        """Run bucket `key` over what was staged for it (step_batch.stage_decode); logits [Bb, V]."""
        if key[0] not in self.batch_buckets or key[1] not in self.ctx_buckets:
            raise ValueError(f"{key} is not a graph bucket")
        n = key[0] * self.q
        if not self.use_capture:
            X, logits, snap, redo = self._forward(*key, frozen=True)
            self.logits[:n].copy_(logits)
            if self.streams is not None:
                self.streams[:n].copy_(X)
            self._eager_spec = (snap, redo)
            return self.logits[:n]
        self.graphs[key].replay()
        return self.logits[:n]

    def spec_state(self, key: tuple[int, int], slots: list[int], starts: list[int]):
        """After replaying verify bucket `key` over sequences in `slots` (starting at `starts`): the state
        snapshot the graph took and a host-side meta of those sequences whose `redo` repeats the graph's
        writes (for cache/spec_state.rollback; valid until the next replay)."""
        snap, redo = self._eager_spec if not self.use_capture else self._spec[key]
        Q = self.q
        meta = ForwardMeta(positions=self.buffers.device_views(key[0] * Q, key[0])["positions"],
                           token_seq=None, seq_slots=None, query_start=None, seq_start=None, seq_lens=None,
                           query_start_host=list(range(0, len(slots) * Q + 1, Q)), seq_start_host=list(starts),
                           seq_lens_host=[s + Q for s in starts], seq_slots_host=list(slots),
                           block_table=self.cache.block_table, redo=redo)
        return snap.bind(list(slots)), meta

    # ---- rollback of one sequence's rejected drafts (verify graphs) --------------------------------------
    def _rollback_one(self, key: tuple[int, int], k: int, frozen: bool) -> None:
        """Device ops only: sequence rb[0] of the last replay of verify bucket `key` (slot rb[1], first position
        rb[2]) keeps its first k tokens: put back its snapshot and redo those k tokens' writes (what
        cache/spec_state.rollback does for any set of sequences from host lists). `frozen`: host mirrors of
        the sub-step unreadable (capture; and the uncaptured test runs, which check that)."""
        snap, redo = self._eager_spec if not self.use_capture else self._spec[key]
        Q = self.q
        b, slot, start = self._rb[0:1], self._rb[1:2], self._rb[2:3]
        snap.put_back(b * Q + self._rb_ar[:Q], b)  # (uniform snapshot: sequence b's ring rows b*Q .. b*Q + Q - 1)
        mirror = _FrozenMirror if frozen else list
        host = [0, self.scratch, 0] if frozen else self._rb_host.tolist()
        ar = self._rb_ar[:k]
        sub = ForwardMeta(positions=start + ar, token_seq=self._rb_zeros[:k], seq_slots=slot,
                          query_start=self._rb_qs[k], seq_start=start, seq_lens=start + k, query_start_host=[0, k],
                          seq_start_host=mirror([host[2]]), seq_lens_host=mirror([host[2] + k]),
                          seq_slots_host=mirror([host[1]]), seq_len_bound=key[1], block_table=self.cache.block_table)
        r = b * Q + ar
        for f in redo:
            f(r, sub)

    def rollback(self, key: tuple[int, int], slots: list[int], starts: list[int], keep: dict[int, int]) -> None:
        """After a replay of verify bucket `key` over `slots`: sequence i keeps its first keep[i] (< q) tokens.
        A small graph per kept count (captured after its first, eager, use) runs each such sequence's restore +
        redo: one replay per sequence instead of the eager rollback's launches per layer. Without capture
        (CPU, tests) the same device ops run eagerly, host mirrors frozen as in a capture."""
        if not keep:
            return
        rows = sorted(keep)
        table = torch.tensor([[i, slots[i], starts[i]] for i in rows], dtype=torch.int64)
        dev_table = table.to(self.device, non_blocking=True)  # (as engine/to_device.py: no wait for the device)
        for j, i in enumerate(rows):
            k = keep[i]
            self._rb.copy_(dev_table[j])  # (ordered on the stream before the ops that read it)
            g = self._rb_graphs.get((key, k)) if self.use_capture else None
            if g is not None:
                g.replay()
                continue
            self._rb_host = table[j]
            self._rollback_one(key, k, frozen=not self.use_capture)
            if self.use_capture and (key, k) not in self._rb_failed:
                try:
                    self._capture_rollback(key, k)
                except GraphCaptureError as e:  # (this one just ran eagerly; later ones will too)
                    log.warning("rollback of verify bucket %s runs eagerly: %s", key, e)
                    self._rb_failed.add((key, k))

    def _capture_rollback(self, key: tuple[int, int], k: int) -> None:
        """Capture (not run) the rollback of one sequence keeping k tokens of bucket `key`."""
        torch.cuda.synchronize(self.device)
        if self._rb_pool is None:
            self._rb_pool = torch.cuda.graph_pool_handle()  # (rollback graphs: temporaries only, replayed in turn)
        g = torch.cuda.CUDAGraph()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(g, pool=self._rb_pool):
                self._rollback_one(key, k, frozen=True)
        except Exception as e:
            raise GraphCaptureError(f"capture of the rollback of verify bucket {key} keeping {k} failed: "
                                    f"{type(e).__name__}: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        self._rb_graphs[(key, k)] = g

    def run(self, ids, slots: list[int], positions: list[int],
            bucket: tuple[int, int] | None = None) -> torch.Tensor:
        """Stage and replay one decode step (direct use; verify graphs: `positions` are the sequences' first
        positions and `ids` their q tokens each, flat). `bucket`: at least this step's own."""
        B = len(slots)
        own = self.bucket(max(B, 1), max(positions, default=0) + self.q)
        key = own if bucket is None else tuple(bucket)
        if key[0] < own[0] or key[1] < own[1]:
            raise ValueError(f"bucket {key} cannot hold this step (needs at least {own})")
        if self.use_capture and key not in self.graphs:
            self.capture(*key)  # runs scratch rows only; staged below, after it
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        stage_decode(self.buffers, key[0], self.scratch, ids, slots, positions, self.q)
        return self.replay(key)[:B * self.q]

