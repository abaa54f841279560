"""GPU: verify-graph step cost against acceptance with the draft oracle (issue 18), plain graph decode as
the baseline on the same machine. 4 Flash layers, dummy weights, bf16, batch 1, 256 in / 48 out.

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/spec_oracle_graphs.py --out $OUT/oracle.json --profile \
        --plot $OUT/oracle.png

--p1 / --p3: the oracle's keep probabilities for N = 1 / N = 3 (the curve against acceptance); --plot: user
tok/s against tokens per step, plain graph decode as the line to beat.

--profile: where one MTP N = 1 speculative step's time goes (wall time of the runner's parts, host-timed
with a device sync after each, over 20 steps), then a cProfile of one more request's undisturbed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_decode_check import rows_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--p1", default="0,1")
    ap.add_argument("--p3", default="0,0.7,1")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--layers", default="4", help="comma-separated layer counts: each gets the plain row and the "
                                                  "sweeps (the per-layer slope projects to the 43-layer model)")
    a = ap.parse_args()
    p1, p3 = ([float(x) for x in v.split(",") if x] for v in (a.p1, a.p3))
    if a.profile:
        profile()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "input_len": 256, "output_len": 48, "rows": []}
    runs = [(None, {}), (p1, dict(speculative_tokens=1)), (p3, dict(speculative_tokens=3))]
    for L in (int(x) for x in a.layers.split(",")):
        for oracle, kw in runs:
            if oracle == []:
                continue
            res["rows"] += rows_for([1], 256, 48, oracle=oracle, num_layers=L, **kw)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)
    for r in res["rows"]:
        print(r.get("drafter", "plain"), r.get("speculative_tokens", 0), "tpot %.2f ms" % r["tpot_ms"],
              "tokens/step %.2f" % r.get("mean_accepted_length", 1.0), "step %.2f ms" % r["step_ms"],
              "engine_steps", r["engine_steps"], "oracle rounds", r.get("oracle_rounds"),
              "converged", r.get("oracle_converged"))
    if a.plot:
        plot(res, a.plot)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = sorted({r.get("config", {}).get("num_layers", 4) for r in res["rows"]})
    for L in layers:
        mine = [r for r in res["rows"] if r.get("config", {}).get("num_layers", 4) == L]
        for k in (1, 3):
            pts = sorted((r["mean_accepted_length"], r["user_tok_s"]) for r in mine if r.get("speculative_tokens") == k)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{L} layers, {k} draft{'s' if k > 1 else ''} (draft oracle)")
        for r in mine:
            if not r.get("speculative_tokens"):
                ax.axhline(r["user_tok_s"], color="k", lw=0.8, label=f"{L} layers, no drafts (graphs)")
                ax.axhline(2 * r["user_tok_s"], color="k", ls=":", lw=0.8, label=f"{L} layers, 2x no drafts")
    ax.axvline(2.5, color="grey", ls="--", lw=0.8, label="published acceptance, 3 drafts")
    ax.set_xlabel("tokens per step (mean accepted length)")
    ax.set_ylabel("tok/s, one user")
    ax.set_title(f"Speculative decoding with the draft oracle, batch 1, {res['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile() -> None:
    """Host-timed parts of MTP speculative steps (N = 1), a device sync around each part."""
    from dsv4.config import EngineConfig
    from dsv4.engine import model_runner as mr
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling_params import SamplingParams

    llm = LLM.from_config(EngineConfig(device="cuda", model="deepseek-v4-flash", load_format="dummy", num_layers=4,
                                       dtype="bfloat16", max_model_len=4096, max_num_seqs=8,
                                       kv_cache_memory=8 << 30, speculative_tokens=1))
    eng = llm.engine
    run, dg = eng.runner, eng.runner.draft_graphs
    acc: dict[str, float] = {}

    def timed(name, fn):
        def w(*a, **k):
            torch.cuda.synchronize()
            n0, t = run.verify_graph_steps, time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            key = name
            if name in ("engine step", "runner execute") and run.verify_graph_steps == n0:
                key += " (other steps)"  # prefill, eager MTP passes: not part of a verify step
            acc[key] = acc.get(key, 0.0) + dt
            return out
        return w

    run.verify_graphs.replay = timed("verify replay", run.verify_graphs.replay)
    run._verify = timed("verify + rollback (host)", run._verify)
    rollback0 = mr.rollback
    mr.rollback = timed("rollback", mr.rollback)
    dg.run = timed("draft graph run", dg.run)
    dg.run_accepting = timed("accept + draft graphs", dg.run_accepting)
    run.verify_graphs.rollback = timed("rollback (verify graphs)", run.verify_graphs.rollback)
    run.execute = timed("runner execute", run.execute)
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng.step = timed("engine step", eng.step)
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, detokenize=False)
    eng.add_request(list(range(1000, 1256)), p, request_id="w")
    while eng.has_unfinished_requests():
        eng.step()
    acc.clear()
    n0 = run.verify_graph_steps
    eng.add_request(list(range(2000, 2256)), p, request_id="m")
    while eng.has_unfinished_requests():
        eng.step()
    n = run.verify_graph_steps - n0
    print(f"profile: {n} verify graph steps of {eng.num_steps} engine steps")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {1e3 * v / max(n, 1):7.3f} ms per verify step")
    # the host's share without the syncs above: cProfile over one more request's steps (the un-timed functions)
    import cProfile
    import pstats

    run.verify_graphs.__dict__.pop("replay", None)
    run.__dict__.pop("_verify", None)
    dg.__dict__.pop("run", None)
    dg.__dict__.pop("run_accepting", None)
    run.verify_graphs.__dict__.pop("rollback", None)
    run.__dict__.pop("execute", None)
    eng.scheduler.__dict__.pop("schedule", None)
    eng.__dict__.pop("step", None)
    mr.rollback = rollback0
    # undisturbed: each verify step ends in its read-back, so its wall time is the step's (no syncs added)
    eng.add_request(list(range(4000, 4256)), p, request_id="u")
    walls = []
    while eng.has_unfinished_requests():
        n0, t = run.verify_graph_steps, time.perf_counter()
        eng.step()
        if run.verify_graph_steps > n0:
            walls.append(time.perf_counter() - t)
    walls.sort()
    print(f"undisturbed verify steps: {len(walls)}, median {1e3 * walls[len(walls) // 2]:.3f} ms, "
          f"mean {1e3 * sum(walls) / max(len(walls), 1):.3f} ms")
    eng.add_request(list(range(3000, 3256)), p, request_id="c")
    prof = cProfile.Profile()
    n0 = run.verify_graph_steps
    prof.enable()
    while eng.has_unfinished_requests():
        eng.step()
    prof.disable()
    print(f"cProfile over {run.verify_graph_steps - n0} verify graph steps (times per whole run):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
