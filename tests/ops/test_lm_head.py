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


def naive_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain float64 dot products, one (row, vocab entry) at a time: shares no code with dsv4."""
    hd, wd = h.double(), w.double()
    return torch.tensor([[float((hd[i] * wd[v]).sum()) for v in range(w.shape[0])] for i in range(h.shape[0])],
                        dtype=torch.float64)


def test_provider_refuses_cpu_and_delegates():
    """Off the GPU the provider declines, and every input it does not take (CPU tensors, fp32, mixed dtypes)
    still gives fp32 logits equal to a naive float64 product (bf16 / fp16 products are exact in fp32, so
    only the summation order may differ)."""
    assert "needs a GPU" in vl.lm_head_supported(detect("cpu"))
    g = torch.Generator().manual_seed(1)
    h32 = torch.randn(2, 32, generator=g)
    w32 = torch.randn(7, 32, generator=g)
    for h, w in ((h32.bfloat16(), w32.bfloat16()), (h32.half(), w32.half()), (h32, w32), (h32, w32.bfloat16())):
        got = vl.lm_head_f32out(h, w)
        assert got.dtype == torch.float32 and got.shape == (2, 7), (h.dtype, w.dtype)
        torch.testing.assert_close(got.double(), naive_logits(h, w), atol=1e-5, rtol=1e-6,
                                   msg=lambda m: f"{h.dtype} x {w.dtype}: {m}")
