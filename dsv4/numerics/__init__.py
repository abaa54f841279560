"""Low-level number formats of the DeepSeek-V4 checkpoint: FP8 e4m3 (OCP / FNUZ), E8M0
scales, FP4 e2m1 (MXFP4) and the Walsh-Hadamard transform."""

from .fp4 import (
    E2M1_VALUES,
    dequantize_fp4_blocks,
    fp4_decode,
    fp4_encode,
    fp4_pack,
    fp4_roundtrip,
    fp4_unpack,
    quantize_fp4_blocks,
)
from .fp8 import (
    Fp8Dialect,
    dequantize_fp8_blocks,
    e8m0_to_float,
    float_to_e8m0,
    fnuz_to_ocp,
    fp8_decode,
    fp8_decode_table,
    fp8_encode,
    fp8_roundtrip,
    ocp_to_fnuz,
    pow2_scale_exponent,
    quantize_fp8_blocks,
)
from .hadamard import hadamard_transform

__all__ = [
    "Fp8Dialect",
    "fp8_decode_table",
    "fp8_decode",
    "fp8_encode",
    "e8m0_to_float",
    "float_to_e8m0",
    "pow2_scale_exponent",
    "quantize_fp8_blocks",
    "dequantize_fp8_blocks",
    "fp8_roundtrip",
    "ocp_to_fnuz",
    "fnuz_to_ocp",
    "E2M1_VALUES",
    "fp4_decode",
    "fp4_unpack",
    "fp4_pack",
    "fp4_encode",
    "quantize_fp4_blocks",
    "dequantize_fp4_blocks",
    "fp4_roundtrip",
    "hadamard_transform",
]
