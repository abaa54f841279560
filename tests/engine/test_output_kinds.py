"""SamplingParams.output_kind: "delta" outputs carry only their new tokens / logprobs (no per-step copy
of everything so far) and concatenate to the cumulative result; "final_only" gives one output, equal to
the cumulative final one."""

import pytest

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


def run(lm, kind):
    eng = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=256,
                                 max_num_batched_tokens=4), lm=lm)  # chunked prefill: several steps per prompt
    p = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1, output_kind=kind)
    eng.add_request([0, 11, 12, 13, 14, 15], p, request_id="a")
    eng.add_request([0, 21, 22], p, request_id="b")
    outs = {"a": [], "b": []}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id].append(o)
    return outs


def test_delta_and_final_only_agree_with_cumulative(lm):
    cum, delta, final = run(lm, "cumulative"), run(lm, "delta"), run(lm, "final_only")
    for rid in ("a", "b"):
        ref = cum[rid][-1]
        c = ref.outputs[0]
        assert len(c.token_ids) == 9 and len(cum[rid]) == 9
        # delta: as many outputs, each with only its new tokens and logprobs; together the whole
        assert len(delta[rid]) == 9
        assert all(len(o.outputs[0].token_ids) == len(o.outputs[0].delta_token_ids) == 1 for o in delta[rid])
        assert [t for o in delta[rid] for t in o.outputs[0].token_ids] == c.token_ids
        got = [lp for o in delta[rid] for lp in o.outputs[0].logprobs]
        assert [(x.token_id, x.top) for x in got] == [(x.token_id, x.top) for x in c.logprobs]
        assert delta[rid][-1].outputs[0].text == c.text  # text stays cumulative
        assert "".join(o.outputs[0].delta_text for o in delta[rid]) == c.text
        assert delta[rid][0].prompt_logprobs == ref.prompt_logprobs  # with the first output
        assert delta[rid][-1].metrics.num_generated_tokens == 9
        # final_only: one output, the cumulative final one
        (f,) = final[rid]
        assert f.finished and f.outputs[0].token_ids == c.token_ids and f.outputs[0].text == c.text
        assert [x.token_id for x in f.outputs[0].logprobs] == [x.token_id for x in c.logprobs]
        assert f.prompt_logprobs == ref.prompt_logprobs
        assert f.outputs[0].delta_token_ids == c.token_ids


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="sometimes").validate()
