"""fp8_act_quant: activation quantisation into FP8 GEMMs, as the official kernels do (spec §4.7).

x: [M, K] float -> (q: uint8 [M, K] FP8 e4m3 bytes in `dialect`, scale: uint8 [M, ceil(K/block)] E8M0
bytes). Per row and `block` contiguous channels: amax = max|x| (at least 1e-4), s = 2^ceil(log2(amax /
448)); OCP: q = e4m3(clamp(x / s, +-448)), scale byte = log2(s) + 127; FNUZ: q = e4m3fnuz(clamp(x /
2s, +-224)), scale byte = log2(2s) + 127 (the same values as OCP). Round to nearest even.
"""

import torch

from dsv4.numerics.fp8 import Fp8Dialect, quantize_fp8_blocks
from dsv4.ops.registry import define_op


def fp8_act_quant_reference(x: torch.Tensor, block: int = 128, dialect=Fp8Dialect.OCP):
    return quantize_fp8_blocks(x.float(), (block,), dialect)


fp8_act_quant = define_op("fp8_act_quant", fp8_act_quant_reference)
