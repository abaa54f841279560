#!/bin/bash
# untracked helper: run on the device machine from the repo root
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader
