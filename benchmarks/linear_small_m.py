"""GPU: FP8 block linears at decode sizes (issue 16 item 4): the providers and Triton tile variants against
the weight-read floor, every variant checked against the reference first.

For each DeepSeek-V4-Flash FP8 projection (and the 129,280 x 4,096 head as FP8, the drafter's candidate) and
M = 1..256 rows, official numerics (FP8 activations), bf16 in / out: time of the whole `linear` call (the
activation quantiser, scale layout and GEMM launches) from CUDA-graph replays (do_bench_cudagraph), for
  scaled_mm   cuBLASLt blockwise FP8 (the scaled_mm provider's GEMM, called directly: the provider itself
              hands M <= 32 to Triton since 2026-12-06)
  triton      the Triton provider with its own tile choice (_pick_tiles)
  triton_q    the same with the activations already quantised (as a decode step's norm kernel hands them over)
  t:BNxS[sT][wW][q]  the Triton kernel with BLOCK_N = BN, split-K S (a number, or kA: k x the automatic one),
              optionally T pipeline stages and W warps, `q`: activations already quantised
floor = weight + scale bytes / the measured copy bandwidth (read + write counted, as everywhere).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/linear_small_m.py --out $OUT/linear_small_m.json
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from benchmarks.kernel_cases.common import copy_bandwidth
from benchmarks.kernel_cases.gemm import FLASH_LINEARS, _make_fp8_weight
from dsv4.kernels.triton.gemm import _facts, _pick_tiles, linear_impl, linear_triton
from dsv4.kernels.triton.quant import fp8_act_quant_triton
from dsv4.kernels.vendor.scaled_mm import _scaled_mm_official
from dsv4.ops.linear import linear_reference

SHAPES = FLASH_LINEARS + (("wq_a_wkv", 1536, 4096), ("head_fp8", 129280, 4096))  # + the fused [wq_a; wkv]


def graph_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return 1e3 * float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8,16,64,256")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--variants", default="32xA,64xA,128xA,64x1,64x2A")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "copy_bandwidth_TBps": bw / 1e12, "rows": []}
    print(f"{res['device']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    nsm = _facts(torch.device("cuda"))[1]
    want = set(a.shapes.split(","))
    for name, N, K in SHAPES:
        if name not in want:
            continue
        w, s = _make_fp8_weight(N, K, torch.device("cuda"))
        floor_us = (N * K + s.numel()) / bw * 1e6
        for M in (int(x) for x in a.ms.split(",")):
            x = torch.randn(M, K, device="cuda").bfloat16()
            ref = linear_reference(x, w, s, True).float()
            scale = ref.abs().max().item()
            auto = _pick_tiles(M, N, K, 1, 1.0, nsm, False)
            fns = {"scaled_mm": lambda: _scaled_mm_official(x, w, s),  # cuBLASLt itself, at every M
                   "triton": lambda: linear_triton(x, w, s, True)}
            xq = fp8_act_quant_triton(x)  # a producer's quantised activations (the decode step's norms make them)
            for v in a.variants.split(","):
                m = re.fullmatch(r"(\d+)x(\d*A|\d+)(?:s(\d+))?(?:w(\d+))?(q?)", v)
                if m is None:
                    raise SystemExit(f"bad variant {v!r}: BNxS[sT][wW][q], S a number or [k]A")
                bn, sp, st, wp, pre = m.groups()
                if sp.endswith("A"):  # a multiple of the automatic split
                    sp = (int(sp[:-1]) if sp[:-1] else 1) * auto["split_k"]
                bn, sp = int(bn), int(sp)
                st, wp = (int(st) if st else None), (int(wp) if wp else None)
                fns[f"t:{v}"] = (lambda bn=bn, sp=sp, st=st, wp=wp, pre=pre: linear_impl(
                    x, w, s, True, x_q=xq if pre else None, block_n=bn, split_k=sp, num_stages=st, num_warps=wp))
            fns["triton_q"] = lambda: linear_triton(x, w, s, True, x_q=xq)  # the automatic tiles, producer bytes
            row = {"op": name, "N": N, "K": K, "M": M, "floor_us": floor_us, "auto_tiles": auto, "us": {},
                   "max_rel_err": {}}
            for k, fn in fns.items():
                try:
                    err = (fn().float() - ref).abs().max().item() / max(scale, 1e-30)
                    row["max_rel_err"][k] = err
                    if err > 2e-2:
                        row["us"][k] = None
                        continue
                    row["us"][k] = graph_us(fn)
                except Exception as e:  # a variant that does not compile: recorded, the others go on
                    row["us"][k] = None
                    row.setdefault("errors", {})[k] = repr(e)[:200]
            row["act_quant_us"] = graph_us(lambda: fp8_act_quant_triton(x))  # the quantiser alone
            ok = {k: v for k, v in row["us"].items() if v}
            best = min(ok, key=ok.get) if ok else None
            row["best"] = best
            res["rows"].append(row)
            print(f"{name:13s} M={M:4d} floor {floor_us:7.1f} us | "
                  + " ".join(f"{k} {v:7.1f}" if v else f"{k} -" for k, v in row["us"].items())
                  + f" | quant {row['act_quant_us']:.1f} | best {best}", flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
