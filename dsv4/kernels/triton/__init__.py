"""Portable Triton kernels (NVIDIA sm80+, AMD CDNA3/4; the CPU interpreter in tests). Each module
registers provider "triton" for its op. Nothing is registered when Triton is not installed."""

from __future__ import annotations

import importlib
import importlib.util

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # e.g. a CPU-only install without the test extras
    HAVE_TRITON = False

KERNEL_MODULES: tuple[str, ...] = ("attention", "indexer", "compressor", "norm", "rope", "hyper_connection", "quant",
                                  "gemm", "moe", "moe_w4a8", "router")

if HAVE_TRITON:
    for _m in KERNEL_MODULES:
        if importlib.util.find_spec(f"dsv4.kernels.triton.{_m}") is not None:  # modules land one by one
            importlib.import_module(f"dsv4.kernels.triton.{_m}")
