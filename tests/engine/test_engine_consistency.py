"""The engine's continuous batching gives every request exactly the greedy tokens the single-request
reference produces (fp32, plain numerics): many concurrent requests of different lengths, arriving at
different steps, with different per-step token budgets (chunk sizes), and with a cache small enough to
force preemptions (free and recompute). Also: abort at any moment frees everything."""

import random

import pytest
import torch

from dsv4.config import EngineConfig
from oracle import generate
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams

LENGTHS = [1, 5, 130, 300, 64, 257, 17, 200]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 129280, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(lm, prompts):
    return [generate(lm, [p], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).outputs[0].token_ids
            for p in prompts]


def engine(lm, **kw):
    cfg = EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=512, **kw)
    return LLMEngine(cfg, lm=lm)


def run_staggered(eng, prompts, rng, abort_ids=()):
    """Add the requests over the first steps in random order, step to completion; abort some midway."""
    order = list(range(len(prompts)))
    rng.shuffle(order)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final, steps = {}, 0
    while order or eng.has_unfinished_requests():
        for _ in range(rng.choice([0, 1, 1, 2])):
            if order:
                i = order.pop()
                eng.add_request(prompts[i], params, request_id=str(i))
        for out in eng.step():
            if out.finished:
                final[int(out.request_id)] = out
        steps += 1
        for rid in abort_ids:
            if steps == 3 + int(rid) and str(rid) in eng.requests:
                final[int(rid)] = eng.abort_request(str(rid))
        assert steps < 10_000, "engine did not finish"
    return final


@pytest.mark.parametrize("budget,with_decodes", [(7, None), (64, None), (1000, None), (64, 5), (1000, 1)])
def test_continuous_batching_matches_single_request(lm, prompts, reference, budget, with_decodes):
    eng = engine(lm, max_num_seqs=5, max_num_batched_tokens=budget, prefill_tokens_with_decodes=with_decodes)
    final = run_staggered(eng, prompts, random.Random(budget))
    for i, ref in enumerate(reference):
        assert final[i].outputs[0].token_ids == ref, f"request {i} (prompt {LENGTHS[i]} tokens)"
        assert final[i].outputs[0].finish_reason == "length"
    assert eng.kv.num_free_pages == eng.cache.num_pages and eng.kv.num_free_slots == eng.cache.num_slots


@pytest.mark.parametrize("with_decodes,async_scheduling", [(None, True), (40, True), (40, False)])
def test_preemption_recomputes_exactly(lm, prompts, reference, with_decodes, async_scheduling):
    layout = engine(lm, max_num_seqs=1).plan.layout
    # room for 4 slots but only 5 pages (1,280 tokens) for requests wanting up to 2 pages each
    budget = 4 * layout.slot_bytes + (5 + 1) * layout.page_bytes  # + the reserved null page
    eng = engine(lm, max_num_seqs=4, max_num_batched_tokens=48, kv_cache_memory=budget,
                 prefill_tokens_with_decodes=with_decodes, async_scheduling=async_scheduling)
    assert eng.plan.num_slots == 4 and eng.plan.num_pages == 5
    # (whether a preemption comes depends on the schedule; this arrival order preempts with and without async steps)
    final = run_staggered(eng, prompts, random.Random(1))
    assert sum(o.metrics.num_preemptions for o in final.values()) > 0, "the cache was not tight enough"
    for i, ref in enumerate(reference):
        assert final[i].outputs[0].token_ids == ref, f"request {i} after preemption"
    eng.kv.check()
    assert eng.kv.num_free_pages == eng.cache.num_pages and eng.kv.num_free_slots == eng.cache.num_slots


def test_abort_frees_everything(lm, prompts, reference):
    eng = engine(lm, max_num_seqs=3, max_num_batched_tokens=32)
    final = run_staggered(eng, prompts, random.Random(5), abort_ids=(2, 3, 6))
    for i, ref in enumerate(reference):
        o = final[i].outputs[0]
        if i in (2, 3, 6) and o.finish_reason == "abort":
            assert o.token_ids == ref[:len(o.token_ids)]
        else:
            assert o.token_ids == ref
    assert any(final[i].outputs[0].finish_reason == "abort" for i in (2, 3, 6))
    eng.kv.check()
    assert eng.kv.num_free_pages == eng.cache.num_pages and eng.kv.num_free_slots == eng.cache.num_slots
    assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting


def test_bad_requests_fail_alone(lm):
    eng = engine(lm, max_num_seqs=2)
    ok = eng.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 129280], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1] * 600, SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request([1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id=ok.request_id)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [o.outputs[0].finish_reason for o in outs if o.finished] == ["length"]
