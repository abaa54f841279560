"""FCFS scheduling with a per-step token budget, chunked prefill mixed with decodes, and preemption.

Each step:
1. Running requests that decode (one token to compute) go first, oldest first: a decode never waits
   behind another request's prefill chunk.
2. Running requests that prefill (their prompt, or the prompt and outputs they recompute after a
   preemption), oldest first, then waiting requests in arrival order (admitted while there is a free
   slot and pages for their first chunk), each get the tokens they still need, capped by what is left
   of the step's budget (chunked prefill). When the step has decodes, prefill tokens are further
   capped at `prefill_tokens_with_decodes` (the decode-latency budget: a step's time grows with its
   tokens, and every decoding request waits for the whole step) and, with a decode-latency budget, at the
   cap it derives from measured step times (engine/latency_budget.py); alone, prefills get the full budget.
   With prefix caching, an admitted request first takes its cached prefix (cache/prefix_cache.py).
3. If the page pool cannot cover a running request's new tokens, the NEWEST running request not yet
   scheduled this step is preempted (everything it holds is freed; it goes back to the front of the
   queue and later recomputes its prompt and the tokens it had generated), until the pages fit. A
   request that cannot fit even alone fails with an error.
Nothing blocks: a step either schedules work or has none; abort frees everything at any time.

Cost: one `schedule()` is O(running requests + requests it schedules, admits or preempts); `remove` is
O(1). The queues are ordered sets (membership and removal by identity in O(1)), and the search for the
newest running request not yet scheduled walks the step's running list once, from its newest end.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.engine.latency_budget import DecodeLatencyBudget
from dsv4.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    decodes: int = 0  # scheduled requests that add their next token (with drafts to verify, if any)
    prefill_tokens: int = 0  # prompt (or recomputed) tokens scheduled
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class RequestQueue:
    """Requests in order, with O(1) membership, removal, and insertion or removal at either end; keyed by
    identity. Iterates (and `len`, truth) like the list or deque it replaces."""
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: OrderedDict[int, Request] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __bool__(self) -> bool:
        return bool(self._d)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._d.values())

    def __contains__(self, req: object) -> bool:
        return id(req) in self._d

    def __repr__(self) -> str:
        return f"RequestQueue({[r.request_id for r in self]})"

    def append(self, req: Request) -> None:
        self._d[id(req)] = req

    def appendleft(self, req: Request) -> None:
        self._d[id(req)] = req
        self._d.move_to_end(id(req), last=False)

    def first(self) -> Request:
        return next(iter(self._d.values()))

    def popleft(self) -> Request:
        return self._d.popitem(last=False)[1]

    def remove(self, req: Request) -> None:
        del self._d[id(req)]

    def discard(self, req: Request) -> bool:
        """Remove `req` if present; whether it was."""
        return self._d.pop(id(req), None) is not None


class _Step:
    """One schedule() call's bookkeeping: what it scheduled, and the running requests as they were at its
    start (admission order) with a cursor for the victim search: every request above the cursor is
    scheduled, preempted, failed or the one being placed, none of which can become a victim later."""
    __slots__ = ("scheduled", "order", "cursor")

    def __init__(self, order: list[Request]):
        self.scheduled: set[int] = set()
        self.order = order
        self.cursor = len(order)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_tokens_with_decodes: int | None = None, latency: DecodeLatencyBudget | None = None):
        self.kv = kv
        self.max_num_seqs = min(max_num_seqs, kv.cache.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_tokens_with_decodes = prefill_tokens_with_decodes  # None: the whole budget
        self.latency = latency  # decode-latency budget from measured step times (engine/latency_budget.py)
        self.waiting = RequestQueue()  # preempted requests at the front, then arrivals in order
        self.running = RequestQueue()  # in admission order

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take `req` out of the queues and free what it holds (finish, abort, error)."""
        if not self.running.discard(req):
            self.waiting.discard(req)
        self.kv.release(req)
        req.status = RequestStatus.FINISHED

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.set_drafts([])
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _victim(self, req: Request, step: _Step) -> Request | None:
        """The newest running request other than `req` not yet scheduled this step, or None."""
        order, i = step.order, step.cursor
        while i > 0:
            r = order[i - 1]
            if r is not req and id(r) not in step.scheduled and r in self.running:
                break
            i -= 1  # (req itself: scheduled, preempted or failed before the next search)
        step.cursor = i
        return order[i - 1] if i > 0 else None

    def _place(self, req: Request, n: int, out: SchedulerOutput, step: _Step) -> bool:
        """Reserve pages for n more tokens of running `req`, preempting the newest running requests not
        yet scheduled this step as needed; schedule it, or preempt / fail it when it cannot fit."""
        while not self.kv.reserve(req, req.num_computed_tokens + n):
            victim = self._victim(req, step)
            if victim is None:
                break
            self._preempt(victim, out)
        else:
            out.scheduled.append((req, n))
            step.scheduled.add(id(req))
            return True
        if len(self.running) == 1:  # alone (req is running) and still too big: never servable
            req.error = (f"request needs {self.kv.pages_for(req.num_computed_tokens + n)} cache pages, "
                         f"more than the cache holds ({self.kv.cache.num_pages})")
            self.running.remove(req)
            self.kv.release(req)
            out.failed.append(req)
        else:  # others already scheduled this step hold the pages: wait for the next step
            self._preempt(req, out)
        return False

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()
        step = _Step(list(self.running))

        def need(r: Request) -> int:
            return r.num_tokens - r.num_computed_tokens

        decodes = [r for r in step.order if need(r) == 1]
        prefills = [r for r in step.order if need(r) > 1]
        for req in decodes:
            if budget == 0:
                break
            if req.spec_ids:  # drafts to verify with the last token (speculative decoding): as many as fit
                room = min(budget - 1, req.max_tokens - len(req.output_token_ids) - 1,
                           self.kv.cache.max_seq_len - req.num_tokens)
                del req.spec_ids[max(0, room):]
            n = 1 + len(req.spec_ids)
            if req in self.running and self._place(req, n, out, step):  # (not preempted meanwhile)
                budget -= n
        out.decodes = len(out.scheduled)
        prefill_left = budget
        if out.scheduled and self.prefill_tokens_with_decodes is not None:
            prefill_left = min(budget, self.prefill_tokens_with_decodes)
        if out.scheduled and self.latency is not None and (prefills or self.waiting):
            prefill_left = min(prefill_left, self.latency.cap(out.decodes))
        for req in prefills:
            if prefill_left == 0:
                break
            if req not in self.running:
                continue
            n = min(need(req), prefill_left)
            if self._place(req, n, out, step):
                prefill_left -= n
                out.prefill_tokens += n
        while self.waiting and prefill_left > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.first()
            if not self.kv.admit(req):
                break
            self.kv.attach_prefix(req)  # (prefix caching: it may start past a cached prefix)
            n = min(need(req), prefill_left)
            if not self.kv.reserve(req, req.num_computed_tokens + n):
                self.kv.release(req)
                req.num_computed_tokens = 0
                if not self.running:
                    self.waiting.popleft()
                    req.error = (f"request needs {self.kv.pages_for(req.num_computed_tokens + n)} cache pages "
                                 f"for its first {n} tokens; the cache holds {self.kv.cache.num_pages}")
                    out.failed.append(req)
                    continue
                break
            self.waiting.popleft()
            if self.kv.prefix is not None:
                self.kv.prefix.record(req)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append((req, n))
            prefill_left -= n
            out.prefill_tokens += n
        return out

