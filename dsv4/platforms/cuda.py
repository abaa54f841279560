"""NVIDIA GPUs. FP8 tensor cores from sm89 (Ada) and sm90 (Hopper); FP4 from sm100 (Blackwell)."""

import torch

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.platforms.base import Platform

DENY: dict = {}  # {op: {provider: reason}} for providers known broken on some NVIDIA arch


def cuda_platform(index: int):
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    return Platform(
        name="cuda", device=f"cuda:{index}", arch=f"sm{props.major}{props.minor}",
        fp8_dialect=Fp8Dialect.OCP, has_fp8_mma=cc >= (8, 9), has_fp4_mma=cc >= (10, 0),
        supports_graphs=True, total_memory=props.total_memory, deny=DENY)
