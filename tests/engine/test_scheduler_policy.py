"""The scheduler's step composition: decodes first, prefill tokens capped by the decode-latency budget
(`prefill_tokens_with_decodes`) only while something decodes, the whole budget otherwise."""

import pytest

from dsv4.config import ConfigError, EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


def engine(lm, **kw):
    cfg = EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=512,
                       max_num_seqs=8, **kw)
    return LLMEngine(cfg, lm=lm)


P = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, detokenize=False)


def composition(eng):
    """(decode request ids, {prefill request id: tokens}) of the next step, then run it."""
    so = eng.scheduler.schedule()
    dec = [r.request_id for r, n in so.scheduled if n == 1 and r.num_tokens - r.num_computed_tokens == 1]
    pre = {r.request_id: n for r, n in so.scheduled if not (n == 1 and r.num_tokens - r.num_computed_tokens == 1)}
    # run the step the scheduler chose (the engine's own step would schedule again)
    results = eng.runner.execute(so.scheduled)
    for (req, n), res in zip(so.scheduled, results):
        req.num_computed_tokens += n
        if res.token_id is not None:
            eng._append_token(req, res.token_id, res.logprobs)
    return dec, pre, so


def test_decodes_first_and_prefill_capped_while_decoding(lm):
    eng = engine(lm, max_num_batched_tokens=64, prefill_tokens_with_decodes=16)
    eng.add_request([0] + [5] * 20, P, request_id="a")
    eng.add_request([0] + [6] * 10, P, request_id="b")
    dec, pre, so = composition(eng)
    assert dec == [] and pre == {"a": 21, "b": 11}  # nothing decodes: the whole budget goes to prefill
    eng.add_request([0] + [7] * 100, P, request_id="long")  # arrives while a and b decode
    eng.add_request([0] + [8] * 30, P, request_id="next")
    for step in range(7):
        dec, pre, so = composition(eng)
        assert dec[:2] == ["a", "b"] and [r.request_id for r, _ in so.scheduled][:2] == ["a", "b"]  # decodes first
        # the decode-latency budget: 16 prefill tokens per step, 'long' first (FCFS), then 'next'
        assert pre == ({"long": 16} if step < 6 else {"long": 5, "next": 11}), (step, pre)
    assert eng.requests["long"].num_computed_tokens == 101


def test_no_cap_without_the_setting(lm):
    eng = engine(lm, max_num_batched_tokens=64)
    eng.add_request([0] + [5] * 4, P, request_id="a")
    composition(eng)
    eng.add_request([0] + [7] * 100, P, request_id="long")
    dec, pre, so = composition(eng)
    assert dec == ["a"] and pre == {"long": 63}  # decode first, then the rest of the step's budget


def test_config_rejects_bad_budget():
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="prefill_tokens_with_decodes"):
            EngineConfig(prefill_tokens_with_decodes=bad).validate()
        with pytest.raises(ConfigError, match="page_tokens"):
            EngineConfig(page_tokens=bad).validate()
