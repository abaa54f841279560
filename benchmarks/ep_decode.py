"""Expert-parallel decode on several GPUs of one host (issue 8, first measurement): N ranks (NCCL), each
holding the attention and 1/N of the routed experts of DeepSeek-V4-Flash (dummy weights, all layers unless
--layers), serving its own --batch sequences prefilled to --ctx tokens; eager decode steps in lockstep.
Prints per-step time and output tok/s per GPU (dummy weights: a speed measurement; correctness of the
exchange is the gloo test's, tests/parallel/). `--graphs`: decode steps replay captured graphs, NCCL
collectives included (every rank runs the same bucket).

    PYTHONPATH=. python3 benchmarks/ep_decode.py --gpus 2 --batch 64 --ctx 1024 --steps 8 --out $OUT/ep.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def rank_main(a, rank: int) -> None:
    import torch
    import torch.distributed as dist

    from dsv4.cache.direct import DirectCache
    from dsv4.model import build_model
    from dsv4.parallel import ExpertParallel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{a.rdv}", rank=rank, world_size=a.gpus,
                            device_id=torch.device("cuda", rank))
    ep = ExpertParallel()
    t0 = time.time()
    lm = build_model("deepseek-v4-flash", device=f"cuda:{rank}", dtype="bfloat16", numerics=a.numerics,
                     load_format="dummy", num_layers=a.layers, expert_parallel=ep, seed=rank)
    torch.cuda.synchronize()
    build_s = time.time() - t0
    weights_gib = sum(b.numel() * b.element_size() for b in lm.model.buffers()) / 2**30
    B, L = a.batch, a.ctx
    dc = DirectCache(lm.cfg, B + 1, L + a.steps + 8, f"cuda:{rank}", torch.bfloat16)
    slots = [dc.add() for _ in range(B)]
    graphs = None
    if a.graphs:
        from dsv4.engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(lm.model, dc.cache, dc.add(), max_batch=B, batch_buckets=(B,), min_context=1024,
                              expert_parallel=True)
    g = torch.Generator().manual_seed(rank)
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, B, 8):
            grp = slots[i:i + 8]
            ids = torch.randint(0, lm.cfg.vocab_size, (L * len(grp),), generator=g).cuda()
            lm.model(ids, dc.meta(grp, [0] * len(grp), [L] * len(grp)), dc.cache)
        torch.cuda.synchronize()
        prefill_s = time.time() - t0
        times = []
        pos = L
        for k in range(a.steps + 2):
            ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g).cuda()
            dist.barrier()
            torch.cuda.synchronize()
            t = time.perf_counter()
            if graphs is not None:  # every rank has B sequences at the same position: the same bucket
                graphs.run(ids.cpu(), slots, [pos] * B)
            else:
                lm.model.logits(lm.model(ids, dc.meta(slots, [pos] * B, [1] * B), dc.cache))
            torch.cuda.synchronize()
            if k >= 2:
                times.append((time.perf_counter() - t) * 1e3)
            pos += 1
    step = sorted(times)[len(times) // 2]
    res = {"rank": rank, "gpus": a.gpus, "graphs": a.graphs, "layers": lm.cfg.num_layers, "batch_per_gpu": B, "ctx": L,
           "local_experts": lm.opts.expert_map.num_local, "weights_gib": weights_gib, "build_s": build_s,
           "prefill_s": prefill_s, "step_ms": times, "step_ms_median": step,
           "output_tok_s_per_gpu": B / (step / 1e3), "tok_s_per_user": 1e3 / step,
           "mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    with open(os.path.join(a.outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    print(json.dumps(res), flush=True)
    if graphs is None:
        dist.destroy_process_group()
    else:  # observed 2026-11-22 (torch 2.11, 2 x H200): teardown with NCCL calls captured in graphs hung
        sys.stdout.flush()
        os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64, help="sequences per GPU")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--numerics", default="official")
    ap.add_argument("--out", default=None)
    ap.add_argument("--graphs", action="store_true", help="replay captured decode graphs (collectives inside)")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rdv", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        return rank_main(a, a.rank)
    tmp = tempfile.mkdtemp()
    args = [sys.executable, __file__, "--gpus", str(a.gpus), "--batch", str(a.batch), "--ctx", str(a.ctx),
            "--steps", str(a.steps), "--numerics", a.numerics, "--rdv", os.path.join(tmp, "rdv"), "--outdir", tmp]
    if a.layers:
        args += ["--layers", str(a.layers)]
    if a.graphs:
        args += ["--graphs"]
    procs = [subprocess.Popen(args + ["--rank", str(r)]) for r in range(a.gpus)]
    rcs = [p.wait() for p in procs]
    rows = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(a.gpus)
            if os.path.exists(os.path.join(tmp, f"rank{r}.json"))]
    out = {"return_codes": rcs, "ranks": rows}
    if rows:
        step = max(r["step_ms_median"] for r in rows)
        out["step_ms"] = step
        out["output_tok_s_per_gpu"] = a.batch / (step / 1e3)
        out["output_tok_s_total"] = a.batch * a.gpus / (step / 1e3)
    print(json.dumps({k: v for k, v in out.items() if k != "ranks"}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
