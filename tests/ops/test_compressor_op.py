"""compress_kv (spec §2.5): every provider against a naive per-window oracle written from the spec
equations, on every split of the same sequences into steps.

The op is driven the way the model drives it: several sequences per step (ForwardMeta.build), each in
its own cache slot, state/prev reset with reset_compressor_state, entries written to a paged pool
[P, page_tokens // ratio, d] through a block table (pages shuffled, so page order matters). The pool
starts NaN-filled so that a row written too early (an incomplete window) or a stray write is seen.
"""

from __future__ import annotations

import cmath
import math
import random

import numpy as np
import pytest
import torch

from dsv4.numerics import Fp8Dialect, fp4_roundtrip, hadamard_transform
from dsv4.ops.compressor import reset_compressor_state
from dsv4.ops.meta import ForwardMeta
from providers import provider_params

EPS = 1e-6
PAGE_TOKENS = 32  # a multiple of every ratio used here, as ModelCache requires
ROPE_DIM = 8
TOL = dict(atol=1e-5, rtol=1e-5)

# (layer kind, ratio): HCA pools m tokens per entry, CSA mixes 2m slots with overlap
KINDS = [("hca", 8), ("hca", 16), ("csa", 4), ("csa", 8)]


# ----------------------------------------------------------------------------- inputs


def make_inv_freq(rope_dim: int = ROPE_DIM) -> torch.Tensor:
    return (1.0 / (50.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))).float()


class Setup:
    """Weights of one compressor plus the raw per-token projections of each sequence."""

    def __init__(self, kind: str, m: int, d: int, lens: list[int], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.m, self.d = kind, m, d
        self.overlap = kind == "csa"
        self.c = 2 if self.overlap else 1
        cd = self.c * d
        self.ape = torch.randn(m, cd, generator=g) * 0.7
        self.norm_w = 1.0 + 0.3 * torch.randn(d, generator=g)
        self.inv_freq = make_inv_freq()
        self.lens = lens
        self.kv = [torch.randn(L, cd, generator=g) for L in lens]
        self.score = [2.0 * torch.randn(L, cd, generator=g) for L in lens]


class PagedCache:
    """Compressor state + NaN-filled pool + shuffled block table, ModelCache's layout."""

    def __init__(self, st: Setup, num_slots: int, max_len: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.E = PAGE_TOKENS // st.m
        pps = math.ceil(max_len / PAGE_TOKENS)
        P = num_slots * pps + 2  # two spare pages nobody owns
        self.block_table = torch.randperm(P, generator=g)[: num_slots * pps].view(num_slots, pps).clone()
        self.spare = sorted(set(range(P)) - set(self.block_table.flatten().tolist()))
        self.pool = torch.full((P, self.E, st.d), float("nan"))
        # garbage first: the reset must be what empties the accumulators
        self.state = 100.0 * torch.randn(num_slots, 3, st.c * st.d, generator=g)
        self.prev = 100.0 * torch.randn(num_slots, 3, st.d, generator=g) if st.overlap else None
        reset_compressor_state(self.state, self.prev, list(range(num_slots)))

    def row(self, slot: int, w: int) -> torch.Tensor:
        return self.pool[self.block_table[slot, w // self.E], w % self.E]

    def entries(self, slot: int, n: int) -> torch.Tensor:
        return torch.stack([self.row(slot, w) for w in range(n)]) if n else torch.empty(0, self.pool.shape[-1])

    def capacity(self) -> int:
        return self.block_table.shape[1] * self.E


# ----------------------------------------------------------------------------- schedules
# A schedule is a list of steps; a step is a list of (sequence index, number of new tokens).


def sched_one_chunk(lens):
    return [[(i, L) for i, L in enumerate(lens)]]


def sched_tokens(lens):
    steps, done = [], [0] * len(lens)
    while any(d < L for d, L in zip(done, lens)):
        step = [(i, 1) for i in range(len(lens)) if done[i] < lens[i]]
        for i, _ in step:
            done[i] += 1
        steps.append(step)
    return steps


def sched_random(lens, seed, max_chunk, done=None):
    rng = random.Random(seed)
    done = list(done) if done is not None else [0] * len(lens)
    steps, k = [], 0
    while any(d < L for d, L in zip(done, lens)):
        # sequence i may join from step i on, so sequences sit at different positions in one step
        ready = [i for i in range(len(lens)) if done[i] < lens[i] and (i <= k or done[i] > 0)]
        if not ready:
            ready = [min(i for i in range(len(lens)) if done[i] < lens[i])]
        step = [(i, rng.randint(1, min(max_chunk, lens[i] - done[i]))) for i in ready if rng.random() < 0.65]
        if not step:
            i = rng.choice(ready)
            step = [(i, rng.randint(1, min(max_chunk, lens[i] - done[i])))]
        for i, n in step:
            done[i] += n
        steps.append(step)
        k += 1
    return steps


def sched_crafted(lens, m, seed):
    """seq 0's first chunk ends exactly on a window boundary; seq 1's second chunk starts mid-window;
    a step with one token of one sequence (T = 1, the first token of seq 2); then random chunks."""
    assert lens[0] > 2 * m + 1 and lens[1] > m + 5 and lens[2] > m
    steps = [[(0, 2 * m), (1, 3)], [(2, 1)], [(0, 1), (1, m + 2), (2, m - 1)]]
    done = [2 * m + 1, m + 5, m]
    return steps + sched_random(lens, seed, 2 * m + 3, done)


def schedules(lens, m):
    return {
        "one_chunk": sched_one_chunk(lens),
        "tokens": sched_tokens(lens),
        "random_a": sched_random(lens, 11, 2 * m + 3),
        "random_b": sched_random(lens, 12, 3),
        "crafted": sched_crafted(lens, m, 13),
    }


# ----------------------------------------------------------------------------- driver


def run(fn, st: Setup, slots: list[int], schedule, post="none", dialect=Fp8Dialect.OCP, num_slots=4,
        seed=5, check_steps=True) -> PagedCache:
    cache = PagedCache(st, num_slots, max(st.lens), seed)
    done = [0] * len(st.lens)
    for step in schedule:
        sl, starts, ns, kv, sc = [], [], [], [], []
        for i, n in step:
            sl.append(slots[i])
            starts.append(done[i])
            ns.append(n)
            kv.append(st.kv[i][done[i]: done[i] + n])
            sc.append(st.score[i][done[i]: done[i] + n])
        meta = ForwardMeta.build(sl, starts, ns)
        fn(torch.cat(kv), torch.cat(sc), st.ape, st.norm_w, st.inv_freq, cache.state, cache.prev, cache.pool,
           cache.block_table, meta, st.m, EPS, torch.float32, post, dialect)
        for i, n in step:
            done[i] += n
        if check_steps:
            check_emitted(cache, st, slots, done, num_slots)
    assert done == st.lens
    return cache


def check_emitted(cache: PagedCache, st: Setup, slots, done, num_slots):
    """Rows of completed windows are written (finite), every other pool row is still NaN."""
    for i, slot in enumerate(slots):
        n_done = done[i] // st.m
        for w in range(cache.capacity()):
            row = cache.row(slot, w)
            if w < n_done:
                assert torch.isfinite(row).all(), f"seq {i}: entry {w} missing after {done[i]} tokens"
            else:
                assert torch.isnan(row).all(), f"seq {i}: entry {w} written after only {done[i]} tokens"
    for s in set(range(num_slots)) - set(slots):
        assert torch.isnan(cache.pool[cache.block_table[s]]).all(), f"unused slot {s} was written"
    assert torch.isnan(cache.pool[cache.spare]).all(), "a page outside the block table was written"


# ----------------------------------------------------------------------------- oracle


def naive_entries(st: Setup, i: int) -> torch.Tensor:
    """Entries of sequence i from its whole history, straight from spec §2.5 (float64)."""
    m, d = st.m, st.d
    kv, score, ape = st.kv[i].double(), st.score[i].double(), st.ape.double()
    out = []
    for w in range(st.lens[i] // m):
        zs, vs = [], []
        if st.overlap:
            if w > 0:  # A-halves of window w-1 (the A-slots are empty for w = 0)
                for j in range(m):
                    t = (w - 1) * m + j
                    zs.append(score[t, :d] + ape[j, :d])
                    vs.append(kv[t, :d])
            for j in range(m):  # B-halves of window w
                t = w * m + j
                zs.append(score[t, d:] + ape[j, d:])
                vs.append(kv[t, d:])
        else:
            for j in range(m):
                t = w * m + j
                zs.append(score[t] + ape[j])
                vs.append(kv[t])
        z, v = torch.stack(zs), torch.stack(vs)
        e = torch.exp(z - z.max(dim=0).values)  # per-channel softmax over the slots
        pooled = (e / e.sum(dim=0) * v).sum(dim=0)
        y = pooled / math.sqrt(float((pooled * pooled).mean()) + EPS) * st.norm_w.double()
        y = y.clone()
        r = 2 * st.inv_freq.numel()
        for k in range(st.inv_freq.numel()):
            # angle as one float32 product (the table is float32), then exact cos/sin
            ang = float(np.float32(w * m) * np.float32(st.inv_freq[k].item()))
            a, b = d - r + 2 * k, d - r + 2 * k + 1
            z_c = complex(y[a].item(), y[b].item()) * cmath.exp(1j * ang)
            y[a], y[b] = z_c.real, z_c.imag
        out.append(y)
    return torch.stack(out) if out else torch.empty(0, d, dtype=torch.float64)


def make_setup(kind, m, d=16, seed=0):
    lens = [5 * m + 3, 4 * m, 2 * m + 1]  # ends mid-window, on a boundary, one past a boundary
    return Setup(kind, m, d, lens, seed)


SLOTS = [2, 0, 3]  # slot 1 stays unused: its pages must remain untouched


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fn", provider_params("compress_kv"))
@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_matches_naive_on_every_split(fn, kind, m):
    st = make_setup(kind, m)
    want = [naive_entries(st, i) for i in range(len(st.lens))]
    first = None
    for name, sched in schedules(st.lens, m).items():
        cache = run(fn, st, SLOTS, sched)
        got = [cache.entries(SLOTS[i], st.lens[i] // m) for i in range(len(st.lens))]
        for i in range(len(st.lens)):
            assert got[i].shape[0] == st.lens[i] // m
            torch.testing.assert_close(got[i].double(), want[i], **TOL, msg=lambda s: f"{name}, seq {i}: {s}")
        if first is None:
            first = got
        else:  # split invariance, directly between splits
            for a, b in zip(first, got):
                torch.testing.assert_close(b, a, **TOL, msg=lambda s: f"{name} vs one_chunk: {s}")


@pytest.mark.parametrize("fn", provider_params("compress_kv"))
@pytest.mark.parametrize("kind,m", [("hca", 8), ("csa", 4)], ids=["hca8", "csa4"])
def test_large_scores_stay_finite(fn, kind, m):
    """Gate scores hundreds apart (exp would overflow float32 without a running max): still the naive
    entries, token by token and in random chunks."""
    st = make_setup(kind, m, seed=3)
    st.score = [150.0 * x for x in st.score]
    want = [naive_entries(st, i) for i in range(len(st.lens))]
    for sched in (sched_tokens(st.lens), sched_random(st.lens, 14, m + 1)):
        cache = run(fn, st, SLOTS, sched)
        for i in range(len(st.lens)):
            torch.testing.assert_close(cache.entries(SLOTS[i], st.lens[i] // m).double(), want[i], **TOL)


@pytest.mark.parametrize("fn", provider_params("compress_kv"))
@pytest.mark.parametrize("kind,m", [("hca", 8), ("csa", 4)], ids=["hca8", "csa4"])
def test_slot_reuse_after_reset(fn, kind, m):
    """A slot reused by a new sequence after reset_compressor_state carries nothing over (the old
    sequence stopped mid-window, leaving a non-empty accumulator and, for CSA, a non-empty prev)."""
    st_old = Setup(kind, m, 16, [3 * m + 2], seed=21)
    st_new = Setup(kind, m, 16, [3 * m + 1], seed=22)
    st_new.ape, st_new.norm_w = st_old.ape, st_old.norm_w
    cache = run(fn, st_old, [1], [[(0, 2 * m + 1)], [(0, m + 1)]], check_steps=False)
    assert torch.isfinite(cache.state[1, 0]).any(), "test premise: the old sequence left an open window"
    reset_compressor_state(cache.state, cache.prev, [1])
    cache.pool.fill_(float("nan"))
    done = 0
    for n in (m - 1, 2, 2 * m):
        meta = ForwardMeta.build([1], [done], [n])
        fn(st_new.kv[0][done:done + n], st_new.score[0][done:done + n], st_new.ape, st_new.norm_w,
           st_new.inv_freq, cache.state, cache.prev, cache.pool, cache.block_table, meta, m, EPS, torch.float32,
           "none", Fp8Dialect.OCP)
        done += n
    got = cache.entries(1, st_new.lens[0] // m)
    torch.testing.assert_close(got.double(), naive_entries(st_new, 0), **TOL)


# ----------------------------------------------------------------------------- post-processing


def e4m3_ocp_grid() -> torch.Tensor:
    """All finite non-negative OCP e4m3 values, from the bit layout (spec §4.1), float64."""
    vals = set()
    for e in range(16):
        for mant in range(8):
            if e == 15 and mant == 7:
                continue  # 0x7F is NaN
            vals.add(2.0 ** -6 * mant / 8 if e == 0 else 2.0 ** (e - 7) * (1 + mant / 8))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def check_fp8_blocks(plain: torch.Tensor, quant: torch.Tensor, nope: int):
    """quant[:, :nope] must be plain[:, :nope] rounded to nearest onto s * e4m3 in 64-wide blocks, with
    s = 2^ceil(log2(max(amax, 1e-4) / 448)); the rotary dims must be untouched."""
    grid = e4m3_ocp_grid()
    assert torch.equal(quant[:, nope:], plain[:, nope:]), "fp8 post-processing touched the rotary dims"
    for b0 in range(0, nope, 64):
        x = plain[:, b0:min(nope, b0 + 64)].double()
        q = quant[:, b0:min(nope, b0 + 64)].double()
        amax = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-4)
        s = torch.tensor([[2.0 ** math.ceil(math.log2(a / 448.0))] for a in amax.flatten().tolist()],
                         dtype=torch.float64)
        xs, qs = x / s, q / s
        dist_q = (qs.abs().unsqueeze(-1) - grid).abs().min(dim=-1).values
        assert (dist_q == 0).all(), "a value is not (power-of-two scale) x (FP8 e4m3 value)"
        assert (torch.sign(qs) * torch.sign(xs) >= 0).all()
        nearest = (xs.abs().unsqueeze(-1) - grid).abs().min(dim=-1).values
        assert ((qs - xs).abs() <= nearest + 1e-12).all(), "not rounded to the nearest FP8 value"


@pytest.mark.parametrize("fn", provider_params("compress_kv"))
@pytest.mark.parametrize("kind,m", [("hca", 4), ("csa", 4)], ids=["hca4", "csa4"])
def test_post_fp8(fn, kind, m):
    d = 128 + ROPE_DIM  # two 64-wide blocks of non-rotary dims
    st = Setup(kind, m, d, [4 * m + 3, 3 * m], seed=31)
    st.kv = [x * 3.0 for x in st.kv]
    sched = sched_random(st.lens, 32, m + 2)
    slots = [1, 0]
    plain = run(fn, st, slots, sched, post="none", num_slots=2)
    fp8 = run(fn, st, slots, sched, post="fp8", num_slots=2)
    fnuz = run(fn, st, slots, sched, post="fp8", dialect=Fp8Dialect.FNUZ, num_slots=2)
    changed = False
    for i, slot in enumerate(slots):
        n = st.lens[i] // m
        a, b, c = plain.entries(slot, n), fp8.entries(slot, n), fnuz.entries(slot, n)
        check_fp8_blocks(a, b, d - ROPE_DIM)
        changed |= bool((a[:, :d - ROPE_DIM] != b[:, :d - ROPE_DIM]).any())
        # the fnuz recipe (scale x2, clamp 224) lands on the same values as OCP
        torch.testing.assert_close(c, b, atol=0, rtol=0)
    assert changed, "fp8 post-processing changed nothing"


@pytest.mark.parametrize("fn", provider_params("compress_kv"))
def test_post_hadamard_fp4(fn):
    m, d = 4, 32  # the indexer's compressor: CSA overlap, Hadamard needs a power-of-two width
    st = Setup("csa", m, d, [5 * m + 2, 2 * m + 3], seed=41)
    sched = sched_random(st.lens, 42, m + 2)
    slots = [0, 2]
    plain = run(fn, st, slots, sched, post="none", num_slots=3)
    had = run(fn, st, slots, sched, post="hadamard_fp4", num_slots=3)
    for i, slot in enumerate(slots):
        n = st.lens[i] // m
        a, b = plain.entries(slot, n), had.entries(slot, n)
        torch.testing.assert_close(b, fp4_roundtrip(hadamard_transform(a), 32), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, b, atol=1e-3)
