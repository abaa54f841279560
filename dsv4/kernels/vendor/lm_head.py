"""Vendor provider "cublas_f32out" for `lm_head` (dsv4/ops/logits.py): one bf16/fp16 GEMM that accumulates
and writes float32 (`torch.mm(..., out_dtype=torch.float32)`, cuBLAS), instead of the reference's upcast
of the [V, D] weight to float32 on every call (129280 x 4096: 2.1 GB written and read again per step).

Capability: a CUDA or ROCm device and a torch whose `mm` takes `out_dtype` there (probed once per device
in supported(): a small product checked against the reference). Cases it does not take (fp32 operands,
mixed dtypes, tensors off the GPU) go to the reference.
"""

from __future__ import annotations

import torch

from dsv4.ops.logits import lm_head as lm_head_op
from dsv4.ops.logits import lm_head_reference

_PROBE: dict[str, str | None] = {}


def lm_head_f32out(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if (h.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != h.dtype or h.device.type != "cuda"
            or h.dim() != 2):
        return lm_head_reference(h, weight)
    return torch.mm(h, weight.t(), out_dtype=torch.float32)


def _probe(device: str) -> str | None:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(5, 256, device=device, generator=g).bfloat16()
        w = torch.randn(384, 256, device=device, generator=g).bfloat16()
        got = torch.mm(h, w.t(), out_dtype=torch.float32)
        want = lm_head_reference(h, w)
        if got.dtype != torch.float32 or not torch.allclose(got, want, atol=1e-3, rtol=1e-4):
            return f"torch {torch.__version__} mm(out_dtype=float32) disagrees with the reference here"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here", with the message
        return f"torch {torch.__version__} mm(out_dtype=float32) does not run here: {type(e).__name__}: {e}"[:300]


def lm_head_supported(platform) -> str | None:
    if not platform.is_gpu:
        return f"needs a GPU; platform is {platform.name}"
    if platform.device not in _PROBE:
        _PROBE[platform.device] = _probe(platform.device)
    return _PROBE[platform.device]


lm_head_op.register("cublas_f32out", lm_head_f32out, supported=lm_head_supported, priority=100)
