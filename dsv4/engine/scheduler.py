"""FCFS scheduling with a per-step token budget, chunked prefill mixed with decodes, and preemption.

Each step:
1. Running requests that decode (one token to compute) go first, oldest first: a decode never waits
   behind another request's prefill chunk.
2. Running requests that prefill (their prompt, or the prompt and outputs they recompute after a
   preemption), oldest first, then waiting requests in arrival order (admitted while there is a free
   slot and pages for their first chunk), each get the tokens they still need, capped by what is left
   of the step's budget (chunked prefill). When the step has decodes, prefill tokens are further
   capped at `prefill_tokens_with_decodes` (the decode-latency budget: a step's time grows with its
   tokens, and every decoding request waits for the whole step); alone, prefills get the full budget.
3. If the page pool cannot cover a running request's new tokens, the NEWEST running request not yet
   scheduled this step is preempted (everything it holds is freed; it goes back to the front of the
   queue and later recomputes its prompt and the tokens it had generated), until the pages fit. A
   request that cannot fit even alone fails with an error.
Nothing blocks: a step either schedules work or has none; abort frees everything at any time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_tokens_with_decodes: int | None = None):
        self.kv = kv
        self.max_num_seqs = min(max_num_seqs, kv.cache.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_tokens_with_decodes = prefill_tokens_with_decodes  # None: the whole budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take `req` out of the queues and free what it holds (finish, abort, error)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.release(req)
        req.status = RequestStatus.FINISHED

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _place(self, req: Request, n: int, out: SchedulerOutput, scheduled_ids: set) -> bool:
        """Reserve pages for n more tokens of running `req`, preempting the newest running requests not
        yet scheduled this step as needed; schedule it, or preempt / fail it when it cannot fit."""
        while not self.kv.reserve(req, req.num_computed_tokens + n):
            victims = [r for r in self.running if r is not req and id(r) not in scheduled_ids]
            if not victims:
                break
            self._preempt(victims[-1], out)
        else:
            out.scheduled.append((req, n))
            scheduled_ids.add(id(req))
            return True
        if not [r for r in self.running if r is not req]:  # alone and still too big: never servable
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
        scheduled_ids: set[int] = set()

        def need(r: Request) -> int:
            return r.num_tokens - r.num_computed_tokens

        decodes = [r for r in self.running if need(r) == 1]
        prefills = [r for r in self.running if need(r) > 1]
        for req in decodes:
            if budget == 0:
                break
            if req in self.running and self._place(req, 1, out, scheduled_ids):  # (not preempted meanwhile)
                budget -= 1
        prefill_left = budget
        if out.scheduled and self.prefill_tokens_with_decodes is not None:
            prefill_left = min(budget, self.prefill_tokens_with_decodes)
        for req in prefills:
            if prefill_left == 0:
                break
            if req not in self.running:
                continue
            n = min(need(req), prefill_left)
            if self._place(req, n, out, scheduled_ids):
                prefill_left -= n
        while self.waiting and prefill_left > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(need(req), prefill_left)
            if not self.kv.admit(req):
                break
            if not self.kv.reserve(req, req.num_computed_tokens + n):
                self.kv.release(req)
                if not self.running:
                    self.waiting.popleft()
                    req.error = (f"request needs {self.kv.pages_for(req.num_computed_tokens + n)} cache pages "
                                 f"for its first {n} tokens; the cache holds {self.kv.cache.num_pages}")
                    out.failed.append(req)
                    continue
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append((req, n))
            prefill_left -= n
        return out
