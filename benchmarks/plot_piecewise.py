"""Bar chart of a `benchmarks/piecewise_check.py` result: each case's time, eager against piecewise graphs.

    python3 benchmarks/plot_piecewise.py docs/results/2026-12-06-piecewise-humming-h100.json --out docs/piecewise-h100.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(r: dict) -> str:
    if r["case"] == "ttft":
        return f"prefill {r['tokens']}"
    return f"{r['decoders']} dec + {r['chunk']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("result")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    d = json.load(open(a.result))
    cases = [label(r) for r in d["rows"] if r["mode"] == "eager"]
    ms = {m: {label(r): r["ms"] for r in d["rows"] if r["mode"] == m} for m in ("eager", "piecewise")}
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [ms["eager"][c] for c in cases], w, label="eager")
    ax.bar([i + w / 2 for i in x], [ms["piecewise"].get(c, 0) for c in cases], w, label="piecewise graphs")
    ax.set_xticks(list(x), cases, rotation=20)
    ax.set_ylabel("ms (time to first token / step)")
    ax.set_title(f"{d['layers']} Flash layers, {d['device']}, {d['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
