"""rms_norm: y = x / sqrt(mean(x^2) + eps) * w, in float32, cast back to x's dtype.

x: [..., N] any float dtype; weight: [N] (any float dtype) or None for the un-weighted norm (the
per-head query norm); the weight multiplies in float32 before the cast, as the official code does."""

import torch

from dsv4.ops.registry import define_op


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


rms_norm = define_op("rms_norm", rms_norm_reference)
