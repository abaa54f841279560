"""GPU check of the engine core in its own process (issue 17, item 3): 4 Flash layers, dummy weights, bf16,
official numerics, graphs on, driven through AsyncLLM as the server drives it.

For the core process and the in-thread engine in turn: one greedy request of 64 tokens alone (the same steps
in both modes, so the tokens must be equal bit for bit), then N concurrent requests; per mode the TTFT and
the gaps between streamed outputs (the TPOT a client sees, IPC and detokenisation included).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/core_process_check.py --out $OUT/core_process.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.sampling_params import SamplingParams


async def stream_one(llm: AsyncLLM, prompt: list[int], n: int, rid: str) -> dict:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, output_kind="delta")
    t0 = time.perf_counter()
    stamps, ids = [], []
    async for out in llm.generate(prompt, params, request_id=rid):
        if out.outputs[0].token_ids:
            stamps.append(time.perf_counter())
            ids += out.outputs[0].token_ids
    gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return {"ids": ids, "ttft_ms": (stamps[0] - t0) * 1e3, "gap_ms_median": statistics.median(gaps) if gaps else None,
            "gap_ms_p99": sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else None, "outputs": len(stamps)}


async def drive(llm: AsyncLLM, prompts: list[list[int]], n: int) -> dict:
    single = await stream_one(llm, prompts[0], n, "single")
    t = time.perf_counter()
    many = await asyncio.gather(*(stream_one(llm, p, n, f"c{i}") for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t
    return {"single": single, "concurrent": {
        "n": len(prompts), "wall_s": wall, "output_tok_s": sum(len(m["ids"]) for m in many) / wall,
        "ttft_ms_median": statistics.median(m["ttft_ms"] for m in many),
        "gap_ms_median": statistics.median(m["gap_ms_median"] for m in many),
        "gap_ms_p99_max": max(m["gap_ms_p99"] for m in many)}, "concurrent_ids": [m["ids"] for m in many]}


def run_mode(engine_process: bool, prompts, n: int, cfg: EngineConfig) -> dict:
    t = time.perf_counter()
    llm = AsyncLLM(cfg, engine_process=engine_process)
    build_s = time.perf_counter() - t

    async def main():
        try:
            return await drive(llm, prompts, n)
        finally:
            await llm.shutdown(timeout=30)

    res = asyncio.run(main())
    res["engine_process"] = engine_process
    res["build_s"] = build_s
    print(json.dumps({k: v for k, v in res.items() if k != "concurrent_ids"}
                     | {"single": {k: v for k, v in res["single"].items() if k != "ids"}}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="the CPU tiny model (checks the script, times nothing)")
    a = ap.parse_args()
    if a.smoke:
        cfg = EngineConfig(device="cpu", model="tiny", dtype="float32", numerics="plain", max_model_len=2048,
                           max_num_seqs=64)
    else:
        cfg = EngineConfig(device="cuda", model="deepseek-v4-flash", load_format="dummy", num_layers=4,
                           dtype="bfloat16", max_model_len=4096, max_num_seqs=64, kv_cache_memory=16 << 30)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 129280 if not a.smoke else 1000, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 1024, (a.concurrent,), generator=g)]
    runs = [run_mode(True, prompts, a.tokens, cfg), run_mode(False, prompts, a.tokens, cfg)]
    core, thread = runs
    same = sum(x == y for p, q in zip(core["concurrent_ids"], thread["concurrent_ids"]) for x, y in zip(p, q))
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "single_request_tokens_equal": core["single"]["ids"] == thread["single"]["ids"],
           "concurrent_token_agreement": same / sum(len(p) for p in core["concurrent_ids"]),
           "runs": runs}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
