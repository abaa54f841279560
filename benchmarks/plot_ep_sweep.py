"""Plot a multi-GPU `dsv4 bench latency` concurrency sweep: throughput per GPU against speed per user.

    python3 benchmarks/plot_ep_sweep.py docs/results/2026-11-22-ep-bench-flash43-2xh200-sweep.json \
        --out docs/ep-bench-flash43-2xh200.png

Reads a JSON with "rows" (concurrency, tok_s_per_user, output_tok_s_per_gpu, decode_tok_s_per_gpu, tpot_ms)
and draws the issue's targets (>= 3,000 output tok/s per GPU, >= 150 tok/s per user) as dashed lines.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target-gpu", type=float, default=3000.0)
    ap.add_argument("--target-user", type=float, default=150.0)
    a = ap.parse_args()
    with open(a.results) as f:
        data = json.load(f)
    rows = sorted(data["rows"], key=lambda r: r["concurrency"])
    for r in rows:
        for k in ("concurrency", "tok_s_per_user", "output_tok_s_per_gpu", "tpot_ms"):
            if not isinstance(r.get(k), (int, float)):
                raise SystemExit(f"{a.results}: row {r} has no number for {k!r}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    user = [r["tok_s_per_user"] for r in rows]
    ax0.plot(user, [r["output_tok_s_per_gpu"] for r in rows], "o-", label="output tok/s per GPU (whole run)")
    dec = [(r["tok_s_per_user"], r["decode_tok_s_per_gpu"]) for r in rows if r.get("decode_tok_s_per_gpu")]
    if dec:
        ax0.plot(*zip(*dec), "s--", label="decode tok/s per GPU (decode phase)")
    for r in rows:
        ax0.annotate(f"conc {r['concurrency']}", (r["tok_s_per_user"], r["output_tok_s_per_gpu"]),
                     textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax0.axhline(a.target_gpu, color="gray", ls=":", label=f"target {a.target_gpu:,.0f} tok/s/GPU")
    ax0.axvline(a.target_user, color="gray", ls="-.", label=f"target {a.target_user:,.0f} tok/s/user")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xlabel("tok/s per user (1000 / TPOT)")
    ax0.set_ylabel("tok/s per GPU")
    ax0.legend(fontsize=8)
    ax0.grid(True, which="both", alpha=0.3)

    conc = [r["concurrency"] for r in rows]
    ax1.plot(conc, [r["tpot_ms"] for r in rows], "o-", label="TPOT (ms)")
    ax1.plot(conc, [r["ttft_s"] * 1e3 for r in rows if "ttft_s" in r], "s--", label="TTFT (ms)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent requests")
    ax1.set_ylabel("ms")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    fig.suptitle(data.get("title", "DeepSeek-V4-Flash (43 layers, dummy weights), 1024 in / 1024 out, 2x H200"))
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
