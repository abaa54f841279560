"""Triton `linear` and `grouped_linear` (dsv4/ops/linear.py): block-scaled FP8 / MXFP4 weight GEMMs, the
weight dequantised in registers (it is read from HBM once, in its storage format), fp32 accumulation.

One kernel family, `_gemm_kernel`, computes C[g] = A[g] @ W[g]^T for G groups (linear: G = 1; grouped
`wo_a`: G = o_groups, W[g] = weight rows g*R .. g*R+R-1) with
  A: x in its dtype ("plain"), or FP8 bytes + one E8M0 scale per (row, 128 channels) from the Triton
     fp8_act_quant kernel ("official", act_quant=True);
  W: FP8 e4m3 [N, K] (either dialect) + E8M0 scales per 128 x 128 block, or FP4 e2m1 packed [N, K/2] +
     E8M0 scales per (row, 32 channels).
Per K tile of 128 (= one FP8 scale block): part = dot(A_tile, W_tile) in fp32, then
  acc += part * sa[:, None] * sw[None, :]
with the raw (unscaled) FP8 grid values as dot operands, so the block scales are applied once per
[BLOCK_M, BLOCK_N] tile instead of once per weight element, and every dot operand is exact in the dot
dtype (FP8 values have 4 significant bits: exact in bf16/fp16). The official path therefore equals an
fp32 matmul of the exactly dequantised operands up to summation order; the plain path equals the
reference (weight dequantised to x's dtype, matmul in x's dtype with fp32 accumulation) the same way.

Operand decoding, chosen per platform by a constexpr (HW):
  HW = 1 (NVIDIA sm89+, AMD gfx950; OCP weights) / 2 (AMD gfx94x; fnuz weights): the FP8 bytes are
      bitcast to tl.float8e4nv / tl.float8e4b8: the official path dots raw FP8 x FP8 on the FP8 tensor
      cores (the activations are quantised in the weight's dialect, which gives the same values as any
      other dialect: numerics.fp8 module docstring), the plain path converts W to x's dtype in hardware.
  HW = 0 (the CPU interpreter, sm80, a dialect the hardware lacks e.g. fnuz on NVIDIA): bytes are
      decoded by bit arithmetic (common.fp8_decode) to fp32 and cast to the dot dtype (bf16 on a GPU:
      exact; fp32 in the interpreter, whose bf16 dot is wrong). This is the path the CPU tests exercise.
The hardware type is never used on the CPU: the interpreter's float8 casts are wrong.

Dense weights are delegated to torch (F.linear / fp32 matmul after the Triton activation quantiser):
cuBLAS is already at the floor there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (COUNTER_SLOTS, fp8_decode, fp8_pow2, interpreting, pdl_args, pdl_start,
                                        register, tile_counters)
from dsv4.kernels.triton.quant import TILE_ELEMS, _act_quant_kernel, fp8_act_quant_triton
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks
from dsv4.ops.linear import check_out_dtype
from dsv4.ops.linear import grouped_linear as grouped_linear_op
from dsv4.ops.linear import grouped_linear_reference
from dsv4.ops.linear import linear as linear_op
from dsv4.ops.linear import usable_x_q
from dsv4.ops.linear import weight_format

QBLOCK = 128  # FP8 weight / activation scale block along K (and along N for weights)
PREFETCH_W = True  # decode (M <= 64): first weight tile loaded before the PDL wait (_gemm_kernel); knob for A/Bs
LAST_REDUCE = False  # split-K partials summed by the last program of each tile (no reduce launch); off: slower
# on the H200 in a batch-1 decode graph (docs/perf.md 2026-12-07 (c)); knob for A/Bs

# ----------------------------------------------------------------------------- platform facts (cached)
# FP8 tensor-core types by platform: 1 = OCP e4m3fn (tl.float8e4nv), 2 = fnuz (tl.float8e4b8), 0 = none.
# NVIDIA: FP8 MMA from sm89 (Ada) / sm90 (Hopper). AMD: gfx94x (MI300X/MI325X-era CDNA3) has fnuz units,
# gfx950 (CDNA4) OCP ones. Everything else (and the CPU) decodes by bit arithmetic.
_AMD_FP8_ARCH = {"gfx940": 2, "gfx941": 2, "gfx942": 2, "gfx950": 1}


@functools.lru_cache(maxsize=None)
def _device_facts(device_type: str, index: int | None) -> tuple[int, int, bool]:
    """(FP8 hardware kind, number of SMs / CUs, is AMD) of a device; (0, 132, False) for the CPU (an H200's
    SM count, so the interpreter tests exercise the same tile / split-K choices a GPU makes)."""
    if device_type != "cuda":
        return 0, 132, False
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    if getattr(torch.version, "hip", None):
        kind = _AMD_FP8_ARCH.get(str(getattr(props, "gcnArchName", "")).split(":")[0], 0)
        return kind, props.multi_processor_count, True
    kind = 1 if (props.major, props.minor) >= (8, 9) else 0
    return kind, props.multi_processor_count, False


def _facts(device: torch.device) -> tuple[int, int, bool]:
    return _device_facts(device.type, device.index)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _e2m1_decode(c):
    """FP4 e2m1 codes (int32, 0..15: s|ee|m, bias 1) -> float32: e == 0: m/2, else (2 + m) 2^(e-2)."""
    e = (c >> 1) & 3
    m = c & 1
    mag = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0)).to(tl.float32) * 0.5
    return tl.where((c & 8) != 0, -mag, mag)


# Work decomposition: grid = (tiles_m * tiles_n, SPLIT, G). Program (pid, s, g) owns a [BLOCK_M, BLOCK_N]
# output tile of group g (GROUP_M-swizzled over pid, so neighbouring programs share weight tiles in L2)
# and the K tiles s*KT_PER_SPLIT .. (s+1)*KT_PER_SPLIT - 1 (BLOCK_K = 128: one FP8 scale block each). Per
# K tile it reads A [BLOCK_M, 128] (x's dtype, or FP8 bytes + BLOCK_M scale bytes), W [128, BLOCK_N]
# bytes (K contiguous: the "K-major" B operand wgmma / MFMA want) + BLOCK_N scale bytes, does one dot and
# one scaled fp32 accumulate. SPLIT == 1 stores the tile in the output dtype; SPLIT > 1 stores fp32
# partials to a workspace [SPLIT, M, G, R], summed in split order 0..SPLIT-1 (deterministic: the fnuz == OCP
# equalities hold bit for bit on the GPU too) by the last of the tile's programs to finish (LAST_REDUCE: an
# atomic counter per tile, no extra launch) or else by `_splitk_reduce_kernel`. Every weight byte is read
# from HBM once per M tile; the decode regime uses one M tile, so HBM traffic is the weight bytes (the
# floor at small M), and split-K / narrow N tiles give >= ~2 programs per SM so the loads saturate HBM.
# The prefill regime (128 x 128 tiles, 8 warps) is bound by the tensor cores: FP8 x FP8 for the official
# path on FP8 hardware, bf16 x bf16 (W converted in registers) for the plain path.
@triton.jit
def _w_tile(w_row, sw_ptr, wrow, n_ok, kt, K, s_swn, s_swk, A_FP8: tl.constexpr, W_FMT: tl.constexpr,
            W_FNUZ: tl.constexpr, HW: tl.constexpr, DOT_DT: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr):
    """The W tile [BLOCK_K, BLOCK_N] of K tile kt (W^T of the [N, K] weight: K contiguous) as dot operand, and
    its FP8 block scales [BLOCK_N] (FP4: scales folded into the operand; the returned scale is unused)."""
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    if EVEN_K:
        w_mask = n_ok[None, :]
    else:
        w_mask = (k < K)[:, None] & n_ok[None, :]
    if W_FMT == 1:
        wb = tl.load(w_row[None, :] + k[:, None], mask=w_mask, other=0)
        if HW == 1:
            w = wb.to(tl.float8e4nv, bitcast=True)
            if not A_FP8:
                w = w.to(DOT_DT)
        elif HW == 2:
            w = wb.to(tl.float8e4b8, bitcast=True)
            if not A_FP8:
                w = w.to(DOT_DT)
        else:
            w = fp8_decode(wb, W_FNUZ).to(DOT_DT)
        swb = tl.load(sw_ptr + (wrow // 128) * s_swn + kt * s_swk, mask=n_ok, other=127)
        sw = fp8_pow2(swb.to(tl.int32) - 127)
    else:  # FP4 e2m1, two per byte (low nibble first), one E8M0 scale per (row, 32 channels)
        wb = tl.load(w_row[None, :] + (k // 2)[:, None], mask=w_mask, other=0).to(tl.int32)
        c4 = (wb >> ((k & 1) * 4)[:, None]) & 0xF
        swb = tl.load(sw_ptr + wrow[None, :] * s_swn + (k // 32)[:, None] * s_swk, mask=w_mask, other=127)
        w = (_e2m1_decode(c4) * fp8_pow2(swb.to(tl.int32) - 127)).to(DOT_DT)
        sw = tl.zeros_like(wrow).to(tl.float32)
    return w, sw


@triton.jit
def _a_tile_dot(acc, a_row, sa_ptr, rm, m_ok, kt, K, s_sam, w, sw, A_FP8: tl.constexpr, A_FNUZ: tl.constexpr,
                W_FMT: tl.constexpr, HW: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + the A tile [BLOCK_M, BLOCK_K] of K tile kt times the W tile, block scales on the fp32 result."""
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    if EVEN_K:
        a_mask = m_ok[:, None]
    else:
        a_mask = m_ok[:, None] & (k < K)[None, :]
    if A_FP8:
        ab = tl.load(a_row[:, None] + k[None, :], mask=a_mask, other=0)
        if HW == 1:
            a = ab.to(tl.float8e4nv, bitcast=True)
        elif HW == 2:
            a = ab.to(tl.float8e4b8, bitcast=True)
        else:
            a = fp8_decode(ab, A_FNUZ).to(DOT_DT)
        sab = tl.load(sa_ptr + rm.to(tl.int64) * s_sam + kt, mask=m_ok, other=127)  # act_quant: G == 1
        sa = fp8_pow2(sab.to(tl.int32) - 127)
    else:
        a = tl.load(a_row[:, None] + k[None, :], mask=a_mask, other=0.0).to(DOT_DT)
    if IEEE:
        part = tl.dot(a, w, input_precision="ieee")
    else:
        part = tl.dot(a, w)
    if A_FP8:
        if W_FMT == 1:
            part = part * (sa[:, None] * sw[None, :])
        else:
            part = part * sa[:, None]
    elif W_FMT == 1:
        part = part * sw[None, :]
    return acc + part


@triton.jit
def _gemm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, c_ptr, out_ptr, cnt_ptr,
                 M, R, K, num_pid_m, num_pid_n, KT_PER_SPLIT, S,
                 s_am, s_ag, s_sam, s_wn, s_swn, s_swk, s_cm, s_cg, s_cs,
                 A_FP8: tl.constexpr, A_FNUZ: tl.constexpr, W_FMT: tl.constexpr, W_FNUZ: tl.constexpr,
                 HW: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, PREFETCH: tl.constexpr = False, LAST_REDUCE: tl.constexpr = False,
                 PDL: tl.constexpr = False):
    # PREFETCH (decode): the first K tile's weights are loaded before waiting for the previous kernel (PDL): the
    # weights are constants, so their stream starts while the kernel producing the activations still runs.
    if not PREFETCH:
        pdl_start(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    # GROUP_M swizzle: GROUP_M row tiles walk the N tiles together (L2 reuse of W in prefill)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsize
    pid_n = (pid % in_group) // gsize

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M  # logical bounds: rows of this group's A, rows of this group's W
    n_ok = rn < R
    wrow = g * R + rn.to(tl.int64)  # global weight row (scale blocks of 128 rows may straddle groups)
    a_row = a_ptr + g * s_ag + rm.to(tl.int64) * s_am
    w_row = w_ptr + wrow * s_wn

    nkt = tl.cdiv(K, BLOCK_K)
    kt0 = pid_k * KT_PER_SPLIT
    kt1 = tl.minimum(kt0 + KT_PER_SPLIT, nkt)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:  # every split has at least one K tile (_run_gemm: no empty splits)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        w, sw = _w_tile(w_row, sw_ptr, wrow, n_ok, kt0, K, s_swn, s_swk, A_FP8, W_FMT, W_FNUZ, HW, DOT_DT, BLOCK_K,
                        EVEN_K)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = _a_tile_dot(acc, a_row, sa_ptr, rm, m_ok, kt0, K, s_sam, w, sw, A_FP8, A_FNUZ, W_FMT, HW, DOT_DT,
                          IEEE, BLOCK_K, EVEN_K)
        kt0 += 1
    for kt in range(kt0, kt1):
        w, sw = _w_tile(w_row, sw_ptr, wrow, n_ok, kt, K, s_swn, s_swk, A_FP8, W_FMT, W_FNUZ, HW, DOT_DT, BLOCK_K,
                        EVEN_K)
        acc = _a_tile_dot(acc, a_row, sa_ptr, rm, m_ok, kt, K, s_sam, w, sw, A_FP8, A_FNUZ, W_FMT, HW, DOT_DT,
                          IEEE, BLOCK_K, EVEN_K)

    off = g * s_cg + rm.to(tl.int64)[:, None] * s_cm + rn[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(c_ptr + pid_k.to(tl.int64) * s_cs + off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if LAST_REDUCE:
        # c_ptr is the fp32 workspace [S, ...]: the last of this tile's S programs to finish sums the partials in
        # split order 0..S-1 (the order of _splitk_reduce_kernel: the same bits), writes the output and resets the
        # tile's counter to 0 for the next call / graph replay.
        tl.debug_barrier()  # every thread's partial is stored before the program counts itself done
        tile = g * (num_pid_m * num_pid_n) + pid
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == S - 1:
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            p = c_ptr + off
            for _ in range(0, S):
                tot += tl.load(p, mask=c_mask, other=0.0, cache_modifier=".cg")
                p += s_cs
            tl.store(out_ptr + off, tot.to(out_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


# Split-K reduction: grid = cdiv(numel, BLOCK); each program sums its BLOCK outputs over the S fp32
# partials in order and casts once. Bytes: S * numel * 4 read + numel * out size written; `_pick_tiles`
# caps S (decode: the partials stay under a quarter of the weight bytes; otherwise S <= 4).
@triton.jit
def _splitk_reduce_kernel(ws_ptr, out_ptr, numel, S, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p = ws_ptr + offs
    for _ in range(0, S):  # pointer increments: no int32 product s * numel
        acc += tl.load(p, mask=mask, other=0.0)
        p += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# E8M0 activation scale bytes [M, NB] -> fp32 powers of two, written K-block-major into a [NB, MP] buffer
# (its transpose is the (MP, NB) "outer-dim-major" scale cuBLASLt's 1x128 block scaling takes); columns
# M .. MP-1 (row padding to a multiple of 4) get 1.0. Grid = (cdiv(MP, BLOCK), NB); tiny.
@triton.jit
def _scale_f32_t_kernel(s_ptr, out_ptr, M, MP, s_sm, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    kb = tl.program_id(1)
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sb = tl.load(s_ptr + m.to(tl.int64) * s_sm + kb, mask=m < M, other=127)
    tl.store(out_ptr + kb.to(tl.int64) * MP + m, fp8_pow2(sb.to(tl.int32) - 127), mask=m < MP)


# ----------------------------------------------------------------------------- host side


def act_quant_into(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, dialect=Fp8Dialect.OCP) -> None:
    """The fp8_act_quant Triton kernel (kernels/triton/quant.py, same launch parameters as its wrapper)
    writing rows 0..M-1 of caller-owned buffers q [>= M, K] uint8 and s [>= M, ceil(K/128)] uint8."""
    d = Fp8Dialect.parse(dialect)
    M, K = x2.shape
    nb = -(-K // QBLOCK)
    if M == 0 or K == 0:
        return
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    g = max(1, min(TILE_ELEMS // QBLOCK, triton.next_power_of_2(nb)))
    _act_quant_kernel[(M, triton.cdiv(nb, g))](
        x2, q, s, K, nb, QBLOCK, x2.stride(0), q.stride(0), s.stride(0),
        G=g, BLOCK_P=QBLOCK, FNUZ=d is Fp8Dialect.FNUZ,
        **pdl_args(x2.device), num_warps=max(1, min(8, g * QBLOCK // 512)))


def act_scales_f32_t(s: torch.Tensor, rows: int) -> torch.Tensor:
    """E8M0 bytes [M, NB] -> fp32 scales of shape (rows, NB) with strides (1, rows) (rows >= M; the extra
    rows are 1.0): the activation-scale layout of cuBLASLt 1x128 block scaling."""
    M, nb = s.shape
    buf = torch.empty((nb, rows), dtype=torch.float32, device=s.device)
    if nb and rows:
        blk = min(1024, triton.next_power_of_2(rows))
        _scale_f32_t_kernel[(triton.cdiv(rows, blk), nb)](s, buf, M, rows, s.stride(0), BLOCK=blk,
                                                          **pdl_args(s.device), num_warps=4)
    return buf.t()


def _pick_tiles(M: int, R: int, K: int, G: int, w_bytes_per_elem: float, nsm: int, dot_f32: bool,
                amd: bool = False):
    """Tile shape and split-K by the rows per group M (stated regimes; the GPU check reports how close
    each gets to its roofline). BLOCK_K = 128 always (one FP8 scale block).
      decode  (M <= 64):  BLOCK_M = max(16, next_pow2(M)) (one M tile: W is read from HBM once),
                          BLOCK_N 64 (32 when there are fewer tiles than SMs), 4 warps, 4 stages; split-K
                          to ~2 programs per SM, capped so the fp32 partials (S * M * N * 8 bytes
                          written + read) stay under 1/4 of the weight bytes. HBM-bound on the weight.
      middle  (M <= 256): 64 x 128 tiles (64 x 64 when fewer tiles than SMs), 4 warps, 4 stages, split-K
                          up to 4 while tiles < SMs (the partials are small next to the FLOPs).
      prefill (M > 256):  128 x 128 tiles (128 x 64 when fewer tiles than SMs), 8 warps, 3 stages,
                          GROUP_M 8 swizzle, split-K up to 4 while tiles < SMs. Matrix-rate-bound.
    Narrower N tiles before split-K: they add programs without partials, at the price of re-reading the
    A tile from L2 once more per N tile. fp32 dots (x in fp32) halve the tiles (shared memory); AMD
    (64 KiB LDS) uses 2 stages, 4 warps and at most 64-row tiles (compiled for gfx942 / gfx950, never run)."""
    decode = M <= 64
    if decode:
        bm, bn, bn_min, warps, stages, gm = max(16, triton.next_power_of_2(M)), 64, 32, 4, 4, 1
    elif M <= 256:
        bm, bn, bn_min, warps, stages, gm = 64, 128, 64, 4, 4, 8
    else:
        bm, bn, bn_min, warps, stages, gm = 128, 128, 64, 8, 3, 8
    if dot_f32:  # fp32 operands (x in fp32): twice the shared memory per stage
        bm, bn, bn_min, warps, stages = min(bm, 64), min(bn, 64), min(bn_min, 64), 4, 2
    if amd:
        bm, warps, stages = min(bm, 64), 4, 2
    tiles_m = triton.cdiv(M, bm) * G
    while bn > bn_min and tiles_m * triton.cdiv(R, bn) < nsm:
        bn //= 2
    tiles = tiles_m * triton.cdiv(R, bn)
    nkt = triton.cdiv(K, QBLOCK)
    split = 1
    if tiles < nsm:
        if decode:
            cap = max(1, int(K * w_bytes_per_elem) // (32 * M))
            split = min(triton.cdiv(2 * nsm, tiles), cap, nkt)
        else:
            split = min(triton.cdiv(nsm, tiles), 4, nkt)
    return dict(block_m=bm, block_n=bn, split_k=max(1, split), num_warps=warps, num_stages=stages, group_m=gm)


def _run_gemm(a, sa, weight, w_scale, out_view, M, R, K, G, *, a_fp8: bool, a_fnuz: bool, w_fmt: int,
              w_fnuz: bool, hw: int, dot_dt, ieee: bool, cfg: dict, s_a: tuple, s_c: tuple):
    """Launch `_gemm_kernel` (+ the split-K reduction). out_view is the contiguous output [M, G*R] (G == 1)
    or [M, G, R]; s_a = (row stride, group stride) of A; s_c = (row stride, group stride) of the output."""
    bm, bn, split = cfg["block_m"], cfg["block_n"], cfg["split_k"]
    nkt = triton.cdiv(K, QBLOCK)
    kt_per = triton.cdiv(nkt, max(1, min(split, nkt)))
    split = triton.cdiv(nkt, kt_per)  # no empty splits
    num_pid_m, num_pid_n = triton.cdiv(M, bm), triton.cdiv(R, bn)
    numel = out_view.numel()
    tiles = num_pid_m * num_pid_n * G
    cnt = tile_counters(out_view.device) if (split > 1 and LAST_REDUCE and tiles <= COUNTER_SLOTS) else None
    if split > 1:
        target = torch.empty((split, numel), dtype=torch.float32, device=out_view.device)
        s_cs = numel
    else:
        target, s_cs = out_view, 0
    sa_arg = sa if sa is not None else a
    s_sam = sa.stride(0) if sa is not None else 0
    grid = (num_pid_m * num_pid_n, split, G)
    _gemm_kernel[grid](
        a, sa_arg, weight, w_scale, target, out_view, cnt if cnt is not None else target,
        M, R, K, num_pid_m, num_pid_n, kt_per, split,
        s_a[0], s_a[1], s_sam, weight.stride(0), w_scale.stride(0), w_scale.stride(1), s_c[0], s_c[1], s_cs,
        A_FP8=a_fp8, A_FNUZ=a_fnuz, W_FMT=w_fmt, W_FNUZ=w_fnuz, HW=hw, DOT_DT=dot_dt, IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=QBLOCK, GROUP_M=cfg["group_m"], EVEN_K=K % QBLOCK == 0,
        PREFETCH=PREFETCH_W and M <= 64, LAST_REDUCE=cnt is not None, **pdl_args(out_view.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and cnt is None:
        blk = 1024
        _splitk_reduce_kernel[(triton.cdiv(numel, blk),)](target, out_view, numel, split, BLOCK=blk,
                                                          **pdl_args(out_view.device), num_warps=4)


def _check_weight(weight: torch.Tensor, scale, N: int, K: int, fmt: str, what: str) -> torch.Tensor:
    if scale is None:
        raise ValueError(f"{what}: {fmt} weight of shape {tuple(weight.shape)} has no scale")
    sb = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    want = (-(-N // QBLOCK), -(-K // QBLOCK)) if fmt == "fp8" else (N, -(-K // 32))
    if tuple(sb.shape) != want:
        raise ValueError(f"{what}: {fmt} weight {tuple(weight.shape)} needs scale {want}, got {tuple(sb.shape)}")
    if weight.stride(1) != 1:
        raise ValueError(f"{what}: weight rows must be contiguous (stride {weight.stride()})")
    return sb


def _dot_dtype(x_dtype: torch.dtype, interp: bool, act_quant: bool):
    """(dot operand dtype, IEEE fp32 dot). Interpreter: fp32 (its bf16 dot is wrong). GPU: x's dtype for the
    plain path (fp32 x: IEEE fp32, matching torch's fp32 matmul, never TF32); bf16 for the official path
    (FP8 grid values times powers of two: exact)."""
    if interp:
        return tl.float32, False
    if act_quant:
        return tl.bfloat16, False
    if x_dtype == torch.float32:
        return tl.float32, True
    return (tl.float16 if x_dtype == torch.float16 else tl.bfloat16), False


_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_out_dtype_ok(dev: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) runs on bf16 operands on `dev` and gives the float32 sum of
    their exact products (cuBLAS / hipBLASLt bf16 GEMM with a float32 result; torch >= 2.9 on CUDA / ROCm).
    Probed once per device on a K = 4096 product whose float32 rounding would show (checked against the float32
    matmul of the upcast operands)."""
    key = str(dev)
    if key not in _MM_OUT_DTYPE:
        ok = False
        if dev.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(3, 4096, generator=g).to(torch.bfloat16)
                b = torch.randn(4096, 40, generator=g).to(torch.bfloat16)
                got = torch.mm(a.to(dev), b.to(dev), out_dtype=torch.float32).cpu()
                want = a.double() @ b.double()
                ok = got.dtype == torch.float32 and float((got.double() - want).abs().max()) < 1e-3
            except (RuntimeError, TypeError):  # no aten::mm.dtype for this backend / torch
                ok = False
        _MM_OUT_DTYPE[key] = ok
    return _MM_OUT_DTYPE[key]


def dense_linear_out(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`linear(x, dense weight, out_dtype=)`: one bf16 / fp16 GEMM with a float32 result where the backend has one
    (the weight read in its own dtype: half the bytes of an upcast copy); else x and W cast to out_dtype."""
    if (out_dtype == torch.float32 and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.device.type != "cpu" and _mm_out_dtype_ok(x.device)):
        K = x.shape[-1]
        y = torch.mm(x.reshape(-1, K), weight.t(), out_dtype=torch.float32)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x.to(out_dtype), weight.to(out_dtype))


def linear_impl(x, weight, scale=None, act_quant: bool = False, dialect=Fp8Dialect.OCP, x_q=None, *, block_m=None,
                block_n=None, split_k=None, hw=None, out_dtype=None, num_stages=None, num_warps=None):
    """`linear` with optional tile and launch overrides (tests, benchmarks/linear_small_m.py): see the module
    docstring."""
    fmt = weight_format(weight)
    if out_dtype is not None:
        check_out_dtype(weight, act_quant, out_dtype)
        return dense_linear_out(x, weight, out_dtype)
    if fmt == "dense":
        if not act_quant:
            return F.linear(x, weight.to(x.dtype))
        # rare (a dense checkpoint in official numerics): Triton activation quantiser + an fp32 matmul
        K = x.shape[-1]
        q, s = fp8_act_quant_triton(x.reshape(-1, K), QBLOCK, dialect)
        xd = dequantize_fp8_blocks(q, s, (QBLOCK,), dialect)
        return (xd @ weight.to(torch.float32).t()).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    K = x.shape[-1]
    lead = x.shape[:-1]
    N = weight.shape[0]
    if fmt == "fp8":
        if weight.shape[1] != K:
            raise ValueError(f"linear: x has K={K}, FP8 weight is {tuple(weight.shape)}")
        w_fnuz = weight.dtype == torch.float8_e4m3fnuz
        wd = Fp8Dialect.FNUZ if w_fnuz else Fp8Dialect.OCP
        wbytes = weight.view(torch.uint8)
        w_fmt = 1
    else:
        if weight.shape[1] * 2 != K:
            raise ValueError(f"linear: x has K={K}, FP4 weight is {tuple(weight.shape)} (K/2 bytes per row)")
        w_fnuz = False
        wd = Fp8Dialect.parse(dialect)
        wbytes = weight.view(torch.uint8)
        w_fmt = 2
    sb = _check_weight(wbytes, scale, N, K, fmt, "linear")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dev = x.device
    interp = interpreting(dev)
    out_dtype = torch.float32 if interp else x.dtype  # interpreter: the final rounding is torch's (RNE)
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out.to(x.dtype).reshape(*lead, N)
    if K == 0:
        return out.zero_().to(x.dtype).reshape(*lead, N)
    kind, nsm, amd = _facts(dev)
    if hw is None:
        hw = kind if (fmt == "fp8" and not interp and kind == (2 if w_fnuz else 1)) else 0
    dot_dt, ieee = _dot_dtype(x.dtype, interp, act_quant)
    if act_quant:
        # activations quantised in the weight's dialect (FP4: the requested one): the same values either way;
        # the producer's bytes (x_q) when it made them in that dialect
        if Fp8Dialect.parse(dialect) is wd and usable_x_q(x_q, M, K):
            a, sa = x_q
        else:
            a, sa = fp8_act_quant_triton(x2, QBLOCK, wd)
        s_a = (a.stride(0), 0)
    else:
        a, sa = (x2 if x2.stride(1) == 1 else x2.contiguous()), None
        s_a = (a.stride(0), 0)
    cfg = _pick_tiles(M, N, K, 1, 1.0 if w_fmt == 1 else 0.5, nsm, ieee, amd)
    cfg.update({k: v for k, v in (("block_m", block_m), ("block_n", block_n), ("split_k", split_k),
                                  ("num_stages", num_stages), ("num_warps", num_warps)) if v})
    _run_gemm(a, sa, wbytes, sb, out, M, N, K, 1, a_fp8=act_quant, a_fnuz=act_quant and wd is Fp8Dialect.FNUZ,
              w_fmt=w_fmt, w_fnuz=w_fnuz, hw=hw, dot_dt=dot_dt, ieee=ieee, cfg=cfg, s_a=s_a, s_c=(N, 0))
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(*lead, N)


def linear_triton(x, weight, scale=None, act_quant: bool = False, dialect=Fp8Dialect.OCP, x_q=None, out_dtype=None):
    return linear_impl(x, weight, scale, act_quant, dialect, x_q, out_dtype=out_dtype)


def grouped_linear_impl(x, weight, scale=None, *, block_m=None, block_n=None, split_k=None, hw=None):
    """`grouped_linear` (the `wo_a` projection): one launch over all groups (grid axis 2 = group)."""
    fmt = weight_format(weight)
    if fmt == "dense":
        return grouped_linear_reference(x, weight, scale)  # one batched cuBLAS GEMM
    M, G, Kg = x.shape
    N = weight.shape[0]
    if N % G:
        raise ValueError(f"grouped_linear: weight rows {N} not divisible by {G} groups")
    R = N // G
    if fmt == "fp8":
        if weight.shape[1] != Kg:
            raise ValueError(f"grouped_linear: x has Kg={Kg}, weight is {tuple(weight.shape)}")
        w_fmt, w_fnuz = 1, weight.dtype == torch.float8_e4m3fnuz
    else:
        if weight.shape[1] * 2 != Kg:
            raise ValueError(f"grouped_linear: x has Kg={Kg}, FP4 weight is {tuple(weight.shape)}")
        w_fmt, w_fnuz = 2, False
    wbytes = weight.view(torch.uint8)
    sb = _check_weight(wbytes, scale, N, Kg, fmt, "grouped_linear")
    dev = x.device
    interp = interpreting(dev)
    out = torch.empty((M, G, R), dtype=torch.float32 if interp else x.dtype, device=dev)
    if M == 0 or R == 0:
        return out.to(x.dtype)
    if Kg == 0:
        return out.zero_().to(x.dtype)
    if x.stride(2) != 1:
        x = x.contiguous()
    kind, nsm, amd = _facts(dev)
    if hw is None:
        hw = kind if (fmt == "fp8" and not interp and kind == (2 if w_fnuz else 1)) else 0
    dot_dt, ieee = _dot_dtype(x.dtype, interp, False)
    cfg = _pick_tiles(M, R, Kg, G, 1.0 if w_fmt == 1 else 0.5, nsm, ieee, amd)
    cfg.update({k: v for k, v in (("block_m", block_m), ("block_n", block_n), ("split_k", split_k)) if v})
    _run_gemm(x, None, wbytes, sb, out, M, R, Kg, G, a_fp8=False, a_fnuz=False, w_fmt=w_fmt, w_fnuz=w_fnuz,
              hw=hw, dot_dt=dot_dt, ieee=ieee, cfg=cfg, s_a=(x.stride(0), x.stride(1)), s_c=(G * R, R))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def grouped_linear_triton(x, weight, scale=None):
    return grouped_linear_impl(x, weight, scale)


register(linear_op, linear_triton)
register(grouped_linear_op, grouped_linear_triton)
