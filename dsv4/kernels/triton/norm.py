"""Triton rms_norm (dsv4/ops/norm.py): y = x * rsqrt(mean(x^2) + eps) [* w], fp32 math, x's dtype out.

`cast_out`, the store-side cast shared by the small-op kernels (rope, mHC), lives in common.py (re-exported here):
the Triton CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest even (design.md §6), so under the
interpreter the bf16 rounding is done on the float32 bits; on a GPU it is the native cast. With `quant=` the
tile kernel also writes its output's act_quant (common.act_quant_store), for the FP8 linear that reads it.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (act_quant_store, bf16_rne_bits, cast_out, pdl_args, pdl_start,  # noqa: F401
                                        register)
from dsv4.kernels.triton.quant import act_quant_out, fp8_act_quant_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.norm import rms_norm as rms_norm_op


# Work decomposition. Rows of N <= MAX_TILE (every norm of the model: 4096, 1024, 512, 128 per head):
# grid = cdiv(M, ROWS); each program loads a [ROWS, next_pow2(N)] tile once (ROWS * BLOCK_N ~ 4096
# elements, so short rows such as the 512-wide per-head q norm batch 8 rows per program), reduces the
# sum of squares per row in fp32, scales, multiplies the fp32 weight (loaded once per program) and
# stores: every byte of x is read once and every byte of y written once, so it runs at the copy
# roofline (bytes = 2 * M * N * elt + N * 4). Longer rows (up to the 16384-wide flattened mHC stream
# and beyond) loop over N in CHUNK pieces twice (sum of squares, then scale + store); the second read
# of the row (<= 64 KiB) comes from L1/L2.


@triton.jit
def _rms_norm_tile_kernel(x_ptr, w_ptr, y_ptr, q_ptr, qs_ptr, M, N, stride_x, stride_y, eps,
                          HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                          RNE_BITS: tl.constexpr, QUANT: tl.constexpr = False, FNUZ: tl.constexpr = False,
                          PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=1) / N
    y = x * tl.rsqrt(ms + eps)[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    yo = cast_out(y, y_ptr, RNE_BITS)
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], yo, mask=mask)
    if QUANT:  # y's act_quant for the FP8 linear that reads it (BLOCK_N >= 128)
        act_quant_store(tl.where(mask, yo.to(tl.float32), 0.0), rows, rmask, cols, q_ptr, qs_ptr, N,
                        tl.cdiv(N, 128), N, ROWS, BLOCK_N, FNUZ)


@triton.jit
def _rms_norm_chunked_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps,
                             HAS_W: tl.constexpr, CHUNK: tl.constexpr, RNE_BITS: tl.constexpr,
                             PDL: tl.constexpr = False):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_x
    yrow = y_ptr + row * stride_y
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for n0 in range(0, N, CHUNK):
        c = n0 + cols
        x = tl.load(xrow + c, mask=c < N, other=0.0).to(tl.float32)
        acc += x * x
    r = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
    for n0 in range(0, N, CHUNK):
        c = n0 + cols
        m = c < N
        y = tl.load(xrow + c, mask=m, other=0.0).to(tl.float32) * r
        if HAS_W:
            y = y * tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(yrow + c, cast_out(y, y_ptr, RNE_BITS), mask=m)


MAX_TILE = 8192  # longest row held in one tile; longer rows take the chunked kernel
# rms_norm(quant=): the tile kernel writes the act_quant itself for at most this many rows, else the standalone
# quantiser runs after it. Measured on one H100 (docs/perf.md 2026-12-07 (e)), hc_pre's 4096-wide norm: at
# M = 8,192 the fused epilogue took ~0.67 ms a call against 0.085 + 0.08 ms for norm + quantiser; at M = 1 the
# 13 norms of a 4-layer step averaged 6.4 us against ~2.5 + 1.75 us. So off (0) until a faster epilogue is measured.
FUSE_QUANT_MAX_M = 0
TILE_ELEMS = 4096  # elements per program for short rows (rows are batched up to this)
CHUNK = 2048


def _num_warps(elems: int) -> int:
    return max(1, min(16, elems // 512))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, quant=None):
    N = x.shape[-1]
    if quant is not None and x.dim() != 2:
        raise ValueError(f"rms_norm: quant= needs x as [M, N], got {tuple(x.shape)}")
    x2 = x.reshape(-1, N)
    if N > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(max(N, 1))
    fuse_q = quant is not None and 128 <= block_n <= MAX_TILE and M <= FUSE_QUANT_MAX_M
    q, qs = act_quant_out(M, N, x.device) if fuse_q else (y, y)
    if M and N:
        w = weight if weight is not None else x2  # dummy pointer when un-weighted (never read)
        if weight is not None and weight.stride(-1) != 1:
            w = weight.contiguous()
        rne = bf16_rne_bits(x.dtype)
        if block_n <= MAX_TILE:
            rows = max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(M)))
            _rms_norm_tile_kernel[(triton.cdiv(M, rows),)](
                x2, w, y, q, qs, M, N, x2.stride(0), y.stride(0), float(eps),
                HAS_W=weight is not None, ROWS=rows, BLOCK_N=block_n, RNE_BITS=rne, QUANT=fuse_q,
                FNUZ=fuse_q and Fp8Dialect.parse(quant) is Fp8Dialect.FNUZ,
                **pdl_args(x.device), num_warps=_num_warps(rows * block_n))
        else:
            _rms_norm_chunked_kernel[(M,)](
                x2, w, y, N, x2.stride(0), y.stride(0), float(eps),
                HAS_W=weight is not None, CHUNK=CHUNK, RNE_BITS=rne, **pdl_args(x.device),
                num_warps=_num_warps(CHUNK) * 2)
    y = y.view(x.shape)
    if quant is None:
        return y
    return y, ((q, qs) if fuse_q else fp8_act_quant_triton(y, 128, quant))


register(rms_norm_op, rms_norm_triton)
