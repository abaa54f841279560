"""GPU check of the serving core (reference ops): the engine plans its cache from the GPU's memory
(profiling the activation peak), runs continuous batching, and `bench throughput` reports.

    PYTHONPATH=. python3 benchmarks/gpu_engine_check.py --out $OUT/engine.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv4.bench.throughput import format_report, run_throughput
from dsv4.config import EngineConfig
from dsv4.engine.llm import LLM

RUNS = [
    dict(name="tiny bf16", cfg=dict(model="tiny", dtype="bfloat16"), n=64, i=128, o=64),
    dict(name="tiny bf16 fp8-kv", cfg=dict(model="tiny", dtype="bfloat16", kv_cache_dtype="fp8"), n=64, i=128, o=64),
    dict(name="flash-4-layers dummy bf16 fp8-kv",
         cfg=dict(model="deepseek-v4-flash", load_format="dummy", num_layers=4, dtype="bfloat16", kv_cache_dtype="fp8",
                  max_model_len=8192), n=32, i=256, o=32),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "runs": []}
    for r in RUNS:
        t = time.perf_counter()
        llm = LLM.from_config(EngineConfig(device="cuda", **r["cfg"]))
        build_s = time.perf_counter() - t
        out = run_throughput(llm, r["n"], r["i"], r["o"], progress=False)
        out.update(name=r["name"], engine_build_s=build_s, gpu_memory_reserved_gib=torch.cuda.memory_reserved() / 2**30)
        print(f"== {r['name']} (engine built in {build_s:.1f} s)\n{format_report(out)}", flush=True)
        res["runs"].append(out)
        del llm
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
