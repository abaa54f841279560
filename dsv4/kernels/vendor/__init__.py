"""Vendor-library providers (design.md §4): used only where the library is installed AND declares itself
capable on the platform (each provider's `supported(platform)` says why not). Importing this package
registers them.

- scaled_mm: `linear` through torch._scaled_mm's cuBLASLt block-scaled FP8 GEMM (1x128 activation and
  128x128 weight scales, DeepSeek style), official numerics on OCP FP8 weights; delegates every other case
  to the Triton provider.
- lm_head: float32 logits from one bf16 GEMM with float32 output (no per-step fp32 copy of the head).
- humming: `moe_experts` (MXFP4 routed experts) through humming-kernels' W4A16 MoE GEMM, an optional extra
  (`pip install dsv4[nvidia]`), imported only when asked whether it can run on a CUDA platform.
"""

from dsv4.kernels.vendor import humming_moe, lm_head, scaled_mm  # noqa: F401
