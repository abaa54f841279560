"""Async decode: the engine launches decode step n + 1 before it reads step n's tokens back.

A pure decode step (every request adds one token) takes its input ids from the previous step's sampled
tokens where they still are, on the device; the host stages only what it already knows (slots, positions,
lengths, pages), launches the step (graph replay or eager forward, then sampling: `Sampler.draw` with the
read-back queued into a pinned buffer behind this step's work only), and only then reads step n's tokens and
does the output work for them (detokenising, stop checks, outputs). The device runs step n + 1 meanwhile
instead of waiting for the host between steps.

Between two engine steps, one step is in flight. A request's host-side token list is then one token behind
its cache: the KV manager's length counts the in-flight position, `req.num_computed_tokens` does not. That
agrees with everything the host does in between: the prefix cache commits the KV manager's length with the
token list it has (whose last token is the one being computed), an abort or finish releases a slot whose
pending writes are ordered before any later device work on the stream, and the in-flight row of a request
that stopped (EOS, stop string, abort) is dropped when read.

A step continues asynchronously only when nothing else needs the scheduler: no request waiting while a
sequence slot is free for it (a full engine keeps going; the waiting ones are admitted once a running request
finishes and the next step is scheduled as usual), every running request decoding in the step before
(`decodes_async`), and pages for one more token. Sampling counts each row's in-flight token where it matters
(`Sampler.draw(pending=)`: the penalty state on the device, min_tokens on the host), and logprobs are computed
with the token and read back with it. A request whose step-n token is its last by length is left out of step n
+ 1. Anything else drains: the in-flight step is read and the next engine step is scheduled as usual.
Speculative decoding and expert parallelism (lockstep steps) do not take this path.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.engine.request import Request
from dsv4.engine.sampler import DrawnTokens


@dataclass
class PendingDecode:
    """A decode step launched and not read back: its requests (in row order) and its drawn tokens."""
    reqs: list[Request]
    drawn: DrawnTokens


def decodes_async(req: Request) -> bool:
    """req's decode steps may run asynchronously: everything its sampling needs is on the device or known
    ahead (penalty state counts the in-flight token on the device, min_tokens counts it on the host, logprobs
    are computed with the token and read back with it). Requests asking for prompt logprobs keep synchronous
    steps, as decode graphs do."""
    return req.params.prompt_logprobs is None
