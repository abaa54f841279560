"""What the engine returns for a request, cumulatively and as the increment of the latest step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # TokenLogprobs per generated token, when asked
    finish_reason: str | None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_generated_tokens: int
    num_preemptions: int
    # speculative decoding: steps that verified drafts, drafts verified, drafts accepted
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # prefix caching: prompt tokens taken from the cache at the request's first admission (vLLM's name)
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache (vLLM's RequestOutput field)."""
        return self.metrics.num_cached_tokens


def finish_text(r, reason: str, stop_reason=None, at: float | None = None) -> None:
    """End request r's text and record why it ended. r is an engine Request or the core client's view of
    one: both carry detok, stop_matcher, text, finish_reason, stop_reason, finish_time. The held-back tail
    (a last partial character, text that might have begun a stop string) is released unless a stop string
    ended the request."""
    if r.stop_matcher is not None and not isinstance(stop_reason, str):
        tail, _ = r.stop_matcher.feed(r.detok.flush(), check_stop=False)
        r.text += tail + r.stop_matcher.flush()
    r.finish_reason, r.stop_reason = reason, stop_reason
    r.finish_time = at if at is not None else time.monotonic()


def shape_output(r) -> RequestOutput | None:
    """Request r's output now, shaped by r.params.output_kind ("cumulative", "delta", "final_only"; None: a
    final_only request that has not ended, whose next output then carries everything since the last one).
    r is an engine Request or the core client's view of one; this advances r.emitted_tokens / emitted_text,
    the marks that "delta" counts from."""
    p = r.params
    kind = p.output_kind
    finished = r.finished
    if kind == "final_only" and not finished:
        return None
    first = r.emitted_tokens == 0
    new_ids = r.output_token_ids[r.emitted_tokens:]
    new_text = r.text[r.emitted_text:]
    want_lps = p.logprobs is not None
    if kind == "delta":
        ids = new_ids
        lps = r.logprobs[r.emitted_tokens:] if want_lps else None
    else:
        ids = list(r.output_token_ids)
        lps = list(r.logprobs) if want_lps else None
    r.emitted_tokens, r.emitted_text = len(r.output_token_ids), len(r.text)
    plp = None
    if p.prompt_logprobs is not None and (kind != "delta" or first or finished):
        plp = list(r.prompt_logprobs)
    comp = CompletionOutput(index=0, text=r.text, token_ids=ids, logprobs=lps, finish_reason=r.finish_reason,
                            stop_reason=r.stop_reason, delta_text=new_text, delta_token_ids=new_ids)
    m = RequestMetrics(arrival_time=r.arrival_time, first_scheduled_time=r.first_scheduled_time,
                       first_token_time=r.first_token_time, finish_time=r.finish_time,
                       num_prompt_tokens=len(r.prompt_token_ids), num_generated_tokens=len(r.output_token_ids),
                       num_preemptions=r.num_preemptions, num_spec_steps=r.num_spec_steps,
                       num_draft_tokens=r.num_draft_tokens, num_accepted_tokens=r.num_accepted_tokens,
                       num_cached_tokens=r.num_cached_tokens)
    return RequestOutput(request_id=r.request_id, prompt=r.prompt, prompt_token_ids=r.prompt_token_ids,
                         prompt_logprobs=plp, outputs=[comp], finished=finished, metrics=m, error=r.error)
