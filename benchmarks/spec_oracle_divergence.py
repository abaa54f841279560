"""GPU: where and why a draft-oracle replay leaves the recorded greedy path (issue 18).

The oracle records a greedy continuation through verify steps whose drafts all fail (every accepted token
comes from slot 0 of a verify chunk), then replays it with drafts kept (tokens come from slots 1..k). If a
token's logits depend on its slot in the chunk by more than rounding, the replay leaves the path. Per
configuration this prints: the first index where two recordings differ (determinism), where the p = 1 replay
differs from the recording, and the top-2 logprob gap at that index in both runs (a gap well above the
rounding of bf16 logits means the slots compute different things, not a near-tie flipping).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/spec_oracle_divergence.py --out $OUT/div.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from dsv4.bench.throughput import bench_prompts
from dsv4.config import EngineConfig
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.spec_decode import OracleDrafter


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def gap(lps, i):
    if lps is None or i is None or i >= len(lps):
        return None
    t = lps[i].top
    return {"top": [(int(a), round(float(b), 4)) for a, b in t[:2]], "gap": float(t[0][1] - t[1][1])}


def run_config(name, k, B, input_len, output_len, device="cuda", model="deepseek-v4-flash", **kw):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    base = dict(device=device, model=model, load_format="dummy", num_layers=4, dtype="bfloat16",
                max_model_len=4096, max_num_seqs=64, kv_cache_memory=8 << 30, speculative_tokens=k)
    llm = LLM.from_config(EngineConfig(**{**base, **kw}))
    eng = llm.engine
    V = eng.cfg.vocab_size
    prompts = bench_prompts(V, B, input_len, 0)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0, detokenize=False, logprobs=2)

    def gen():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]

    eng.runner.drafter = OracleDrafter({}, k, 0.0, vocab_size=V)
    rec, rec_lp = gen()
    rec2, _ = gen()
    cont = {tuple(p): o for p, o in zip(prompts, rec)}
    rows = []
    for p in (1.0, 0.7):
        eng.runner.drafter = OracleDrafter(cont, k, p, seed=0, vocab_size=V)
        s0 = eng.num_steps
        rep, rep_lp = gen()
        steps = eng.num_steps - s0
        for b in range(B):
            i = first_diff(rec[b], rep[b])
            rows.append({"config": name, "k": k, "p": p, "seq": b, "record_repeat_diff": first_diff(rec[b], rec2[b]),
                         "replay_diff": i, "record_at": gap(rec_lp[b], i), "replay_at": gap(rep_lp[b], i),
                         "engine_steps": steps,
                         "max_logprob_diff_before": max((abs(x.logprob - y.logprob) for x, y in
                                                         zip(rec_lp[b][:i or output_len], rep_lp[b][:i or output_len])),
                                                        default=None)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--configs", default="graphs,eager")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="deepseek-v4-flash")
    ap.add_argument("--input-len", type=int, default=256)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else a.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "rows": []}
    cfgs = {"graphs": {}, "eager": dict(enforce_eager=True), "eager_k1": dict(enforce_eager=True),
            "graphs_k1": {}, "fp8kv": dict(kv_cache_dtype="fp8"),
            "fp32_eager": dict(enforce_eager=True, dtype="float32")}
    for name in a.configs.split(","):
        k = 1 if name.endswith("_k1") else 3
        try:
            res["rows"] += run_config(name, k, a.batch, a.input_len, a.output_len, device=a.device,
                                   model=a.model, **cfgs[name])
        except Exception as e:  # keep the other configurations' rows
            res["rows"].append({"config": name, "error": repr(e)})
            print(name, "failed:", repr(e), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
