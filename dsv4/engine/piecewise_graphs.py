"""Piecewise graphs: the steps decode graphs do not cover (prefill chunks, prefill mixed with decodes, decode
batches above the largest decode bucket) replayed from captured pieces around each layer's core.

Why: an eager step launches ~75 kernels per layer from Python, ~3 ms of host time per layer whatever the
step's size (perf.md: a 4-layer mixed step never costs less than ~20 ms). Decode graphs remove that for pure
decode steps only, because every other step is varlen: its sequences, lengths and slots change every step.

How: a layer is mostly per-token work (mHC, norms, projections, RoPE, the MoE), which reads nothing about
the step's sequences except the tokens' positions. Only the layer's core (model/attention.py
`Attention._core`: compression, index selection, sparse attention, the window write) reads the sequences.
So a step of T tokens is padded to a token bucket Tb >= T and runs as L + 1 captured pieces with the L
cores between them, run eagerly with the step's real metadata:

    piece 0 (embedding .. layer 0's projections) -> core 0 -> piece 1 (layer 0's output projection ..
    layer 1's projections) -> core 1 -> ... -> piece L (.. the last layer's MoE, streams copied out)

- Inputs: the step buffers' token ids and positions at the offsets of a Tb-token layout (step_batch.py
  `build_eager(pad_to=Tb)`): rows T..Tb-1 are token 0 at position 0, per-token work on them is discarded.
- A piece ends by copying the core's token inputs into buffers shared by every layer and bucket (rows :T
  are this step's); the core's output is copied into a shared buffer the next piece reads, whose rows
  T..Tb-1 are zeroed (padding rows must stay finite: they go through the router, whose picks address
  expert weights). Nothing in the graph pool outlives a piece, so every piece and bucket reuses the pool's
  memory (a first version that held the pieces' own tensors kept 7.6 GB at 4 layers, measured).
- The pieces see host mirrors that raise when read (cuda_graphs._FrozenMirror), so per-step host values
  cannot be frozen into them; the cores see the step's real ForwardMeta.
- Steps that record redo functions (eager speculative verification, prefix-cache snapshots inside a step)
  give the cores copies of their inputs: the redo runs after the forward, when later pieces have
  overwritten the shared buffers.
- Every bucket is captured at start-up in one private memory pool and on ONE capture stream (pieces of one
  step run in order and steps never overlap, so buckets share the pool; the allocator reuses a pool's blocks
  only on the stream that made them; with a stream per bucket the pool held 5.5 GB at 4 Flash layers, with one
  0.82 GB including 0.33 GB of shared buffers, against an eager activation peak of 0.64 GB at 2,048 tokens:
  H100, 2026-12-06, benchmarks/piecewise_memory.py). Expert parallelism is not covered (eager steps there
  exchange tokens per layer with counts agreed at run time).
- Without capture (`capture=False`: CPU, tests) the same padded step runs eagerly: same shared buffers,
  slicing, padding, frozen mirrors and core runs, so CPU tests check everything but the replay itself.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from dsv4.engine.cuda_graphs import GraphCaptureError, _FrozenMirror, capture_blockers
from dsv4.engine.step_batch import StepBuffers
from dsv4.ops.meta import ForwardMeta

log = logging.getLogger("dsv4.graphs")

# padding costs GPU time where a step is GPU-bound (measured: 64 decodes + a 512-token chunk padded to 768 was
# 10% slower than eager), so the buckets are at most ~25% apart at small sizes and ~14% above 512
DEFAULT_TOKEN_BUCKETS = (8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                         1024, 1280, 1536, 1792, 2048)


class _Bucket:
    def __init__(self):
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.cores: list[tuple] = []  # (fn, token inputs, static output)


class _Capture:
    """`meta.islands` while a bucket is captured (or warmed up: not `capturing`): copies the core's inputs
    into the shared buffers (the copies are the end of the current piece), runs the core eagerly on the
    scratch metadata, and begins the next piece, which reads the core's output from a shared buffer."""

    def __init__(self, owner: "PiecewiseGraphs", bucket: _Bucket, core_meta: ForwardMeta, pool=None,
                 capturing: bool = False):
        self.owner, self.bucket, self.core_meta, self.pool, self.capturing = owner, bucket, core_meta, pool, capturing
        self.graph = None

    def begin(self) -> None:
        if self.capturing:
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(pool=self.pool)
            torch.cuda.set_sync_debug_mode("error")

    def end(self) -> None:
        if self.graph is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.graph.capture_end()
            self.bucket.pieces.append(self.graph)
            self.pool = self.graph.pool()
            self.graph = None

    def abort(self) -> None:
        if self.graph is not None:
            torch.cuda.set_sync_debug_mode("default")
            try:
                self.graph.capture_end()
            except Exception:  # (the capture is already invalidated; nothing to keep)
                pass
            self.graph = None

    def __call__(self, fn, *args):
        Tb = args[0].shape[0]
        ins = self.owner.stage_inputs(args)
        self.end()
        out = fn(self.core_meta, *ins)  # (eager; while capturing, its inputs hold whatever the buffers held)
        static = self.owner.shared(("out",), out)[:Tb]
        static.copy_(out)
        self.begin()
        self.bucket.cores.append((fn, ins, static))
        return static


class _Eager:
    """`meta.islands` of an uncaptured padded step: the same shared buffers and core runs as a replay."""

    def __init__(self, owner: "PiecewiseGraphs", meta: ForwardMeta, T: int):
        self.owner, self.meta, self.T = owner, meta, T

    def __call__(self, fn, *args):
        Tb = args[0].shape[0]
        ins = self.owner.stage_inputs(args)
        return _run_core(fn, ins, self.meta, self.T, lambda o: self.owner.shared(("out",), o)[:Tb])


def _run_core(fn, ins, meta: ForwardMeta, T: int, static_for) -> torch.Tensor:
    """One layer core on the step's T rows of its shared inputs; its output o goes into rows :T of the padded
    tensor static_for(o), whose padding rows are zeroed; returns that tensor. Steps with redo functions give
    the core copies (the redo runs after later pieces have overwritten the shared buffers)."""
    o = fn(meta, *[_rows(a, T, meta.redo is not None) for a in ins])
    static = static_for(o)
    static[:T].copy_(o)
    if T < static.shape[0]:
        static[T:].zero_()
    return static


def _rows(a: torch.Tensor, T: int, copy: bool) -> torch.Tensor:
    return a[:T].clone() if copy else a[:T]


class PiecewiseGraphs:
    """Piecewise graphs of `model` over `cache` for steps of up to `max_tokens` tokens (module docstring).
    The runner stages a step with `build_eager(..., pad_to=bucket(T))` and calls `run(Tb, meta)`, which
    returns the streams [T, hc, D] (a view of a static buffer, valid until the next step)."""

    def __init__(self, model, cache, scratch_slot: int, buffers: StepBuffers, max_tokens: int,
                 buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS, capture: bool = True):
        blockers = capture_blockers(model.opts.ops)
        if blockers:
            raise GraphCaptureError("piecewise graphs need capturable providers for every op outside the layer "
                                    f"cores; these run references: {', '.join(blockers)}")
        if max_tokens < 1:
            raise ValueError(f"piecewise graphs need max_tokens >= 1, got {max_tokens}")
        if buffers.max_tokens < max_tokens:
            raise ValueError(f"step buffers of {buffers.max_tokens} tokens cannot hold a {max_tokens}-token bucket")
        self.model, self.cache, self.scratch, self.buffers = model, cache, scratch_slot, buffers
        self.device = cache.device
        self.buckets = sorted({b for b in buckets if b < max_tokens} | {max_tokens})
        self.use_capture = capture
        self.out = torch.empty(self.buckets[-1], model.cfg.hc_mult, model.cfg.hidden_size, dtype=model.opts.dtype,
                               device=self.device)
        self.steps: dict[int, _Bucket] = {}
        # the cores' inputs and outputs, [largest bucket, ...] each, shared by every layer and bucket (pieces and
        # cores run in order and steps never overlap), allocated outside the graph pool by the warm-up runs:
        # the pool keeps nothing alive between pieces, so buckets and pieces reuse its memory
        self._shared: dict[tuple, torch.Tensor] = {}
        self.failed: set[int] = set()  # buckets whose capture failed: those steps run eagerly
        self.capture_s: dict[int, float] = {}
        self.capture_bytes: dict[int, int] = {}  # device memory reserved after each bucket's capture (CUDA)
        self.pool = None
        self._stream = None
        self.replays = 0

    def bucket(self, num_tokens: int) -> int | None:
        """The token bucket of a step of `num_tokens` tokens, or None (too large, or its capture failed)."""
        i = bisect.bisect_left(self.buckets, num_tokens)
        if i == len(self.buckets) or self.buckets[i] in self.failed:
            return None
        return self.buckets[i]

    def shared(self, role: tuple, like: torch.Tensor) -> torch.Tensor:
        """The shared buffer for a core's input (role ("in", i)) or output (("out",)) shaped like `like`."""
        key = role + (tuple(like.shape[1:]), like.dtype)
        buf = self._shared.get(key)
        if buf is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise GraphCaptureError(f"piecewise graphs: no shared buffer for {key} before capture")
            buf = torch.zeros((self.buckets[-1],) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
            self._shared[key] = buf
        return buf

    def stage_inputs(self, args) -> list[torch.Tensor]:
        """A core's inputs (first dim: the padded step's tokens) copied into their shared buffers; the views."""
        Tb = args[0].shape[0]
        ins = []
        for i, a in enumerate(args):
            x = self.shared(("in", i), a)[:Tb]
            x.copy_(a)
            ins.append(x)
        return ins

    # ---- capture ------------------------------------------------------------------------------------
    def _core_meta(self, Tb: int) -> ForwardMeta:
        """What the cores see while capturing: Tb one-token sequences at position 0 of the scratch slot (like
        decode graphs' padding rows: they write only that slot's window row 0 and compressor state)."""
        d, li = self.device, (lambda v: torch.tensor(v, dtype=torch.int64, device=self.device))  # noqa: E731
        return ForwardMeta(positions=torch.zeros(Tb, dtype=torch.int64, device=d), token_seq=li(list(range(Tb))),
                           seq_slots=torch.full((Tb,), self.scratch, dtype=torch.int64, device=d),
                           query_start=li(list(range(Tb + 1))), seq_start=torch.zeros(Tb, dtype=torch.int64, device=d),
                           seq_lens=torch.ones(Tb, dtype=torch.int64, device=d), query_start_host=list(range(Tb + 1)),
                           seq_start_host=[0] * Tb, seq_lens_host=[1] * Tb, seq_slots_host=[self.scratch] * Tb,
                           block_table=self.cache.block_table)

    def _piece_meta(self, Tb: int, islands) -> ForwardMeta:
        """What the pieces see: the static positions of a Tb-token layout; host mirrors that raise when read."""
        d = self.buffers.device_views(Tb, 1)
        none = d["positions"]  # (device fields other than positions are the cores' business: never read here)
        return ForwardMeta(positions=d["positions"], token_seq=none, seq_slots=none, query_start=none,
                           seq_start=none, seq_lens=none, query_start_host=_FrozenMirror([0] * (Tb + 1)),
                           seq_start_host=_FrozenMirror([0]), seq_lens_host=_FrozenMirror([1]),
                           seq_slots_host=_FrozenMirror([self.scratch]), block_table=self.cache.block_table,
                           islands=islands)

    def _stage_padding(self, Tb: int) -> torch.Tensor:
        h = self.buffers.stage(Tb, 1)
        for v in h.values():
            v.zero_()
        return self.buffers.send(Tb, 1)["ids"]

    def capture_all(self, progress: bool = False) -> float:
        """Capture every bucket not captured yet, largest first; a bucket that fails is left to eager steps
        (logged). The seconds it took."""
        t0 = time.perf_counter()
        todo = [b for b in sorted(self.buckets, reverse=True) if b not in self.steps and b not in self.failed]
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="capturing piecewise graphs", unit="bucket", disable=None)
        for Tb in todo:
            t = time.perf_counter()
            try:
                self.capture(Tb)
            except GraphCaptureError as e:
                log.warning("steps of up to %d tokens run eagerly: %s", Tb, e)
                self.failed.add(Tb)
            self.capture_s[Tb] = time.perf_counter() - t
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                self.capture_bytes[Tb] = torch.cuda.memory_reserved(self.device)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return time.perf_counter() - t0

    @torch.no_grad()
    def capture(self, Tb: int) -> None:
        if Tb not in self.buckets:
            raise ValueError(f"{Tb} is not a piecewise graph bucket ({self.buckets})")
        ids = self._stage_padding(Tb)
        core_meta = self._core_meta(Tb)
        if not self.use_capture:
            self.steps[Tb] = _Bucket()
            return
        torch.cuda.synchronize(self.device)
        try:  # warm-up: compiles kernels, builds lazy caches; a host read in a piece raises here already
            self.model(ids, self._piece_meta(Tb, _Capture(self, _Bucket(), core_meta)), self.cache)
        except Exception as e:
            raise GraphCaptureError(f"the {Tb}-token piecewise step failed before capture: {type(e).__name__}: {e}") from e
        torch.cuda.synchronize(self.device)
        b = _Bucket()
        rec = _Capture(self, b, core_meta, self.pool, capturing=True)
        if self._stream is None:  # ONE capture stream for every bucket: the allocator reuses a pool's blocks only
            self._stream = torch.cuda.Stream(self.device)  # on the stream they were made on (a stream per bucket
        stream = self._stream  # kept ~300 KB per token of every bucket at 4 layers, measured)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                rec.begin()
                X = self.model(ids, self._piece_meta(Tb, rec), self.cache)
                self.out[:Tb].copy_(X)
                del X
                rec.end()
        except Exception as e:
            rec.abort()
            raise GraphCaptureError(f"capture of the {Tb}-token piecewise graph failed: {type(e).__name__}: {e}") from e
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.pool = rec.pool
        self.steps[Tb] = b
        log.debug("captured a %d-token piecewise graph: %d pieces", Tb, len(b.pieces))

    # ---- one step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, Tb: int, meta: ForwardMeta) -> torch.Tensor:
        """The streams [T, hc, D] of the step staged with `build_eager(pad_to=Tb)` whose metadata is `meta`."""
        T = meta.num_tokens
        if T > Tb:
            raise ValueError(f"a step of {T} tokens does not fit the {Tb}-token piecewise bucket")
        if Tb not in self.steps:
            if Tb in self.failed or Tb not in self.buckets:
                raise ValueError(f"{Tb} is not a captured piecewise graph bucket")
            log.warning("piecewise graph bucket %d was not captured at start-up: capturing it now", Tb)
            self.capture(Tb)
        self.replays += 1
        if not self.use_capture:
            ids = self.buffers.device_views(Tb, 1)["ids"]
            X = self.model(ids, self._piece_meta(Tb, _Eager(self, meta, T)), self.cache)
            self.out[:Tb].copy_(X)
            return self.out[:T]
        b = self.steps[Tb]
        for k, g in enumerate(b.pieces):
            g.replay()
            if k < len(b.cores):
                fn, ins, static = b.cores[k]
                _run_core(fn, ins, meta, T, lambda o, s=static: s)
        return self.out[:T]
