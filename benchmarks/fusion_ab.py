"""GPU: A/B of the fused linear groups (model/linear.py LinearGroup: [wq_a; wkv], the shared expert's
[w1; w3], the compressors' float32 projections) in the decode step, same process, same machine.
4 Flash layers, dummy weights, bf16, graphs; `dsv4 bench latency` rows with fusion on and off.

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/fusion_ab.py --out $OUT/fusion_ab.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import dsv4.model.builder as builder
from dsv4.bench.latency import dsv4_rows
from dsv4.config import EngineConfig
from dsv4.engine.llm import LLM


def rows(fused: bool, batches, input_len, output_len, repeats):
    real = builder.fuse_linear_groups
    if not fused:
        builder.fuse_linear_groups = lambda net: 0
    try:
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM.from_config(EngineConfig(device="cuda", model="deepseek-v4-flash", load_format="dummy",
                                           num_layers=4, dtype="bfloat16", max_model_len=4096, max_num_seqs=64,
                                           kv_cache_memory=8 << 30))
    finally:
        builder.fuse_linear_groups = real
    out = []
    for _ in range(repeats):
        for r in dsv4_rows(llm, batches, input_len, output_len, progress=True, warmup_output_len=8):
            r["fused"] = fused
            out.append(r)
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    B = [int(x) for x in a.batches.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "input_len": a.input_len, "output_len": a.output_len, "rows": []}
    for fused in (False, True):  # each engine measured `repeats` times: drift shows between repeats
        res["rows"] += rows(fused, B, a.input_len, a.output_len, a.repeats)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    for b in B:
        for fused in (False, True):
            t = sorted(r["tpot_ms"] for r in res["rows"] if r["batch"] == b and r["fused"] == fused)
            print(f"batch {b:4d} fused={fused!s:5s} TPOT ms {' '.join(f'{x:.3f}' for x in t)}")


if __name__ == "__main__":
    main()
