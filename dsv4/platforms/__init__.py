"""Platform detection and capabilities. The ONLY place (with kernel files) that looks at device names,
compute capabilities or gfx architectures; everything else reads the `Platform` it is handed."""

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


def detect(device: str | torch.device | None = None) -> Platform:
    """The platform of `device` (default: the first GPU if there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        from dsv4.platforms.cpu import cpu_platform
        return cpu_platform()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlatformError(f"device {str(device)!r} asked for, but torch {torch.__version__} sees no GPU")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if getattr(torch.version, "hip", None):
            from dsv4.platforms.rocm import rocm_platform
            return rocm_platform(idx)
        from dsv4.platforms.cuda import cuda_platform
        return cuda_platform(idx)
    raise PlatformError(f"unsupported device type {dev.type!r} (supported: cpu, cuda, rocm through torch.cuda)")
