"""Where a long prefill's time goes (GPU): full-width DeepSeek-V4-Flash with dummy weights, the first `--layers`
layers, one prompt of `--tokens` tokens through the engine in chunks of `--chunk` tokens (max_num_batched_tokens),
one output token. Reports the time to first token (median of `--reps`, after a warm run that compiles) and the
CUDA kernel table of one more run (kernel name, ms per prefill, launches; the `--top` by time).

    PYTHONPATH=. python3 benchmarks/prefill_profile.py --layers 4 --tokens 8192 --out $OUT/prefill.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--op", action="append", default=[])
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling_params import SamplingParams

    llm = LLM("deepseek-v4-flash", load_format="dummy", num_layers=a.layers, device="cuda",
              kv_cache_memory=8 << 30, max_num_batched_tokens=a.chunk, max_model_len=a.tokens + 64,
              kv_cache_dtype=a.kv_cache_dtype, op_overrides=tuple(tuple(o.split("=", 1)) for o in a.op))
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def run() -> float:
        prompt = torch.randint(0, 120000, (a.tokens,), generator=g).tolist()  # a new prompt each time
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([prompt], sp, use_tqdm=False)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    run()  # compiles
    ttft = sorted(run() for _ in range(a.reps))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    ka = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    kernels = [(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in ka[:a.top]]
    total = sum(e.self_device_time_total for e in ka) / 1e3
    out = {"layers": a.layers, "tokens": a.tokens, "chunk": a.chunk, "kv_cache_dtype": a.kv_cache_dtype, "op": a.op,
           "device": torch.cuda.get_device_name(), "ttft_ms": ttft, "ttft_ms_median": ttft[len(ttft) // 2],
           "gpu_ms": total, "kernels_ms": kernels}
    print(json.dumps({k: v for k, v in out.items() if k != "kernels_ms"}), flush=True)
    for k in kernels:
        print(f"{k[1]:9.3f} ms {k[2]:6d}x  {k[0]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
