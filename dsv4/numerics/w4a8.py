"""MXFP4 weights as exact FP8 e4m3 operands (issue 15, the portable W4A8 path).

An MXFP4 weight row holds E2M1 codes with one E8M0 scale per 32 elements along K. An FP8 tensor-core GEMM
wants e4m3 operands with one scale per 128-element K block. For one row and one 128-block with sub-block
scale exponents s_0..s_3 (E8M0 bytes), take base = max(s) - KMAX. Each element becomes
e2m1(code) * 2^(s_j - base) times 2^(base - 127).

The first factor is an exact, normal e4m3 value while every k_j = s_j - base lies in [KMIN, KMAX]:
- OCP e4m3fn (max 448, smallest normal 2^-6): KMAX = 6, since 6 * 2^6 = 384 <= 448; KMIN = -5, since
  0.5 * 2^-5 = 2^-6.
- FNUZ e4m3fnuz (max 240, smallest normal 2^-7): KMAX = 5 and KMIN = -6.

Either way a block fits when its four scales span at most 11 binades. Subnormal operands would stretch that to
14, but keeping every operand normal makes the e4m3 byte of code c at offset k the byte at KMIN plus
(k - KMIN) << 3, the same table in both dialects: the kernels build it with a few instructions per 8 codes
(dsv4/kernels/triton/w4a8.py). A block that does not fit is reported, never approximated: `fits` is False
there, and its bytes are undefined (zero).

The second factor is the block's weight scale: an E8M0 byte per (row, 128-block), applied to the fp32 partial
sums of the block like the activations' 1x128 scales. Product by product, the FP8 GEMM then computes exactly
what the official numerics compute: FP8 activations times the dequantised FP4 weight, in fp32.
"""

from __future__ import annotations

import torch

from .fp4 import E2M1_VALUES, _packed_bytes, fp4_unpack
from .fp8 import Fp8Dialect, _e8m0_bytes, fp8_decode, fp8_encode

__all__ = ["W4A8_BLOCK", "fp8_window", "fp4_block_offsets", "fp4_blocks_to_fp8", "fp4_as_fp8_dequant"]

W4A8_BLOCK = 128  # K elements per FP8 operand block (one activation scale, one weight scale)
_SUB = 32  # K elements per MXFP4 scale


def fp8_window(dialect: Fp8Dialect | str) -> tuple[int, int]:
    """(KMIN, KMAX): the exponent offsets k for which every E2M1 value times 2^k is an exact, normal e4m3 value."""
    d = Fp8Dialect.parse(dialect)
    return (-6, 5) if d is Fp8Dialect.FNUZ else (-5, 6)


def fp4_block_offsets(scale: torch.Tensor, dialect: Fp8Dialect | str = Fp8Dialect.OCP, block: int = W4A8_BLOCK,
                      packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the MXFP4 scales (E8M0 [..., K/32]): (offsets k = s_j - base, int8 [..., K/32]; block scale byte
    base, uint8 [..., K/block]; fits, bool [..., K/block]): what a kernel needs to turn the codes into e4m3
    bytes itself (dsv4/kernels/triton/w4a8.py). With `packed` (the codes, [..., K/2]), sub-blocks whose codes
    are all zero do not count: their scale cannot matter (0 times anything is 0), so it neither sets the base
    nor breaks the window, and their offset is 0. Offsets of blocks that do not fit are set to 0."""
    d = Fp8Dialect.parse(dialect)
    sb = _e8m0_bytes(scale, "scale")
    if block % _SUB or sb.shape[-1] % (block // _SUB):
        raise ValueError(f"fp4_block_offsets: {sb.shape[-1]} scales per row do not make whole blocks of {block} "
                         f"elements (one scale per {_SUB})")
    kmin, kmax = fp8_window(d)
    per = block // _SUB
    s = sb.to(torch.int32)
    if packed is not None:
        pb = _packed_bytes(packed, "packed")
        if tuple(pb.shape) != (*sb.shape[:-1], sb.shape[-1] * _SUB // 2):
            raise ValueError(f"fp4_block_offsets: packed shape {tuple(pb.shape)} does not match scale shape "
                             f"{tuple(sb.shape)} (expected {(*sb.shape[:-1], sb.shape[-1] * _SUB // 2)})")
        nz = ((pb & 0x77) != 0).view(*pb.shape[:-1], sb.shape[-1], _SUB // 2).any(dim=-1)  # +-0 codes are zero
    else:
        nz = torch.ones_like(s, dtype=torch.bool)
    s = s.view(*s.shape[:-1], s.shape[-1] // per, per)
    nz = nz.view(s.shape)
    hi = torch.where(nz, s, torch.full_like(s, -1)).amax(dim=-1)
    base = (hi - kmax).clamp(min=0)  # all-zero blocks: base 0
    k = torch.where(nz, s - base.unsqueeze(-1), torch.zeros_like(s))  # <= kmax
    fits = (k >= kmin).all(dim=-1)
    k = torch.where(fits.unsqueeze(-1), k, torch.zeros_like(k))
    return k.view(sb.shape).to(torch.int8), base.to(torch.uint8), fits


def fp4_blocks_to_fp8(packed: torch.Tensor, scale: torch.Tensor, dialect: Fp8Dialect | str = Fp8Dialect.OCP,
                      block: int = W4A8_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 weight (packed uint8 [..., K/2], E8M0 scale [..., K/32]) -> (e4m3 bytes uint8 [..., K], E8M0 block
    scale uint8 [..., K/block], fits bool [..., K/block]). K must be a multiple of `block`, and `block` of 32.
    Where fits: e4m3(bytes) * 2^(block scale - 127) equals the MXFP4 dequantised value exactly, element by
    element. Where not: the scales of the block span more than the window (fp8_window), and its bytes are 0."""
    d = Fp8Dialect.parse(dialect)
    codes = fp4_unpack(_packed_bytes(packed, "packed"))
    sb = _e8m0_bytes(scale, "scale")
    K = codes.shape[-1]
    if block % _SUB or K % block:
        raise ValueError(f"fp4_blocks_to_fp8: K = {K} must be a multiple of block = {block}, itself a multiple of 32")
    if tuple(sb.shape) != (*codes.shape[:-1], K // _SUB):
        raise ValueError(f"fp4_blocks_to_fp8: scale shape {tuple(sb.shape)} does not match {K} elements per row "
                         f"with one scale per {_SUB} (expected {(*codes.shape[:-1], K // _SUB)})")
    k, base, fits = fp4_block_offsets(sb, d, block, packed)
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)[codes.long()]
    vals = vals.view(*codes.shape[:-1], K // _SUB, _SUB)
    y = vals * torch.exp2(k.to(torch.float32)).unsqueeze(-1)  # exact: powers of two, |y| <= 6 * 2^KMAX
    y = y.view(*codes.shape[:-1], K // block, block)
    y = torch.where(fits.unsqueeze(-1), y, torch.zeros_like(y))
    return fp8_encode(y.reshape(codes.shape), d), base, fits


def fp4_as_fp8_dequant(fp8_bytes: torch.Tensor, block_scale: torch.Tensor, dialect: Fp8Dialect | str = Fp8Dialect.OCP,
                       block: int = W4A8_BLOCK) -> torch.Tensor:
    """float32 [..., K] of the FP8 form: e4m3(bytes) * 2^(block scale - 127) (the W4A8 path's reference)."""
    d = Fp8Dialect.parse(dialect)
    v = fp8_decode(fp8_bytes, d)
    K = v.shape[-1]
    sc = torch.exp2(_e8m0_bytes(block_scale, "block_scale").to(torch.float32) - 127.0)
    return (v.view(*v.shape[:-1], K // block, block) * sc.unsqueeze(-1)).view(v.shape)
