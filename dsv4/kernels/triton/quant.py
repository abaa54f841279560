"""Triton fp8_act_quant (dsv4/ops/quant.py): per row and `block` channels, power-of-two (E8M0) scale and
FP8 e4m3 bytes in either dialect, byte-identical to dsv4.numerics.quantize_fp8_blocks (except that a
value rounding to zero is always 0x00, where the numerics module keeps OCP's -0 as 0x80: same value).

Exponent, exactly: with amax = (1 + M / 2^23) 2^(E - 127) (float32 fields E, M; amax >= 1e-4 is normal)
and 448 = 0.875 * 2^9, ceil(log2(amax / 448)) = (E - 126) - 9 + (M > 0x600000), the frexp identity of
numerics.pow2_scale_exponent (mantissa 0.5 + M / 2^24 compared with 0.875) on the bits, no rounding.

Triton fp8_roundtrip / fp4_roundtrip (dsv4/ops/quant.py): the quantise-dequantise round trips of the
"official" numerics, bit-identical to dsv4.numerics.fp8.fp8_roundtrip / dsv4.numerics.fp4.fp4_roundtrip
(signed zeros included) for finite inputs, one read of x in its dtype and one write of the result, no host
syncs (graph-capturable). FP4 exponent, exactly: amax = (1 + M / 2^23) 2^(E - 127), 6 = 0.75 * 2^3, so
ceil(log2(amax / 6)) = (E - 126) - 3 + (M > 0x400000). Both results are exact in bf16 (4 resp. 2
significant bits times a power of two within bf16's exponent range), so the final cast needs no
rounding (the interpreter's truncating fp32 -> bf16 cast is exact here too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (act_quant_blocks, cast_out, fp8_block_exponent, fp8_decode, fp8_encode,
                                        fp8_pow2, fp8_quant_max, interpreting, pdl_args, pdl_start, register)
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.numerics.hadamard import hadamard_transform
from dsv4.ops.quant import fp4_roundtrip as fp4_roundtrip_op
from dsv4.ops.quant import fp8_act_quant as fp8_act_quant_op
from dsv4.ops.quant import check_width
from dsv4.ops.quant import fp8_roundtrip as fp8_roundtrip_op

# Work decomposition: grid = (M, cdiv(nb, G)) with nb = ceil(K / block) blocks per row. A program loads a
# [G, BLOCK_P] tile (G blocks of one row, BLOCK_P = next_pow2(block), ~4096 elements; lanes past the block
# or past K masked), reduces amax per block, derives the exponent from amax's bits, scales by the exact
# power of two 2^-e (built from bits), clamps, encodes by bit arithmetic and stores bytes + one scale
# byte per block. x is read once and q / scale written once: bytes = M K (elt + 1) + M nb, the copy
# roofline.


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, NB, block, sx, sq, ss,
                      G: tl.constexpr, BLOCK_P: tl.constexpr, FNUZ: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    bs = tl.program_id(1) * G + tl.arange(0, G)
    lane = tl.arange(0, BLOCK_P)
    cols = bs[:, None] * block + lane[None, :]
    mask = (bs[:, None] < NB) & (lane[None, :] < block) & (cols < K)
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    qb, e = act_quant_blocks(x, FNUZ)
    tl.store(q_ptr + row * sq + cols, qb, mask=mask)
    tl.store(s_ptr + row * ss + bs, (e + 127).to(tl.uint8), mask=bs < NB)


TILE_ELEMS = 4096


def act_quant_out(M: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers for an act_quant that a producer kernel writes with its output (linear's `x_q`): bytes [M rounded
    up to 4, K] (cuBLASLt's row padding; rows past M unused) and scale bytes [M, ceil(K / 128)]."""
    return (torch.empty((-(-M // 4) * 4, K), dtype=torch.uint8, device=device),
            torch.empty((M, -(-K // 128)), dtype=torch.uint8, device=device))


def fp8_act_quant_triton(x: torch.Tensor, block: int = 128, dialect=Fp8Dialect.OCP):
    d = Fp8Dialect.parse(dialect)
    if x.dim() != 2:
        raise ValueError(f"fp8_act_quant: x must be [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    nb = -(-K // block)
    q = torch.empty((M, K), dtype=torch.uint8, device=x.device)
    s = torch.empty((M, nb), dtype=torch.uint8, device=x.device)
    if M == 0 or K == 0:
        return q, s
    if x.stride(1) != 1:
        x = x.contiguous()
    block_p = triton.next_power_of_2(block)
    g = max(1, min(TILE_ELEMS // block_p, triton.next_power_of_2(nb)))
    _act_quant_kernel[(M, triton.cdiv(nb, g))](
        x, q, s, K, nb, block, x.stride(0), q.stride(0), s.stride(0),
        G=g, BLOCK_P=block_p, FNUZ=d is Fp8Dialect.FNUZ,
        **pdl_args(x.device), num_warps=max(1, min(8, g * block_p // 512)))
    return q, s


# ----------------------------------------------------------------------------- round trips (fp8 / fp4)

# Work decomposition (both round trips): x is viewed as R rows x K with nb = ceil(K / BLOCK) blocks per row;
# the R * nb (row, block) pairs are numbered row-major and grid = cdiv(R * nb, G): a program owns G
# consecutive pairs (a group of blocks of one row, or of consecutive rows when rows are short, e.g. the
# 7 x 64 KV blocks of a 448-wide row or the 4 x 32 FP4 blocks of a 128-wide indexer head) as a
# [G, BLOCK_P] tile (BLOCK_P = next_pow2(BLOCK), lanes past the block or past K masked). It loads the tile
# once in x's dtype, reduces amax per block in fp32, derives the power-of-two scale from amax's bits,
# rounds every element (FP8: common.fp8_encode / fp8_decode; FP4: seven exact comparisons with the e2m1
# midpoints), multiplies back by the scale and stores once in x's dtype. Bytes = 2 R K elt, the copy
# roofline; ~20 ALU ops per element, far below the compute roof. G grows with the work (up to
# TILE_ELEMS / BLOCK_P, ~4096 elements per program) but keeps >= ~256 programs when there is enough
# work, so small batches still spread over the SMs.


@triton.jit
def _rt_tile(x_ptr, NBT, NB, K, sx, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, G: tl.constexpr):
    """The program's [G, BLOCK_P] tile of x as (fp32 values, offsets into the contiguous output, mask);
    masked lanes get offset 0 (no pointer past the logical bounds) and value 0."""
    j = tl.program_id(0) * G + tl.arange(0, G)  # flattened (row, block) ids, < 2^31
    jv = j < NBT
    j = tl.minimum(j, NBT - 1)
    row = (j // NB).to(tl.int64)
    lane = tl.arange(0, BLOCK_P)
    cols = (j % NB)[:, None] * BLOCK + lane[None, :]
    mask = jv[:, None] & (lane[None, :] < BLOCK) & (cols < K)
    cols = tl.where(mask, cols, 0)
    xo = row[:, None] * sx + cols
    yo = row[:, None] * K + cols
    v = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    return v, yo, mask


@triton.jit
def _or_sign(r, v):
    """fp32 r with v's sign bit OR-ed in (r >= 0 or already carrying v's sign), on the bits: Triton's unary
    minus is 0 - x, which turns 0.0 into +0.0, not -0.0."""
    vb = v.to(tl.int32, bitcast=True)
    return (r.to(tl.int32, bitcast=True) | ((vb >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_roundtrip_kernel(x_ptr, y_ptr, NBT, NB, K, sx, W, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                          G: tl.constexpr, FNUZ: tl.constexpr, DEC_FNUZ: tl.constexpr):
    # DEC_FNUZ is FNUZ except in the test that proves the dialect flag matters (bytes read in the other
    # dialect are off by exactly 2x).
    v, yo, mask = _rt_tile(x_ptr, NBT, NB, K, sx, BLOCK, BLOCK_P, G)
    r = _fp8_rt_rows(v, FNUZ, DEC_FNUZ)
    r = tl.where((yo % K) < W, r, v)  # channels from W on (whole blocks) are copied as they are
    tl.store(y_ptr + yo, r.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_rt_rows(v, FNUZ: tl.constexpr, DEC_FNUZ: tl.constexpr):
    """FP8 round trip of each row of the fp32 tile v [rows, block] (one power-of-two scale per row)."""
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)  # in [-22, 121] for amax in [1e-4, 3.4e38]: 2^+-e exact normals
    qmax = fp8_quant_max(FNUZ)
    y = tl.minimum(tl.maximum(v * fp8_pow2(-e)[:, None], -qmax), qmax)
    r = fp8_decode(fp8_encode(y, FNUZ), DEC_FNUZ) * fp8_pow2(e)[:, None]
    if not FNUZ:  # OCP keeps the sign of a value rounding to zero (0x80 = -0.0); FNUZ has no -0
        r = _or_sign(r, v)
    return r


@triton.jit
def _fp4_roundtrip_kernel(x_ptr, y_ptr, NBT, NB, K, sx, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                          G: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    v, yo, mask = _rt_tile(x_ptr, NBT, NB, K, sx, BLOCK, BLOCK_P, G)
    tl.store(y_ptr + yo, _fp4_rt_rows(v, AMAX_FLOOR).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp4_rt_rows(v, AMAX_FLOOR: tl.constexpr):
    """MXFP4 round trip of each row of the fp32 tile v [rows, block] (one scale per row)."""
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), AMAX_FLOOR)  # 6 * 2^-126 = 1.5 * 2^-124: an fp32 normal
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 129 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)  # ceil(log2(amax / 6))
    e = tl.minimum(tl.maximum(e, -126), 126)  # finite amax >= the floor gives e in [-126, 126] anyway
    a = tl.minimum(tl.abs(v) * fp8_pow2(-e)[:, None], 6.0)
    # e2m1 magnitude: one step per midpoint passed, ties to the even mantissa (> at 0.25 1.25 2.5 5,
    # >= at 0.75 1.75 3.5), exactly numerics.fp4.fp4_encode's rule; the sums are exact
    m = ((a > 0.25).to(tl.float32) + (a >= 0.75).to(tl.float32) + (a > 1.25).to(tl.float32)
         + (a >= 1.75).to(tl.float32)) * 0.5
    m = m + (a > 2.5).to(tl.float32) + (a >= 3.5).to(tl.float32) + (a > 5.0).to(tl.float32) * 2.0
    return _or_sign(m * fp8_pow2(e)[:, None], v)  # x's sign bit, also on zeros (code 8 = -0.0)


@triton.jit
def _hadamard_rows(x, G: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Sylvester Hadamard (unscaled) of each row of x [G, N] by numerics.hadamard_transform's butterfly (the
    same additions in the same order: bit-identical in fp32)."""
    for stage in tl.static_range(LOG_N):
        y = tl.permute(tl.reshape(x, [G, N // (2 * 2 ** stage), 2, 2 ** stage]), [0, 1, 3, 2])
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [G, N])
    return x


# Grid = cdiv(R, G): G rows of N = 2^LOG_N channels per program: Hadamard (fp32 butterfly), times `scale`,
# rounded to x's dtype (RNE; RNE_BITS: bf16 on the bits, for the interpreter), then the MXFP4 round trip per
# 32 channels. One launch where hadamard_transform + fp4_roundtrip take ~24 (the indexer queries at decode).
@triton.jit
def _hadamard_fp4_kernel(x_ptr, y_ptr, R, sx, scale, pos_ptr, freq_ptr, ROWS_PER_TOKEN, HALF,
                         N: tl.constexpr, LOG_N: tl.constexpr, G: tl.constexpr, RNE_BITS: tl.constexpr,
                         AMAX_FLOOR: tl.constexpr, ROPE: tl.constexpr = False):
    r = tl.program_id(0) * G + tl.arange(0, G)
    ok = r < R
    r64 = tl.where(ok, r, 0).to(tl.int64)
    c = tl.arange(0, N)
    v = tl.load(x_ptr + r64[:, None] * sx + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if ROPE:  # apply_rope first (its angles and products; rounded to x's dtype): row r is of token r // ROWS_PER_TOKEN
        ve, vo = tl.split(tl.reshape(v, [G, N // 2, 2]))
        k = tl.arange(0, N // 2)
        i = k - (N // 2 - HALF)
        rot = i >= 0
        p = tl.load(pos_ptr + r64 // ROWS_PER_TOKEN, mask=ok, other=0).to(tl.float32)
        ang = p[:, None] * tl.load(freq_ptr + tl.where(rot, i, 0), mask=rot, other=0.0).to(tl.float32)[None, :]
        cs = tl.cos(ang)
        sn = tl.sin(ang)
        re = cast_out(ve * cs - vo * sn, y_ptr, RNE_BITS).to(tl.float32)
        ro = cast_out(ve * sn + vo * cs, y_ptr, RNE_BITS).to(tl.float32)
        v = tl.reshape(tl.join(tl.where(rot[None, :], re, ve), tl.where(rot[None, :], ro, vo)), [G, N])
    h = cast_out(_hadamard_rows(v, G, N, LOG_N) * scale, y_ptr, RNE_BITS).to(tl.float32)
    q = tl.reshape(_fp4_rt_rows(tl.reshape(h, [G * (N // 32), 32]), AMAX_FLOOR), [G, N])
    tl.store(y_ptr + r64[:, None] * N + c[None, :], q.to(y_ptr.dtype.element_ty), mask=ok[:, None])


RT_TARGET_PROGRAMS = 256
FP4_AMAX_FLOOR = 6 * 2.0**-126  # numerics.fp4's floor, exact in fp32


def _rows_k(x: torch.Tensor):
    """(x or a contiguous copy, rows, K, row stride): x [..., K] as rows x K with unit column stride; a copy
    only when the leading dims cannot be walked with one stride."""
    if x.dim() == 0:
        raise ValueError("round trip: x needs at least one dimension")
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if x.dim() == 1:
        return x if x.stride(0) == 1 else x.contiguous(), rows, K, K
    lead = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    ok = x.stride(-1) == 1 or K == 1
    sx = lead[-1][1] if lead else K
    expect = sx
    for n, st in reversed(lead):
        ok = ok and st == expect
        expect = st * n
    if not ok:
        x = x.contiguous()
        sx = K
    return x, rows, K, sx


def _rt_launch(kernel, x: torch.Tensor, block: int, out: torch.Tensor | None = None, *extra, **flags) -> torch.Tensor:
    """Launch a round-trip kernel; `out` (tests only: a larger sentinel-filled contiguous buffer whose first
    x.numel() elements receive the result) defaults to a fresh tensor of x's shape and dtype."""
    if not x.is_floating_point():
        raise TypeError(f"round trip: x must be floating point, got {x.dtype}")
    block = int(block)
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    xs, rows, K, sx = _rows_k(x)
    if rows == 0 or K == 0:
        return y
    nb = -(-K // block)
    nbt = rows * nb
    if nbt >= 2**31:
        raise ValueError(f"round trip: {nbt} blocks exceed the kernel's int32 block ids")
    block_p = triton.next_power_of_2(block)
    g = max(1, min(max(1, TILE_ELEMS // block_p), triton.next_power_of_2(triton.cdiv(nbt, RT_TARGET_PROGRAMS))))
    kernel[(triton.cdiv(nbt, g),)](xs, y, nbt, nb, K, sx, *extra, BLOCK=block, BLOCK_P=block_p, G=g, **flags,
                                   num_warps=max(1, min(8, g * block_p // 512)))
    return y


def fp8_roundtrip_triton(x: torch.Tensor, block: int = 64, dialect=Fp8Dialect.OCP, width=None) -> torch.Tensor:
    fnuz = Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ
    w = check_width(width, x.shape[-1] if x.dim() else 0, block)
    return _rt_launch(_fp8_roundtrip_kernel, x, block, None, w, FNUZ=fnuz, DEC_FNUZ=fnuz)


HADAMARD_MAX = 1024  # widest row the fused Hadamard kernel holds in registers (the indexer's is 128)


def hadamard_fp4_fits(x: torch.Tensor, block: int = 32) -> bool:
    """Whether the fused Hadamard + FP4 kernel takes x's rows."""
    K = x.shape[-1] if x.dim() else 0
    return x.is_floating_point() and block == 32 and 32 <= K <= HADAMARD_MAX and not K & (K - 1)


def hadamard_fp4_launch(x: torch.Tensor, rope=None) -> torch.Tensor:
    """The fused Hadamard + FP4 kernel over x's rows (hadamard_fp4_fits); `rope=(positions, inv_freq)`: RoPE of
    each row's trailing 2 len(inv_freq) channels first (x [T, ..., K]: a row's token is its index over T)."""
    xs, R, K, sx = _rows_k(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if R:
        g = max(1, min(16, TILE_ELEMS // K))
        if rope is not None:
            pos = rope[0] if rope[0].stride(0) == 1 else rope[0].contiguous()
            freq = rope[1].to(device=x.device, dtype=torch.float32).contiguous()
            rope_args, half = (pos, freq, R // max(1, x.shape[0])), freq.numel()
        else:
            rope_args, half = (xs, xs, 1), 0
        _hadamard_fp4_kernel[(triton.cdiv(R, g),)](
            xs, y, R, sx, K ** -0.5, *rope_args, half, N=K, LOG_N=K.bit_length() - 1, G=g,
            RNE_BITS=x.dtype == torch.bfloat16 and interpreting(x.device), AMAX_FLOOR=FP4_AMAX_FLOOR,
            ROPE=rope is not None, num_warps=max(1, min(8, g * K // 512)))
    return y


def fp4_roundtrip_triton(x: torch.Tensor, block: int = 32, hadamard: bool = False) -> torch.Tensor:
    if hadamard:
        if not hadamard_fp4_fits(x, block):
            return _rt_launch(_fp4_roundtrip_kernel, hadamard_transform(x), block, AMAX_FLOOR=FP4_AMAX_FLOOR)
        return hadamard_fp4_launch(x)
    return _rt_launch(_fp4_roundtrip_kernel, x, block, AMAX_FLOOR=FP4_AMAX_FLOOR)


register(fp8_act_quant_op, fp8_act_quant_triton)
register(fp8_roundtrip_op, fp8_roundtrip_triton)
register(fp4_roundtrip_op, fp4_roundtrip_triton)
