"""Triton W4A8 routed experts: provider "triton_w4a8" of `moe_experts` (dsv4/ops/moe.py), opt-in (never chosen by
itself: `--op moe_experts=triton_w4a8`) until measured on a GPU (issue 15 item 2).

The MXFP4 experts stay FP4 in memory. Inside the kernels each weight tile becomes exact FP8 e4m3 operands
(dsv4/kernels/triton/w4a8.py `fp4_to_fp8_bits`, offsets and block scales from `prepare_w4a8` at the first call,
cached per weight tensor), and the FP8 tensor cores multiply them by the FP8 activations, with fp32
accumulation per 128-block times both scales. That is product for product the official numerics: FP8
activations (act_quant, 1x128 power-of-two scales) times the dequantised FP4 weight, in fp32.

Pipeline, as the Triton provider's (dsv4/kernels/triton/moe.py: dispatch, act round trip, combine shared):
  1. dispatch by expert (blocks of block_m rows);
  2. act_roundtrip: x rounded through FP8 per (row, 128) in x's dtype. The kernels re-derive each row's
     bytes per 128-block from these exact values: the block's own power-of-two scale over its amax puts every
     value back on the e4m3 grid (a scale at most the original; the values and so the products are unchanged);
  3. `_w4a8_gate_up_kernel`: per block of rows of one expert and 128 output columns, gate and up accumulators,
     then the Triton provider's epilogue: g, u rounded to x's dtype, silu(min(g, L)) * clamp(u, -L, L) * the
     routing weight, rounded to x's dtype into h;
  4. `_w4a8_down_kernel`: h rows times w2[e]^T the same way, rounded to x's dtype, into y[slot]. Its encode of
     each h block (amax >= 1e-4, power-of-two scale, round to nearest even, within 448 / 224) is the act_quant
     of h itself, so no separate FP8 round trip of h runs;
  5. combine in fixed slot order (deterministic).
It serves act_quant calls with MXFP4 w13 / w2 whose K dims (D and I) are multiples of 128 and whose blocks all
fit the window. Anything else (and a weight with an out-of-window block, counted in the log at preparation)
goes to the Triton provider, which is exact for every scale.

Tiles: 128 output columns per program, K steps of 128.
Rows per block: 64 on a GPU (FP8 wgmma needs 64 rows per warpgroup), 16 in the interpreter. Compiled for
sm_90a on the CPU machine with Triton's ptxas (64 x 128 tiles, 8 warps): both kernels issue
wgmma.m64n64k32.f32.e4m3.e4m3 (each warpgroup takes half the columns); gate-up uses 255 registers with ~250 B
of spills (two accumulators), down 250 and none; 4 warps spilled 2-4x more. No GPU time measured yet. In the
interpreter (and without native FP8 dots) both operands are decoded to fp32 and dotted in IEEE fp32: the same
exact products.
"""

from __future__ import annotations

import logging
import weakref

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (fp8_block_exponent, fp8_decode, fp8_e4m3_native, fp8_encode, fp8_pow2,
                                        interpreting, triton_supported)
from dsv4.kernels.triton.moe import (_block_rows, _round_to, _tl_dtype, act_roundtrip, check_experts_call,
                                     moe_combine, moe_experts_triton)
from dsv4.kernels.triton.moe_dispatch import moe_dispatch_triton
from dsv4.kernels.triton.w4a8 import W4A8Experts, prepare_w4a8, w4a8_weight_dot
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import weight_format
from dsv4.ops.moe import moe_experts as moe_experts_op
from dsv4.ops.moe_dispatch import ExpertMap

log = logging.getLogger(__name__)
QB = 128


@triton.jit
def _a_fp8(a_rows, ok, k0, K, FNUZ: tl.constexpr, F32_DOT: tl.constexpr):
    """Activation block k0 .. k0 + 127 of the rows quantised with the fp8_act_quant recipe (per row: amax >=
    1e-4, power-of-two scale 2^e, round to nearest even), as even / odd column operands (the FP4 low / high
    nibbles) in e4m3 (their values in fp32 when F32_DOT) and e. x comes already rounded through FP8 (act
    round trip), so its encode is exact; h is quantised here."""
    ke = k0 + 2 * tl.arange(0, 64)
    am = ok[:, None] & (ke < K)[None, :]
    a_e = tl.load(a_rows[:, None] + ke[None, :], mask=am, other=0.0).to(tl.float32)
    a_o = tl.load(a_rows[:, None] + (ke + 1)[None, :], mask=am, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(a_e), axis=1), tl.max(tl.abs(a_o), axis=1)), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)
    inv = fp8_pow2(-e)[:, None]
    q_e = a_e * inv  # |q| <= 448 (224 FNUZ)
    q_o = a_o * inv
    if F32_DOT:
        q_e = fp8_decode(fp8_encode(q_e, FNUZ), FNUZ)  # the bytes the GPU path feeds the MMA, as values
        q_o = fp8_decode(fp8_encode(q_o, FNUZ), FNUZ)
    elif FNUZ:
        q_e = q_e.to(tl.float8e4b8)
        q_o = q_o.to(tl.float8e4b8)
    else:
        q_e = q_e.to(tl.float8e4nv)
        q_o = q_o.to(tl.float8e4nv)
    return q_e, q_o, e


# Grid = max_blocks * cdiv(I, BN), N tile fastest. Per K block (over D): the block's activation rows [BM, 128]
# gathered by token, re-expressed as e4m3 bytes, and the gate (rows n) and up (rows I + n) weight tiles.
@triton.jit
def _w4a8_gate_up_kernel(x_ptr, w_ptr, o_ptr, b_ptr, slots_ptr, bexp_ptr, rw_ptr, h_ptr,
                         N, KTOP, I, D, n_tiles, max_rows, s_x, s_we, s_wn, s_oe, s_on, s_be, s_bn, s_h, limit,
                         FNUZ: tl.constexpr, F32_DOT: tl.constexpr, OUT_DT: tl.constexpr, OUT_RNE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    tok = slot // KTOP
    rw = tl.load(rw_ptr + slot, mask=ok, other=0.0).to(tl.float32)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < I
    e64 = e.to(tl.int64)
    w_e = w_ptr + e64 * s_we
    o_e = o_ptr + e64 * s_oe
    b_e = b_ptr + e64 * s_be
    a_rows = x_ptr + tok.to(tl.int64) * s_x
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, D // 128):
        q_e, q_o, ea = _a_fp8(a_rows, ok, kb * 128, D, FNUZ, F32_DOT)
        acc_g = w4a8_weight_dot(acc_g, q_e, q_o, ea, w_e, o_e, b_e, n, n_ok, kb, s_wn, s_on, s_bn, FNUZ, F32_DOT, BN)
        acc_u = w4a8_weight_dot(acc_u, q_e, q_o, ea, w_e, o_e, b_e, n + I, n_ok, kb, s_wn, s_on, s_bn, FNUZ,
                                F32_DOT, BN)
    g = tl.minimum(_round_to(acc_g, OUT_DT, OUT_RNE), limit)  # linear's output is in x's dtype
    u = tl.minimum(tl.maximum(_round_to(acc_u, OUT_DT, OUT_RNE), -limit), limit)
    # routing weight before w2; h stays in x's dtype: the down kernel's encode of it is its act_quant
    h = _round_to(g * tl.sigmoid(g) * u * rw[:, None], OUT_DT, OUT_RNE)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * s_h + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


# Grid = max_blocks * cdiv(D, BN). Per K block (over I): the block's h rows [BM, 128] (contiguous, masked by
# slot validity) as e4m3 bytes and one w2 tile; the result, rounded to x's dtype, goes to y[slot].
@triton.jit
def _w4a8_down_kernel(h_ptr, w_ptr, o_ptr, b_ptr, slots_ptr, bexp_ptr, y_ptr,
                      N, I, D, n_tiles, max_rows, s_h, s_we, s_wn, s_oe, s_on, s_be, s_bn, s_y,
                      FNUZ: tl.constexpr, F32_DOT: tl.constexpr, OUT_DT: tl.constexpr, OUT_RNE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < D
    e64 = e.to(tl.int64)
    a_rows = h_ptr + rows.to(tl.int64) * s_h
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, I // 128):
        q_e, q_o, ea = _a_fp8(a_rows, ok, kb * 128, I, FNUZ, F32_DOT)
        acc = w4a8_weight_dot(acc, q_e, q_o, ea, w_ptr + e64 * s_we, o_ptr + e64 * s_oe, b_ptr + e64 * s_be, n, n_ok,
                              kb, s_wn, s_on, s_bn, FNUZ, F32_DOT, BN)
    y = _round_to(acc, OUT_DT, OUT_RNE)
    tl.store(y_ptr + slot.to(tl.int64)[:, None] * s_y + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


# ============================================================================= host side

_PREPARED: dict[tuple[int, bool], tuple] = {}


def prepared(w: torch.Tensor, s: torch.Tensor, dialect: Fp8Dialect, name: str) -> W4A8Experts:
    """prepare_w4a8 of (w, s), once per weight tensor and dialect (cached by identity and version)."""
    key = (id(w), dialect is Fp8Dialect.FNUZ)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    prep = prepare_w4a8(w.view(torch.uint8), s.view(torch.uint8), dialect, name)
    _PREPARED[key] = (weakref.ref(w), w._version, prep)
    return prep


def w4a8_delegate_reason(x, w13, w13_scale, w2, w2_scale, act_quant: bool) -> str | None:
    """Why a call goes to the Triton provider instead (None: the W4A8 kernels take it)."""
    if not act_quant:
        return "W4A8 serves FP8 activations (act_quant) only"
    if weight_format(w13) != "fp4" or weight_format(w2) != "fp4" or w13_scale is None or w2_scale is None:
        return "W4A8 serves MXFP4 experts only"
    D = x.shape[1]
    I = w13.shape[1] // 2
    if D % QB or I % QB:
        return f"W4A8 needs hidden ({D}) and intermediate ({I}) sizes that are multiples of {QB}"
    return None


_WARNED: set[str] = set()


def moe_experts_w4a8_impl(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float, act_quant: bool = False,
                          dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None, *, block_m: int | None = None,
                          h_buf=None, y_buf=None):
    d = Fp8Dialect.parse(dialect)
    why = w4a8_delegate_reason(x, w13, w13_scale, w2, w2_scale, act_quant)
    p13 = p2 = None
    if why is None:
        p13 = prepared(w13, w13_scale, d, f"w13 {tuple(w13.shape)}")
        p2 = prepared(w2, w2_scale, d, f"w2 {tuple(w2.shape)}")
        if p13.bad_blocks or p2.bad_blocks:
            why = "an expert weight has 128-blocks outside the exact FP8 window (counted in the log)"
    if why is not None:
        if why not in _WARNED:
            _WARNED.add(why)
            log.warning("moe_experts triton_w4a8: %s; served by the Triton provider (exact)", why)
        return moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, d,
                                  expert_map)
    T, D, E_loc, I, emap = check_experts_call(x, w13, w2, ids, weights, expert_map)
    if tuple(w13.shape) != (E_loc, 2 * I, D // 2) or tuple(w2.shape) != (E_loc, D, I // 2):
        raise ValueError(f"moe_experts: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match x [T, {D}]")
    k = ids.shape[1]
    N = T * k
    dev = x.device
    out = torch.empty((T, D), dtype=torch.float32, device=dev)
    if T == 0:
        return out
    if N == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    ids_c = ids.contiguous()
    rw = weights.contiguous()
    fnuz = d is Fp8Dialect.FNUZ
    f32_dot = not fp8_e4m3_native(dev, fnuz)
    bm = block_m or (16 if interpreting(dev) else 64)
    bn = QB
    warps = 4 if f32_dot else 8
    rne = interpreting(dev) and x.dtype == torch.bfloat16
    out_dt = _tl_dtype(x.dtype)
    slots, bexp, _, _ = moe_dispatch_triton(ids_c, emap, bm)
    mb, mr = bexp.shape[0], slots.shape[0]
    xa = act_roundtrip(x, d)
    h = torch.empty((mr, I), dtype=x.dtype, device=dev) if h_buf is None else h_buf
    w13b, w2b = w13.view(torch.uint8), w2.view(torch.uint8)
    o13, b13, o2, b2 = p13.offsets, p13.block_scale, p2.offsets, p2.block_scale
    n1 = triton.cdiv(I, bn)
    if mb:
        _w4a8_gate_up_kernel[(mb * n1,)](
            xa, w13b, o13, b13, slots, bexp, rw, h, N, k, I, D, n1, mr, xa.stride(0), w13b.stride(0),
            w13b.stride(1), o13.stride(0), o13.stride(1), b13.stride(0), b13.stride(1), h.stride(0),
            float(swiglu_limit), FNUZ=fnuz, F32_DOT=f32_dot, OUT_DT=out_dt, OUT_RNE=rne, BM=bm, BN=bn,
            num_warps=warps)
    y = torch.empty((N, D), dtype=x.dtype, device=dev) if y_buf is None else y_buf
    n2 = triton.cdiv(D, bn)
    if mb:
        _w4a8_down_kernel[(mb * n2,)](
            h, w2b, o2, b2, slots, bexp, y, N, I, D, n2, mr, h.stride(0), w2b.stride(0), w2b.stride(1),
            o2.stride(0), o2.stride(1), b2.stride(0), b2.stride(1), y.stride(0),
            FNUZ=fnuz, F32_DOT=f32_dot, OUT_DT=out_dt, OUT_RNE=rne, BM=bm, BN=bn, num_warps=warps)
    return moe_combine(y, ids_c, emap, out)


def moe_experts_triton_w4a8(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float,
                            act_quant: bool = False, dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None):
    return moe_experts_w4a8_impl(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                                 expert_map)


# priority below the Triton provider's (100): chosen only when asked for, until measured on a GPU
moe_experts_op.register("triton_w4a8", moe_experts_triton_w4a8, supported=triton_supported, priority=50,
                        interpretable=True)
