"""Which implementations of an op the op tests run: every provider registered for it that declares it
can run on the CPU platform and is not on that platform's deny list, plus the Triton providers, which
run on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py) although the
registry never chooses them there. Every op test is parametrised over `providers(op_name)`, so a new
provider is automatically held to the same naive oracles."""

from __future__ import annotations

import os

import pytest

import dsv4.kernels  # noqa: F401  (registers the Triton and vendor providers: the op registry does not import them)
from dsv4.ops.registry import all_ops
from dsv4.platforms.cpu import cpu_platform


def providers(op_name: str) -> list[tuple[str, object]]:
    """[(provider name, callable)] for the providers of `op_name` that can run on the CPU platform."""
    ops = all_ops()
    if op_name not in ops:
        raise KeyError(f"no op named {op_name!r}; registered: {sorted(ops)}")
    plat = cpu_platform()
    deny = plat.deny.get(op_name, {})
    out = []
    for name, prov in sorted(ops[op_name].providers.items()):
        if name in deny:
            continue
        try:
            reason = prov.supported(plat)
        except Exception as e:  # a probe that crashes counts as "cannot run here"
            reason = f"{type(e).__name__}: {e}"
        if reason is None or (prov.interpretable and os.environ.get("TRITON_INTERPRET") == "1"):
            out.append((name, prov.fn))
    return out


def provider_params(op_name: str) -> list:
    """`providers(op_name)` as pytest params (id = provider name), for `@pytest.mark.parametrize`."""
    return [pytest.param(fn, id=name) for name, fn in providers(op_name)]
