"""Explicit runtime options a model is built with (no globals, no environment)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.moe_dispatch import ExpertMap
from dsv4.ops.registry import OpTable

NUMERICS_MODES = ("official", "plain")


@dataclass(frozen=True)
class ModelOptions:
    """dtype: activation dtype. numerics: "official" simulates the release's numerics (FP8 activation
    quantisation into FP8 GEMMs, FP8 round trip of the KV non-rotary dims, Hadamard + FP4 in the
    indexer); "plain" does none of that (for parity with transformers). fp8_dialect: the platform's
    FP8 dialect, in which FP8 weights are held in memory. ops: the resolved op table. expert_map: the ONE
map of local routed experts every MoE implementation reads (dsv4/ops/moe_dispatch.py)."""

    dtype: torch.dtype
    numerics: str
    fp8_dialect: Fp8Dialect
    ops: OpTable
    device: torch.device
    expert_map: ExpertMap | None = None  # which routed experts this rank holds; None = all (identity)
    expert_parallel: object | None = None  # dsv4.parallel.ExpertParallel: exchange tokens with the other ranks

    def __post_init__(self):
        if self.numerics not in NUMERICS_MODES:
            raise ValueError(f"numerics must be one of {NUMERICS_MODES}, got {self.numerics!r}")

    @property
    def official(self) -> bool:
        return self.numerics == "official"

    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.fp8_dialect.torch_dtype
