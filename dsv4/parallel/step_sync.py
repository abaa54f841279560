"""Lockstep of expert-parallel ranks: before every engine step, each rank states what its scheduler gave it
and all take the maximum (one all-reduce of four integers on the CPU control group):

- kind: NONE (no work anywhere: nobody runs the model), GRAPH (every rank with work has a pure decode step
  that fits a graph bucket), EAGER (anyone prefills, or needs prompt logprobs: everyone runs eagerly, since a
  graph replay and an eager step issue different collectives);
- batch and max_len: the decode graph bucket every rank replays (a rank with fewer sequences pads; a rank
  with none replays scratch rows only);
- tokens: the largest token count of any rank; the MoE exchange pads to it instead of exchanging counts
  in each layer (the runner puts it in the step's metadata, ForwardMeta.ep_tokens).

A rank with no work of its own still runs the step (a one-token forward on its scratch slot, or the
agreed graph over scratch rows): every MoE layer is a collective, and the others wait for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv4.engine.coordinator import StepPlan


class StepSync:
    """The engine's StepCoordinator (dsv4/engine/coordinator.py) for one rank of an expert-parallel group."""

    lockstep = True

    def __init__(self, group, expert_parallel):
        self.group = group  # a gloo group: the agreement is host data
        self.expert_parallel = expert_parallel

    def agree(self, kind: int, batch: int, max_len: int, tokens: int) -> StepPlan:
        t = torch.tensor([kind, batch, max_len, tokens], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return StepPlan(*t.tolist())

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())
