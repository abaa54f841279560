"""GPU check of the expert-parallel engine end to end (issue 8): the same greedy requests through
`dsv4 generate` on one GPU and on --gpus N (DeepSeek-V4-Flash shapes, dummy weights, the first --layers
layers so one GPU holds them; decode graphs on, as served). Uneven placement (5 prompts over N ranks) and
lockstep steps of ranks without work are exercised. Prints tokens agreement and the largest logprob gap.

    PYTHONPATH=. python3 benchmarks/ep_engine_check.py --gpus 2 --layers 4 --out $OUT/ep_engine_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPTS = ["The quick brown fox", "Expert parallelism splits the routed experts",
           "A much longer prompt: " + "one two three four five six seven eight nine ten " * 30, "x",
           "DeepSeek-V4-Flash on two GPUs"]


def run(gpus: int, a) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "dsv4.cli", "generate", "--model", "deepseek-v4-flash", "--load-format", "dummy",
           "--num-layers", str(a.layers), "--max-tokens", str(a.max_tokens), "--temperature", "0", "--ignore-eos",
           "--json", "--gpus", str(gpus), "--max-model-len", "2048"]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if out.returncode != 0:
        raise SystemExit(f"gpus={gpus} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line), time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=int, default=280)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    one, t1 = run(1, a)
    many, tn = run(a.gpus, a)
    rows = []
    for i, (x, y) in enumerate(zip(one["outputs"], many["outputs"])):
        same = x["token_ids"] == y["token_ids"]
        k = next((j for j, (p, q) in enumerate(zip(x["token_ids"], y["token_ids"])) if p != q), len(x["token_ids"]))
        gap = max((abs(p - q) for p, q in zip(x["logprobs"][:k], y["logprobs"][:k])), default=0.0)
        rows.append({"prompt": i, "same_tokens": same, "first_difference": None if same else k,
                     "max_logprob_gap_before_difference": gap})
    res = {"gpus": a.gpus, "layers": a.layers, "max_tokens": a.max_tokens, "rows": rows,
           "all_same": all(r["same_tokens"] for r in rows), "wall_s": {"1": t1, str(a.gpus): tn}}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res | {"one": one, "many": many}, f)


if __name__ == "__main__":
    main()
