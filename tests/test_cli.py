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
                       "--input-len", 6, "--output-len", 3, "--engine", "both", "--json", "--plot", str(png))
    assert rc == 0, err
    r = json.loads(out)
    got = {(x["engine"], x["batch"]) for x in r["rows"]}
    assert got == {("dsv4", 1), ("dsv4", 2), ("transformers", 1), ("transformers", 2)}
    for x in r["rows"]:
        assert x["tpot_ms"] > 0 and x["output_tok_s"] > 0 and x["ttft_s"] > 0
        assert abs(x["tpot_ms_per_layer"] * 5 - x["tpot_ms"]) < 1e-6 * x["tpot_ms"] + 1e-9  # tiny: 5 layers
        assert "breakdown" not in x
    assert png.stat().st_size > 1000
    for x in r["rows"]:
        if x["engine"] == "dsv4":
            assert x["prefill_weight_tflops_s"] > 0
    # --breakdown: the busiest ops of a run under torch.profiler (one small row: parsing the profile of the CPU's
    # many small reference ops is most of the cost)
    rc, out, err = run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--batch-sizes", "1",
                       "--input-len", 3, "--output-len", 2, "--json", "--breakdown")
    assert rc == 0, err
    (x,) = json.loads(out)["rows"]
    names = [k["name"] for k in x["breakdown"]]
    assert names and 0 < sum(k["share"] for k in x["breakdown"]) <= 1 + 1e-9
    with pytest.raises(SystemExit, match="positive"):
        run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--batch-sizes", "0")


def test_bench_latency_draft_oracle(capsys, tiny_dir):
    """--draft-oracle P: acceptance follows P (0: no draft kept, 1: every draft kept, k + 1 tokens a step),
    rows labelled as an oracle; without --speculative-tokens it is refused."""
    rows = {}
    for p in ("0", "1"):
        rc, out, err = run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--dtype", "float32",
                           "--numerics", "plain", "--batch-sizes", "2", "--input-len", 6, "--output-len", 9,
                           "--speculative-tokens", 2, "--draft-oracle", p, "--json")
        assert rc == 0, err
        rows[p] = json.loads(out)["rows"][0]
    assert rows["0"]["acceptance_rate"] == 0 and rows["0"]["mean_accepted_length"] == 1
    # 8 tokens after the first: steps of 3, 3 and 2 (the last drafts one token: max_tokens)
    assert rows["1"]["acceptance_rate"] == 1 and rows["1"]["mean_accepted_length"] == pytest.approx(8 / 3)
    assert rows["1"]["drafter"] == "oracle p=1.0" and rows["1"]["speculative_tokens"] == 2
    assert rows["1"]["engine_steps"] < rows["0"]["engine_steps"]
    rc, out, err = run(capsys, "bench", "latency", "--model", tiny_dir, "--device", "cpu", "--batch-sizes", "1",
                       "--input-len", 4, "--output-len", 2, "--draft-oracle", "0.5")
    assert rc == 2 and "speculative_tokens" in err


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


def one_line_error(capsys, *argv):
    """Run a command that must fail: argparse-style (SystemExit 2) or a returned 1/2; one line on stderr,
    no traceback, nothing on stdout."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc in (1, 2), (rc, err)
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dsv4"), err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:x", "cuda:-1"])
def test_bad_device_is_a_one_line_error(capsys, tiny_dir, device):
    err = one_line_error(capsys, "generate", "--model", tiny_dir, "--device", device, "--prompt", "hi")
    assert "--device" in err and repr(device) in err and "cpu, cuda" in err
    err = one_line_error(capsys, "doctor", "--device", device)
    assert "--device" in err and repr(device) in err


@pytest.mark.parametrize("n", [0, -1])
def test_gpus_below_one_is_a_one_line_error(capsys, tiny_dir, n):
    err = one_line_error(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--gpus", n, "--prompt", "hi")
    assert "--gpus" in err and f"'{n}'" in err and "TCPStore" not in err


@pytest.mark.parametrize("n", ["0", "-256"])
def test_page_tokens_below_one_is_a_one_line_error(capsys, tiny_dir, n):
    err = one_line_error(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--page-tokens", n, "--prompt", "hi")
    assert "--page-tokens" in err and f"'{n}'" in err


def test_make_tiny_onto_an_existing_file(capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    err = one_line_error(capsys, "make-tiny", f)
    assert str(f) in err and "not a folder" in err
    assert f.read_text() == "mine"


def test_kv_cache_too_small_shows_sizes_and_the_minimum(capsys, tiny_dir):
    """The refusal shows the budget and the need in readable units (not "0.00 GiB ... needs 0.00 GiB"),
    names the flag and a minimum that, given back, works."""
    from dsv4.config import parse_bytes

    err = one_line_error(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                         "--kv-cache-memory", "1KiB", "--max-model-len", 64, "--max-tokens", 2)
    assert "0.00 GiB" not in err and "1,024 bytes" in err and "1.00 KiB" in err
    m = re.search(r"needs ([\d.]+ [KMG]iB) \(([\d,]+) bytes\)", err)
    assert m, err
    need = int(m.group(2).replace(",", ""))
    m2 = re.search(r"--kv-cache-memory (\S+)", err)
    assert m2 and m2.group(1) != "or", err
    suggested = m2.group(1)
    assert parse_bytes(suggested) >= need
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                       "--kv-cache-memory", suggested, "--max-model-len", 64, "--max-tokens", 2)
    assert rc == 0, err


def test_python_dash_m_dsv4():
    p = subprocess.run([sys.executable, "-m", "dsv4", "make-tiny", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: dsv4 make-tiny")


def test_max_tokens_cap_is_announced(capsys, tiny_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                       "--max-model-len", 8, "--max-tokens", 1000000000, "--temperature", 0, "--ignore-eos",
                       "--json")
    assert rc == 0, err
    assert len(json.loads(out)["outputs"][0]["token_ids"]) == 6
    (line,) = [x for x in err.splitlines() if "warning" in x]
    assert "--max-tokens 1,000,000,000" in line and "capped to 6" in line and "max_model_len 8" in line
    # within the limit: no warning
    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt-token-ids", "0,5",
                       "--max-model-len", 8, "--max-tokens", 6, "--temperature", 0, "--json")
    assert rc == 0 and "warning" not in err, err


def test_make_tiny_file_modes_follow_the_umask(tmp_path, tiny_dir):
    """Shards get the same permissions as every other file: 0666 less the umask (safetensors alone
    writes 0600)."""
    import stat

    import torch

    from dsv4.tiny import write_checkpoint

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(tiny_dir).iterdir()}
    assert len(set(modes.values())) == 1, modes
    old = os.umask(0o027)
    try:
        write_checkpoint({"a.weight": torch.zeros(2), "b.weight": torch.ones(3)}, {"x": 1}, tmp_path / "ck", 2)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o640}, modes


def test_prefix_caching_defaults_per_command():
    """On for serve and batch (servers see resent prefixes), off for generate and bench (cold numbers); the
    flag turns it either way."""
    from dsv4.cli import build_parser, engine_config

    p = build_parser()
    on = {cmd: engine_config(p.parse_args(args)).enable_prefix_caching for cmd, args in [
        ("serve", ["serve"]), ("batch", ["batch", "in.jsonl", "out.jsonl"]), ("generate", ["generate", "--prompt", "x"]),
        ("latency", ["bench", "latency"]), ("serve-off", ["serve", "--no-enable-prefix-caching"]),
        ("generate-on", ["generate", "--prompt", "x", "--enable-prefix-caching"])]}
    assert on == {"serve": True, "batch": True, "generate": False, "latency": False, "serve-off": False,
                  "generate-on": True}
