"""GPU check cases of the Triton moe_route provider (dsv4/kernels/triton/router.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import math

import torch

from benchmarks.kernel_cases.common import H200_FP32_FMA_FLOPS, bench_ms, rel_err, roofline
from benchmarks.kernel_cases.moe import GPU_TOKENS
from dsv4.kernels.triton.router import moe_route_triton


def route_case(T: int, hashed: bool = False, *, D=4096, E=256, k=6, device="cuda", bench: bool = True):
    """moe_route at [T, D] (bf16 x, fp32 gate [E, D], bias), sqrtsoftplus, normalised, x1.5, vs the
    reference: fraction of tokens whose expert set matches, max weight error on those; bytes = gate weight
    + x + outputs; flops = 2 T E D at the fp32 FMA rate (IEEE fp32 logits, as the reference)."""
    from dsv4.ops.moe import moe_route_reference

    def run():
        dev = torch.device(device)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        g = torch.Generator(device=dev).manual_seed(3)
        x = torch.randn(T, D, device=dev, generator=g).to(dt)
        gw = torch.randn(E, D, device=dev, generator=g) / math.sqrt(D)
        bias = 0.1 * torch.randn(E, device=dev, generator=g)
        tid = torch.stack([torch.randperm(E, device=dev, generator=g)[:k] for _ in range(64)]) if hashed else None
        inid = torch.randint(0, 64, (T,), device=dev, generator=g)
        b = None if hashed else bias

        def fn():
            return moe_route_triton(x, gw, b, tid, inid, k, "sqrtsoftplus", True, 1.5)

        gw_, gi = fn()
        ww, wi = moe_route_reference(x, gw, b, tid, inid, k, "sqrtsoftplus", True, 1.5)
        same = (gi.sort(-1).values == wi.sort(-1).values).all(-1)
        out = {"ids_match_frac": float(same.float().mean())}
        if bool(same.any()):
            a = gw_.gather(1, gi.argsort(-1))[same]
            r = ww.gather(1, wi.argsort(-1))[same]
            out.update(rel_err(a, r))
        out["bytes"] = E * D * 4 + T * D * x.element_size() + T * k * 12
        out["flops"] = 2.0 * T * E * D
        out["triton_ms"] = bench_ms(fn, dev) if bench else float("nan")
        return roofline(out, flops_ps=H200_FP32_FMA_FLOPS)

    return run


def gpu_check_cases(device="cuda"):
    """[(name, fn)] at DeepSeek-V4-Flash shapes (D 4096, 256 experts, top-6): learned routing with bias for
    T = 1 .. 8192 and hash routing at T = 1 and 8192, each vs the reference (expert sets, weights) and timed."""
    cases = [(f"moe_route learned T={T}", route_case(T, device=device)) for T in GPU_TOKENS]
    cases += [(f"moe_route hash T={T}", route_case(T, hashed=True, device=device)) for T in (1, 8192)]
    return cases
