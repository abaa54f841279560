"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[-1].strip()


def test_ci_runs_the_readme_test_command():
    cmd = _ci_command()
    assert "pytest" in cmd
    assert cmd in (ROOT / "README.md").read_text(), f"README does not contain the CI test command: {cmd}"


def test_readme_run_command_uses_the_same_install():
    readme = (ROOT / "README.md").read_text()
    install = _ci_command().split(" && .venv/bin/python -m pytest")[0]
    run = [ln for ln in readme.splitlines() if "dsv4 serve" in ln and ln.startswith("python3 -m venv")]
    assert run and run[0].startswith(install), "README's run command must install the same way as the tests"
