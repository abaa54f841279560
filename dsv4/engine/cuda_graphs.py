"""Decode steps replayed from captured device graphs (CUDA graphs; HIP graphs through the same torch API).

A decode step (every scheduled sequence adds exactly one token) of B sequences runs the graph of the
smallest batch bucket Bb >= B captured for the smallest context bucket C >= the longest sequence:

- Every per-step value lives in buffers allocated once, before any capture, and written in place before
  each replay: token ids, positions, sequence slots, start / end lengths ([Bmax] int64 each), the token ->
  sequence map and query starts (fixed for decode: arange). Block tables are the cache's own tensor
  (updated in place by the page allocator). Logits come back in a static [Bmax, V] buffer.
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
"""

from __future__ import annotations

import bisect
import logging

import torch

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
    """Captured decode graphs of `model` over `cache` (see the module docstring). `run(ids, slots,
    positions)` returns float32 logits [B, V] of one decode step (a view of a static buffer, valid until the
    next call), capturing the needed graph on first
    use (lazily: a bucket pair costs one eager warm-up step and one capture)."""

    def __init__(self, model, cache, scratch_slot: int, max_batch: int,
                 batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS, min_context: int = MIN_CONTEXT_BUCKET,
                 capture: bool = True):
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
        Bm = buckets[-1]
        li = dict(dtype=torch.int64, device=self.device)
        self.ids = torch.zeros(Bm, **li)
        self.positions = torch.zeros(Bm, **li)
        self.slots = torch.full((Bm,), scratch_slot, **li)
        self.seq_start = torch.zeros(Bm, **li)
        self.seq_lens = torch.ones(Bm, **li)
        self.token_seq = torch.arange(Bm, **li)
        self.query_start = torch.arange(Bm + 1, **li)
        self.staging = torch.zeros(3, Bm, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self._copied: torch.cuda.Event | None = None
        self.logits = torch.empty(Bm, model.head.weight.shape[0], dtype=torch.float32, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    # ---- buckets ------------------------------------------------------------------------------------
    def bucket(self, batch: int, max_len: int) -> tuple[int, int]:
        if batch > self.batch_buckets[-1]:
            raise ValueError(f"decode batch {batch} exceeds the largest graph bucket {self.batch_buckets[-1]}")
        if max_len > self.ctx_buckets[-1]:
            raise ValueError(f"sequence length {max_len} exceeds the cache's {self.ctx_buckets[-1]}")
        return (self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch)],
                self.ctx_buckets[bisect.bisect_left(self.ctx_buckets, max_len)])

    def _meta(self, Bb: int, C: int, frozen: bool) -> ForwardMeta:
        mirror = _FrozenMirror if frozen else list
        return ForwardMeta(
            positions=self.positions[:Bb], token_seq=self.token_seq[:Bb], seq_slots=self.slots[:Bb],
            query_start=self.query_start[:Bb + 1], seq_start=self.seq_start[:Bb], seq_lens=self.seq_lens[:Bb],
            query_start_host=list(range(Bb + 1)), seq_start_host=mirror([0] * Bb),
            seq_lens_host=mirror([1] * Bb), seq_slots_host=mirror([self.scratch] * Bb), seq_len_bound=C)

    def _forward(self, Bb: int, C: int, frozen: bool) -> torch.Tensor:
        X = self.model(self.ids[:Bb], self._meta(Bb, C, frozen), self.cache, check_cache=False)
        return self.model.logits(X)

    def _pad_to_scratch(self, B: int) -> None:
        """Rows from B on: one-token sequences at position 0 of the scratch slot."""
        self.ids[B:].zero_()
        self.positions[B:].zero_()
        self.seq_start[B:].zero_()
        self.seq_lens[B:].fill_(1)
        self.slots[B:].fill_(self.scratch)

    def _uniform(self, Bb: int | None) -> None:
        """Expert parallelism: every rank runs the same bucket (Bb tokens), so the token-count exchange is
        skipped (None: back to exchanging)."""
        ep = getattr(self.model.opts, "expert_parallel", None)
        if ep is not None:
            ep.step_tokens = Bb

    def capture(self, Bb: int, C: int) -> None:
        self._uniform(Bb)
        try:
            self._capture(Bb, C)
        finally:
            self._uniform(None)

    def _capture(self, Bb: int, C: int) -> None:
        key = (Bb, C)
        self._pad_to_scratch(0)
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
        log.info("captured decode graph: batch %d, context %d", Bb, C)

    # ---- one step -----------------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, slots: list[int], positions: list[int],
            bucket: tuple[int, int] | None = None) -> torch.Tensor:
        """`bucket`: the (batch, context) bucket to use, at least this step's own (expert-parallel ranks
        pass the one they agreed on, so that all replay graphs with the same collectives)."""
        B = len(slots)  # 0: an expert-parallel rank with no work of its own replays the agreed bucket
        if B:
            self.cache.begin_step(ForwardMeta.build(slots, positions, [1] * B, "cpu"))  # host bookkeeping only
        own = self.bucket(max(B, 1), max(positions, default=0) + 1)
        key = own if bucket is None else tuple(bucket)
        if key[0] < own[0] or key[1] < own[1] or key[0] not in self.batch_buckets or key[1] not in self.ctx_buckets:
            raise ValueError(f"bucket {key} cannot hold this step (needs at least {own})")
        if self.use_capture and key not in self.graphs:
            # capturing runs the model on scratch rows only; the real step below replays the new graph
            self.capture(*key)
        # one host -> device copy of the step's values through a pinned staging buffer, rewritten only
        # once the previous step's copy has completed
        if self._copied is not None:
            self._copied.synchronize()  # (a CPU device never records one)
        self.staging[0, :B] = torch.tensor(positions, dtype=torch.int64)
        self.staging[1, :B] = torch.tensor(slots, dtype=torch.int64)
        self.staging[2, :B] = ids
        dev = self.staging[:, :B].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._pad_to_scratch(B)
        self.ids[:B].copy_(dev[2])
        self.positions[:B].copy_(dev[0])
        self.seq_start[:B].copy_(dev[0])
        self.seq_lens[:B].copy_(dev[0] + 1)
        self.slots[:B].copy_(dev[1])
        if self.use_capture:
            self.graphs[key].replay()
        else:
            self._uniform(key[0])
            try:
                self.logits[:key[0]].copy_(self._forward(*key, frozen=True))
            finally:
                self._uniform(None)
        return self.logits[:B]
