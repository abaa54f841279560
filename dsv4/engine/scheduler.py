"""FCFS scheduling with a per-step token budget, chunked prefill mixed with decodes, and preemption.

Each step:
1. Running requests, oldest first, each get the tokens they still need (1 for a decode, the rest of
   the prompt for a prefill), capped by what is left of the budget (chunked prefill). If the page pool
   cannot cover a request's new tokens, the NEWEST running request is preempted (everything it holds
   is freed; it goes back to the front of the queue and later recomputes its prompt and the tokens it
   had generated), until the pages fit. A request that cannot fit even alone fails with an error.
2. Waiting requests are admitted in arrival order while there is budget, a free slot and pages for
   their first chunk.
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
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = min(max_num_seqs, kv.cache.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
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

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()
        scheduled_ids = set()
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.reserve(req, req.num_computed_tokens + n):
                victims = [r for r in self.running if r is not req and id(r) not in scheduled_ids]
                if not victims:
                    break
                self._preempt(victims[-1], out)
            else:
                out.scheduled.append((req, n))
                scheduled_ids.add(id(req))
                budget -= n
                continue
            if not [r for r in self.running if r is not req]:  # alone and still too big: never servable
                req.error = (f"request needs {self.kv.pages_for(req.num_computed_tokens + n)} cache pages, "
                             f"more than the cache holds ({self.kv.cache.num_pages})")
                self.running.remove(req)
                self.kv.release(req)
                out.failed.append(req)
            else:  # others already scheduled this step hold the pages: wait for the next step
                self._preempt(req, out)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
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
            budget -= n
        return out
