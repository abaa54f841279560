"""The small per-layer ops of a decode step under CUDA graphs (GPU): each call timed as a graph replay
(`triton.testing.do_bench_cudagraph`: launch gaps included, as in a decode graph), checked against its
reference, at Flash shapes for decode batches. Variants are the module knobs of the kernels:

    hc_pre / hc_head (kernels/triton/hyper_connection.py): MIN_K_SPLIT (mixing GEMM K split), FINISH_WARPS and
        BD_FINISH (the finish kernel's warps and channels per program);
    moe_route (kernels/triton/router.py): SELECT_CHUNK (partials loaded at once; 256 = one at a time);
    swiglu (the shared expert's activation): Triton vs the reference's six launches;
    fp4_roundtrip(hadamard=True) (the indexer queries [T, 64, 128]) and fp8_roundtrip(width=448) (the new kv rows
        [T, 512]): one launch vs the reference's composition, bit for bit;
    norm_rope (q [T, 64, 512], kv [T, 512] with FP8 width 448): one kernel vs rms_norm -> rope -> round trip.

    python3 benchmarks/small_ops_graphs.py --tokens 1,64 --out $OUT/small_ops.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from dsv4.kernels.triton import hyper_connection as khc
from dsv4.kernels.triton import router as kr
from dsv4.kernels.triton.moe import swiglu_triton
from dsv4.kernels.triton.norm import rms_norm_triton
from dsv4.kernels.triton.quant import fp4_roundtrip_triton, fp8_roundtrip_triton
from dsv4.kernels.triton.rope import apply_rope_triton, norm_rope_triton
from dsv4.ops.hyper_connection import hc_head_reference, hc_pre_reference
from dsv4.ops.moe import moe_route_reference, swiglu_reference
from dsv4.ops.quant import fp4_roundtrip_reference, fp8_roundtrip_reference
from dsv4.ops.rope import rope_inv_freq


def graph_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return 1e3 * float(do_bench_cudagraph(fn, rep=30, return_mode="median"))


def eager_us(fn) -> float:
    """For the PyTorch references, which build small CPU tensors per call and so cannot be graph-captured."""
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, rep=30, return_mode="median"))


def err(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def hc_rows(T: int, variants) -> list:
    g = torch.Generator(device="cuda").manual_seed(T)
    n, D = 4, 4096
    X = torch.randn(T, n, D, device="cuda", generator=g).bfloat16()
    fn = 0.02 * torch.randn((2 + n) * n, n * D, device="cuda", generator=g)
    scale = 0.5 + torch.rand(3, device="cuda", generator=g)
    base = 0.5 * torch.randn((2 + n) * n, device="cuda", generator=g)
    args = (X, fn, scale, base, 1e-6, 1e-6, 20)
    want = hc_pre_reference(*args)
    hargs = (X, fn[:n].contiguous(), scale[:1].contiguous(), base[:n].contiguous(), 1e-6, 1e-6)
    hwant = hc_head_reference(*hargs)
    rows = []
    keep = (khc.MIN_K_SPLIT, khc.FINISH_WARPS, khc.BD_FINISH)
    for ks, fw, bd in variants:
        khc.MIN_K_SPLIT, khc.FINISH_WARPS, khc.BD_FINISH = ks, fw, bd
        try:
            got = khc.hc_pre_triton(*args)
            row = {"op": "hc_pre", "T": T, "min_k_split": ks, "finish_warps": fw, "bd_finish": bd,
                   "us": graph_us(lambda: khc.hc_pre_triton(*args)),
                   "u_err": err(got[0], want[0]), "post_err": err(got[1], want[1]), "comb_err": err(got[2], want[2])}
            hgot = khc.hc_head_triton(*hargs)
            row["head_us"] = graph_us(lambda: khc.hc_head_triton(*hargs))
            row["head_err"] = err(hgot, hwant)
        finally:
            khc.MIN_K_SPLIT, khc.FINISH_WARPS, khc.BD_FINISH = keep
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def route_rows(T: int) -> list:
    g = torch.Generator(device="cuda").manual_seed(3)
    E, D, k = 256, 4096, 6
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    gw = torch.randn(E, D, device="cuda", generator=g) / math.sqrt(D)
    bias = 0.1 * torch.randn(E, device="cuda", generator=g)
    ww, wi = moe_route_reference(x, gw, bias, None, None, k, "sqrtsoftplus", True, 1.5)
    rows = []
    keep = kr.SELECT_CHUNK
    for chunk in (256, 1024, 4096, 8192):
        kr.SELECT_CHUNK = chunk
        try:
            def fn():
                return kr.moe_route_triton(x, gw, bias, None, None, k, "sqrtsoftplus", True, 1.5)
            w, i = fn()
            same = bool((i.sort(-1).values == wi.sort(-1).values).all())
            row = {"op": "moe_route", "T": T, "select_chunk": chunk, "us": graph_us(fn), "ids_equal": same,
                   "w_err": err(w.gather(1, i.argsort(-1)), ww.gather(1, wi.argsort(-1))) if same else None}
        finally:
            kr.SELECT_CHUNK = keep
        rows.append(row)
        print(json.dumps(row), flush=True)
    row = {"op": "moe_route", "T": T, "provider": "torch",
           "eager_us": eager_us(lambda: moe_route_reference(x, gw, bias, None, None, k, "sqrtsoftplus", True, 1.5))}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def swiglu_rows(T: int) -> list:
    g = torch.Generator(device="cuda").manual_seed(4)
    gu = (3 * torch.randn(T, 2 * 2048, device="cuda", generator=g)).bfloat16()
    want = swiglu_reference(gu, 10.0)
    got = swiglu_triton(gu, 10.0)
    row = {"op": "swiglu", "T": T, "us": graph_us(lambda: swiglu_triton(gu, 10.0)),
           "torch_eager_us": eager_us(lambda: swiglu_reference(gu, 10.0)), "err": err(got, want),
           "equal_frac": float((got == want).float().mean())}
    print(json.dumps(row), flush=True)
    return [row]


def roundtrip_rows(T: int) -> list:
    g = torch.Generator(device="cuda").manual_seed(5)
    q = (3 * torch.randn(T, 64, 128, device="cuda", generator=g)).bfloat16()
    kv = (3 * torch.randn(T, 512, device="cuda", generator=g)).bfloat16()
    rows = []
    for op, fn, ref in (
            ("fp4_roundtrip hadamard", lambda: fp4_roundtrip_triton(q, 32, True),
             lambda: fp4_roundtrip_reference(q, 32, True)),
            ("fp8_roundtrip width 448", lambda: fp8_roundtrip_triton(kv, 64, "ocp", 448),
             lambda: fp8_roundtrip_reference(kv, 64, "ocp", 448))):
        got, want = fn(), ref()
        row = {"op": op, "T": T, "us": graph_us(fn), "torch_eager_us": eager_us(ref),
               "bit_equal": bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    inv = rope_inv_freq(10000.0, 64)
    pos = torch.arange(T, device="cuda") + 4000
    w = 1 + 0.1 * torch.randn(512, device="cuda", generator=g)
    for name, x, wt, width in (("norm_rope q", q.view(T, 128, 64).repeat(1, 1, 8)[:, :64], None, 0),
                               ("norm_rope kv", kv, w, 448)):
        x = x.contiguous()

        def three(x=x, wt=wt, width=width):
            y = apply_rope_triton(rms_norm_triton(x, wt, 1e-6), pos, inv)
            return fp8_roundtrip_triton(y, 64, "ocp", width) if width else y

        def fused(x=x, wt=wt, width=width):
            return norm_rope_triton(x, wt, 1e-6, pos, inv, width)

        got, want = fused(), three()
        row = {"op": name, "T": T, "us": graph_us(fused), "three_kernels_us": graph_us(three),
               "equal_frac": float((got == want).float().mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64")
    ap.add_argument("--hc-k-split", default="128,256,512")
    ap.add_argument("--hc-warps", default="1,2,4")
    ap.add_argument("--hc-bd", default="512,1024")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "rows": []}
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    variants = list(itertools.product(ints(a.hc_k_split), ints(a.hc_warps), ints(a.hc_bd)))
    for T in ints(a.tokens):
        res["rows"] += route_rows(T) + swiglu_rows(T) + roundtrip_rows(T) + hc_rows(T, variants)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
