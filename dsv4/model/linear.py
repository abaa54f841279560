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
                 dense_dtype: torch.dtype | None = None, compact: bool = False):
        """compact: a float32 dense weight the release stores in bf16 (the official code upcasts it and multiplies
        in float32): `compact_dense_weights` holds it in bf16 once loaded when every value is a bf16 value and the
        model's activations are bf16, and the callers ask for float32 results (forward's out_dtype): the same
        exact products, half the bytes."""
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_f, out_f, fmt
        self.compact = compact
        ws, ss = weight_shapes(out_f, in_f, fmt)
        self.register_buffer("weight", torch.empty(ws, dtype=weight_dtype(fmt, opts, dense_dtype)))
        self.register_buffer("scale", torch.empty(ss, dtype=torch.uint8) if ss else None)
        self._linear = opts.ops.linear
        self.act_quant = opts.official and fp8_gemm
        self.dialect = opts.fp8_dialect

    def forward(self, x: torch.Tensor, x_q=None, out_dtype=None) -> torch.Tensor:
        """x_q: x's act_quant made by its producer (linear's `x_q`), or None. out_dtype: linear's (dense weights)."""
        if out_dtype is not None:
            return self._linear(x, self.weight, self.scale, self.act_quant, self.dialect, x_q=x_q, out_dtype=out_dtype)
        return self._linear(x, self.weight, self.scale, self.act_quant, self.dialect, x_q=x_q)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, opts: ModelOptions):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32))
        self._norm = opts.ops.rms_norm

    def forward(self, x: torch.Tensor, quant=None):
        """quant=dialect: (y, y's act_quant) for the FP8 linear that reads y (rms_norm's `quant`)."""
        return self._norm(x, self.weight, self.eps, quant=quant)

    def params(self) -> tuple[torch.Tensor, float]:
        """(weight, eps): for an op that applies this norm to its own output (hc_pre / hc_head's `norm`)."""
        return self.weight, self.eps


class LinearGroup:
    """Linears that read the same input, run as one GEMM once fused (fewer launches, one activation
    quantisation, a wider GEMM). Not a module: the members stay where they are (their checkpoint names,
    their buffers). `fuse()`, called once the weights are loaded (model.builder), concatenates the
    members' weights and scales along the output rows, each member padded to whole 128-row scale blocks
    for FP8, and makes every member's buffers views of the result (no second copy is held). A member whose
    weight is later replaced stops being a view: the group notices on its next call and raises instead of
    computing with stale weights. Before `fuse()` (or when the members cannot share one GEMM) it calls
    the members one by one; results are the same up to summation order."""

    def __init__(self, *members: Linear):
        self.members = members
        self.weight = self.scale = None
        self.spans: list[tuple[int, int]] = []
        self._ptrs: list[tuple[int, int | None]] = []
        self.contiguous = False

    def fusable(self) -> str | None:
        """Why the members cannot share one GEMM (None: they can)."""
        m0 = self.members[0]
        for m in self.members:
            if m.in_features != m0.in_features or m.fmt != m0.fmt or m.weight.dtype != m0.weight.dtype:
                return f"{m!r} differs from {m0!r} in input size, format or dtype"
            if m.act_quant != m0.act_quant or m._linear is not m0._linear or m.dialect != m0.dialect:
                return f"{m!r} differs from {m0!r} in numerics"
            if m.weight.device != m0.weight.device:
                return "members on different devices"
        return None

    @torch.no_grad()
    def fuse(self) -> bool:
        if len(self.members) < 2 or self.fusable() is not None:
            return False
        step = 128 if self.members[0].fmt == "fp8" else 1
        ws, ss, self.spans, row = [], [], [], 0
        for m in self.members:
            n = m.out_features
            pad = -n % step
            self.spans.append((row, row + n))
            w = m.weight
            if pad:
                w = torch.cat([w, w.new_zeros((pad,) + tuple(w.shape[1:]))])
            ws.append(w)
            if m.scale is not None:
                ss.append(m.scale)  # FP8: [ceil(n / 128), K / 128] (the padding rows share the last block)
            row += n + pad
        weight = torch.cat(ws)
        scale = torch.cat(ss) if ss else None  # FP4: one scale row per weight row (step 1, no padding)
        for m, (a, b) in zip(self.members, self.spans):
            m.weight = weight[a:b]
            if scale is not None:
                m.scale = scale[a // step:-(-b // step)] if step > 1 else scale[a:b]
        self.weight, self.scale = weight, scale
        self._ptrs = [(m.weight.data_ptr(), None if m.scale is None else m.scale.data_ptr()) for m in self.members]
        self.contiguous = all(self.spans[i][1] == self.spans[i + 1][0] for i in range(len(self.spans) - 1))
        return True

    def _check(self) -> None:
        for m, (pw, ps) in zip(self.members, self._ptrs):
            if m.weight.data_ptr() != pw or (m.scale.data_ptr() if m.scale is not None else None) != ps:
                raise RuntimeError(f"LinearGroup: the weight or scale of {m!r} was replaced after the group was "
                                   "fused; fuse again (model.linear.fuse_linear_groups) before running")

    def __call__(self, x: torch.Tensor, x_q=None, out_dtype=None) -> list[torch.Tensor]:
        """The members' outputs, in order (views of one output when fused). x_q, out_dtype: as Linear.forward's."""
        if self.weight is None:
            return [m(x, x_q, out_dtype) for m in self.members]
        self._check()
        m0 = self.members[0]
        kw = {} if out_dtype is None else {"out_dtype": out_dtype}
        y = m0._linear(x, self.weight, self.scale, m0.act_quant, m0.dialect, x_q=x_q, **kw)
        return [y[..., a:b] for a, b in self.spans]

    def joined(self, x: torch.Tensor, x_q=None) -> torch.Tensor:
        """The members' outputs side by side: the fused output itself when the members have no padding."""
        if self.weight is not None and self.contiguous:
            self._check()
            m0 = self.members[0]
            return m0._linear(x, self.weight, self.scale, m0.act_quant, m0.dialect, x_q=x_q)[..., :self.spans[-1][1]]
        return torch.cat(self(x, x_q), dim=-1)


@torch.no_grad()
def compact_dense_weights(model: nn.Module, act_dtype: torch.dtype) -> int:
    """Hold each `compact` Linear's float32 weight (and each other module's with `compact = True` and a `weight`,
    the MoE router's) in bf16 when the activations are bf16 and every value of the weight is a bf16 value (a
    release checkpoint stores these weights in bf16; a float32 copy that is not exactly bf16 stays float32). Run
    once the weights are loaded, before fuse_linear_groups. Returns how many changed."""
    if act_dtype != torch.bfloat16:
        return 0
    n = 0
    for m in model.modules():
        dense = m.fmt == "dense" if isinstance(m, Linear) else isinstance(getattr(m, "weight", None), torch.Tensor)
        if getattr(m, "compact", False) is True and dense and m.weight.dtype == torch.float32:
            w = m.weight.to(torch.bfloat16)
            if torch.equal(w.float(), m.weight):
                m.weight = w
                n += 1
    return n


def fuse_linear_groups(model: nn.Module) -> int:
    """Fuse every LinearGroup held by `model`'s modules (attributes of type LinearGroup). Returns how many
    fused."""
    n = 0
    for mod in model.modules():
        for v in list(vars(mod).values()):
            if isinstance(v, LinearGroup):
                n += bool(v.fuse())
    return n
