"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported, so
Triton kernels run on the CPU interpreter (design.md §6)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Built-in models are materialised here, never in the user's ~/.cache.
os.environ["DSV4_HOME"] = tempfile.mkdtemp(prefix="dsv4-test-home-")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: CI runs two xdist workers on two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny release-format checkpoint (written once per test process)."""
    from dsv4.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))
