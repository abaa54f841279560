"""sparse_attention + write_window (spec §2.3, §2.7): every provider against a naive per-query oracle.

The test keeps the full K=V history of every sequence and drives the ops the way the model does:
several sequences per step, random chunking over steps, attention first, then write_window into the
ring [S, W, D]. For each query at position p the oracle's key list is the raw K=V vectors of positions
max(0, p-W+1)..p plus the compressed entries (CSA: the given index list minus -1; HCA: every w with
(w+1)*ratio <= p+1); logits = scale * q.k; one softmax whose denominator also holds exp(sink_h);
output = sum_i p_i k_i. Ring rows not yet written and pool rows nobody owns hold large garbage, so
reading them shows.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dsv4.ops.meta import ForwardMeta
from providers import provider_params

H, D, W = 4, 16, 8
PAGE_TOKENS = 16
TOPK = 5
SCALE = D ** -0.5
SINK = torch.tensor([20.0, -20.0, 0.3, 2.0])  # large positive, large negative, ordinary
LENS = [3, 21, 13]  # below one window / compress window, and well above both
SLOTS = [2, 0, 3]
NUM_SLOTS = 4


class Seqs:
    """Per-sequence history (K=V rows, queries, compressed entries) and the paged pool holding them."""

    def __init__(self, mode: str, ratio: int, seed: int, dtype=torch.float32, lens=LENS):
        g = torch.Generator().manual_seed(seed)
        self.mode, self.ratio, self.dtype, self.lens = mode, ratio, dtype, lens
        self.kv = [torch.randn(L, D, generator=g).to(dtype) for L in lens]
        self.q = [(1.5 * torch.randn(L, H, D, generator=g)).to(dtype) for L in lens]
        self.window = (30.0 * torch.randn(NUM_SLOTS, W, D, generator=g)).to(dtype)
        self.pool = self.block_table = None
        self.ents = [None] * len(lens)
        if mode != "swa":
            E = PAGE_TOKENS // ratio
            pps = math.ceil(max(lens) / PAGE_TOKENS)
            P = NUM_SLOTS * pps + 1
            self.block_table = torch.randperm(P, generator=g)[: NUM_SLOTS * pps].view(NUM_SLOTS, pps).clone()
            self.pool = (30.0 * torch.randn(P, E, D, generator=g)).to(dtype)
            for i, L in enumerate(lens):
                # every entry the sequence will ever have is in the pool from the start: visibility is
                # the op's job (later steps' entries must not leak into earlier queries)
                self.ents[i] = torch.randn(L // ratio, D, generator=g).to(dtype)
                for w in range(L // ratio):
                    self.pool[self.block_table[SLOTS[i], w // E], w % E] = self.ents[i][w]


def make_index_row(rng: random.Random, p: int, ratio: int, t: int) -> list[int]:
    """A CSA index list for the query at position p: distinct visible entries, -1 elsewhere, shuffled;
    every 4th row all -1, others a random number (often fewer than TOPK) of valid entries."""
    n_vis = (p + 1) // ratio
    k = 0 if t % 4 == 3 else rng.randint(0, min(TOPK, n_vis))
    row = rng.sample(range(n_vis), k) + [-1] * (TOPK - k)
    rng.shuffle(row)
    return row


def naive_query(q_t: torch.Tensor, keys: list[torch.Tensor], sink: torch.Tensor) -> torch.Tensor:
    """One query [H, D] over a key list (K = V), sink in the denominator only; float64."""
    out = torch.zeros(H, D, dtype=torch.float64)
    for h in range(H):
        logits = [SCALE * float(q_t[h].double() @ k.double()) for k in keys]
        z = float(sink[h])
        mx = max(max(logits), z)
        num = [math.exp(lv - mx) for lv in logits]
        den = sum(num) + math.exp(z - mx)
        for a, k in zip(num, keys):
            out[h] += (a / den) * k.double()
    return out


def oracle_keys(sq: Seqs, i: int, p: int, idx_row) -> list[torch.Tensor]:
    keys = [sq.kv[i][j] for j in range(max(0, p - W + 1), p + 1)]
    if sq.mode == "csa":
        keys += [sq.ents[i][w] for w in idx_row if w >= 0]
    elif sq.mode == "hca":
        keys += [sq.ents[i][w] for w in range(sq.ents[i].shape[0]) if (w + 1) * sq.ratio <= p + 1]
    return keys


# ----------------------------------------------------------------------------- schedules


def sched_random(lens, seed, max_chunk, done=None):
    rng = random.Random(seed)
    done = list(done) if done is not None else [0] * len(lens)
    steps = []
    while any(d < L for d, L in zip(done, lens)):
        ready = [i for i in range(len(lens)) if done[i] < lens[i]]
        step = [(i, rng.randint(1, min(max_chunk, lens[i] - done[i]))) for i in ready if rng.random() < 0.7]
        if not step:
            i = rng.choice(ready)
            step = [(i, 1)]
        for i, n in step:
            done[i] += n
        steps.append(step)
    return steps


def sched_crafted(lens, seed):
    """A single query that is the first token of a sequence (T = 1), a chunk longer than the window
    next to a short one, then random chunks."""
    steps = [[(1, 1)], [(0, 2), (1, 10)], [(2, 1)]]
    return steps + sched_random(lens, seed, W + 3, [2, 11, 1])


def sched_tokens(lens):
    steps, done = [], [0] * len(lens)
    while any(d < L for d, L in zip(done, lens)):
        step = [(i, 1) for i in range(len(lens)) if done[i] < lens[i]]
        for i, _ in step:
            done[i] += 1
        steps.append(step)
    return steps


SCHEDULES = {
    "one_chunk": lambda lens: [[(i, L) for i, L in enumerate(lens)]],
    "crafted": lambda lens: sched_crafted(lens, 7),
    "random": lambda lens: sched_random(lens, 8, 2 * W),
    "tokens": sched_tokens,
}


# ----------------------------------------------------------------------------- driver


def drive(attn, write, sq: Seqs, schedule, atol, rtol, seed=3):
    rng = random.Random(seed)
    done = [0] * len(sq.lens)
    n_queries = 0
    for step in schedule:
        sl, starts, ns, qs, kvs, idx = [], [], [], [], [], []
        for i, n in step:
            sl.append(SLOTS[i])
            starts.append(done[i])
            ns.append(n)
            qs.append(sq.q[i][done[i]:done[i] + n])
            kvs.append(sq.kv[i][done[i]:done[i] + n])
            if sq.mode == "csa":
                idx += [make_index_row(rng, p, sq.ratio, n_queries + len(idx)) for p in range(done[i], done[i] + n)]
        meta = ForwardMeta.build(sl, starts, ns)
        q, kv = torch.cat(qs), torch.cat(kvs)
        topk_idx = torch.tensor(idx, dtype=torch.int64) if sq.mode == "csa" else None
        out = attn(q, kv, sq.window, SINK, SCALE, meta, sq.pool, sq.block_table, topk_idx,
                   sq.ratio if sq.mode != "swa" else 0)
        assert out.shape == q.shape and out.dtype == q.dtype
        t = 0
        for i, n in step:
            for p in range(done[i], done[i] + n):
                keys = oracle_keys(sq, i, p, idx[t] if idx else None)
                want = naive_query(q[t], keys, SINK)
                torch.testing.assert_close(out[t].double(), want, atol=atol, rtol=rtol,
                                           msg=lambda s: f"seq {i} position {p}: {s}")
                t += 1
        write(sq.window, kv, meta)
        for i, n in step:
            done[i] += n
            for p in range(max(0, done[i] - W), done[i]):  # the ring holds the last W tokens
                assert torch.equal(sq.window[SLOTS[i], p % W], sq.kv[i][p])
        n_queries += len(idx)
    assert done == sq.lens


MODES = [("swa", 0), ("csa", 4), ("hca", 4), ("hca", 8)]


@pytest.mark.parametrize("write", provider_params("write_window"))
@pytest.mark.parametrize("attn", provider_params("sparse_attention"))
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("mode,ratio", MODES, ids=[f"{m}{r or ''}" for m, r in MODES])
def test_matches_naive_fp32(attn, write, sched, mode, ratio):
    sq = Seqs(mode, ratio, seed=100 + ratio)
    drive(attn, write, sq, SCHEDULES[sched](sq.lens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("write", provider_params("write_window"))
@pytest.mark.parametrize("attn", provider_params("sparse_attention"))
@pytest.mark.parametrize("mode,ratio", MODES, ids=[f"{m}{r or ''}" for m, r in MODES])
def test_matches_naive_bf16(attn, write, mode, ratio):
    sq = Seqs(mode, ratio, seed=200 + ratio, dtype=torch.bfloat16)
    drive(attn, write, sq, SCHEDULES["crafted"](sq.lens), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("attn", provider_params("sparse_attention"))
def test_csa_rows_all_invalid_equal_window_only(attn):
    """A CSA query whose index row is all -1 attends to exactly what a sliding-window layer would."""
    sq = Seqs("csa", 4, seed=5, lens=[12])
    meta = ForwardMeta.build([SLOTS[0]], [0], [12])
    q, kv = sq.q[0], sq.kv[0]
    none = torch.full((12, TOPK), -1, dtype=torch.int64)
    a = attn(q, kv, sq.window, SINK, SCALE, meta, sq.pool, sq.block_table, none, 4)
    b = attn(q, kv, sq.window, SINK, SCALE, meta, None, None, None, 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    some = none.clone()
    some[11, 0] = 2  # one valid entry changes that query's output and no other
    c = attn(q, kv, sq.window, SINK, SCALE, meta, sq.pool, sq.block_table, some, 4)
    torch.testing.assert_close(c[:11], b[:11], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(c[11], b[11], atol=1e-4)


@pytest.mark.parametrize("write", provider_params("write_window"))
def test_write_window_ring(write):
    """Only the last W tokens of each sequence land in its ring (slot position % W); other slots and
    older ring rows are untouched."""
    g = torch.Generator().manual_seed(9)
    window = torch.full((NUM_SLOTS, W, D), float("nan"))
    meta = ForwardMeta.build([3, 1], [5, 0], [W + 4, 3])  # a chunk longer than W, and a short one
    kv = torch.randn(meta.num_tokens, D, generator=g)
    write(window, kv, meta)
    for p in range(5 + 4, 5 + W + 4):  # positions 9..16: the last W of the long chunk fill the whole ring
        assert torch.equal(window[3, p % W], kv[p - 5])
    for p in range(3):
        assert torch.equal(window[1, p], kv[W + 4 + p])
    assert torch.isnan(window[1, 3:]).all()
    assert torch.isnan(window[0]).all() and torch.isnan(window[2]).all()
