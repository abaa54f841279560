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

With `exchange="alltoall"` an eager step instead sends each token once to every rank holding one of its
top-k experts (counts first, then exact-size all_to_all of x / ids / weights, the partial outputs back and
summed per token); fewer rows move and are computed when ranks are many, at one host sync per layer.

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


EXCHANGES = ("allgather", "alltoall")


class ExpertParallel:
    """The exchange of one process group (default: the world). `exchange` (eager steps; a decode graph being
    captured always all-gathers: its shapes must not depend on the routing):
    "allgather" (every token to every rank, padded to the step's largest count) or "alltoall" (each token
    only to the ranks holding one of its experts, exact sizes; a host sync on the counts per MoE layer)."""

    def __init__(self, group=None, exchange: str = "allgather"):
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallel needs torch.distributed to be initialised (init_process_group)")
        if exchange not in EXCHANGES:
            raise ValueError(f"expert-parallel exchange must be one of {EXCHANGES}, got {exchange!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.exchange = exchange
        self._owner: dict[tuple[int, torch.device], torch.Tensor] = {}  # (E, device) -> rank of each expert

    def expert_map(self, num_experts: int) -> ExpertMap:
        """This rank's share of the routed experts (contiguous ranges, sizes differing by at most one)."""
        self._num_experts = num_experts  # (the all-to-all exchange routes by the same split)
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
        if self.exchange == "alltoall" and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.routed_all_to_all(x, ids, weights, local_experts)
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

    def owners(self, num_experts: int, device: torch.device) -> torch.Tensor:
        """[E] int64: the rank holding each routed expert (the contiguous split of `expert_map`)."""
        key = (num_experts, device)
        if key not in self._owner:
            own = torch.empty(num_experts, dtype=torch.int64)
            for r in range(self.world):
                own[list(ExpertMap.contiguous(num_experts, r, self.world).local_ids)] = r
            self._owner[key] = own.to(device)
        return self._owner[key]

    def routed_all_to_all(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                          local_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                          num_experts: int | None = None) -> torch.Tensor:
        """As `routed`, with each token sent only to the ranks that hold one of its top-k experts (once per
        rank, whatever its number of experts there), exact sizes (no padding): counts by all_to_all (host
        sync), then x / ids / weights there and the partial outputs back, summed per token in rank order."""
        T, D = x.shape
        W, dev = self.world, x.device
        E = num_experts if num_experts is not None else getattr(self, "_num_experts", None)
        if E is None:
            raise RuntimeError("the all-to-all exchange needs the expert count: call expert_map(E) first")
        dest = torch.zeros(T, W, dtype=torch.bool, device=dev)
        dest.scatter_(1, self.owners(E, dev)[ids.long()], True)  # [T, W]: rank r holds one of token t's experts
        r_idx, t_idx = dest.t().nonzero(as_tuple=True)  # pairs sorted by rank, then token
        send = dest.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        sc, rc = send.tolist(), recv.tolist()  # host: the split sizes
        n_in = sum(rc)

        def a2a(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty((n_in,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
            dist.all_to_all_single(out, t.contiguous(), rc, sc, group=self.group)
            return out

        xr, ir, wr = a2a(x[t_idx]), a2a(ids.long()[t_idx]), a2a(weights.float()[t_idx])
        yr = local_experts(xr, ir, wr).float() if n_in else torch.zeros(0, D, dtype=torch.float32, device=dev)
        back = torch.empty(len(t_idx), D, dtype=torch.float32, device=dev)
        dist.all_to_all_single(back, yr.contiguous(), sc, rc, group=self.group)
        return torch.zeros(T, D, dtype=torch.float32, device=dev).index_add_(0, t_idx, back)
