"""Quantisation ops: activation quantisation into FP8 GEMMs and the two quantise-dequantise round trips
the model runs under "official" numerics (spec §4).

fp8_act_quant(x, block=128, dialect=OCP): activation quantisation into FP8 GEMMs, as the official kernels
do (spec §4.7). x: [M, K] float -> (q: uint8 [M, K] FP8 e4m3 bytes in `dialect`, scale: uint8 [M,
ceil(K/block)] E8M0 bytes). Per row and `block` contiguous channels: amax = max|x| (at least 1e-4), s =
2^ceil(log2(amax / 448)); OCP: q = e4m3(clamp(x / s, +-448)), scale byte = log2(s) + 127; FNUZ: q =
e4m3fnuz(clamp(x / 2s, +-224)), scale byte = log2(2s) + 127 (the same values as OCP). Round to nearest even.

fp8_roundtrip(x, block=64, dialect=OCP, width=None): x [..., K] float (any float dtype; treated as rows x K, the last
dim need not be a multiple of `block`: the last partial block is its own block) -> a new contiguous tensor
of x's shape and dtype, equal to dsv4.numerics.fp8.fp8_roundtrip(x, block, dialect): per row and `block`
channels (in float32) amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax / 448)); OCP: decode(e4m3(clamp(x / s,
+-448))) * s; FNUZ: decode_fnuz(e4m3fnuz(clamp(x / 2s, +-224))) * 2s, the same values (a value rounding to
zero is -0.0 for negative x in OCP, +0.0 in FNUZ). Round to nearest even; the result is exact in float32
and bf16. `width` (a multiple of `block`, at most K): only the first `width` channels go through the round
trip, the rest are copied unchanged; attention.py rounds the non-RoPE part of the new KV rows (block 64) so,
in one pass.

fp4_roundtrip(x, block=32, hadamard=False): x [..., K] float (any K, partial last block as above) -> a new contiguous tensor
of x's shape and dtype, equal to dsv4.numerics.fp4.fp4_roundtrip(x, block): MXFP4 per row and `block`
channels (in float32): amax = max(max|x|, 6 * 2^-126), s = 2^ceil(log2(amax / 6)) (exponent clamped to
[-127, 127]), value = e2m1(clamp(x / s, +-6)) * s, e2m1 rounding to nearest with ties to the even mantissa
(midpoints 0.25 0.75 1.25 1.75 2.5 3.5 5 go down, up, down, up, down, up, down), the sign following x's
sign bit (-0.0 for negative x rounding to zero). Exact in float32 and bf16. `hadamard`: x is first rotated
by dsv4.numerics.hadamard_transform (orthonormal, over the last dim, K a power of two; the rotated values
rounded to x's dtype as it returns them), then round-tripped: the indexer queries (block 32), compressor.py.

Inputs are finite (NaN / inf are outside the contract of both round trips).
"""

import torch

from dsv4.numerics.fp4 import fp4_roundtrip as _fp4_roundtrip_numerics
from dsv4.numerics.fp8 import Fp8Dialect, quantize_fp8_blocks
from dsv4.numerics.fp8 import fp8_roundtrip as _fp8_roundtrip_numerics
from dsv4.numerics.hadamard import hadamard_transform
from dsv4.ops.registry import define_op


def fp8_act_quant_reference(x: torch.Tensor, block: int = 128, dialect=Fp8Dialect.OCP):
    return quantize_fp8_blocks(x.float(), (block,), dialect)


fp8_act_quant = define_op("fp8_act_quant", fp8_act_quant_reference)


def check_width(width, K: int, block: int) -> int:
    """The channels a round trip covers: all K when `width` is None, else `width` (a multiple of `block` in 0..K)."""
    if width is None:
        return K
    width = int(width)
    if not 0 <= width <= K or (width % int(block) and width != K):
        raise ValueError(f"fp8_roundtrip: width {width} must be a multiple of the block {block} in 0..{K}")
    return width


def fp8_roundtrip_reference(x: torch.Tensor, block: int = 64, dialect=Fp8Dialect.OCP, width=None) -> torch.Tensor:
    """FP8 e4m3 quantise-dequantise per `block` channels of the last dim (the first `width`), back to x's dtype."""
    w = check_width(width, x.shape[-1], block)
    if w == x.shape[-1]:
        return _fp8_roundtrip_numerics(x, block, dialect)
    return torch.cat([_fp8_roundtrip_numerics(x[..., :w], block, dialect), x[..., w:]], dim=-1)


fp8_roundtrip = define_op("fp8_roundtrip", fp8_roundtrip_reference)


def fp4_roundtrip_reference(x: torch.Tensor, block: int = 32, hadamard: bool = False) -> torch.Tensor:
    """MXFP4 (e2m1, E8M0 scale) quantise-dequantise per `block` channels of the last dim, back to x's dtype
    (`hadamard`: of the Hadamard-rotated x)."""
    return _fp4_roundtrip_numerics(hadamard_transform(x) if hadamard else x, block)


fp4_roundtrip = define_op("fp4_roundtrip", fp4_roundtrip_reference)
