"""MoE expert tiles at decode sizes (GPU): time `moe_experts` (Flash shapes: 256 FP4 experts, top-6, D 4096,
I 2048, bf16 activations) for several gate-up / down N tiles and both FP4 decode paths, each checked
against the reference. Tells whether the decode regime is bound by parallelism (more, smaller programs
help) or by the in-register FP4 decode (they do not).

    PYTHONPATH=. python3 benchmarks/moe_tile_sweep.py --out $OUT/moe_tiles.json
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,256")
    ap.add_argument("--bn-gate", default="16,32,64,128")
    ap.add_argument("--bn-down", default="32,64,128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from triton.testing import do_bench

    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.triton import moe as km
    from dsv4.ops.moe import moe_experts_reference

    D, I, E, k = 4096, 2048, 256, 6
    w13, s13, w2, s2 = kc._fp4_experts(E, D, I, "cuda")
    per_expert = w13[0].numel() + s13[0].numel() + w2[0].numel() + s2[0].numel()
    rows = []
    for T in [int(t) for t in a.tokens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(2)
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids, w = kc._route_inputs(T, E, k, "cuda")
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, False)
        floor_us = int(torch.unique(ids).numel()) * per_expert / 4.8e12 * 1e6
        for scaled in (True, False):
            for bn1 in [int(v) for v in a.bn_gate.split(",")]:
                for bn2 in [int(v) for v in a.bn_down.split(",")]:
                    def fn():
                        return km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, False, block_m=16,
                                                   bn_gate=bn1, bn_down=bn2, scaled_dot=scaled)
                    try:
                        err = (fn().double() - want.double()).abs().max().item()
                        us = do_bench(fn, return_mode="median") * 1e3
                    except Exception as e:  # a tile the compiler rejects: record and go on
                        rows.append({"T": T, "scaled_dot": scaled, "bn_gate": bn1, "bn_down": bn2,
                                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    r = {"T": T, "scaled_dot": scaled, "bn_gate": bn1, "bn_down": bn2, "us": us,
                         "floor_us": floor_us, "frac": floor_us / us, "max_abs_err": err}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        best = min((r for r in rows if r["T"] == T and "us" in r), key=lambda r: r["us"])
        print("best", json.dumps(best), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
