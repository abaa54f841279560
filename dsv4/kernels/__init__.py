"""Implementations of the ops beyond the PyTorch references. Importing this package registers every
provider whose library is installed (`dsv4 doctor` shows what was chosen and why)."""

from dsv4.kernels import triton as _triton  # noqa: F401
from dsv4.kernels import vendor as _vendor  # noqa: F401
