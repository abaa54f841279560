"""What the engine needs from the other ranks of a multi-rank (expert-parallel) setup, defined here so
that the engine never imports dsv4.parallel: parallel/ implements `StepCoordinator` (parallel/step_sync.py)
and depends on engine/, never the reverse.

One engine step on one rank: the scheduler picks this rank's work, then the runner asks the coordinator
to `agree` on the step with every other rank (kind, graph bucket, largest token count), and runs that.
`SingleRank` is the coordinator of a lone engine: the agreement is the engine's own plan, and a step with
nothing scheduled runs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

NONE, GRAPH, EAGER = 0, 1, 2  # step kinds, ordered: the agreement is the maximum over ranks


@dataclass(frozen=True)
class StepPlan:
    kind: int  # NONE: nobody runs the model; GRAPH: every rank replays decode graph bucket (batch, max_len)
    batch: int  # sequences (the largest of any rank)
    max_len: int  # longest sequence after the step (of any rank)
    tokens: int  # the largest token count of any rank (the MoE exchange pads to it)


class StepCoordinator(Protocol):
    lockstep: bool  # True: every step is collective; a rank with nothing scheduled still runs one
    expert_parallel: object | None  # handed to the model builder (the MoE token exchange), or None

    def agree(self, kind: int, batch: int, max_len: int, tokens: int) -> StepPlan:
        """Every rank's plan for this step, combined (a collective in lockstep)."""

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` of any rank (the cache budget: every rank gets the same plan)."""


class SingleRank:
    """The coordinator of an engine that is the only rank."""

    lockstep = False
    expert_parallel = None

    def agree(self, kind: int, batch: int, max_len: int, tokens: int) -> StepPlan:
        return StepPlan(kind, batch, max_len, tokens)

    def min_over_ranks(self, value: int) -> int:
        return value
