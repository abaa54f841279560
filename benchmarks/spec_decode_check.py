"""GPU check of speculative decoding (issue 18): 4 Flash layers, dummy weights, bf16, official numerics.

Dummy weights make the MTP block's drafts worthless, so the step costs and the speed-up curve are measured
with the DRAFT ORACLE (dsv4 bench latency --draft-oracle: a previous greedy run's tokens replayed as drafts,
each kept with probability p); one MTP-drafted row checks that the real drafter runs on the GPU. Baselines:
plain decoding with graphs and eagerly; verify steps from graphs (and one eager row). Per row: TPOT, tokens per step,
and the step time (TPOT x tokens per step).

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/spec_decode_check.py --out $OUT/spec.json --plot $OUT/spec.png
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


def rows_for(batches, input_len, output_len, oracle=None, num_layers=4, **kw) -> list[dict]:
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM.from_config(EngineConfig(device="cuda", model="deepseek-v4-flash", load_format="dummy", num_layers=num_layers,
                                       dtype="bfloat16", max_model_len=4096, max_num_seqs=64,
                                       kv_cache_memory=8 << 30, **kw))
    out = []
    for p in (oracle if oracle is not None else [None]):
        rows = dsv4_rows(llm, batches, input_len, output_len, progress=True, warmup_output_len=8, draft_oracle=p)
        for r in rows:
            r["config"] = {"num_layers": num_layers, **kw}
            r["step_ms"] = r["tpot_ms"] * r.get("mean_accepted_length", 1.0)
        out += rows
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    B = [int(x) for x in a.batches.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "input_len": a.input_len, "output_len": a.output_len, "rows": []}

    def save():  # after every configuration (a run cut short keeps what it measured)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)

    for args, kw in [((B,), {}),  # plain, graphs
                     ((B,), dict(enforce_eager=True)),  # plain, eager
                     ((B,), dict(oracle=[1.0, 0.7], speculative_tokens=1)),
                     ((B,), dict(oracle=[0.0, 0.5, 0.7, 0.9, 1.0], speculative_tokens=3)),
                     (([1],), dict(speculative_tokens=3)),  # the MTP drafter itself
                     (([1],), dict(speculative_tokens=1)),
                     (([1],), dict(oracle=[0.7], speculative_tokens=3, enforce_eager=True))]:  # verify steps eagerly
        res["rows"] += rows_for(*args, a.input_len, a.output_len, **kw)
        save()
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for b in B:
            for k in (1, 3):
                pts = sorted((r["acceptance_rate"], r["user_tok_s"]) for r in res["rows"]
                             if r["batch"] == b and r.get("speculative_tokens") == k and "oracle" in r["drafter"]
                             and not r["config"].get("enforce_eager"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"batch {b}, {k} drafts (oracle)")
            for r in res["rows"]:
                if r["batch"] == b and not r.get("speculative_tokens"):
                    ax.axhline(r["user_tok_s"], ls="--" if r["config"].get("enforce_eager") else "-", lw=0.8,
                               label=f"batch {b}, no drafts ({'eager' if r['config'].get('enforce_eager') else 'graphs'})")
        ax.set_xlabel("draft acceptance rate")
        ax.set_ylabel("tok/s per user")
        ax.set_title(f"Speculative decoding, 4 Flash layers, {res['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
