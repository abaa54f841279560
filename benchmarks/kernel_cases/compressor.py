"""GPU check cases of the Triton compress_kv provider (dsv4/kernels/triton/compressor.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import H200_BW
from dsv4.kernels.triton.compressor import compress_kv_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.compressor import compress_kv_reference
from dsv4.ops.meta import ForwardMeta


def gpu_check_cases():
    """(name, callable) pairs; each callable runs on a CUDA device at DeepSeek-V4-Flash shapes and returns
    errors vs the reference (entries written, state, prev), the Triton time and the bytes it must move.
    Decode: 256 sequences, one token each, at random positions (a quarter of them completing a window);
    prefill: one 4096-token chunk from position 0 and two 2048-token chunks continuing sequences."""
    cases = []
    for name, d, m, overlap, post, fp8 in (("csa_main", 512, 4, True, "fp8", True),
                                          ("csa_indexer", 128, 4, True, "hadamard_fp4", False),
                                          ("hca", 512, 128, False, "fp8", False)):
        cases.append((f"compressor_decode_b256_{name}",
                      lambda d=d, m=m, o=overlap, p=post, f=fp8: _gpu_case(d, m, o, p, f, "decode")))
        cases.append((f"compressor_prefill_4k_{name}",
                      lambda d=d, m=m, o=overlap, p=post, f=fp8: _gpu_case(d, m, o, p, f, "prefill")))
        cases.append((f"compressor_prefill_2x2k_{name}",
                      lambda d=d, m=m, o=overlap, p=post, f=fp8: _gpu_case(d, m, o, p, f, "prefill2")))
    return cases


def _gpu_case(d, m, overlap, post, fp8, regime, page_tokens=256, seed=0, device="cuda", batch=256, chunk=4096):
    import copy
    import random

    from triton.testing import do_bench as _bench

    from dsv4.ops.kv_format import kv_alloc, kv_read, kv_row_bytes
    from dsv4.ops.rope import rope_inv_freq

    dev = torch.device(device)

    def do_bench(fn, rep):  # no timing in a dry run of the harness (interpreter, CPU tensors)
        return _bench(fn, rep=rep) if dev.type == "cuda" else float("nan")

    rng = random.Random(seed)
    g = torch.Generator(device=dev).manual_seed(seed)
    c = 2 if overlap else 1
    C = c * d
    if regime == "decode":
        B = batch
        starts = []
        for i in range(B):
            p = rng.randrange(16 * m, 16384 if dev.type == "cuda" else 64 * m)
            if i % 4 == 0:
                p = p - p % m + m - 1  # this token completes a window
            starts.append(p)
        news = [1] * B
    elif regime == "prefill":
        B, starts, news = 1, [0], [chunk]
    else:
        B, starts, news = 2, [1000 + 1, 3000 + 3], [chunk // 2, chunk // 2]
    lens = [s + n for s, n in zip(starts, news)]
    E = page_tokens // m
    pps = max(-(-L // page_tokens) for L in lens)
    P = B * pps + 1
    perm = list(range(P))
    rng.shuffle(perm)
    block_table = torch.tensor(perm[: B * pps], dtype=torch.int64, device=dev).view(B, pps)
    meta = ForwardMeta.build(list(range(B)), starts, news, device=dev)
    T = meta.num_tokens
    kv = torch.randn((T, C), generator=g, device=dev)
    score = 2.0 * torch.randn((T, C), generator=g, device=dev)
    ape = 0.7 * torch.randn((m, C), generator=g, device=dev)
    norm_w = 1.0 + 0.3 * torch.randn((d,), generator=g, device=dev)
    inv_freq = rope_inv_freq(160000.0, 64).to(dev)
    state = torch.empty((B, 3, C), device=dev)
    state[:, 0] = torch.randn((B, C), generator=g, device=dev)
    state[:, 1] = 1.0 + 3.0 * torch.rand((B, C), generator=g, device=dev)
    state[:, 2] = torch.randn((B, C), generator=g, device=dev) * state[:, 1]
    for b, p0 in enumerate(starts):
        if p0 % m == 0:  # a window starts with this step: empty accumulator
            state[b, 0], state[b, 1:] = float("-inf"), 0.0
    prev = None
    if overlap:
        prev = torch.empty((B, 3, d), device=dev)
        prev[:, 0] = torch.randn((B, d), generator=g, device=dev)
        prev[:, 1] = 1.0 + 3.0 * torch.rand((B, d), generator=g, device=dev)
        prev[:, 2] = torch.randn((B, d), generator=g, device=dev) * prev[:, 1]
    pool = kv_alloc((P, E), d, 64, fp8, torch.bfloat16, dev)
    args = lambda st, pv, pl: (kv, score, ape, norm_w, inv_freq, st, pv, pl, block_table, meta, m, 1e-6,  # noqa: E731
                               torch.bfloat16, post, Fp8Dialect.OCP)
    st_r, pv_r, pl_r = state.clone(), None if prev is None else prev.clone(), copy.deepcopy(pool)
    st_t, pv_t, pl_t = state.clone(), None if prev is None else prev.clone(), copy.deepcopy(pool)
    compress_kv_reference(*args(st_r, pv_r, pl_r))
    compress_kv_triton(*args(st_t, pv_t, pl_t))
    # the entries this step completes
    ws, ss = [], []
    for b, (p0, p1) in enumerate(zip(starts, lens)):
        for w in range(p0 // m, p1 // m):
            ws.append(w)
            ss.append(b)
    n_new = len(ws)
    res = {"entries": n_new}
    if n_new:
        w_t = torch.tensor(ws, device=dev)
        idx = (block_table[torch.tensor(ss, device=dev), w_t // E], w_t % E)
        a, b_ = kv_read(pl_t, idx).float(), kv_read(pl_r, idx).float()
        err = (a - b_).abs()
        res["entry_max_abs_err"] = err.max().item()
        res["entry_max_rel_err"] = (err.max() / b_.abs().max()).item()
        res["entry_frac_exact"] = (a == b_).float().mean().item()
    st_ok = torch.isfinite(st_r)
    res["state_max_abs_err"] = (st_t[st_ok] - st_r[st_ok]).abs().max().item() if st_ok.any() else 0.0
    res["state_inf_pattern_equal"] = bool(torch.equal(torch.isinf(st_t), torch.isinf(st_r)))
    if overlap:
        res["prev_max_abs_err"] = (pv_t - pv_r).abs().max().item()
    st_b, pv_b, pl_b = state.clone(), None if prev is None else prev.clone(), copy.deepcopy(pool)
    res["triton_ms"] = do_bench(lambda: compress_kv_triton(*args(st_b, pv_b, pl_b)), rep=200)
    row = kv_row_bytes(d, 64, fp8, torch.bfloat16)
    bytes_moved = (2 * T * C * 4 + m * C * 4 + 2 * B * 3 * C * 4 + (2 * B * 3 * d * 4 if overlap else 0)
                   + n_new * (2 * d * 4 + row))
    res.update(bytes=bytes_moved, flops=0, roofline_ms=bytes_moved / H200_BW * 1e3)
    return res
