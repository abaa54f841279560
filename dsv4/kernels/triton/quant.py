"""Triton fp8_act_quant (dsv4/ops/quant.py): per row and `block` channels, power-of-two (E8M0) scale and
FP8 e4m3 bytes in either dialect, byte-identical to dsv4.numerics.quantize_fp8_blocks (except that a
value rounding to zero is always 0x00, where the numerics module keeps OCP's -0 as 0x80: same value).

Exponent, exactly: with amax = (1 + M / 2^23) 2^(E - 127) (float32 fields E, M; amax >= 1e-4 is normal)
and 448 = 0.875 * 2^9, ceil(log2(amax / 448)) = (E - 126) - 9 + (M > 0x600000), the frexp identity of
numerics.pow2_scale_exponent (mantissa 0.5 + M / 2^24 compared with 0.875) on the bits, no rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import fp8_block_exponent, fp8_encode, fp8_pow2, fp8_quant_max, register
from dsv4.kernels.triton.norm import bench_ms, roofline
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.quant import fp8_act_quant as fp8_act_quant_op
from dsv4.ops.quant import fp8_act_quant_reference

# Work decomposition: grid = (M, cdiv(nb, G)) with nb = ceil(K / block) blocks per row. A program loads a
# [G, BLOCK_P] tile (G blocks of one row, BLOCK_P = next_pow2(block), ~4096 elements; lanes past the block
# or past K masked), reduces amax per block, derives the exponent from amax's bits, scales by the exact
# power of two 2^-e (built from bits), clamps, encodes by bit arithmetic and stores bytes + one scale
# byte per block. x is read once and q / scale written once: bytes = M K (elt + 1) + M nb, the copy
# roofline.


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, NB, block, sx, sq, ss,
                      G: tl.constexpr, BLOCK_P: tl.constexpr, FNUZ: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    bs = tl.program_id(1) * G + tl.arange(0, G)
    lane = tl.arange(0, BLOCK_P)
    cols = bs[:, None] * block + lane[None, :]
    mask = (bs[:, None] < NB) & (lane[None, :] < block) & (cols < K)
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
    e = fp8_block_exponent(amax, FNUZ)  # FNUZ: scale 2x OCP's, clamp 224 (numerics.Fp8Dialect.quant_max)
    qmax = fp8_quant_max(FNUZ)
    inv_s = fp8_pow2(-e)  # exact: amax in [1e-4, 3.4e38] gives e in [-22, 121]
    y = tl.minimum(tl.maximum(x * inv_s[:, None], -qmax), qmax)
    tl.store(q_ptr + row * sq + cols, fp8_encode(y, FNUZ), mask=mask)
    tl.store(s_ptr + row * ss + bs, (e + 127).to(tl.uint8), mask=bs < NB)


TILE_ELEMS = 4096


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
        G=g, BLOCK_P=block_p, FNUZ=d is Fp8Dialect.FNUZ, AMAX_FLOOR=1e-4,
        num_warps=max(1, min(8, g * block_p // 512)))
    return q, s


# ----------------------------------------------------------------------------- GPU checks


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: fp8_act_quant [T, 4096] bf16 in both dialects vs the reference: bytes must be equal
    (zeros compared by value), timed (median ms)."""
    from dsv4.numerics.fp8 import fp8_decode

    def case(M, K=4096, dialect=Fp8Dialect.OCP):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(M, K, device=device, generator=g)
            # a different power-of-two range per block, so the scales vary along a row too
            mag = torch.exp2(torch.randint(-12, 12, (M, K // 128), device=device, generator=g).float())
            x = (x * mag.repeat_interleave(128, dim=1)).to(torch.bfloat16)
            q, s = fp8_act_quant_triton(x, 128, dialect)
            wq, ws = fp8_act_quant_reference(x, 128, dialect)
            same = (q == wq) | ((fp8_decode(q, dialect) == 0) & (fp8_decode(wq, dialect) == 0))
            out = {"q_mismatch": int((~same).sum()), "scale_mismatch": int((s != ws).sum())}
            out["triton_ms"] = bench_ms(lambda: fp8_act_quant_triton(x, 128, dialect), device)
            out["torch_ms"] = bench_ms(lambda: fp8_act_quant_reference(x, 128, dialect), device)
            out["bytes"] = M * K * (x.element_size() + 1) + M * (K // 128)
            out["flops"] = 4 * M * K
            return roofline(out)
        return run

    return [("fp8_act_quant[256,4096] bf16 ocp", case(256)),
            ("fp8_act_quant[8192,4096] bf16 ocp", case(8192)),
            ("fp8_act_quant[8192,4096] bf16 fnuz", case(8192, dialect=Fp8Dialect.FNUZ))]


register(fp8_act_quant_op, fp8_act_quant_triton)
