"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported, so
Triton kernels run on the CPU interpreter (design.md §6). A TRITON_INTERPRET already in the environment is
kept.

GPU-only tests carry the `gpu` marker: they need a CUDA device and compiled Triton kernels. Under the
interpreter the packed and scaled FP4 paths are off (kernels/triton/common.interpreting), so such a test
would compare one path with itself: without both conditions it is skipped, with the reason. `--gpu` runs
only those tests, compiled (TRITON_INTERPRET=0; benchmarks/gpu_tests.sh): the rest of the suite runs the
Triton kernels on CPU tensors, which needs the interpreter."""

import os
import tempfile

_INTERPRET_GIVEN = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")
# Built-in models are materialised here, never in the user's ~/.cache.
os.environ["DSV4_HOME"] = tempfile.mkdtemp(prefix="dsv4-test-home-")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: CI runs two xdist workers on two cores.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run only the GPU-only tests (marker `gpu`) with compiled Triton kernels "
                          "(TRITON_INTERPRET=0) on the CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET=0); "
                                       "skipped otherwise; `pytest --gpu` runs only these")
    if config.getoption("--gpu"):
        if _INTERPRET_GIVEN not in (None, "", "0"):
            raise pytest.UsageError(f"--gpu runs compiled Triton kernels, but TRITON_INTERPRET={_INTERPRET_GIVEN}")
        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu: torch sees no CUDA device")
        os.environ["TRITON_INTERPRET"] = "0"  # no kernel module is imported before collection


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    gpu = [it for it in items if it.get_closest_marker("gpu") is not None]
    if config.getoption("--gpu"):
        rest = [it for it in items if it.get_closest_marker("gpu") is None]
        if rest:
            config.hook.pytest_deselected(items=rest)
        items[:] = gpu
        return
    if not gpu:
        return
    if not torch.cuda.is_available():
        reason = "GPU-only: needs a CUDA device"
    elif interpreter_on():
        reason = ("GPU-only: needs compiled Triton (TRITON_INTERPRET=0; benchmarks/gpu_tests.sh): in the interpreter "
                  "the GPU paths are off and the check would compare a path with itself")
    else:
        return
    for it in gpu:
        it.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny release-format checkpoint (written once per test process)."""
    from dsv4.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(tiny_dir):
    """The tiny model in fp32 with plain numerics on the CPU (one per test module)."""
    from dsv4.model import build_model

    return build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")


@pytest.fixture
def launches(monkeypatch):
    """watch(module, kernel_name) -> the list of grids that module-level Triton kernel is launched with from now on
    (each launch still runs): what a test checks a path launches, or no longer launches. watch(..., arg=NAME): the
    value of that keyword argument of each launch instead (a constexpr the path chose)."""
    def watch(mod, name: str, arg: str | None = None) -> list:
        log, real = [], getattr(mod, name)
        if arg is None:
            monkeypatch.setattr(mod, name, type("Watched", (), {
                "__getitem__": lambda self, grid: (log.append(grid), real[grid])[1]})())
        else:
            monkeypatch.setattr(mod, name, type("Watched", (), {
                "__getitem__": lambda self, grid: (lambda *a, **kw: (log.append(kw[arg]), real[grid](*a, **kw))[1])})())
        return log
    return watch
