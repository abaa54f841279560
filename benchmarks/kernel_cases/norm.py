"""GPU check cases of the Triton rms_norm provider (dsv4/kernels/triton/norm.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import bench_ms, roofline
from dsv4.kernels.triton.norm import rms_norm_triton
from dsv4.ops.norm import rms_norm_reference


def _err(got: torch.Tensor, want: torch.Tensor) -> dict:
    g, w = got.double(), want.double()
    d = (g - w).abs()
    return {"max_abs": float(d.max()), "max_rel": float((d / w.abs().clamp_min(1e-6)).max()),
            "ref_max": float(w.abs().max())}


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: rms_norm at the model's shapes on `device` (CUDA), vs the reference, timed (median
    ms); bytes = what must move (x read, y written, weight), for the fraction of the HBM roofline."""
    def case(M, N, dtype=torch.bfloat16, weighted=True):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            x = (2.0 * torch.randn(M, N, device=device, generator=g)).to(dtype)
            w = (1.0 + 0.3 * torch.randn(N, device=device, generator=g)) if weighted else None
            got = rms_norm_triton(x, w, 1e-6)
            want = rms_norm_reference(x, w, 1e-6)
            out = _err(got, want)
            out["bf16_equal_frac"] = float((got == want).float().mean())
            out["triton_ms"] = bench_ms(lambda: rms_norm_triton(x, w, 1e-6), device)
            out["torch_ms"] = bench_ms(lambda: rms_norm_reference(x, w, 1e-6), device)
            out["bytes"] = 2 * M * N * x.element_size() + (N * 4 if weighted else 0)
            out["flops"] = 4 * M * N
            return roofline(out)
        return run

    return [("rms_norm[256,4096] bf16", case(256, 4096)),
            ("rms_norm[8192,4096] bf16", case(8192, 4096)),
            ("rms_norm[8192*64,512] bf16 unweighted (per-head q norm)", case(8192 * 64, 512, weighted=False)),
            ("rms_norm[256,16384] bf16 (chunked path)", case(256, 16384))]
