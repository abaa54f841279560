"""GPU check of the engine core (issue 17): 4 Flash layers, dummy weights, bf16, official numerics.

For graphs on and off: engine build time (graphs are captured at start-up: how many, how long, how much
memory against the reserve the cache plan kept for them), `bench latency` rows (TTFT, TPOT) at batch 1, 32
and 64, and the greedy tokens of a few requests (graphs vs eager: the same tokens up to summation order,
since a graph sizes split-KV work by its context bucket, not the real length).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/engine_core_check.py --out $OUT/core.json

Run it with PYTHONPATH pointing at an older tree too, on the same machine, for the before / after comparison
(fields this tree's engine lacks are reported as null).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from dsv4.bench.latency import dsv4_rows
from dsv4.config import EngineConfig
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams


def one(name: str, batches: list[int], **kw) -> dict:
    gc.collect()  # the previous engine's cache
    torch.cuda.empty_cache()
    t = time.perf_counter()
    llm = LLM.from_config(EngineConfig(device="cuda", model="deepseek-v4-flash", load_format="dummy", num_layers=4,
                                       dtype="bfloat16", max_model_len=4096, max_num_seqs=64, **kw))
    build_s = time.perf_counter() - t
    eng = llm.engine
    graphs = eng.runner.graphs
    res = {"name": name, "build_s": build_s, "plan": eng.plan.describe(),
           "graphs_at_start": None if graphs is None else len(graphs.graphs),
           "graph_memory_gib": getattr(eng, "graph_memory", 0) / 2**30,
           "graph_reserve_gib": getattr(eng, "_graph_reserve", 0) / 2**30}
    print(json.dumps(res), flush=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 129280, (n,), generator=g).tolist() for n in (5, 300, 1200, 77, 2000, 16, 640, 128)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), use_tqdm=False)
    res["tokens"] = [o.outputs[0].token_ids for o in outs]
    res["rows"] = dsv4_rows(llm, batches, 256, 32, progress=True, warmup_output_len=8)
    res["graph_steps_total"] = eng.runner.graph_steps
    res["graphs_end"] = None if graphs is None else len(graphs.graphs)
    del llm, eng, graphs
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,64")
    ap.add_argument("--budget", default=None, help="kv_cache_memory in bytes (default: planned from the GPU)")
    ap.add_argument("--only", default=None, help="graphs | eager")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    kw = {} if a.budget is None else {"kv_cache_memory": int(a.budget)}
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "runs": []}
    if a.only in (None, "graphs"):
        out["runs"].append(one("graphs", batches, **kw))
    if a.only in (None, "eager"):
        out["runs"].append(one("eager", batches, enforce_eager=True, **kw))
    if len(out["runs"]) == 1:
        print(json.dumps(out["runs"][0]["rows"]))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
        return
    ga, ea = out["runs"][0]["tokens"], out["runs"][1]["tokens"]
    same = sum(x == y for a_, b_ in zip(ga, ea) for x, y in zip(a_, b_))
    out["graph_vs_eager_token_agreement"] = same / sum(len(x) for x in ga)
    out["graph_vs_eager_first_token_equal"] = all(a_[0] == b_[0] for a_, b_ in zip(ga, ea))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
