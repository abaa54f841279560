"""A request's life in the engine: tokens, progress, cache holdings, sampling and output state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from dsv4.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"
    max_tokens: int  # resolved: params.max_tokens, capped by max_model_len
    eos_token_ids: frozenset
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    # progress
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # cache holdings (KVCacheManager)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    # outputs
    logprobs: list = field(default_factory=list)  # TokenLogprobs per generated token (if asked)
    prompt_logprobs: list = field(default_factory=list)  # None for position 0, then TokenLogprobs
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    detok: object | None = None
    stop_matcher: object | None = None
    # speculative decoding: drafts of the tokens after the last one, to verify in the next step (tokens
    # num_tokens .. num_tokens + len - 1 of token_slice); the drafter sets them, the scheduler trims them
    spec_ids: list[int] = field(default_factory=list)
    # the distribution each draft was drawn from (rows [>= len(spec_ids), V] float32, on the device) when the drafter
    # sampled them (engine/spec_decode.draft_choose); None: deterministic drafts (greedy, oracle), one-hot for
    # verification. Set with spec_ids (set_drafts); trimming spec_ids keeps the rows of the drafts left valid
    spec_q: object | None = None
    num_spec_steps: int = 0  # steps that verified drafts
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of which accepted
    # prefix caching (cache/prefix_cache.py): chain keys of its full pages (computed once), how many of its
    # pages the cache knows, boundaries where a step must end for a snapshot, prompt tokens it started with
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_pages: int = 0
    snapshot_points: list[int] = field(default_factory=list)
    decode_snapshot: bytes | None = None  # the key of its latest snapshot taken while decoding
    num_cached_tokens: int = 0
    # bookkeeping
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    emitted_tokens: int = 0  # what outputs have carried so far (outputs.shape_output)
    emitted_text: int = 0

    @property
    def stop_ids(self) -> frozenset:
        """EOS ids + params.stop_token_ids: what min_tokens suppresses (built once per request)."""
        s = self.__dict__.get("_stop_ids")
        if s is None:
            s = self.__dict__["_stop_ids"] = self.eos_token_ids | frozenset(self.params.stop_token_ids)
        return s

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def set_drafts(self, ids: list[int], q=None) -> None:
        """The drafts to verify next step and, when they were sampled, the rows of the distribution they were drawn
        from (spec_q); every writer of spec_ids goes through here so the two never disagree."""
        self.spec_ids = ids
        self.spec_q = q if ids else None

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens start .. end - 1 (past num_tokens: the drafts in spec_ids)."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        out = (self.prompt_token_ids[start:] if start < p else []) + self.output_token_ids[max(0, start - p):end - p]
        n = self.num_tokens
        if end > n:
            out += self.spec_ids[max(0, start - n):end - n]
        return out

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


def validate_request(prompt, params, tokenizer, vocab_size: int, max_model_len: int):
    """What every front door checks before a request reaches a scheduler (LLMEngine.make_request, the core
    process client): (params, prompt text or None, prompt ids). Raises ValueError naming what is wrong."""
    params = params or SamplingParams()
    params.validate(vocab_size)
    if params.n != 1:
        raise ValueError("the engine takes n=1 requests; LLM.generate and the server expand n > 1")
    if isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt)
    else:
        text, ids = None, [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {max_model_len} "
                         f"(prompt + at least one generated token)")
    return params, text, ids
