"""AMD GPUs through ROCm. gfx940/941/942 (MI300 series) have FP8 only in the fnuz dialect; gfx950
(MI350/MI355X) uses OCP FP8 and has MXFP4 matrix units."""

import torch

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.platforms.base import Platform

FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")
DENY: dict = {}  # {op: {provider: reason}}


def rocm_platform(index: int):
    props = torch.cuda.get_device_properties(index)
    arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
    fnuz = arch in FNUZ_ARCHS
    return Platform(
        name="rocm", device=f"cuda:{index}", arch=arch,
        fp8_dialect=Fp8Dialect.FNUZ if fnuz else Fp8Dialect.OCP,
        has_fp8_mma=arch.startswith("gfx94") or arch.startswith("gfx95"), has_fp4_mma=arch.startswith("gfx95"),
        supports_graphs=True, total_memory=props.total_memory, deny=DENY)
