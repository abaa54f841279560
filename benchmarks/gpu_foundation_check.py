"""GPU check of the Foundation model path (reference ops only; no Triton kernels yet).

1. The tiny release-format checkpoint gives the same logits on the GPU as on the CPU (float32, plain
   and official numerics, one-shot prefill and chunked prefill + decode).
2. The tiny model generates on the GPU in bfloat16 with official numerics.
3. Full-width DeepSeek-V4-Flash with dummy weights (first N layers): load time, memory, and the time of
   a 1024-token prefill and of decode steps at batch 1 and 32 on the reference path, as a baseline.

Usage (on the GPU machine, from the repository root):
    PYTHONPATH=. python3 benchmarks/gpu_foundation_check.py --out $OUT/foundation.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv4.cache.direct import DirectCache
from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams
from dsv4.model import build_model


def run_logits(lm, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    dev = lm.platform.torch_device
    dc = DirectCache(lm.cfg, 1, len(ids), dev, lm.opts.dtype)
    s = dc.add()
    out, p = [], 0
    with torch.no_grad():
        for c in chunks:
            out.append(lm.model.logits(lm.model(ids[p:p + c].to(dev), dc.meta([s], [p], [c]), dc.cache)).cpu())
            p += c
    return torch.cat(out)


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def check_tiny(res: dict) -> None:
    from dsv4.tiny import make_tiny

    d = make_tiny("/tmp/dsv4-tiny")
    ids = torch.randint(0, 129280, (300,), generator=torch.Generator().manual_seed(0))
    chunks = [100, 37, 1, 1, 128, 33]
    for numerics in ("plain", "official"):
        cpu = build_model(d, device="cpu", dtype="float32", numerics=numerics)
        gpu = build_model(d, device="cuda", dtype="float32", numerics=numerics)
        a = run_logits(cpu, ids, [300])
        b = run_logits(gpu, ids, [300])
        c = run_logits(gpu, ids, chunks)
        pos_bad = ((a - b).abs().amax(-1) > 1e-3).float().mean().item()
        res[f"tiny_{numerics}_fp32"] = {
            "cpu_vs_gpu_max_abs_diff": (a - b).abs().max().item(),
            "cpu_vs_gpu_positions_over_1e-3": pos_bad,
            "gpu_full_vs_chunked_max_abs_diff": (b - c).abs().max().item(),
            "logit_abs_max": a.abs().max().item(),
        }
        print(numerics, res[f"tiny_{numerics}_fp32"], flush=True)
    lm = build_model(d, device="cuda", dtype="bfloat16", numerics="official")
    eng = LLMEngine(EngineConfig(model="unused", device="cuda", max_model_len=64, enforce_eager=True), lm=lm)
    eng.add_request([0, 1234, 56], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    t, toks = None, []
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks = o.outputs[0].token_ids
        if t is None:  # after the prefill step
            torch.cuda.synchronize()
            t = time.perf_counter()
    torch.cuda.synchronize()
    res["tiny_bf16_official_generate"] = {"tokens": toks[:8],
                                         "decode_tok_s": (len(toks) - 1) / (time.perf_counter() - t)}
    print(res["tiny_bf16_official_generate"], flush=True)


def check_flash(res: dict, num_layers: int) -> None:
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    lm = build_model("deepseek-v4-flash", device="cuda", dtype="bfloat16", numerics="official", load_format="dummy",
                     num_layers=num_layers, with_mtp=False)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    mem = torch.cuda.memory_allocated() / 2**30
    dev = lm.platform.torch_device
    cfg = lm.cfg
    r = {"num_layers": num_layers, "dummy_load_s": load_s, "weights_gib": mem}
    # prefill 1024 tokens of one sequence
    ids = torch.randint(0, cfg.vocab_size, (1024,), device=dev)

    def prefill():
        dc = DirectCache(cfg, 1, 2048, dev, torch.bfloat16)
        s = dc.add()
        with torch.no_grad():
            X = lm.model(ids, dc.meta([s], [0], [1024]), dc.cache)
            return lm.model.logits(X[-1:])

    logits = prefill()
    r["prefill_logits_finite"] = bool(torch.isfinite(logits).all())
    r["prefill_1024_s"] = timed(prefill, 2)
    for B in (1, 32):
        dc = DirectCache(cfg, B, 1200, dev, torch.bfloat16)
        slots = [dc.add() for _ in range(B)]
        with torch.no_grad():
            lm.model(torch.randint(0, cfg.vocab_size, (B * 256,), device=dev),
                     dc.meta(slots, [0] * B, [256] * B), dc.cache)
        pos = [256]

        def step():
            with torch.no_grad():
                meta = dc.meta(slots, [pos[0]] * B, [1] * B)
                X = lm.model(torch.randint(0, cfg.vocab_size, (B,), device=dev), meta, dc.cache)
                lm.model.logits(X)
            pos[0] += 1

        r[f"decode_step_batch{B}_s"] = timed(step, 3)
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["flash_dummy_reference_path"] = r
    print(r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--num-layers", type=int, default=2)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    check_tiny(res)
    check_flash(res, a.num_layers)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
