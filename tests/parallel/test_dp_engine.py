"""One front end over two expert-parallel ranks (gloo, CPU): the DPEngine (rank 0) places requests on
both ranks, steps them in lockstep (a rank with no work takes part with a one-token step), and returns
the same outputs as one process: greedy tokens and their logprobs, prompt logprobs, seeded sampling,
text; bad requests are refused before reaching a rank; a remote request can be aborted mid-flight;
streaming through AsyncLLM; `dsv4 generate --gpus 2` and torchrun give the tokens of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("dp_driver.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
CLI = ["generate", "--device", "cpu", "--dtype", "float32", "--numerics", "plain", "--max-tokens", "5",
       "--temperature", "0", "--ignore-eos", "--json", "--prompt", "Hello there",
       "--prompt", "The capital of France is a long sentence here", "--prompt", "x"]


def _run(args, timeout=600) -> str:
    p = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def driven(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    _run([sys.executable, str(DRIVER), str(tiny_dir), "two", str(d / "two.json")])
    _run([sys.executable, str(DRIVER), str(tiny_dir), "one", str(d / "one.json")])
    return json.loads((d / "two.json").read_text()), json.loads((d / "one.json").read_text())


def _close(got, want, tol=5e-5):
    """Per-token logprob entries of two batchings: same token, logprob within `tol` (seen: 2e-6), rank inside the
    band the reference allows for near-ties, top-n equal as values with ids free only among ties
    (an id outside the reference's top-n is accepted only if its logprob ties the n-th best)."""
    if got is None or want is None:
        assert got is None and want is None
        return
    assert len(got) == len(want)
    for x, y in zip(got, want):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert x["id"] == y["id"] and abs(x["logprob"] - y["logprob"]) < tol, (x, y)
        lo, hi = y["rank_band"]
        assert lo <= y["rank"] <= hi and lo <= x["rank"] <= hi, (x["rank"], y["rank_band"])
        assert len(x["top"]) == len(y["top"]), (x, y)
        assert all(abs(a[1] - b[1]) < tol for a, b in zip(x["top"], y["top"])), (x["top"], y["top"])
        may = dict((i, v) for i, v in (y["may_top"] or []))
        ids = [i for i, _ in x["top"]]
        assert len(set(ids)) == len(ids), x["top"]
        for i, v in x["top"]:
            assert i in may and abs(v - may[i]) < tol, (i, v, y["top"])


def test_two_ranks_equal_one_process(driven):
    two, one = driven
    assert two["world"] == 2
    assert len(two["batch"]) == len(one["batch"]) == 4
    for got, want in zip(two["batch"], one["batch"]):
        assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
        assert got["finish_reason"] == want["finish_reason"] == "length"
        assert got["num_generated"] == len(want["token_ids"]) and got["error"] is None
        _close(got["logprobs"], want["logprobs"])
        _close(got["prompt_logprobs"], want["prompt_logprobs"])
    assert two["batch"][0]["prompt_logprobs"][0] is None and len(two["batch"][2]["prompt_logprobs"]) == 11


def test_bad_request_refused_before_any_rank(driven):
    two, _ = driven
    assert two["bad"] is not None and "outside the vocabulary" in two["bad"]
    assert two["unfinished_after_bad"] == 0


def test_abort_remote_request_midway(driven):
    two, _ = driven
    assert two["owners"] == {"a": 0, "b": 1}  # least loaded rank first
    assert two["load_running"] == 2  # summed over ranks
    assert two["abort_return"] is None  # remote: the final output comes with the next step
    ab, other = two["aborted"], two["other"]
    assert ab["finish_reason"] == "abort" and 1 <= len(ab["token_ids"]) < 40
    assert other["finish_reason"] == "length" and len(other["token_ids"]) == 40
    assert two["load_after"]["running"] == 0 and two["load_after"]["waiting"] == 0
    assert two["load_after"]["free_pages"] == two["load_after"]["pages"]  # nothing leaked on either rank


def test_async_streams_over_two_ranks(driven):
    two, one = driven
    for s, want in zip(two["streams"], one["batch"]):
        assert s["delta_tokens"] == s["final"]["token_ids"] and s["delta_text"] == s["final"]["text"]
        assert s["final"]["finish_reason"] == "length" and len(s["delta_tokens"]) == 5
    # greedy: the streamed tokens are the start of the greedy batch run's (same prompts, same weights)
    assert two["streams"][0]["delta_tokens"] == one["batch"][0]["token_ids"][:5]
    assert two["children_exit"] == [0]


def test_speculative_decoding_over_two_ranks(driven, tiny_dir, tmp_path):
    """MTP speculation with expert parallelism: the greedy requests get the one-process tokens (and logprobs),
    the seeded ones their full lengths; drafts were verified on both ranks' requests."""
    _, one = driven
    _run([sys.executable, str(DRIVER), str(tiny_dir), "spec", str(tmp_path / "spec.json")])
    got = json.loads((tmp_path / "spec.json").read_text())
    for i, (g, want) in enumerate(zip(got["batch"], one["batch"])):
        assert g["error"] is None and g["finish_reason"] == "length"
        assert len(g["token_ids"]) == len(want["token_ids"])
        if i in (0, 2):  # greedy
            assert g["token_ids"] == want["token_ids"], i
            _close(g["logprobs"], want["logprobs"])
            _close(g["prompt_logprobs"], want["prompt_logprobs"])
    assert all(n > 0 for n in got["spec_steps"]), got["spec_steps"]


def test_prefix_caching_over_two_ranks(tiny_dir, tmp_path):
    """Each rank caches its own requests' prefixes; the second wave goes where its prefix is (affinity
    placement) and hits; greedy tokens equal one process without the cache; nothing leaks on either rank."""
    _run([sys.executable, str(DRIVER), str(tiny_dir), "prefix", str(tmp_path / "prefix.json")])
    got = json.loads((tmp_path / "prefix.json").read_text())
    assert got["got"] == got["want"]
    assert got["cached"] == [[0, 0], [512, 512]], got["cached"]
    load = got["load_after"]
    assert load["running"] == 0 and load["free_pages"] == load["pages"]


@pytest.mark.parametrize("busy", [True, False])
def test_a_dead_rank_fails_requests_and_health_names_it(tiny_dir, tmp_path, busy):
    """Rank 1 killed mid-generation: the front end stays up, the step (at once, or the next one after the
    watcher saw the death) fails naming the rank, requests are dropped, new ones refused with the reason, and
    /health's reason names it; the driver exits normally (no os._exit)."""
    mode = "kill_busy" if busy else "kill_idle"
    _run([sys.executable, str(DRIVER), str(tiny_dir), mode, str(tmp_path / "k.json")])
    got = json.loads((tmp_path / "k.json").read_text())
    why = "rank 1 (pid"
    assert got["closed_before_step"] is (not busy)
    assert got["step_error"] is not None and why in got["step_error"] and "exited with code -9" in got["step_error"]
    assert got["closed"] and why in got["failure"] and got["unfinished"] == 0
    assert why in got["add_error"] and why in got["health"]


def _tokens(stdout: str) -> list[list[int]]:
    line = [ln for ln in stdout.splitlines() if ln.startswith("{")][-1]
    return [o["token_ids"] for o in json.loads(line)["outputs"]]


def test_cli_gpus_and_torchrun_equal_one_process(tiny_dir):
    """`--gpus 2` (all-gather exchange) and torchrun (all-to-all exchange) give the one-process tokens."""
    model = ["--model", str(tiny_dir)]
    one = _tokens(_run([sys.executable, "-m", "dsv4.cli", *CLI, *model]))
    two = _tokens(_run([sys.executable, "-m", "dsv4.cli", *CLI, *model, "--gpus", "2"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tr = _tokens(_run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                       "-m", "dsv4.cli", *CLI, *model, "--ep-exchange", "alltoall"]))
    assert len(one) == 3 and all(len(t) == 5 for t in one)
    assert two == one and tr == one
