"""Weight-holding modules: Linear over dense / FP8-block / FP4-block weights, RMSNorm.

Weights are buffers named as in the official checkpoint (`weight`, `scale`), held in memory in their
quantised form (FP8 in the platform's dialect, FP4 packed in uint8, E8M0 scales as uint8 bytes)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv4.model.options import ModelOptions


def weight_shapes(out_f: int, in_f: int, fmt: str) -> tuple[tuple, tuple | None]:
    """(weight shape, scale shape) of an [out_f, in_f] weight in format fp8 / fp4 / dense."""
    if fmt == "fp8":
        return (out_f, in_f), (math.ceil(out_f / 128), math.ceil(in_f / 128))
    if fmt == "fp4":
        if in_f % 2:
            raise ValueError(f"FP4 weight needs an even input size, got {in_f}")
        return (out_f, in_f // 2), (out_f, math.ceil(in_f / 32))
    return (out_f, in_f), None


def weight_dtype(fmt: str, opts: ModelOptions, dense_dtype: torch.dtype | None = None) -> torch.dtype:
    return {"fp8": opts.fp8_dtype, "fp4": torch.uint8}.get(fmt, dense_dtype or opts.dtype)


class Linear(nn.Module):
    """y = x W^T. `fp8_gemm`: in the official model this is an FP8 GEMM (activations re-quantised in
    official numerics); `fmt` is how the weight is stored here: fp8, fp4 or dense."""

    def __init__(self, in_f: int, out_f: int, fmt: str, opts: ModelOptions, fp8_gemm: bool = True,
                 dense_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_f, out_f, fmt
        ws, ss = weight_shapes(out_f, in_f, fmt)
        self.register_buffer("weight", torch.empty(ws, dtype=weight_dtype(fmt, opts, dense_dtype)))
        self.register_buffer("scale", torch.empty(ss, dtype=torch.uint8) if ss else None)
        self._linear = opts.ops.linear
        self.act_quant = opts.official and fp8_gemm
        self.dialect = opts.fp8_dialect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight, self.scale, self.act_quant, self.dialect)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, opts: ModelOptions):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32))
        self._norm = opts.ops.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)
