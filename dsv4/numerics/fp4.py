"""FP4 E2M1 (MXFP4) numerics: codes, nibble packing and per-32 E8M0 block quantisation.

E2M1 is s|ee|m with exponent bias 1, no inf/NaN (spec 4.6). Codes are uint8 values 0..15.
Packing (spec 3.4): byte c of the last dim holds element 2c in its low nibble and element
2c+1 in its high nibble. The checkpoint stores packed bytes as I8; int8,
``torch.float4_e2m1fn_x2`` and uint8 inputs are all viewed as uint8.
"""

from __future__ import annotations

import torch

from .fp8 import _e8m0_bytes, e8m0_to_float, pow2_scale_exponent

__all__ = [
    "E2M1_VALUES",
    "fp4_decode",
    "fp4_unpack",
    "fp4_pack",
    "fp4_encode",
    "quantize_fp4_blocks",
    "dequantize_fp4_blocks",
    "fp4_roundtrip",
]

#: Value of each E2M1 code 0..15 (code 8 is -0.0).
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

# Midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. A value exactly at
# midpoint i (between codes i and i+1) rounds to the code with an even mantissa bit:
# down (i) for even i, up (i+1) for odd i.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _packed_bytes(p: torch.Tensor, what: str = "packed") -> torch.Tensor:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(p).__name__}")
    if p.dtype in (torch.int8, torch.float4_e2m1fn_x2):
        return p.view(torch.uint8)
    if p.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8/int8/float4_e2m1fn_x2, got {p.dtype}")
    return p


def _codes(c: torch.Tensor, what: str = "codes") -> torch.Tensor:
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(c).__name__}")
    if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of E2M1 codes, got {c.dtype}")
    if c.numel() and bool(((c < 0) | (c > 15)).any()):
        raise ValueError(f"{what} must lie in 0..15")
    return c.to(torch.uint8)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    key = torch.device(device)
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
        _TABLES[key] = t
    return t


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (integer tensor, 0..15) -> float32 values, same shape/device."""
    c = _codes(codes)
    return _table(c.device)[c.long()]


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., n/2]`` -> uint8 codes ``[..., n]`` (low nibble first)."""
    p = _packed_bytes(packed)
    if p.dim() == 0:
        raise ValueError("fp4_unpack needs at least one dimension")
    out = torch.stack((p & 0xF, p >> 4), dim=-1)
    return out.reshape(*p.shape[:-1], 2 * p.shape[-1])


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (n even) -> packed bytes ``[..., n/2]``; inverse of ``fp4_unpack``."""
    c = _codes(codes)
    if c.dim() == 0 or c.shape[-1] % 2:
        raise ValueError(f"fp4_pack needs an even last dimension, got shape {tuple(c.shape)}")
    pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Round floats to the nearest E2M1 value (ties to even mantissa) -> uint8 codes.

    Magnitudes beyond 6 (and +-inf) saturate to +-6. The sign bit follows the input's
    sign bit, so -0.0 and negatives that round to zero give code 8 (-0). NaN maps to code 0.
    Comparisons are exact (float64 input in float64, everything else in float32).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("fp4_encode expects a floating-point tensor")
    xf = x if x.dtype == torch.float64 else x.to(torch.float32)
    a = xf.abs()
    code = torch.zeros(xf.shape, dtype=torch.uint8, device=xf.device)
    for i, m in enumerate(_MIDPOINTS):
        up = (a >= m) if i % 2 else (a > m)
        code += up.to(torch.uint8)
    code |= torch.signbit(xf).to(torch.uint8) << 3
    return torch.where(torch.isnan(xf), torch.zeros_like(code), code)


def _quantize_codes(x: torch.Tensor, block: int, amax_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., K], scale bytes uint8 [..., ceil(K/block)]) per the MXFP4 recipe."""
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    if x.dim() == 0:
        raise ValueError("FP4 block quantisation needs at least one dimension")
    xf = x.to(torch.float32)
    k = xf.shape[-1]
    nb = -(-k // block)
    pad = nb * block - k
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    xb = xp.reshape(*xf.shape[:-1], nb, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=amax_floor)
    e = pow2_scale_exponent(amax, 6.0).clamp(-127, 127)
    s = e8m0_to_float((e + 127).to(torch.uint8))
    y = (xb / s).clamp(-6.0, 6.0).reshape(*xf.shape[:-1], nb * block)[..., :k]
    return fp4_encode(y), (e.squeeze(-1) + 127).to(torch.uint8)


def quantize_fp4_blocks(
    x: torch.Tensor, block: int = 32, amax_floor: float = 6 * 2.0**-126
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantisation along the last dim (K even), computed in float32.

    Per ``block`` consecutive elements: ``amax = max(max|x|, amax_floor)``,
    ``s = 2**ceil(log2(amax/6))``, ``q = encode(clamp(x/s, +-6))``. Returns
    ``(packed uint8 [..., K/2], scale uint8 E8M0 [..., ceil(K/block)])``.
    """
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"quantize_fp4_blocks needs an even last dimension, got shape {tuple(x.shape)}")
    codes, scale = _quantize_codes(x, int(block), amax_floor)
    return fp4_pack(codes), scale


def _dequantize_codes(codes: torch.Tensor, scale_bytes: torch.Tensor, block: int, out_dtype: torch.dtype) -> torch.Tensor:
    k = codes.shape[-1]
    expected = (*codes.shape[:-1], -(-k // block))
    if tuple(scale_bytes.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale_bytes.shape)} does not match {k} elements per row with block {block} "
            f"(expected {expected})"
        )
    vals = _table(codes.device)[codes.long()]
    sf = e8m0_to_float(scale_bytes).repeat_interleave(block, dim=-1)[..., :k]
    return (vals * sf).to(out_dtype)


def dequantize_fp4_blocks(
    packed: torch.Tensor, scale: torch.Tensor, block: int = 32, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``e2m1(code) * 2**(scale-127)`` per element: packed ``[..., K/2]`` + scale ``[..., ceil(K/block)]``
    (uint8 / float8_e8m0fnu) -> ``[..., K]`` in ``out_dtype`` (exact in float32 first)."""
    codes = fp4_unpack(packed)
    return _dequantize_codes(codes, _e8m0_bytes(scale), int(block), out_dtype)


def fp4_roundtrip(x: torch.Tensor, block: int = 32, amax_floor: float = 6 * 2.0**-126) -> torch.Tensor:
    """Quantise to MXFP4 along the last dim and dequantise back to ``x.dtype`` (any K)."""
    codes, scale = _quantize_codes(x, int(block), amax_floor)
    return _dequantize_codes(codes, scale, int(block), x.dtype)
