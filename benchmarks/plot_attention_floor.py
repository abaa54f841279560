"""Plot benchmarks/attention_floor.py results: decode time per call against the batch, one panel per layer kind,
one line per context, the floor dashed; optionally the first version's times (a results file of the same
script with its `variant` rows) for comparison.

    python3 benchmarks/plot_attention_floor.py docs/results/2026-12-06-attention-floor-fp8-h100.json \
        --before docs/results/2026-12-06-attention-floor-loads-h100.json --before-variant load=0 \
        --out docs/attention-floor-h100.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def decode_rows(path: str, variant: str = "default") -> list[dict]:
    with open(path) as f:
        d = json.load(f)
    return [r for r in d["rows"] if r["op"].endswith("decode") and r.get("variant") == variant and "us" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("--before", help="results of the first version, drawn dotted")
    ap.add_argument("--before-variant", default="default")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = decode_rows(a.results)
    before = decode_rows(a.before, a.before_variant) if a.before else []
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, ctx in enumerate(sorted({r["ctx"] for r in rows if r["mode"] == mode})):
            sel = sorted((r for r in rows if r["mode"] == mode and r["ctx"] == ctx), key=lambda r: r["batch"])
            color = f"C{i}"
            ax.plot([r["batch"] for r in sel], [r["us"] for r in sel], "o-", color=color, label=f"ctx {ctx}")
            ax.plot([r["batch"] for r in sel], [r["floor_us"] for r in sel], "--", color=color, alpha=0.6)
            old = sorted((r for r in before if r["mode"] == mode and r["ctx"] == ctx and r["batch"] >= 64),
                         key=lambda r: r["batch"])
            if old:
                ax.plot([r["batch"] for r in old], [r["us"] for r in old], ":", marker="x", color=color,
                        label=f"ctx {ctx}, first version")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch (tokens)")
        ax.set_ylabel("us per call (one layer)")
        ax.set_title(f"{mode}: time (solid), floor (dashed)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
