"""Per-request sampling parameters, with vLLM / OpenAI semantics.

Constructing a `SamplingParams` only normalises (`stop` becomes a list of strings, `stop_token_ids` a
list); `validate()` checks every field and raises ValueError naming the field and the bad value. The
engine calls `validate(vocab_size)` when a request is added.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

# Temperatures below this act as 0 (greedy): dividing logits by a near-zero temperature overflows.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the largest probability
    seed: int | None = None  # per-request generator: the same seed gives the same tokens in any batch
    repetition_penalty: float = 1.0  # over prompt + output tokens: positive logits / p, negative x p
    frequency_penalty: float = 0.0  # subtracted x (count of the token in the output)
    presence_penalty: float = 0.0  # subtracted once for every token present in the output
    max_tokens: int | None = 16  # None = until the model's length limit
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens are out
    stop: str | list[str] | None = None  # stop strings (normalised to a list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI: -100..100)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per generated token; 0 = the chosen token only
    prompt_logprobs: int | None = None  # the same for prompt tokens
    skip_special_tokens: bool = True
    detokenize: bool = True
    # what each output carries: "cumulative" (every output: all tokens / logprobs so far), "delta" (each
    # output: only its new tokens / logprobs, so a long stream costs O(n) in all, not O(n^2); text stays
    # cumulative), "final_only" (one output, when the request ends, with everything)
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError (naming the field and the bad value) if any field is out of range; with
        `vocab_size`, stop_token_ids must also lie in 0..vocab_size-1."""
        _int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        _real("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1 = off), got {self.top_k}")
        _real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _int("seed", self.seed)
        _real("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _real(name, v)
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _int(name, v)
                if not 0 <= v <= MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS} (or None), got {v}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")
        if not isinstance(self.stop, list):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must hold strings, got {s!r}")
            if not s:
                raise ValueError("stop must not hold an empty string, got ''")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for t, b in self.logit_bias.items():
                _int("logit_bias token id", t)
                if t < 0 or (vocab_size is not None and t >= vocab_size):
                    hi = "" if vocab_size is None else f"..{vocab_size - 1}"
                    raise ValueError(f"logit_bias token ids must lie in 0{hi}, got {t}")
                _real(f"logit_bias[{t}]", b)
                if not -100 <= b <= 100:
                    raise ValueError(f"logit_bias values must lie in [-100, 100], got {b} for token {t}")
        if not isinstance(self.stop_token_ids, list):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t)
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                hi = "" if vocab_size is None else f"..{vocab_size - 1}"
                raise ValueError(f"stop_token_ids must lie in 0{hi}, got {t}")


def _int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {v!r}")


def _real(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
