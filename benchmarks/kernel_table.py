"""Turn a gpu_kernels_check.py JSON into a markdown table (time, floor, fraction of roofline) and a PNG.

    python benchmarks/kernel_table.py docs/results/2026-11-22-kernels-h200.json --png docs/kernels-roofline.png
"""

from __future__ import annotations

import argparse
import json


def rows(res: dict) -> list[tuple[str, str, float, float, float, str]]:
    out = []
    for c in res["cases"]:
        if "error" in c or "skipped" in c:
            out.append((c["module"], c["case"], float("nan"), float("nan"), float("nan"), c.get("error", c.get("skipped", ""))[:60]))
            continue
        t_ms = c.get("time_ms", c.get("triton_ms"))
        if "floor_us" in c:
            floor_ms = c["floor_us"] / 1e3
        elif "roofline_ms" in c:
            floor_ms = c["roofline_ms"]
        else:
            fr = max(c.get("hbm_roofline_frac", 0), c.get("flop_roofline_frac", 0))
            floor_ms = fr * t_ms
        err = next((f"{k}={c[k]:.2g}" for k in ("max_abs_err", "entry_max_abs_err", "max_abs", "u_max_abs", "q_mismatch")
                    if k in c), "")
        out.append((c["module"], c["case"], t_ms * 1e3, floor_ms * 1e3, floor_ms / t_ms if t_ms else float("nan"), err))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    res = json.load(open(a.json))
    rs = rows(res)
    print("| kernel | case | time (us) | floor (us) | fraction of roofline | error vs reference |")
    print("|---|---|---|---|---|---|")
    for m, c, t, f, fr, e in rs:
        print(f"| {m} | {c} | {t:.1f} | {f:.1f} | {fr:.3f} | {e} |")
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = [r for r in rs if r[4] == r[4]]
        fig, ax = plt.subplots(figsize=(10, 0.22 * len(ok) + 1))
        colors = {"attention": "C0", "indexer": "C1", "compressor": "C2", "norm": "C3", "rope": "C4",
                  "hyper_connection": "C5", "quant": "C6", "gemm": "C8", "moe": "C9", "router": "C9"}
        ax.barh(range(len(ok)), [r[4] for r in ok], color=[colors.get(r[0], "C7") for r in ok])
        ax.set_yticks(range(len(ok)), [r[1] for r in ok], fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("fraction of roofline (floor time / measured time), log scale")
        ax.set_title(f"dsv4 Triton kernels on {res['device']} ({res['date']})")
        fig.tight_layout()
        fig.savefig(a.png, dpi=130)


if __name__ == "__main__":
    main()
