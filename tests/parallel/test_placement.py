"""Placement of new requests over expert-parallel ranks (DPEngine, host logic only: no process group is
touched before a step): by the tokens each rank holds at peak, not by request count."""

from __future__ import annotations

from types import SimpleNamespace

from dsv4.engine.llm_engine import LLMEngine
from dsv4.config import EngineConfig
from dsv4.engine.sampling_params import SamplingParams
from dsv4.parallel.dp_engine import DPEngine


def test_a_rank_with_more_tokens_gets_fewer_new_requests(lm):
    local = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                   max_model_len=512), lm=lm)
    eng = DPEngine(local, SimpleNamespace(spec=SimpleNamespace(world=2)))
    try:
        eng.add_request(list(range(1, 201)), SamplingParams(max_tokens=50), request_id="long")  # 250 tokens
        short = [eng.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=5), request_id=f"s{i}") for i in range(6)]
        owners = [eng._owner[r.request_id] for r in short]
        assert eng._owner["long"] == 0
        assert owners == [1] * 6  # 6 x 10 tokens < 250: a count-based placement would have alternated
        assert eng._tokens == [250, 60] and eng._count == [1, 6]
        eng._forget("long")  # the long one finished: rank 0 is the lighter one again
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=7), request_id="next")
        assert eng._owner["next"] == 0 and eng._tokens == [10, 60]
        eng._forget("s0")
        assert eng._tokens == [10, 50] and eng._count == [1, 5]
    finally:
        eng._closed = True  # (no ranks to stop)


def test_prefix_cache_affinity(lm):
    """With prefix caching, a request goes to the rank that was given its prefix unless another rank is lighter
    by more than the prefix's tokens."""
    local = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                   max_model_len=2048, enable_prefix_caching=True), lm=lm)
    eng = DPEngine(local, SimpleNamespace(spec=SimpleNamespace(world=2)))
    try:
        system = list(range(1, 601))  # 600 tokens: pages 0-1 full
        p = SamplingParams(max_tokens=10)
        eng.add_request(system + [7], p, request_id="a")  # -> rank 0 (both empty)
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=100), request_id="b")  # -> rank 1 (lighter)
        assert [eng._owner[r] for r in "ab"] == [0, 1] and eng._tokens == [611, 103]
        # rank 0 holds 508 more tokens, but 512 of this prompt's: it goes there
        eng.add_request(system + [8, 9], p, request_id="c")
        assert eng._owner["c"] == 0
        # without the shared prefix it would have gone to the lighter rank
        eng.add_request(list(range(2000, 2602)), p, request_id="d")
        assert eng._owner["d"] == 1
        # a prefix whose rank is far heavier than the prefix is worth: the lighter rank
        eng.add_request(list(range(3000, 3300)), SamplingParams(max_tokens=1000), request_id="e")  # -> rank 1
        assert eng._tokens[0] - eng._tokens[1] < 512
        heavy = eng._owner["e"]
        eng.add_request(list(range(3000, 3300)) + [5], p, request_id="f")  # shares 256 tokens with "e"
        assert eng._owner["f"] == 1 - heavy
    finally:
        eng._closed = True  # (no ranks to stop)
