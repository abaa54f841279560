"""Decode TPOT under mixed load on one GPU (issue 16 item 6): `--decoders` requests decode while
`--prefills` prompts of `--prefill-len` tokens arrive, for several decode-latency budgets
(`prefill_tokens_with_decodes`: prefill tokens allowed in a step that has decodes; `xR`: the decode-latency
budget R, engine/latency_budget.py, learning from the untimed pass and the timed one). Per budget: pure and
mixed TPOT p50 / p99 (per-token gaps), the prompts' TTFT and prefill rate (dsv4/bench/mixed.py).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/mixed_load.py --num-layers 4 --out $OUT/mixed.json
"""

from __future__ import annotations

import argparse
import json
import time

from dsv4.bench.mixed import format_mixed, run_mixed
from dsv4.config import EngineConfig, parse_bytes
from dsv4.engine.latency_budget import DecodeLatencyBudget
from dsv4.engine.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v4-flash")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--decoders", type=int, default=8)
    ap.add_argument("--prefills", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="none,2048,512,256,128",
                    help="prefill_tokens_with_decodes values, or xR for a decode-latency budget of R")
    ap.add_argument("--kv-cache-memory", default="16GiB")
    ap.add_argument("--piecewise-graph-tokens", type=int, default=None, help="0: eager mixed steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = EngineConfig(model=a.model, load_format="dummy", num_layers=a.num_layers,
                       max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.prefill_len + 2048,
                       max_num_seqs=max(64, a.decoders + a.prefills), kv_cache_memory=parse_bytes(a.kv_cache_memory),
                       piecewise_graph_tokens=a.piecewise_graph_tokens)
    t0 = time.time()
    llm = LLM.from_config(cfg)
    print(f"engine up in {time.time() - t0:.1f} s: {llm.engine.plan.describe()}", flush=True)
    eng = llm.engine
    rows = []
    for b in a.budgets.split(","):
        ratio = float(b[1:]) if b.startswith("x") else None
        cap = None if (b == "none" or ratio is not None) else int(b)
        eng.scheduler.prefill_tokens_with_decodes = cap
        object.__setattr__(eng.config, "prefill_tokens_with_decodes", cap)
        object.__setattr__(eng.config, "decode_latency_budget", ratio)
        eng.latency_budget = eng.scheduler.latency = DecodeLatencyBudget.for_config(eng.config)
        r = run_mixed(llm, a.decoders, a.prefills, a.prefill_len, progress=False)  # (after an untimed pass)
        r.update(model=a.model, num_layers=a.num_layers, device=str(eng.device))
        rows.append(r)
        print(format_mixed(r), flush=True)
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": "benchmarks/mixed_load.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in vars(a).items() if k != "out"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
