"""indexer_topk (spec §2.6): every provider against a naive scorer.

Naive score s(t, w) = sum_h weights[t, h] * relu(q[t, h] . k_w) over the sequence's cached keys (written
into a paged pool through a shuffled block table); entry w is visible to the query at position p iff
(w + 1) * ratio <= p + 1. For each query the returned set (ignoring -1) must be the naive top
min(topk, visible) set, with topk - min(topk, visible) entries equal to -1 and nothing invisible.
Data is continuous random; the naive gap between the k-th and (k+1)-th score is asserted, so a tie can
never make the comparison ambiguous.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.meta import ForwardMeta
from providers import provider_params

NH, DI = 8, 16  # heads, head dim
PAGE_TOKENS = 16
NUM_SLOTS = 5


def build(seqs, ratio: int, seed: int):
    """seqs: [(slot, start position, new tokens)]. Returns meta, q, weights, pool, block table and the
    keys of every slot (the pool holds each sequence's entries up to its length after the step; the
    rest of the pool, including rows of entries not yet complete, holds other random keys)."""
    g = torch.Generator().manual_seed(seed)
    E = PAGE_TOKENS // ratio
    max_len = max(p0 + n for _, p0, n in seqs)
    pps = math.ceil(max_len / PAGE_TOKENS) + 1
    P = NUM_SLOTS * pps + 1
    block_table = torch.randperm(P, generator=g)[: NUM_SLOTS * pps].view(NUM_SLOTS, pps).clone()
    pool = torch.randn(P, E, DI, generator=g)  # rows beyond a sequence's entries: random keys too
    keys = {}
    for slot, p0, n in seqs:
        nk = (p0 + n) // ratio
        keys[slot] = torch.randn(nk, DI, generator=g)
        for w in range(nk):
            pool[block_table[slot, w // E], w % E] = keys[slot][w]
    meta = ForwardMeta.build([s for s, _, _ in seqs], [p for _, p, _ in seqs], [n for _, _, n in seqs])
    T = meta.num_tokens
    q = torch.randn(T, NH, DI, generator=g)
    weights = torch.randn(T, NH, generator=g) * (DI ** -0.5) * (NH ** -0.5)
    return meta, q, weights, pool, block_table, keys


def naive_scores(q_t, w_t, keys, n_vis):
    """[n_vis] float64 scores, one explicit loop over entries and heads."""
    out = []
    for w in range(n_vis):
        s = 0.0
        for h in range(NH):
            s += float(w_t[h]) * max(0.0, float(q_t[h].double() @ keys[w].double()))
        out.append(s)
    return out


def check(fn, seqs, ratio, topk, seed):
    meta, q, weights, pool, block_table, keys = build(seqs, ratio, seed)
    got = fn(q, weights, pool, block_table, meta, ratio, topk)
    assert got.shape == (meta.num_tokens, topk) and got.dtype == torch.int64
    counts = {"zero": 0, "below": 0, "above": 0}
    for b, (slot, p0, n) in enumerate(seqs):
        t0, _ = meta.seq_range(b)
        for j in range(n):
            t, p = t0 + j, p0 + j
            n_vis = (p + 1) // ratio
            k = min(topk, n_vis)
            scores = naive_scores(q[t], weights[t], keys[slot], n_vis)
            order = sorted(range(n_vis), key=lambda w: -scores[w])
            if n_vis > k:
                gap = scores[order[k - 1]] - scores[order[k]]
                assert gap > 1e-5 * max(1.0, abs(scores[order[k]])), "test data has a near tie; change the seed"
            row = got[t].tolist()
            picked = [w for w in row if w != -1]
            assert row.count(-1) == topk - k, f"query at {p}: {row}"
            assert len(set(picked)) == len(picked), f"duplicates at {p}: {row}"
            assert all(0 <= w < n_vis for w in picked), f"invisible entry returned at {p}: {row} (visible {n_vis})"
            assert set(picked) == set(order[:k]), f"query at {p}: got {sorted(picked)}, want {sorted(order[:k])}"
            counts["zero" if n_vis == 0 else ("below" if n_vis <= topk else "above")] += 1
    return counts


@pytest.mark.parametrize("fn", provider_params("indexer_topk"))
@pytest.mark.parametrize("ratio", [4, 8])
def test_mixed_sequences_one_call(fn, ratio):
    """Several sequences of different lengths in one call: a prefill from 0 (first queries see nothing),
    chunks in the middle, decode steps below and above top-k."""
    topk = 4
    seqs = [
        (3, 0, 2 * ratio + 3),  # prefill from position 0: zero, then few visible entries
        (0, 5 * ratio + 1, 9),  # a chunk crossing the top-k boundary
        (4, 11 * ratio - 1, 1),  # decode with many more entries than top-k
        (1, 2 * ratio, 1),  # decode below top-k
        (2, topk * ratio - 1, 1),  # exactly top-k visible
    ]
    counts = check(fn, seqs, ratio, topk, seed=ratio)
    assert counts["zero"] > 0 and counts["below"] > 0 and counts["above"] > 0


@pytest.mark.parametrize("fn", provider_params("indexer_topk"))
def test_nothing_visible(fn):
    """Queries with zero visible entries (a sequence shorter than one window) get a row of -1."""
    meta, q, weights, pool, bt, _ = build([(2, 0, 3), (0, 1, 2)], 4, seed=1)
    got = fn(q, weights, pool, bt, meta, 4, 6)
    assert got.shape == (5, 6)
    assert (got == -1).all()


@pytest.mark.parametrize("fn", provider_params("indexer_topk"))
def test_topk_larger_than_everything(fn):
    """top-k above the number of entries: each query returns exactly its visible entries."""
    counts = check(fn, [(1, 0, 23), (3, 7, 6)], ratio=4, topk=16, seed=7)
    assert counts["above"] == 0 and counts["below"] > 0


@pytest.mark.parametrize("fn", provider_params("indexer_topk"))
def test_long_context_topk(fn):
    counts = check(fn, [(0, 200, 3), (2, 97, 2)], ratio=4, topk=8, seed=11)
    assert counts["above"] == 5
