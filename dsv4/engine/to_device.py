"""Small host lists (row indices, per-request parameters) as device tensors, without a device sync."""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (a list, or nested lists) as a `dtype` tensor on `device`. Built on the host and copied
    asynchronously: from pageable memory the copy is staged at once, so `values` may go at once, and the
    device's queued work is not waited for (torch.tensor(values, device=cuda) is a synchronous copy: the host
    waits for everything queued before it, which leaves the device idle while the host then launches the
    next ops). On a CPU device it is the host tensor itself."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
