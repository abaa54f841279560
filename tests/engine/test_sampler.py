import math
import random

import pytest
import torch

from dsv4.engine.sampler import (Sampler, SamplingRow, TokenLogprobs, apply_penalties, kept_set, make_generator,
                                 prompt_logprobs, truncate)
from dsv4.engine.sampling_params import SamplingParams

V = 64


def row(params=None, prompt=(), output=(), gen=None, stop_ids=()):
    return SamplingRow(params=params or SamplingParams(), prompt_token_ids=list(prompt),
                       output_token_ids=list(output), generator=gen, stop_ids=frozenset(stop_ids))


def rand_logits(b, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


# ---- references (plain Python, float64) -------------------------------------------------------------

def ref_kept(logits, temperature, top_k, top_p, min_p):
    """Token ids a sampled row may draw: top-k, then top-p over the renormalised top-k, then min-p."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    if 0 < top_k < len(z):
        order = order[:top_k]
    m = z[order[0]]
    w = [math.exp(z[i] - m) for i in order]
    total = sum(w)
    kept, mass = [], 0.0
    for i, wi in zip(order, w):
        if top_p < 1 and mass >= top_p:
            break
        kept.append(i)
        mass += wi / total
    return {i for i in kept if math.exp(z[i] - m) >= min_p}


def ref_logprobs(logits_row):
    """float64 log-softmax of one row of logits, in plain Python (max-shifted, math.fsum): shares no code with
    the sampler's torch.log_softmax."""
    xs = [float(x) for x in logits_row]
    m = max(xs)
    lse = m + math.log(math.fsum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def ref_probs(logits, kept, temperature):
    z = {i: logits[i] / temperature for i in kept}
    m = max(z.values())
    w = {i: math.exp(v - m) for i, v in z.items()}
    s = sum(w.values())
    return {i: x / s for i, x in w.items()}


def naive_penalties(logits, prompt, output, rep, freq, pres):
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


# ---- greedy ----------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = rand_logits(6)
    toks, lps = Sampler()(logits, [row(SamplingParams(temperature=0)) for _ in range(6)])
    assert toks == logits.argmax(dim=-1).tolist()
    assert lps == [None] * 6


def test_greedy_ignores_truncation_and_takes_lowest_id_on_ties():
    logits = torch.zeros(1, V)
    logits[0, [7, 3, 40]] = 5.0
    p = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9)
    assert Sampler()(logits, [row(p)])[0] == [3]


def test_top_logprobs_list_exact_ties_lowest_id_first():
    logits = torch.zeros(2, V)
    logits[:, [40, 7, 3, 55]] = torch.tensor([5.0, 5.0, 5.0, 6.0])
    for lp in prompt_logprobs(logits, [7, 55], 4):
        assert [t for t, _ in lp.top] == [55, 3, 7, 40]
    assert [lp.rank for lp in prompt_logprobs(logits, [7, 40], 1)] == [2, 2]  # tied tokens share a rank


# ---- seeded reproducibility -------------------------------------------------------------------------

TARGET = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)


def run_target(position, others, steps=8, seed=1234):
    """Sample `steps` tokens for the target row placed at `position` among other rows."""
    gen = make_generator(seed, "cpu")
    target_logits = rand_logits(steps, seed=99, scale=1.0)
    filler = rand_logits(steps * len(others) + 1, seed=5)
    torch.manual_seed(0)
    got = []
    for s in range(steps):
        rows = [row(p, gen=make_generator(sd, "cpu") if sd is not None else None) for p, sd in others]
        lg = list(filler[s * len(others):(s + 1) * len(others)])
        rows.insert(position, row(TARGET, gen=gen))
        lg.insert(position, target_logits[s])
        toks, _ = Sampler()(torch.stack(lg), rows)
        got.append(toks[position])
    return got


def test_seeded_row_is_independent_of_batch_composition_and_order():
    alone = run_target(0, [])
    mix = [(SamplingParams(temperature=0), None), (SamplingParams(temperature=1.3, min_p=0.1), None),
           (SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.2), 5), (SamplingParams(top_p=0.5), 77)]
    assert run_target(0, mix) == alone
    assert run_target(2, mix) == alone
    assert run_target(4, list(reversed(mix))) == alone
    assert run_target(1, mix[:1]) == alone
    assert len(set(alone)) > 1  # actually sampled, not a constant


def test_different_seeds_give_different_tokens():
    a = run_target(0, [], steps=12, seed=1)
    b = run_target(0, [], steps=12, seed=2)
    assert a != b
    assert run_target(0, [], steps=12, seed=1) == a


def test_exponential_race_uses_the_rows_generator():
    """token = argmax p_i / E_i, E drawn (V values, token order) from the row's generator."""
    logits = rand_logits(1, seed=3, scale=1.5)[0]
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=11)
    kept = ref_kept(logits.tolist(), 0.8, 20, 0.9, 0.05)
    probs = ref_probs(logits.tolist(), kept, 0.8)
    gen, ref_gen = make_generator(11, "cpu"), make_generator(11, "cpu")
    for _ in range(20):
        tok = Sampler()(logits[None], [row(p, gen=gen)])[0][0]
        e = torch.empty(V).exponential_(generator=ref_gen).tolist()
        assert tok == max(kept, key=lambda i: probs[i] / e[i])


def test_unseeded_rows_use_torch_default_generator():
    logits = rand_logits(3, seed=4, scale=0.5)
    torch.manual_seed(42)
    a = Sampler()(logits, [row() for _ in range(3)])[0]
    torch.manual_seed(42)
    b = Sampler()(logits, [row() for _ in range(3)])[0]
    draws = [Sampler()(logits, [row() for _ in range(3)])[0] for _ in range(5)]
    assert a == b
    assert any(d != a for d in draws)


def test_make_generator():
    assert make_generator(None, "cpu") is None
    g1, g2 = make_generator(7, "cpu"), make_generator(7, torch.device("cpu"))
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert not torch.equal(torch.rand(5, generator=make_generator(8, "cpu")), torch.rand(5, generator=g1))


# ---- truncation -------------------------------------------------------------------------------------

def test_kept_set_matches_reference():
    rng = random.Random(0)
    checked = 0
    for trial in range(300):
        logits = rand_logits(1, v=50, seed=trial, scale=rng.choice([0.5, 2.0, 5.0]))[0]
        t = rng.choice([0.3, 1.0, 1.7])
        k = rng.choice([0, -1, 1, 5, 20, 49, 50, 80])
        tp = rng.choice([1.0, 0.9, 0.5, 0.2, 1e-3, rng.random()])
        mp = rng.choice([0.0, 0.0, 0.05, 0.3, 1.0])
        lst = logits.tolist()
        # skip cases within float32 rounding of a top-p / min-p boundary
        z = sorted((x / t for x in lst), reverse=True)
        zk = z[:k] if 0 < k < 50 else z
        w = [math.exp(x - zk[0]) for x in zk]
        cum = [sum(w[:j]) / sum(w) for j in range(len(w))]
        if tp < 1 and min(abs(c - tp) for c in cum) < 1e-4:
            continue
        if mp > 0 and min(abs(x - mp) for x in w) < 1e-4 and mp < 1:
            continue
        p = SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp)
        assert kept_set(logits, p) == ref_kept(lst, t, k, tp, mp), (trial, t, k, tp, mp)
        checked += 1
    assert checked > 250


def test_truncate_is_per_row():
    z = rand_logits(4, v=30, seed=8)
    params = [(3, 1.0, 0.0), (0, 0.4, 0.0), (0, 1.0, 0.2), (10, 0.8, 0.01)]
    batch = truncate(z, [p[0] for p in params], [p[1] for p in params], [p[2] for p in params])
    for i, (k, tp, mp) in enumerate(params):
        one = truncate(z[i:i + 1], [k], [tp], [mp])[0]
        assert torch.equal(batch[i], one)
        kept = set(torch.nonzero(one > -math.inf).flatten().tolist())
        assert kept == ref_kept(z[i].tolist(), 1.0, k, tp, mp)
        assert torch.equal(one[list(kept)], z[i, list(kept)])  # kept logits are untouched
    assert (batch[0] > -math.inf).sum() == 3


def test_top_one_always_kept():
    z = torch.tensor([[0.0, 10.0, 9.99, 0.0]])
    assert set(torch.nonzero(truncate(z, [0], [1e-6], [1.0])[0] > -math.inf).flatten().tolist()) == {1}
    assert set(torch.nonzero(truncate(z, [1], [1.0], [0.0])[0] > -math.inf).flatten().tolist()) == {1}


PROBS = [0.25, 0.18, 0.14, 0.11, 0.09, 0.07, 0.06, 0.05, 0.03, 0.02]


@pytest.mark.parametrize("kw", [dict(), dict(top_k=4), dict(top_p=0.6), dict(min_p=0.3),
                                dict(top_k=7, top_p=0.8, min_p=0.15), dict(temperature=0.6, top_p=0.7),
                                dict(temperature=1.5, top_k=6)])
def test_sampled_support_and_frequencies_match_reference(kw):
    perm = torch.randperm(len(PROBS), generator=torch.Generator().manual_seed(1))  # not sorted by id
    logits = torch.log(torch.tensor(PROBS))[perm]
    p = SamplingParams(**kw)
    kept = ref_kept(logits.tolist(), p.temperature, p.top_k, p.top_p, p.min_p)
    probs = ref_probs(logits.tolist(), kept, p.temperature)
    n = 3000
    gen = make_generator(2024, "cpu")
    toks, _ = Sampler()(logits.expand(n, -1).contiguous(), [row(p, gen=gen) for _ in range(n)])
    assert set(toks) == kept
    for i in kept:
        assert abs(toks.count(i) / n - probs[i]) < 0.035, (i, toks.count(i) / n, probs[i])


# ---- penalties and min_tokens -----------------------------------------------------------------------

def test_penalties_match_naive_loop():
    rng = random.Random(3)
    logits = rand_logits(6, v=40, seed=6)
    rows = []
    for i in range(6):
        prompt = [rng.randrange(40) for _ in range(rng.randint(0, 12))]
        output = [rng.randrange(40) for _ in range(rng.randint(0, 15))]
        p = SamplingParams(repetition_penalty=[1.0, 1.3, 0.7, 2.0, 1.0, 1.1][i],
                           frequency_penalty=[0.0, 0.5, -0.4, 0.0, 1.5, 2.0][i],
                           presence_penalty=[0.0, 0.3, 0.0, -1.0, 0.0, 0.7][i])
        rows.append(row(p, prompt, output))
    got = apply_penalties(logits, rows)
    assert not torch.equal(got, logits)
    before = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        want = naive_penalties(logits[i].tolist(), r.prompt_token_ids, r.output_token_ids,
                               p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-6), i
    assert torch.equal(logits, before)  # input untouched
    # and the sampler acts on the penalised logits: greedy rows pick the naive argmax
    greedy_rows = [row(SamplingParams(temperature=0, repetition_penalty=r.params.repetition_penalty,
                                      frequency_penalty=r.params.frequency_penalty,
                                      presence_penalty=r.params.presence_penalty),
                       r.prompt_token_ids, r.output_token_ids) for r in rows]
    assert Sampler()(logits, greedy_rows)[0] == got.argmax(dim=-1).tolist()


def test_repetition_penalty_flips_greedy_choice_but_frequency_ignores_prompt():
    logits = torch.tensor([[4.0, 3.0, 1.0, -1.0]])
    s = Sampler()
    assert s(logits, [row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])])[0] == [1]
    assert s(logits, [row(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
                          prompt=[0, 0, 0])])[0] == [0]
    assert s(logits, [row(SamplingParams(temperature=0, frequency_penalty=0.6), output=[0, 0])])[0] == [1]
    assert s(logits, [row(SamplingParams(temperature=0, frequency_penalty=0.4), output=[0, 0])])[0] == [0]


def test_min_tokens_suppresses_stop_ids():
    logits = torch.zeros(4, V)
    logits[:, 1] = 30.0  # EOS overwhelmingly likely
    logits[:, 9] = 29.0  # a stop_token_id, next
    logits[:, 5] = 15.0  # the only likely token once the stop ids are masked
    stop = {1, 9}
    rows = [row(SamplingParams(temperature=0, min_tokens=3), output=[2, 2], stop_ids=stop),
            row(SamplingParams(temperature=0, min_tokens=3), output=[2, 2, 2], stop_ids=stop),
            row(SamplingParams(temperature=1.0, min_tokens=1, seed=0), gen=make_generator(0, "cpu"), stop_ids=stop),
            row(SamplingParams(temperature=0), stop_ids=stop)]
    toks, _ = Sampler()(logits, rows)
    assert toks == [5, 1, 5, 1]
    gen = make_generator(1, "cpu")
    many = Sampler()(logits[:1].expand(200, -1).contiguous(),
                     [row(SamplingParams(min_tokens=2), output=[3], gen=gen, stop_ids=stop) for _ in range(200)])[0]
    assert not set(many) & stop
    assert 5 in many


def test_row_with_nothing_left_raises():
    logits = torch.zeros(2, 4)
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(min_tokens=1), stop_ids={0, 1, 2, 3})]
    with pytest.raises(RuntimeError, match="row 1 has no finite logit"):
        Sampler()(logits, rows)
    bad = torch.zeros(1, 4)
    bad[0, 2] = float("nan")
    with pytest.raises(RuntimeError, match="row 0"):
        Sampler()(bad, [row(SamplingParams(temperature=0))])
    two = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, float("nan"), 9.0, 0.0]])  # a NaN beside larger values, sampled
    with pytest.raises(RuntimeError, match="row 1"):
        Sampler()(two, [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=1.0, seed=1),
                                                                gen=make_generator(1, "cpu"))])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="B = 2 rows"):
        Sampler()(torch.zeros(3, V), [row(), row()])


# ---- logprobs ---------------------------------------------------------------------------------------

def test_logprobs_are_raw_with_rank_and_ordered_top():
    logits = rand_logits(4, v=20, seed=12)
    params = [SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.8, frequency_penalty=2.0),
              SamplingParams(temperature=0.5, top_k=3, logprobs=20, seed=1),
              SamplingParams(temperature=1.0, logprobs=0, min_p=0.5),
              SamplingParams(temperature=1.0)]
    rows = [row(p, prompt=[0, 1, 2, 3], output=[int(logits[0].argmax())] * 3,
                gen=make_generator(p.seed, "cpu")) for p in params]
    toks, lps = Sampler()(logits, rows)
    raw = torch.tensor([ref_logprobs(r) for r in logits.tolist()], dtype=torch.float64)
    assert lps[3] is None
    for i in range(3):
        lp = lps[i]
        assert isinstance(lp, TokenLogprobs) and lp.token_id == toks[i]
        assert lp.logprob == pytest.approx(raw[i, toks[i]].item(), abs=1e-5)
        assert lp.rank == 1 + int((raw[i] > raw[i, toks[i]]).sum())
        n = params[i].logprobs
        assert len(lp.top) == n
        assert [t for t, _ in lp.top] == raw[i].argsort(descending=True)[:n].tolist()
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
        for t, v in lp.top:
            assert v == pytest.approx(raw[i, t].item(), abs=1e-5)
    # the penalties moved row 0 off the raw argmax: its logprob is raw, its rank > 1
    assert toks[0] != int(logits[0].argmax()) and lps[0].rank > 1
    assert lps[2].top == []
    assert sum(math.exp(v) for _, v in lps[1].top) == pytest.approx(1.0, abs=1e-5)  # all 20 = whole vocab


def test_rank_counts_only_strictly_more_likely_tokens():
    logits = torch.tensor([[2.0, 2.0, 1.0, 1.0, 0.0]])
    out = prompt_logprobs(logits.expand(4, -1), [0, 1, 3, 4], 2)
    assert [lp.rank for lp in out] == [1, 1, 3, 5]
    assert sorted(t for t, _ in out[0].top) == [0, 1]


def test_prompt_logprobs():
    logits = rand_logits(6, v=30, seed=21)
    nxt = [4, 0, 29, 7, 7, 13]
    out = prompt_logprobs(logits, nxt, 3)
    assert len(out) == 6
    for j, lp in enumerate(out):
        ref = ref_logprobs(logits[j].tolist())
        best = sorted(range(len(ref)), key=lambda t: -ref[t])
        assert lp.token_id == nxt[j]
        assert lp.logprob == pytest.approx(ref[nxt[j]], abs=1e-5)
        assert lp.rank == 1 + sum(v > ref[nxt[j]] for v in ref)
        assert [t for t, _ in lp.top] == best[:3]
        for t, v in lp.top:
            assert v == pytest.approx(ref[t], abs=1e-5), (j, t)
    # top-n over the whole vocabulary: every logprob, and together they are a distribution
    for j, lp in enumerate(prompt_logprobs(logits, nxt, 30)):
        ref = ref_logprobs(logits[j].tolist())
        assert sorted(t for t, _ in lp.top) == list(range(30))
        assert all(v == pytest.approx(ref[t], abs=1e-5) for t, v in lp.top)
        assert math.fsum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-5)
    assert [lp.top for lp in prompt_logprobs(logits, nxt, 0)] == [[]] * 6
    # rank 1 <=> the next token is the argmax
    am = logits.argmax(dim=-1).tolist()
    assert [lp.rank == 1 for lp in prompt_logprobs(logits, am, 1)] == [True] * 6
    assert prompt_logprobs(logits[:0], [], 2) == []
    with pytest.raises(ValueError, match="5 next tokens"):
        prompt_logprobs(logits, nxt[:5], 2)


def test_sampler_never_changes_its_input_logits():
    """Without penalties the sampler works on the logits as given (no copy), so nothing may write into them:
    min_tokens suppression works on a copy (the input, and the logprobs that read it, keep the raw values) and
    penalties too."""
    logits = rand_logits(3)
    logits[0, 5] = 50.0  # the stop id is row 0's argmax
    before = logits.clone()
    rows = [row(SamplingParams(temperature=0, min_tokens=4, logprobs=1), output=[1], stop_ids=[5]),
            row(SamplingParams(temperature=0)),
            row(SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=0), prompt=[2], output=[3])]
    raw = torch.log_softmax(before[0].float(), -1)
    for n in (2, 3):  # (a view of the first two rows: no penalty in the call; then all three)
        toks, lps = Sampler()(logits[:n], rows[:n])
        assert torch.equal(logits, before), n
        assert toks[0] != 5 and toks[1] == int(before[1].argmax())
        assert lps[0].top[0][0] == 5 and abs(lps[0].top[0][1] - float(raw[5])) < 1e-5  # raw logprobs: 5 on top


@pytest.mark.gpu
def test_sampler_waits_for_the_device_once_gpu():
    """On a CUDA device a sampler call over greedy, truncated, penalised, biased and min_tokens rows (logprobs
    off) has one synchronising operation: its read-back of the tokens. Index and parameter tensors go to the
    device without a sync (engine/to_device.py), so the host queues the sampling work behind the forward."""
    import warnings

    dev = torch.device("cuda")
    V = 32000
    logits = torch.randn(5, V, device=dev)
    p = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=1),
         SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3, seed=2),
         SamplingParams(temperature=0.9, logit_bias={5: 2.0}, seed=3), SamplingParams(temperature=0, min_tokens=4)]
    s = Sampler()
    rows = [SamplingRow(params=q, prompt_token_ids=[1, 2], output_token_ids=[3], generator=make_generator(q.seed, dev),
                        stop_ids=frozenset({7}), request_id=str(i)) for i, q in enumerate(p)]
    s(logits, rows)  # (builds the per-request states)
    for r in rows:
        r.output_token_ids.append(9)
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tokens, _ = s(logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert len(tokens) == 5 and tokens[4] != 7
