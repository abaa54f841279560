"""Piecewise graphs (engine/piecewise_graphs.py) on one GPU: the time to first token of prompts of T tokens
(one prefill step each) and the step time of decodes mixed with a prefill chunk, with piecewise graphs on and
off (eager), the first Flash layers with dummy weights; start-up capture time and pool memory.

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/piecewise_check.py --out $OUT/piecewise.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


def make(layers: int, pw: int | None, budget: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model="deepseek-v4-flash", load_format="dummy", num_layers=layers,
                                  max_model_len=8192, max_num_seqs=96, max_num_batched_tokens=budget,
                                  kv_cache_memory=4 << 30, piecewise_graph_tokens=pw))


def ttft(eng: LLMEngine, n: int, g: torch.Generator) -> float:
    p = torch.randint(1000, 120000, (n,), generator=g).tolist()
    eng.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def mixed_step(eng: LLMEngine, decoders: int, chunk: int, g: torch.Generator, reps: int) -> float:
    """Median time of a step with `decoders` decodes and one `chunk`-token prompt."""
    V = 120000
    ps = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0, detokenize=False)
    ids = [eng.add_request(torch.randint(1000, V, (64,), generator=g).tolist(), ps).request_id
           for _ in range(decoders)]
    while any(not eng.requests[r].output_token_ids for r in ids):
        eng.step()
    times = []
    for _ in range(reps):
        eng.add_request(torch.randint(1000, V, (chunk,), generator=g).tolist(),
                        SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()  # decodes + the whole chunk (budget permitting)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        eng.step()
    for r in ids:
        eng.abort_request(r)
    while eng.has_unfinished_requests():
        eng.step()
    return statistics.median(times)


def save(res: dict, out: str | None) -> None:
    """Written after every row: a run stopped by its time limit keeps what it measured."""
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lens", default="16,64,256,512,1024,2048")
    ap.add_argument("--mixed", default="8:64,16:128,32:256,64:512", help="decoders:chunk pairs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "layers": a.layers, "rows": []}
    for pw in (0, None):
        t0 = time.perf_counter()
        eng = make(a.layers, pw, 2048)
        up = time.perf_counter() - t0
        name = "eager" if pw == 0 else "piecewise"
        g = torch.Generator().manual_seed(0)
        for n in [int(x) for x in a.lens.split(",")]:
            ttft(eng, n, g)  # (compiles this shape's kernels)
            v = statistics.median(ttft(eng, n, g) for _ in range(a.reps))
            res["rows"].append({"mode": name, "case": "ttft", "tokens": n, "ms": v * 1e3})
            print(f"{name:9s} TTFT {n:5d} tokens: {v * 1e3:8.2f} ms", flush=True)
            save(res, a.out)
        for pair in a.mixed.split(","):
            d, c = (int(x) for x in pair.split(":"))
            mixed_step(eng, d, c, g, 2)
            v = mixed_step(eng, d, c, g, a.reps)
            res["rows"].append({"mode": name, "case": "mixed_step", "decoders": d, "chunk": c, "ms": v * 1e3})
            print(f"{name:9s} step of {d} decodes + a {c}-token chunk: {v * 1e3:8.2f} ms", flush=True)
            save(res, a.out)
        res[f"{name}_startup_s"] = up
        res[f"{name}_piecewise_steps"] = eng.piecewise_steps
        if pw is None:
            res["piecewise_memory_bytes"] = getattr(eng, "piecewise_memory", None)
            res["capture_s"] = eng.runner.piecewise.capture_s if eng.runner.piecewise else None
            res["capture_bytes"] = eng.runner.piecewise.capture_bytes if eng.runner.piecewise else None
            res["eager_activation_peak_2048_bytes"] = eng._profile_activations(2048)  # (what the planner measures)
        save(res, a.out)
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
