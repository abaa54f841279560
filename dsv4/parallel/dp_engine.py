"""One front end over N expert-parallel ranks (data-parallel attention: each rank serves its own requests).

`DPEngine` lives on rank 0 and is an `EngineClient` (engine/client.py), as `LLMEngine` is, so `LLM`,
`AsyncLLM`, the HTTP server and the benchmarks drive N ranks as they drive one. Each `step()` is one
lockstep iteration of every rank:

  1. rank 0 broadcasts the commands gathered since the last step (new requests with the rank they go to,
     aborts) over the gloo control group; every rank applies its own;
  2. every rank runs its engine's step: schedule its own requests, agree on the step with the others
     (parallel/step_sync.py: graph or eager, bucket, token count), run the model (a rank with no work takes
     part with a one-token step), sample its own tokens, detokenize;
  3. rank 0 gathers every rank's outputs, as increments (new token ids, new text, new logprobs), and
     its queue / cache occupancy; it rebuilds full RequestOutputs for the remote requests.

Placement: a new request goes to the rank holding the fewest tokens of unfinished requests, each counted at
its peak (prompt + max_tokens: the cache it will hold and the tokens it will compute), so one long request
weighs as much as many short ones and a loaded rank is not handed more; ties: fewer requests, then the
lowest rank.
Validation and tokenisation happen once, on rank 0, before anything is sent: a bad request raises
ValueError from `add_request` and reaches no rank. A failure inside a lockstep step cannot be contained
(the other ranks wait in collectives this rank will not enter): rank 0 logs it and ends the process group.
A rank process that dies is seen by a watcher thread (and by the collective that fails with it): the step
raises an error naming the rank, every rank is stopped, `failure` says why (the server's /health), and the
requests in flight fail cleanly; only if rank 0 stays blocked in a collective with the dead rank (a
backend that does not notice) for RANK_FAILURE_GRACE_S does the process exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch.distributed as dist

from dsv4.cache.prefix_cache import chain_keys
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.parallel.teardown import teardown

log = logging.getLogger("dsv4.parallel")
STOP = "stop"
RANK_FAILURE_GRACE_S = 30.0  # how long rank 0 may stay blocked in a step after another rank died


@dataclass
class _Delta:
    """What a remote rank sends of one request's output in one step."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list | None  # of the new tokens (when asked)
    prompt_logprobs: list | None  # once, with the request's first output that has them
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    metrics: RequestMetrics
    error: str | None


def _delta(o: RequestOutput) -> _Delta:
    c = o.outputs[0]
    n = len(c.delta_token_ids)
    first = n == len(c.token_ids)  # the output that carries the first generated token(s), or the only one
    return _Delta(o.request_id, list(c.delta_token_ids), c.delta_text,
                  None if c.logprobs is None else c.logprobs[len(c.logprobs) - n:],
                  o.prompt_logprobs if (first or o.finished) else None, o.finished, c.finish_reason,
                  c.stop_reason, o.metrics, o.error)


class _Mirror:
    """Rank 0's copy of a remote request's cumulative output."""

    def __init__(self, req: Request):
        self.prompt, self.prompt_token_ids = req.prompt, req.prompt_token_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs = [] if req.params.logprobs is not None else None
        self.prompt_logprobs = None
        self.delta = req.params.output_kind == "delta"

    def apply(self, d: _Delta) -> RequestOutput:
        self.token_ids += d.token_ids
        self.text += d.text
        if self.logprobs is not None and d.logprobs:
            self.logprobs += d.logprobs
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if self.delta:  # the request asked for new tokens only: no O(n) copies per output
            ids, lps = list(d.token_ids), None if self.logprobs is None else list(d.logprobs or [])
        else:
            ids, lps = list(self.token_ids), None if self.logprobs is None else list(self.logprobs)
        comp = CompletionOutput(index=0, text=self.text, token_ids=ids, logprobs=lps,
                                finish_reason=d.finish_reason, stop_reason=d.stop_reason, delta_text=d.text,
                                delta_token_ids=list(d.token_ids))
        return RequestOutput(request_id=d.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
                             outputs=[comp], finished=d.finished, metrics=d.metrics, error=d.error)


class DPEngine:
    """Rank 0's EngineClient over every rank; `local` is rank 0's own engine (one rank of the group)."""

    def __init__(self, local: LLMEngine, ctx, children=()):
        self.local, self.ctx = local, ctx
        self.world = ctx.spec.world
        self.children = list(children)
        self.num_steps = 0
        self._pending: list[tuple] = []  # commands for the next step
        self._owner: dict[str, int] = {}  # unfinished request id -> its rank
        self._count = [0] * self.world  # unfinished requests per rank
        self._tokens = [0] * self.world  # their tokens at peak (prompt + max_tokens), per rank
        self._weight: dict[str, int] = {}  # unfinished request id -> its tokens at peak
        self._mirrors: dict[str, _Mirror] = {}
        self._loads = [local.load()] * self.world
        self._affinity: OrderedDict[bytes, int] = OrderedDict()  # page chain key -> the rank last given it
        self._ids = 0
        self._closed = False
        self.failure: str | None = None  # why the group stopped serving (a rank died, a step failed)
        self._in_step = False
        if self.children:
            threading.Thread(target=self._watch, name="dsv4-rank-watch", daemon=True).start()
        atexit.register(self.shutdown)

    # ---- EngineClient: what front ends read; rank 0's, the same on every rank (config, model, cache plan) --
    @property
    def config(self):
        return self.local.config

    @property
    def cfg(self):
        return self.local.cfg

    @property
    def lm(self):
        return self.local.lm

    @property
    def tokenizer(self):
        return self.local.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    @property
    def device(self):
        return self.local.device

    @property
    def plan(self):
        return self.local.plan

    @property
    def graph_steps(self) -> int:
        """Steps replayed from decode graphs: rank 0's count, which is every rank's (they agree on each step)."""
        return self.local.graph_steps

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        if self._closed:
            raise RuntimeError(f"the expert-parallel engine cannot serve: {self.failure}" if self.failure
                               else "the expert-parallel engine is shut down")
        if request_id is None:
            request_id, self._ids = f"req-{self._ids}", self._ids + 1
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.local.make_request(prompt, params, request_id, arrival_time)  # validates, tokenises
        rank = self._place(req)
        if rank == 0:
            self.local.enqueue(req)
        else:
            age = time.monotonic() - req.arrival_time  # clocks of other nodes differ: send the age
            self._pending.append(("add", rank, request_id, req.prompt_token_ids, req.params, age))
            self._mirrors[request_id] = _Mirror(req)
        self._owner[request_id] = rank
        self._count[rank] += 1
        self._weight[request_id] = req.num_prompt_tokens + req.max_tokens
        self._tokens[rank] += self._weight[request_id]
        return req

    AFFINITY_KEYS = 1 << 16  # page keys remembered for prefix-cache affinity (about 4 MB)

    def _place(self, req: Request) -> int:
        """The rank for a new request: the one holding the fewest tokens at peak (prompt + max_tokens of its
        unfinished requests), ties by request count. With prefix caching, the rank that was last given the
        longest prefix of this request's pages counts those tokens off its load (it likely holds them in its
        cache): it gets the request unless another rank is lighter by more than the prefix."""
        credit = [0] * self.world
        keys = []
        if self.local.kv.prefix is not None:
            pt = self.local.cache.page_tokens
            keys = chain_keys(req, (req.num_tokens - 1) // pt, pt)
            aff = self._affinity
            for i, k in enumerate(keys):
                r = aff.get(k)
                if r is None:
                    break
                credit = [0] * self.world
                credit[r] = (i + 1) * pt
        rank = min(range(self.world), key=lambda r: (self._tokens[r] - credit[r], self._count[r], r))
        for k in keys:
            self._affinity[k] = rank
            self._affinity.move_to_end(k)
        while len(self._affinity) > self.AFFINITY_KEYS:
            self._affinity.popitem(last=False)
        return rank

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Rank 0's requests end now (their final output returned); a remote one ends in the next step,
        whose outputs carry its final output."""
        rank = self._owner.get(request_id)
        if rank is None:
            return None
        if rank == 0:
            out = self.local.abort_request(request_id)
            self._forget(request_id)
            return out
        self._pending.append(("abort", rank, request_id))
        return None

    def _forget(self, rid: str) -> None:
        rank = self._owner.pop(rid, None)
        if rank is not None:
            self._count[rank] -= 1
            self._tokens[rank] -= self._weight.pop(rid, 0)
        self._mirrors.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def num_unfinished_requests(self) -> int:
        return len(self._owner)

    def load(self) -> dict:
        loads = [self.local.load()] + self._loads[1:]
        return {k: sum(x[k] for x in loads) for k in loads[0]}

    # ---- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._closed:
            raise RuntimeError(f"the expert-parallel engine cannot serve: {self.failure}" if self.failure
                               else "the expert-parallel engine is shut down")
        cmds, self._pending = self._pending, []
        self._in_step = True
        try:
            dist.broadcast_object_list([cmds], src=0, group=self.ctx.ctrl)
            outs = self.local.step()
            gathered = [None] * self.world
            dist.gather_object(None, gathered, dst=0, group=self.ctx.ctrl)
        except BaseException as e:
            # The other ranks may be waiting inside this step's collectives, where no STOP message can reach
            # them: stop them outright (also on Ctrl-C, which the spawned ranks leave to rank 0).
            dead = self._dead_rank(wait=1.0) if isinstance(e, Exception) else None
            self.failure = self.failure or dead or f"a step failed on rank 0: {type(e).__name__}: {e}"
            if isinstance(e, Exception):
                log.critical("an expert-parallel step failed (%s); the ranks cannot continue", self.failure,
                             exc_info=dead is None)
            self._abandon()
            if dead is not None:
                raise RuntimeError(f"the expert-parallel group lost a rank: {dead}") from e
            raise
        finally:
            self._in_step = False
        for r in range(1, self.world):
            deltas, self._loads[r] = gathered[r]
            for d in deltas:
                m = self._mirrors.get(d.request_id)
                if m is not None:
                    outs.append(m.apply(d))
        for o in outs:
            if o.finished:
                self._forget(o.request_id)
        self.num_steps += 1
        return outs

    # ---- lifetime ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the ranks were stopped (shut down, or abandoned after a failed step): every
        further step fails."""
        return self._closed

    def shutdown(self) -> None:
        """Stop every rank (requests still unfinished are dropped)."""
        if self._closed:
            return
        self._closed = True
        try:
            dist.broadcast_object_list([STOP], src=0, group=self.ctx.ctrl)
        except Exception:  # a rank is gone already
            log.warning("could not reach every rank to stop it", exc_info=True)
        for p in self.children:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        teardown()

    def _abandon(self) -> None:
        """After a failed step: stop the other ranks, leave the process group (its threads and sockets must not
        outlive the peers into the interpreter's exit: seen to abort it, "terminate called without an active
        exception") and forget every request (callers fail them)."""
        self._closed = True
        for p in self.children:
            p.terminate()
        for p in self.children:
            p.join(timeout=10)
        try:
            teardown()
        except Exception:
            log.warning("could not leave the process group after the failure", exc_info=True)
        self._owner.clear()
        self._mirrors.clear()
        self._count = [0] * self.world
        self._tokens = [0] * self.world
        self._weight.clear()

    def _dead_rank(self, wait: float = 0.0) -> str | None:
        """'rank R (pid P) exited with code C' for a rank process that ended, waiting up to `wait` s for one."""
        deadline = time.monotonic() + wait
        while True:
            for r, p in enumerate(self.children, start=1):
                if p.exitcode is not None:
                    return f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        """A rank that dies: the group stops serving (`failure`); rank 0's step in flight fails with it. If that
        step stays blocked in a collective with the dead rank, the process ends instead."""
        while not self._closed:
            dead = self._dead_rank()
            if dead is not None and not self._closed:
                self.failure = self.failure or dead
                log.critical("%s; the expert-parallel group cannot go on: stopping it", dead)
                deadline = time.monotonic() + RANK_FAILURE_GRACE_S
                while self._in_step and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._in_step:
                    log.critical("rank 0 is still blocked in a collective with the dead rank after %.0f s: exiting",
                                 RANK_FAILURE_GRACE_S)
                    os._exit(1)
                self._abandon()
                return
            time.sleep(0.5)


def worker_loop(engine: LLMEngine, ctx) -> None:
    """Ranks 1..N-1: apply rank 0's commands, step in lockstep, send outputs back; until STOP."""
    me = ctx.spec.rank
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=ctx.ctrl)
        cmds = box[0]
        if cmds == STOP:
            return
        outs: list[RequestOutput] = []
        for c in cmds:
            if c[1] != me:
                continue
            if c[0] == "add":
                _, _, rid, ids, params, age = c
                try:
                    engine.add_request(ids, params, request_id=rid, arrival_time=time.monotonic() - age)
                except ValueError as e:  # rank 0 validated already; fail the request, not the rank
                    outs.append(_failed(rid, ids, str(e)))
            elif c[0] == "abort":
                o = engine.abort_request(c[2])
                if o is not None:
                    outs.append(o)
        outs += engine.step()
        dist.gather_object(([_delta(o) for o in outs], engine.load()), None, dst=0, group=ctx.ctrl)


def _failed(rid: str, ids: list[int], error: str) -> RequestOutput:
    now = time.monotonic()
    m = RequestMetrics(arrival_time=now, first_scheduled_time=None, first_token_time=None, finish_time=now,
                       num_prompt_tokens=len(ids), num_generated_tokens=0, num_preemptions=0)
    return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=ids, prompt_logprobs=None,
                         outputs=[CompletionOutput(0, "", [], None, "error")], finished=True, metrics=m, error=error)
