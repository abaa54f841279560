"""lm_head (dsv4/ops/logits.py): the fp32 reference, and the cuBLAS fp32-output provider's capability and
delegation (its GPU result is compared with the reference by its own probe and in the GPU checks)."""

import torch

from dsv4.kernels.vendor import lm_head as vl
from dsv4.ops.logits import lm_head_reference
from dsv4.platforms import detect


def test_reference_is_fp32_product_of_exact_operands():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 64, generator=g).bfloat16()
    w = torch.randn(50, 64, generator=g).bfloat16()
    got = lm_head_reference(h, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (h.double() @ w.double().t()).float(), atol=1e-5, rtol=1e-6)


def test_provider_refuses_cpu_and_delegates():
    assert "needs a GPU" in vl.lm_head_supported(detect("cpu"))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 32, generator=g).bfloat16()
    w = torch.randn(7, 32, generator=g).bfloat16()
    assert torch.equal(vl.lm_head_f32out(h, w), lm_head_reference(h, w))  # off-GPU input: the reference
