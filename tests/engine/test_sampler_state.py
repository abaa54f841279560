"""The Sampler's per-request state (penalty masks / counts and logit_bias kept on the device, updated with
only the newly appended output tokens) gives bit for bit the logits and tokens of building everything from
the token lists at every call, as the sampler did before it kept state."""

import math
import random

import torch

from dsv4.engine import sampler as sampler_mod
from dsv4.engine.sampler import Sampler, SamplingRow, make_generator
from dsv4.engine.sampling_params import SamplingParams

V = 50


# ---- the sampler's penalties before it kept state, verbatim: the reference ---------------------------

def _col(values, like):
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _padded(lists, V, device):
    width = max((len(t) for t in lists), default=0)
    idx = torch.full((len(lists), max(width, 1)), V, dtype=torch.int64)
    for j, t in enumerate(lists):
        if len(t):
            idx[j, :len(t)] = torch.as_tensor(list(t), dtype=torch.int64)
    return idx.to(device)


def _token_counts(lists, V, device):
    idx = _padded(lists, V, device)
    counts = torch.zeros(len(lists), V + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
    return counts[:, :V]


def _token_mask(lists, V, device):
    idx = _padded(lists, V, device)
    mask = torch.zeros(len(lists), V + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, idx, True)
    return mask[:, :V]


def old_apply_penalties(logits, rows):
    x = logits.clone()
    V = x.shape[1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _token_mask([list(rows[i].prompt_token_ids) + list(rows[i].output_token_ids) for i in rep], V, x.device)
        ri = torch.tensor(rep, device=x.device)
        pen = _col([rows[i].params.repetition_penalty for i in rep], x)
        sub = x[ri]
        x[ri] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    fp = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if fp:
        counts = _token_counts([rows[i].output_token_ids for i in fp], V, x.device)
        fi = torch.tensor(fp, device=x.device)
        freq = _col([rows[i].params.frequency_penalty for i in fp], x)
        pres = _col([rows[i].params.presence_penalty for i in fp], x)
        x[fi] = x[fi] - freq * counts - pres * (counts > 0).float()
    ri, ti, bv = [], [], []
    for i, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if 0 <= t < V:
                ri.append(i)
                ti.append(t)
                bv.append(float(b))
    if ri:
        x.index_put_((torch.tensor(ri, device=x.device), torch.tensor(ti, device=x.device)),
                     torch.tensor(bv, dtype=x.dtype, device=x.device), accumulate=True)
    return x


def bits(t):
    return t.contiguous().view(torch.int32)


# ---- a random workload -----------------------------------------------------------------------------

def random_params(rng, seed):
    kind = rng.random()
    if kind < 0.2:  # no penalty, no bias: no state
        return SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=seed)
    bias = None
    if rng.random() < 0.4:
        bias = {rng.randrange(-3, V + 3): rng.choice([-100.0, -2.5, 0.0, 1.25, 7.0, 100.0])
                for _ in range(rng.randint(1, 6))}
    return SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), seed=seed, top_k=rng.choice([0, 10]),
                          repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8, 2.0]),
                          frequency_penalty=rng.choice([0.0, 0.0, 0.5, -0.7, 2.0]),
                          presence_penalty=rng.choice([0.0, 0.0, 0.3, -1.0, 1.5]), logit_bias=bias,
                          logprobs=rng.choice([None, None, 0, 3]))


class Req:
    def __init__(self, rng, rid, seed):
        self.rid = rid
        self.params = random_params(rng, seed)
        self.prompt = [rng.randrange(V) for _ in range(rng.randint(0, 30))]
        self.output = [rng.randrange(V) for _ in range(rng.choice([0, 0, 0, 3, 40]))]
        self.stop = frozenset(rng.sample(range(V), 2))
        self.gens = (make_generator(seed, "cpu"), make_generator(seed, "cpu"))  # one per sampler under test

    def row(self, which, with_id=True):
        return SamplingRow(params=self.params, prompt_token_ids=self.prompt, output_token_ids=self.output,
                           generator=self.gens[which], stop_ids=self.stop,
                           request_id=self.rid if with_id else None)

    def uses_state(self):
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or bool(
            p.logit_bias)


def run_workload(steps, seed, check):
    """Requests come, grow (by 1, sometimes by several tokens at once, sometimes not at all: preempted or
    not scheduled), finish (released) and sometimes come back under the same id; rows without an id mix
    in. At every step `check(stateful, rows, plain, logits)` gets the rows with ids and the same rows as
    a stateless caller builds them (list copies, no id, the twin generators)."""
    rng = random.Random(seed)
    stateful = Sampler()
    live: dict[str, Req] = {}
    sampled: set[str] = set()
    n = 0
    for step in range(steps):
        for _ in range(rng.choice([0, 0, 1, 3])):
            rid = rng.choice([f"r{n}", f"r{rng.randrange(max(n, 1))}"])  # an id seen before comes back
            if rid not in live:
                live[rid] = Req(rng, rid, seed=1000 * seed + n)
                n += 1
        batch = [r for r in live.values() if rng.random() < 0.8]
        rng.shuffle(batch)
        if batch:
            items = [(r, True) for r in batch]
            for _ in range(rng.choice([0, 0, 1])):
                items.insert(rng.randrange(len(items) + 1), (Req(rng, None, seed=7), False))
            rows = [r.row(0, with_id=w) for r, w in items]
            plain = [SamplingRow(r.params, list(r.prompt), list(r.output), r.gens[1], r.stop) for r, _ in items]
            logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(step)) * 4
            logits[:, 0] = 0.0  # exact zeros (and -0.0) go through the repetition penalty's sign test
            logits[:, 1] = -0.0
            check(stateful, rows, plain, logits)
            sampled.update(r.rid for r in batch)
            for r in batch:
                r.output += [rng.randrange(V) for _ in range(rng.choice([1] * 8 + [0, 2, 5]))]
        for rid in [rid for rid in live if rng.random() < 0.06]:
            del live[rid]
            sampled.discard(rid)
            stateful.release(rid)
            if rng.random() < 0.3:
                stateful.release(rid)  # twice: nothing happens
        assert stateful.num_states == sum(r.uses_state() for rid, r in live.items() if rid in sampled)
    return stateful


def test_incremental_state_gives_the_same_logits_bit_for_bit():
    seen = {"rows": 0, "states": 0}

    def check(stateful, rows, plain, logits):
        got = stateful.apply_penalties(logits, rows)
        assert torch.equal(bits(got), bits(old_apply_penalties(logits, plain)))
        seen["rows"] += len(rows)
        seen["states"] += stateful.num_states

    for seed in range(3):
        run_workload(150, seed, check)
    assert seen["rows"] > 1000 and seen["states"] > 1000


def test_incremental_state_gives_the_same_tokens_and_logprobs():
    """Whole sampler calls: the tokens a fresh Sampler draws from the lists, with twin generators."""
    calls = [0]

    def check(stateful, rows, plain, logits):
        torch.manual_seed(0)
        got = stateful(logits, rows)
        torch.manual_seed(0)
        want = Sampler()(logits, plain)
        assert got == want
        calls[0] += 1

    run_workload(120, 11, check)
    assert calls[0] > 100


def test_state_is_kept_only_for_penalised_requests_and_built_once(monkeypatch):
    built = []
    for name in ("_token_mask", "_token_counts"):
        real = getattr(sampler_mod, name)

        def spy(lists, *a, _real=real, **k):
            built.extend(len(t) for t in lists)
            return _real(lists, *a, **k)
        monkeypatch.setattr(sampler_mod, name, spy)
    s = Sampler()
    plain = SamplingRow(SamplingParams(temperature=0), [1, 2], [3], None, frozenset(), request_id="plain")
    rp = SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5)
    out = [4, 4]
    pen = SamplingRow(rp, [1, 2, 3], out, None, frozenset(), request_id="pen")
    logits = torch.randn(2, V)
    s(logits, [plain, pen])
    assert s.num_states == 1 and sorted(built) == [2, 5]  # once: prompt + output, and output
    for t in range(300):
        out.append(t % V)
        s(logits, [pen, plain])
    assert sorted(built) == [2, 5]  # never rebuilt from the lists
    assert torch.equal(s.apply_penalties(logits[:1], [pen]), old_apply_penalties(logits[:1], [pen]))
    s.release("plain")  # no state: nothing to do
    assert s.num_states == 1


def test_release_drops_the_state():
    s = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=1.0, logit_bias={5: 3.0})
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)).abs() + 1
    a = SamplingRow(p, [7], [8, 9], None, frozenset(), request_id="a")
    s(logits, [a])
    assert s.num_states == 1 and s._seen is not None and s._counts is not None
    s.release("a")
    assert s.num_states == 0 and s._seen is None and s._counts is None  # the pools go with the last state
    s.release("a")  # idempotent
    s.release("never-seen")
    # the id again, a new request with the same params object and equally long output: built afresh
    b = SamplingRow(p, [11], [12, 13], None, frozenset(), request_id="a")
    got = s.apply_penalties(logits, [b])
    assert torch.equal(bits(got), bits(old_apply_penalties(logits, [b])))
    assert got[0, 7] == logits[0, 7] and got[0, 11] == logits[0, 11] / 2


def test_stale_state_is_rebuilt_when_not_released():
    """A request id reused without release (an engine bug) still gets correct penalties: the state belongs
    to the output list object it was built for."""
    s = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)).abs() + 1
    s(logits, [SamplingRow(p, [1, 2], [3, 3], None, frozenset(), request_id="x")])
    again = SamplingRow(p, [4], [5, 6, 7], None, frozenset(), request_id="x")
    got = s.apply_penalties(logits, [again])
    assert torch.equal(bits(got), bits(old_apply_penalties(logits, [again])))
    assert s.num_states == 1
    shrunk = SamplingRow(p, again.prompt_token_ids, again.output_token_ids, None, frozenset(), request_id="x")
    del shrunk.output_token_ids[1:]  # (the same list, shorter: cannot happen in the engine; rebuilt anyway)
    got = s.apply_penalties(logits, [shrunk])
    assert torch.equal(bits(got), bits(old_apply_penalties(logits, [shrunk])))


def test_several_new_tokens_at_once_with_repeats():
    s = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.25, presence_penalty=0.5)
    out: list[int] = []
    row = SamplingRow(p, [9], out, None, frozenset(), request_id="r")
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 3
    for chunk in ([2], [2, 2, 2], [], [3, 2, 40, 40], [9], [0] * 17):
        out.extend(chunk)
        got = s.apply_penalties(logits, [row])
        assert torch.equal(bits(got), bits(old_apply_penalties(logits, [row])))
    assert got[0, 0] == (logits[0, 0] / 1.7 if logits[0, 0] > 0 else logits[0, 0] * 1.7) - 0.25 * 17 - 0.5
    assert not math.isnan(got.sum().item())


def test_a_pending_token_counts_once():
    """Async decode: each call's row has one token on the device not yet in its output list (`pending`); the
    penalties count it now and skip the list's copy of it when it arrives, so every call equals the stateless
    penalties over the list with the pending token appended (repeats, a drain with no pending token, and a call
    whose list did not grow: rebuilt)."""
    s = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.25, presence_penalty=0.5)
    out: list[int] = []
    row = SamplingRow(p, [9], out, None, frozenset(), request_id="r")
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 3
    plan = [(None, 2), (2, 2), (2, 7), (7, None), (None, 7), (7, 2), (2, 2), (None, 2)]  # (arrives, pending)
    for arrives, pend in plan:
        if arrives is not None:
            out.append(arrives)
        pending = None if pend is None else torch.tensor([pend])
        got = s.apply_penalties(logits, [row], pending)
        full = SamplingRow(p, [9], out + ([] if pend is None else [pend]), None, frozenset())
        assert torch.equal(bits(got), bits(old_apply_penalties(logits, [full]))), (arrives, pend, out)
