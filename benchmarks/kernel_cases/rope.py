"""GPU check cases of the Triton apply_rope provider (dsv4/kernels/triton/rope.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import bench_ms, roofline
from dsv4.kernels.triton.rope import apply_rope_triton
from dsv4.ops.rope import apply_rope_reference


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: apply_rope on q [T, 64, 512] bf16 (64 rotary dims, YaRN table), positions up to
    1,000,000, forward and inverse, vs the reference, timed (median ms)."""
    from dsv4.config import YarnScaling
    from dsv4.ops.rope import rope_inv_freq

    def case(T, H=64, D=512, inverse=False):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            shape = (T, D) if H == 1 else (T, H, D)  # kv is [T, 512]
            x = torch.randn(*shape, device=device, generator=g).to(torch.bfloat16)
            pos = torch.randint(0, 1_000_000, (T,), device=device, generator=g)
            inv = rope_inv_freq(160000.0, 64, YarnScaling(factor=16.0, original_max_position_embeddings=65536))
            inv = inv.to(device)
            got = apply_rope_triton(x, pos, inv, inverse)
            want = apply_rope_reference(x, pos, inv, inverse)
            d = (got.double() - want.double()).abs()
            out = {"max_abs": float(d.max()), "max_rel": float((d / want.double().abs().clamp_min(1e-3)).max()),
                   "bf16_equal_frac": float((got == want).float().mean()),
                   "copied_dims_equal": bool(torch.equal(got[..., :D - 64], x[..., :D - 64]))}
            out["triton_ms"] = bench_ms(lambda: apply_rope_triton(x, pos, inv, inverse), device)
            out["torch_ms"] = bench_ms(lambda: apply_rope_reference(x, pos, inv, inverse), device)
            out["bytes"] = 2 * x.numel() * x.element_size() + T * 8
            out["flops"] = 6 * T * H * 64
            return roofline(out)
        return run

    return [("apply_rope q[256,64,512] bf16", case(256)),
            ("apply_rope q[8192,64,512] bf16", case(8192)),
            ("apply_rope q[8192,64,512] bf16 inverse", case(8192, inverse=True)),
            ("apply_rope kv[8192,512] bf16", case(8192, H=1))]
