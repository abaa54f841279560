"""Plot benchmarks/moe_floor.py results: time of each routed-expert path against the weight-read floor, per
token count (log-log), and the ratio to the floor.

    python3 benchmarks/plot_moe_floor.py docs/results/2026-12-04-moe-floor-h200.json --out docs/moe-floor-h200.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.results) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "path" in r and "us" in r]
    if not rows:
        raise SystemExit(f"{a.results}: no timed rows (fields T, path, us, floor_us)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    floor = sorted({(r["T"], r["floor_us"]) for r in rows if r["path"] == paths[0]})
    ax.plot([t for t, _ in floor], [f for _, f in floor], "k--", label="weight-read floor (FP4)")
    for p in paths:
        pr = sorted((r["T"], r["us"], r["ratio"]) for r in rows if r["path"] == p)
        ax.plot([t for t, _, _ in pr], [u for _, u, _ in pr], "o-", label=p)
        bx.plot([t for t, _, _ in pr], [q for _, _, q in pr], "o-", label=p)
    for x in (ax, bx):
        x.set_xscale("log", base=2)
        x.set_xlabel("tokens T (top-6 of 256 experts)")
        x.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("us per MoE layer (graph replay)")
    ax.set_title("Routed experts, Flash shapes, official numerics")
    bx.set_yscale("log")
    bx.axhline(1.25, color="gray", ls=":", label="target 1.25x (T = 64, 256)")
    bx.axhline(2.0, color="gray", ls="-.", label="target 2x (T = 1)")
    bx.set_ylabel("time / floor")
    bx.set_title(f"Ratio to the floor ({data.get('device', '')}, {data.get('date', '')})")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
