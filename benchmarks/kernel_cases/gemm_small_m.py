"""GPU check cases of the one-launch small-M FP8 linear (dsv4/kernels/triton/gemm_small_m.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py); benchmarks/linear_small_m.py compares it with
the other providers under CUDA graphs."""

from __future__ import annotations

from benchmarks.kernel_cases.gemm import FLASH_LINEARS, _gpu_linear_case


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: every DeepSeek-V4-Flash FP8 linear at M = 1, 4, 16 rows, official numerics: errors vs
    the reference, median time, bytes / FLOPs and roofline fractions (as kernel_cases/gemm.py)."""
    return [(f"linear {name} {N}x{K} M={M} official small_m", _gpu_linear_case(N, K, M, True, "small_m", device=device))
            for name, N, K in FLASH_LINEARS for M in (1, 4, 16)]
