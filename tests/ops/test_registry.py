"""The op registry (design.md §4): resolution on the CPU platform, forced providers, deny lists,
capability reasons in the report, and --op parsing. Throwaway ops are defined with define_op and
removed from dsv4.ops.registry._OPS afterwards."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

import dsv4.ops.registry as registry
from dsv4.ops.registry import REFERENCE, OpResolutionError, all_ops, define_op, parse_overrides, resolve
from dsv4.platforms.cpu import cpu_platform
from providers import providers

_counter = itertools.count()


@pytest.fixture
def scratch_op():
    """A fresh op `test_registry_scratch_N` (reference returns "ref"), removed from the registry after."""
    name = f"test_registry_scratch_{next(_counter)}"

    def ref(x):
        """Scratch reference."""
        return ("ref", x)

    op = define_op(name, ref)
    try:
        yield op
    finally:
        registry._OPS.pop(name, None)
    assert name not in all_ops()


def test_resolve_cpu_picks_every_op():
    plat = cpu_platform()
    table = resolve(plat)
    ops = all_ops()
    expected = {"rms_norm", "apply_rope", "hc_pre", "hc_post", "hc_head", "linear", "grouped_linear", "moe_route", "swiglu", "norm_rope",
                "rope_hadamard_fp4", "norm_rope_qkv",
                "moe_experts", "compress_kv", "indexer_topk", "sparse_attention", "write_window"}
    assert expected <= set(ops)
    assert set(table.choices) == set(ops)
    report = table.report()
    lines = report.splitlines()
    assert lines[0].split()[:2] == ["op", "provider"]
    for name, op in ops.items():
        choice = table.choices[name]
        assert choice.provider in op.providers
        assert getattr(table, name) is op.providers[choice.provider].fn
        assert any(line.split()[:2] == [name, choice.provider] for line in lines), f"{name} missing from report"
        # the bound provider is one the op tests exercise
        assert choice.provider in [p for p, _ in providers(name)]


def test_forced_unknown_provider(scratch_op):
    with pytest.raises(OpResolutionError, match="no such provider") as ei:
        resolve(cpu_platform(), {scratch_op.name: "warp_drive"})
    assert "warp_drive" in str(ei.value) and REFERENCE in str(ei.value)


def test_forced_unknown_op():
    with pytest.raises(OpResolutionError, match="no op named 'no_such_op'"):
        resolve(cpu_platform(), {"no_such_op": REFERENCE})


def test_unsupported_provider_reason(scratch_op):
    scratch_op.register("fancy", lambda x: ("fancy", x), supported=lambda p: "needs a unicorn", priority=50)
    plat = cpu_platform()
    with pytest.raises(OpResolutionError, match="needs a unicorn"):
        resolve(plat, {scratch_op.name: "fancy"})
    table = resolve(plat)
    assert table.choices[scratch_op.name].provider == REFERENCE
    assert dict(table.choices[scratch_op.name].skipped)["fancy"] == "needs a unicorn"
    assert getattr(table, scratch_op.name)(1) == ("ref", 1)
    line = next(ln for ln in table.report().splitlines() if ln.startswith(scratch_op.name + " "))
    assert "fancy (needs a unicorn)" in line
    assert "fancy" not in [p for p, _ in providers(scratch_op.name)]


def test_supported_provider_wins_by_priority(scratch_op):
    scratch_op.register("slow", lambda x: ("slow", x), priority=1)
    scratch_op.register("fast", lambda x: ("fast", x), priority=20)
    scratch_op.register("broken", lambda x: ("broken", x), supported=lambda p: 1 / 0, priority=99)
    table = resolve(cpu_platform())
    c = table.choices[scratch_op.name]
    assert c.provider == "fast" and getattr(table, scratch_op.name)(2) == ("fast", 2)
    skipped = dict(c.skipped)
    assert skipped["slow"] == "lower priority" and skipped[REFERENCE] == "lower priority"
    assert skipped["broken"].startswith("capability check failed: ZeroDivisionError")
    # forcing the lower-priority one works
    assert getattr(resolve(cpu_platform(), {scratch_op.name: "slow"}), scratch_op.name)(3) == ("slow", 3)
    assert sorted(p for p, _ in providers(scratch_op.name)) == ["fast", "slow", REFERENCE]
    with pytest.raises(OpResolutionError):
        scratch_op.register("fast", lambda x: x)  # registered twice


def test_deny_list_skips_provider(scratch_op):
    scratch_op.register("fast", lambda x: ("fast", x), priority=20)
    plat = dataclasses.replace(cpu_platform(), deny={scratch_op.name: {"fast": "miscompiles here, use the next"}})
    table = resolve(plat)
    c = table.choices[scratch_op.name]
    assert c.provider == REFERENCE
    why = dict(c.skipped)["fast"]
    assert "miscompiles here, use the next" in why and plat.arch in why
    assert "miscompiles here, use the next" in table.report()
    with pytest.raises(OpResolutionError, match="miscompiles here"):
        resolve(plat, {scratch_op.name: "fast"})
    # without the deny entry it would have been chosen
    assert resolve(cpu_platform()).choices[scratch_op.name].provider == "fast"


def test_define_op_twice_raises(scratch_op):
    with pytest.raises(OpResolutionError, match="defined twice"):
        define_op(scratch_op.name, lambda: None)


@pytest.mark.parametrize("bad", ["rms_norm", "", "linear:torch"])
def test_parse_overrides_malformed(bad):
    with pytest.raises(OpResolutionError) as ei:
        parse_overrides(["apply_rope=torch", bad])
    assert repr(bad) in str(ei.value)


def test_parse_overrides_ok():
    assert parse_overrides(None) == {}
    assert parse_overrides([" rms_norm = triton ", "linear=torch"]) == {"rms_norm": "triton", "linear": "torch"}
    assert parse_overrides(["a=b=c"]) == {"a": "b=c"}
