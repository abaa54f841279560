"""Which PyTorch ops a decode step launches, and from where (GPU or CPU): full-width DeepSeek-V4-Flash with dummy
weights, the first `--layers` layers, one sequence prefilled to `--ctx` tokens, then one eager decode step
(model forward + logits) under a dispatch mode that records every aten op that can launch a kernel (views,
empties and metadata ops left out) with the innermost dsv4 call site. The Triton kernels are not aten ops and
are not listed (the graph profile of benchmarks/decode_profile.py counts those). The small glue ops this finds
are what fusing them removes (issue 16 item 5).

    python3 benchmarks/launch_census.py --layers 4 --ctx 1024 --out $OUT/census.json
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "t", "transpose",
             "select", "slice", "unsqueeze", "squeeze", "expand", "detach", "alias", "permute", "reshape", "unbind",
             "split", "split_with_sizes", "diagonal", "lift_fresh", "is_nonzero", "_local_scalar_dense", "set_",
             "narrow", "unflatten", "flatten", "view_as", "chunk", "sym_size", "sym_stride", "sym_numel", "size",
             "stride", "dim", "numel", "is_contiguous", "_reshape_alias", "resize_"}


class Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in NO_KERNEL:
            stack = traceback.extract_stack()
            if not any("triton/runtime/interpreter" in f.filename for f in stack):
                fr = [f for f in stack if "/dsv4/" in f.filename]
                where = f"{fr[-1].filename.split('/dsv4/')[-1]}:{fr[-1].lineno} {fr[-1].name}" if fr else "?"
                model = [f for f in fr if "/dsv4/model/" in f.filename]
                caller = f"{model[-1].filename.split('/dsv4/')[-1]}:{model[-1].lineno}" if model else ""
                self.ops[(name, where, caller)] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--model", default="deepseek-v4-flash")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--op", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from dsv4.cache.direct import DirectCache
    from dsv4.model import build_model
    from dsv4.ops.registry import parse_overrides

    lm = build_model(a.model, device=a.device, dtype="bfloat16", load_format="dummy", num_layers=a.layers,
                     op_overrides=parse_overrides(a.op))
    dc = DirectCache(lm.cfg, 2, a.ctx + 8, a.device, torch.bfloat16)
    s = [dc.add()]
    ids = torch.randint(0, lm.cfg.vocab_size, (a.ctx,), device=a.device)
    lm.model(ids, dc.meta(s, [0], [a.ctx]), dc.cache)
    for pos in (a.ctx, a.ctx + 1):  # warm (compilations), then the counted step
        tok = torch.randint(0, lm.cfg.vocab_size, (1,), device=a.device)
        meta = dc.meta(s, [pos], [1])
        census = Census()
        with census:
            lm.model.logits(lm.model(tok, meta, dc.cache))
    rows = [{"op": k[0], "site": k[1], "model_site": k[2], "count": c}
            for k, c in sorted(census.ops.items(), key=lambda kv: (kv[0][2], kv[0][1]))]
    for r in rows:
        print(f"{r['count']:4d}  {r['op']:24s} {r['site']:58s} {r['model_site']}")
    total = sum(r["count"] for r in rows)
    print(f"{total} aten ops that may launch kernels in one decode step of {a.layers} layers")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"layers": a.layers, "ctx": a.ctx, "device": str(a.device), "total": total, "rows": rows,
                       "providers": {c.op: c.provider for c in lm.ops.choices.values()}}, f, indent=1)


if __name__ == "__main__":
    main()
