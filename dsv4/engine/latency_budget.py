"""Decode-latency budget: how many prefill tokens may join a step that has decodes, chosen from measured
step times so that such a step takes at most `ratio` x a decode-only step (`--decode-latency-budget`).

Every decoding request waits for the whole step it is in, so a prefill chunk sharing the step adds its cost
to every running request's time between tokens. A fixed token cap (`prefill_tokens_with_decodes`) must be
tuned per GPU, model depth and context; this measures instead. The engine reports each step's composition
and duration (`observe`); the scheduler asks for the cap of the next step with decodes (`cap`):

- pure decode steps give the reference time, a running median per decode-count bucket (powers of two);
- mixed steps give the extra time of their prefill chunk, `duration - pure`, a running median per chunk
  bucket (powers of two from `min_tokens`);
- the cap is the largest bucket whose extra time fits `(ratio - 1) x pure`, walking up from `min_tokens`
  and stopping at the first bucket that does not fit. A bucket not yet measured is tried when 3/4 of the
  linear bound from the bucket below fits: a step's time is concave in its prefill tokens (the experts a
  chunk touches saturate), so extra(2c) <= 2 extra(c), and such a trial overshoots the allowance by at
  most a third. A bucket measured over budget, or above the cap and never measured, is tried once every
  `retry_every` mixed steps (step times move with context length and batch; a trial overshoots by at most
  2x the allowance, in under 1% of the steps so that a p99 does not see it).
- `min_tokens` is always allowed: prefill progresses whatever the budget (a budget that even the smallest
  chunk overshoots slows the prompts to that chunk size, and running decodes see that chunk's cost).

Medians of the last `window` samples, not means: one slow step (a first-time kernel compilation, a
collection pause) does not move the cap. The clock is the engine's `step()` wall time, what a user sees
between tokens; async decode steps (engine/async_decode.py) report the time between their results.
"""

from __future__ import annotations

import statistics
from collections import deque


PROBE_FRACTION = 0.75


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _Samples:
    """The last `window` samples of a bucket (never empty: made with its first) and the mixed step count at the
    last one."""
    __slots__ = ("values", "last_step")

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)
        self.last_step = 0

    def median(self) -> float:
        return statistics.median(self.values)


class DecodeLatencyBudget:
    @classmethod
    def for_config(cls, config) -> DecodeLatencyBudget | None:
        """The engine's budget: EngineConfig.decode_latency_budget over at most prefill_tokens_with_decodes (or the
        step budget) tokens; None when it is off."""
        if config.decode_latency_budget is None:
            return None
        return cls(config.decode_latency_budget, config.prefill_tokens_with_decodes or config.max_num_batched_tokens)

    def __init__(self, ratio: float, max_tokens: int, min_tokens: int = 16, window: int = 5,
                 retry_every: int = 256):
        if not ratio > 1.0:
            raise ValueError(f"decode latency budget must be > 1 (a multiple of a decode-only step), got {ratio!r}")
        if max_tokens < 1 or min_tokens < 1:
            raise ValueError(f"token bounds must be >= 1, got min {min_tokens}, max {max_tokens}")
        self.ratio = float(ratio)
        self.max_tokens = int(max_tokens)
        self.min_tokens = min(_pow2_at_least(min_tokens), self.max_tokens)
        self.window = window
        self.retry_every = retry_every
        self.pure: dict[int, _Samples] = {}  # decode-count bucket -> decode-only step seconds
        self.extra: dict[int, _Samples] = {}  # prefill-token bucket -> extra seconds over a pure step
        self.mixed_steps = 0

    # ---- the buckets ------------------------------------------------------------------------------
    def buckets(self) -> list[int]:
        """Chunk sizes the cap takes: powers of two from min_tokens, then max_tokens itself."""
        out, c = [], self.min_tokens
        while c < self.max_tokens:
            out.append(c)
            c *= 2
        out.append(self.max_tokens)
        return out

    def _chunk_bucket(self, tokens: int) -> int:
        for c in self.buckets():
            if tokens <= c:
                return c
        return self.max_tokens

    def _pure_s(self, decodes: int) -> float | None:
        """Median decode-only step time at this decode count's bucket, else at the nearest bucket measured."""
        if not self.pure:
            return None
        b = _pow2_at_least(decodes)
        if b in self.pure:
            return self.pure[b].median()
        near = min(self.pure, key=lambda k: (abs(k.bit_length() - b.bit_length()), k))
        return self.pure[near].median()

    # ---- what the engine reports --------------------------------------------------------------------
    def observe(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        """One engine step: `decodes` requests adding their next token(s), `prefill_tokens` prompt tokens,
        `seconds` of wall time. Steps without decodes tell nothing about the budget and are ignored."""
        if decodes <= 0 or seconds <= 0:
            return
        if prefill_tokens <= 0:
            s = self.pure.setdefault(_pow2_at_least(decodes), _Samples(self.window))
            s.values.append(seconds)
            return
        pure = self._pure_s(decodes)
        if pure is None:
            return
        self.mixed_steps += 1
        c = self._chunk_bucket(prefill_tokens)
        if c > self.min_tokens and 2 * prefill_tokens <= c:  # a prompt's short tail: says little about c
            return
        s = self.extra.setdefault(c, _Samples(self.window))
        if self.mixed_steps - s.last_step >= self.retry_every:
            s.values.clear()  # a retry of a stale bucket: conditions moved, its old samples go
        s.values.append(max(0.0, seconds - pure))
        s.last_step = self.mixed_steps

    # ---- what the scheduler asks --------------------------------------------------------------------
    def allowance_s(self, decodes: int) -> float | None:
        pure = self._pure_s(decodes)
        return None if pure is None else (self.ratio - 1.0) * pure

    def cap(self, decodes: int) -> int:
        """Prefill tokens the next step with `decodes` decoding requests may take (no side effects: a probe or a
        retry stays on offer until a step of that bucket is measured)."""
        allowed = self.allowance_s(decodes)
        if allowed is None:
            return self.min_tokens
        chosen = prev = self.min_tokens
        floor = self.extra.get(prev)
        if floor is not None and floor.median() > allowed:
            return chosen  # even the smallest chunk overshoots: nothing larger is tried
        for c in self.buckets()[1:]:
            s = self.extra.get(c)
            if s is not None:
                fits = s.median() <= allowed
            else:
                below = self.extra.get(prev)
                if below is None:
                    break  # nothing measured below: grow one bucket at a time
                # concave step cost: extra(c) <= extra(prev) * c / prev; try c when 3/4 of that bound fits
                fits = below.median() * PROBE_FRACTION * c / prev <= allowed
            if not fits:
                if self.mixed_steps - (0 if s is None else s.last_step) >= self.retry_every:  # over budget when measured, or never measured: tried once every retry_every steps
                    chosen = c
                break
            chosen = prev = c
        return chosen

    def describe(self) -> dict:
        return {"ratio": self.ratio, "min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
                "pure_ms": {b: s.median() * 1e3 for b, s in sorted(self.pure.items())},
                "extra_ms": {c: s.median() * 1e3 for c, s in sorted(self.extra.items())}}
