"""Triton apply_rope (dsv4/ops/rope.py): interleaved rotary embedding on the trailing r dims, into a new
tensor (the untouched leading dims are copied by the same kernel, so the output costs one read and one
write of x, not a clone plus a rotate pass)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import pdl_args, pdl_start, register
from dsv4.kernels.triton.norm import bf16_rne_bits, cast_out, rms_norm_triton
from dsv4.kernels.triton.quant import (_fp8_rt_rows, fp4_roundtrip_triton, fp8_roundtrip_triton, hadamard_fp4_fits,
                                       hadamard_fp4_launch)
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.quant import check_width
from dsv4.ops.rope import apply_rope as apply_rope_op
from dsv4.ops.rope import norm_rope as norm_rope_op
from dsv4.ops.rope import norm_rope_qkv as norm_rope_qkv_op
from dsv4.ops.rope import rope_hadamard_fp4 as rope_hadamard_fp4_op

# Work decomposition: x viewed as [T, H, D] (H = product of the middle dims, 1 for [T, D]).
# grid = (T, cdiv(H, BLOCK_H)); a program takes one token and BLOCK_H rows (heads, ~4096 elements):
# - copies the leading D - r lanes of each row ([BLOCK_H, next_pow2(D - r)] tile, contiguous, vectorised,
#   bit-exact: the loaded values are stored as they are);
# - computes cos / sin of float32(p) * inv_freq[i] once per pair (shared by its BLOCK_H heads: the angle
#   is broadcast over heads) and rotates the pairs from two stride-2 loads of the trailing r lanes (even /
#   odd elements; the same sectors, so the second is an L1 hit): x0 cos - x1 sin, x0 sin + x1 cos in fp32.
# Each byte of x is read once from HBM and each byte of the output written once: the copy roofline
# (bytes = 2 * numel * elt). cos / sin are the accurate libdevice / ocml functions (tl.cos / tl.sin), needed
# for angles up to ~1e6 rad; their cost is amortised over the BLOCK_H heads (64 heads of q per token).


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, freq_ptr, y_ptr, H, D, HALF,
                 sx_t, sx_h, sy_t, sy_h, SIGN: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, HALF_P: tl.constexpr, RNE_BITS: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_start(PDL)
    t64 = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    h64 = hs.to(tl.int64)
    xrow = x_ptr + t64 * sx_t + h64[:, None] * sx_h
    yrow = y_ptr + t64 * sy_t + h64[:, None] * sy_h
    start = D - 2 * HALF
    # the untouched leading dims
    dc = tl.arange(0, BLOCK_C)
    cmask = hmask[:, None] & (dc < start)[None, :]
    tl.store(yrow + dc[None, :], tl.load(xrow + dc[None, :], mask=cmask, other=0.0), mask=cmask)
    # the rotary pairs (start + 2i, start + 2i + 1), angle float32(p) * inv_freq[i] (one fp32 product)
    i = tl.arange(0, HALF_P)
    im = i < HALF
    ang = tl.load(pos_ptr + t64).to(tl.float32) * tl.load(freq_ptr + i, mask=im, other=0.0).to(tl.float32)
    c = tl.cos(ang)[None, :]
    s = (tl.sin(ang) * SIGN)[None, :]
    e0 = (start + 2 * i)[None, :]
    rmask = hmask[:, None] & im[None, :]
    x0 = tl.load(xrow + e0, mask=rmask, other=0.0).to(tl.float32)
    x1 = tl.load(xrow + e0 + 1, mask=rmask, other=0.0).to(tl.float32)
    tl.store(yrow + e0, cast_out(x0 * c - x1 * s, y_ptr, RNE_BITS), mask=rmask)
    tl.store(yrow + e0 + 1, cast_out(x0 * s + x1 * c, y_ptr, RNE_BITS), mask=rmask)


TILE_ELEMS = 4096


def apply_rope_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      inverse: bool = False) -> torch.Tensor:
    half = inv_freq.numel()
    R = 2 * half
    T, D = x.shape[0], x.shape[-1]
    if R > D:
        raise ValueError(f"apply_rope: {R} rotary dims exceed the last dim {D}")
    x3 = x.reshape(T, -1, D)  # a view for the model's contiguous q / kv / o; copies only odd layouts
    if D > 1 and x3.stride(2) != 1:
        x3 = x3.contiguous()
    H = x3.shape[1]
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0 or D == 0:
        return y.view(x.shape)
    freq = inv_freq.to(device=x.device, dtype=torch.float32)
    if freq.stride(0) != 1:
        freq = freq.contiguous()
    pos = positions if positions.stride(0) == 1 else positions.contiguous()
    block_c = triton.next_power_of_2(max(1, D - R))
    block_h = max(1, min(TILE_ELEMS // triton.next_power_of_2(D), triton.next_power_of_2(H)))
    grid = (T, triton.cdiv(H, block_h))
    _rope_kernel[grid](x3, pos, freq, y, H, D, half, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1),
                       SIGN=-1.0 if inverse else 1.0, BLOCK_H=block_h, BLOCK_C=block_c,
                       HALF_P=triton.next_power_of_2(max(1, half)), RNE_BITS=bf16_rne_bits(x.dtype),
                       **pdl_args(x.device), num_warps=max(1, min(8, block_h * block_c // 512)))
    return y.view(x.shape)


# norm_rope (ops/rope.py): grid = (T, cdiv(H, BLOCK_H)); a program loads BLOCK_H whole rows [BLOCK_H, BLOCK_D]
# of one token and, in registers, does what three kernels did with a read and a write each: the RMS norm (fp32,
# weight optional, the rms_norm kernel's formula) rounded to x's dtype; RoPE on the trailing 2 HALF channels
# (the row split into even / odd lanes, pair k rotated when 2k >= D - 2 HALF; the apply_rope kernel's angles
# and products) rounded; and (FP8) the FP8 round trip of the channels below W per 64 (the fp8_roundtrip kernel's
# arithmetic). q: H = 64 heads of 512, 8 rows per program; kv: one row.
@triton.jit
def _round(v, ptr, RNE_BITS: tl.constexpr):
    return cast_out(v, ptr, RNE_BITS).to(tl.float32)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, pos_ptr, freq_ptr, y_ptr, H, D, HALF, W, sx_t, sx_h, sy_t, sy_h, eps,
                      HAS_W: tl.constexpr, FP8: tl.constexpr, FNUZ: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr, RNE_BITS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    _norm_rope_rows(tl.program_id(0), tl.program_id(1), x_ptr, w_ptr, pos_ptr, freq_ptr, y_ptr, H, D, HALF, W, sx_t,
                    sx_h, sy_t, sy_h, eps, HAS_W, FP8, FNUZ, BLOCK_H, BLOCK_D, RNE_BITS)


# An attention layer's q rows (no weight) and kv row (kv_norm's weight, FP8 width) in one launch: grid (T, NQB + 1),
# the last column of programs does the kv rows; each part is the kernel above with its own constexprs.
@triton.jit
def _norm_rope_qkv_kernel(q_ptr, qy_ptr, HQ, DQ, sq_t, sq_h, sqy_t, sqy_h, q_eps, NQB,
                          kv_ptr, w_ptr, kvy_ptr, DK, W, skv_t, skvy_t, kv_eps, pos_ptr, freq_ptr, HALF,
                          FP8: tl.constexpr, FNUZ: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_DQ: tl.constexpr,
                          BLOCK_DK: tl.constexpr, RNE_BITS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    t = tl.program_id(0)
    hb = tl.program_id(1)
    if hb < NQB:
        _norm_rope_rows(t, hb, q_ptr, q_ptr, pos_ptr, freq_ptr, qy_ptr, HQ, DQ, HALF, 0, sq_t, sq_h, sqy_t, sqy_h,
                        q_eps, False, False, False, BLOCK_HQ, BLOCK_DQ, RNE_BITS)
    else:
        _norm_rope_rows(t, 0, kv_ptr, w_ptr, pos_ptr, freq_ptr, kvy_ptr, 1, DK, HALF, W, skv_t, 0, skvy_t, 0, kv_eps,
                        True, FP8, FNUZ, 1, BLOCK_DK, RNE_BITS)


@triton.jit
def _norm_rope_rows(t, hb, x_ptr, w_ptr, pos_ptr, freq_ptr, y_ptr, H, D, HALF, W, sx_t, sx_h, sy_t, sy_h, eps,
                    HAS_W: tl.constexpr, FP8: tl.constexpr, FNUZ: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, RNE_BITS: tl.constexpr):
    """Token t's rows hb * BLOCK_H .. of x: norm, RoPE, FP8 round trip of the channels below W (see above)."""
    t64 = t.to(tl.int64)
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h64 = hs.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = (hs < H)[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + t64 * sx_t + h64[:, None] * sx_h + d[None, :], mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    y = _round(y, y_ptr, RNE_BITS)
    ye, yo = tl.split(tl.reshape(y, [BLOCK_H, BLOCK_D // 2, 2]))
    k = tl.arange(0, BLOCK_D // 2)
    i = k - (D // 2 - HALF)
    rot = (i >= 0) & (k < D // 2)
    f = tl.load(freq_ptr + tl.where(rot, i, 0), mask=rot, other=0.0).to(tl.float32)
    ang = tl.load(pos_ptr + t64).to(tl.float32) * f
    c = tl.cos(ang)[None, :]
    s = tl.sin(ang)[None, :]
    re = _round(ye * c - yo * s, y_ptr, RNE_BITS)
    ro = _round(ye * s + yo * c, y_ptr, RNE_BITS)
    y = tl.reshape(tl.join(tl.where(rot[None, :], re, ye), tl.where(rot[None, :], ro, yo)), [BLOCK_H, BLOCK_D])
    if FP8:
        r = _fp8_rt_rows(tl.reshape(y, [BLOCK_H * (BLOCK_D // 64), 64]), FNUZ, FNUZ)
        y = tl.where((d < W)[None, :], tl.reshape(r, [BLOCK_H, BLOCK_D]), y)
    tl.store(y_ptr + t64 * sy_t + h64[:, None] * sy_h + d[None, :], cast_out(y, y_ptr, RNE_BITS), mask=m)


def norm_rope_triton(x: torch.Tensor, weight, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor,
                     fp8_width: int = 0, dialect=Fp8Dialect.OCP) -> torch.Tensor:
    half = inv_freq.numel()
    T, D = x.shape[0], x.shape[-1]
    w8 = check_width(fp8_width, D, 64) if fp8_width else 0
    bd = triton.next_power_of_2(max(D, 64 if w8 else 2))
    if 2 * half > D or D % 2 or bd > TILE_ELEMS:  # shapes the fused kernel does not take: the three kernels
        y = apply_rope_triton(rms_norm_triton(x, weight, eps), positions, inv_freq)
        return fp8_roundtrip_triton(y, 64, dialect, w8) if w8 else y
    H = math.prod(x.shape[1:-1])
    x3 = x.reshape(T, H, D)
    if x3.stride(2) != 1:
        x3 = x3.contiguous()
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return y.view(x.shape)
    freq = inv_freq.to(device=x.device, dtype=torch.float32).contiguous()
    pos = positions if positions.stride(0) == 1 else positions.contiguous()
    wt = weight.contiguous() if weight is not None else x3
    bh = max(1, min(TILE_ELEMS // bd, triton.next_power_of_2(H)))
    _norm_rope_kernel[(T, triton.cdiv(H, bh))](
        x3, wt, pos, freq, y, H, D, half, w8, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), float(eps),
        HAS_W=weight is not None, FP8=w8 > 0, FNUZ=Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ, BLOCK_H=bh,
        BLOCK_D=bd, RNE_BITS=bf16_rne_bits(x.dtype), **pdl_args(x.device),
        num_warps=max(1, min(8, bh * bd // 512)))
    return y.view(x.shape)


def _norm_rope_fits(D: int, half: int, w8: int) -> int:
    """BLOCK_D of the fused norm_rope kernel for rows of D, or 0 where it does not take them."""
    bd = triton.next_power_of_2(max(D, 64 if w8 else 2))
    return 0 if (2 * half > D or D % 2 or bd > TILE_ELEMS) else bd


def norm_rope_qkv_triton(q: torch.Tensor, kv: torch.Tensor, kv_weight, q_eps: float, kv_eps: float,
                         positions: torch.Tensor, inv_freq: torch.Tensor, fp8_width: int = 0,
                         dialect=Fp8Dialect.OCP) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_rope of q [T, H, Dq] (no weight) and kv [T, Dk] (weight, FP8 width) in one launch where both fit."""
    half = inv_freq.numel()
    T, H, DQ = q.shape
    DK = kv.shape[-1]
    w8 = check_width(fp8_width, DK, 64) if fp8_width else 0
    bdq, bdk = _norm_rope_fits(DQ, half, 0), _norm_rope_fits(DK, half, w8)
    if not (bdq and bdk and kv.dim() == 2 and kv.shape[0] == T and T and H and kv_weight is not None):
        return (norm_rope_triton(q, None, q_eps, positions, inv_freq),
                norm_rope_triton(kv, kv_weight, kv_eps, positions, inv_freq, fp8_width, dialect))
    if q.stride(2) != 1:
        q = q.contiguous()
    if kv.stride(1) != 1:
        kv = kv.contiguous()
    qy = torch.empty((T, H, DQ), dtype=q.dtype, device=q.device)
    kvy = torch.empty((T, DK), dtype=kv.dtype, device=kv.device)
    freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    pos = positions if positions.stride(0) == 1 else positions.contiguous()
    bh = max(1, min(TILE_ELEMS // bdq, triton.next_power_of_2(H)))
    nqb = triton.cdiv(H, bh)
    _norm_rope_qkv_kernel[(T, nqb + 1)](
        q, qy, H, DQ, q.stride(0), q.stride(1), qy.stride(0), qy.stride(1), float(q_eps), nqb,
        kv, kv_weight.contiguous(), kvy, DK, w8, kv.stride(0), kvy.stride(0), float(kv_eps), pos, freq, half,
        FP8=w8 > 0, FNUZ=Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ, BLOCK_HQ=bh, BLOCK_DQ=bdq, BLOCK_DK=bdk,
        RNE_BITS=bf16_rne_bits(q.dtype), **pdl_args(q.device), num_warps=max(1, min(8, bh * bdq // 512)))
    return qy, kvy


def rope_hadamard_fp4_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """One launch (the Hadamard + FP4 kernel with its RoPE prologue) for rows it takes; else the two kernels."""
    if x.dim() >= 2 and 2 * inv_freq.numel() <= x.shape[-1] and hadamard_fp4_fits(x):
        return hadamard_fp4_launch(x, (positions, inv_freq))
    return fp4_roundtrip_triton(apply_rope_triton(x, positions, inv_freq), 32, hadamard=True)


register(apply_rope_op, apply_rope_triton)
register(norm_rope_op, norm_rope_triton)
register(rope_hadamard_fp4_op, rope_hadamard_fp4_triton)
register(norm_rope_qkv_op, norm_rope_qkv_triton)
