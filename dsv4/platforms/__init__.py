"""Platform detection and capabilities. The ONLY place (with kernel files) that looks at device names,
compute capabilities or gfx architectures; everything else reads the `Platform` it is handed."""

from __future__ import annotations

import torch

from dsv4.platforms.base import Platform, PlatformError

__all__ = ["Platform", "PlatformError", "detect"]


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
