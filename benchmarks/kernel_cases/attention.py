"""GPU check cases of the Triton sparse_attention / write_window providers (dsv4/kernels/triton/attention.py)
at DeepSeek-V4-Flash shapes, with launch-configuration and split-KV sweeps (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch
import triton
import triton.testing

from benchmarks.kernel_cases.common import H200_BW, H200_FLOPS
from dsv4.kernels.triton.attention import (CONFIG, _auto_splits, sparse_attention_impl, sparse_attention_triton,
                                           write_window_triton)
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.meta import ForwardMeta


def _fill_store(store, gen_rows, n: int, chunk: int = 1 << 18):
    """Write random rows (randn, shaped [rows, D]) into a flat view of the store's lead dims."""
    from dsv4.ops.kv_format import kv_write

    lead = store.shape[:-1]
    flat_idx = torch.arange(n, device=store.device)
    for a in range(0, n, chunk):
        ids = flat_idx[a:a + chunk]
        idx = tuple(torch.unravel_index(ids, lead))
        kv_write(store, idx, gen_rows(ids.numel()))


def _gpu_case(mode: str, batch: int, ctx: int, kv_kind: str, prefill: bool = False, sweep=None, *,
              device: str = "cuda", H: int = 64, D: int = 512, r: int = 64, W: int = 128, K: int = 512,
              page_tokens: int = 256, hca_ratio: int = 128, bench: bool = True, timer=None):
    """Decode: `batch` sequences at context `ctx` (one new token each, at position ctx - 1). Prefill:
    one sequence, `batch` new tokens ending at `ctx`. Real Flash shapes by default; the keyword
    arguments shrink it for a CPU smoke test (bench=False: no timing). timer(fn) -> ms: the median of
    triton.testing.do_bench by default (do_bench_cudagraph measures the GPU time of small launches)."""
    if timer is None:
        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731

    def run():
        from dsv4.ops.attention import sparse_attention_reference
        from dsv4.ops.kv_format import kv_alloc, kv_row_bytes

        dev = torch.device(device)
        torch.manual_seed(0)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        fp8 = kv_kind != "bf16"
        dialect = Fp8Dialect.FNUZ if kv_kind == "fp8-fnuz" else Fp8Dialect.OCP
        ratio = {"csa": 4, "hca": hca_ratio, "swa": 0}[mode]
        if prefill:
            slots, starts, news = [0], [ctx - batch], [batch]
        else:
            slots, starts, news = list(range(batch)), [ctx - 1] * batch, [1] * batch
        nseq = len(slots)
        meta = ForwardMeta.build(slots, starts, news, device=dev)
        T = meta.num_tokens
        q = torch.randn(T, H, D, device=dev, dtype=dt)
        kv = torch.randn(T, D, device=dev, dtype=dt)
        sink = torch.randn(H, device=dev)
        window = kv_alloc((nseq, W), D, r, fp8, dt, dev, dialect)
        _fill_store(window, lambda n: torch.randn(n, D, device=dev), nseq * W)
        pool = bt = topk = None
        n_ent = ctx // ratio if ratio else 0
        if ratio:
            E = page_tokens // ratio
            pps = triton.cdiv(ctx, page_tokens)
            P = min(nseq * pps, max(pps, (1 << 21) // E))  # physical pages capped at ~2M entries (>> L2)
            pool = kv_alloc((P, E), D, r, fp8, dt, dev, dialect)
            _fill_store(pool, lambda n: torch.randn(n, D, device=dev), P * E)
            bt = torch.randint(0, P, (nseq, pps), device=dev, dtype=torch.int64)
            if mode == "csa":  # top-K random distinct visible entries per query, -1 where fewer exist
                vis = (meta.positions + 1) // ratio
                score = torch.rand(T, max(n_ent, 1), device=dev)
                ar = torch.arange(score.shape[1], device=dev)
                score = score.masked_fill(ar[None, :] >= vis[:, None], -1.0)
                k = min(K, score.shape[1])
                val, ids = score.topk(k, dim=-1)
                topk = torch.full((T, K), -1, dtype=torch.int64, device=dev)
                topk[:, :k] = torch.where(val < 0, torch.full_like(ids, -1), ids)
        scale = D ** -0.5
        args = (q, kv, window, sink, scale, meta, pool, bt, topk, ratio)
        out = sparse_attention_triton(*args)
        ref = sparse_attention_reference(*args)
        err = (out.float() - ref.float()).abs()
        res = {"max_abs_err": err.max().item(), "max_rel_err": (err.max() / ref.float().abs().max()).item(),
               "mean_abs_err": err.mean().item()}
        # what must move: q, output, and for each query its keys (window rows + valid compressed rows);
        # FLOPs: 2 dots of 2 * H * D per (query, key)
        pos = meta.positions
        n_win = torch.clamp(pos + 1, max=W)
        if mode == "csa":
            n_cmp = (topk >= 0).sum(dim=1)
        elif mode == "hca":
            n_cmp = (pos + 1) // ratio
        else:
            n_cmp = torch.zeros_like(pos)
        keys_per_query = int((n_win + n_cmp).sum().item())
        row_b = kv_row_bytes(D, r, fp8, dt)
        elt = q.element_size()
        if prefill:  # keys are shared by the queries of one sequence: each unique row counted once
            ring_rows = min(W - 1, starts[0])
            uniq_cmp = int(torch.unique(topk[topk >= 0]).numel()) if mode == "csa" else n_ent
            key_bytes = T * D * elt + (ring_rows + uniq_cmp) * row_b
        else:  # one fresh kv row per query (from `kv`), the rest of its window from the ring
            key_bytes = T * D * elt + int((n_win - 1).sum().item()) * row_b + int(n_cmp.sum().item()) * row_b
        bytes_moved = 2 * T * H * D * elt + key_bytes + (T * K * 8 if mode == "csa" else 0)
        flops = 4 * H * D * keys_per_query
        floor_s = max(bytes_moved / H200_BW, flops / H200_FLOPS)
        res.update(bytes=bytes_moved, flops=flops, floor_us=floor_s * 1e6, keys_per_query_avg=keys_per_query / T,
                   num_splits=_auto_splits(dev, T * triton.cdiv(H, CONFIG["BLOCK_H"]),
                                           W + (K if mode == "csa" else n_ent)))
        if bench:
            ms = timer(lambda: sparse_attention_triton(*args))
            res.update(time_ms=ms, frac_roofline=floor_s / (ms * 1e-3))
        for cfg in sweep or []:
            f = lambda c=cfg: sparse_attention_impl(*args, **c)  # noqa: E731
            try:
                e2 = (f().float() - ref.float()).abs().max().item()
                res[f"sweep {cfg}"] = {"max_abs_err": e2}
                if bench:
                    res[f"sweep {cfg}"]["time_ms"] = timer(f)
            except Exception as e:  # e.g. out of shared memory / registers for a large config
                res[f"sweep {cfg}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        return res

    return run


def _gpu_write_case(batch: int, n_new: int, kv_kind: str, *, device: str = "cuda", D: int = 512, r: int = 64,
                    W: int = 128, bench: bool = True):
    def run():
        from dsv4.ops.attention import write_window
        from dsv4.ops.kv_format import kv_alloc, kv_row_bytes

        dev = torch.device(device)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        fp8 = kv_kind != "bf16"
        dialect = Fp8Dialect.FNUZ if kv_kind == "fp8-fnuz" else Fp8Dialect.OCP
        meta = ForwardMeta.build(list(range(batch)), [1000] * batch, [n_new] * batch, device=dev)
        kv = torch.randn(meta.num_tokens, D, device=dev, dtype=dt)
        a = kv_alloc((batch, W), D, r, fp8, dt, dev, dialect)
        b = kv_alloc((batch, W), D, r, fp8, dt, dev, dialect)
        write_window_triton(a, kv, meta)
        write_window(b, kv, meta)
        if fp8:
            pz = lambda x: torch.where(x == 0x80, torch.zeros_like(x), x)  # noqa: E731  (-0 is stored as +0)
            same = torch.equal(pz(a.nope), pz(b.nope)) and torch.equal(a.scale, b.scale) and torch.equal(a.rope, b.rope)
        else:
            same = torch.equal(a, b)
        rows = batch * min(W, n_new)
        byts = rows * (D * kv.element_size() + kv_row_bytes(D, r, fp8, dt))
        res = {"bytes_equal_reference": bool(same), "bytes": byts}
        if bench:
            ms = triton.testing.do_bench(lambda: write_window_triton(a, kv, meta), return_mode="median")
            res.update(time_ms=ms, frac_roofline=byts / H200_BW / (ms * 1e-3))
        return res

    return run


def gpu_check_cases():
    """[(name, callable)]: real DeepSeek-V4-Flash shapes (64 heads x 512, rope 64, window 128, CSA top-512
    of 1 entry / 4 tokens, HCA 1 / 128, pages of 256 tokens). Each callable returns errors vs the
    reference, the Triton time (do_bench median, ms), bytes moved / FLOPs and the fraction of the H200
    roofline (4.8e12 B/s, 790e12 bf16 FLOP/s)."""
    cases = []
    sw = [dict(block_h=16, block_n=32, num_warps=4), dict(block_h=16, block_n=32, num_warps=8),
          dict(block_h=32, block_n=32, num_warps=8), dict(block_h=16, block_n=64, num_warps=8),
          dict(block_h=64, block_n=16, num_warps=8), dict(block_h=64, block_n=32, num_warps=8),
          dict(block_h=16, block_n=16, num_warps=4)]
    for mode in ("csa", "hca"):
        for batch in (1, 64, 256):
            for ctx in (1024, 16384, 131072):
                sweep = sw if (mode, batch, ctx) in (("csa", 64, 16384), ("hca", 1, 131072)) else None
                if batch == 1 and ctx == 131072:  # split-KV count (auto: see _auto_splits)
                    sweep = (sweep or []) + [dict(num_splits=n) for n in (1, 4, 8, 16, 32)]
                cases.append((f"attn decode {mode} fp8 b{batch} ctx{ctx}",
                              _gpu_case(mode, batch, ctx, "fp8", sweep=sweep)))
        cases.append((f"attn decode {mode} bf16 b64 ctx16384", _gpu_case(mode, 64, 16384, "bf16", sweep=sw[:3])))
        cases.append((f"attn decode {mode} fp8-fnuz b64 ctx16384", _gpu_case(mode, 64, 16384, "fp8-fnuz")))
    cases.append(("attn decode swa bf16 b256 ctx16384", _gpu_case("swa", 256, 16384, "bf16")))
    for mode in ("csa", "hca", "swa"):
        for kind in ("bf16", "fp8"):
            sweep = sw[:4] if mode == "csa" else None
            cases.append((f"attn prefill {mode} {kind} 4096 tokens ctx4096",
                          _gpu_case(mode, 4096, 4096, kind, prefill=True, sweep=sweep)))
    for kind in ("bf16", "fp8", "fp8-fnuz"):
        cases.append((f"write_window decode b256 {kind}", _gpu_write_case(256, 1, kind)))
    cases.append(("write_window prefill 4096 fp8", _gpu_write_case(1, 4096, "fp8")))
    return cases
