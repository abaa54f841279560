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
- The engine captures every bucket at start-up (`capture_all`, largest first so that one memory pool sized
  by the largest serves all); a bucket missing at run time is captured then, with a warning.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from dsv4.engine.step_batch import StepBuffers, stage_decode
from dsv4.ops.meta import ForwardMeta

log = logging.getLogger("dsv4.graphs")

# providers whose wrappers launch fixed work from shapes and meta.max_seq_len, with no host syncs
CAPTURABLE_PROVIDERS = frozenset({"triton", "scaled_mm", "cublas_f32out", "humming", "humming_w4a8"})
CAPTURABLE_REFERENCES = frozenset({"lm_head"})  # references with no host reads (plain torch on whole tensors)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 1024


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
                 capture: bool = True, buffers: StepBuffers | None = None, expert_parallel: bool = False):
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
        Bm = buckets[-1]
        self.buffers = buffers or StepBuffers(Bm, Bm, self.device)
        if self.buffers.max_tokens < Bm or self.buffers.max_seqs < Bm:
            raise ValueError(f"step buffers of {self.buffers.max_tokens} tokens / {self.buffers.max_seqs} sequences "
                             f"cannot hold the largest graph bucket ({Bm})")
        self.logits = torch.empty(Bm, model.head.weight.shape[0], dtype=torch.float32, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_s: dict[tuple[int, int], float] = {}  # seconds each start-up capture took
        self.pool = None

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
        d = self.buffers.device_views(Bb, Bb)
        return ForwardMeta(
            positions=d["positions"], token_seq=d["token_seq"], seq_slots=d["slots"], query_start=d["query_start"],
            seq_start=d["seq_start"], seq_lens=d["seq_lens"], query_start_host=list(range(Bb + 1)),
            seq_start_host=mirror([0] * Bb), seq_lens_host=mirror([1] * Bb), seq_slots_host=mirror([self.scratch] * Bb),
            seq_len_bound=C, block_table=self.cache.block_table, ep_tokens=Bb if self.expert_parallel else None)

    def _forward(self, Bb: int, C: int, frozen: bool) -> torch.Tensor:
        X = self.model(self.buffers.device_views(Bb, Bb)["ids"], self._meta(Bb, C, frozen), self.cache)
        return self.model.logits(X)

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
        stage_decode(self.buffers, Bb, self.scratch, [], [], [])  # every row a scratch row
        torch.cuda.synchronize(self.device)
        self._forward(Bb, C, frozen=False)  # warm-up: compile kernels, build lazy caches
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[:Bb].copy_(self._forward(Bb, C, frozen=True))
        except Exception as e:
            raise GraphCaptureError(f"capture of decode batch {Bb}, context {C} failed: {type(e).__name__}: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        self.pool = g.pool()
        self.graphs[key] = g
        log.debug("captured decode graph: batch %d, context %d", Bb, C)

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
        if not self.use_capture:
            self.logits[:key[0]].copy_(self._forward(*key, frozen=True))
            return self.logits[:key[0]]
        self.graphs[key].replay()
        return self.logits[:key[0]]

    def run(self, ids, slots: list[int], positions: list[int],
            bucket: tuple[int, int] | None = None) -> torch.Tensor:
        """Stage and replay one decode step (direct use). `bucket`: at least this step's own."""
        B = len(slots)
        own = self.bucket(max(B, 1), max(positions, default=0) + 1)
        key = own if bucket is None else tuple(bucket)
        if key[0] < own[0] or key[1] < own[1]:
            raise ValueError(f"bucket {key} cannot hold this step (needs at least {own})")
        if self.use_capture and key not in self.graphs:
            self.capture(*key)  # runs scratch rows only; staged below, after it
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        stage_decode(self.buffers, key[0], self.scratch, ids, slots, positions)
        return self.replay(key)[:B]

