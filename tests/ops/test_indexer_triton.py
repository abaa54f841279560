"""The Triton indexer_topk provider (dsv4/kernels/triton/indexer.py) in the interpreter, beyond the shared
op tests: against the reference on random batches (several sequences, decode and prefill chunks in one
call), query chunking, tiles per program, padding heads / dims, FP8 key stores in both dialects (and the
factor of two when FNUZ bytes are read as OCP), mixed q / key dtypes, rows with nothing visible, one
query, many sequences, contexts below and above top-k, and the score buffer's bounds.

Selections are compared as sets up to near-ties: the picks must be distinct visible entries, as many as
the reference has, and no unpicked visible entry may score above a picked one by more than a tolerance
(float64 scores from the same inputs)."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4.kernels.triton.indexer as tix
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.indexer import indexer_topk_reference
from dsv4.ops.kv_format import Fp8KV, kv_alloc, kv_read, kv_write
from dsv4.ops.meta import ForwardMeta

PAGE_TOKENS = 16
NUM_SLOTS = 6


def build(seqs, ratio, H, D, seed, fp8=None, rope=8, kdtype=torch.float32, qdtype=torch.float32):
    """seqs: [(slot, start, new)]. Pool (float or Fp8KV) through a shuffled block table, random keys in
    every row (rows past a sequence's entries too), q, weights and meta."""
    g = torch.Generator().manual_seed(seed)
    E = PAGE_TOKENS // ratio
    max_len = max(p0 + n for _, p0, n in seqs)
    pps = math.ceil(max_len / PAGE_TOKENS) + 1
    P = NUM_SLOTS * pps + 1
    bt = torch.randperm(P, generator=g)[: NUM_SLOTS * pps].view(NUM_SLOTS, pps).clone()
    keys = torch.randn(P, E, D, generator=g)
    if fp8 is None:
        pool = keys.to(kdtype)
    else:
        pool = kv_alloc((P, E), D, rope, True, torch.float32, "cpu", fp8)
        kv_write(pool, (slice(None), slice(None)), keys * 3.0)
    meta = ForwardMeta.build([s for s, _, _ in seqs], [p for _, p, _ in seqs], [n for _, _, n in seqs])
    T = meta.num_tokens
    q = torch.randn(T, H, D, generator=g).to(qdtype)
    w = torch.randn(T, H, generator=g) * (D ** -0.5) * (H ** -0.5)
    return meta, q, w, pool, bt


def scores64(q, w, pool, bt, meta, ratio, t):
    """float64 scores of query t over its visible entries."""
    b = int(meta.token_seq[t])
    slot = meta.seq_slots_host[b]
    n = (int(meta.positions[t]) + 1) // ratio
    E = (pool.nope if isinstance(pool, Fp8KV) else pool).shape[1]
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    wi = torch.arange(n)
    keys = kv_read(pool, (bt[slot, wi // E], wi % E)).double()
    return (torch.einsum("hd,nd->hn", q[t].double(), keys).relu() * w[t].double()[:, None]).sum(0)


def check_selection(got, q, w, pool, bt, meta, ratio, topk, tol=1e-5):
    ref = indexer_topk_reference(q, w, pool, bt, meta, ratio, topk)
    assert got.shape == ref.shape and got.dtype == torch.int64
    for t in range(meta.num_tokens):
        s = scores64(q, w, pool, bt, meta, ratio, t)
        n = s.numel()
        row = got[t].tolist()
        picked = [i for i in row if i != -1]
        want = [i for i in ref[t].tolist() if i != -1]
        assert len(picked) == len(want) == min(topk, n), (t, row)
        assert len(set(picked)) == len(picked), (t, row)
        assert all(0 <= i < n for i in picked), (t, row)
        if set(picked) != set(want):  # only a near-tie may differ
            rest = sorted(set(range(n)) - set(picked))
            lo = min(float(s[i]) for i in picked)
            hi = max(float(s[i]) for i in rest)
            assert hi <= lo + tol * max(1.0, abs(lo)), f"token {t}: {sorted(picked)} vs {sorted(want)}"
    return ref


MIXED = [  # (slot, start, new): prefill from 0, chunks mid-sequence, decodes below / at / above top-k
    (3, 0, 13),
    (0, 21, 9),
    (4, 43, 1),
    (1, 8, 1),
    (2, 4 * 6 - 1, 1),
    (5, 30, 6),
]


@pytest.mark.parametrize("ratio", [4, 8])
def test_mixed_batch_vs_reference(ratio):
    meta, q, w, pool, bt = build(MIXED, ratio, H=8, D=16, seed=ratio)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, ratio, 6)
    check_selection(got, q, w, pool, bt, meta, ratio, 6)


def test_padding_heads_and_dims_decode():
    """H = 6 and dI = 24 (masked lanes in both), decode only (one token per sequence, ungrouped path),
    many sequences at different lengths."""
    seqs = [(s, p, 1) for s, p in zip(range(NUM_SLOTS), [0, 3, 4, 17, 40, 63])]
    meta, q, w, pool, bt = build(seqs, 4, H=6, D=24, seed=3)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 5)
    check_selection(got, q, w, pool, bt, meta, 4, 5)
    assert (got[0] == -1).all()  # position 0: nothing visible


def test_chunks_tiles_groups(monkeypatch):
    """A tiny score budget (several query chunks, cut inside sequences), small entry tiles with several
    tiles per program, and groups of 3 tokens (ragged group ends)."""
    monkeypatch.setattr(tix, "MAX_SCORE_BYTES", 4 * 16 * 7)  # 7 rows of 16 entries per chunk
    monkeypatch.setattr(tix, "FORCE_BLOCK_N", 16)
    monkeypatch.setattr(tix, "FORCE_BLOCK_T", 4)
    seqs = [(0, 10, 11), (2, 70, 5), (5, 50, 1)]
    meta, q, w, pool, bt = build(seqs, 4, H=8, D=16, seed=5)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 7)
    check_selection(got, q, w, pool, bt, meta, 4, 7)


def test_many_tiles_per_program(monkeypatch):
    """TILES > 1: enough (query, tile) pairs to make the wrapper give each program several tiles."""
    monkeypatch.setattr(tix, "FORCE_BLOCK_N", 16)
    monkeypatch.setattr(tix, "FORCE_TILES", 4)
    seqs = [(s, 100 + 7 * s, 1) for s in range(NUM_SLOTS)]
    meta, q, w, pool, bt = build(seqs, 2, H=4, D=16, seed=9)
    n_max = max(L // 2 for L in meta.seq_lens_host)
    out = torch.full((meta.num_tokens + 2, n_max + 5), float("nan"))
    view = out[: meta.num_tokens, :n_max]
    s = tix.indexer_scores_triton(q, w, pool, bt, meta, 2, 0, meta.num_tokens, n_max, view)
    assert torch.isnan(out[meta.num_tokens:]).all() and torch.isnan(out[:, n_max:]).all()
    for t in range(meta.num_tokens):
        ref = scores64(q, w, pool, bt, meta, 2, t)
        n = ref.numel()
        torch.testing.assert_close(s[t, :n].double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(s[t, n:]).all()
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 2, 9)
    check_selection(got, q, w, pool, bt, meta, 2, 9)


def test_score_buffer_bounds_and_invisible():
    """Scores: visible entries equal the float64 scores, every other column of the row is -inf, and
    nothing outside the [Tc, n_max] view of a larger NaN buffer is written (prefill chunk, grouped)."""
    seqs = [(1, 0, 9), (4, 12, 6)]
    meta, q, w, pool, bt = build(seqs, 4, H=8, D=16, seed=11)
    n_max = max(L // 4 for L in meta.seq_lens_host)
    c0, c1 = 3, 13
    big = torch.full((c1 - c0 + 3, n_max + 4), float("nan"))
    s = tix.indexer_scores_triton(q, w, pool, bt, meta, 4, c0, c1, n_max, big[: c1 - c0, :n_max])
    assert torch.isnan(big[c1 - c0:]).all() and torch.isnan(big[:, n_max:]).all()
    for t in range(c0, c1):
        ref = scores64(q, w, pool, bt, meta, 4, t)
        n = ref.numel()
        torch.testing.assert_close(s[t - c0, :n].double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(s[t - c0, n:]).all()


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
def test_fp8_key_store(dialect):
    """Fp8KV keys (nope bytes + E8M0 scales + float rope dims): same selection and scores as the
    reference reading the same store."""
    meta, q, w, pool, bt = build(MIXED, 4, H=8, D=24, seed=13, fp8=dialect, rope=8)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 6)
    check_selection(got, q, w, pool, bt, meta, 4, 6)
    n_max = max(L // 4 for L in meta.seq_lens_host)
    s = tix.indexer_scores_triton(q, w, pool, bt, meta, 4, 0, meta.num_tokens, n_max)
    for t in range(meta.num_tokens):
        ref = scores64(q, w, pool, bt, meta, 4, t)
        torch.testing.assert_close(s[t, :ref.numel()].double(), ref, atol=1e-4, rtol=1e-5)


def test_fp8_factor_of_two_trap():
    """FNUZ bytes read as OCP double the non-rotary dims: the scores must then disagree with the true
    (FNUZ) scores, while the right dialect agrees."""
    meta, q, w, pool, bt = build(MIXED, 4, H=8, D=24, seed=17, fp8=Fp8Dialect.FNUZ, rope=8)
    wrong = Fp8KV(nope=pool.nope, scale=pool.scale, rope=pool.rope, dialect=Fp8Dialect.OCP)
    n_max = max(L // 4 for L in meta.seq_lens_host)
    right_s = tix.indexer_scores_triton(q, w, pool, bt, meta, 4, 0, meta.num_tokens, n_max)
    wrong_s = tix.indexer_scores_triton(q, w, wrong, bt, meta, 4, 0, meta.num_tokens, n_max)
    bad = 0
    for t in range(meta.num_tokens):
        ref = scores64(q, w, pool, bt, meta, 4, t)
        n = ref.numel()
        torch.testing.assert_close(right_s[t, :n].double(), ref, atol=1e-4, rtol=1e-5)
        if n and not torch.allclose(wrong_s[t, :n].double(), ref, atol=1e-3, rtol=1e-2):
            bad += 1
    assert bad >= meta.num_tokens // 2, "reading FNUZ bytes as OCP went unnoticed"


def test_bf16_queries_fp32_keys():
    """q in bf16, keys in fp32: the kernel widens q (exact) and scores in fp32 like the reference."""
    meta, q, w, pool, bt = build(MIXED, 4, H=8, D=16, seed=19, qdtype=torch.bfloat16)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 6)
    check_selection(got, q, w, pool, bt, meta, 4, 6)


def test_one_query_and_nothing_visible():
    meta, q, w, pool, bt = build([(2, 0, 1)], 4, H=8, D=16, seed=23)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 4)
    assert got.shape == (1, 4) and (got == -1).all()
    meta, q, w, pool, bt = build([(2, 38, 1)], 4, H=8, D=16, seed=23)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 4)  # 9 visible, top 4
    check_selection(got, q, w, pool, bt, meta, 4, 4)


def test_topk_above_all_entries_and_many_sequences():
    """topk larger than every context (padding with -1), and many sequences in one decode step."""
    seqs = [(s, 3 + 5 * s, 1) for s in range(NUM_SLOTS)]
    meta, q, w, pool, bt = build(seqs, 4, H=8, D=16, seed=29)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 16)
    check_selection(got, q, w, pool, bt, meta, 4, 16)
    assert (got[:, 8:] == -1).all()


@pytest.mark.parametrize("block", [64, 1024])
def test_row_topk_kernel_exact_ties_and_chunks(block, monkeypatch):
    """The row top-k kernel on fp32 score rows: rows with fewer, exactly and more visible entries than top-k,
    heavy exact ties (many zeros: relu'd scores), negative scores and -inf, values near the sign boundary (-0.0,
    tiny denormals), a top-k that is not a power of two, several 64-entry chunks per row; every pick a distinct
    visible entry, min(top-k, n) of them, and no unpicked visible entry above a picked one (exact, fp32)."""
    g = torch.Generator().manual_seed(block)
    R, n_max, topk = 9, 300, 37
    s = torch.randn(R, n_max, generator=g)
    s[1] = 0.0  # all tied
    s[2, ::2] = 0.0
    s[3] = -s[3].abs()
    s[4, :150] = float("-inf")
    s[5] = torch.tensor([-0.0, 0.0, 1e-45, -1e-45]).repeat(75)
    s[6] = torch.randint(0, 3, (n_max,), generator=g).float()  # three values, many ties at the threshold
    s[8] = torch.randint(0, 2, (n_max,), generator=g).float()  # the last row: ties (a write past it shows)
    vis = torch.tensor([5, 300, 37, 38, 290, 300, 300, 0, 120])
    out = torch.full((R + 2, topk), 99, dtype=torch.int64)  # rows beyond the chunk stay untouched
    tix._row_topk_kernel[(R,)](s, s.stride(0), torch.cat([torch.zeros(1, dtype=torch.int64), vis]), out,
                               out.stride(0), 1, n_max, topk, BLOCK=block, BLOCK_K=64)
    assert (out[0] == 99).all() and (out[R + 1] == 99).all()
    for r in range(R):
        n = int(vis[r])
        row = out[1 + r].tolist()
        picked = [i for i in row if i != -1]
        assert len(picked) == min(topk, n) and len(set(picked)) == len(picked), (r, row)
        assert all(0 <= i < n for i in picked), (r, row)
        assert row[len(picked):] == [-1] * (topk - len(picked)) or n > topk, (r, row)
        if n > topk:
            rest = sorted(set(range(n)) - set(picked))
            assert max(float(s[r, i]) for i in rest) <= min(float(s[r, i]) for i in picked), r


def test_topk_kernel_equals_torch_topk_path(monkeypatch):
    """indexer_topk with the row top-k kernel and with torch.topk (knob off) pick the same sets on a mixed batch
    (distinct scores: no ties to break differently)."""
    meta, q, w, pool, bt = build(MIXED, 4, H=4, D=16, seed=77)
    got = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 5)
    monkeypatch.setattr(tix, "TOPK_KERNEL", False)
    want = tix.indexer_topk_triton(q, w, pool, bt, meta, 4, 5)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]


@pytest.mark.gpu
@pytest.mark.parametrize("n_max", [1024, 32768])
def test_gpu_row_topk_kernel(n_max):
    """Compiled, Flash's top-512 over 1K and 32K entries (4K and 128K contexts): the row top-k kernel picks a
    set torch.topk could have picked (ties at the threshold free), -1 past the visible count."""
    g = torch.Generator(device="cuda").manual_seed(n_max)
    R, topk = 6, 512
    s = torch.randn(R, n_max, device="cuda", generator=g)
    s[1] = torch.randint(0, 4, (n_max,), device="cuda", generator=g).float()
    s[2] = 0.0
    vis = torch.tensor([n_max, n_max, n_max, 300, 512, n_max // 2 + 1], device="cuda")
    out = torch.empty((R, topk), dtype=torch.int64, device="cuda")
    tix._row_topk_kernel[(R,)](s, s.stride(0), vis, out, out.stride(0), 0, n_max, topk, BLOCK=tix.TOPK_BLOCK,
                               BLOCK_K=512, num_warps=4)
    out, s, vis = out.cpu(), s.cpu(), vis.cpu()
    for r in range(R):
        n = int(vis[r])
        picked = [i for i in out[r].tolist() if i != -1]
        assert len(picked) == min(topk, n) and len(set(picked)) == len(picked) and all(0 <= i < n for i in picked)
        if n > topk:
            kth = torch.topk(s[r, :n], topk).values[-1]
            assert float(s[r, picked].min()) >= float(kth), r
            rest = torch.ones(n, dtype=torch.bool)
            rest[picked] = False
            assert float(s[r, :n][rest].max()) <= float(s[r, picked].min()), r


def test_weights_scale_applied_as_read():
    """indexer_topk(weights_scale=s) on bf16 head weights equals passing float32(weights) * s (Triton: the scores
    bit for bit; the reference: the same picks); a negative scale flips the picks (so it is applied)."""
    meta, q, w, pool, bt = build(MIXED, 4, H=4, D=16, seed=78)
    wb = (w * 40).bfloat16()
    n_max = meta.max_seq_len // 4
    a = tix.indexer_scores_triton(q, wb, pool, bt, meta, 4, 0, meta.num_tokens, n_max, weights_scale=0.03)
    b = tix.indexer_scores_triton(q, wb.float() * 0.03, pool, bt, meta, 4, 0, meta.num_tokens, n_max)
    assert torch.equal(a, b)
    got = tix.indexer_topk_triton(q, wb, pool, bt, meta, 4, 5, 0.03)
    ref = indexer_topk_reference(q, wb, pool, bt, meta, 4, 5, 0.03)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]
    flip = tix.indexer_topk_triton(q, wb, pool, bt, meta, 4, 5, -0.03)
    assert [sorted(r) for r in flip.tolist()] != [sorted(r) for r in got.tolist()]
