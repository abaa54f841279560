"""The expert map and the token -> expert dispatch layout every MoE implementation shares.

ExpertMap(num_global, local_ids): the ONE source of truth for "which experts are local, at which index".
    Expert ids produced by the router are GLOBAL (0 .. num_global-1). A rank holds the weights of its local
    experts only, stacked in the order of `local_ids`: local index i holds global expert local_ids[i].
    `global_to_local(device)` is the int32 table [num_global] (local index, or -1 = remote) that kernels
    read; it is built once per device and cached, so build it before graph capture (`warm(device)`).
    `ExpertMap.identity(E)`: every expert local at its own index (no expert parallelism).

Dispatch layout (block_m rows per block; sizes FIXED by T, k, num_local and block_m, never by the data,
so kernels launched on it are graph-capturable):
    N = T * k (token, slot) pairs, flat index p = t * k + j.
    max_blocks = cdiv(N, block_m) + min(num_local, N): each local expert with c_e > 0 pairs takes
        cdiv(c_e, block_m) <= c_e / block_m + 1 blocks, and at most min(num_local, N) experts are hit.
    sorted_token_slots [max_blocks * block_m] int32: the pairs of local expert 0, padded with -1 to a
        multiple of block_m, then those of local expert 1, ...; -1 in padding and in unused blocks.
    block_expert [max_blocks] int32: the local expert of each block, -1 for an unused block.
    num_valid_blocks: int32 scalar tensor, the number of used blocks (they come first).
Pairs whose expert is remote contribute nothing on this rank (they appear nowhere). Kernels must treat a
row as valid iff 0 <= slot < N (its LOGICAL bound), never by its position in the padded buffer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dispatch_sizes(num_pairs: int, num_local: int, block_m: int) -> tuple[int, int]:
    """(max_blocks, max_rows) of the dispatch layout for N = num_pairs (token, slot) pairs."""
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    mb = cdiv(num_pairs, block_m) + min(num_local, num_pairs)
    return mb, mb * block_m


@dataclass(frozen=True)
class ExpertMap:
    """Which global experts this rank holds, and at which local index (see the module docstring)."""

    num_global: int
    local_ids: tuple[int, ...]
    _tables: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        ids = tuple(int(i) for i in self.local_ids)
        object.__setattr__(self, "local_ids", ids)
        if self.num_global <= 0:
            raise ValueError(f"num_global must be positive, got {self.num_global}")
        bad = [i for i in ids if not 0 <= i < self.num_global]
        if bad:
            raise ValueError(f"local expert ids out of range 0..{self.num_global - 1}: {bad[:8]}")
        if len(set(ids)) != len(ids):
            raise ValueError("local expert ids must be distinct")

    @classmethod
    def identity(cls, num_experts: int) -> "ExpertMap":
        """Every expert local, at its own index (single rank / no expert parallelism). One object per size,
        so its device table is built once (a provider called without a map inside a graph capture finds it)."""
        return _identity(int(num_experts))

    @classmethod
    def contiguous(cls, num_experts: int, rank: int, world: int) -> "ExpertMap":
        """Expert-parallel shard `rank` of `world`: a contiguous range of experts (sizes differ by <= 1)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in 0..{world - 1}")
        lo = rank * num_experts // world
        hi = (rank + 1) * num_experts // world
        return cls(int(num_experts), tuple(range(lo, hi)))

    @property
    def num_local(self) -> int:
        return len(self.local_ids)

    @property
    def is_identity(self) -> bool:
        return self.local_ids == tuple(range(self.num_global))

    def global_to_local(self, device=None) -> torch.Tensor:
        """int32 [num_global]: the local index of each global expert, -1 where remote (cached per device)."""
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        t = self._tables.get(dev)
        if t is None:
            host = torch.full((self.num_global,), -1, dtype=torch.int32)
            if self.local_ids:
                host[torch.tensor(self.local_ids, dtype=torch.long)] = torch.arange(self.num_local, dtype=torch.int32)
            t = host.to(dev)
            self._tables[dev] = t
        return t

    def warm(self, device) -> "ExpertMap":
        """Build the device table now (before CUDA-graph capture)."""
        self.global_to_local(device)
        return self


@functools.lru_cache(maxsize=None)
def _identity(num_experts: int) -> ExpertMap:
    return ExpertMap(num_experts, tuple(range(num_experts)))


def check_expert_ids(ids: torch.Tensor, num_global: int) -> None:
    """Raise ValueError if any expert id lies outside 0..num_global-1 (a host sync: references only)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_global):
        raise ValueError(f"expert id out of range 0..{num_global - 1}: min {int(ids.min())}, max {int(ids.max())}")


def dispatch_reference(ids: torch.Tensor, expert_map: ExpertMap, block_m: int):
    """The dispatch layout of the module docstring for router ids [T, k] (global expert ids).

    Returns (sorted_token_slots [max_rows] int32, block_expert [max_blocks] int32, num_valid_blocks int32
    scalar tensor). Within an expert the pairs are in ascending flat index t * k + j (kernels may use any
    order within an expert: each output row depends only on its own input row)."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, k], got {tuple(ids.shape)}")
    T, k = ids.shape
    N = T * k
    check_expert_ids(ids, expert_map.num_global)
    mb, mr = dispatch_sizes(N, expert_map.num_local, block_m)
    slots = torch.full((mr,), -1, dtype=torch.int32, device=ids.device)
    bexp = torch.full((mb,), -1, dtype=torch.int32, device=ids.device)
    loc = expert_map.global_to_local(ids.device)[ids.reshape(-1).long()]
    nb = 0
    for e in range(expert_map.num_local):
        idx = torch.nonzero(loc == e).flatten()
        c = idx.numel()
        if c == 0:
            continue
        slots[nb * block_m:nb * block_m + c] = idx.to(torch.int32)
        blocks = cdiv(c, block_m)
        bexp[nb:nb + blocks] = e
        nb += blocks
    return slots, bexp, torch.tensor(nb, dtype=torch.int32, device=ids.device)
