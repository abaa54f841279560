"""Sparse attention against its floor (issue 16 item 1): the Triton `sparse_attention` at DeepSeek-V4-Flash shapes
(64 heads x 512, rope 64, window 128, CSA top-512 at ratio 4, HCA at ratio 128, FP8 KV), decode at batch
1-256 and contexts 1K-128K, and a 4,096-token prefill, each checked against the PyTorch reference.

For every case: bytes that must move (queries, outputs, each query's keys once: window rows + compressed rows)
and FLOPs (2 dots of 2 * H * D per query and key), floor = max(bytes / measured copy bandwidth, FLOPs / the
bf16 rate given), and the median time of each kernel variant (`--variants`: launch overrides of
`sparse_attention_impl`, e.g. `block_h=16,num_stages=2`). Rows (one per case and variant):
`op`, `mode`, `batch`, `ctx`, `variant`, `us`, `floor_us`, `ratio`, `max_abs_err`.

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/attention_floor.py --out $OUT/attn.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.kernel_cases.attention import _gpu_case
from benchmarks.kernel_cases.common import copy_bandwidth

DEFAULT_VARIANTS = ["default"]


def parse_variant(v: str) -> dict:
    if v == "default":
        return {}
    out = {}
    for kv in v.split(","):
        k, x = kv.split("=")
        out[k] = int(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="csa,hca,swa")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--ctxs", default="1024,16384,131072")
    ap.add_argument("--kv", default="fp8", help="fp8 | fp8-fnuz | bf16")
    ap.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="';'-separated launch overrides")
    ap.add_argument("--prefill", default="4096", help="prefill lengths (one sequence, ctx = length), '' for none")
    ap.add_argument("--flops", type=float, default=989e12, help="dense bf16 tensor-core rate for the floor")
    ap.add_argument("--eager-timing", action="store_true",
                    help="time launches from the host (do_bench) instead of CUDA-graph replays (do_bench_cudagraph, "
                         "the default: decode steps run as graphs, and at small batch host launch time would hide "
                         "the kernel's)")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t_end = time.time() + a.budget_s
    bw = copy_bandwidth()
    from triton.testing import do_bench, do_bench_cudagraph

    if a.eager_timing:
        timer = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = lambda fn: do_bench_cudagraph(fn, return_mode="median")  # noqa: E731
    variants = [v for v in a.variants.split(";") if v]
    sweep = [parse_variant(v) for v in variants]
    rows = []
    cases = [(m, b, c, False) for m in a.modes.split(",") for b in map(int, a.batches.split(","))
             for c in map(int, a.ctxs.split(","))]
    cases += [(m, int(n), int(n), True) for n in a.prefill.split(",") if n for m in a.modes.split(",")]
    for mode, batch, ctx, prefill in cases:
        if time.time() > t_end:
            print(f"budget spent: skipped {mode} b{batch} ctx{ctx}", flush=True)
            continue
        try:
            r = _gpu_case(mode, batch, ctx, a.kv, prefill=prefill, sweep=sweep, timer=timer)()
        except Exception as e:  # record and go on
            rows.append({"op": "sparse_attention", "mode": mode, "batch": batch, "ctx": ctx, "prefill": prefill,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(rows[-1], flush=True)
            continue
        floor_us = max(r["bytes"] / bw, r["flops"] / a.flops) * 1e6
        for v, cfg in zip(variants, sweep):
            s = r[f"sweep {cfg}"]
            row = {"op": "sparse_attention " + ("prefill" if prefill else "decode"), "mode": mode, "kv": a.kv,
                   "batch": batch, "ctx": ctx, "variant": v, "floor_us": floor_us, "bytes": r["bytes"],
                   "flops": r["flops"], "keys_per_query": r["keys_per_query_avg"]}
            if "error" in s:
                row["error"] = s["error"]
            else:
                row.update(us=s["time_ms"] * 1e3, ratio=s["time_ms"] * 1e3 / floor_us, max_abs_err=s["max_abs_err"])
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "flops_for_floor": a.flops,
           "timing": "do_bench (host launches)" if a.eager_timing else "do_bench_cudagraph (graph replays)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
