"""Routed experts against their weight-read floor on one GPU, at DeepSeek-V4-Flash shapes (256 MXFP4 experts,
top-6, hidden 4096, intermediate 2048), official numerics (activations rounded through FP8 per 1x128):

  triton            dsv4's Triton moe_experts (FP4 decoded in registers / tl.dot_scaled)
  triton-w4a8       dsv4's opt-in W4A8 provider (FP4 turned into exact e4m3 operands in-kernel, FP8 dots)
  humming-w4a16     the humming-kernels provider (dsv4/kernels/vendor/humming_moe.py) in W4A16 mode
  humming-w4a8      the same in W4A8 mode (dsv4's own FP8 activations, power-of-two 1x128 scales)
  humming-streamk   W4A16 with humming's stream-K allowed (partial sums added in bf16: lossy; eager)
  scaled-grouped-mm torch._scaled_grouped_mm on FP8 (rowwise) copies of the experts, both GEMMs only,
                    inputs grouped beforehand: a yardstick (twice the weight bytes), not a provider
Times are CUDA-graph replays of the whole call (dispatch, quantisation, GEMMs, SwiGLU, combine), as a decode
step runs it: eager timing of these pipelines at small T measures Python launch overhead, not the GPU.

Per T: the experts touched, their bytes (FP4 + E8M0 of w13 and w2; gate-up only rows count w13 only), the
floor = bytes / measured copy bandwidth, median time (do_bench), ratio to the floor, TFLOP/s. Every path is
checked against the reference (max |err| / max |ref|). Also: CUDA-graph replay of the humming provider
(captured at one routing, replayed at another, vs eager), W4A8 exactness against the spread of 32-block
scales in a row (the load-time window check), and the Triton MoE at dense bf16 / FP4 experts over several
hidden / intermediate sizes (the shared-memory fix).

    pip install --no-deps humming-kernels==0.1.20   # or carry the wheel
    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/moe_floor.py --out $OUT/moe_floor.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from benchmarks.kernel_cases.common import copy_bandwidth

D, I, E, K_TOP = 4096, 2048, 256, 6
LIMIT = 10.0


def _record(rows: list, r: dict) -> None:
    rows.append(r)
    print(json.dumps(r), flush=True)


def _rel(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def capture(fn):
    """(graph, its output): fn run eagerly once on a side stream (compiles kernels, builds lazy caches),
    then captured in a CUDA graph."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def graph_us(fn) -> float:
    """Median replay time (us) of fn captured in a CUDA graph."""
    from triton.testing import do_bench

    return do_bench(capture(fn)[0].replay, return_mode="median") * 1e3


def floor_row(T: int, path: str, us: float, ids, per_expert: int, bw: float, flops: float, **extra) -> dict:
    uniq = int(torch.unique(ids).numel())
    byt = uniq * per_expert
    floor_us = byt / bw * 1e6
    return {"T": T, "path": path, "us": us, "floor_us": floor_us, "ratio": us / floor_us, "experts_hit": uniq,
            "weight_bytes": byt, "tflops": flops / (us * 1e-6) / 1e12, **extra}


def scaled_grouped(x, ids, w, f13, s13f, f2, s2f):
    """Grouped inputs (eager, untimed) and a closure running both FP8 GEMMs (timed)."""
    T = x.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xg = x[order // K_TOP].float()
    sa = xg.abs().amax(dim=1).clamp_min(1e-4) / 448.0
    a = (xg / sa[:, None]).to(torch.float8_e4m3fn)
    h = torch.empty(T * K_TOP, I, dtype=torch.bfloat16, device="cuda").normal_().to(torch.float8_e4m3fn)
    sh = torch.ones(T * K_TOP, device="cuda")

    def run():
        gu = torch._scaled_grouped_mm(a, f13.transpose(-2, -1), sa, s13f, offs=offs, out_dtype=torch.bfloat16)
        return gu, torch._scaled_grouped_mm(h, f2.transpose(-2, -1), sh, s2f, offs=offs, out_dtype=torch.bfloat16)
    return run


@torch.no_grad()
def parse_tiles(spec: str) -> list[dict]:
    """'64x128w8s3,128x128w8,64x128w8a0' -> launch options of the W4A8 provider (block_m, block_n, num_warps,
    [num_stages], [use_asm: a0 = the Triton-arithmetic FP4 conversion instead of the PTX one])."""
    import re

    out = []
    for t in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)w(\d+)(?:s(\d+))?(?:a([01]))?", t)
        if m is None:
            raise ValueError(f"--w4a8-tiles: {t!r} is not BMxBNwW[sS][a0|a1]")
        opt = {"block_m": int(m[1]), "block_n": int(m[2]), "num_warps": int(m[3])}
        if m[4]:
            opt["num_stages"] = int(m[4])
        if m[5]:
            opt["use_asm"] = m[5] == "1"
        out.append(opt)
    return out


def sweep(tokens, paths, rows, bw, w4a8_tiles=()) -> None:
    from triton.testing import do_bench

    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.triton import moe as km
    from dsv4.kernels.vendor import humming_moe as hm
    from dsv4.ops.moe import moe_experts_reference

    w13, s13, w2, s2 = kc._fp4_experts(E, D, I, "cuda")
    per_expert = w13[0].numel() + s13[0].numel() + w2[0].numel() + s2[0].numel()
    fp8 = None
    if "scaled-grouped-mm" in paths:  # FP8 copies (rowwise scales) of random weights of similar magnitude
        g = torch.Generator(device="cuda").manual_seed(9)
        f13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.02).to(torch.float8_e4m3fn)
        f2 = (torch.randn(E, D, I, device="cuda", generator=g) * 0.02).to(torch.float8_e4m3fn)
        fp8 = (f13, torch.ones(E, 2 * I, device="cuda"), f2, torch.ones(E, D, device="cuda"))
    for T in tokens:
        x, ids, w = None, None, None
        g = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids, w = kc._route_inputs(T, E, K_TOP, "cuda", seed=T + 1)
        flops = 2.0 * T * K_TOP * 3 * I * D
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)

        def full(path, fn, graphs=True):
            try:
                got = fn()
                err = _rel(got, want)
                us = graph_us(fn) if graphs else do_bench(fn, return_mode="median") * 1e3
                _record(rows, floor_row(T, path, us, ids, per_expert, bw, flops, rel_err=err,
                                        timing="graph" if graphs else "eager"))
            except Exception as e:  # record and go on
                _record(rows, {"T": T, "path": path, "error": f"{type(e).__name__}: {str(e)[-800:]}",
                               "trace": traceback.format_exc()[-1500:]})

        if "triton" in paths:
            full("triton", lambda: km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True))
        if "triton-w4a8" in paths:  # its first (eager) call prepares the offsets, before graph_us captures
            from dsv4.kernels.triton import moe_w4a8 as kw

            full("triton-w4a8", lambda: kw.moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True))
            for opt in w4a8_tiles:
                tag = "triton-w4a8[{block_m}x{block_n}w{num_warps}s{}a{}]".format(
                    opt.get("num_stages", "-"), int(opt.get("use_asm", True)), **opt)
                full(tag, lambda: kw.moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, **opt))
        for name, a8 in (("humming-w4a16", False), ("humming-w4a8", True)):
            if name in paths:
                full(name, lambda: hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=a8))
        if "humming-streamk" in paths:
            hm.BATCH_INVARIANT = False
            hm._CACHE.clear()
            full("humming-streamk", lambda: hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=False),
                 graphs=False)
            hm.BATCH_INVARIANT = True
            hm._CACHE.clear()
        if fp8 is not None:
            try:
                run = scaled_grouped(x, ids, w, *fp8)
                run()
                us = graph_us(run)
                _record(rows, floor_row(T, "scaled-grouped-mm", us, ids, per_expert, bw, flops, timing="graph",
                                        note="FP8 weights (2x the bytes of FP4); GEMMs only"))
            except Exception as e:
                _record(rows, {"T": T, "path": "scaled-grouped-mm", "error": f"{type(e).__name__}: {str(e)[-800:]}"})
        torch.cuda.empty_cache()


@torch.no_grad()
def graph_check(rows) -> None:
    """The humming provider captured in a CUDA graph at one routing, replayed at two others: equal to eager."""
    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.vendor import humming_moe as hm

    w13, s13, w2, s2 = kc._fp4_experts(E, D, I, "cuda")
    for T, a8 in ((1, False), (64, False), (1, True), (64, True)):
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids, w = kc._route_inputs(T, E, K_TOP, "cuda", seed=5)
        graph, out = capture(lambda: hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=a8))
        res = []
        for seed in (6, 7):
            ids2, w2_ = kc._route_inputs(T, E, K_TOP, "cuda", seed=seed)
            ids.copy_(ids2)
            w.copy_(w2_)
            x.copy_(torch.randn(T, D, device="cuda").bfloat16())
            graph.replay()
            eager = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=a8)
            res.append(bool(torch.equal(out, eager)))
        _record(rows, {"check": "graph", "T": T, "a8": a8, "replay_equals_eager": res})


@torch.no_grad()
def window_check(rows) -> None:
    """W4A8 vs W4A16 vs the reference on experts whose 32-block scales spread over `spread` binades in every
    row (bytes 127 - spread .. 127, codes random): W4A8 must match as well as W4A16 up to the window
    (hm.W4A8_SCALE_WINDOW) and the check must refuse beyond it."""
    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.vendor import humming_moe as hm
    from dsv4.ops.moe import moe_experts_reference

    e, d, i, T = 16, 1024, 512, 64
    window = hm.W4A8_SCALE_WINDOW
    for spread in (0, 6, window, window + 1, window + 5):
        g = torch.Generator(device="cuda").manual_seed(spread)
        w13 = torch.randint(0, 256, (e, 2 * i, d // 2), dtype=torch.uint8, device="cuda", generator=g)
        w2 = torch.randint(0, 256, (e, d, i // 2), dtype=torch.uint8, device="cuda", generator=g)
        s13 = (127 - torch.randint(0, spread + 1, (e, 2 * i, d // 32), device="cuda", generator=g)).to(torch.uint8)
        s2 = (127 - torch.randint(0, spread + 1, (e, d, i // 32), device="cuda", generator=g)).to(torch.uint8)
        s13[:, :, 0], s13[:, :, 1] = 127, 127 - spread  # every row spans the whole spread
        s2[:, :, 0], s2[:, :, 1] = 127, 127 - spread
        x = (torch.randn(T, d, device="cuda", generator=g) * 0.05).bfloat16()
        ids, w = kc._route_inputs(T, e, 4, "cuda", seed=spread)
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)
        r = {"check": "w4a8-window", "spread": spread, "window_ok": hm.scale_window_ok(w13, s13)}
        try:
            r["rel_err_w4a16"] = _rel(hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=False), want)
            hm.W4A8_SCALE_WINDOW = 99  # force the transform, to see what it does beyond the window
            hm._CACHE.clear()
            r["rel_err_w4a8"] = _rel(hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=True), want)
        except Exception as ex:
            r["error"] = f"{type(ex).__name__}: {str(ex)[-600:]}"
        finally:
            hm.W4A8_SCALE_WINDOW = window
            hm._CACHE.clear()
        _record(rows, r)


@torch.no_grad()
def smem_check(rows) -> None:
    """The Triton MoE at bf16 dense and FP4 experts over several sizes (prefill tiles asked an H200 for
    more shared memory than it has with bf16 dense experts)."""
    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.triton import moe as km
    from dsv4.numerics.fp4 import quantize_fp4_blocks
    from dsv4.ops.moe import moe_experts_reference

    for (d, i, e) in [(1024, 256, 16), (2048, 512, 16), (4096, 2048, 8), (7168, 1536, 8)]:
        for fmt in ("bf16", "fp4"):
            g = torch.Generator(device="cuda").manual_seed(d + i)
            a = torch.randn(e, 2 * i, d, device="cuda", generator=g) * 0.05
            b = torch.randn(e, d, i, device="cuda", generator=g) * 0.05
            if fmt == "fp4":
                a, sa = quantize_fp4_blocks(a, 32)
                b, sb = quantize_fp4_blocks(b, 32)
            else:
                a, b, sa, sb = a.bfloat16(), b.bfloat16(), None, None
            for T in (1, 64, 4096):
                ids, w = kc._route_inputs(T, e, 4, "cuda", seed=T)
                x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
                r = {"check": "smem", "fmt": fmt, "D": d, "I": i, "E": e, "T": T}
                try:
                    for aq in (False, True):
                        got = km.moe_experts_triton(x, a, sa, b, sb, ids, w, LIMIT, aq)
                        r[f"rel_err_aq{int(aq)}"] = _rel(got, moe_experts_reference(x, a, sa, b, sb, ids, w, LIMIT, aq))
                except Exception as ex:
                    r["error"] = f"{type(ex).__name__}: {str(ex)[-600:]}"
                _record(rows, r)


@torch.no_grad()
def profile(tokens, rows) -> None:
    """Kernel table of the humming provider's graph replay (W4A16 and W4A8) at each T: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.kernel_cases import moe as kc
    from dsv4.kernels.vendor import humming_moe as hm

    w13, s13, w2, s2 = kc._fp4_experts(E, D, I, "cuda")
    for T in tokens:
        for a8 in (False, True):
            x = torch.randn(T, D, device="cuda").bfloat16()
            ids, w = kc._route_inputs(T, E, K_TOP, "cuda", seed=3)

            def fn():
                return hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, a8=a8)
            g, _ = capture(fn)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    g.replay()
                torch.cuda.synchronize()
            kern = {}
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    kern[ev.key[:80]] = round(ev.device_time_total / 20, 2)
            _record(rows, {"check": "profile", "T": T, "a8": a8, "kernels_us": dict(sorted(kern.items(),
                                                                                          key=lambda kv: -kv[1]))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192")
    ap.add_argument("--paths", default="triton,triton-w4a8,humming-w4a16,humming-w4a8,scaled-grouped-mm")
    ap.add_argument("--checks", default="graph,window,smem")
    ap.add_argument("--w4a8-tiles", default="", help="extra launch variants of triton-w4a8, e.g. 64x128w8s3,128x128w8")
    ap.add_argument("--profile", default="", help="T values: kernel table of the humming provider's replay only")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.profile:
        rows = []
        profile([int(t) for t in a.profile.split(",")], rows)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
    rows: list[dict] = []
    t0 = time.time()
    bw = copy_bandwidth()
    _record(rows, {"copy_bandwidth_TBps": bw / 1e12})
    try:
        sweep([int(t) for t in a.tokens.split(",")], set(a.paths.split(",")), rows, bw, parse_tiles(a.w4a8_tiles))
        if "graph" in a.checks:
            try:
                graph_check(rows)
            except Exception as e:
                _record(rows, {"check": "graph", "error": f"{type(e).__name__}: {str(e)[-800:]}",
                               "trace": traceback.format_exc()[-1500:]})
        if "window" in a.checks:
            window_check(rows)
        if "smem" in a.checks:
            smem_check(rows)
    finally:
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
