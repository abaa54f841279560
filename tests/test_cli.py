"""The `dsv4` command line, in-process (dsv4.cli.main) and once through the installed console script."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.cli import main


TOKS_LINE = re.compile(r"^\[(\d+) tokens, prefill \d+ ms, decode (nan|[\d.]+) tok/s over 1 sequence\(s\), ", re.M)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def greedy_json(capsys, model, ids="0,1234,56", n=3):
    rc, out, err = run(capsys, "generate", "--model", model, "--device", "cpu", "--prompt-token-ids", ids,
                       "--max-tokens", n, "--temperature", 0, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_generate_text(capsys, tiny_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "Hello",
                       "--max-tokens", 4, "--seed", 0)
    assert rc == 0, err
    assert out.strip()  # the decoded text of the generated tokens
    m = TOKS_LINE.search(err)
    assert m, err
    assert 1 <= int(m.group(1)) <= 4
    assert "cpu, bfloat16, official numerics]" in err
    # the same seed samples the same text
    rc2, out2, _ = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "Hello",
                       "--max-tokens", 4, "--seed", 0)
    assert rc2 == 0 and out2 == out


def test_generate_json_greedy(capsys, tiny_dir):
    a = greedy_json(capsys, tiny_dir)
    (o,) = a["outputs"]
    assert o["prompt_token_ids"] == [0, 1234, 56]
    assert len(o["token_ids"]) == 3 and all(isinstance(t, int) and 0 <= t < 129280 for t in o["token_ids"])
    assert len(o["logprobs"]) == 3 and all(math.isfinite(lp) and lp <= 0 for lp in o["logprobs"])
    assert o["finish_reason"] in ("length", "stop")
    assert isinstance(o["text"], str)
    assert a["prefill_seconds"] > 0
    b = greedy_json(capsys, tiny_dir)
    assert b["outputs"][0]["token_ids"] == o["token_ids"]
    assert b["outputs"][0]["logprobs"] == pytest.approx(o["logprobs"], abs=1e-6)


def test_make_tiny_then_generate(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "my-tiny"
    rc, out, err = run(capsys, "make-tiny", out_dir, "--num-shards", 2)
    assert rc == 0, err
    assert str(out_dir) in out
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert (out_dir / f).is_file()
    # same seed and config as the test fixture, laid out differently: the same model, the same greedy tokens
    mine = greedy_json(capsys, out_dir)["outputs"][0]
    ref = greedy_json(capsys, tiny_dir)["outputs"][0]
    assert mine["token_ids"] == ref["token_ids"]


def test_doctor_lists_every_op(capsys):
    from dsv4.ops.registry import all_ops

    rc, out, err = run(capsys, "doctor", "--device", "cpu")
    assert rc == 0, err
    assert "platform: cpu" in out and "fp8=ocp" in out
    first_words = [line.split()[0] for line in out.splitlines() if line.strip()]
    ops = all_ops()
    assert len(ops) >= 10
    for name in ops:
        assert name in first_words, name  # one row per op: name, chosen provider, why
    assert "decode graphs: no (the platform has no device graphs)" in out


def test_missing_model_folder(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run(capsys, "generate", "--model", missing, "--prompt", "hi", "--max-tokens", 1)
    assert rc == 2
    assert err.startswith("dsv4 generate: error:") and str(missing) in err and "no such folder" in err
    assert out == ""


def test_folder_without_config(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", "--model", tmp_path, "--prompt", "hi", "--max-tokens", 1)
    assert rc == 2 and "has no config.json" in err and str(tmp_path) in err


def test_out_of_vocabulary_token_ids(capsys, tiny_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids",
                       "0,129280,5", "--max-tokens", 2)
    assert rc == 2 and out == ""
    assert "dsv4 generate: error:" in err and "129280" in err and "outside the vocabulary 0..129279" in err


def test_unavailable_device(capsys, tiny_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cuda", "--prompt", "hi")
    assert rc == 2 and out == "" and "'cuda'" in err and "sees no GPU" in err


def test_bad_arguments(capsys, tiny_dir):
    with pytest.raises(SystemExit) as ei:
        main(["generate", "--model", str(tiny_dir), "--prompt-token-ids", "1,x,3"])
    assert ei.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    rc, _, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "hi", "--max-tokens", 0)
    assert rc == 2 and "max_tokens" in err


def test_console_script_default_model(tmp_path):
    """The installed `dsv4` script with nothing but a prompt: materialises the built-in tiny model in
    DSV4_HOME and generates from it."""
    exe = Path(sys.executable).parent / "dsv4"
    assert exe.exists(), exe
    env = dict(os.environ, DSV4_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    p = subprocess.run([str(exe), "generate", "--prompt", "hi", "--max-tokens", "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert TOKS_LINE.search(p.stderr), p.stderr
    (cfg_file,) = (tmp_path / "home" / "models").glob("tiny-v*/config.json")
    from dsv4.tiny import TINY_CONFIG

    assert json.loads(cfg_file.read_text()) == json.loads(json.dumps(TINY_CONFIG))
    assert len(list(cfg_file.parent.glob("model-*.safetensors"))) >= 2


def test_builtin_tiny_is_keyed_by_its_config(tmp_path, monkeypatch):
    """A cached built-in tiny model written from another TINY_CONFIG must not be reused."""
    import dsv4.tiny as tiny

    made = []

    def fake_make_tiny(out, *a, **k):  # only what ensure_builtin_tiny looks at
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text(json.dumps(tiny.TINY_CONFIG))
        made.append(out)
        return Path(out)

    monkeypatch.setenv("DSV4_HOME", str(tmp_path))
    monkeypatch.setattr(tiny, "make_tiny", fake_make_tiny)
    a = tiny.ensure_builtin_tiny()
    assert tiny.ensure_builtin_tiny() == a and len(made) == 1  # cached
    monkeypatch.setattr(tiny, "TINY_CONFIG", dict(tiny.TINY_CONFIG, index_n_heads=8))
    b = tiny.ensure_builtin_tiny()
    assert b != a and len(made) == 2
    assert json.loads((b / "config.json").read_text())["index_n_heads"] == 8
    assert not list(tmp_path.glob("models/.tiny-*"))  # no temporary folders left behind


def test_bench_throughput(capsys, tiny_dir):
    rc, out, err = run(capsys, "bench", "throughput", "--model", tiny_dir, "--device", "cpu", "--num-prompts", 6,
                       "--input-len", 20, "--output-len", 4, "--max-num-seqs", 4, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["output_tokens"] == 24 and r["output_tok_s"] > 0 and not r["errors"]
    assert r["latency_s"]["p50"] <= r["latency_s"]["p99"] and r["ttft_s"]["p50"] > 0
    assert r["max_num_seqs"] == 4
    rc, out, err = run(capsys, "bench", "throughput", "--model", tiny_dir, "--device", "cpu", "--num-prompts", 2,
                       "--input-len", 8, "--output-len", 2, "--kv-cache-dtype", "fp8")
    assert rc == 0, err
    assert "output" in out and "tok/s" in out and "TTFT" in out and "kv fp8" in out


def test_bench_latency_side_by_side(capsys, tiny_dir, tmp_path):
    png = tmp_path / "lat.png"
    rc, out, err = run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--batch-sizes", "1,2",
                       "--input-len", 6, "--output-len", 3, "--engine", "both", "--json", "--plot", str(png),
                       "--breakdown")
    assert rc == 0, err
    r = json.loads(out)
    got = {(x["engine"], x["batch"]) for x in r["rows"]}
    assert got == {("dsv4", 1), ("dsv4", 2), ("transformers", 1), ("transformers", 2)}
    for x in r["rows"]:
        assert x["tpot_ms"] > 0 and x["output_tok_s"] > 0 and x["ttft_s"] > 0
        assert abs(x["tpot_ms_per_layer"] * 5 - x["tpot_ms"]) < 1e-6 * x["tpot_ms"] + 1e-9  # tiny: 5 layers
    assert png.stat().st_size > 1000
    for x in r["rows"]:
        if x["engine"] == "dsv4":
            assert x["prefill_weight_tflops_s"] > 0
            names = [k["name"] for k in x["breakdown"]]
            assert names and 0 < sum(k["share"] for k in x["breakdown"]) <= 1 + 1e-9
    with pytest.raises(SystemExit, match="positive"):
        run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--batch-sizes", "0")


def test_kv_cache_too_small_is_a_clear_error(capsys, tiny_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "hi",
                       "--kv-cache-memory", "100KiB")
    assert rc == 2 and "cannot hold one request" in err and "--kv-cache-memory" in err


def test_op_override_reaches_the_engine(capsys, tiny_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                       "--max-tokens", 1, "--op", "rms_norm=torch", "--json")
    assert rc == 0, err
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                       "--max-tokens", 1, "--op", "rms_norm=triton")
    assert rc == 2 and "rms_norm=triton" in err and "needs a GPU" in err
