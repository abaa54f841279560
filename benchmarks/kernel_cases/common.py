"""Shared pieces of the GPU check cases (benchmarks/kernel_cases/<module>.py, run by
benchmarks/gpu_kernels_check.py): the H200 peak rates the roofline fractions are taken against, timing,
and the error / roofline fields of a record."""

from __future__ import annotations

import torch

# NVIDIA H200 peaks: HBM bandwidth, bf16 / FP8 tensor-core rates, fp32 non-tensor (FMA) rate
H200_BW = 4.8e12
H200_FLOPS = 790e12
H200_FP8_FLOPS = 1460e12
H200_FP32_FMA_FLOPS = 67e12  # the router's IEEE fp32 logits


def copy_bandwidth() -> float:
    """Device copy rate in bytes/s counting read + write (2 GiB buffers, larger than L2): the floors' bandwidth."""
    from triton.testing import do_bench

    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * (2 << 30) / (ms * 1e-3)


def bench_ms(fn, device, **do_bench_kw) -> float:
    """Median time of fn() in ms (triton.testing.do_bench; `do_bench_kw`, e.g. warmup / rep, passed on) on a
    GPU; NaN elsewhere (dry runs of the check code in the interpreter)."""
    if torch.device(device).type == "cpu":
        return float("nan")
    from triton.testing import do_bench

    return float(do_bench(fn, return_mode="median", **do_bench_kw))


def roofline(out: dict, hbm_bps: float = H200_BW, flops_ps: float = H200_FLOPS) -> dict:
    """Add the fractions of the H200 HBM and bf16 FLOP rooflines reached by out["triton_ms"]."""
    t = out.get("triton_ms", float("nan")) * 1e-3
    out["hbm_roofline_frac"] = out["bytes"] / hbm_bps / t if t > 0 else float("nan")
    out["flop_roofline_frac"] = out["flops"] / flops_ps / t if t > 0 else float("nan")
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> dict:
    """max |got - want|, that over max |want| (floored at 1e-30), max |want|; 0 for empty tensors."""
    d = (got.double() - want.double()).abs()
    ref = float(want.double().abs().max()) if want.numel() else 0.0
    mx = float(d.max()) if d.numel() else 0.0
    return {"max_abs_err": mx, "max_rel_err": mx / max(ref, 1e-30), "ref_abs_max": ref}
