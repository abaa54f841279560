"""GPU check of the Triton kernels (Kernels I): the `gpu_check_cases()` of every module in
benchmarks/kernel_cases/ (one per dsv4/kernels/triton module) at DeepSeek-V4-Flash shapes (error vs the
PyTorch reference, median time, bytes / FLOPs, fraction of the H200 roofline), and the model end to end
with the Triton providers vs the reference providers.

    PYTHONPATH=. python3 benchmarks/gpu_kernels_check.py --out $OUT/kernels.json [--only attention,indexer]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
import traceback

import torch

MODULES = ("attention", "indexer", "compressor", "norm", "rope", "hyper_connection", "quant", "gemm", "moe", "moe_w4a8",
           "router")
REFERENCE_ONLY = {"sparse_attention", "write_window", "indexer_topk", "compress_kv", "rms_norm", "apply_rope",
                  "hc_pre", "hc_post", "hc_head", "fp8_act_quant", "linear", "grouped_linear", "moe_route",
                  "moe_experts", "fp8_roundtrip", "fp4_roundtrip", "lm_head"}


def run_cases(only: set[str] | None, deadline: float) -> list[dict]:
    out = []
    for m in MODULES:
        if only and m not in only:
            continue
        mod = importlib.import_module(f"benchmarks.kernel_cases.{m}")
        for name, fn in mod.gpu_check_cases():
            if time.time() > deadline:
                out.append({"module": m, "case": name, "skipped": "time budget"})
                continue
            t = time.time()
            try:
                r = fn()
                r = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in r.items()}
                rec = {"module": m, "case": name, **r}
            except Exception as e:  # record and go on: one broken case must not hide the others
                rec = {"module": m, "case": name, "error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc()[-2000:]}
            rec["wall_s"] = round(time.time() - t, 2)
            print(json.dumps(rec, default=str)[:600], flush=True)
            out.append(rec)
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def end_to_end() -> dict:
    """Tiny model: Triton providers vs forced reference providers, float32 plain numerics (tight) and
    bf16 official numerics (greedy tokens); the engine runs with the Triton path."""
    from dsv4.cache.direct import DirectCache
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling_params import SamplingParams
    from dsv4.model import build_model
    from dsv4.tiny import make_tiny

    d = make_tiny("/tmp/dsv4-tiny-e2e")
    res = {}
    ids = torch.randint(0, 129280, (300,), generator=torch.Generator().manual_seed(0))
    chunks = [100, 37, 1, 1, 128, 33]
    force_ref = {op: "torch" for op in REFERENCE_ONLY}
    for kv_fp8 in (False, True):
        logits = {}
        for label, ov in (("triton", None), ("torch", force_ref)):
            lm = build_model(d, device="cuda", dtype="float32", numerics="plain", op_overrides=ov)
            chosen = {c.op: c.provider for c in lm.ops.choices.values()}
            dc = DirectCache(lm.cfg, 1, 512, "cuda", torch.float32, kv_fp8=kv_fp8)
            s = dc.add()
            outs, p = [], 0
            for c in chunks:
                outs.append(lm.model.logits(lm.model(ids[p:p + c].cuda(), dc.meta([s], [p], [c]), dc.cache)).cpu())
                p += c
            logits[label] = torch.cat(outs)
            res.setdefault("providers_" + label, chosen)
        a, b = logits["triton"], logits["torch"]
        res[f"tiny_fp32_plain_kv{'fp8' if kv_fp8 else 'f32'}"] = {
            "max_abs_diff": (a - b).abs().max().item(), "logit_abs_max": b.abs().max().item(),
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
        print(res, flush=True)
    # engine, bf16 official, Triton path: greedy tokens vs the reference path
    toks = {}
    for label, ov in (("triton", ()), ("torch", tuple(force_ref.items()))):
        llm = LLM("/tmp/dsv4-tiny-e2e", device="cuda", dtype="bfloat16", op_overrides=ov, kv_cache_memory=2**30)
        t = time.perf_counter()
        outs = llm.generate([[0, 100 + i] for i in range(16)], SamplingParams(max_tokens=32, temperature=0,
                                                                               ignore_eos=True), use_tqdm=False)
        toks[label] = ([o.outputs[0].token_ids for o in outs], time.perf_counter() - t)
    same = sum(a == b for a, b in zip(toks["triton"][0], toks["torch"][0]))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(toks["triton"][0], toks["torch"][0])]
    res["engine_bf16_official"] = {"identical_sequences_of_16": same, "mean_agreeing_prefix_of_32": sum(prefix) / 16,
                                   "triton_s": toks["triton"][1], "torch_s": toks["torch"][1]}
    print(res["engine_bf16_official"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import triton
    res["triton"] = triton.__version__
    if not a.skip_e2e:
        try:
            res["end_to_end"] = end_to_end()
        except Exception as e:
            res["end_to_end"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(res["end_to_end"], flush=True)
    only = set(a.only.split(",")) - {""} or None
    res["cases"] = run_cases(only, t0 + a.budget_s)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
