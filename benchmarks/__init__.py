"""Benchmarks and GPU checks, run from the repository root (`PYTHONPATH=. python3 benchmarks/<script>.py`);
a package so that scripts and tests import the shared GPU check cases as `benchmarks.kernel_cases`."""
