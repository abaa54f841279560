"""The CPU: development, tests, the reference path. OCP FP8 dialect (kernels may simulate either)."""

import platform as _pf

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.platforms.base import Platform


def cpu_platform():
    return Platform(name="cpu", device="cpu", arch=_pf.machine() or "cpu", fp8_dialect=Fp8Dialect.OCP)
