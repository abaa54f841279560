"""Routed experts against their weight-read floor on one GPU, at DeepSeek-V4-Flash shapes (256 MXFP4 experts,
top-6, hidden 4096, intermediate 2048), official numerics (activations rounded through FP8 per 1x128):

  triton            dsv4's Triton moe_experts (FP4 decoded in registers / tl.dot_scaled)
  humming           the humming-kernels W4A16 provider (dsv4/kernels/vendor/humming_moe.py), no stream-K
  humming-streamk   the same with humming's stream-K allowed (partial sums added in bf16)
  humming-w4a8-gu   gate-up only: humming W4A8 fed dsv4's own FP8 activations + power-of-two 1x128 scales
  humming-w4a16-gu  gate-up only, W4A16 (the pair above compares the two GEMM modes alone)
  scaled-grouped-mm torch._scaled_grouped_mm on FP8 (rowwise) copies of the experts, both GEMMs only,
                    inputs grouped beforehand: a yardstick (twice the weight bytes), not a provider

Per T: the experts touched, their bytes (FP4 + E8M0 of w13 and w2; gate-up only rows count w13 only), the
floor = bytes / measured copy bandwidth, median time (do_bench), ratio to the floor, TFLOP/s. Every path is
checked against the reference (max |err| / max |ref|). Also: CUDA-graph replay of the humming provider
(captured at one routing, replayed at another, vs eager), and the Triton MoE at dense bf16 / FP4 experts
over several hidden / intermediate sizes (the shared-memory fix).

    pip install --no-deps humming-kernels==0.1.20   # or carry the wheel
    PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/moe_floor.py --out $OUT/moe_floor.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

D, I, E, K_TOP = 4096, 2048, 256, 6
LIMIT = 10.0


def _record(rows: list, r: dict) -> None:
    rows.append(r)
    print(json.dumps(r), flush=True)


def _rel(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def copy_bandwidth() -> float:
    """Device copy rate in bytes/s counting read + write (2 GiB buffers, larger than L2)."""
    from triton.testing import do_bench

    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * (2 << 30) / (ms * 1e-3)


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
def sweep(tokens, paths, rows, bw) -> None:
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.kernels.vendor import humming_moe as hm
    from dsv4.ops.moe import moe_experts_reference

    w13, s13, w2, s2 = km._fp4_experts(E, D, I, "cuda")
    per_expert = w13[0].numel() + s13[0].numel() + w2[0].numel() + s2[0].numel()
    per_expert_gu = w13[0].numel() + s13[0].numel()
    fp8 = None
    if "scaled-grouped-mm" in paths:  # FP8 copies (rowwise scales) of random weights of similar magnitude
        g = torch.Generator(device="cuda").manual_seed(9)
        f13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.02).to(torch.float8_e4m3fn)
        f2 = (torch.randn(E, D, I, device="cuda", generator=g) * 0.02).to(torch.float8_e4m3fn)
        fp8 = (f13, torch.ones(E, 2 * I, device="cuda"), f2, torch.ones(E, D, device="cuda"))
    w4a8 = None
    for T in tokens:
        x, ids, w = None, None, None
        g = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids, w = km._route_inputs(T, E, K_TOP, "cuda", seed=T + 1)
        flops = 2.0 * T * K_TOP * 3 * I * D
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)

        def full(path, fn):
            try:
                got = fn()
                err = _rel(got, want)
                us = do_bench(fn, return_mode="median") * 1e3
                _record(rows, floor_row(T, path, us, ids, per_expert, bw, flops, rel_err=err))
            except Exception as e:  # record and go on
                _record(rows, {"T": T, "path": path, "error": f"{type(e).__name__}: {str(e)[-800:]}",
                               "trace": traceback.format_exc()[-1500:]})

        if "triton" in paths:
            full("triton", lambda: km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True))
        for name, inv in (("humming", True), ("humming-streamk", False)):
            if name in paths:
                hm.BATCH_INVARIANT = inv
                hm._CACHE.clear()
                full(name, lambda: hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True))
        hm.BATCH_INVARIANT = True
        hm._CACHE.clear()
        if "humming-w4a8-gu" in paths or "humming-w4a16-gu" in paths:
            try:
                w4a8 = gate_up_modes(T, x, ids, w13, s13, per_expert_gu, bw, rows, w4a8, paths)
            except Exception as e:
                _record(rows, {"T": T, "path": "humming-gu", "error": f"{type(e).__name__}: {str(e)[-800:]}",
                               "trace": traceback.format_exc()[-1500:]})
        if fp8 is not None:
            try:
                run = scaled_grouped(x, ids, w, *fp8)
                run()
                us = do_bench(run, return_mode="median") * 1e3
                _record(rows, floor_row(T, "scaled-grouped-mm", us, ids, per_expert, bw, flops,
                                        note="FP8 weights (2x the bytes of FP4); GEMMs only"))
            except Exception as e:
                _record(rows, {"T": T, "path": "scaled-grouped-mm", "error": f"{type(e).__name__}: {str(e)[-800:]}"})
        torch.cuda.empty_cache()


def gate_up_modes(T, x, ids, w13, s13, per_expert_gu, bw, rows, w4a8, paths):
    """Gate-up alone: humming W4A8 (dsv4's FP8 activations, power-of-two 1x128 scales) and W4A16 on the
    FP8-rounded activations, both against the reference gate-up rows."""
    from triton.testing import do_bench

    from dsv4.kernels.triton import moe as km
    from dsv4.kernels.triton.gemm import act_quant_into
    from dsv4.kernels.vendor import humming_moe as hm
    from dsv4.numerics.fp8 import e8m0_to_float
    from dsv4.ops.linear import linear_reference

    hmods = hm._humming()
    if w4a8 is None:
        ws = hmods["weight_schema"](b_dtype="float4e2m1", bs_dtype="float8e8m0", weight_scale_group_size=32)
        ins = hmods["input_schema"](a_dtype="float8e4m3", input_scale_group_size=128)
        t = {"weight": w13.view(torch.int32), "weight_scale": s13.view(torch.float8_e8m0fnu)}
        cfg = hmods["prepare_config"](shape_n=2 * I, shape_k=D, weight_schema=ws, input_schema=ins, num_experts=E,
                                      torch_dtype=torch.bfloat16, device=w13.device, tensors=t)
        cfg, t = hmods["prepare_scale"](cfg, t)
        w4a8 = (cfg, hmods["transform"](cfg, t, allow_inplace=False), torch.zeros(2048, dtype=torch.int32,
                                                                                   device="cuda"))
    cfg8, t8, locks8 = w4a8
    N = T * K_TOP
    g16 = hm.prepared(w13, s13)
    xr = km.act_roundtrip(x)
    ref = torch.empty(N, 2 * I, dtype=torch.bfloat16, device="cuda")
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        p = torch.nonzero(flat == e).flatten()
        ref[p] = linear_reference(xr[p // K_TOP], w13[e], s13[e]).bfloat16()
    flops = 2.0 * N * 2 * I * D
    emap = hm.ExpertMap.identity(E)
    if "humming-w4a16-gu" in paths:
        d16 = hm._slots_for(ids, emap, g16.block_m(N))
        out16 = torch.empty(N, 2 * I, dtype=torch.bfloat16, device="cuda")

        def f16():
            return g16(xr, K_TOP, *d16, out=out16)
        err = _rel(f16(), ref)
        us = do_bench(f16, return_mode="median") * 1e3
        _record(rows, floor_row(T, "humming-w4a16-gu", us, ids, per_expert_gu, bw, flops, rel_err=err))
    if "humming-w4a8-gu" in paths:
        q = torch.empty(T, D, dtype=torch.uint8, device="cuda")
        sb = torch.empty(T, D // 128, dtype=torch.uint8, device="cuda")
        act_quant_into(x, q, sb)
        sf = e8m0_to_float(sb).contiguous()
        qf = q.view(torch.float8_e4m3fn)
        cc = {"gemm_type": "indexed", "use_batch_invariant": True}
        c = hmods["heuristics"](cfg8, shape_m=N, use_batch_invariant=True, gemm_type="indexed", device=x.device)
        d8 = hm._slots_for(ids, emap, int(c["block_shape"][0]))
        out8 = torch.empty(N, 2 * I, dtype=torch.bfloat16, device="cuda")

        def f8():
            return hmods["forward"](cfg8, inputs=qf, weight=t8["weight"], weight_scale=t8.get("weight_scale"),
                                    weight_scale_2=t8.get("weight_scale_2"), outputs=out8, input_scale=sf,
                                    sorted_ids=d8[0], expert_ids=d8[1], num_tokens_padded=d8[2], locks=locks8,
                                    top_k=K_TOP, compute_config=cc)
        err = _rel(f8(), ref)
        us = do_bench(f8, return_mode="median") * 1e3
        _record(rows, floor_row(T, "humming-w4a8-gu", us, ids, per_expert_gu, bw, flops, rel_err=err,
                                weight_scale_2=None if t8.get("weight_scale_2") is None
                                else list(t8["weight_scale_2"].shape)))
    return w4a8


@torch.no_grad()
def graph_check(rows) -> None:
    """The humming provider captured in a CUDA graph at one routing, replayed at two others: equal to eager."""
    from dsv4.kernels.triton import moe as km
    from dsv4.kernels.vendor import humming_moe as hm

    w13, s13, w2, s2 = km._fp4_experts(E, D, I, "cuda")
    for T in (1, 64):
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids, w = km._route_inputs(T, E, K_TOP, "cuda", seed=5)
        hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True)  # compile + transform, eagerly
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True)
        res = []
        for seed in (6, 7):
            ids2, w2_ = km._route_inputs(T, E, K_TOP, "cuda", seed=seed)
            ids.copy_(ids2)
            w.copy_(w2_)
            x.copy_(torch.randn(T, D, device="cuda").bfloat16())
            graph.replay()
            eager = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True)
            res.append(bool(torch.equal(out, eager)))
        _record(rows, {"check": "graph", "T": T, "replay_equals_eager": res})


@torch.no_grad()
def smem_check(rows) -> None:
    """The Triton MoE at bf16 dense and FP4 experts over several sizes (prefill tiles asked an H200 for
    more shared memory than it has with bf16 dense experts)."""
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
                ids, w = km._route_inputs(T, e, 4, "cuda", seed=T)
                x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
                r = {"check": "smem", "fmt": fmt, "D": d, "I": i, "E": e, "T": T}
                try:
                    for aq in (False, True):
                        got = km.moe_experts_triton(x, a, sa, b, sb, ids, w, LIMIT, aq)
                        r[f"rel_err_aq{int(aq)}"] = _rel(got, moe_experts_reference(x, a, sa, b, sb, ids, w, LIMIT, aq))
                except Exception as ex:
                    r["error"] = f"{type(ex).__name__}: {str(ex)[-600:]}"
                _record(rows, r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192")
    ap.add_argument("--paths", default="triton,humming,humming-streamk,humming-w4a16-gu,humming-w4a8-gu,"
                    "scaled-grouped-mm")
    ap.add_argument("--checks", default="graph,smem")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows: list[dict] = []
    t0 = time.time()
    bw = copy_bandwidth()
    _record(rows, {"copy_bandwidth_TBps": bw / 1e12})
    try:
        sweep([int(t) for t in a.tokens.split(",")], set(a.paths.split(",")), rows, bw)
        if "graph" in a.checks:
            try:
                graph_check(rows)
            except Exception as e:
                _record(rows, {"check": "graph", "error": f"{type(e).__name__}: {str(e)[-800:]}",
                               "trace": traceback.format_exc()[-1500:]})
        if "smem" in a.checks:
            smem_check(rows)
    finally:
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
