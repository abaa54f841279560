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


D, I, E, K_TOP = 4096, 2048, 256, 6


def _experts():
    from benchmarks.kernel_cases import moe as kc

    return kc._fp4_experts(E, D, I, "cuda")


def _inputs(T: int, seed: int, x_scale: float = 1.0):
    """bf16 activations and uniform random top-6 routing over the 256 experts."""
    from benchmarks.kernel_cases import moe as kc

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(T, D, device="cuda", generator=g) * x_scale).bfloat16()
    ids, w = kc._route_inputs(T, E, K_TOP, "cuda")
    return x, ids, w


def _record(rows: list, r: dict) -> None:
    rows.append(r)
    print(json.dumps(r), flush=True)


def _max_err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64,256,1024,2048,8192")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiles", default="", help="T values for a tile sweep (block_m x (bn_gate, bn_down)) of the "
                    "packed and scaled paths, bf16 activations, instead of the default comparison")
    a = ap.parse_args()
    rows: list[dict] = []
    if a.tiles:
        tile_sweep([int(t) for t in a.tiles.split(",")], rows)
    else:
        compare_paths([int(t) for t in a.tokens.split(",")], rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def compare_paths(tokens, rows) -> None:
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.ops.moe import moe_experts_reference

    w13, s13, w2, s2 = _experts()
    for T in tokens:
        for aq in (False, True):
            x, ids, w = _inputs(T, 2)
            want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, aq)
            outs = {}
            for name, kw in VARIANTS.items():
                def fn():
                    return km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, aq, **kw)
                r = {"T": T, "act_quant": aq, "variant": name}
                try:
                    outs[name] = fn()
                    r["us"] = do_bench(fn, return_mode="median") * 1e3
                except Exception as e:  # record and go on
                    _record(rows, {**r, "error": f"{type(e).__name__}: {str(e)[-1500:]}"})
                    continue
                r.update(max_abs_err=_max_err(outs[name], want), ref_abs_max=want.abs().max().item())
                if name == "packed" and "register" in outs:
                    r["equal_to_register"] = bool(torch.equal(outs["packed"], outs["register"]))
                _record(rows, r)
    # Block scales around 2..8 (bytes 127..130, above the random experts' 118..120): the packed decode's
    # two power-of-two multiplies must still give the per-value decode's result.
    x, ids, w = _inputs(64, 3, 1e-3)
    s13b, s2b = s13 + 9, s2 + 9
    want = moe_experts_reference(x, w13, s13b, w2, s2b, ids, w, 1e4, False)
    outs = {n: km.moe_experts_impl(x, w13, s13b, w2, s2b, ids, w, 1e4, False, **VARIANTS[n])
            for n in ("register", "packed")}
    _record(rows, {"T": 64, "variant": "packed, scale bytes 127..130", "max_abs_err": _max_err(outs["packed"], want),
                   "ref_abs_max": want.abs().max().item(),
                   "equal_to_register": bool(torch.equal(outs["packed"], outs["register"]))})


def tile_sweep(tokens, rows) -> None:
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.ops.moe import moe_experts_reference

    w13, s13, w2, s2 = _experts()
    for T in tokens:
        x, ids, w = _inputs(T, 2)
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, False)
        for name in ("packed", "scaled"):
            for bm in (16, 32, 64):
                for bn1, bn2 in ((64, 64), (64, 128), (128, 128)):
                    def fn():
                        return km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, False, block_m=bm,
                                                   bn_gate=bn1, bn_down=bn2, **VARIANTS[name])
                    r = {"T": T, "variant": name, "block_m": bm, "bn_gate": bn1, "bn_down": bn2}
                    try:
                        r["max_abs_err"] = _max_err(fn(), want)
                        r["us"] = do_bench(fn, return_mode="median") * 1e3
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
                    _record(rows, r)
            ok = [r for r in rows if r["T"] == T and r["variant"] == name and "us" in r]
            if ok:
                print("best", json.dumps(min(ok, key=lambda r: r["us"])), flush=True)


if __name__ == "__main__":
    main()
