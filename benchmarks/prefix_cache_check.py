"""GPU check of prefix caching (issue 19): 4 Flash layers, dummy weights, bf16, official numerics, graphs on.

1. TTFT of a request whose first 8,192 tokens are cached, against the same prompt's TTFT uncached (an engine
   without caching) and the cost caching adds to a cold prompt (snapshots inside the prefill steps):
     cold          S + q1 with caching off                        (the baseline)
     cold+cache    S + q1 with caching on, nothing cached yet     (the snapshot overhead)
     warm          S + q3 after S + q1 and S + q2 (the second one snapshotted at 8,192 where it left the first)
     resent        S + q1 again (hit at 8,192 = its last boundary)
   Every row is the median of --reps runs on fresh token streams (a distinct S each run).
2. Multi-turn chat: C conversations x T turns, a shared system prompt (2,048 tokens); each turn sends the whole
   history + a new 128-token user message and generates 64 tokens; with and without caching: hit rate
   (cached / prompt tokens), TTFT per turn (mean), wall time. The timed pass follows an untimed one of the
   same shapes on other tokens (Triton compiles per step shape).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/prefix_cache_check.py --out $OUT/prefix.json
    python3 benchmarks/prefix_cache_check.py --device cpu --model tiny --skip-ttft   # hit rates only (CPU)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


ARGS = argparse.Namespace(device="cuda", model="deepseek-v4-flash", piecewise_graph_tokens=None)


def make_engine(cache: bool, layers: int) -> LLMEngine:
    gpu = ARGS.device == "cuda"
    return LLMEngine(EngineConfig(device=ARGS.device, model=ARGS.model, load_format="dummy" if gpu else "auto",
                                  num_layers=layers if gpu else None, dtype="bfloat16" if gpu else "float32",
                                  max_model_len=16384, max_num_seqs=16, max_num_batched_tokens=8192,
                                  kv_cache_memory=(12 << 30) if gpu else (2 << 30), enable_prefix_caching=cache,
                                  piecewise_graph_tokens=ARGS.piecewise_graph_tokens))


def sync() -> None:
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


def run(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list:
    """Requests all added now, stepped to completion; their final outputs in order."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
    ids = [eng.add_request(p, params).request_id for p in prompts]
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    sync()
    return [done[i] for i in ids]


def ttft_rows(layers: int, reps: int, rng: random.Random) -> list[dict]:
    def toks(n):
        return [rng.randrange(1000, 120000) for _ in range(n)]

    cold, warm = make_engine(False, layers), make_engine(True, layers)
    run(cold, [toks(8448)], 2)  # compile / warm both
    run(warm, [toks(8448)], 2)
    res: dict[str, list[float]] = {k: [] for k in ("cold", "cold+cache", "warm", "resent")}
    cached: dict[str, list[int]] = {k: [] for k in res}
    for _ in range(reps):
        S = toks(8192)
        q1, q2, q3 = toks(256), toks(256), toks(256)
        for name, eng, p in [("cold", cold, S + q1), ("cold+cache", warm, S + q1)]:
            (o,) = run(eng, [p], 1)
            res[name].append(o.metrics.ttft)
            cached[name].append(o.num_cached_tokens)
        run(warm, [S + q2], 1)
        for name, p in [("warm", S + q3), ("resent", S + q1)]:
            (o,) = run(warm, [p], 1)
            res[name].append(o.metrics.ttft)
            cached[name].append(o.num_cached_tokens)
    base = statistics.median(res["cold"])
    rows = []
    for k, v in res.items():
        m = statistics.median(v)
        rows.append({"case": k, "prompt_tokens": 8448, "ttft_ms": m * 1e3, "ttft_all_ms": [x * 1e3 for x in v],
                     "cached_tokens": cached[k], "ratio_to_cold": m / base})
        print(f"{k:11s} TTFT {m * 1e3:8.2f} ms  ({m / base:5.3f} x cold)  cached {cached[k]}")
    del cold, warm
    return rows


def chat_rows(layers: int, convs: int, turns: int, rng: random.Random) -> list[dict]:
    def tok(n):
        return [rng.randrange(1000, 120000) for _ in range(n)]

    rows = []
    for cache in (False, True):
        eng = make_engine(cache, layers)
        for timed in (False, True):  # the same workload on other tokens first: compiles every step shape
            system = tok(2048)
            user = [[tok(128) for _ in range(turns)] for _ in range(convs)]
            hist = [list(system) for _ in range(convs)]
            t0 = time.perf_counter()
            per_turn = []
            prompt_tokens = cached_tokens = 0
            for t in range(turns):
                prompts = [h + user[c][t] for c, h in enumerate(hist)]
                outs = run(eng, prompts, 64)
                per_turn.append(statistics.mean(o.metrics.ttft for o in outs) * 1e3)
                for c, o in enumerate(outs):
                    hist[c] = prompts[c] + o.outputs[0].token_ids
                    prompt_tokens += len(prompts[c])
                    cached_tokens += o.num_cached_tokens
            wall = time.perf_counter() - t0
        row = {"prefix_caching": cache, "conversations": convs, "turns": turns, "ttft_ms_per_turn": per_turn,
               "hit_rate": cached_tokens / prompt_tokens, "prompt_tokens": prompt_tokens, "wall_s": wall,
               "stats": eng.prefix_cache_stats()}
        print(f"chat caching={cache}: hit rate {row['hit_rate']:.3f}, TTFT/turn "
              f"{', '.join(f'{x:.1f}' for x in per_turn)} ms, wall {wall:.2f} s")
        rows.append(row)
        del eng
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (Flash layers, dummy weights) or cpu (--model tiny)")
    ap.add_argument("--model", default="deepseek-v4-flash")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--piecewise-graph-tokens", type=int, default=None, help="0: eager prefill steps")
    a = ap.parse_args()
    ARGS.device, ARGS.model, ARGS.piecewise_graph_tokens = a.device, a.model, a.piecewise_graph_tokens
    rng = random.Random(0)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    res = {"device": dev, "model": a.model, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "layers": a.layers, "piecewise_graph_tokens": a.piecewise_graph_tokens, "ttft": [] if a.skip_ttft else ttft_rows(a.layers, a.reps, rng)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    res["chat"] = chat_rows(a.layers, a.convs, a.turns, rng)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
