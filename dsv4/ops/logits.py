"""lm_head: logits = h W^T in float32 (spec §2.9: the official code keeps `head.weight` in fp32 and computes
fp32 logits).

h: [M, D] (the normed final hidden state, bf16 / fp16 / fp32); weight: [V, D] in the checkpoint's dtype
(bf16). Because h and W hold bf16 (or fp16) values, every product is exact in float32, so an fp32 matmul of
the upcast operands and a bf16 GEMM accumulating and returning fp32 compute the same value up to the
summation order. -> [M, V] float32.
"""

import torch

from dsv4.ops.registry import define_op


def lm_head_reference(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return h.float() @ weight.float().t()


lm_head = define_op("lm_head", lm_head_reference)
