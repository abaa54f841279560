"""The op registry: every op has one semantic definition (its plain-PyTorch `reference`) and any
number of providers registered against it. `resolve()` picks one provider per op, once, at start-up,
and records why each candidate was taken or skipped; the model then calls the bound functions with
no dispatch work in the forward pass. The registry resolves among the providers registered: the kernel
packages sit above dsv4.ops and register when imported (dsv4.model.builder.resolve_ops does both).

Rules (design.md §4):
- a provider declares `supported(platform) -> None | reason` (None: it can run here);
- a platform's deny list names providers known broken there, with the reason;
- candidates are tried by priority (highest first); `torch` (the reference) is always last;
- a provider forced by the user (`--op NAME=PROVIDER`) that cannot run is an error listing the reasons,
  never a silent fallback.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

from dsv4.platforms import Platform

REFERENCE = "torch"


class OpResolutionError(RuntimeError):
    pass


@dataclass
class Provider:
    name: str
    fn: Callable
    supported: Callable[[Platform], str | None]
    priority: int
    interpretable: bool = False  # runs on the CPU under TRITON_INTERPRET=1 (tests), though never chosen there


@dataclass
class Op:
    name: str
    reference: Callable
    doc: str = ""
    providers: dict[str, Provider] = field(default_factory=dict)

    def register(self, provider: str, fn: Callable, supported: Callable[[Platform], str | None] | None = None,
                 priority: int = 10, interpretable: bool = False) -> None:
        if provider in self.providers and provider != REFERENCE:
            raise OpResolutionError(f"op {self.name!r}: provider {provider!r} registered twice")
        self.providers[provider] = Provider(provider, fn, supported or (lambda p: None), priority, interpretable)


_OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable, doc: str = "") -> Op:
    """Declare an op with its reference; the reference is registered as provider `torch`."""
    if name in _OPS:
        raise OpResolutionError(f"op {name!r} defined twice")
    op = Op(name, reference, doc or (reference.__doc__ or "").strip().split("\n")[0])
    op.register(REFERENCE, reference, None, priority=-1000)
    _OPS[name] = op
    return op


def all_ops() -> dict[str, Op]:
    """Every op with the providers registered so far. The ops are defined by their modules, which importing
    dsv4.ops (the parent of this module, so always imported first) imports; the providers register when
    their packages are imported: dsv4.kernels, a layer above this one (model/builder.py's `resolve_ops`
    imports it, then resolves)."""
    return dict(_OPS)


@dataclass(frozen=True)
class Choice:
    op: str
    provider: str
    reason: str
    skipped: tuple[tuple[str, str], ...]  # (provider, why not)


class OpTable:
    """The resolved ops: `table.rms_norm(x, w, eps)` calls the chosen provider directly."""

    def __init__(self, platform: Platform, choices: dict[str, Choice], fns: dict[str, Callable]):
        self.platform = platform
        self.choices = choices
        self._fns = fns
        for k, f in fns.items():
            setattr(self, k, f)

    def report(self) -> str:
        rows = [("op", "provider", "why")]
        for c in self.choices.values():
            why = c.reason
            if c.skipped:
                why += "; skipped: " + ", ".join(f"{p} ({r})" for p, r in c.skipped)
            rows.append((c.op, c.provider, why))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["rms_norm=triton", ...]` -> {"rms_norm": "triton"}; errors name the bad item."""
    out: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise OpResolutionError(f"--op {it!r}: expected NAME=PROVIDER")
        k, v = (s.strip() for s in it.split("=", 1))
        out[k] = v
    return out


def resolve(platform: Platform, overrides: dict[str, str] | None = None) -> OpTable:
    ops = all_ops()
    overrides = dict(overrides or {})
    for k in overrides:
        if k not in ops:
            raise OpResolutionError(f"--op {k}=...: no op named {k!r}; ops: {', '.join(sorted(ops))}")
    choices: dict[str, Choice] = {}
    fns: dict[str, Callable] = {}
    for name, op in sorted(ops.items()):
        deny = platform.deny.get(name, {})
        cands = sorted(op.providers.values(), key=lambda p: -p.priority)
        why_not: dict[str, str] = {}
        for p in cands:
            if p.name in deny:
                why_not[p.name] = f"denied on {platform.arch}: {deny[p.name]}"
                continue
            try:
                r = p.supported(platform)
            except Exception as e:  # a capability probe that crashes cannot be trusted
                r = f"capability check failed: {type(e).__name__}: {e}"
            if r is not None:
                why_not[p.name] = r
        if name in overrides:
            want = overrides[name]
            if want not in op.providers:
                raise OpResolutionError(f"--op {name}={want}: no such provider; registered: "
                                        f"{', '.join(op.providers)}")
            if want in why_not:
                raise OpResolutionError(f"--op {name}={want}: cannot run on {platform.describe()}: {why_not[want]}")
            chosen, reason = op.providers[want], "forced by --op"
        else:
            ok = [p for p in cands if p.name not in why_not]
            chosen = ok[0]  # the reference always runs
            reason = "highest-priority provider that can run here" if chosen.name != REFERENCE else (
                "reference (no other provider can run here)" if len(cands) > 1 else "reference (only provider)")
        skipped = tuple((p.name, why_not.get(p.name, "lower priority")) for p in cands if p is not chosen)
        choices[name] = Choice(name, chosen.name, reason, skipped)
        fns[name] = chosen.fn
    if platform.is_gpu:
        slow = [c.op for c in choices.values() if c.provider == REFERENCE]
        if slow:
            warnings.warn(f"reference (plain PyTorch) ops in the hot path on {platform.device}: {', '.join(slow)}",
                          stacklevel=2)
    return OpTable(platform, choices, fns)
