"""GPU: verify-graph step cost against acceptance with the draft oracle (issue 18), plain graph decode as
the baseline on the same machine. 4 Flash layers, dummy weights, bf16, batch 1, 256 in / 48 out.

    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/spec_oracle_graphs.py --out $OUT/oracle.json
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
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "input_len": 256, "output_len": 48, "rows": []}
    for oracle, kw in [(None, {}), ([0.0, 1.0], dict(speculative_tokens=1)),
                       ([0.0, 0.7, 1.0], dict(speculative_tokens=3))]:
        res["rows"] += rows_for([1], 256, 48, oracle=oracle, **kw)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    for r in res["rows"]:
        print(r.get("drafter", "plain"), r.get("speculative_tokens", 0), "tpot %.2f ms" % r["tpot_ms"],
              "tokens/step %.2f" % r.get("mean_accepted_length", 1.0), "step %.2f ms" % r["step_ms"],
              "engine_steps", r["engine_steps"])


if __name__ == "__main__":
    main()
