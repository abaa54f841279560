"""Linear layers over the checkpoint's weight formats.

linear(x, weight, scale=None, act_quant=False, dialect=OCP) -> y = x W^T in x's dtype
    x: [M, K]. weight, by dtype:
      - a float dtype: dense [N, K];
      - torch.float8_e4m3fn / float8_e4m3fnuz: FP8 [N, K] with `scale` E8M0 bytes (uint8)
        [ceil(N/128), ceil(K/128)] (the dtype names the dialect);
      - uint8 / int8: FP4 e2m1 packed two per byte [N, K/2] (low nibble first) with `scale` E8M0
        bytes [N, ceil(K/32)].
    act_quant=False ("plain"): the weight is dequantised to x's dtype and multiplied in x's dtype.
    act_quant=True ("official"): x is quantised to FP8 per (row, 128 channels) with power-of-two scales
      in `dialect` (fnuz: scale x2 and clamp 224, giving the same values), both operands are dequantised
      exactly and multiplied in float32; the result is cast to x's dtype. This is the exact value an
      FP8 block-scaled GEMM with float32 accumulation computes, up to summation order.

    x_q (default None): (q, s), the fp8_act_quant of x (block 128) in `dialect`, already made by the op that
      produced x (q: uint8 [>= M, K], rows past M unused: a producer may pad them for a GEMM's layout; s: uint8
      [M, ceil(K/128)]). A provider may use it instead of quantising x itself (one launch fewer); the values
      are the same by definition, so the reference ignores it.

    out_dtype (default None: x's dtype; dense weights without act_quant only): y in `out_dtype`, computed as
      x W^T with x and W cast to it. float32 with bf16 x and bf16 W: the exact products summed in float32, which
      is what the official code computes for the compressor projections (it upcasts their bf16 weights and
      multiplies in float32), so those weights may stay bf16 in memory (half the bytes).

grouped_linear(x, weight, scale=None) -> z: the grouped output projection `wo_a`.
    x: [M, G, Kg]; weight [G*R, Kg] (dense or FP8 as above); z[:, g] = x[:, g] W_g^T with
    W_g = weight[g*R:(g+1)*R]; weight dequantised to x's dtype (as the official code does: BF16 einsum).
"""

import torch
import torch.nn.functional as F

from dsv4.numerics.fp4 import dequantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, quantize_fp8_blocks
from dsv4.ops.registry import define_op

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def weight_format(weight: torch.Tensor) -> str:
    if weight.dtype in _FP8_DTYPES:
        return "fp8"
    if weight.dtype in (torch.uint8, torch.int8):
        return "fp4"
    if weight.dtype.is_floating_point:
        return "dense"
    raise TypeError(f"unsupported weight dtype {weight.dtype}")


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """The exact values of a dense / FP8-block / FP4-block weight as a dense [N, K] tensor."""
    fmt = weight_format(weight)
    if fmt == "dense":
        return weight.to(dtype)
    if scale is None:
        raise ValueError(f"{fmt} weight of shape {tuple(weight.shape)} has no scale")
    if fmt == "fp8":
        return dequantize_fp8_blocks(weight, scale, (128, 128), Fp8Dialect.parse(weight.dtype), out_dtype=dtype)
    return dequantize_fp4_blocks(weight, scale, 32, out_dtype=dtype)


def fp8_act_dequant(x: torch.Tensor, dialect=Fp8Dialect.OCP) -> torch.Tensor:
    """x rounded through FP8 with one power-of-two scale per (row, 128 channels), as float32."""
    q, s = quantize_fp8_blocks(x.float(), (128,), dialect)
    return dequantize_fp8_blocks(q, s, (128,), dialect, out_dtype=torch.float32)


def check_out_dtype(weight: torch.Tensor, act_quant: bool, out_dtype) -> None:
    """`linear`'s out_dtype is for dense weights without act_quant (the error names what was given)."""
    if out_dtype is not None and (act_quant or weight_format(weight) != "dense"):
        raise ValueError(f"linear: out_dtype={out_dtype} is for dense weights without act_quant; got a "
                         f"{weight_format(weight)} weight ({weight.dtype}) with act_quant={act_quant}")


def linear_reference(x, weight, scale=None, act_quant: bool = False, dialect=Fp8Dialect.OCP, x_q=None,
                     out_dtype=None):
    if out_dtype is not None:
        check_out_dtype(weight, act_quant, out_dtype)
        return F.linear(x.to(out_dtype), weight.to(out_dtype))
    if act_quant:
        w = dequantize_weight(weight, scale, torch.float32)
        return (fp8_act_dequant(x, dialect) @ w.t()).to(x.dtype)
    return F.linear(x, dequantize_weight(weight, scale, x.dtype))


def usable_x_q(x_q, M: int, K: int) -> bool:
    """Whether `x_q` has the shapes of an [M, K] x's act_quant (a provider then checks that the call's dialect is
    the one it would quantise in)."""
    if x_q is None:
        return False
    q, s = x_q
    return (q.dim() == 2 and q.shape[0] >= M and q.shape[1] == K and q.stride(1) == 1 and q.dtype == torch.uint8
            and s.dim() == 2 and tuple(s.shape) == (M, -(-K // 128)) and s.dtype == torch.uint8)


def grouped_linear_reference(x, weight, scale=None):
    g = x.shape[1]
    w = dequantize_weight(weight, scale, x.dtype).view(g, -1, x.shape[-1])
    return torch.einsum("mgk,grk->mgr", x, w)


linear = define_op("linear", linear_reference)
grouped_linear = define_op("grouped_linear", grouped_linear_reference)
