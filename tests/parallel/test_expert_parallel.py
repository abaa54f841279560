"""Expert parallelism on the CPU: two processes (gloo) each holding half of the routed experts and serving
their own prompts (data-parallel attention, tokens exchanged in every MoE layer) give the same greedy
tokens as one process holding everything. Uneven work: rank 0 has two prompts, rank 1 one, of different
lengths, so the exchange pads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import generate
from dsv4.model import build_model

WORKER = Path(__file__).with_name("ep_worker.py")
PROMPTS = [[0, 1234, 56, 789, 10], [0, 42], [0, 7, 7, 99, 1000, 3, 17, 5, 2048, 11, 12]]
MAX_TOKENS = 6


def test_two_gloo_ranks_equal_one_process(tiny_dir, tmp_path):
    want = generate(build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain"), PROMPTS,
                    max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    shares = {0: [PROMPTS[0], PROMPTS[1]], 1: [PROMPTS[2]]}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tiny_dir), str(r), "2", str(tmp_path / "rdv"),
                               json.dumps(shares[r]), str(tmp_path / f"r{r}.json"), str(MAX_TOKENS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    got = {r: json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)}
    E = 16
    assert got[0]["local_experts"] == list(range(0, E // 2)) and got[1]["local_experts"] == list(range(E // 2, E))
    tokens = got[0]["tokens"] + got[1]["tokens"]
    assert tokens == [o.token_ids for o in want.outputs]
    assert all(len(t) == MAX_TOKENS for t in tokens)


EXCHANGE_WORKER = Path(__file__).with_name("exchange_worker.py")


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_equals_all_gather(world, tmp_path):
    """The all-to-all exchange (each token only to the ranks holding its experts) gives the single-process
    routed output, as the all-gather one does: 2 and 3 gloo ranks (8 experts split unevenly over 3), uneven
    token counts, a rank with none."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(EXCHANGE_WORKER), str(r), str(world), str(tmp_path / "rdv"),
                               str(tmp_path / f"x{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    zero_seen = False
    for r in range(world):
        for trial in json.loads((tmp_path / f"x{r}.json").read_text()).values():
            assert trial["shape"] == [trial["T"], 16]
            assert trial["a2a_err"] < 1e-4 and trial["ag_err"] < 1e-4 and trial["a2a_vs_ag"] < 1e-4, trial
            zero_seen |= trial["T"] == 0
    assert zero_seen
