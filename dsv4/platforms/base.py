"""`Platform`: what a device is and can do (detect() in __init__.py makes one; cpu.py, cuda.py and rocm.py
fill it for their kind of device)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.numerics.fp8 import Fp8Dialect


class PlatformError(RuntimeError):
    """The requested device cannot be used (absent, or of an unsupported kind)."""


@dataclass(frozen=True)
class Platform:
    name: str  # "cpu", "cuda", "rocm"
    device: str  # torch device string, e.g. "cuda:0"
    arch: str  # "x86_64", "sm90", "gfx942", ...
    fp8_dialect: Fp8Dialect
    has_fp8_mma: bool = False
    has_fp4_mma: bool = False
    supports_graphs: bool = False
    total_memory: int = 0
    # provider names that are known broken here: {op name: {provider: reason}}
    deny: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_gpu(self) -> bool:
        return self.name in ("cuda", "rocm")

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend for tensors on this device (ROCm's RCCL answers to "nccl")."""
        return "nccl" if self.is_gpu else "gloo"

    def rank_device(self, local_rank: int) -> str:
        """The device of the rank with this node-local index (GPUs: one each; the CPU: shared)."""
        return f"cuda:{local_rank}" if self.is_gpu else "cpu"

    def describe(self) -> str:
        caps = [f"fp8={self.fp8_dialect.value}", f"fp8_mma={self.has_fp8_mma}", f"fp4_mma={self.has_fp4_mma}",
                f"graphs={self.supports_graphs}"]
        if self.total_memory:
            caps.append(f"memory={self.total_memory / 2**30:.1f} GiB")
        return f"{self.name} ({self.arch}) on {self.device}: " + ", ".join(caps)
