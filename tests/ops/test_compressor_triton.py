"""The Triton compress_kv provider (dsv4/kernels/triton/compressor.py) in the interpreter, beyond the shared
op tests: step by step against the reference on identical caches (same NaN / sentinel-filled pools, same
state, prev and garbage in unused slots), comparing the WHOLE pool, state and prev after every step, so
an entry written for an incomplete window, a stray write or a state that drifts shows at once.

Covered: random chunkings over several steps mixing prefill chunks and decode-only steps (the in-place
decode path and the scratch path), HCA and CSA (state carried, CSA prev), several channel blocks with a
ragged last one (d = 48), post "none" / "fp8" (ragged 64-block: 40 non-rotary dims) / "hadamard_fp4",
FP8 pool stores in both dialects (bytes, scales, rope rows) and the factor-of-two trap (FNUZ bytes read
as OCP must not match), bf16 activations and pool, one token, many sequences, steps whose windows each
straddle a boundary (the touched-window bound is tight)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import dsv4.kernels.triton.compressor as tcp
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.compressor import compress_kv_reference, reset_compressor_state
from dsv4.ops.kv_format import Fp8KV, kv_read
from dsv4.ops.meta import ForwardMeta

EPS = 1e-6
PAGE_TOKENS = 32
ROPE = 8


class Case:
    """Compressor weights, per-sequence projections, and a paged cache (pool, state, prev)."""

    def __init__(self, kind, m, d, lens, seed, num_slots=5, fp8=None, pool_dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.m, self.d, self.lens = m, d, lens
        self.overlap = kind == "csa"
        c = 2 if self.overlap else 1
        self.ape = torch.randn(m, c * d, generator=g) * 0.7
        self.norm_w = 1.0 + 0.3 * torch.randn(d, generator=g)
        self.inv_freq = (1.0 / (50.0 ** (torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE))).float()
        self.kv = [torch.randn(L, c * d, generator=g) * 2.0 for L in lens]
        self.score = [2.0 * torch.randn(L, c * d, generator=g) for L in lens]
        E = PAGE_TOKENS // m
        pps = math.ceil(max(lens) / PAGE_TOKENS)
        P = num_slots * pps + 2
        self.E = E
        self.block_table = torch.randperm(P, generator=g)[: num_slots * pps].view(num_slots, pps).clone()
        if fp8 is None:
            self.pool = torch.full((P, E, d), float("nan"), dtype=pool_dtype)
        else:
            nope = d - ROPE
            self.pool = Fp8KV(nope=torch.full((P, E, nope), 0x5A, dtype=torch.uint8),
                              scale=torch.full((P, E, math.ceil(nope / 64)), 0xEE, dtype=torch.uint8),
                              rope=torch.full((P, E, ROPE), float("nan"), dtype=pool_dtype),
                              dialect=Fp8Dialect.parse(fp8))
        self.state = 50.0 * torch.randn(num_slots, 3, c * d, generator=g)  # garbage in unused slots
        self.prev = 50.0 * torch.randn(num_slots, 3, d, generator=g) if self.overlap else None


def run_both(case: Case, slots, schedule, act=torch.float32, post="none", dialect=Fp8Dialect.OCP, tol=None):
    """Drive the reference and the Triton provider on deep copies of the same cache, compare after
    every step; return the two final caches."""
    for s in slots:
        reset_compressor_state(case.state, case.prev, s)
    ref, tri = copy.deepcopy(case), copy.deepcopy(case)
    tol = tol or dict(atol=1e-5, rtol=1e-5)
    done = [0] * len(case.lens)
    for k, step in enumerate(schedule):
        sl, st, ns, kv, sc = [], [], [], [], []
        for i, n in step:
            sl.append(slots[i])
            st.append(done[i])
            ns.append(n)
            kv.append(case.kv[i][done[i]: done[i] + n])
            sc.append(case.score[i][done[i]: done[i] + n])
            done[i] += n
        meta = ForwardMeta.build(sl, st, ns)
        kvt, sct = torch.cat(kv).to(act), torch.cat(sc).to(act)
        for c, fn in ((ref, compress_kv_reference), (tri, tcp.compress_kv_triton)):
            fn(kvt.float(), sct.float(), c.ape, c.norm_w, c.inv_freq, c.state, c.prev, c.pool, c.block_table,
               meta, case.m, EPS, act, post, dialect)
        compare(ref, tri, tol, f"step {k} {step}")
    return ref, tri


def compare(ref: Case, tri: Case, tol, where):
    torch.testing.assert_close(tri.state, ref.state, atol=1e-4, rtol=1e-5, equal_nan=True,
                               msg=lambda s: f"{where}: state {s}")
    if ref.prev is not None:
        torch.testing.assert_close(tri.prev, ref.prev, atol=1e-4, rtol=1e-5, equal_nan=True,
                                   msg=lambda s: f"{where}: prev {s}")
    if isinstance(ref.pool, Fp8KV):
        a, b = ref.pool, tri.pool
        assert torch.equal(a.scale, b.scale), f"{where}: scale bytes differ"
        # bytes agree except the sign of zero (OCP's -0 is 0x80 in the reference, 0x00 here)
        same = (a.nope == b.nope) | (((a.nope & 0x7F) == 0) & ((b.nope & 0x7F) == 0))
        assert bool(same.all()), f"{where}: {int((~same).sum())} FP8 bytes differ"
        torch.testing.assert_close(b.rope, a.rope, equal_nan=True, **tol, msg=lambda s: f"{where}: rope {s}")
    else:
        torch.testing.assert_close(tri.pool, ref.pool, equal_nan=True, **tol, msg=lambda s: f"{where}: pool {s}")
        if ref.pool.dtype == torch.bfloat16:
            # last-place differences only where the fp32 value sits on a rounding boundary: rare
            a, b = ref.pool.float(), tri.pool.float()
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
            assert float(same.float().mean()) > 0.99, f"{where}: {int((~same).sum())} bf16 values differ"


def random_schedule(lens, m, seed, decode_every=3):
    """Random chunks (several sequences per step, joining at different times), with every
    `decode_every`-th step a decode step (one token for every unfinished sequence)."""
    rng = random.Random(seed)
    done = [0] * len(lens)
    steps = []
    while any(d < L for d, L in zip(done, lens)):
        ready = [i for i in range(len(lens)) if done[i] < lens[i]]
        if len(steps) % decode_every == decode_every - 1:
            step = [(i, 1) for i in ready]
        else:
            step = [(i, rng.randint(1, min(2 * m + 3, lens[i] - done[i]))) for i in ready if rng.random() < 0.7]
            if not step:
                i = rng.choice(ready)
                step = [(i, rng.randint(1, lens[i] - done[i]))]
        for i, n in step:
            done[i] += n
        steps.append(step)
    return steps


KINDS = [("hca", 8), ("csa", 4)]


@pytest.mark.parametrize("post", ["none", "fp8"])
@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_random_chunks_vs_reference(monkeypatch, kind, m, post):
    """d = 48 in blocks of 16 channels (3 channel-block programs per window), 40 non-rotary dims (a ragged
    FP8 block), four sequences in slots 3, 0, 4, 1 (slot 2 unused), prefill chunks and decode steps; token
    chunks of 2 rows, so a window takes several online-softmax updates and chunks straddle windows."""
    monkeypatch.setattr(tcp, "FORCE_BLOCK_C", 16)
    monkeypatch.setattr(tcp, "FORCE_BLOCK_TOK", 2)
    case = Case(kind, m, 48, [4 * m + 3, 3 * m, 2 * m + 1, 5], seed=1 if post == "none" else 2)
    run_both(case, [3, 0, 4, 1], random_schedule(case.lens, m, 7), post=post)


def test_hadamard_fp4_vs_reference():
    """The indexer's compressor: CSA, d = 32, Hadamard + FP4 round trip, random chunks."""
    case = Case("csa", 4, 32, [4 * 4 + 3, 2 * 4 + 2, 9], seed=3)
    run_both(case, [1, 4, 0], random_schedule(case.lens, 4, 8), post="hadamard_fp4")


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_fp8_pool_store(kind, m, dialect):
    """An Fp8KV pool (nope bytes + E8M0 scales + fp32 rope rows, sentinel-filled) in either dialect, with
    the official fp8 post in the same dialect: bytes, scales and rope rows as the reference writes them."""
    # 136 non-rotary dims: 3 scale blocks, the last one ragged, in a 256-wide register block
    case = Case(kind, m, 144, [3 * m + 1, 2 * m], seed=4, fp8=dialect)
    run_both(case, [2, 0], random_schedule(case.lens, m, 9), post="fp8", dialect=dialect)


def test_fp8_factor_of_two_trap():
    """The FNUZ store holds the OCP payload bytes with scale bytes one higher (spec §4.4); its bytes read
    as OCP decode to twice the values, which must not pass for the reference's entries."""
    m = 4
    ocp = Case("csa", m, 48 + 64, [3 * m], seed=5, fp8=Fp8Dialect.OCP)
    fnuz = Case("csa", m, 48 + 64, [3 * m], seed=5, fp8=Fp8Dialect.FNUZ)
    sched = [[(0, 5)], [(0, 7)]]
    ref_o, tri_o = run_both(ocp, [1], sched, post="fp8", dialect=Fp8Dialect.OCP)
    ref_f, tri_f = run_both(fnuz, [1], sched, post="fp8", dialect=Fp8Dialect.FNUZ)
    E = ocp.E
    rows = (ocp.block_table[1, torch.arange(3) // E], torch.arange(3) % E)
    a, b = tri_o.pool, tri_f.pool
    assert torch.equal(b.scale[rows].int(), a.scale[rows].int() + 1)
    nz = (a.nope[rows] & 0x7F) != 0
    assert torch.equal(a.nope[rows][nz], b.nope[rows][nz])
    right = kv_read(b, rows)
    torch.testing.assert_close(right, kv_read(ref_f.pool, rows))
    torch.testing.assert_close(right, kv_read(a, rows))  # both dialects store the same values
    wrong = kv_read(Fp8KV(nope=b.nope, scale=b.scale, rope=b.rope, dialect=Fp8Dialect.OCP), rows)
    nope = 48 + 64 - ROPE
    ratio = wrong[:, :nope][right[:, :nope] != 0] / right[:, :nope][right[:, :nope] != 0]
    assert torch.all(ratio == 2.0), "FNUZ bytes read as OCP must be exactly twice the value"
    assert not torch.allclose(wrong, right)


@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_bf16_activations_and_pool(kind, m):
    """act_dtype and pool in bf16 (the kernel's bf16 rounding is bit arithmetic, so it is exact in the
    interpreter too); at most a last-place bf16 difference from a different fp32 summation order."""
    case = Case(kind, m, 32, [3 * m + 2, 2 * m + 1], seed=6, pool_dtype=torch.bfloat16)
    run_both(case, [0, 3], random_schedule(case.lens, m, 10), act=torch.bfloat16,
             tol=dict(atol=2e-2, rtol=1e-2))


@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_many_sequences_decode_and_boundaries(kind, m):
    """Ten sequences: a prefill step that leaves them at every offset within a window, decode steps (T = B,
    the in-place path) across window completions, then a step of two tokens each from one before a
    boundary (every sequence touches two windows: the touched-window bound is tight)."""
    B = 10
    case = Case(kind, m, 16, [5 * m] * B, seed=7, num_slots=B + 1)
    first = [(i, 1 + i % (m + 2)) for i in range(B)]
    done = [n for _, n in first]
    steps = [first]
    for _ in range(m):
        steps.append([(i, 1) for i in range(B)])
        done = [x + 1 for x in done]
    # bring each sequence to one before its next window boundary, then two tokens each
    steps.append([(i, (m - 1 - done[i] % m) or m) for i in range(B)])
    done = [x + ((m - 1 - x % m) or m) for x in done]
    steps.append([(i, 2) for i in range(B)])
    done = [x + 2 for x in done]
    steps.append([(i, L - x) for i, (x, L) in enumerate(zip(done, case.lens)) if L > x])
    slots = list(range(1, B + 1))
    run_both(case, slots, steps)


@pytest.mark.parametrize("kind,m", KINDS, ids=[f"{k}{m}" for k, m in KINDS])
def test_one_token(kind, m):
    """T = 1 steps of one sequence from position 0 through two windows (and a lone one-token step of a
    second sequence in between)."""
    case = Case(kind, m, 16, [2 * m + 1, 1], seed=8)
    steps = [[(0, 1)] for _ in range(m)] + [[(1, 1)]] + [[(0, 1)] for _ in range(m + 1)]
    run_both(case, [4, 2], steps)
