"""rms_norm: y = x / sqrt(mean(x^2) + eps) * w, in float32, cast back to x's dtype.

x: [..., N] any float dtype; weight: [N] (any float dtype) or None for the un-weighted norm (the
per-head query norm); the weight multiplies in float32 before the cast, as the official code does.

quant=dialect (x 2-D): returns (y, (q, s)), (q, s) the fp8_act_quant (block 128) of y in that dialect, what linear's
`x_q` takes (q may have padding rows): the norm in front of an FP8 linear (the query LoRA's q_norm)."""

import torch

from dsv4.ops.quant import fp8_act_quant_reference
from dsv4.ops.registry import define_op


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, quant=None):
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return y if quant is None else (y, fp8_act_quant_reference(y, 128, quant))


rms_norm = define_op("rms_norm", rms_norm_reference)
