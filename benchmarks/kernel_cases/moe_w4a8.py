"""GPU check cases of the opt-in W4A8 moe_experts provider (dsv4/kernels/triton/moe_w4a8.py) at DeepSeek-V4-Flash
shapes (benchmarks/gpu_kernels_check.py): error against the reference with FP8 activations (official numerics),
its median time beside the Triton provider's on the same inputs, bytes / FLOPs and the floor (the FP8 rate for
the FLOPs: W4A8 dots run on the FP8 tensor cores)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import H200_BW, H200_FP8_FLOPS, bench_ms, rel_err
from benchmarks.kernel_cases.moe import FLASH, case_inputs
from dsv4.kernels.triton.moe import moe_experts_impl
from dsv4.kernels.triton.moe_w4a8 import moe_experts_w4a8_impl
from dsv4.numerics.fp8 import Fp8Dialect


def w4a8_case(T: int, *, D=4096, I=2048, E=256, k=6, device="cuda", bench: bool = True):
    def run():
        from dsv4.ops.moe import moe_experts_reference

        dev, (w13, s13, w2, s2), x, ids, w = case_inputs(T, D, I, E, k, device)
        ocp = Fp8Dialect.OCP

        def fn():
            return moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, 10.0, True, ocp)

        got = fn()
        out = rel_err(got, moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, True, ocp))
        uniq = int(torch.unique(ids).numel())
        per_expert = w13[0].numel() + s13[0].numel() + w2[0].numel() + s2[0].numel()
        out["bytes"] = uniq * per_expert + T * D * (x.element_size() + 4)
        out["flops"] = 2.0 * T * k * (2 * I * D + D * I)
        out["w4a8_ms"] = bench_ms(fn, dev) if bench else float("nan")
        out["triton_ms"] = (bench_ms(lambda: moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, True, ocp), dev)
                            if bench else float("nan"))
        out["floor_us"] = max(out["bytes"] / H200_BW, out["flops"] / H200_FP8_FLOPS) * 1e6
        t = out["w4a8_ms"] * 1e-3
        out["roofline_frac"] = out["floor_us"] * 1e-6 / t if t > 0 else float("nan")
        return out

    return run


def gpu_check_cases(device="cuda"):
    """[(name, fn)] at Flash shapes (D 4096, I 2048, 256 experts, top-6, FP4 experts, FP8 activations)."""
    return [(f"moe_experts w4a8 T={T}", w4a8_case(T, device=device, **{kk: v for kk, v in FLASH.items()}))
            for T in (1, 8, 64, 256, 1024, 8192)]
