"""Layout rules (issue 17): dsv4/kernels/ holds kernels, their launch wrappers, launch configuration and what
the wrappers use; the GPU check harness (each module's `gpu_check_cases()`, its `_gpu_*` case builders, the
H200 roofline constants, timing) lives in benchmarks/kernel_cases/, one module per kernel module, run by
benchmarks/gpu_kernels_check.py. Static checks (ast), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "dsv4" / "kernels"
CASES = ROOT / "benchmarks" / "kernel_cases"


def bound_names(tree: ast.AST):
    """(name, line) of every name a module binds anywhere: defs, classes, assignment targets, imports."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id, node.lineno
        elif isinstance(node, ast.alias):
            yield (node.asname or node.name).split(".")[0], node.lineno


def harness_names(tree: ast.AST) -> list[tuple[str, int]]:
    return [(n, line) for n, line in bound_names(tree)
            if n == "gpu_check_cases" or n.startswith(("H200", "_gpu_"))]


def literal(path: Path, name: str):
    """The value of a module-level `name = <literal>` in `path`."""
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path}: no {name} = ...")


def test_rule_catches_harness_names():
    src = ("H200_BW = 4.8e12\nfrom x import H200_FLOPS\ndef gpu_check_cases():\n    def _gpu_case(): pass\n"
           "def bench(): pass\n")
    assert sorted(n for n, _ in harness_names(ast.parse(src))) == ["H200_BW", "H200_FLOPS", "_gpu_case",
                                                                     "gpu_check_cases"]


def test_kernel_files_hold_no_gpu_check_harness():
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    bad = [f"{p.relative_to(ROOT)}:{line}: {n}" for p in files
           for n, line in harness_names(ast.parse(p.read_text(), str(p)))]
    assert not bad, "GPU check harness belongs in benchmarks/kernel_cases/, not dsv4/kernels/:\n" + "\n".join(bad)


def test_every_kernel_module_has_its_gpu_check_cases():
    modules = literal(KERNELS / "triton" / "__init__.py", "KERNEL_MODULES")
    assert tuple(literal(ROOT / "benchmarks" / "gpu_kernels_check.py", "MODULES")) == tuple(modules)
    for m in modules:
        path = CASES / f"{m}.py"
        assert path.is_file(), path
        tops = {n.name for n in ast.parse(path.read_text(), str(path)).body if isinstance(n, ast.FunctionDef)}
        assert "gpu_check_cases" in tops, path
