"""The scheduler at scale (thousands of running requests, many preemptions, failures, aborts and arrivals)
makes exactly the decisions of the simple list-based scheduler it replaced (kept below as the reference),
step by step: the same requests scheduled with the same token counts in the same order, the same
preemptions, failures and messages, the same queues."""

import random
from collections import deque
from types import SimpleNamespace

import pytest
import torch

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.engine.request import Request, RequestStatus
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.scheduler import RequestQueue, Scheduler, SchedulerOutput


# ---- the scheduler before its queues were indexed, verbatim but for the name: the reference ----------

class RefScheduler:
    def __init__(self, kv, max_num_seqs, max_num_batched_tokens, prefill_tokens_with_decodes=None):
        self.kv = kv
        self.max_num_seqs = min(max_num_seqs, kv.cache.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_tokens_with_decodes = prefill_tokens_with_decodes
        self.waiting = deque()
        self.running = []

    def add(self, req):
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def remove(self, req):
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.release(req)
        req.status = RequestStatus.FINISHED

    def _preempt(self, req, out):
        self.running.remove(req)
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _place(self, req, n, out, scheduled_ids):
        while not self.kv.reserve(req, req.num_computed_tokens + n):
            victims = [r for r in self.running if r is not req and id(r) not in scheduled_ids]
            if not victims:
                break
            self._preempt(victims[-1], out)
        else:
            out.scheduled.append((req, n))
            scheduled_ids.add(id(req))
            return True
        if not [r for r in self.running if r is not req]:
            req.error = (f"request needs {self.kv.pages_for(req.num_computed_tokens + n)} cache pages, "
                         f"more than the cache holds ({self.kv.cache.num_pages})")
            self.running.remove(req)
            self.kv.release(req)
            out.failed.append(req)
        else:
            self._preempt(req, out)
        return False

    def schedule(self):
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids = set()

        def need(r):
            return r.num_tokens - r.num_computed_tokens

        decodes = [r for r in self.running if need(r) == 1]
        prefills = [r for r in self.running if need(r) > 1]
        for req in decodes:
            if budget == 0:
                break
            if req in self.running and self._place(req, 1, out, scheduled_ids):
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
            self.running.append(req)
            out.scheduled.append((req, n))
            prefill_left -= n
        return out


# ---- a world: a KV manager over a bookkeeping-only cache, a scheduler, requests by id ------------------

PAGE = 16


def make_kv(num_slots, num_pages, pages_per_seq):
    cache = SimpleNamespace(paged=True, page_tokens=PAGE, num_pages=num_pages, num_slots=num_slots,
                            pages_per_seq=pages_per_seq, reset=lambda slots: None,
                            block_table=torch.zeros(num_slots, pages_per_seq, dtype=torch.int64))
    return KVCacheManager(cache)


class World:
    def __init__(self, cls, num_slots, num_pages, pages_per_seq, **kw):
        self.kv = make_kv(num_slots, num_pages, pages_per_seq)
        self.sched = cls(self.kv, **kw)
        self.reqs: dict[str, Request] = {}

    def add(self, rid, prompt, max_out):
        req = Request(request_id=rid, prompt_token_ids=list(prompt), params=SamplingParams(), max_tokens=max_out,
                      eos_token_ids=frozenset())
        self.reqs[rid] = req
        self.sched.add(req)

    def remove(self, rid):
        self.sched.remove(self.reqs.pop(rid))

    def step(self):
        """Schedule, run (each request that reaches its end gets one token), finish; what happened."""
        so = self.sched.schedule()
        log = ([(r.request_id, n) for r, n in so.scheduled], [r.request_id for r in so.preempted],
               [(r.request_id, r.error) for r in so.failed])
        for r in so.failed:
            self.remove(r.request_id)
        for r, n in so.scheduled:
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(len(r.output_token_ids) % 7)
                if len(r.output_token_ids) >= r.max_tokens:
                    self.remove(r.request_id)
        return log

    def queues(self):
        return ([r.request_id for r in self.sched.running], [r.request_id for r in self.sched.waiting],
                {rid: (r.status, r.num_computed_tokens, len(r.pages), r.num_preemptions, r.slot is None)
                 for rid, r in self.reqs.items()})


@pytest.mark.parametrize("cap", [None, 700])
def test_thousands_of_requests_match_the_reference(cap):
    rng = random.Random(cap or 0)
    kw = dict(num_slots=2100, num_pages=2000, pages_per_seq=4, max_num_seqs=2048, max_num_batched_tokens=20000,
              prefill_tokens_with_decodes=cap)
    worlds = [World(Scheduler, **kw), World(RefScheduler, **kw)]
    n = 0

    def arrive(count):
        nonlocal n
        for _ in range(count):
            prompt = [1] * rng.randint(1, PAGE)
            max_out = rng.randint(1, 3 * PAGE)
            for w in worlds:
                w.add(f"q{n}", prompt, max_out)
            n += 1

    arrive(2000)
    preempted = aborted = 0
    peak = 0
    for step in range(60):
        logs = [w.step() for w in worlds]
        assert logs[0] == logs[1], step
        assert worlds[0].queues() == worlds[1].queues(), step
        preempted += len(logs[0][1])
        peak = max(peak, len(worlds[0].sched.running))
        live = list(worlds[0].reqs)
        for rid in rng.sample(live, k=min(len(live), rng.choice([0, 5, 20, 100]))):
            for w in worlds:
                w.remove(rid)
            aborted += 1
        arrive(rng.choice([0, 0, 20, 200]))
        for w in worlds:
            w.kv.check()
    # the run exercised what it is meant to
    assert peak > 1900 and preempted > 200 and aborted > 1000, (peak, preempted, aborted)
    while worlds[0].reqs:  # abort everything left: both empty, nothing held
        rid = next(iter(worlds[0].reqs))
        for w in worlds:
            w.remove(rid)
    for w in worlds:
        assert not w.sched.running and not w.sched.waiting
        w.add("big", [1] * (4 * PAGE + 1), 1)  # more than a sequence may hold, first in line: fails at admission
        w.add("next", [1] * 3, 2)
    logs = [w.step() for w in worlds]
    assert logs[0] == logs[1] and [rid for rid, _ in logs[0][2]] == ["big"] and logs[0][0] == [("next", 3)]
    for w in worlds:
        w.remove("next")
        assert w.kv.num_free_pages == 2000 and w.kv.num_free_slots == 2100


def test_small_tight_worlds_match_the_reference():
    """Small caches under random load: every path (preemption storms, a request failing alone, a first chunk
    failing at admission, the prefill cap) against the reference."""
    seen = {"preempted": 0, "failed": 0, "scheduled": 0}
    for seed in range(150):
        rng = random.Random(seed)
        kw = dict(num_slots=rng.randint(2, 8), num_pages=rng.randint(3, 14), pages_per_seq=16,
                  max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(4, 80),
                  prefill_tokens_with_decodes=rng.choice([None, 1, 8, 30]))
        worlds = [World(Scheduler, **kw), World(RefScheduler, **kw)]
        n = 0
        for step in range(40):
            if rng.random() < 0.5:
                prompt, max_out = [1] * rng.randint(1, 5 * PAGE), rng.randint(1, 4 * PAGE)
                for w in worlds:
                    w.add(f"q{n}", prompt, max_out)
                n += 1
            logs = [w.step() for w in worlds]
            assert logs[0] == logs[1], (seed, step)
            assert worlds[0].queues() == worlds[1].queues(), (seed, step)
            seen["scheduled"] += len(logs[0][0])
            seen["preempted"] += len(logs[0][1])
            seen["failed"] += len(logs[0][2])
            if worlds[0].reqs and rng.random() < 0.1:
                rid = rng.choice(list(worlds[0].reqs))
                for w in worlds:
                    w.remove(rid)
            for w in worlds:
                w.kv.check()
    assert seen["preempted"] > 200 and seen["failed"] > 50 and seen["scheduled"] > 2000, seen


def test_request_queue():
    reqs = [SimpleNamespace(request_id=str(i)) for i in range(6)]
    q = RequestQueue()
    assert not q and len(q) == 0
    for r in reqs[:4]:
        q.append(r)
    q.appendleft(reqs[4])
    assert [r.request_id for r in q] == ["4", "0", "1", "2", "3"] and len(q) == 5 and q
    assert reqs[2] in q and reqs[5] not in q
    q.remove(reqs[2])
    assert q.discard(reqs[0]) and not q.discard(reqs[0]) and not q.discard(reqs[5])
    assert q.first() is reqs[4] and q.popleft() is reqs[4]
    assert [r.request_id for r in q] == ["1", "3"]
    with pytest.raises(KeyError):
        q.remove(reqs[5])
