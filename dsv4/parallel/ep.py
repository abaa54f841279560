"""Expert parallelism with data-parallel attention.

Every rank holds the whole attention (and shared expert) and runs its OWN requests through it; the routed
experts are split across ranks by the one ExpertMap (`ExpertMap.contiguous(E, rank, world)`). In each MoE
layer the ranks exchange tokens:

  1. all-gather the token counts, then every rank's (x, expert ids, routing weights), padded to the
     largest count (padding rows carry routing weight 0 and expert 0: they add exactly zero);
  2. each rank runs its local experts over all ranks' tokens (`moe_experts` with its expert map; remote
     experts contribute zero);
  3. the per-rank partial sums are added and each rank keeps its own rows: reduce-scatter on backends that
     have it (NCCL), all-reduce + slice elsewhere (gloo, for the CPU).

The router runs before the exchange, on the rank's own tokens (hash routing needs its token ids). Ranks
must call every MoE layer in lockstep (a rank with no tokens still takes part, with a count of 0).

`step_tokens` (from the step's metadata, ForwardMeta.ep_tokens, when the runner already knows it): the
largest token count of any rank in this step. The engine's ranks agree on it once per step (parallel/step_sync.py), and decode graphs run one
agreed batch bucket on every rank; then the per-layer count exchange (a host sync in each of the 43 MoE
layers) is skipped, and a decode step can be captured in a device graph with its collectives.
Tokens / weights move as float32 / int64 so the exchange itself rounds nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from dsv4.ops.moe_dispatch import ExpertMap


class ExpertParallel:
    """The exchange of one process group (default: the world)."""

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallel needs torch.distributed to be initialised (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)

    def expert_map(self, num_experts: int) -> ExpertMap:
        """This rank's share of the routed experts (contiguous ranges, sizes differing by at most one)."""
        return ExpertMap.contiguous(num_experts, self.rank, self.world)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.cat(out)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               local_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
               step_tokens: int | None = None) -> torch.Tensor:
        """The routed-expert output [T, D] float32 of this rank's T tokens, summed over every rank's experts.
        `local_experts(x, ids, weights)` computes this rank's experts' contribution for any tokens;
        `step_tokens`: see the module docstring (None: exchange the counts here)."""
        T, D = x.shape
        if step_tokens is not None:
            tmax = step_tokens
            if T > tmax:
                raise RuntimeError(f"this rank has {T} tokens but the step was agreed at most {tmax}")
        else:
            n = torch.tensor([T], dtype=torch.int64, device=x.device)
            tmax = max(self._all_gather(n).tolist())  # host: the padded size sets the buffers' shapes
        k = ids.shape[1]
        if tmax == T:
            xp, ip, wp = x, ids.long(), weights.float()
        else:
            xp = torch.zeros(tmax, D, dtype=x.dtype, device=x.device)
            ip = torch.zeros(tmax, k, dtype=torch.int64, device=x.device)
            wp = torch.zeros(tmax, k, dtype=torch.float32, device=x.device)
            xp[:T], ip[:T], wp[:T] = x, ids, weights.float()
        xa, ia, wa = self._all_gather(xp), self._all_gather(ip), self._all_gather(wp)
        y = local_experts(xa, ia, wa).float()  # [world * tmax, D]: this rank's experts over every token
        if self.backend == "nccl":
            mine = torch.empty(tmax, D, dtype=torch.float32, device=x.device)
            dist.reduce_scatter_tensor(mine, y, group=self.group)
        else:
            dist.all_reduce(y, group=self.group)
            mine = y[self.rank * tmax:(self.rank + 1) * tmax]
        return mine[:T]
