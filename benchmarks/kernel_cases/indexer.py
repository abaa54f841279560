"""GPU check cases of the Triton indexer_topk provider (dsv4/kernels/triton/indexer.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import H200_BW, H200_FLOPS
from dsv4.kernels.triton.indexer import MAX_SCORE_BYTES, indexer_scores_triton, indexer_topk_triton
from dsv4.ops.indexer import indexer_topk_reference
from dsv4.ops.meta import ForwardMeta


def gpu_check_cases():
    """(name, callable) pairs; each callable runs on a CUDA device at DeepSeek-V4-Flash shapes (H_I = 64,
    d_I = 128, ratio 4, top-512, 256-token pages) and returns errors vs the reference, the Triton time and
    the bytes / FLOPs the op must move / do."""
    cases = []
    for batch in (1, 64, 256):
        for ctx in (1024, 16384, 131072):
            cases.append((f"indexer_decode_b{batch}_ctx{ctx // 1024}k",
                          lambda batch=batch, ctx=ctx: _gpu_case([ctx - 1] * batch, [1] * batch)))
    cases.append(("indexer_prefill_4k_from0", lambda: _gpu_case([0], [4096])))
    cases.append(("indexer_prefill_4k_at12k", lambda: _gpu_case([12288], [4096])))
    return cases


def _gpu_case(starts, news, H=64, dI=128, ratio=4, topk=512, page_tokens=256, seed=0, device="cuda",
              dtype=torch.bfloat16):
    import random

    from triton.testing import do_bench as _bench

    dev = torch.device(device)

    def do_bench(fn, rep):  # no timing in a dry run of the harness (interpreter, CPU tensors)
        return _bench(fn, rep=rep) if dev.type == "cuda" else float("nan")

    g = torch.Generator(device=dev).manual_seed(seed)
    rng = random.Random(seed)
    B = len(starts)
    E = page_tokens // ratio
    lens = [s + n for s, n in zip(starts, news)]
    pps = max(-(-L // page_tokens) for L in lens)
    P = B * pps + 1
    perm = list(range(P))
    rng.shuffle(perm)
    block_table = torch.tensor(perm[: B * pps], dtype=torch.int64, device=dev).view(B, pps)
    k_pool = torch.randn((P, E, dI), generator=g, device=dev, dtype=torch.float32).to(dtype)
    meta = ForwardMeta.build(list(range(B)), starts, news, device=dev)
    T = meta.num_tokens
    q = torch.randn((T, H, dI), generator=g, device=dev, dtype=torch.float32).to(dtype)
    w = torch.randn((T, H), generator=g, device=dev, dtype=torch.float32) * (dI ** -0.5) * (H ** -0.5)

    got = indexer_topk_triton(q, w, k_pool, block_table, meta, ratio, topk)
    ref = indexer_topk_reference(q, w, k_pool, block_table, meta, ratio, topk)
    # score error on a sample of tokens (fp32 torch from the same bf16 inputs), and pick agreement
    n_max = max(L // ratio for L in lens)
    rows = sorted(set([0, T - 1] + [rng.randrange(T) for _ in range(6)]))
    max_abs = max_rel = 0.0
    for t in rows:
        b = int(meta.token_seq[t])
        n = (int(meta.positions[t]) + 1) // ratio
        if n == 0:
            continue
        s = indexer_scores_triton(q, w, k_pool, block_table, meta, ratio, t, t + 1, n_max)[0, :n]
        wi = torch.arange(n, device=dev)
        keys = k_pool[block_table[b, wi // E], wi % E].float()
        r = (torch.einsum("hd,nd->hn", q[t].float(), keys).relu() * w[t, :, None]).sum(0)
        err = (s - r).abs().max().item()
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / max(r.abs().max().item(), 1e-30))
    agree = tot = 0
    for t in range(T):
        a = set(got[t].tolist()) - {-1}
        r_ = set(ref[t].tolist()) - {-1}
        agree += len(a & r_)
        tot += len(r_)
    ms = do_bench(lambda: indexer_topk_triton(q, w, k_pool, block_table, meta, ratio, topk), rep=200)
    ms_scores = do_bench(lambda: indexer_scores_triton(q, w, k_pool, block_table, meta, ratio, 0,
                                                       min(T, MAX_SCORE_BYTES // (4 * n_max)), n_max), rep=200)
    vis_total = int(((meta.positions + 1) // ratio).sum().item())
    key_bytes = sum(L // ratio for L in lens) * dI * 2  # every cached key read once (decode floor)
    bytes_moved = key_bytes + T * H * dI * 2 + T * H * 4 + 2 * T * n_max * 4 + T * topk * 8
    flops = 2 * H * dI * vis_total
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "topk_recall": agree / max(tot, 1),
            "exact_rows": int(sum(set(got[t].tolist()) == set(ref[t].tolist()) for t in range(T))), "rows": T,
            "triton_ms": ms, "score_kernel_ms": ms_scores, "bytes": bytes_moved, "flops": flops,
            "roofline_ms": max(bytes_moved / H200_BW, flops / H200_FLOPS) * 1e3}
