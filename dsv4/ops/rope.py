"""apply_rope: interleaved (GPT-J style) rotary embedding on the TRAILING `2 * inv_freq.numel()` dims.

Pair i of the rotary part, (x[-r + 2i], x[-r + 2i + 1]), is rotated by angle positions * inv_freq[i]
(angle computed as one float32 product, like a precomputed float32 table), in float32, written back
in x's dtype. `inverse=True` rotates by the negative angle (the attention output's de-rotation).

x: [T, ..., D]; positions: [T] integer; inv_freq: [r/2] float32. Returns a new tensor.

norm_rope(x, weight, eps, positions, inv_freq, fp8_width=0, dialect=OCP): rms_norm over the last dim (weight
optional), then apply_rope, then (fp8_width > 0) fp8_roundtrip of the first fp8_width channels per 64, each step
rounded to x's dtype as the three ops are: an attention layer's new q rows (per head, no weight) and kv rows
(kv_norm's weight, the 448 non-RoPE channels through FP8 under official numerics) in one op.

norm_rope_qkv(q, kv, kv_weight, q_eps, kv_eps, positions, inv_freq, fp8_width, dialect): both of a layer's
norm_rope calls (q without weight, kv with), one launch in a provider.

rope_hadamard_fp4(x, positions, inv_freq): apply_rope, then the Hadamard rotation and MXFP4 round trip per 32
channels (fp4_roundtrip(hadamard=True)), each rounded to x's dtype: the indexer queries [T, H, d] in one op.
"""

import math

import torch

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.norm import rms_norm_reference
from dsv4.ops.quant import fp4_roundtrip_reference, fp8_roundtrip_reference
from dsv4.ops.registry import define_op


def rope_inv_freq(theta: float, dim: int, yarn=None) -> torch.Tensor:
    """Inverse frequencies [dim/2] (float32) for base `theta` with optional YaRN blending (no mscale):
    pairs below the correction range keep their frequency, pairs above it are divided by the factor,
    linear ramp between (spec §2.4)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return freqs

    def corr(n_rot: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(yarn.beta_fast)), 0)
    high = min(math.ceil(corr(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return freqs / yarn.factor * ramp + freqs * (1 - ramp)


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                         inverse: bool = False) -> torch.Tensor:
    half = inv_freq.numel()
    r = 2 * half
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)[None, :]
    cos, sin = ang.cos(), ang.sin()
    if inverse:
        sin = -sin
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos.view(shape), sin.view(shape)
    xr = x[..., x.shape[-1] - r:].float().unflatten(-1, (half, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    out = x.clone()
    out[..., x.shape[-1] - r:] = rot.to(x.dtype)
    return out


apply_rope = define_op("apply_rope", apply_rope_reference)


def norm_rope_reference(x: torch.Tensor, weight, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor,
                        fp8_width: int = 0, dialect=Fp8Dialect.OCP) -> torch.Tensor:
    y = apply_rope_reference(rms_norm_reference(x, weight, eps), positions, inv_freq)
    return fp8_roundtrip_reference(y, 64, dialect, fp8_width) if fp8_width else y


norm_rope = define_op("norm_rope", norm_rope_reference)


def rope_hadamard_fp4_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """apply_rope, then fp4_roundtrip(block 32, hadamard=True): the indexer's queries under official numerics."""
    return fp4_roundtrip_reference(apply_rope_reference(x, positions, inv_freq), 32, hadamard=True)


rope_hadamard_fp4 = define_op("rope_hadamard_fp4", rope_hadamard_fp4_reference)


def norm_rope_qkv_reference(q: torch.Tensor, kv: torch.Tensor, kv_weight, q_eps: float, kv_eps: float,
                            positions: torch.Tensor, inv_freq: torch.Tensor, fp8_width: int = 0,
                            dialect=Fp8Dialect.OCP) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm_rope(q, None, q_eps, ...), norm_rope(kv, kv_weight, kv_eps, ..., fp8_width, dialect)): an attention
    layer's new q rows and kv row, one launch in a provider."""
    return (norm_rope_reference(q, None, q_eps, positions, inv_freq),
            norm_rope_reference(kv, kv_weight, kv_eps, positions, inv_freq, fp8_width, dialect))


norm_rope_qkv = define_op("norm_rope_qkv", norm_rope_qkv_reference)
