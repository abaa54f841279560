"""Where a decode step's time goes (GPU): full-width DeepSeek-V4-Flash with dummy weights, the first
`--layers` layers, `--batch` sequences prefilled to `--ctx` tokens, then decode steps of one token each.

Reports: eager step time (model forward + logits, synchronised), the number of Triton kernel
compilations during the timed steps (must be 0 once warm), and a torch.profiler table of the busiest
CUDA kernels and CPU ops over a few steps.

    PYTHONPATH=. python3 benchmarks/decode_profile.py --layers 4 --batch 32 --ctx 256 --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def triton_cache_entries() -> int:
    """Compiled kernel variants across every Triton JIT function loaded so far."""
    import gc

    from triton.runtime.jit import JITFunction

    n = 0
    for o in gc.get_objects():
        if isinstance(o, JITFunction):
            for c in getattr(o, "device_caches", {}).values():
                n += len(c[0]) if isinstance(c, tuple) else len(c)
    return n


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--numerics", default="official")
    ap.add_argument("--kv-fp8", action="store_true")
    ap.add_argument("--op", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine", action="store_true", help="profile the whole engine (LLM.generate) instead")
    ap.add_argument("--profile-graphs", action="store_true", help="with --graph-sweep: kernel table of replays")
    ap.add_argument("--graph-sweep", default="", help="comma-separated batch sizes: eager vs graph-replayed "
                    "decode step time at each (model only), instead of the profile")
    ap.add_argument("--no-pdl", action="store_true", help="launch the Triton kernels without programmatic dependent "
                    "launch (kernels/triton/common.py PDL), for an A/B")
    ap.add_argument("--variants", default="", help="with --graph-sweep: ';'-separated knob sets, each ','-separated "
                    "module.NAME=value under dsv4.kernels.triton (e.g. 'default;common.PDL=0;gemm.LAST_REDUCE=0'): one "
                    "graph per variant, each on its own cache, replays interleaved step by step (drift hits all alike)")
    a = ap.parse_args()
    if a.no_pdl:
        from dsv4.kernels.triton import common

        common.PDL = False
    if a.engine:
        return engine_profile(a)
    if a.graph_sweep:
        return variant_sweep(a) if a.variants else graph_sweep(a)

    from dsv4.cache.direct import DirectCache
    from dsv4.model import build_model
    from dsv4.ops.registry import parse_overrides

    t0 = time.time()
    lm = build_model("deepseek-v4-flash", device="cuda", dtype="bfloat16", numerics=a.numerics, load_format="dummy",
                     num_layers=a.layers, op_overrides=parse_overrides(a.op))
    print(f"built in {time.time() - t0:.1f} s; providers:", {c.op: c.provider for c in lm.ops.choices.values()},
          flush=True)
    B, L = a.batch, a.ctx
    dc = DirectCache(lm.cfg, B, L + a.steps + 64, "cuda", torch.bfloat16, kv_fp8=a.kv_fp8)
    slots = [dc.add() for _ in range(B)]
    g = torch.Generator().manual_seed(0)
    res = {"layers": a.layers, "batch": B, "ctx": L, "numerics": a.numerics, "kv_fp8": a.kv_fp8,
           "device": torch.cuda.get_device_name()}
    t = time.time()
    for i in range(0, B, 8):  # prefill 8 sequences per step
        grp = slots[i:i + 8]
        ids = torch.randint(0, lm.cfg.vocab_size, (L * len(grp),), generator=g).cuda()
        lm.model(ids, dc.meta(grp, [0] * len(grp), [L] * len(grp)), dc.cache)
    torch.cuda.synchronize()
    res["prefill_s"] = time.time() - t
    pos = L

    def step():
        nonlocal pos
        ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g).cuda()
        lm.model.logits(lm.model(ids, dc.meta(slots, [pos] * B, [1] * B), dc.cache))
        pos += 1

    step()
    step()
    torch.cuda.synchronize()
    n0 = triton_cache_entries()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    res["eager_step_ms"] = times
    res["eager_step_ms_median"] = sorted(times)[len(times) // 2]
    res["triton_compiles_during_steps"] = triton_cache_entries() - n0
    print(json.dumps({k: v for k, v in res.items()}), flush=True)

    res["decode"] = profile_table(step, 3)
    # a prefill step as the engine schedules it: `--prefill-seqs` new sequences of `--ctx` tokens in one step
    P = a.prefill_seqs
    pc = DirectCache(lm.cfg, P, L + 8, "cuda", torch.bfloat16, kv_fp8=a.kv_fp8)

    def prefill():
        for s in list(pc._seqs):
            pc.remove(s)
        new = [pc.add() for _ in range(P)]
        ids = torch.randint(0, lm.cfg.vocab_size, (P * L,), generator=g).cuda()
        meta = pc.meta(new, [0] * P, [L] * P)
        lm.model.logits(lm.model(ids, meta, pc.cache)[meta.query_start[1:] - 1])

    prefill()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prefill()
    torch.cuda.synchronize()
    res["prefill_step_ms"] = (time.perf_counter() - t) * 1e3
    res["prefill_tokens"] = P * L
    print(f"prefill step of {P} x {L} tokens: {res['prefill_step_ms']:.1f} ms", flush=True)
    res["prefill"] = profile_table(prefill, 1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def parse_variants(spec: str) -> list[tuple[str, list[tuple[object, str, object]]]]:
    """'default;common.PDL=0,gemm.LAST_REDUCE=0' -> [(name, [(module, attr, value), ...]), ...] (values typed as
    the knob's current value)."""
    import importlib

    out = []
    for name in [v.strip() for v in spec.split(";") if v.strip()]:
        sets = []
        for item in ([] if name == "default" else name.split(",")):
            key, val = item.split("=", 1)
            mod_name, attr = key.rsplit(".", 1)
            mod = importlib.import_module(f"dsv4.kernels.triton.{mod_name}")
            cur = getattr(mod, attr)  # AttributeError names a knob that does not exist
            typed = bool(int(val)) if isinstance(cur, bool) else type(cur)(val)
            sets.append((mod, attr, typed))
        out.append((name, sets))
    return out


class knobs:
    """Context manager: set the knobs of one variant, restore them after."""

    def __init__(self, sets):
        self.sets, self.old = sets, []

    def __enter__(self):
        self.old = [(m, k, getattr(m, k)) for m, k, _ in self.sets]
        for m, k, v in self.sets:
            setattr(m, k, v)

    def __exit__(self, *exc):
        for m, k, v in self.old:
            setattr(m, k, v)


def variant_sweep(a) -> None:
    """Per batch size B and per knob variant: its own cache prefilled alike and its own captured decode graph; the
    variants' replays are interleaved step by step and each step's logits checked against one eager step."""
    from dsv4.cache.direct import DirectCache
    from dsv4.engine.cuda_graphs import DecodeGraphs
    from dsv4.model import build_model
    from dsv4.ops.registry import parse_overrides

    variants = parse_variants(a.variants)
    lm = build_model("deepseek-v4-flash", device="cuda", dtype="bfloat16", numerics=a.numerics, load_format="dummy",
                     num_layers=a.layers, op_overrides=parse_overrides(a.op))
    out = {"layers": a.layers, "ctx": a.ctx, "numerics": a.numerics, "kv_fp8": a.kv_fp8, "variants": a.variants,
           "device": torch.cuda.get_device_name(), "rows": []}
    g = torch.Generator().manual_seed(0)
    for B in [int(x) for x in a.graph_sweep.split(",")]:
        L, n_steps = a.ctx, a.steps
        caches = [DirectCache(lm.cfg, B + 1, L + 4 * n_steps + 8, "cuda", torch.bfloat16, kv_fp8=a.kv_fp8)
                  for _ in range(len(variants) + 1)]  # [0]: eager
        slots = [[c.add() for _ in range(B)] for c in caches][0]
        for i in range(0, B, 8):
            grp = slots[i:i + 8]
            ids = torch.randint(0, lm.cfg.vocab_size, (L * len(grp),), generator=g).cuda()
            for c in caches:
                lm.model(ids, c.meta(grp, [0] * len(grp), [L] * len(grp)), c.cache)
        graphs = [DecodeGraphs(lm.model, c.cache, B, max_batch=B, batch_buckets=(B,), min_context=1024)
                  for c in caches[1:]]
        pos = L
        times = [[] for _ in variants]
        worst = [0.0 for _ in variants]
        for k in range(n_steps + 2):
            ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g)
            want = lm.model.logits(lm.model(ids.cuda(), caches[0].meta(slots, [pos] * B, [1] * B), caches[0].cache))
            for v, ((_, sets), gr) in enumerate(zip(variants, graphs)):
                with knobs(sets):  # knobs are read while the first steps compile and capture
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    got = gr.run(ids, slots, [pos] * B)
                    torch.cuda.synchronize()
                    dt = (time.perf_counter() - t) * 1e3
                if k >= 2:
                    times[v].append(dt)
                worst[v] = max(worst[v], (got.float() - want.float()).abs().max().item())
            pos += 1
        for v, (name, _) in enumerate(variants):
            ts = sorted(times[v])
            row = {"batch": B, "variant": name, "graph_ms": ts[len(ts) // 2], "graph_ms_min": ts[0],
                   "graph_ms_per_layer": ts[len(ts) // 2] / a.layers, "max_abs_logit_diff": worst[v],
                   "steps": len(ts)}
            if a.profile_graphs and v == 0:  # kernel table of the first variant's replays
                from torch.profiler import ProfilerActivity, profile

                ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        graphs[0].run(ids, slots, [pos] * B)
                    torch.cuda.synchronize()
                ka = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                            key=lambda e: -e.device_time_total)
                row["kernels_ms_per_step"] = [(e.key[:70], round(e.device_time_total / 3e3, 4), e.count // 3)
                                              for e in ka[:45]]
                row["gpu_ms_per_step"] = sum(e.self_device_time_total for e in ka) / 3e3
                row["launches_per_step"] = sum(e.count for e in ka) // 3
            out["rows"].append(row)
            print(json.dumps(row)[:400], flush=True)
            if a.out:  # written as it goes: a run cut by its time limit keeps what it measured
                with open(a.out, "w") as f:
                    json.dump(out, f, indent=1)
        del caches, graphs
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


def graph_sweep(a) -> None:
    """Per batch size B: prefill B sequences to --ctx tokens, then time decode steps eagerly and replayed
    from a captured graph (DecodeGraphs), checking the replayed logits against the eager ones."""
    from dsv4.cache.direct import DirectCache
    from dsv4.engine.cuda_graphs import DecodeGraphs
    from dsv4.model import build_model
    from dsv4.ops.registry import parse_overrides

    lm = build_model("deepseek-v4-flash", device="cuda", dtype="bfloat16", numerics=a.numerics, load_format="dummy",
                     num_layers=a.layers, op_overrides=parse_overrides(a.op))
    out = {"layers": a.layers, "ctx": a.ctx, "numerics": a.numerics, "kv_fp8": a.kv_fp8,
           "device": torch.cuda.get_device_name(), "rows": []}
    g = torch.Generator().manual_seed(0)
    for B in [int(x) for x in a.graph_sweep.split(",")]:
        L = a.ctx
        n_steps = a.steps
        ce, cg, cb = (DirectCache(lm.cfg, B + 1, L + 4 * n_steps + 8, "cuda", torch.bfloat16, kv_fp8=a.kv_fp8)
                      for _ in range(3))
        slots = [[c.add() for _ in range(B)] for c in (ce, cg, cb)][0]  # 0..B-1 in each; slot B: scratch
        for i in range(0, B, 8):
            grp = slots[i:i + 8]
            ids = torch.randint(0, lm.cfg.vocab_size, (L * len(grp),), generator=g).cuda()
            for c in (ce, cg, cb):
                lm.model(ids, c.meta(grp, [0] * len(grp), [L] * len(grp)), c.cache)
        graphs = DecodeGraphs(lm.model, cg.cache, B, max_batch=B, batch_buckets=(B,), min_context=1024)
        pos = L
        te, tg, worst, agree, worst_b = [], [], 0.0, 0, 0.0
        for k in range(n_steps + 2):
            ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g)
            torch.cuda.synchronize()
            t = time.perf_counter()
            want = lm.model.logits(lm.model(ids.cuda(), ce.meta(slots, [pos] * B, [1] * B), ce.cache))
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            got = graphs.run(ids, slots, [pos] * B)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if k >= 2:  # the first two: compilation and capture
                te.append((t1 - t) * 1e3)
                tg.append((t2 - t1) * 1e3)
            worst = max(worst, (got.float() - want.float()).abs().max().item())
            # eager with the graph's context bound: the same launches as the graph, so equal bit for bit
            mb = cb.meta(slots, [pos] * B, [1] * B)
            mb.seq_len_bound = graphs.bucket(B, pos + 1)[1]
            want_b = lm.model.logits(lm.model(ids.cuda(), mb, cb.cache))
            worst_b = max(worst_b, (got.float() - want_b.float()).abs().max().item())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            pos += 1
        row = {"batch": B, "eager_ms": sorted(te)[len(te) // 2], "graph_ms": sorted(tg)[len(tg) // 2],
               "graph_ms_per_layer": sorted(tg)[len(tg) // 2] / a.layers, "max_abs_logit_diff": worst,
               "max_abs_logit_diff_same_bound": worst_b,
               "argmax_agree_frac": agree / (B * (n_steps + 2)), "graphs_captured": len(graphs.graphs)}
        if a.profile_graphs:  # per-kernel GPU time inside the replayed graph
            from torch.profiler import ProfilerActivity, profile

            ids = torch.randint(0, lm.cfg.vocab_size, (B,), generator=g)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    graphs.run(ids, slots, [pos] * B)
                    pos += 1
                torch.cuda.synchronize()
            ka = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
            row["kernels_ms_per_step"] = [(e.key[:70], round(e.device_time_total / 3e3, 4), e.count // 3) for e in ka[:45]]
            row["gpu_ms_per_step"] = sum(e.self_device_time_total for e in ka) / 3e3
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del ce, cg, cb, graphs
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


def engine_profile(a) -> None:
    """LLM.generate of `--batch` prompts of `--ctx` tokens, `--steps` output tokens: per-step wall times of the
    engine (LLMEngine.step), host hot spots (cProfile) and the CUDA kernel table."""
    import cProfile
    import io
    import pstats

    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling_params import SamplingParams

    llm = LLM("deepseek-v4-flash", load_format="dummy", num_layers=a.layers, device="cuda",
              kv_cache_memory=8 << 30, op_overrides=tuple(tuple(o.split("=", 1)) for o in a.op))
    eng = llm.engine
    times = []
    orig = eng.step

    def timed_step():
        t = time.perf_counter()
        out = orig()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        return out

    eng.step = timed_step
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 120000, (a.ctx,), generator=g).tolist() for _ in range(a.batch)]
    sp = SamplingParams(max_tokens=a.steps, temperature=0, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # warm (compiles)
    times.clear()
    pr = cProfile.Profile()
    pr.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    pr.disable()
    print("engine step ms:", [round(t, 1) for t in times], flush=True)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
    print(buf.getvalue()[-9000:], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"engine_step_ms": times}, f)


def profile_table(fn, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    res = {}
    ka = prof.key_averages()
    cuda_rows = sorted((e for e in ka if e.device_time_total > 0), key=lambda e: -e.device_time_total)[:30]
    cpu_rows = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:30]
    res["cuda_top"] = [{"name": e.key[:80], "calls": e.count, "cuda_ms_per_step": e.device_time_total / n / 1e3}
                       for e in cuda_rows]
    res["cpu_top"] = [{"name": e.key[:80], "calls": e.count, "self_cpu_ms_per_step": e.self_cpu_time_total / n / 1e3}
                      for e in cpu_rows]
    res["cuda_total_ms_per_step"] = sum(e.self_device_time_total for e in ka) / n / 1e3
    print("CUDA kernels (ms per step):")
    for r in res["cuda_top"]:
        print(f"  {r['cuda_ms_per_step']:9.3f}  x{r['calls']:<5} {r['name']}")
    print("CPU self time (ms per step):")
    for r in res["cpu_top"]:
        print(f"  {r['self_cpu_ms_per_step']:9.3f}  x{r['calls']:<5} {r['name']}")
    return res


if __name__ == "__main__":
    main()
