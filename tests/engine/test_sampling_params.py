import dataclasses

import pytest

from dsv4.engine.sampling_params import SamplingParams


def test_defaults_are_valid_and_follow_vllm():
    p = SamplingParams()
    p.validate()
    p.validate(vocab_size=10)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert (p.include_stop_str_in_output, p.ignore_eos, p.logprobs, p.prompt_logprobs) == (False, False, None, None)
    assert p.skip_special_tokens and p.detokenize
    assert not p.greedy


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams(temperature=2.0).greedy


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    p = dataclasses.replace(SamplingParams(stop="x", seed=3), n=1, seed=4)  # as LLM.generate expands n
    assert p.stop == ["x"] and p.seed == 4
    # defaults are not shared between instances
    a, b = SamplingParams(), SamplingParams()
    a.stop_token_ids.append(1)
    assert b.stop_token_ids == []


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=2.5), dict(top_p=1.0), dict(top_p=1e-3), dict(top_k=-1), dict(top_k=0),
    dict(top_k=50), dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=0.5), dict(frequency_penalty=-2),
    dict(frequency_penalty=2.0), dict(presence_penalty=-2.0), dict(presence_penalty=2), dict(max_tokens=None),
    dict(max_tokens=1), dict(min_tokens=5, max_tokens=5), dict(min_tokens=100, max_tokens=None),
    dict(logprobs=0), dict(logprobs=20), dict(prompt_logprobs=0), dict(prompt_logprobs=20), dict(n=3),
    dict(seed=0), dict(stop=["a", "bc"]), dict(stop_token_ids=[0, 9]),
])
def test_valid_values_pass(kwargs):
    SamplingParams(**kwargs).validate(vocab_size=10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-2), "top_k must be >= -1.*got -2"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0.1"),
    (dict(min_p=1.1), r"min_p must be in \[0, 1\], got 1.1"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0, got -1.0"),
    (dict(frequency_penalty=2.5), r"frequency_penalty must be in \[-2, 2\], got 2.5"),
    (dict(presence_penalty=-3), r"presence_penalty must be in \[-2, 2\], got -3"),
    (dict(max_tokens=0), "max_tokens must be >= 1.*got 0"),
    (dict(min_tokens=-1), "min_tokens must be >= 0, got -1"),
    (dict(min_tokens=17), r"min_tokens must be <= max_tokens \(16\), got 17"),
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(logprobs=21), "logprobs must be in 0..20.*got 21"),
    (dict(logprobs=-1), "logprobs must be in 0..20.*got -1"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in 0..20.*got 21"),
    (dict(stop=""), "stop must not hold an empty string"),
    (dict(stop=["ok", ""]), "stop must not hold an empty string"),
    (dict(stop=[3]), "stop must hold strings, got 3"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must lie in 0..9, got -1"),
    (dict(stop_token_ids=[5, 10]), "stop_token_ids must lie in 0..9, got 10"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
])
def test_invalid_values_raise_naming_field_and_value(kwargs, message):
    p = SamplingParams(**kwargs)  # constructing never validates; validate() does
    with pytest.raises(ValueError, match=message):
        p.validate(vocab_size=10)


def test_stop_token_ids_checked_against_vocab_only_when_given():
    p = SamplingParams(stop_token_ids=[100])
    p.validate()
    with pytest.raises(ValueError, match="stop_token_ids must lie in 0..99, got 100"):
        p.validate(vocab_size=100)
