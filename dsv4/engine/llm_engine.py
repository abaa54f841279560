"""The engine: requests in, one scheduled step at a time, outputs out (used by `LLM` offline and by the
async engine behind the server). Everything here is synchronous and single-threaded."""

from __future__ import annotations

import itertools
import logging
import time

import torch

from dsv4.cache.direct import DirectCache
from dsv4.cache.kv_manager import KVCacheManager
from dsv4.cache.model_cache import CacheLayout, ModelCache
from dsv4.cache.spec_state import redo_bytes_per_token
from dsv4.cache.planner import CacheDoesNotFit, CachePlan, gib, plan_cache
from dsv4.config import EngineConfig
from dsv4.engine.async_decode import decodes_async
from dsv4.engine.coordinator import SingleRank, StepCoordinator
from dsv4.engine.cuda_graphs import (DEFAULT_BATCH_BUCKETS, MAX_VERIFY_GRAPH_BATCH, DecodeGraphs, capture_blockers,
                                     context_buckets)
from dsv4.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dsv4.engine.draft_graphs import MTPDraftGraphs
from dsv4.engine.latency_budget import DecodeLatencyBudget
from dsv4.engine.piecewise_graphs import PiecewiseGraphs
from dsv4.engine.model_runner import ModelRunner
from dsv4.engine.outputs import RequestOutput, finish_text, shape_output
from dsv4.engine.request import Request, RequestStatus, validate_request
from dsv4.engine.sampler import Sampler, make_generator
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.scheduler import Scheduler
from dsv4.engine.spec_decode import MTPDrafter, SpecStats
from dsv4.engine.step_batch import StepBuffers
from dsv4.model.builder import LoadedModel, build_model, parse_dtype
from dsv4.ops.registry import REFERENCE
from dsv4.tokenizer import Tokenizer

log = logging.getLogger("dsv4.engine")
CPU_DEFAULT_KV_BYTES = 2**30
DEFAULT_MAX_MODEL_LEN = 16384
DEFAULT_PIECEWISE_TOKENS = 2048


class LLMEngine:
    """`coordinator` (engine/coordinator.py): how this engine's steps meet other ranks'. Default: it is the
    only rank. An expert-parallel rank gets parallel/step_sync.py's: it holds its share of the routed
    experts, serves its own requests and steps in lockstep with the others (driven by
    dsv4.parallel.dp_engine)."""

    def __init__(self, config: EngineConfig, lm: LoadedModel | None = None, tokenizer: Tokenizer | None = None,
                 coordinator: StepCoordinator | None = None):
        config.validate()
        self.config = config
        self.coord = coord = coordinator or SingleRank()
        self.lm = lm or build_model(config.model, device=config.device, dtype=config.dtype, numerics=config.numerics,
                                    load_format=config.load_format,
                                    op_overrides=dict(config.op_overrides), seed=config.seed,
                                    num_layers=config.num_layers, expert_parallel=coord.expert_parallel)
        self.cfg = self.lm.cfg
        self.device = self.lm.platform.torch_device
        self.tokenizer = tokenizer or _load_tokenizer(self.lm)
        self.max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, self.cfg.max_position_embeddings)
        kv_fp8 = config.kv_cache_dtype == "fp8"
        kv_dtype = self.lm.opts.dtype if config.kv_cache_dtype in ("auto", "fp8") else parse_dtype(config.kv_cache_dtype)
        spec = config.speculative_tokens  # (the MTP drafter's window ring is part of the cache plan)
        if spec and self.lm.model.mtp and self.lm.model.draft_head is None and self._fp8_draft_head_pays():
            self.lm.model.build_draft_head()  # before the memory budget is measured: it holds 0.5 GiB on Flash
        layout = CacheLayout.of(self.cfg, kv_dtype, kv_fp8, config.page_tokens, with_mtp=bool(spec))
        graphs_ok = self._graphs_wanted()
        budget = self._cache_budget(graphs_ok, spec)
        budget = coord.min_over_ranks(budget)  # every rank gets the same plan, so that all have the same buckets
        snaps = 0
        if config.enable_prefix_caching:  # slot snapshots (cache/prefix_cache.py) come out of the budget first
            snaps = config.prefix_cache_snapshots
            if snaps is None:
                snaps = max(1, min(2 * config.max_num_seqs, budget // 10 // max(1, layout.slot_bytes)))
            budget -= snaps * layout.slot_bytes
        self.plan: CachePlan = plan_cache(layout, budget, config.max_num_seqs, self.max_model_len)
        log.info(self.plan.describe())
        # one extra slot (0.5 MiB for Flash) is the scratch slot: bucket-padding rows of decode graphs, and the
        # one-token step of an expert-parallel rank with no work of its own
        scratch = graphs_ok or coord.lockstep
        self.cache = ModelCache(self.cfg, self.plan.num_slots + int(scratch) + snaps, self.max_model_len, self.device,
                                kv_dtype, page_tokens=layout.page_tokens, num_pages=self.plan.num_pages,
                                kv_fp8=kv_fp8, dialect=self.lm.platform.fp8_dialect, with_mtp=bool(spec))
        self.kv = KVCacheManager(self.cache)
        # (verify graphs' padding rows run spec + 1 tokens on it: it owns a page for what they compress)
        scratch_slot = self.kv.take_scratch_slot(spec + 1 if spec and graphs_ok else 0) if scratch else None
        if snaps:
            self.kv.enable_prefix_caching(snaps)
            log.info("prefix caching on: %d slot snapshots (%s)", snaps, gib(snaps * layout.slot_bytes))
        max_batch = min(config.max_num_seqs, self.plan.num_slots)
        verify_batch = min(max_batch, MAX_VERIFY_GRAPH_BATCH)
        self.buffers = StepBuffers(max(config.max_num_batched_tokens, max_batch, verify_batch * (spec + 1)),
                                   max_batch, self.device)
        graphs = verify_graphs = None
        if graphs_ok and spec:  # speculative decoding: verify steps (and the drafter's streams) from graphs
            verify_graphs = DecodeGraphs(self.lm.model, self.cache, scratch_slot, max_batch=verify_batch,
                                         buffers=self.buffers, query_len=spec + 1, keep_streams=True,
                                         expert_parallel=coord.lockstep)
        elif graphs_ok:
            graphs = DecodeGraphs(self.lm.model, self.cache, scratch_slot, max_batch=max_batch,
                                  buffers=self.buffers, expert_parallel=coord.lockstep)
        self.latency_budget = lb = DecodeLatencyBudget.for_config(config)
        if lb is not None:
            log.info("decode-latency budget %gx: steps with decodes take %d..%d prefill tokens, chosen from measured "
                     "step times", lb.ratio, lb.min_tokens, lb.max_tokens)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prefill_tokens_with_decodes, self.latency_budget)
        drafter = MTPDrafter(self.lm.model, self.cache, spec, lockstep_slot=scratch_slot if coord.lockstep else None) \
            if spec else None
        draft_graphs = None
        if verify_graphs is not None:
            try:
                draft_graphs = MTPDraftGraphs(self.lm.model, self.cache, verify_graphs)
            except ValueError as e:  # (a window ring shorter than the drafts' span): the MTP drafter runs eagerly
                log.warning("MTP drafting runs eagerly after verify graph steps: %s", e)
        self.spec_stats = SpecStats()  # speculative decoding: verify steps, drafted and accepted tokens
        piecewise = None
        pw_tokens = self._piecewise_tokens(graphs_ok)
        if pw_tokens:
            piecewise = PiecewiseGraphs(self.lm.model, self.cache, scratch_slot, self.buffers, pw_tokens)
        self.runner = ModelRunner(self.lm, self.kv, self.buffers, Sampler(), graphs=graphs, coordinator=coord,
                                  scratch_slot=scratch_slot, drafter=drafter, verify_graphs=verify_graphs,
                                  draft_graphs=draft_graphs, piecewise=piecewise,
                                  spec_pause_batch=config.speculative_disable_by_batch_size if spec else None)
        if spec and config.speculative_disable_by_batch_size is not None and coord.lockstep:
            log.warning("speculative_disable_by_batch_size is not applied under expert parallelism")
        if graphs is not None or verify_graphs is not None:
            self._capture_graphs(graphs or verify_graphs, draft_graphs)
        if piecewise is not None:
            self._capture_piecewise(piecewise)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self._pending = None  # the async decode step in flight (engine/async_decode.py), or None
        self._shape = None  # (decodes, prefill tokens) of the step being run, for the decode-latency budget

    def _graphs_wanted(self) -> bool:
        if self.config.enforce_eager or not self.lm.platform.supports_graphs:
            return False
        blockers = capture_blockers(self.lm.ops)
        if blockers:
            log.warning("decode graphs off: these ops run providers that cannot be captured: %s", ", ".join(blockers))
            return False
        return True

    def _capture_graphs(self, graphs: DecodeGraphs, draft_graphs: MTPDraftGraphs | None = None) -> None:
        """Every decode (or verify, and MTP draft) graph bucket, now (not inside a live step), inside the
        memory plan."""
        before = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        t0 = time.perf_counter()
        graphs.capture_all(progress=True)
        if draft_graphs is not None:
            draft_graphs.capture_all()
        secs = time.perf_counter() - t0
        if self.device.type == "cuda":
            used = torch.cuda.memory_reserved(self.device) - before
            log.info("captured %d decode graphs in %.1f s (%s; %s reserved for them)", len(graphs.graphs), secs,
                     gib(used), gib(self._graph_reserve))
            self.graph_memory = used

    def _piecewise_tokens(self, graphs_ok: bool) -> int:
        """Largest piecewise graph bucket (0: none): with graphs, one GPU per engine (not expert parallel)."""
        c = self.config
        if not graphs_ok or self.coord.lockstep:
            return 0
        n = c.piecewise_graph_tokens
        return min(c.max_num_batched_tokens, DEFAULT_PIECEWISE_TOKENS if n is None else n)

    def _capture_piecewise(self, piecewise: PiecewiseGraphs) -> None:
        cuda = self.device.type == "cuda"
        if cuda:  # (what the pool and shared buffers hold, not the eager allocator's cached blocks)
            torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device) if cuda else 0
        secs = piecewise.capture_all(progress=True)
        if cuda:
            torch.cuda.empty_cache()
            used = torch.cuda.memory_reserved(self.device) - before
            log.info("captured %d piecewise graph buckets (up to %d tokens) in %.1f s (%s; %s reserved for them)",
                     len(piecewise.steps), piecewise.buckets[-1], secs, gib(used), gib(self._piecewise_reserve))
            self.piecewise_memory = used
            if self._piecewise_reserve and used > self._piecewise_reserve:
                log.warning("piecewise graphs hold %s, more than the %s the cache plan left for them: lower "
                            "--piecewise-graph-tokens or --gpu-memory-utilization if memory runs short",
                            gib(used), gib(self._piecewise_reserve))

    # ---- capacity ---------------------------------------------------------------------------------
    _piecewise_reserve = 0
    _graph_reserve = 0

    def _fp8_draft_head_pays(self) -> bool:
        """The drafter's FP8 head copy halves the bytes a draft pass reads where the `linear` op reads FP8 weights
        in its kernel; the reference dequantises the whole weight on every call (on the CPU ~0.4 s a draft pass
        for the tiny model's 129,280-row head against a few ms for the exact head), so it keeps the exact head."""
        return self.lm.ops.choices["linear"].provider != REFERENCE

    def _cache_budget(self, graphs: bool, spec: int = 0) -> int:
        c = self.config
        if c.kv_cache_memory is not None:
            return c.kv_cache_memory
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES
        torch.cuda.synchronize(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        peak = activations = self._profile_activations(c.max_num_batched_tokens)
        if c.enable_prefix_caching:  # a step that snapshots inside itself keeps its redo inputs (prefix_cache.py)
            activations += c.max_num_batched_tokens * redo_bytes_per_token(self.cfg, self.lm.opts.dtype)
        if graphs:  # the graphs' shared memory pool: measured (4 Flash layers, H100, 2026-12-05) at 5.4x one
            # eager forward's activation peak at the largest bucket (0.092 vs 0.017 GiB); kept with margin
            self._graph_reserve = 6 * self._profile_activations(min(c.max_num_seqs, 256)) + 2**27
            if spec:  # verify graphs instead, each holding its redo inputs (cache/spec_state.py)
                q, bs = spec + 1, [b for b in DEFAULT_BATCH_BUCKETS if b <= min(c.max_num_seqs, MAX_VERIFY_GRAPH_BATCH)]
                n_ctx = len(context_buckets(self.max_model_len))
                self._graph_reserve = (6 * self._profile_activations(q * max(bs)) + 2**27
                                       + n_ctx * q * sum(bs) * redo_bytes_per_token(self.cfg, self.lm.opts.dtype))
        pw = self._piecewise_tokens(graphs)
        if pw:  # the pool (about a forward's temporaries at the largest bucket, with margin) and the buffers the
            # cores' inputs and outputs share (q and the output: 2 x heads x head_dim values, plus ~64 KiB of
            # compressor and indexer projections per token; 334 MB at 2048 tokens for Flash, measured on an H100)
            shared = pw * (2 * self.cfg.num_heads * self.cfg.head_dim * self.lm.opts.dtype.itemsize + 2**16)
            if pw != c.max_num_batched_tokens:  # (by default it is that step's, profiled above)
                peak = self._profile_activations(pw)
            self._piecewise_reserve = 2 * peak + shared + 2**27
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = (int(c.gpu_memory_utilization * total) - weights - activations - self._graph_reserve
                  - self._piecewise_reserve)
        if budget <= 0:
            raise CacheDoesNotFit(
                f"the model does not fit: weights {gib(weights)} + activation peak {gib(activations)} (at "
                f"{c.max_num_batched_tokens} tokens per step) exceed gpu_memory_utilization "
                f"{c.gpu_memory_utilization} x {gib(total)}; use more GPUs, --num-layers, or lower "
                f"--max-num-batched-tokens")
        return budget

    @torch.no_grad()
    def _profile_activations(self, n: int) -> int:
        """Peak memory of one forward of n tokens, beyond the weights."""
        tmp = DirectCache(self.cfg, 1, n, self.device, self.lm.opts.dtype)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        s = tmp.add()
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        X = self.lm.model(ids, tmp.meta([s], [0], [n]), tmp.cache)
        self.lm.model.logits(X[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del tmp, X
        torch.cuda.empty_cache()
        return int(peak * 1.1)

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Validate and queue a request. A bad request raises ValueError and changes nothing."""
        return self.enqueue(self.make_request(prompt, params, request_id, arrival_time))

    def enqueue(self, req: Request) -> Request:
        """Queue a request made by `make_request`."""
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req

    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """A validated (and tokenised) request, not queued. Raises ValueError naming what is wrong."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        params, text, ids = validate_request(prompt, params, self.tokenizer, self.cfg.vocab_size,
                                             self.max_model_len)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(request_id=rid, prompt_token_ids=ids, params=params, max_tokens=max_tokens,
                      eos_token_ids=frozenset(() if params.ignore_eos else self.cfg.eos_token_ids), prompt=text,
                      arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
                      generator=make_generator(params.seed, self.device))
        if params.detokenize:
            req.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            req.stop_matcher = StopStringMatcher(list(params.stop), params.include_stop_str_in_output)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any moment and free everything it holds; its final output (or None if
        the id is unknown or already finished)."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        self._finish(req, "abort")
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- EngineClient (engine/client.py): what front ends read besides the attributes above ---------------
    world = 1  # ranks: a lone engine

    @property
    def graph_steps(self) -> int:
        """Steps replayed from captured decode graphs so far."""
        return self.runner.graph_steps

    @property
    def piecewise_steps(self) -> int:
        """Steps run from piecewise graphs so far (engine/piecewise_graphs.py)."""
        return self.runner.piecewise_steps

    closed = False  # a lone engine can always step (an expert-parallel one reports its stopped ranks)

    def shutdown(self) -> None:
        """Nothing to release: a lone engine holds no other ranks."""

    def load(self) -> dict:
        """Queue and cache occupancy (server metrics; summed over ranks by the expert-parallel front end)."""
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "free_pages": self.kv.num_free_pages, "pages": self.cache.num_pages,
                "free_slots": self.kv.num_free_slots, "slots": self.cache.num_slots}

    # ---- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.latency_budget is None:
            return self._step()
        t0 = time.perf_counter()
        self._shape = None
        outs = self._step()
        if self._shape is not None:  # (decodes, prefill tokens) of the step that ran
            self.latency_budget.observe(*self._shape, time.perf_counter() - t0)
        return outs

    def _step(self) -> list[RequestOutput]:
        if self._pending is not None:  # a decode step in flight (async scheduling): launch the next, then read it
            self._shape = (len(self._pending.reqs), 0)
            return self._advance()
        so = self.scheduler.schedule()
        self._shape = (so.decodes, so.prefill_tokens) if so.scheduled else None
        outs: list[RequestOutput] = []
        for req in so.failed:
            self._finish(req, "error")
            outs.append(self._output(req))
        if not so.scheduled and not self.coord.lockstep:
            return outs
        if self._async_decode_step(so.scheduled):
            self._pending = self._launch([r for r, _ in so.scheduled], None)
            return outs + self._advance()
        try:
            results = self.runner.execute(so.scheduled)  # (expert parallel: also with nothing scheduled here)
        except BaseException:
            self.kv.distrust([r for r, _ in so.scheduled])  # (their cache state is half-written)
            raise
        self.num_steps += bool(so.scheduled)
        return outs + self._process(so.scheduled, results)

    # ---- async scheduling (engine/async_decode.py) --------------------------------------------------------
    def _async_decode_step(self, scheduled) -> bool:
        """This step may run as an async decode step: every request adds its one next token."""
        return (self.config.async_scheduling and self.runner.async_capable
                and all(n == 1 and r.num_computed_tokens + 1 == r.num_tokens and decodes_async(r)
                        for r, n in scheduled))

    def _launch(self, reqs, prev):
        try:
            return self.runner.launch_decode(reqs, prev)
        except BaseException:
            self.kv.distrust(reqs + (prev.reqs if prev is not None else []))
            self._pending = None
            raise

    def _continuing(self, p) -> list:
        """The requests of in-flight step `p` that go on in the next step, launched before `p` is read; [] when
        the next step must be scheduled (a request waits and a slot is free for it, one running is not in `p` or
        asks for prompt logprobs, pages run short)."""
        sch = self.scheduler
        if sch.waiting and len(sch.running) < sch.max_num_seqs and self.kv.num_free_slots:
            return []  # (one could be admitted: the scheduler decides; a full engine keeps going)
        live = [r for r in p.reqs if not r.finished]
        if len(live) != len(sch.running):  # (someone else runs: a prefill, a preempted one back)
            return []
        out = []
        for r in live:
            # its in-flight token is its last by length: it finishes when `p` is read
            if len(r.output_token_ids) + 1 >= r.max_tokens or r.num_tokens + 1 >= self.max_model_len:
                continue
            if not decodes_async(r) or not self.kv.reserve(r, self.kv.seq_len(r.slot) + 1):
                return []
            out.append(r)
        return out

    def _advance(self) -> list[RequestOutput]:
        """Launch the step after the one in flight where it may go on, then read the one in flight."""
        p, self._pending = self._pending, None
        reqs = self._continuing(p)
        nxt = self._launch(reqs, p) if reqs else None
        try:
            results = self.runner.finish_decode(p)
        except BaseException:
            self.kv.distrust(p.reqs + reqs)
            raise
        self._pending = nxt
        self.num_steps += 1
        return self._process([(r, 1) for r in p.reqs], results)

    def _process(self, scheduled, results) -> list[RequestOutput]:
        """The step's results into the requests: tokens appended, stops checked, outputs made."""
        outs: list[RequestOutput] = []
        now = time.monotonic()
        for (req, n), res in zip(scheduled, results):
            if req.finished:  # (async: it stopped, or was aborted, while this step was in flight)
                continue
            if res.tokens is not None:  # verified drafts: emits accepted drafts + one, keeps as many
                req.num_computed_tokens += res.kept
                req.num_spec_steps += 1
                req.num_draft_tokens += res.drafted
                req.num_accepted_tokens += res.kept - 1
                self.spec_stats.steps += 1
                self.spec_stats.drafted += res.drafted
                self.spec_stats.accepted += res.kept - 1
                if req.first_token_time is None:
                    req.first_token_time = now
                for tok, lp in zip(res.tokens, res.token_logprobs):
                    self._append_token(req, tok, lp)
                    if req.finished:
                        break
                out = self._output(req)
                if out is not None:
                    outs.append(out)
                continue
            req.num_computed_tokens += n
            if res.prompt_logprobs:
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(None)
                req.prompt_logprobs.extend(res.prompt_logprobs)
            if res.token_id is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            self._append_token(req, res.token_id, res.logprobs)
            out = self._output(req)
            if out is not None:
                outs.append(out)
        if self.kv.prefix is not None:
            for req, _ in scheduled:
                if not req.finished:  # (finished ones offered theirs when released)
                    self.kv.commit(req)
            self.kv.prefix.flush()
        return outs

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (requests running keep what they hold)."""
        if self.kv.prefix is not None:
            self.kv.prefix.clear()

    def prefix_cache_stats(self) -> dict | None:
        """Prefix-cache counters (tokens looked up / found, pages and snapshots held), or None when off."""
        return None if self.kv.prefix is None else self.kv.prefix.stats()

    def _append_token(self, req: Request, tok: int, lp) -> None:
        req.output_token_ids.append(tok)
        if req.params.logprobs is not None:
            req.logprobs.append(lp)
        p = req.params
        enough = len(req.output_token_ids) >= p.min_tokens
        if req.detok is not None:
            new = req.detok.add(tok)
            emit, stopped = req.stop_matcher.feed(new, check_stop=enough)  # stop strings wait for min_tokens
            req.text += emit
            if stopped is not None:
                self._finish(req, "stop", stopped)
                return
        if enough and tok in req.eos_token_ids:
            self._finish(req, "stop", None)
        elif enough and tok in p.stop_token_ids:
            self._finish(req, "stop", tok)
        elif len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, stop_reason=None) -> None:
        finish_text(req, reason, stop_reason)
        self.scheduler.remove(req)
        self.runner.sampler.release(req.request_id)  # its penalty state on the device
        self.requests.pop(req.request_id, None)

    def _output(self, req: Request) -> RequestOutput | None:
        """The request's output now, shaped by params.output_kind (outputs.shape_output)."""
        return shape_output(req)


def _load_tokenizer(lm: LoadedModel) -> Tokenizer:
    try:
        return Tokenizer(lm.path)
    except ValueError:
        return Tokenizer(None)


__all__ = ["LLMEngine", "RequestStatus"]
