"""Speculative decoding (engine/spec_decode.py, cache/spec_state.py): greedy outputs with drafts are the
tokens of plain decoding, whatever the drafts and however many are rejected; rejected drafts leave no trace
in the window rings or the compressor accumulators (prompts cross the tiny model's CSA (4) and HCA (128)
boundaries and its 128-token window while drafting); rejection sampling keeps the target distribution.

Drafts come from OracleDrafter (the plain run's own tokens, each replaced by a wrong one with a chosen
probability) so that acceptance is controlled; the MTP drafter has its own tests below."""

import random

import pytest
import torch

from dsv4.cache.direct import DirectCache
from dsv4.cache.spec_state import StateSnapshot, rollback
from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.spec_decode import OracleDrafter
from dsv4.ops.registry import REFERENCE

LENGTHS = [1, 5, 122, 126, 60, 250, 17]
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 129280, (n,), generator=g).tolist() for n in LENGTHS]


def engine(lm, **kw):
    cfg = EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=512, **kw)
    return LLMEngine(cfg, lm=lm)


def run(eng, prompts, params, rng=None):
    """Requests arriving over the first steps; {index: output}."""
    order = list(range(len(prompts)))
    if rng is not None:
        rng.shuffle(order)
    final, steps = {}, 0
    while order or eng.has_unfinished_requests():
        for _ in range(rng.choice([0, 1, 2]) if rng is not None else len(order)):
            if order:
                i = order.pop()
                eng.add_request(prompts[i], params, request_id=str(i))
        for out in eng.step():
            if out.finished:
                final[int(out.request_id)] = out
        steps += 1
        assert steps < 5_000
    return final, steps


@pytest.fixture(scope="module")
def plain(lm, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, steps = run(engine(lm), prompts, params)
    return {i: o.outputs[0].token_ids for i, o in final.items()}, steps


@pytest.mark.parametrize("k,accept,budget", [(1, 1.0, 2048), (3, 1.0, 2048), (3, 0.0, 2048), (2, 0.5, 2048),
                                             (3, 0.6, 9), (4, 0.3, 64)])
def test_greedy_with_drafts_equals_plain(lm, prompts, plain, k, accept, budget):
    ref, plain_steps = plain
    eng = engine(lm, max_num_batched_tokens=budget)
    cont = {tuple(p): ref[i] for i, p in enumerate(prompts)}
    eng.runner.drafter = OracleDrafter(cont, k, accept, seed=k, vocab_size=lm.cfg.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, steps = run(eng, prompts, params, random.Random(k))
    for i in range(len(prompts)):
        assert final[i].outputs[0].token_ids == ref[i], f"prompt {i} (len {LENGTHS[i]}), k={k}, accept={accept}"
    st = eng.spec_stats
    assert st.drafted > 0
    if accept == 1.0:
        assert st.accepted == st.drafted
    if accept == 0.0:
        assert st.accepted == 0
    eng.kv.check()
    assert eng.kv.num_free_pages == eng.cache.num_pages


def test_full_acceptance_takes_fewer_steps(lm, prompts, plain):
    ref, _ = plain
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    counts = {}
    for accept in (0.0, 1.0):
        eng = engine(lm)
        eng.runner.drafter = OracleDrafter({tuple(prompts[2]): ref[2]}, 3, accept, vocab_size=lm.cfg.vocab_size)
        _, counts[accept] = run(eng, [prompts[2]], params)
    # one prefill step, then: no drafts accepted -> 1 token per step; all accepted -> 4 per step
    assert counts[0.0] == 1 + (MAX_TOKENS - 1)
    assert counts[1.0] == 1 + -(-(MAX_TOKENS - 1) // 4)


@pytest.mark.parametrize("start", [126, 127, 3, 128 + 2])
@pytest.mark.parametrize("keep", [1, 2, 4])
def test_rollback_restores_rings_and_compressors(lm, start, keep):
    """A verify chunk of 5 tokens at `start`, keeping `keep`, then 3 more tokens: the logits equal those of a
    cache that only ever saw the kept tokens (window ring, CSA/HCA accumulators, indexer)."""
    cfg = lm.cfg
    g = torch.Generator().manual_seed(start * 10 + keep)
    prompt = torch.randint(0, cfg.vocab_size, (start,), generator=g)
    chunk = torch.randint(0, cfg.vocab_size, (5,), generator=g)
    after = torch.randint(0, cfg.vocab_size, (3,), generator=g)
    outs = []
    for spec in (False, True):
        dc = DirectCache(cfg, 1, 512, "cpu", torch.float32)
        s = dc.add()
        lm.model(prompt, dc.meta([s], [0], [start]), dc.cache)
        if spec:
            meta = dc.meta([s], [start], [5])
            meta.redo = []
            snap = StateSnapshot(dc.cache.layers, [s], [start], [5])
            lm.model(chunk, meta, dc.cache)
            if keep < 5:
                dc.kv.truncate(s, start + keep)
                rollback(snap, meta, {0: keep})
        else:
            lm.model(chunk[:keep], dc.meta([s], [start], [keep]), dc.cache)
        X = lm.model(after, dc.meta([s], [start + keep], [3]), dc.cache)
        outs.append(lm.model.logits(X))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-5)


def test_rejection_sampling_keeps_the_target_distribution(lm):
    """The first emitted token of a sampled request whose draft is always the same token: its frequency
    over many seeds matches the target's probabilities (chi-square), whether the draft is likely or not."""
    from dsv4.engine.sampler import Sampler
    from dsv4.engine.spec_decode import verify
    from dsv4.engine.request import Request

    V = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 3)
    p = torch.softmax(logits[0] / 0.8, -1)
    for draft in (0, 3):
        counts = torch.zeros(V)
        n = 4000
        for seed in range(n):
            req = Request(request_id="r", prompt_token_ids=[0], params=SamplingParams(temperature=0.8, seed=seed),
                          max_tokens=10, eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(seed))
            toks, _ = verify(Sampler(), logits, req, [draft, 1])
            counts[toks[0]] += 1
        expected = p * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (draft, counts.tolist(), expected.tolist())  # 5 dof: p ~ 0.001


def _sampled_req(seed, temp=0.8):
    from dsv4.engine.request import Request
    return Request(request_id="r", prompt_token_ids=[0], params=SamplingParams(temperature=temp, seed=seed),
                   max_tokens=10, eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q_name", ["uniform", "unlikely", "equal", "missing"])
def test_speculative_sampling_with_sampled_drafts_keeps_the_target_distribution(q_name):
    """Drafts drawn from a drafter distribution q (spec_q rows, as MTPDrafter sets them for sampled requests):
    the first emitted token follows the target p (chi-square over seeds) whatever q is, including q mostly on
    an unlikely token and q missing tokens p has; a draft is accepted about sum_x min(p(x), q(x)) of the time
    (q = p: always)."""
    from dsv4.engine.sampler import Sampler
    from dsv4.engine.spec_decode import draft_choose, verify

    V = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 3)
    p = torch.softmax(logits[0] / 0.8, -1)
    q = {"uniform": torch.full((V,), 1.0 / V),
         "unlikely": torch.tensor([0.02, 0.02, 0.02, 0.02, 0.02, 0.9]),
         "equal": p.clone(),
         "missing": torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])}[q_name]
    qlog = q.log().expand(2, V)  # draft_choose at temperature 1 draws from softmax(log q) = q
    counts, accepted, n = torch.zeros(V), 0, 4000
    for seed in range(n):
        req = _sampled_req(seed)
        u = torch.rand(2, generator=req.generator)
        drafts = draft_choose(qlog, torch.ones(2), u).tolist()
        assert all(q[d] > 0 for d in drafts)
        req.set_drafts(drafts, q.expand(2, V).clone())
        toks, _ = verify(Sampler(), logits, req, drafts)
        counts[toks[0]] += 1
        accepted += toks[0] == drafts[0] and len(toks) > 1
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (q_name, counts.tolist(), expected.tolist())  # 5 dof: p ~ 0.001
    overlap = float(torch.minimum(p, q).sum())
    if q_name == "equal":
        assert accepted == n
    else:
        assert abs(accepted / n - overlap) < 4 * (overlap * (1 - overlap) / n) ** 0.5 + 1e-3, (accepted / n, overlap)


def test_sampled_drafts_are_accepted_more_than_greedy_drafts():
    """A flat target (temperature 1.5) and a drafter that knows it: drafts drawn from q = p are accepted every
    time, the drafter's greedy token (one-hot q) only p(argmax) of the time: the reason sampled requests
    draft by sampling."""
    from dsv4.engine.sampler import Sampler
    from dsv4.engine.spec_decode import draft_choose, draft_q, verify

    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.2, 0.0]] * 2)
    temp = torch.tensor([1.5])
    q = draft_q(logits[:1], temp)[0]
    n, acc_sampled, acc_greedy = 2000, 0, 0
    for seed in range(n):
        req = _sampled_req(seed, temp=1.5)
        d = int(draft_choose(logits[:1], temp, torch.rand(1, generator=req.generator))[0])
        req.set_drafts([d], q.unsqueeze(0).clone())
        acc_sampled += len(verify(Sampler(), logits, req, [d])[0]) == 2
        req = _sampled_req(seed, temp=1.5)
        req.set_drafts([0])
        acc_greedy += len(verify(Sampler(), logits, req, [0])[0]) == 2
    assert acc_sampled == n
    assert abs(acc_greedy / n - float(q[0])) < 0.05 and acc_greedy < 0.3 * n


def test_verified_rows_see_output_then_drafts_without_copying():
    """Each verified position's sampling row reads the output so far and the drafts before it (what penalties and
    min_tokens count), as one sequence over the request's own output list (no copy of a long output)."""
    from dsv4.engine.request import Request
    from dsv4.engine.spec_decode import _rows

    req = Request(request_id="r", prompt_token_ids=[0], params=SamplingParams(temperature=0), max_tokens=10,
                  eos_token_ids=frozenset(), generator=None)
    req.output_token_ids.extend([5, 6, 7])
    rows = _rows(req, [8, 9])
    want = [[5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8, 9]]
    for r, w in zip(rows, want):
        seq = r.output_token_ids
        assert len(seq) == len(w) and list(seq) == w and seq[1:] == w[1:] and seq[-1] == w[-1]
        assert [seq[i] for i in range(len(w))] == w and seq[len(w) - 2:len(w)] == w[-2:]
        with pytest.raises(IndexError):
            seq[len(w)]
    assert rows[2].output_token_ids.base is req.output_token_ids


def test_draft_choose():
    """Greedy rows take the argmax (whatever u); sampled rows draw from softmax(logits / temp) (chi-square),
    never a token of probability 0 (at u = 0 and as u -> 1 too)."""
    from dsv4.engine.spec_decode import draft_choose, draft_q

    g = torch.Generator().manual_seed(0)
    V = 7
    logits = torch.randn(V, generator=g)
    logits[0] = logits[5] = float("-inf")
    L = logits.expand(4000, V)
    assert (draft_choose(L, torch.zeros(4000), torch.rand(4000, generator=g)) == logits.argmax()).all()
    temp = torch.full((4000,), 0.7)
    got = draft_choose(L, temp, torch.rand(4000, generator=g))
    q = draft_q(logits.unsqueeze(0), temp[:1])[0]
    counts = torch.bincount(got, minlength=V).float()
    assert counts[0] == 0 and counts[5] == 0
    keep = q > 0
    chi2 = float(((counts[keep] - 4000 * q[keep]) ** 2 / (4000 * q[keep])).sum())
    assert chi2 < 20.5, (counts.tolist(), (4000 * q).tolist())  # 4 dof
    edge = draft_choose(logits.expand(3, V), torch.full((3,), 0.7), torch.tensor([0.0, 1.0 - 2 ** -24, 0.5]))
    assert all(q[t] > 0 for t in edge.tolist())


def test_mtp_drafter_samples_drafts_for_sampled_requests(lm, prompts):
    """A sampled request's MTP drafts come with their distribution rows (softmax of the draft logits at its
    temperature) and are tokens of nonzero probability under them; a greedy request's drafts come without.
    Seeded sampled runs with MTP drafts are reproducible."""
    eng = engine(lm, speculative_tokens=2)
    eng.add_request(prompts[1], SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True,
                                               detokenize=False), request_id="s")
    eng.add_request(prompts[2], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, detokenize=False),
                    request_id="g")
    eng.step()
    s, g = eng.requests["s"], eng.requests["g"]
    assert len(s.spec_ids) == 2 and s.spec_q is not None and tuple(s.spec_q.shape) == (2, lm.cfg.vocab_size)
    torch.testing.assert_close(s.spec_q.sum(-1), torch.ones(2))
    assert all(float(s.spec_q[j, d]) > 0 for j, d in enumerate(s.spec_ids))
    assert len(g.spec_ids) == 2 and g.spec_q is None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True, detokenize=False)
    got = []
    for _ in range(2):
        e = engine(lm, speculative_tokens=2)
        final, _ = run(e, prompts[:3], params)
        got.append([final[i].outputs[0].token_ids for i in range(3)])
        assert e.spec_stats.drafted > 0
    assert got[0] == got[1]


def test_seeded_sampling_with_drafts_is_reproducible(lm, prompts, plain):
    ref, _ = plain
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, ignore_eos=True, detokenize=False)
    got = []
    for _ in range(2):
        eng = engine(lm)
        eng.runner.drafter = OracleDrafter({tuple(p): ref[i] for i, p in enumerate(prompts)}, 2, 0.7,
                                           vocab_size=lm.cfg.vocab_size)
        final, _ = run(eng, prompts[:3], params)
        got.append([final[i].outputs[0].token_ids for i in range(3)])
    assert got[0] == got[1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_drafter_greedy_equals_plain(lm, prompts, plain, k):
    """The real drafter (the tiny checkpoint's MTP block): whatever it drafts, greedy outputs are the plain
    ones, with chunked prefill (small step budget) and requests arriving over time."""
    ref, _ = plain
    eng = engine(lm, speculative_tokens=k, max_num_batched_tokens=48)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, _ = run(eng, prompts, params, random.Random(10 + k))
    for i in range(len(prompts)):
        assert final[i].outputs[0].token_ids == ref[i], f"prompt {i}, k={k}"
    st = eng.spec_stats
    assert st.drafted > 0 and st.steps > 0
    m = final[2].metrics
    assert final[2].outputs[0].token_ids and m.num_generated_tokens == MAX_TOKENS
    eng.kv.check()


def test_mtp_drafts_follow_the_mtp_block(lm, prompts):
    """The first draft after a prompt is the MTP block's greedy token for (last prompt position, sampled
    token) computed directly on a fresh cache; the MTP ring rows the extra draft steps wrote are restored."""
    p = prompts[3]
    eng = engine(lm, speculative_tokens=3)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, detokenize=False)
    eng.add_request(p, params, request_id="a")
    ring_before = eng.cache.mtp_layers[0].window.clone()
    eng.step()  # prefill: samples the first token and drafts 3
    req = eng.requests["a"]
    first = req.output_token_ids[0]
    drafts = list(req.spec_ids)
    assert len(drafts) == 3
    dc = DirectCache(lm.cfg, 1, 512, "cpu", torch.float32, with_mtp=True)
    s = dc.add()
    X = lm.model(torch.tensor(p), dc.meta([s], [0], [len(p)]), dc.cache)
    from dsv4.ops.meta import ForwardMeta
    m = ForwardMeta.build([s], [0], [len(p)], block_table=dc.cache.block_table)
    Y = lm.model.mtp_forward(X, torch.tensor(p[1:] + [first]), m, dc.cache)
    # the reference linear would dequantise an FP8 head copy on every pass: the drafter keeps the exact head
    assert lm.ops.choices["linear"].provider == REFERENCE and lm.model.draft_head is None
    assert int(lm.model.mtp_draft_tokens(Y[-1:])) == drafts[0]
    # the engine's MTP ring holds exactly the prompt's positions (the draft steps' rows were put back)
    slot = req.slot
    W = ring_before.shape[1]
    got, want = eng.cache.mtp_layers[0].window[slot], dc.cache.mtp_layers[0].window[s]
    n = len(p)
    for q in range(max(0, n - W), n):
        torch.testing.assert_close(got[q % W], want[q % W])
    for q in range(n, min(n + W, W)):  # never written rows stay as they were
        torch.testing.assert_close(got[q % W], ring_before[slot, q % W])


def test_paused_speculation_equals_plain_and_resumes(lm, prompts, plain):
    """speculative_disable_by_batch_size = 2 with requests arriving over time: steps with more than two decoding
    requests draft nothing, the others draft; greedy outputs equal plain decoding."""
    ref, _ = plain
    eng = engine(lm, speculative_tokens=2, speculative_disable_by_batch_size=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, _ = run(eng, prompts, params, random.Random(4))
    for i in range(len(prompts)):
        assert final[i].outputs[0].token_ids == ref[i], f"prompt {i}"
    assert eng.runner.spec_paused_steps > 0 and eng.spec_stats.drafted > 0
    eng.kv.check()


def test_pause_batch_size_is_validated():
    from dsv4.config import ConfigError
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="speculative_disable_by_batch_size"):
            EngineConfig(speculative_disable_by_batch_size=bad).validate()
    EngineConfig(speculative_disable_by_batch_size=0).validate()


@torch.no_grad()
def test_paused_steps_still_fill_the_mtp_ring(lm, prompts):
    """Every step paused (speculative_disable_by_batch_size = 0): no drafts, but the MTP block's window ring holds
    every position so far, as one MTP pass over the whole sequence writes it (drafts resume at full quality)."""
    p = prompts[1]
    eng = engine(lm, speculative_tokens=2, speculative_disable_by_batch_size=0)
    eng.add_request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, detokenize=False),
                    request_id="a")
    for _ in range(6):
        eng.step()
    req = eng.requests["a"]
    assert not req.spec_ids and eng.spec_stats.drafted == 0 and eng.runner.spec_paused_steps == 6
    toks = req.all_token_ids  # P + 6 tokens: the ring holds positions 0 .. P + 4
    n = len(toks) - 1
    dc = DirectCache(lm.cfg, 1, 512, "cpu", torch.float32, with_mtp=True)
    s = dc.add()
    X = lm.model(torch.tensor(toks[:n]), dc.meta([s], [0], [n]), dc.cache)
    from dsv4.ops.meta import ForwardMeta
    m = ForwardMeta.build([s], [0], [n], block_table=dc.cache.block_table)
    lm.model.mtp_forward(X, torch.tensor(toks[1:]), m, dc.cache)
    got, want = eng.cache.mtp_layers[0].window[req.slot], dc.cache.mtp_layers[0].window[s]
    W = got.shape[0]
    assert n <= W
    torch.testing.assert_close(got[:n], want[:n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drafter", ["mtp", "oracle"])
def test_preemption_with_drafts(lm, prompts, plain, drafter):
    """A cache too small for everyone: requests with drafts in flight are preempted and recomputed (their
    drafts dropped), and the greedy outputs still equal plain decoding."""
    ref, _ = plain
    kw = dict(speculative_tokens=3) if drafter == "mtp" else {}
    layout = engine(lm, max_num_seqs=1, **kw).plan.layout
    budget = 4 * layout.slot_bytes + (2 + 1) * layout.page_bytes  # 4 slots, 2 pages (+ the null page)
    eng = engine(lm, max_num_seqs=4, max_num_batched_tokens=48, kv_cache_memory=budget, **kw)
    assert eng.plan.num_slots == 4 and eng.plan.num_pages == 2
    if drafter == "oracle":
        eng.runner.drafter = OracleDrafter({tuple(p): ref[i] for i, p in enumerate(prompts)}, 3, 0.5,
                                           vocab_size=lm.cfg.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, _ = run(eng, prompts, params, random.Random(3))
    assert sum(o.metrics.num_preemptions for o in final.values()) > 0, "the cache was not tight enough"
    for i in range(len(prompts)):
        assert final[i].outputs[0].token_ids == ref[i], f"prompt {i} after preemption ({drafter})"
    assert eng.spec_stats.drafted > 0
    eng.kv.check()
    assert eng.kv.num_free_pages == eng.cache.num_pages and eng.kv.num_free_slots == eng.cache.num_slots


def test_penalties_logprobs_min_tokens_and_stop_ids_with_drafts(lm, prompts):
    """Per-position sampling state under verification: repetition / frequency / presence penalties over the
    output so far (drafts included), logprobs of every emitted token, min_tokens suppressing the stop ids,
    and a stop token id met inside a run of accepted drafts (the tokens after it are dropped)."""
    base = dict(max_tokens=MAX_TOKENS, temperature=0, detokenize=False, logprobs=2, repetition_penalty=1.3,
                frequency_penalty=0.4, presence_penalty=0.2)
    ps = prompts[:5]
    plain_eng = engine(lm)
    first, _ = run(plain_eng, ps, SamplingParams(ignore_eos=True, **base))
    # stop on each request's 6th plain token, but not before 4 tokens (min_tokens)
    stop = sorted({first[i].outputs[0].token_ids[5] for i in range(len(ps))})
    params = SamplingParams(stop_token_ids=stop, min_tokens=4, ignore_eos=True, **base)
    want, _ = run(engine(lm), ps, params)
    eng = engine(lm)
    cont = {tuple(p): want[i].outputs[0].token_ids for i, p in enumerate(ps)}
    eng.runner.drafter = OracleDrafter(cont, 3, 0.8, seed=1, vocab_size=lm.cfg.vocab_size)
    got, _ = run(eng, ps, params)
    assert eng.spec_stats.accepted > 0
    for i in range(len(ps)):
        a, b = got[i].outputs[0], want[i].outputs[0]
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason
        assert [x.token_id for x in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4 and x.rank == y.rank


@pytest.mark.parametrize("accept", [1.0, 0.6])
def test_oracle_recording_reaches_the_replays_own_path(accept):
    """bench.latency.install_oracle: when a token's logits depend on its slot in the verify chunk (bf16
    reduction orders on a GPU; here a bias on rows after the first), a continuation recorded with failing
    drafts is not what the replay emits; the recording is replayed until it is, and then every kept draft
    is accepted. One recording round (no fixed point) must fall short."""
    from dsv4.bench.latency import dsv4_rows, install_oracle
    from dsv4.engine.llm import LLM

    llm = LLM("tiny", device="cpu", dtype="float32", numerics="plain", speculative_tokens=2)
    model = llm.engine.lm.model
    plain_logits = model.logits

    def slot_dependent(X):
        out = plain_logits(X).clone()
        r = torch.arange(1, out.shape[0])
        out[r, (7 * r + 3) % out.shape[1]] += 50.0  # rows after the first of the selection pick other tokens
        return out

    model.logits = slot_dependent
    B, n_in, n_out = 2, 6, 9
    once = install_oracle(llm, B, n_in, n_out, 0, 2, 1.0, max_rounds=0)
    assert once == {"rounds": 0, "converged": False, "mtp_passes": True}
    row = dsv4_rows(llm, [B], n_in, n_out, progress=False)
    assert row[0]["mean_accepted_length"] < 1.5  # the first recording is off the replay's path
    row = dsv4_rows(llm, [B], n_in, n_out, progress=False, draft_oracle=accept)[0]
    assert row["oracle_converged"] and row["oracle_rounds"] >= 2
    st = llm.engine.spec_stats
    if accept == 1.0:
        assert row["acceptance_rate"] == 1 and row["mean_accepted_length"] == pytest.approx(8 / 3)
    else:
        assert 0.3 < row["acceptance_rate"] < 0.9
    assert st.drafted > 0
    # the defining property: a replay emits exactly the recording
    from dsv4.bench.throughput import bench_prompts
    from dsv4.engine.sampling_params import SamplingParams as SP

    prompts = bench_prompts(llm.engine.cfg.vocab_size, B, n_in, 0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SP(max_tokens=n_out, ignore_eos=True, temperature=0, detokenize=False), use_tqdm=False)
    cont = llm.engine.runner.drafter.cont
    assert [list(o.outputs[0].token_ids) for o in outs] == [cont[tuple(p)] for p in prompts]


def test_oracle_keeps_the_mtp_passes_running():
    """Under the draft oracle the MTP drafter's passes still run every step (a measured step costs what a real
    speculative step costs), and the oracle's tokens replace its drafts (p = 1: every draft accepted)."""
    from dsv4.bench.latency import dsv4_rows
    from dsv4.engine.llm import LLM
    from dsv4.engine.spec_decode import MTPDrafter

    llm = LLM("tiny", device="cpu", dtype="float32", numerics="plain", speculative_tokens=2)
    assert isinstance(llm.engine.runner.drafter, MTPDrafter)
    model = llm.engine.lm.model
    calls = []
    real = model.mtp_forward
    model.mtp_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    row = dsv4_rows(llm, [2], 6, 9, progress=False, draft_oracle=1.0)[0]
    assert row["oracle_over_mtp_passes"] and row["acceptance_rate"] == 1
    n0 = len(calls)
    assert n0 > 0
    row = dsv4_rows(llm, [2], 6, 9, progress=False)[0]  # the installed oracle, measured again
    assert len(calls) > n0 and row["acceptance_rate"] == 1


def test_sampled_verification_in_one_batch_equals_each_alone():
    """Sampled requests verified together (one pass, one read-back) emit what each emits verified alone from the
    same generator state: a request's draws depend on its own generator only. Covers one-hot and drafter q rows,
    different temperatures, top-k, draft counts and a request asking for logprobs (returned for each token)."""
    from dsv4.engine.sampler import Sampler
    from dsv4.engine.spec_decode import verify, verify_all
    from dsv4.engine.request import Request

    V = 7
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        specs = [dict(temperature=0.7, seed=100 + trial), dict(temperature=1.3, top_k=3, seed=200 + trial),
                 dict(temperature=1.0, seed=300 + trial, logprobs=2)]
        items = []
        for i, sp in enumerate(specs):
            k = (1, 3, 2)[i]
            req = Request(request_id=f"r{i}", prompt_token_ids=[0], params=SamplingParams(**sp), max_tokens=10,
                          eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(sp["seed"]))
            logits = torch.randn(k + 1, V, generator=g) * 2
            drafts = torch.randint(0, V, (k,), generator=g).tolist()
            q = torch.softmax(torch.randn(k, V, generator=g), -1) if i != 1 else None
            req.set_drafts(drafts, q)
            items.append((req, logits, drafts))
        together = verify_all(Sampler(), items)
        for (req, logits, drafts), (toks, lps) in zip(items, together):
            req.generator.manual_seed(req.params.seed)
            alone = verify(Sampler(), logits, req, drafts)
            assert toks == alone[0] and 1 <= len(toks) <= len(drafts) + 1
            assert toks[:-1] == drafts[:len(toks) - 1]
            if req.params.logprobs is not None:
                assert len(lps) == len(toks) and all(lp is not None for lp in lps)
            else:
                assert lps == [None] * len(toks)


def test_sampled_verification_refuses_a_row_without_finite_logits():
    """A sampled request's verified row with no finite logit raises by name (the draw never sees NaN)."""
    from dsv4.engine.sampler import Sampler
    from dsv4.engine.spec_decode import verify

    req = _sampled_req(1)
    logits = torch.randn(2, 6)
    logits[1] = float("nan")
    req.set_drafts([2])
    with pytest.raises(RuntimeError, match="row 1 has no finite logit"):
        verify(Sampler(), logits, req, [2])


def test_plain_argmax_names_what_device_acceptance_may_decide():
    """Device-side acceptance (verify graph steps) only for requests whose verified tokens are the argmax of the
    logits as they are: each of sampling, a penalty, logit_bias, logprobs, min_tokens not yet reached and too few
    drafts sends the step to the sampler's path."""
    from dsv4.engine.request import Request
    from dsv4.engine.spec_decode import plain_argmax

    def req(out=3, drafts=2, **kw):
        r = Request(request_id="r", prompt_token_ids=[0], params=SamplingParams(**{"temperature": 0, **kw}),
                    max_tokens=10, eos_token_ids=frozenset(), generator=None)
        r.output_token_ids.extend(range(out))
        r.set_drafts(list(range(drafts)))
        return r

    assert plain_argmax(req(), 2) and plain_argmax(req(min_tokens=3), 2)
    for bad in (req(temperature=0.7), req(repetition_penalty=1.1), req(frequency_penalty=0.2),
                req(presence_penalty=0.1), req(logit_bias={5: 1.0}), req(logprobs=0), req(min_tokens=4),
                req(drafts=1)):
        assert not plain_argmax(bad, 2)
