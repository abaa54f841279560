"""logit_bias (OpenAI's parameter): added to the processed logits after the penalties, before
min_tokens masking and sampling; logprobs stay those of the raw model distribution."""

import pytest
import torch

from dsv4.engine.sampler import Sampler, SamplingRow, apply_penalties
from dsv4.engine.sampling_params import SamplingParams


def row(params, output=()):
    return SamplingRow(params=params, prompt_token_ids=[], output_token_ids=list(output), generator=None,
                       stop_ids=frozenset())


def test_bias_is_added_after_penalties_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 32, generator=g) * 3
    rows = [row(SamplingParams(logit_bias={3: 2.5, 7: -1.0})),
            row(SamplingParams(frequency_penalty=0.5, logit_bias={3: -4.0}), output=[3, 3]),
            row(SamplingParams())]
    got = apply_penalties(logits, rows)
    want = logits.clone().double()
    want[0, 3] += 2.5
    want[0, 7] -= 1.0
    want[1, 3] += -0.5 * 2 - 4.0
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_bias_forces_and_bans_in_greedy_and_sampled_rows():
    logits = torch.tensor([[5.0, 1.0, 0.0, -2.0]] * 4)
    s = Sampler()
    toks, lps = s(logits, [row(SamplingParams(temperature=0, logit_bias={3: 100}, logprobs=0)),
                           row(SamplingParams(temperature=0, logit_bias={0: -100})),
                           row(SamplingParams(temperature=1.0, seed=1, logit_bias={2: 100})),
                           row(SamplingParams(temperature=1.0, seed=1, logit_bias={0: -100, 1: -100, 2: -100}))])
    assert toks == [3, 1, 2, 3]
    assert lps[0].logprob == pytest.approx(torch.log_softmax(logits[0].double(), -1)[3].item(), abs=1e-6)  # raw


@pytest.mark.parametrize("bias,needle", [({-1: 1.0}, "token ids"), ({99: 1.0}, "token ids"), ({1: 100.5}, "[-100, 100]"),
                                         ({1: float("nan")}, "finite"), ([1], "map token ids")])
def test_bias_validation(bias, needle):
    with pytest.raises(ValueError, match=None) as e:
        SamplingParams(logit_bias=bias).validate(vocab_size=64)
    assert needle in str(e.value)
