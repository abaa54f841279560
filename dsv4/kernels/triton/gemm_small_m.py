"""Triton `linear` at decode sizes (issue 16 item 4): FP8 block weights, official numerics (FP8
activations), M <= 16 rows, ONE launch per call.

At one to a few rows an FP8 linear is bound by reading its weight once, and for the attention projections
and the shared expert (2-64 MB) that takes 1-20 us; the general path spends three launches on it (the
activation quantiser, the GEMM, the split-K reduction; cuBLASLt's blockwise GEMM likewise needs the
quantiser and a scale-layout kernel), each a few microseconds of latency even inside a CUDA graph. Here:
  - the activations are quantised in the prologue of every program, per (row, 128 channels) with the
    power-of-two scale of the standalone quantiser (quant.py: same exponent, clamp and rounding, so the
    same FP8 values), never written to memory;
  - split-K partials go to an fp32 workspace and the LAST program of each output tile to finish (an
    atomic counter per tile) sums them in split order 0..S-1 and writes the output, then resets its
    counter to zero for the next call or graph replay. The sum order is fixed, so results are
    deterministic and equal the general Triton path's (gemm.py: same tiles, same order) bit for bit.
The tiles are gemm.py's decode regime (_pick_tiles). The counters live in one zeroed int32 buffer per
device, reused by every call: calls on one device must not run concurrently on two streams (the engine
runs its forward on one stream).

Provider `triton_small_m` (opt-in, `--op linear=triton_small_m`): this kernel where it applies (FP8
weight, act_quant, M <= 16), the platform's default linear provider otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (fp8_block_exponent, fp8_decode, fp8_encode, fp8_pow2, fp8_quant_max,
                                        interpreting, triton_supported)
from dsv4.kernels.triton.gemm import QBLOCK, _check_weight, _facts, _pick_tiles, linear_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import linear as linear_op
from dsv4.ops.linear import weight_format

MAX_M = 16


@triton.jit
def _small_m_kernel(x_ptr, w_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KT_PER_SPLIT, S,
                    s_xm, s_wn, s_swn, s_om,
                    FNUZ: tl.constexpr, HW: tl.constexpr, DOT_DT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    m_ok = rm < M
    n_ok = rn < N
    x_row = x_ptr + rm.to(tl.int64) * s_xm
    w_row = w_ptr + rn.to(tl.int64) * s_wn
    qmax = fp8_quant_max(FNUZ)
    nkt = tl.cdiv(K, 128)
    kt0 = pid_k * KT_PER_SPLIT
    kt1 = tl.minimum(kt0 + KT_PER_SPLIT, nkt)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt0, kt1):
        k = kt * 128 + rk
        if EVEN_K:
            a_mask = m_ok[:, None]
            w_mask = n_ok[None, :]
        else:
            a_mask = m_ok[:, None] & (k < K)[None, :]
            w_mask = (k < K)[:, None] & n_ok[None, :]
        # ---- A: this block of x quantised as the standalone quantiser does (quant.py _act_quant_kernel)
        xv = tl.load(x_row[:, None] + k[None, :], mask=a_mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xv), axis=1), AMAX_FLOOR)
        e = fp8_block_exponent(amax, FNUZ)
        ab = fp8_encode(tl.minimum(tl.maximum(xv * fp8_pow2(-e)[:, None], -qmax), qmax), FNUZ)
        if HW == 1:
            a = ab.to(tl.float8e4nv, bitcast=True)
        elif HW == 2:
            a = ab.to(tl.float8e4b8, bitcast=True)
        else:
            a = fp8_decode(ab, FNUZ).to(DOT_DT)
        # ---- W tile [128, BLOCK_N] (K contiguous) and its block scales
        wb = tl.load(w_row[None, :] + k[:, None], mask=w_mask, other=0)
        if HW == 1:
            w = wb.to(tl.float8e4nv, bitcast=True)
        elif HW == 2:
            w = wb.to(tl.float8e4b8, bitcast=True)
        else:
            w = fp8_decode(wb, FNUZ).to(DOT_DT)
        swb = tl.load(sw_ptr + (rn // 128) * s_swn + kt, mask=n_ok, other=127)
        part = tl.dot(a, w)
        acc += part * (fp8_pow2(e)[:, None] * fp8_pow2(swb.to(tl.int32) - 127)[None, :])

    o_off = rm.to(tl.int64)[:, None] * s_om + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if S == 1:
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        MN = M * N
        p_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * MN + p_off, acc, mask=o_mask)
        tl.debug_barrier()  # every thread's partial is stored before the program counts itself done
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == S - 1:  # the last of the tile's S programs: sum in split order, write, reset the counter
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, S):
                tot += tl.load(ws_ptr + s * MN + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + o_off, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def small_m_reason(x, weight, scale, act_quant) -> str | None:
    """Why this call is not for the small-M kernel (None: it is). Host metadata only."""
    if not act_quant:
        return "plain numerics (act_quant False)"
    if weight_format(weight) != "fp8":
        return f"weight dtype {weight.dtype} (FP8 block weights only)"
    M = x.numel() // max(1, x.shape[-1])
    if M > MAX_M or M == 0:
        return f"M = {M} rows (1..{MAX_M})"
    if x.shape[-1] != weight.shape[1] or x.shape[-1] == 0 or weight.shape[0] == 0:
        return f"shape x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    return None


def linear_small_m(x, weight, scale=None, act_quant: bool = True, dialect=Fp8Dialect.OCP, *, block_n=None,
                   split_k=None):
    """`linear` for FP8 block weights, act_quant, 1 <= M <= 16 rows: one launch (module docstring)."""
    why = small_m_reason(x, weight, scale, act_quant)
    if why is not None:
        raise ValueError(f"linear_small_m: {why}")
    K, N = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    fnuz = weight.dtype == torch.float8_e4m3fnuz
    wbytes = weight.view(torch.uint8)
    sb = _check_weight(wbytes, scale, N, K, "fp8", "linear")
    dev = x.device
    interp = interpreting(dev)
    kind, nsm, amd = _facts(dev)
    hw = kind if (not interp and kind == (2 if fnuz else 1)) else 0
    cfg = _pick_tiles(M, N, K, 1, 1.0, nsm, False, amd)
    bm, bn = cfg["block_m"], block_n or cfg["block_n"]
    nkt = triton.cdiv(K, QBLOCK)
    split = max(1, min(split_k or cfg["split_k"], nkt))
    kt_per = triton.cdiv(nkt, split)
    split = triton.cdiv(nkt, kt_per)  # no empty splits
    tiles_n = triton.cdiv(N, bn)
    out = torch.empty((M, N), dtype=torch.float32 if interp else x.dtype, device=dev)
    ws = torch.empty((split, M, N) if split > 1 else (1,), dtype=torch.float32, device=dev)
    cnt = _counters(dev, tiles_n)
    _small_m_kernel[(tiles_n, split)](
        x2, wbytes, sb, out, ws, cnt, M, N, K, kt_per, split, x2.stride(0), wbytes.stride(0), sb.stride(0),
        out.stride(0), FNUZ=fnuz, HW=hw, DOT_DT=tl.float32 if interp else tl.bfloat16, BLOCK_M=bm, BLOCK_N=bn,
        EVEN_K=K % QBLOCK == 0, AMAX_FLOOR=1e-4, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(*lead, N)


def linear_triton_small_m(x, weight, scale=None, act_quant: bool = False, dialect=Fp8Dialect.OCP):
    if small_m_reason(x, weight, scale, act_quant) is None:
        return linear_small_m(x, weight, scale, act_quant, dialect)
    return _fallback(x.device)(x, weight, scale, act_quant, dialect)


def _fallback(device: torch.device):
    return _fallback_for(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _fallback_for(device_type: str, index: int | None):
    """The linear provider this one stands in for outside its range: cuBLASLt's where it runs, else Triton's."""
    if device_type == "cuda":
        device = torch.device(device_type, index)
        from dsv4.kernels.vendor.scaled_mm import linear_scaled_mm, scaled_mm_supported
        from dsv4.platforms import detect

        if scaled_mm_supported(detect(device)) is None:
            return linear_scaled_mm
    return linear_triton


linear_op.register("triton_small_m", linear_triton_small_m, supported=triton_supported, priority=50,
                   interpretable=True)
