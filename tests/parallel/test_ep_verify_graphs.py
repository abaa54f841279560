"""Verify and MTP draft graphs under expert parallelism (two gloo ranks on the CPU, graphs built as on a GPU
and run uncaptured): every rank replays the agreed bucket, a rank without requests replays padding rows
only (and its draft graph), and greedy outputs equal plain decoding in one process. Requests of different
lengths finish at different steps, so one rank idles while the other verifies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

WORKER = Path(__file__).with_name("ep_verify_worker.py")
PROMPTS = [[0, 1234, 56, 789, 10], [0, 42, 7], [0, 7, 7, 99, 1000, 3]]
MAX_TOKENS = [10, 8, 14]


def test_verify_graphs_over_two_ranks_equal_one_process(tiny_dir, tmp_path):
    from dsv4 import LLM, SamplingParams

    llm = LLM(str(tiny_dir), device="cpu", dtype="float32", numerics="plain", max_model_len=256)
    want = [o.outputs[0].token_ids for o in llm.generate(
        PROMPTS, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS], use_tqdm=False)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    out = tmp_path / "r0.json"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tiny_dir), str(r), str(port), "2", json.dumps(PROMPTS),
                               json.dumps(MAX_TOKENS), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        log, _ = p.communicate(timeout=900)
        assert p.returncode == 0, log[-4000:]
    got = json.loads(out.read_text())
    assert got["draft_graphs"] and got["verify_graph_steps"] > 0
    assert got["tokens"] == want
