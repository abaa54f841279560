"""Triton W4A8 routed experts: provider "triton_w4a8" of `moe_experts` (dsv4/ops/moe.py), opt-in (never chosen by
itself: `--op moe_experts=triton_w4a8`; issue 15 item 2).

The MXFP4 experts stay FP4 in memory. Inside the kernels each weight tile becomes exact, normal FP8 e4m3
operands (dsv4/kernels/triton/w4a8.py: `w4a8_weight_bytes`, PTX on NVIDIA, Triton arithmetic elsewhere;
offsets and block scales from `prepare_w4a8` at the first call, cached per weight tensor), and the FP8 tensor
cores multiply them by the FP8 activations, one dot per 128-block promoted to fp32 with both scales. That is
product for product the official numerics: FP8 activations (act_quant, 1x128 power-of-two scales) times the
dequantised FP4 weight, in fp32.

Pipeline:
  1. dispatch by expert (blocks of block_m rows; the Triton provider's dispatch);
  2. act_quant of x (bytes + E8M0 scales, dsv4/kernels/triton/quant.py), once per call;
  3. `_w4a8_gate_up_kernel`: per block of rows of one expert and 128 output columns, gate and up accumulators
     over the gathered activation bytes, then the Triton provider's epilogue (g, u rounded to x's dtype,
     silu(min(g, L)) * clamp(u, -L, L) * the routing weight, rounded to x's dtype) and the act_quant of that
     h block (the program owns whole 128-column blocks): h bytes + scales;
  4. `_w4a8_down_kernel`: h bytes times w2[e]^T the same way, rounded to x's dtype, into y[slot];
  5. combine in fixed slot order (deterministic; the Triton provider's).
It serves act_quant calls with MXFP4 w13 / w2 whose K dims (D and I) are multiples of 128 and whose blocks all
fit the window (11 binades of sub-block scales per 128-block). Anything else (and a weight with an
out-of-window block, counted in the log at preparation) goes to the Triton provider, which is exact for every
scale. The registered provider also hands over, for speed, the calls where these kernels lose (see
`w4a8_regime_reason`: no PTX conversion, or fewer than 64 rows per expert).

Tiles: 64 rows (FP8 wgmma needs 64 rows per warpgroup; 16 in the interpreter) x 128 output columns, K steps of
128, 4 warps: the fastest of the variants measured on an H100 from T = 8 up (docs/perf.md, 2026-12-06). In the
interpreter (and without native FP8 dots) both operands are decoded to fp32 and dotted in IEEE fp32: the same
exact products.
"""

from __future__ import annotations

import logging
import weakref

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (fp8_block_exponent, fp8_e4m3_native, fp8_encode, fp8_pow2, fp8_quant_max,
                                        interpreting, triton_supported)
from dsv4.kernels.triton.moe import (_block_rows, _round_to, _tl_dtype, check_experts_call, check_ids,
                                    experts_nothing_routed, experts_out, moe_combine, moe_experts_triton)
from dsv4.kernels.triton.moe_dispatch import moe_dispatch_triton
from dsv4.kernels.triton.quant import fp8_act_quant_triton
from dsv4.kernels.triton.w4a8 import W4A8Experts, fp4_asm_supported, fp8_act_block, prepare_w4a8, w4a8_weight_dot
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import weight_format
from dsv4.ops.moe import moe_experts as moe_experts_op
from dsv4.ops.moe_dispatch import ExpertMap

log = logging.getLogger(__name__)
QB = 128


# Grid = max_blocks * cdiv(I, BN), N tile fastest. Per K block (over D): the block's activation bytes [BM, 128]
# gathered by token (x's act_quant, computed once per call) and the gate (rows n) and up (rows I + n) weight
# tiles. The epilogue quantises h per (row, 128 columns): BN is 128, so this program owns whole blocks.
@triton.jit
def _w4a8_gate_up_kernel(xq_ptr, xs_ptr, w_ptr, o_ptr, b_ptr, slots_ptr, bexp_ptr, rw_ptr, hq_ptr, hs_ptr,
                         N, KTOP, I, D, n_tiles, max_rows, s_xq, s_xs, s_we, s_wn, s_oe, s_on, s_be, s_bn, s_hq,
                         s_hs, limit, FNUZ: tl.constexpr, F32_DOT: tl.constexpr, ASM: tl.constexpr,
                         OUT_DT: tl.constexpr, OUT_RNE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    tok = (slot // KTOP).to(tl.int64)
    rw = tl.load(rw_ptr + slot, mask=ok, other=0.0).to(tl.float32)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < I
    e64 = e.to(tl.int64)
    w_e = w_ptr + e64 * s_we
    o_e = o_ptr + e64 * s_oe
    b_e = b_ptr + e64 * s_be
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, D // 128):
        a, ea = fp8_act_block(xq_ptr, xs_ptr, tok, ok, kb, s_xq, s_xs, FNUZ, F32_DOT)
        acc_g = w4a8_weight_dot(acc_g, a, ea, w_e, o_e, b_e, n, n_ok, kb, s_wn, s_on, s_bn, FNUZ, F32_DOT, ASM, BN)
        acc_u = w4a8_weight_dot(acc_u, a, ea, w_e, o_e, b_e, n + I, n_ok, kb, s_wn, s_on, s_bn, FNUZ, F32_DOT, ASM,
                                BN)
    g = tl.minimum(_round_to(acc_g, OUT_DT, OUT_RNE), limit)  # linear's output is in x's dtype
    u = tl.minimum(tl.maximum(_round_to(acc_u, OUT_DT, OUT_RNE), -limit), limit)
    # routing weight before w2; h in x's dtype, then its act_quant (the down GEMM's FP8 input) right here
    h = _round_to(g * tl.sigmoid(g) * u * rw[:, None], OUT_DT, OUT_RNE)
    h = tl.where(n_ok[None, :], h, 0.0)
    eh = fp8_block_exponent(tl.maximum(tl.max(tl.abs(h), axis=1), 1e-4), FNUZ)
    qmax = fp8_quant_max(FNUZ)
    hq = fp8_encode(tl.minimum(tl.maximum(h * fp8_pow2(-eh)[:, None], -qmax), qmax), FNUZ)
    r64 = rows.to(tl.int64)
    tl.store(hq_ptr + r64[:, None] * s_hq + n[None, :], hq.to(tl.uint8), mask=ok[:, None] & n_ok[None, :])
    tl.store(hs_ptr + r64 * s_hs + pid_n, (eh + 127).to(tl.uint8), mask=ok)


# Grid = max_blocks * cdiv(D, BN). Per K block (over I): the block's h bytes [BM, 128] (contiguous dispatch
# rows, masked by slot validity) and one w2 tile; the result, rounded to x's dtype, goes to y[slot].
@triton.jit
def _w4a8_down_kernel(hq_ptr, hs_ptr, w_ptr, o_ptr, b_ptr, slots_ptr, bexp_ptr, y_ptr,
                      N, I, D, n_tiles, max_rows, s_hq, s_hs, s_we, s_wn, s_oe, s_on, s_be, s_bn, s_y,
                      FNUZ: tl.constexpr, F32_DOT: tl.constexpr, ASM: tl.constexpr, OUT_DT: tl.constexpr,
                      OUT_RNE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < D
    e64 = e.to(tl.int64)
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, I // 128):
        a, ea = fp8_act_block(hq_ptr, hs_ptr, r64, ok, kb, s_hq, s_hs, FNUZ, F32_DOT)
        acc = w4a8_weight_dot(acc, a, ea, w_ptr + e64 * s_we, o_ptr + e64 * s_oe, b_ptr + e64 * s_be, n, n_ok, kb,
                              s_wn, s_on, s_bn, FNUZ, F32_DOT, ASM, BN)
    y = _round_to(acc, OUT_DT, OUT_RNE)
    tl.store(y_ptr + slot.to(tl.int64)[:, None] * s_y + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


# ============================================================================= host side

_PREPARED: dict[tuple[int, bool], tuple] = {}


def prepared(w: torch.Tensor, s: torch.Tensor, dialect: Fp8Dialect, name: str) -> W4A8Experts | None:
    """prepare_w4a8 of (w, s), once per weight tensor and dialect (cached by identity and version). None when
    it is not cached and a CUDA graph is being captured: the preparation reads its counts on the host, which a
    capture forbids (the call is then served by the Triton provider, and an eager call prepares)."""
    key = (id(w), dialect is Fp8Dialect.FNUZ)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
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
                          dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None, shared=None, *,
                          block_m: int | None = None,
                          block_n: int = QB, num_warps: int | None = None, num_stages: int | None = None,
                          use_asm: bool | None = None, h_buf=None, y_buf=None):
    d = Fp8Dialect.parse(dialect)
    why = w4a8_delegate_reason(x, w13, w13_scale, w2, w2_scale, act_quant)
    p13 = p2 = None
    if why is None:
        p13 = prepared(w13, w13_scale, d, f"w13 {tuple(w13.shape)}")
        p2 = prepared(w2, w2_scale, d, f"w2 {tuple(w2.shape)}")
        if p13 is None or p2 is None:
            why = "the W4A8 weights are prepared on the first eager call, not inside a CUDA graph capture"
        elif p13.bad_blocks or p2.bad_blocks:
            why = "an expert weight has 128-blocks outside the exact FP8 window (counted in the log)"
    if why is not None:
        if why not in _WARNED:
            _WARNED.add(why)
            log.warning("moe_experts triton_w4a8: %s; served by the Triton provider (exact)", why)
        return moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, d,
                                  expert_map, shared)
    T, D, E_loc, I, emap = check_experts_call(x, w13, w2, ids, weights, expert_map)
    if tuple(w13.shape) != (E_loc, 2 * I, D // 2) or tuple(w2.shape) != (E_loc, D, I // 2):
        raise ValueError(f"moe_experts: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match x [T, {D}]")
    k = ids.shape[1]
    N = T * k
    dev = x.device
    out = experts_out(T, D, dev, shared)
    if T == 0:
        return out
    if N == 0:
        return experts_nothing_routed(T, D, dev, shared)
    if x.stride(1) != 1:
        x = x.contiguous()
    ids_c = ids.contiguous()
    rw = weights.contiguous()
    fnuz = d is Fp8Dialect.FNUZ
    f32_dot = not fp8_e4m3_native(dev, fnuz)
    asm = fp4_asm_supported(dev) if use_asm is None else use_asm
    bm = block_m or (16 if interpreting(dev) else 64)
    bn = block_n
    warps = num_warps or 4
    launch = {"num_warps": warps} if num_stages is None else {"num_warps": warps, "num_stages": num_stages}
    rne = interpreting(dev) and x.dtype == torch.bfloat16
    out_dt = _tl_dtype(x.dtype)
    slots, bexp, _, _, ids_ok, _ = moe_dispatch_triton(ids_c, emap, bm)
    check_ids(ids_ok)
    mb, mr = bexp.shape[0], slots.shape[0]
    xq, xs = fp8_act_quant_triton(x, QB, d)  # x's act_quant: bytes and E8M0 scales, once per call
    if h_buf is None:
        hq = torch.empty((mr, I), dtype=torch.uint8, device=dev)
        hs = torch.empty((mr, I // QB), dtype=torch.uint8, device=dev)
    else:
        hq, hs = h_buf
    w13b, w2b = w13.view(torch.uint8), w2.view(torch.uint8)
    o13, b13, o2, b2 = p13.offsets, p13.block_scale, p2.offsets, p2.block_scale
    n1 = triton.cdiv(I, QB)
    if mb:
        _w4a8_gate_up_kernel[(mb * n1,)](
            xq, xs, w13b, o13, b13, slots, bexp, rw, hq, hs, N, k, I, D, n1, mr, xq.stride(0), xs.stride(0),
            w13b.stride(0), w13b.stride(1), o13.stride(0), o13.stride(1), b13.stride(0), b13.stride(1),
            hq.stride(0), hs.stride(0), float(swiglu_limit), FNUZ=fnuz, F32_DOT=f32_dot, ASM=asm, OUT_DT=out_dt,
            OUT_RNE=rne, BM=bm, BN=QB, **launch)
    y = torch.empty((N, D), dtype=x.dtype, device=dev) if y_buf is None else y_buf
    n2 = triton.cdiv(D, bn)
    if mb:
        _w4a8_down_kernel[(mb * n2,)](
            hq, hs, w2b, o2, b2, slots, bexp, y, N, I, D, n2, mr, hq.stride(0), hs.stride(0), w2b.stride(0),
            w2b.stride(1), o2.stride(0), o2.stride(1), b2.stride(0), b2.stride(1), y.stride(0),
            FNUZ=fnuz, F32_DOT=f32_dot, ASM=asm, OUT_DT=out_dt, OUT_RNE=rne, BM=bm, BN=bn, **launch)
    return moe_combine(y, ids_c, emap, out, shared)


# Where the W4A8 kernels win (H100, 2026-12-06, docs/perf.md): with the PTX conversion and at >= ~64 rows per
# expert (T = 8,192 at Flash shapes: 12.0 ms against 16.8 for the Triton provider; equal at T = 1,024; slower
# below, down to 1.4x at T = 1). The provider serves those calls and hands the others to the Triton provider.
W4A8_MIN_ROWS_PER_EXPERT = 64


def w4a8_regime_reason(x, ids, n_local: int) -> str | None:
    """Why the provider hands a call to the Triton provider for speed (None: W4A8 takes it). Compiled GPU
    runs only; in the interpreter every call runs the W4A8 kernels (their tests)."""
    if interpreting(x.device):
        return None
    if not fp4_asm_supported(x.device):
        return "no PTX FP4 conversion on this device (the Triton-arithmetic one is slower than the Triton provider)"
    if ids.numel() < W4A8_MIN_ROWS_PER_EXPERT * n_local:
        return f"fewer than {W4A8_MIN_ROWS_PER_EXPERT} rows per expert"
    return None


def moe_experts_triton_w4a8(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float,
                            act_quant: bool = False, dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None,
                            shared=None):
    why = w4a8_regime_reason(x, ids, w13.shape[0])
    if why is not None:
        log.debug("moe_experts triton_w4a8: %s; this call runs the Triton provider", why)
        return moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                                  expert_map, shared)
    return moe_experts_w4a8_impl(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                                 expert_map, shared)


# priority below the Triton provider's (100): chosen only when asked for, until measured on a GPU
moe_experts_op.register("triton_w4a8", moe_experts_triton_w4a8, supported=triton_supported, priority=50,
                        interpretable=True)
