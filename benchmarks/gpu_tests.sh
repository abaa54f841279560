#!/usr/bin/env bash
# Every GPU-only test: those marked `gpu` in tests/ (skipped on the CPU, and under the Triton interpreter),
# with compiled Triton kernels (TRITON_INTERPRET=0) on the CUDA device. Run from anywhere on the GPU machine:
#
#     benchmarks/gpu_tests.sh [extra pytest arguments]        # PYTHON=... to pick the interpreter (python3)
#
# `pytest --gpu` (tests/conftest.py) refuses to start without a CUDA device or with TRITON_INTERPRET=1, and
# deselects every other test: the rest of the suite runs Triton kernels on CPU tensors, which needs the
# interpreter. Only the files that hold `gpu` tests are collected, so optional dependencies of other test
# files (transformers, the server's) need not be installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
mapfile -t files < <(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu\b' tests | sort)
if [ "${#files[@]}" -eq 0 ]; then
    echo "gpu_tests.sh: no test file under tests/ has a pytest.mark.gpu test" >&2
    exit 1
fi
echo "gpu_tests.sh: ${files[*]}" >&2
exec "${PYTHON:-python3}" -m pytest --gpu -q -rs -p no:cacheprovider "${files[@]}" "$@"
