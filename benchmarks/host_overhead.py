"""Host time per engine step outside the model (scheduling, step building, sampling, outputs), against the
output length: B concurrent decoding requests on the tiny model on the CPU. The engine's step time minus
the time spent in the model's forward and logits is the step overhead; issue 17's target is that it does
not grow with the output length. `output_ms`: the part spent turning a step's tokens into outputs
(LLMEngine._process: appending, detokenising, stop checks, output objects), which async decode steps overlap
with the next step's device work (engine/async_decode.py); `--no-async-scheduling` times synchronous steps.

    python benchmarks/host_overhead.py --batch 256 --out-len 512 [--penalties] [--detokenize] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out-len", type=int, default=512)
    ap.add_argument("--penalties", action="store_true", help="every request uses repetition/frequency penalties")
    ap.add_argument("--detokenize", action="store_true", help="detokenise outputs (as a server does)")
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from dsv4.config import EngineConfig
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.engine.sampling_params import SamplingParams
    from dsv4.model import build_model
    from dsv4.model.deepseek_v4 import Transformer

    lm = build_model("tiny", device="cpu", dtype="float32", numerics="plain", num_layers=1)
    in_model = [0.0]
    fwd, lgt = Transformer.forward, Transformer.logits

    def timed(fn):
        def wrap(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                in_model[0] += time.perf_counter() - t
        return wrap

    Transformer.forward, Transformer.logits = timed(fwd), timed(lgt)
    in_output = [0.0]
    process = LLMEngine._process

    def timed_process(self, *args, **kw):
        t = time.perf_counter()
        try:
            return process(self, *args, **kw)
        finally:
            in_output[0] += time.perf_counter() - t

    LLMEngine._process = timed_process
    eng = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                 max_model_len=a.out_len + 64, max_num_seqs=a.batch,
                                 max_num_batched_tokens=max(2048, a.batch), kv_cache_memory=2**30,
                                 async_scheduling=a.async_scheduling), lm=lm)
    pen = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1) if a.penalties else {}
    g = torch.Generator().manual_seed(0)
    for _ in range(a.batch):
        eng.add_request(torch.randint(0, lm.cfg.vocab_size, (16,), generator=g).tolist(),
                        SamplingParams(max_tokens=a.out_len, temperature=0, ignore_eos=True,
                                       output_kind="delta", detokenize=a.detokenize, **pen))
    rows = []
    step = 0
    while eng.has_unfinished_requests():
        in_model[0] = in_output[0] = 0.0
        t = time.perf_counter()
        eng.step()
        total = time.perf_counter() - t
        rows.append({"step": step, "total_ms": total * 1e3, "model_ms": in_model[0] * 1e3,
                     "overhead_ms": (total - in_model[0]) * 1e3, "output_ms": in_output[0] * 1e3})
        step += 1
    dec = [r for r in rows[2:]]  # after the prefill steps
    k = max(1, len(dec) // 10)

    def med(rs, key="overhead_ms"):
        v = sorted(r[key] for r in rs)
        return v[len(v) // 2]

    res = {"batch": a.batch, "out_len": a.out_len, "penalties": a.penalties, "detokenize": a.detokenize,
           "async_scheduling": a.async_scheduling, "steps": len(rows), "output_ms_median": med(dec, "output_ms"),
           "overhead_ms_first_10pct": med(dec[:k]), "overhead_ms_last_10pct": med(dec[-k:]),
           "model_ms_median": sorted(r["model_ms"] for r in dec)[len(dec) // 2]}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**res, "rows": rows}, f)


if __name__ == "__main__":
    main()
