"""Triton MoE experts (dsv4/ops/moe.py `moe_experts`: on-device dispatch, grouped gate-up GEMM with SwiGLU
fused, grouped down GEMM, deterministic combine). The router (`moe_route`) is in router.py.

moe_experts pipeline (every size from T, k, num_local and the tile choice: no host syncs, graph-capturable):
  1. dispatch (dsv4/ops/moe_dispatch.py layout, built by moe_dispatch.py in this folder, padding -1). The
     order inside an expert is whatever the atomics give: results do not depend on it (every output row
     depends only on its own input row and the expert's weights; no cross-row reduction).
  2. act_quant: `_act_roundtrip_kernel` rounds x through FP8 per (row, 128) with the fp8_act_quant recipe
     (power-of-two scales, `dialect`) and writes the exact values back in x's dtype (FP8 x 2^e is exact in
     bf16 / fp32), so the GEMMs read ordinary activations.
  3. `_moe_gate_up_kernel`: per block of block_m (token, slot) rows of one expert and BN output columns,
     x rows gathered by token, two accumulators (w1 rows n, w3 rows I + n), then g, u rounded to x's dtype
     (as `linear` returns), silu(min(g, L)) * clamp(u, -L, L) * routing weight, rounded to x's dtype ->
     h [rows, I]. With act_quant the FP8 round trip of h is fused here when the N tile holds whole
     128-column groups, else `_act_roundtrip_kernel` runs on the valid rows of h.
  4. `_moe_down_kernel`: h rows times w2[e]^T, rounded to x's dtype, written to y[slot] (each (token, slot)
     owns one row: no atomics).
  5. `_moe_combine_kernel`: out[t] = sum over j of y[t * k + j] for the local pairs, fp32, fixed order j =
     0..k-1 (deterministic, bit-identical across runs and dialects).

Weights (per expert, as `linear`): dense [N, K] (value rounded to x's dtype, or kept fp32 with act_quant);
FP8 [N, K] + E8M0 per 128 x 128 (raw grid values dotted, block scale applied to the fp32 partial per K tile
of <= 128); FP4 packed [N, K/2] + E8M0 per (row, 32): decoded in registers. The FP4 decode splits K into
even / odd columns (low / high nibbles) so no interleave is needed: acc += A_even W_lo + A_odd W_hi, the A
halves loaded with stride 2. A nibble c becomes fp16 bits ((c & 7) << 9) | ((c & 8) << 12), which is
e2m1(c) * 2^-14 exactly (the fp16 subnormal range lines up with e2m1's, no flush-to-zero on fp16), and is
multiplied by 2^(s - 127 + 14) (one fp32 multiply; scale bytes above 240, i.e. block scales > 2^113, are
not supported). Optionally (GPU only, `FP4_SCALED_DOT`), tl.dot_scaled(bf16, e2m1) does the decode with
Triton's own converter / native MXFP4 MMA where the hardware has it; with few rows per expert on NVIDIA
(r <= FP4_PACKED_MAX_R) the register decode runs in packed PTX instead (`_fp4_unpack_bf16x2`: two values
per 32-bit instruction), which is faster there.

Dot operands: on a GPU bf16 for bf16 activations and for act_quant (FP8 x 2^e activations and FP8 / FP4 x
2^s weights are exact in bf16, so the products are exact and only the fp32 summation order differs from
the reference's fp32 matmul); IEEE fp32 for fp32 activations (and dense fp32 weights with act_quant). In
the interpreter always fp32 (its bf16 dot is wrong), with bf16 roundings done on the bits (its fp32 ->
bf16 cast truncates).

Tile regimes (rows per hit expert r = T k / min(num_local, T k)):
  decode  r <= 16: block_m 16, gate-up BN 64, down BN 64, BK 128, 4 warps: a block is one expert's few
          rows; programs = blocks x (I / 64) and blocks x (D / 64) (~200 / ~400 at T = 1, k = 6), each
          streaming 64 rows of w13 (2 x 64 x D) or w2 once: HBM-bound on the expert weights.
  middle  r <= 32: block_m 32, BN 64 / 64; r <= 64: block_m 64, gate-up BN 64, down BN 128 (fewer
          decodes of each weight tile: expert-parallel decode at high concurrency lands here).
  prefill r > 64:  block_m 64, BN 128, 8 warps, 3 stages: tensor-core bound; blocks of one expert are
          adjacent in the launch order, so w13[e] / w2[e] tiles are reused from L2 across them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (act_quant_store, fp8_block_exponent, fp8_decode, fp8_encode, fp8_pow2,
                                        fp8_quant_max, interpreting, max_shared_mem, pdl_args, pdl_start, register)
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import weight_format
from dsv4.kernels.triton.norm import bf16_rne_bits, cast_out
from dsv4.ops.moe import moe_experts as moe_experts_op
from dsv4.ops.moe import swiglu_op, with_shared
from dsv4.kernels.triton.moe_dispatch import moe_dispatch_triton
from dsv4.kernels.triton.quant import act_quant_out, fp8_act_quant_triton
from dsv4.ops.moe_dispatch import ExpertMap

QB = 128  # FP8 activation quantisation block (channels) and FP8 weight block
W_DENSE, W_FP8, W_FP4 = 0, 1, 2
CHECK_IDS = True  # device-side assert (torch._assert_async) that every expert id is in range


def check_ids(ids_ok: torch.Tensor) -> None:
    """The device-side assert on the dispatch's in-range flag, in eager calls only. Captured graphs leave it
    out (one launch per MoE layer and step, ~2 us each at decode: 43 per step on Flash): the ids come from the
    router's top-k over the experts (in range by construction) or from tid2eid (checked at load,
    model/loader.py), and every graph is captured after an eager forward of its shapes that ran the check."""
    if CHECK_IDS and not (ids_ok.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(ids_ok, "moe_experts: expert id out of range")
# FP4 experts through tl.dot_scaled on NVIDIA GPUs: measured on an H200 (docs/perf.md, Kernels II) 3.3x faster
# at T = 8192, 2.1x at 1024, 1.15x at 64, equal at 1, with identical errors vs the reference. Not enabled on
# ROCm until measured there (the register decode is the portable path).
FP4_SCALED_DOT = True
# The register decode in packed PTX (two values per 32-bit op; NVIDIA only) up to FP4_PACKED_MAX_R rows per
# hit expert, where it beats tl.dot_scaled on an H200: 1.3x at T = 64, 1.15x at T = 256 (docs/perf.md,
# 2026-12-03); with more rows tl.dot_scaled is faster (benchmarks/fp4_decode_sweep.py).
FP4_PACKED_DECODE = True
FP4_PACKED_MAX_R = 8  # rows per hit expert up to which the packed decode is used



# ============================================================================= shared jit helpers


@triton.jit
def _round_to(v, DT: tl.constexpr, RNE_BITS: tl.constexpr):
    """fp32 v rounded to DT (nearest even), returned as fp32. RNE_BITS: bf16 on the bits (the interpreter's
    fp32 -> bf16 cast truncates)."""
    if RNE_BITS:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return v.to(DT).to(tl.float32)


@triton.jit
def _dot(acc, a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _e2m1_x2m14(c):
    """int32 e2m1 codes (0..15, s|ee|m) -> e2m1 value * 2^-14 as fp32, exactly: the 3 magnitude bits placed
    in an fp16's exponent / mantissa fields (ee = 0 lands on fp16 subnormals, which scale the same way)."""
    h = ((c & 7) << 9) | ((c & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp8_roundtrip_groups(v, col_ok, FNUZ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          GW: tl.constexpr):
    """v [BM, BN] fp32 rounded through FP8 e4m3 per (row, GW columns) with the fp8_act_quant recipe
    (amax >= 1e-4, power-of-two scale, clamp 448 / 224 fnuz, RNE), dequantised exactly. Columns outside
    col_ok count as zero (a ragged last group uses the partial amax, as the reference does)."""
    v = tl.where(col_ok[None, :], v, 0.0)
    v3 = tl.reshape(v, (BM, BN // GW, GW))
    amax = tl.maximum(tl.max(tl.abs(v3), axis=2), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)
    qmax = fp8_quant_max(FNUZ)
    y = tl.minimum(tl.maximum(v3 * fp8_pow2(-e)[:, :, None], -qmax), qmax)
    r = fp8_decode(fp8_encode(y, FNUZ), FNUZ) * fp8_pow2(e)[:, :, None]
    return tl.reshape(r, (BM, BN))


@triton.jit
def _wdot(acc, a, w_ptr, s_ptr, wr, n_ok, k0, K, s_wn, s_sn, s_sk,
          W_FMT: tl.constexpr, W_FNUZ: tl.constexpr, VAL_DT: tl.constexpr, VAL_RNE: tl.constexpr,
          DOT_DT: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr):
    """acc += a [BM, BK] @ W[wr, k0:k0+BK]^T for one expert's weight (w_ptr / s_ptr at that expert).
    wr: weight rows [BN]; n_ok their logical mask; K the logical reduction length."""
    kk = k0 + tl.arange(0, BK)
    wr64 = wr.to(tl.int64)
    if W_FMT == 0:  # dense [N, K]: value rounded to x's dtype (plain) / kept fp32 (act_quant)
        w = tl.load(w_ptr + wr64[None, :] * s_wn + kk[:, None], mask=(kk < K)[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = _dot(acc, a, _round_to(w, VAL_DT, VAL_RNE).to(DOT_DT), IEEE)
    elif W_FMT == 1:  # FP8 [N, K] + E8M0 [N/128, K/128]: raw grid values, block scale on the partial
        wb = tl.load(w_ptr + wr64[None, :] * s_wn + kk[:, None], mask=(kk < K)[:, None] & n_ok[None, :], other=0)
        w = fp8_decode(wb, W_FNUZ).to(DOT_DT)
        sb = tl.load(s_ptr + (wr64 // 128) * s_sn + (k0 // 128) * s_sk, mask=n_ok, other=127).to(tl.int32)
        if IEEE:
            part = tl.dot(a, w, input_precision="ieee")
        else:
            part = tl.dot(a, w)
        acc += part * fp8_pow2(sb - 127)[None, :]
    else:  # FP4 through tl.dot_scaled (GPU only): packed [BK/2, BN] bytes, scales [BN, BK/32]
        kb = k0 // 2 + tl.arange(0, BK // 2)
        pb = tl.load(w_ptr + wr64[None, :] * s_wn + kb[:, None], mask=(kb < K // 2)[:, None] & n_ok[None, :],
                     other=0)
        j = k0 // 32 + tl.arange(0, BK // 32)
        sc = tl.load(s_ptr + wr64[:, None] * s_sn + j[None, :] * s_sk,
                     mask=n_ok[:, None] & (j < (K + 31) // 32)[None, :], other=127)
        acc = tl.dot_scaled(a, None, "bf16", pb, sc, "e2m1", acc=acc)
    return acc


@triton.jit
def _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM: tl.constexpr):
    """This program's N tile, expert (-1: unused block, exit), dispatch rows, their (token, slot) pair index
    (0 where invalid) and validity: 0 <= slot < N, the LOGICAL bound, never the padded buffer's."""
    pid = tl.program_id(0)
    pid_n = pid % n_tiles
    b = pid // n_tiles
    e = tl.load(bexp_ptr + b)
    rows = b * BM + tl.arange(0, BM)
    slot = tl.load(slots_ptr + rows, mask=rows < max_rows, other=-1)
    ok = (slot >= 0) & (slot < N)
    return pid_n, e, rows, tl.where(ok, slot, 0), ok


@triton.jit
def _a_even_odd(a_rows, ok, k0, K, DOT_DT: tl.constexpr, BK: tl.constexpr):
    """The activation tile of columns k0 .. k0+BK split into even and odd columns (for the FP4 low / high
    nibbles), rows masked by ok, columns by the logical K."""
    ke = k0 + 2 * tl.arange(0, BK // 2)
    am = ok[:, None] & (ke < K)[None, :]
    a_e = tl.load(a_rows[:, None] + ke[None, :], mask=am, other=0.0).to(DOT_DT)
    a_o = tl.load(a_rows[:, None] + (ke + 1)[None, :], mask=am, other=0.0).to(DOT_DT)
    return a_e, a_o


def _fp4_unpack_asm() -> str:
    """PTX of `_fp4_unpack_bf16x2`: per output register (two bf16 lanes) from the spread bytes t0 (bytes 0, 1)
    or t1 (bytes 2, 3): magnitude bits to 6..8, sign to 15, x 2^112, x the lanes' scale factors."""
    lines = [".reg .b32 t0, t1, m, sg, nz, c;", "mov.b32 nz, 0x80008000;", "mov.b32 c, 0x77807780;",
             "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;"]
    # outputs $0, $1: low nibbles (bits 0..3 of each lane); $2, $3: high nibbles (bits 4..7)
    for out, (src, mag_shift, sign_shift, scale) in enumerate([("t0", 6, 12, "$5"), ("t1", 6, 12, "$6"),
                                                                ("t0", 2, 8, "$5"), ("t1", 2, 8, "$6")]):
        lines += [f"shl.b32 m, {src}, {mag_shift};", "and.b32 m, m, 0x01C001C0;",
                  f"shl.b32 sg, {src}, {sign_shift};", "and.b32 sg, sg, 0x80008000;", "or.b32 m, m, sg;",
                  "fma.rn.bf16x2 m, m, c, nz;", f"fma.rn.bf16x2 ${out}, m, {scale}, nz;"]
    return "{\n" + "\n".join(lines) + "\n}"


_FP4_UNPACK_ASM = tl.constexpr(_fp4_unpack_asm())


@triton.jit
def _fp4_unpack_bf16x2(pb, f):
    """FP4 bytes pb (uint8; low nibble = even column, high = odd) and bf16 factors f = 2^(s - 113) -> the
    (low, high) nibble values e2m1 * 2^(s - 127) in bf16, exactly, in PTX on packed pairs: prmt spreads two
    bytes into the two 16-bit lanes of a register; the 3 magnitude bits go to bf16 bits 6..8 and the sign to
    bit 15 (a bf16 equal to e2m1 * 2^-126: ee = 0 lands on bf16 subnormals, which scale the same way); one
    fma.rn.bf16x2 by 2^112 (+ -0.0) makes that e2m1 * 2^-14 (normal), a second by f applies the block scale.
    Every product is exact (powers of two on values of <= 2 significant bits, in the normal range for scale
    bytes 0..240, the per-value path's range). ~3 instructions per value against ~10 for the per-value
    int -> fp16 -> fp32 -> bf16 path."""
    return tl.inline_asm_elementwise(
        asm=_FP4_UNPACK_ASM,
        constraints="=r,=r,=r,=r,r,r,r",
        args=[pb, f], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _per_byte(f, BK: tl.constexpr, BN: tl.constexpr):
    """Per-(32 columns) factors [BK/32, BN] repeated for each of the 16 bytes of their block: [BK/2, BN]."""
    return tl.reshape(tl.broadcast_to(f[:, None, :], (BK // 32, 16, BN)), (BK // 2, BN))


@triton.jit
def _fp4_dot(acc, a_e, a_o, w_ptr, s_ptr, wr, n_ok, k0, K, s_wn, s_sn, s_sk,
             DOT_DT: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PACKED: tl.constexpr):
    """acc += A_even W_lo + A_odd W_hi for FP4 rows wr of one expert (K columns k0 .. k0+BK): byte c of
    the tile holds columns k0 + 2c (low nibble) and k0 + 2c + 1 (high nibble); scale s[wr, (k0 + 2c) / 32]."""
    c = tl.arange(0, BK // 2)
    kb = k0 // 2 + c
    wr64 = wr.to(tl.int64)
    pb = tl.load(w_ptr + wr64[None, :] * s_wn + kb[:, None], mask=(kb < K // 2)[:, None] & n_ok[None, :],
                 other=0).to(tl.int32)
    j = k0 // 32 + tl.arange(0, BK // 32)
    sb = tl.load(s_ptr + wr64[None, :] * s_sn + j[:, None] * s_sk,
                 mask=(j < (K + 31) // 32)[:, None] & n_ok[None, :], other=127).to(tl.int32)
    if PACKED:  # NVIDIA sm_80+, bf16 dots: two values per 32-bit op
        f = ((tl.minimum(sb, 240) + 14) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 2^(s - 113)
        w_lo, w_hi = _fp4_unpack_bf16x2(pb.to(tl.uint8), _per_byte(f, BK, BN))
    else:
        f = _per_byte(fp8_pow2(tl.minimum(sb, 240) - 113), BK, BN)  # 2^(s - 127) * 2^14, exact
        w_lo = (_e2m1_x2m14(pb & 15) * f).to(DOT_DT)
        w_hi = (_e2m1_x2m14(pb >> 4) * f).to(DOT_DT)
    acc = _dot(acc, a_e, w_lo, IEEE)
    return _dot(acc, a_o, w_hi, IEEE)


# ============================================================================= activation FP8 round trip


# Grid = (rows, cdiv(NB, G)): G groups of 128 channels of one row per program, read once and written once
# (in place for h). HAS_SLOTS: the rows are dispatch rows; padding rows (slot outside 0..N-1) are skipped.
@triton.jit
def _act_roundtrip_kernel(x_ptr, y_ptr, slots_ptr, N, K, NB, s_x, s_y, HAS_SLOTS: tl.constexpr,
                          G: tl.constexpr, FNUZ: tl.constexpr, OUT_RNE: tl.constexpr):
    row = tl.program_id(0)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + row)
        if (slot < 0) | (slot >= N):
            return
    row = row.to(tl.int64)
    bs = tl.program_id(1) * G + tl.arange(0, G)
    cols = bs[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = (bs[:, None] < NB) & (cols < K)
    v = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)
    qmax = fp8_quant_max(FNUZ)
    y = tl.minimum(tl.maximum(v * fp8_pow2(-e)[:, None], -qmax), qmax)
    r = fp8_decode(fp8_encode(y, FNUZ), FNUZ) * fp8_pow2(e)[:, None]  # exact in bf16 / fp32
    tl.store(y_ptr + row * s_y + cols, r.to(y_ptr.dtype.element_ty), mask=mask)


# ============================================================================= grouped expert GEMMs


# Grid = max_blocks * cdiv(I, BN) (N tile fastest: the programs of one block, i.e. one expert, run together
# and each streams its own BN rows of w1 and of w3 once). A program whose block is unused (block_expert -1)
# exits at once. Rows are valid iff their slot is in 0..N-1 (logical bound); invalid rows load zeros, are
# never stored. Per K step: the gathered x tile [BM, BK] (L2-resident), 2 weight tiles [BK, BN], 2 (FP4:
# 4) dots. Epilogue: SwiGLU with the clamps and the routing weight, optional FP8 round trip of h, one
# store of h in x's dtype.
@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, s_ptr, slots_ptr, bexp_ptr, rw_ptr, h_ptr,
                        N, KTOP, I, D, n_tiles, max_rows, s_x, s_we, s_wn, s_se, s_sn, s_sk, s_h, limit,
                        W_FMT: tl.constexpr, W_FNUZ: tl.constexpr, SCALED: tl.constexpr, PACKED: tl.constexpr,
                        VAL_DT: tl.constexpr, VAL_RNE: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr,
                        OUT_DT: tl.constexpr, OUT_RNE: tl.constexpr, HQ: tl.constexpr, FNUZ: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GW: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    tok = slot // KTOP
    rw = tl.load(rw_ptr + slot, mask=ok, other=0.0).to(tl.float32)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < I
    w_e = w_ptr + e.to(tl.int64) * s_we
    s_e = s_ptr + e.to(tl.int64) * s_se
    a_rows = x_ptr + tok.to(tl.int64) * s_x
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if (W_FMT == 2) and (not SCALED):
            a_e, a_o = _a_even_odd(a_rows, ok, k0, D, DOT_DT, BK)
            acc_g = _fp4_dot(acc_g, a_e, a_o, w_e, s_e, n, n_ok, k0, D, s_wn, s_sn, s_sk, DOT_DT, IEEE, BK, BN,
                              PACKED)
            acc_u = _fp4_dot(acc_u, a_e, a_o, w_e, s_e, n + I, n_ok, k0, D, s_wn, s_sn, s_sk, DOT_DT, IEEE, BK,
                             BN, PACKED)
        else:
            kk = k0 + tl.arange(0, BK)
            a = tl.load(a_rows[:, None] + kk[None, :], mask=ok[:, None] & (kk < D)[None, :], other=0.0).to(DOT_DT)
            acc_g = _wdot(acc_g, a, w_e, s_e, n, n_ok, k0, D, s_wn, s_sn, s_sk, W_FMT, W_FNUZ, VAL_DT, VAL_RNE,
                          DOT_DT, IEEE, BK)
            acc_u = _wdot(acc_u, a, w_e, s_e, n + I, n_ok, k0, D, s_wn, s_sn, s_sk, W_FMT, W_FNUZ, VAL_DT,
                          VAL_RNE, DOT_DT, IEEE, BK)
    g = tl.minimum(_round_to(acc_g, OUT_DT, OUT_RNE), limit)  # linear's output is in x's dtype
    u = tl.minimum(tl.maximum(_round_to(acc_u, OUT_DT, OUT_RNE), -limit), limit)
    h = g * tl.sigmoid(g) * u * rw[:, None]  # routing weight before w2 (official order)
    h = _round_to(h, OUT_DT, OUT_RNE)
    if HQ:  # act_quant: FP8 round trip of h per (row, 128 channels) (tile = whole groups)
        h = _fp8_roundtrip_groups(h, n_ok, FNUZ, BM, BN, GW)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * s_h + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


# Grid = max_blocks * cdiv(D, BN), N tile fastest. Per K step (over I): the block's h rows [BM, BK]
# (contiguous, masked by slot validity so padding rows are never read) and one w2 tile [BK, BN]. The
# result, rounded to x's dtype, goes to y[slot] (one row per (token, slot): no atomics, deterministic).
@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, s_ptr, slots_ptr, bexp_ptr, y_ptr,
                     N, I, D, n_tiles, max_rows, s_h, s_we, s_wn, s_se, s_sn, s_sk, s_y,
                     W_FMT: tl.constexpr, W_FNUZ: tl.constexpr, SCALED: tl.constexpr, PACKED: tl.constexpr,
                     VAL_DT: tl.constexpr, VAL_RNE: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr,
                     OUT_DT: tl.constexpr, OUT_RNE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, e, rows, slot, ok = _block_rows(bexp_ptr, slots_ptr, n_tiles, max_rows, N, BM)
    if e < 0:
        return
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < D
    w_e = w_ptr + e.to(tl.int64) * s_we
    s_e = s_ptr + e.to(tl.int64) * s_se
    a_rows = h_ptr + rows.to(tl.int64) * s_h
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        if (W_FMT == 2) and (not SCALED):
            a_e, a_o = _a_even_odd(a_rows, ok, k0, I, DOT_DT, BK)
            acc = _fp4_dot(acc, a_e, a_o, w_e, s_e, n, n_ok, k0, I, s_wn, s_sn, s_sk, DOT_DT, IEEE, BK, BN, PACKED)
        else:
            kk = k0 + tl.arange(0, BK)
            a = tl.load(a_rows[:, None] + kk[None, :], mask=ok[:, None] & (kk < I)[None, :], other=0.0).to(DOT_DT)
            acc = _wdot(acc, a, w_e, s_e, n, n_ok, k0, I, s_wn, s_sn, s_sk, W_FMT, W_FNUZ, VAL_DT, VAL_RNE,
                        DOT_DT, IEEE, BK)
    y = _round_to(acc, OUT_DT, OUT_RNE)
    tl.store(y_ptr + slot.to(tl.int64)[:, None] * s_y + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


# Grid = (cdiv(T, BT), cdiv(D, BD)): out[t, d] = sum_{j < k, pair local} y[t k + j, d] in fp32, j in order.
# Reads the k rows of y once (k D x-dtype bytes per token) and writes D fp32.
# With the shared expert's output (HAS_SHARED): out = (sum + shared in fp32) rounded to out's dtype.
@triton.jit
def _moe_combine_kernel(y_ptr, ids_ptr, g2l_ptr, out_ptr, sh_ptr, T, D, E_glob, s_y, s_o, s_sh,
                        KTOP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_SHARED: tl.constexpr = False,
                        OUT_RNE: tl.constexpr = False):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t_ok = t < T
    d_ok = d < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(KTOP):
        p = t.to(tl.int64) * KTOP + j
        gid = tl.load(ids_ptr + p, mask=t_ok, other=-1).to(tl.int64)
        inr = (gid >= 0) & (gid < E_glob)
        loc = tl.load(g2l_ptr + tl.where(inr, gid, 0), mask=t_ok & inr, other=-1)
        v = t_ok & (loc >= 0)
        acc += tl.load(y_ptr + p[:, None] * s_y + d[None, :], mask=v[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
    o_mask = t_ok[:, None] & d_ok[None, :]
    if HAS_SHARED:
        acc += tl.load(sh_ptr + t.to(tl.int64)[:, None] * s_sh + d[None, :], mask=o_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64)[:, None] * s_o + d[None, :], cast_out(acc, out_ptr, OUT_RNE), mask=o_mask)
    else:
        tl.store(out_ptr + t.to(tl.int64)[:, None] * s_o + d[None, :], acc, mask=o_mask)


# Grid = (T * k, cdiv(I, BN)): for pair row p (token p // k, slot p % k) of a [T k, 2I] gate|up GEMM output
# (in x's dtype, as `linear` returns), h[p] = silu(min(g, L)) * clamp(u, -L, L) * w[p] rounded to x's dtype,
# then (HQ) the FP8 round trip per 128 channels: what _moe_gate_up_kernel's epilogue does, for a gate-up
# GEMM done elsewhere (a vendor provider). Rows of remote experts are skipped (never read downstream).
@triton.jit
def _swiglu_rows_kernel(gu_ptr, ids_ptr, g2l_ptr, rw_ptr, h_ptr, I, E_glob, s_gu, s_h, limit,
                        OUT_RNE: tl.constexpr, OUT_DT: tl.constexpr, HQ: tl.constexpr, FNUZ: tl.constexpr,
                        BN: tl.constexpr, GW: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    gid = tl.load(ids_ptr + p).to(tl.int64)
    inr = (gid >= 0) & (gid < E_glob)
    loc = tl.load(g2l_ptr + tl.where(inr, gid, 0))
    if (not inr) | (loc < 0):
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < I
    g = tl.load(gu_ptr + p * s_gu + n, mask=n_ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + p * s_gu + I + n, mask=n_ok, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    h = _round_to(g * tl.sigmoid(g) * u * tl.load(rw_ptr + p).to(tl.float32), OUT_DT, OUT_RNE)
    if HQ:
        h = tl.reshape(_fp8_roundtrip_groups(tl.reshape(h, (1, BN)), n_ok, FNUZ, 1, BN, GW), (BN,))
    tl.store(h_ptr + p * s_h + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


# Grid = (T, cdiv(I, BN)): h[t] = silu(min(g, L)) * clamp(u, -L, L) for gu[t] = [g | u] in fp32 (silu as torch
# computes it, x / (1 + exp(-x))), rounded once to h's dtype: the shared expert's activation (ops/moe.py swiglu),
# one launch where the reference takes five (upcast, two clamps, silu, product) and a sixth to round.
@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, q_ptr, qs_ptr, I, s_gu, s_h, limit, RNE_BITS: tl.constexpr, BN: tl.constexpr,
                   QUANT: tl.constexpr = False, FNUZ: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BN
    n = n0 + tl.arange(0, BN)
    ok = n < I
    g = tl.load(gu_ptr + t * s_gu + n, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * s_gu + I + n, mask=ok, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    ho = cast_out(h, h_ptr, RNE_BITS)
    tl.store(h_ptr + t * s_h + n, ho, mask=ok)
    if QUANT:  # h's act_quant for the FP8 linear that reads it (BN a multiple of 128)
        act_quant_store(tl.where(ok, ho.to(tl.float32), 0.0)[None, :], tl.zeros([1], tl.int64) + t,
                        tl.full([1], 1, tl.int1), n, q_ptr, qs_ptr, I, tl.cdiv(I, 128), I, 1, BN, FNUZ)


# ============================================================================= host side: experts


def moe_tiles(num_pairs: int, num_local: int, I: int, D: int, dot_f32: bool) -> dict:
    """Tile shapes by rows per hit expert (module docstring: decode / middle / prefill)."""
    r = num_pairs / max(1, min(num_local, num_pairs))
    if r <= 16:
        cfg = dict(block_m=16, bn_gate=64, bn_down=64, num_warps=4, num_stages=4)
    elif r <= 32:
        cfg = dict(block_m=32, bn_gate=64, bn_down=64, num_warps=4, num_stages=4)
    elif r <= 64:  # 64-row blocks: each weight tile decoded once for up to 64 rows (1.6x at r = 48, H200)
        cfg = dict(block_m=64, bn_gate=64, bn_down=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(block_m=64, bn_gate=128, bn_down=128, num_warps=8, num_stages=3)
    if dot_f32:  # fp32 operands: twice the shared memory per stage
        cfg.update(block_m=min(cfg["block_m"], 32), bn_gate=32, bn_down=64, num_warps=4, num_stages=2)
    cfg["bn_gate"] = min(cfg["bn_gate"], max(16, triton.next_power_of_2(I)))
    cfg["bn_down"] = min(cfg["bn_down"], max(16, triton.next_power_of_2(D)))
    cfg["bk_gate"] = min(128, max(32, triton.next_power_of_2(D)))
    cfg["bk_down"] = min(128, max(32, triton.next_power_of_2(I)))
    return cfg


def tile_smem_bytes(block_m: int, bn: int, bk: int, stages: int, x_bytes: int, w_bytes: float, w_tiles: int) -> int:
    """Shared memory a pipelined grouped-GEMM program asks for, estimated from what it stages per K step:
    the activation tile [block_m, bk] and w_tiles weight tiles [bk, bn] as loaded (w_bytes per value: 2 bf16,
    4 fp32, 1 FP8, 0.5 packed FP4), `stages` deep, plus one fp32 [block_m, bn] tile for the epilogue's layout
    conversion."""
    per_stage = block_m * bk * x_bytes + w_tiles * int(bk * bn * w_bytes)
    return stages * per_stage + block_m * bn * 4


def fit_smem(cfg: dict, limit: int | None, x_bytes: int, w13_bytes: float, w2_bytes: float) -> dict:
    """`cfg` with num_stages, then N tiles, then K tiles lowered until both GEMMs' estimated shared memory
    (tile_smem_bytes, plus 10% headroom for what the compiler adds) fits `limit` (None: no limit, the
    interpreter). Without this, bf16 / fp32 dense experts at prefill tiles asked an H200 for 245,760 bytes
    (3 stages of 64 x 128 + 2 x 128 x 128 bf16) and failed to launch; FP4 / FP8 tiles are smaller."""
    if limit is None:
        return cfg
    cfg = dict(cfg)

    def need():
        g = tile_smem_bytes(cfg["block_m"], cfg["bn_gate"], cfg["bk_gate"], cfg["num_stages"], x_bytes, w13_bytes, 2)
        d = tile_smem_bytes(cfg["block_m"], cfg["bn_down"], cfg["bk_down"], cfg["num_stages"], x_bytes, w2_bytes, 1)
        return int(1.1 * max(g, d))

    while need() > limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif max(cfg["bn_gate"], cfg["bn_down"]) > 32:
            key = "bn_gate" if cfg["bn_gate"] >= cfg["bn_down"] else "bn_down"
            cfg[key] //= 2
        elif max(cfg["bk_gate"], cfg["bk_down"]) > 32:
            key = "bk_gate" if cfg["bk_gate"] >= cfg["bk_down"] else "bk_down"
            cfg[key] //= 2
        elif cfg["block_m"] > 16:
            cfg["block_m"] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        else:
            break  # the smallest tiles: nothing left to lower
    return cfg


_FMT_CODE = {"dense": W_DENSE, "fp8": W_FP8, "fp4": W_FP4}
_DOT_BYTES = {tl.float32: 4, tl.bfloat16: 2, tl.float16: 2}  # staged operand bytes per value (fit_smem)
_RAW_BYTES = {W_FP4: 0.5, W_FP8: 1}  # weight bytes per value as loaded; dense: the tensor's element size


def _weight_args(w: torch.Tensor, s, rows: int, K: int, what: str):
    """(format code, fnuz, weight tensor to pass, scale tensor to pass, strides (e, n), scale strides (e, n, k))."""
    fmt = weight_format(w)
    E = w.shape[0]
    if fmt == "fp4":
        want = (E, rows, K // 2)
    else:
        want = (E, rows, K)
    if tuple(w.shape) != want:
        raise ValueError(f"moe_experts: {what} has shape {tuple(w.shape)}, expected {want} ({fmt})")
    if w.stride(2) != 1:
        w = w.contiguous()
    if fmt == "dense":
        return W_DENSE, False, w, w, (w.stride(0), w.stride(1)), (0, 0, 0)
    if s is None:
        raise ValueError(f"moe_experts: {fmt} {what} has no scale")
    sb = s.view(torch.uint8) if s.dtype != torch.uint8 else s
    ws = (E, -(-rows // 128), -(-K // 128)) if fmt == "fp8" else (E, rows, -(-K // 32))
    if tuple(sb.shape) != ws:
        raise ValueError(f"moe_experts: {what} scale has shape {tuple(sb.shape)}, expected {ws}")
    wb = w.view(torch.uint8)
    fnuz = w.dtype == torch.float8_e4m3fnuz
    return _FMT_CODE[fmt], fnuz, wb, sb, (wb.stride(0), wb.stride(1)), (sb.stride(0), sb.stride(1), sb.stride(2))


def _tl_dtype(dt: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dt]


def act_roundtrip(x: torch.Tensor, dialect=Fp8Dialect.OCP, out: torch.Tensor | None = None, slots=None,
                  num_pairs: int = 0) -> torch.Tensor:
    """x [M, K] rounded through FP8 per (row, 128) (fp8_act_quant recipe) and dequantised, in x's dtype
    (exact). With `slots` (dispatch rows), rows whose slot is outside 0..num_pairs-1 are skipped."""
    d = Fp8Dialect.parse(dialect)
    M, K = x.shape
    y = torch.empty_like(x) if out is None else out
    if M == 0 or K == 0:
        return y
    nb = triton.cdiv(K, 128)
    g = max(1, min(8, triton.next_power_of_2(nb)))
    _act_roundtrip_kernel[(M, triton.cdiv(nb, g))](
        x, y, slots if slots is not None else x, num_pairs, K, nb, x.stride(0), y.stride(0),
        HAS_SLOTS=slots is not None, G=g, FNUZ=d is Fp8Dialect.FNUZ, OUT_RNE=False, num_warps=4)
    return y


def moe_combine(y: torch.Tensor, ids: torch.Tensor, expert_map: ExpertMap, out: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, D] fp32 = sum over j of y[t k + j] for the local (token, slot) pairs, j in order 0..k-1; with the
    shared expert's output, out (in shared's dtype: `experts_out`) = that sum + shared, rounded once."""
    T, D = out.shape
    k = ids.shape[1]
    bd = min(256, triton.next_power_of_2(max(D, 1)))
    bt = max(1, min(16, 4096 // bd))
    if shared is not None and (shared.shape != out.shape or shared.dtype != out.dtype or shared.stride(1) != 1):
        raise ValueError(f"moe_combine: shared {tuple(shared.shape)} {shared.dtype} (stride {shared.stride()}) "
                         f"for an output {tuple(out.shape)} {out.dtype}")
    if T and D:
        _moe_combine_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            y, ids, expert_map.global_to_local(out.device), out, out if shared is None else shared, T, D,
            expert_map.num_global, y.stride(0), out.stride(0), 0 if shared is None else shared.stride(0), KTOP=k,
            BT=bt, BD=bd, HAS_SHARED=shared is not None,
            OUT_RNE=interpreting(out.device) and out.dtype == torch.bfloat16, num_warps=4)
    return out


def experts_out(T: int, D: int, device, shared: torch.Tensor | None) -> torch.Tensor:
    """The result buffer of a moe_experts call: float32, or the shared expert output's dtype when it is folded in."""
    if shared is not None and (shared.dim() != 2 or tuple(shared.shape) != (T, D)):
        raise ValueError(f"moe_experts: shared has shape {tuple(shared.shape)}, expected ({T}, {D})")
    return torch.empty((T, D), dtype=torch.float32 if shared is None else shared.dtype, device=device)


def experts_nothing_routed(T: int, D: int, device, shared: torch.Tensor | None) -> torch.Tensor:
    """The result of a call where no pair is computed here: zeros, plus the shared expert's output."""
    return with_shared(torch.zeros((T, D), dtype=torch.float32, device=device), shared)


def swiglu_rows(gu: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert_map: ExpertMap, limit: float,
                act_quant: bool, dialect=Fp8Dialect.OCP, out: torch.Tensor | None = None) -> torch.Tensor:
    """gu [T k, 2I] (gate | up per (token, slot) pair, in x's dtype) -> h [T k, I] in gu's dtype: the SwiGLU
    with the clamps, times the routing weight, rounded, then (act_quant) rounded through FP8 per 128 channels
    exactly as the fused gate-up epilogue does. Rows of pairs whose expert is remote are left unwritten."""
    d = Fp8Dialect.parse(dialect)
    P, I2 = gu.shape
    I = I2 // 2
    h = torch.empty((P, I), dtype=gu.dtype, device=gu.device) if out is None else out
    if P == 0 or I == 0:
        return h
    bn = min(QB, max(16, triton.next_power_of_2(I)))
    rne = interpreting(gu.device) and gu.dtype == torch.bfloat16
    _swiglu_rows_kernel[(P, triton.cdiv(I, bn))](
        gu, ids.contiguous(), expert_map.global_to_local(gu.device), weights.contiguous(), h, I,
        expert_map.num_global, gu.stride(0), h.stride(0), float(limit), OUT_RNE=rne, OUT_DT=_tl_dtype(gu.dtype),
        HQ=bool(act_quant), FNUZ=d is Fp8Dialect.FNUZ, BN=bn, GW=min(bn, QB), num_warps=4)
    return h


def swiglu_triton(gu: torch.Tensor, limit: float, quant=None):
    I2 = gu.shape[-1]
    if I2 % 2:
        raise ValueError(f"swiglu: the last dim {I2} of gu is not gate | up (odd)")
    I = I2 // 2
    g2 = gu.reshape(-1, I2)
    if I2 > 1 and g2.stride(1) != 1:
        g2 = g2.contiguous()
    T = g2.shape[0]
    h = torch.empty((T, I), dtype=gu.dtype, device=gu.device)
    bn = min(1024, max(16, triton.next_power_of_2(I)))
    fuse_q = quant is not None and gu.dim() == 2 and bn >= 128
    q, qs = act_quant_out(T, I, gu.device) if fuse_q else (h, h)
    if T and I:
        _swiglu_kernel[(T, triton.cdiv(I, bn))](g2, h, q, qs, I, g2.stride(0),
                                               h.stride(0), float(limit), RNE_BITS=bf16_rne_bits(gu.dtype), BN=bn,
                                               QUANT=fuse_q, FNUZ=fuse_q and Fp8Dialect.parse(quant) is Fp8Dialect.FNUZ,
                                               **pdl_args(gu.device), num_warps=4)
    h = h.reshape(*gu.shape[:-1], I)
    if quant is None:
        return h
    if gu.dim() != 2:
        raise ValueError(f"swiglu: quant= needs gu as [T, 2I], got {tuple(gu.shape)}")
    return h, ((q, qs) if fuse_q else fp8_act_quant_triton(h, 128, quant))


def check_experts_call(x, w13, w2, ids, weights, expert_map: ExpertMap | None):
    """(T, D, local experts, I, expert map) of a moe_experts call, after checking that x, ids, weights and the
    map agree (the weights' own shapes: _weight_args)."""
    if x.dim() != 2 or ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights "
                         f"{tuple(weights.shape)} do not match")
    T, D = x.shape
    E_loc = w13.shape[0]
    emap = ExpertMap.identity(E_loc) if expert_map is None else expert_map
    if emap.num_local != E_loc or w2.shape[0] != E_loc:
        raise ValueError(f"moe_experts: expert map has {emap.num_local} local experts, weights hold "
                         f"{E_loc} / {w2.shape[0]}")
    return T, D, E_loc, w13.shape[1] // 2, emap


def moe_experts_impl(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float, act_quant: bool = False,
                     dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None, shared=None, *, block_m=None,
                     bn_gate=None, bn_down=None, scaled_dot=None, packed=None, dispatch=None, h_buf=None, y_buf=None):
    """`moe_experts` with test hooks: tile overrides, a precomputed dispatch (slots, block_expert), and the
    h / y workspaces (tests poison them to prove padding rows are never read)."""
    d = Fp8Dialect.parse(dialect)
    T, D, E_loc, I, emap = check_experts_call(x, w13, w2, ids, weights, expert_map)
    f13, fnuz13, w13b, s13, sw13, ss13 = _weight_args(w13, w13_scale, 2 * I, D, "w13")
    f2, fnuz2, w2b, s2, sw2, ss2 = _weight_args(w2, w2_scale, D, I, "w2")
    k = ids.shape[1]
    N = T * k
    dev = x.device
    out = experts_out(T, D, dev, shared)
    if T == 0 or D == 0:
        return out
    if N == 0 or I == 0:
        return experts_nothing_routed(T, D, dev, shared)
    if x.stride(1) != 1:
        x = x.contiguous()
    ids_c = ids.contiguous()
    rw = weights.contiguous()
    interp = interpreting(dev)
    xdt = x.dtype

    def dot_cfg(fmt, wdtype):
        """(DOT_DT, IEEE, VAL_DT) for one GEMM."""
        val_dt = tl.float32 if act_quant else _tl_dtype(xdt)
        if interp:
            return tl.float32, False, val_dt
        exact_bf16 = fmt != W_DENSE or wdtype == torch.bfloat16
        if act_quant and exact_bf16:
            return tl.bfloat16, False, val_dt
        if act_quant or xdt == torch.float32:
            return tl.float32, True, val_dt
        return _tl_dtype(xdt), False, val_dt

    dt13, ieee13, val13 = dot_cfg(f13, w13.dtype)
    dt2, ieee2, val2 = dot_cfg(f2, w2.dtype)
    cfg = moe_tiles(N, E_loc, I, D, ieee13 or ieee2)
    if block_m:
        cfg["block_m"] = block_m
    if bn_gate:
        cfg["bn_gate"] = bn_gate
    if bn_down:
        cfg["bn_down"] = bn_down
    cfg = fit_smem(cfg, max_shared_mem(dev), max(_DOT_BYTES[dt13], _DOT_BYTES[dt2], x.element_size()),
                   _RAW_BYTES.get(f13, w13.element_size()), _RAW_BYTES.get(f2, w2.element_size()))
    bm = cfg["block_m"]
    bn1 = cfg["bn_gate"]
    bn2 = cfg["bn_down"]
    if packed is None:  # the packed register decode where measured faster (few rows per expert), NVIDIA
        packed = (FP4_PACKED_DECODE and torch.version.cuda is not None and dev.type == "cuda"
                  and N / max(1, min(E_loc, N)) <= FP4_PACKED_MAX_R)
    if scaled_dot is None:
        scaled_dot = FP4_SCALED_DOT and not getattr(torch.version, "hip", None) and not packed
    use_scaled = scaled_dot and not interp
    use_packed = packed and not interp
    sc13 = use_scaled and f13 == W_FP4 and dt13 == tl.bfloat16
    sc2 = use_scaled and f2 == W_FP4 and dt2 == tl.bfloat16
    pk13 = use_packed and not sc13 and f13 == W_FP4 and dt13 == tl.bfloat16
    pk2 = use_packed and not sc2 and f2 == W_FP4 and dt2 == tl.bfloat16
    rne = interp and xdt == torch.bfloat16
    out_dt = _tl_dtype(xdt)

    # 1. dispatch
    if dispatch is None:
        slots, bexp, _, _, ids_ok, _ = moe_dispatch_triton(ids_c, emap, bm)
        check_ids(ids_ok)
    else:
        slots, bexp = dispatch[0], dispatch[1]
    mb, mr = bexp.shape[0], slots.shape[0]
    # 2. activations
    xa = act_roundtrip(x, d) if act_quant else x
    # 3. gate-up + SwiGLU (+ FP8 round trip of h when the tile holds whole 128-column groups)
    h = torch.empty((mr, I), dtype=xdt, device=dev) if h_buf is None else h_buf
    hq = act_quant and (bn1 % QB == 0 or bn1 >= I)
    gw = min(bn1, QB)
    n1 = triton.cdiv(I, bn1)
    if mb:
        _moe_gate_up_kernel[(mb * n1,)](
            xa, w13b, s13, slots, bexp, rw, h, N, k, I, D, n1, mr, xa.stride(0), sw13[0], sw13[1],
            ss13[0], ss13[1], ss13[2], h.stride(0), float(swiglu_limit),
            W_FMT=f13, W_FNUZ=fnuz13, SCALED=sc13, PACKED=pk13, VAL_DT=val13,
            VAL_RNE=rne and val13 == tl.bfloat16, DOT_DT=dt13, IEEE=ieee13, OUT_DT=out_dt, OUT_RNE=rne, HQ=hq,
            FNUZ=d is Fp8Dialect.FNUZ,
            BM=bm, BN=bn1, BK=cfg["bk_gate"], GW=gw, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if act_quant and not hq and mr:
        act_roundtrip(h, d, out=h, slots=slots, num_pairs=N)
    # 4. down -> y[slot]
    y = torch.empty((N, D), dtype=xdt, device=dev) if y_buf is None else y_buf
    n2 = triton.cdiv(D, bn2)
    if mb:
        _moe_down_kernel[(mb * n2,)](
            h, w2b, s2, slots, bexp, y, N, I, D, n2, mr, h.stride(0), sw2[0], sw2[1], ss2[0], ss2[1], ss2[2],
            y.stride(0), W_FMT=f2, W_FNUZ=fnuz2, SCALED=sc2, PACKED=pk2, VAL_DT=val2,
            VAL_RNE=rne and val2 == tl.bfloat16,
            DOT_DT=dt2, IEEE=ieee2, OUT_DT=out_dt, OUT_RNE=rne, BM=bm, BN=bn2, BK=cfg["bk_down"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # 5. combine (fixed order over the k slots; the shared expert's output added, rounded once)
    return moe_combine(y, ids_c, emap, out, shared)


def moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float, act_quant: bool = False,
                       dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None, shared=None):
    return moe_experts_impl(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                            expert_map, shared)


register(moe_experts_op, moe_experts_triton)
register(swiglu_op, swiglu_triton)
