"""FP4 expert decode paths on a GPU: `moe_experts` (Flash shapes: 256 MXFP4 experts, top-6, D 4096, I 2048)
through tl.dot_scaled, the per-value register decode, and the packed-PTX register decode, at decode and
prefill token counts, with bf16 (plain) and FP8 (official) activations. Each variant is checked against the
reference; the packed decode must give the register decode's output bit for bit (both decode exactly and
dot in the same order).

    PYTHONPATH=. python3 benchmarks/fp4_decode_sweep.py --out $OUT/fp4_decode.json
"""

from __future__ import annotations

import argparse
import json

import torch

VARIANTS = {"scaled": dict(scaled_dot=True, packed=False), "register": dict(scaled_dot=False, packed=False),
            "packed": dict(scaled_dot=False, packed=True), "default": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64,256,1024,2048,8192")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiles", default="", help="T values for a tile sweep (block_m x (bn_gate, bn_down)) of the "
                    "packed and scaled paths, bf16 activations, instead of the default comparison")
    a = ap.parse_args()
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.ops.moe import moe_experts_reference

    D, I, E, k = 4096, 2048, 256, 6
    w13, s13, w2, s2 = km._fp4_experts(E, D, I, "cuda")
    rows = []
    if a.tiles:
        tile_sweep([int(t) for t in a.tiles.split(",")], rows, a.out)
        return
    for T in [int(t) for t in a.tokens.split(",")]:
        for aq in (False, True):
            g = torch.Generator(device="cuda").manual_seed(2)
            x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
            ids, w = km._route_inputs(T, E, k, "cuda")
            want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, aq)
            outs = {}
            for name, kw in VARIANTS.items():
                def fn():
                    return km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, aq, **kw)
                try:
                    outs[name] = fn()
                    us = do_bench(fn, return_mode="median") * 1e3
                except Exception as e:  # record and go on
                    r = {"T": T, "act_quant": aq, "variant": name, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    continue
                err = (outs[name].double() - want.double()).abs().max().item()
                r = {"T": T, "act_quant": aq, "variant": name, "us": us, "max_abs_err": err,
                     "ref_abs_max": want.abs().max().item()}
                if name == "packed" and "register" in outs:
                    r["equal_to_register"] = bool(torch.equal(outs["packed"], outs["register"]))
                rows.append(r)
                print(json.dumps(r), flush=True)
    # Block scales around 2 (bytes 127..130): tiles holding a byte above 128 take the per-value path inside
    # the packed kernel; the result must still equal the register decode's.
    T = 64
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16() * 1e-3
    ids, w = km._route_inputs(T, E, k, "cuda")
    s13b, s2b = s13 + 9, s2 + 9
    want = moe_experts_reference(x, w13, s13b, w2, s2b, ids, w, 1e4, False)
    outs = {n: km.moe_experts_impl(x, w13, s13b, w2, s2b, ids, w, 1e4, False, **VARIANTS[n])
            for n in ("register", "packed")}
    r = {"T": T, "variant": "packed, scale bytes 127..130", "max_abs_err": (outs["packed"].double()
         - want.double()).abs().max().item(), "ref_abs_max": want.abs().max().item(),
         "equal_to_register": bool(torch.equal(outs["packed"], outs["register"]))}
    rows.append(r)
    print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def tile_sweep(tokens, rows, out) -> None:
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.ops.moe import moe_experts_reference

    D, I, E, k = 4096, 2048, 256, 6
    w13, s13, w2, s2 = km._fp4_experts(E, D, I, "cuda")
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(2)
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids, w = km._route_inputs(T, E, k, "cuda")
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, False)
        for name in ("packed", "scaled"):
            for bm in (16, 32, 64):
                for bn1, bn2 in ((64, 64), (64, 128), (128, 128)):
                    def fn():
                        return km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, False, block_m=bm,
                                                   bn_gate=bn1, bn_down=bn2, **VARIANTS[name])
                    r = {"T": T, "variant": name, "block_m": bm, "bn_gate": bn1, "bn_down": bn2}
                    try:
                        r["max_abs_err"] = (fn().double() - want.double()).abs().max().item()
                        r["us"] = do_bench(fn, return_mode="median") * 1e3
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        for name in ("packed", "scaled"):
            ok = [r for r in rows if r["T"] == T and r["variant"] == name and "us" in r]
            if ok:
                print("best", json.dumps(min(ok, key=lambda r: r["us"])), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
