"""Triton sparse_attention + write_window (dsv4/kernels/triton/attention.py) against the references, in
the Triton interpreter, on what tests/ops/test_attention_op.py does not cover: FP8 KV stores in both
dialects (compared with the reference run on the SAME Fp8KV store), the factor-of-two trap (FNUZ bytes
read as OCP), head padding lanes (H not a multiple of BLOCK_H), T = 1, split-KV, several compressed
tiles, strided (padded) stores / q / output, and write_window touching only its ring rows.

Small shapes: D = 64 with 16 rotary dims (48 FP8 dims: one ragged block) and D = 96 (80 FP8 dims: two
blocks), W = 8, pages of 16 tokens. Ring rows not yet written and pool rows nobody owns hold large
garbage, so reading them shows.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dsv4.kernels.triton.attention import sparse_attention_impl, write_window_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.attention import sparse_attention_reference, write_window
from dsv4.ops.kv_format import FP8_BLOCK, Fp8KV, kv_read, kv_write
from dsv4.ops.meta import ForwardMeta

W = 8
PAGE_TOKENS = 16
TOPK = 5
NUM_SLOTS = 4
SLOTS = [2, 0, 3]
LENS = [3, 21, 10]  # below one window, several windows, in between
LONG = [2, 37]  # 18 entries at ratio 2: two compressed tiles of 16


def sinks(H: int) -> torch.Tensor:
    base = torch.tensor([20.0, -20.0, 0.3, 2.0])  # large positive, large negative, ordinary
    return base.repeat(math.ceil(H / 4))[:H].clone()


# ----------------------------------------------------------------------------------------- stores


def make_store(kind: str, lead: tuple, D: int, R: int, g: torch.Generator, padded: bool = True):
    """A KV store filled with large garbage. kind: f32 | ocp | fnuz | ocp-bf16 (bf16 rope dims).
    padded: every component is a view of a wider buffer (rows not contiguous), to check strides."""
    pad = 3 if padded else 0
    if kind == "f32":
        buf = 30.0 * torch.randn(*lead, D + pad, generator=g)
        return buf[..., :D]
    dialect = Fp8Dialect.FNUZ if kind == "fnuz" else Fp8Dialect.OCP
    rdt = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    DN = D - R
    nsc = math.ceil(DN / FP8_BLOCK)
    st = Fp8KV(nope=torch.zeros(*lead, DN + pad, dtype=torch.uint8)[..., :DN],
               scale=torch.zeros(*lead, nsc + pad, dtype=torch.uint8)[..., :nsc],
               rope=torch.zeros(*lead, R + pad, dtype=rdt)[..., :R], dialect=dialect)
    kv_write(st, (Ellipsis,), (30.0 * torch.randn(*lead, D, generator=g)).to(rdt))
    return st


def clone_store(st):
    if isinstance(st, torch.Tensor):
        return st.clone()
    return Fp8KV(st.nope.clone(), st.scale.clone(), st.rope.clone(), st.dialect)


def assert_store_equal(a, b, msg=""):
    """Same stored rows. FP8 bytes may differ only as -0 (0x80, OCP) vs +0 (0x00): the Triton encoder
    writes +0 for zero of either sign."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=msg or None)
        return
    zero = lambda x: torch.where(x == 0x80, torch.zeros_like(x), x)  # noqa: E731
    if a.dialect is Fp8Dialect.OCP:
        assert torch.equal(zero(a.nope), zero(b.nope)), msg
    else:
        assert torch.equal(a.nope, b.nope), msg
    assert torch.equal(a.scale, b.scale), msg
    torch.testing.assert_close(a.rope, b.rope, atol=0, rtol=0, equal_nan=True, msg=msg or None)


class Case:
    """Per-sequence history (K=V rows, queries, compressed entries) and the stores holding them."""

    def __init__(self, kind: str, mode: str, ratio: int, H: int, seed: int, lens=LENS, D: int = 64, R: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.mode, self.ratio, self.H, self.D, self.lens = kind, mode, ratio, H, D, lens
        self.dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
        self.kv = [torch.randn(L, D, generator=g).to(self.dtype) for L in lens]
        self.q = [(1.5 * torch.randn(L, H, D, generator=g)).to(self.dtype) for L in lens]
        self.sink = sinks(H)
        self.window = make_store(kind, (NUM_SLOTS, W), D, R, g)
        self.pool = self.block_table = None
        if mode != "swa":
            E = PAGE_TOKENS // ratio
            pps = math.ceil(max(lens) / PAGE_TOKENS)
            P = NUM_SLOTS * pps + 1
            self.block_table = torch.randperm(P, generator=g)[: NUM_SLOTS * pps].view(NUM_SLOTS, pps).clone()
            self.pool = make_store(kind, (P, E), D, R, g)
            for i, L in enumerate(lens):
                ents = torch.randn(L // ratio, D, generator=g).to(self.dtype)
                w = torch.arange(L // ratio)
                kv_write(self.pool, (self.block_table[SLOTS[i], w // E], w % E), ents)


def index_row(rng: random.Random, p: int, ratio: int, t: int) -> list[int]:
    """Distinct visible entries and -1, shuffled; every 4th row all -1."""
    n_vis = (p + 1) // ratio
    k = 0 if t % 4 == 3 else rng.randint(0, min(TOPK, n_vis))
    row = rng.sample(range(n_vis), k) + [-1] * (TOPK - k)
    rng.shuffle(row)
    return row


def random_schedule(lens, seed, max_chunk):
    rng = random.Random(seed)
    done, steps = [0] * len(lens), []
    while any(d < L for d, L in zip(done, lens)):
        ready = [i for i in range(len(lens)) if done[i] < lens[i]]
        step = [(i, rng.randint(1, min(max_chunk, lens[i] - done[i]))) for i in ready if rng.random() < 0.7]
        if not step:
            step = [(rng.choice(ready), 1)]
        for i, n in step:
            done[i] += n
        steps.append(step)
    return steps


def drive(c: Case, schedule, atol=1e-5, rtol=1e-5, seed=3, **launch):
    """Run the schedule: Triton attention vs the reference on the same stores at every step, then the
    Triton write_window on the ring and the reference write_window on a mirror, which must agree."""
    rng = random.Random(seed)
    done = [0] * len(c.lens)
    mirror = clone_store(c.window)
    n_rows = 0
    for step in schedule:
        sl = [SLOTS[i] for i, _ in step]
        meta = ForwardMeta.build(sl, [done[i] for i, _ in step], [n for _, n in step])
        q = torch.cat([c.q[i][done[i]:done[i] + n] for i, n in step])
        kv = torch.cat([c.kv[i][done[i]:done[i] + n] for i, n in step])
        topk = None
        if c.mode == "csa":
            rows = [index_row(rng, p, c.ratio, n_rows + k) for k, p in enumerate(meta.positions.tolist())]
            topk = torch.tensor(rows, dtype=torch.int64)
        n_rows += meta.num_tokens
        ratio = c.ratio if c.mode != "swa" else 0
        args = (q, kv, c.window, c.sink, c.D ** -0.5, meta, c.pool, c.block_table, topk, ratio)
        out = sparse_attention_impl(*args, **launch)
        ref = sparse_attention_reference(*args)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda s: f"step {step}: {s}")
        write_window_triton(c.window, kv, meta)
        write_window(mirror, kv, meta)
        assert_store_equal(c.window, mirror, f"ring after step {step}")
        for i, n in step:
            done[i] += n
    assert done == list(c.lens)


MODES = [("swa", 0), ("csa", 4), ("hca", 4), ("hca", 2)]  # hca2: 8 entries per page
MODE_IDS = [f"{m}{r or ''}" for m, r in MODES]


@pytest.mark.parametrize("mode,ratio", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", ["f32", "ocp", "fnuz"])
def test_matches_reference(kind, mode, ratio):
    """Random chunking of three sequences. Float stores with H = 20 (a full head block of 16 and a
    padded one), FP8 stores with H = 4; hca2 runs a longer sequence (two compressed tiles)."""
    H = 20 if kind == "f32" else 4
    c = Case(kind, mode, ratio, H=H, seed=11 + ratio, lens=LONG if ratio == 2 else LENS)
    drive(c, random_schedule(c.lens, 5, 2 * W), block_h=16, block_n=16)


@pytest.mark.parametrize("mode,ratio,splits", [("csa", 4, 3), ("hca", 2, 5)], ids=["csa4-3", "hca2-5"])
def test_split_kv(mode, ratio, splits):
    """Split-KV (flash-decoding) with the combine kernel: splits that start mid-list, and empty ones."""
    c = Case("ocp", mode, ratio, H=4, seed=21, lens=LONG if ratio == 2 else LENS)
    drive(c, random_schedule(c.lens, 6, 2 * W), num_splits=splits, block_h=16, block_n=16)


@pytest.mark.parametrize("mode,ratio,splits", [("csa", 2, 1), ("csa", 2, 2), ("hca", 2, 1)])
def test_entry_prefetch(mode, ratio, splits):
    """Compressed entries over several tiles (BLOCK_N 4, up to 5 tiles a split) with the ids and pages fetched
    one and two tiles ahead (the default) and without: both equal the reference."""
    for prefetch in (True, False):
        c = Case("fnuz", mode, ratio, H=4, seed=23, lens=LONG)
        drive(c, random_schedule(c.lens, 7, 2 * W), num_splits=splits, block_h=16, block_n=4, prefetch=prefetch)


def test_decode_one_token_per_step():
    """Decode: T = 1 per step for a single sequence, HCA, FP8 FNUZ, H = 4 (12 padded lanes)."""
    c = Case("fnuz", "hca", 4, H=4, seed=31, lens=[13])
    drive(c, [[(0, 1)]] * 13)


def test_bf16_fp8_store():
    """bf16 queries / kv / rope dims with an OCP store: dots in fp32 under the interpreter, output
    rounded to bf16 (one ulp apart from the reference at most)."""
    c = Case("ocp-bf16", "csa", 4, H=4, seed=41, lens=[3, 14])
    drive(c, random_schedule(c.lens, 7, 2 * W), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["ocp", "fnuz"])
def test_two_fp8_blocks(kind):
    """D = 96, 16 rotary dims: 80 FP8 dims in two 64-blocks (the second ragged), BLOCK_D 128 > D."""
    c = Case(kind, "hca", 4, H=4, seed=51, lens=[14, 5], D=96)
    drive(c, random_schedule(c.lens, 8, 2 * W))


def test_factor_of_two_trap():
    """FNUZ bytes read as OCP are worth twice as much: the Triton output on the mislabelled store must
    be far from the reference on the real one, while the correctly labelled store matches."""
    c = Case("fnuz", "hca", 4, H=4, seed=61, lens=[24])
    meta1 = ForwardMeta.build([SLOTS[0]], [0], [12])
    write_window_triton(c.window, c.kv[0][:12], meta1)
    meta = ForwardMeta.build([SLOTS[0]], [12], [12])  # the window reaches back into the ring
    q, kv = c.q[0][12:], c.kv[0][12:]
    args = (q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, None, 4)
    ref = sparse_attention_reference(*args)
    good = sparse_attention_impl(*args)
    torch.testing.assert_close(good, ref, atol=1e-5, rtol=1e-5)
    lie = lambda st: Fp8KV(st.nope, st.scale, st.rope, Fp8Dialect.OCP)  # noqa: E731
    bad = sparse_attention_impl(q, kv, lie(c.window), c.sink, 0.125, meta, lie(c.pool), c.block_table, None, 4)
    assert (bad - ref).abs().max() > 0.3 * ref.abs().max()
    # window-only layer: the ring alone shows it too
    ref_w = sparse_attention_reference(q, kv, c.window, c.sink, 0.125, meta)
    bad_w = sparse_attention_impl(q, kv, lie(c.window), c.sink, 0.125, meta)
    assert (bad_w - ref_w).abs().max() > 0.3 * ref_w.abs().max()


def test_write_window_dialects_share_bytes():
    """Both dialects store the same FP8 bytes for the same rows (OCP grid reproduced in FNUZ with
    clamp 224): only the E8M0 scale bytes differ, by exactly one (FNUZ scale = 2 x OCP scale)."""
    g = torch.Generator().manual_seed(71)
    D, R = 96, 16
    meta = ForwardMeta.build([1, 3], [4, 0], [3, 5])
    kv = torch.randn(meta.num_tokens, D, generator=g) * torch.logspace(-3, 2, D)
    kv[1, :FP8_BLOCK] = 0.0  # an all-zero block: amax floor 1e-4
    a = make_store("ocp", (NUM_SLOTS, W), D, R, g)
    b = make_store("fnuz", (NUM_SLOTS, W), D, R, g)
    write_window_triton(a, kv, meta)
    write_window_triton(b, kv, meta)
    rows = (torch.tensor([1, 1, 1, 3, 3, 3, 3, 3]), torch.tensor([4, 5, 6, 0, 1, 2, 3, 4]))
    na, nb = a.nope[rows], b.nope[rows]
    assert torch.equal(torch.where(na == 0x80, torch.zeros_like(na), na), nb)
    assert torch.equal(b.scale[rows].int() - a.scale[rows].int(), torch.ones_like(a.scale[rows].int()))
    torch.testing.assert_close(kv_read(a, rows), kv_read(b, rows), atol=0, rtol=0)


@pytest.mark.parametrize("H,block_h", [(20, 16), (4, 16), (17, 32)])
def test_padding_lanes_and_strides(H, block_h):
    """T = 1 (the first token of a sequence, then a decode token of another), H not a multiple of
    BLOCK_H, q / kv / out / stores all strided views: the output view is written exactly (its
    surroundings keep their NaN), the caches are not touched."""
    c = Case("ocp", "csa", 4, H=H, seed=81, lens=[1, 30])
    write_window_triton(c.window, c.kv[1][:29], ForwardMeta.build([SLOTS[1]], [0], [29]))
    for seq, start in ((0, 0), (1, 29)):
        meta = ForwardMeta.build([SLOTS[seq]], [start], [1])
        qbuf = torch.full((3, H + 2, c.D + 5), float("nan"))
        qbuf[1, 1:H + 1, 2:c.D + 2] = c.q[seq][start]
        q = qbuf[1:2, 1:H + 1, 2:c.D + 2]
        kvbuf = torch.full((1, c.D + 7), float("nan"))
        kvbuf[0, 3:c.D + 3] = c.kv[seq][start]
        kv = kvbuf[:, 3:c.D + 3]
        topk = torch.tensor([[-1, 2, -1, 5, 0]]) if start else torch.full((1, TOPK), -1)
        args = (q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, topk, 4)
        before = (clone_store(c.window), clone_store(c.pool))
        obuf = torch.full((3, H + 3, c.D + 4), float("nan"))
        out = obuf[1:2, 2:H + 2, 1:c.D + 1]
        got = sparse_attention_impl(*args, block_h=block_h, block_n=16, out=out)
        assert got.data_ptr() == out.data_ptr()
        ref = sparse_attention_reference(q.contiguous(), kv.contiguous(), *args[2:])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        outside = torch.ones_like(obuf, dtype=torch.bool)
        outside[1:2, 2:H + 2, 1:c.D + 1] = False
        assert torch.isnan(obuf[outside]).all()
        assert_store_equal(c.window, before[0])
        assert_store_equal(c.pool, before[1])


def test_csa_all_invalid_rows_equal_window_only():
    c = Case("fnuz", "csa", 4, H=4, seed=91, lens=[12])
    meta = ForwardMeta.build([SLOTS[0]], [0], [12])
    q, kv = c.q[0], c.kv[0]
    none = torch.full((12, TOPK), -1, dtype=torch.int64)
    a = sparse_attention_impl(q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, none, 4)
    b = sparse_attention_impl(q, kv, c.window, c.sink, 0.125, meta)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    some = none.clone()
    some[11, 0] = 2
    s = sparse_attention_impl(q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, some, 4)
    torch.testing.assert_close(s[:11], b[:11], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(s[11], b[11], atol=1e-4)


@pytest.mark.parametrize("kind", ["f32", "ocp", "fnuz", "ocp-bf16"])
def test_write_window_only_ring_rows(kind):
    """Sentinels everywhere; a chunk longer than W, a short one, a single token: exactly the last W rows
    of each sequence land at slot pos % W (equal to the reference's kv_write), nothing else changes
    (other slots, other ring rows, the padding columns of the strided store)."""
    g = torch.Generator().manual_seed(101)
    D, R = 64, 16
    st = make_store(kind, (NUM_SLOTS, W), D, R, g)
    # sentinels, padding columns included
    if isinstance(st, torch.Tensor):
        st._base.fill_(float("nan"))
        bases = [st._base]
    else:
        for x, v in ((st.nope, 0x5A), (st.scale, 0x33), (st.rope, float("nan"))):
            x._base.fill_(v)
        bases = [st.nope._base, st.scale._base, st.rope._base]
    before = [x.clone() for x in bases]
    meta = ForwardMeta.build([3, 1, 0], [5, 0, 17], [W + 4, 3, 1])
    dt = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    kv = (torch.randn(meta.num_tokens, D, generator=g) * 3).to(dt)
    ref = clone_store(st)
    write_window_triton(st, kv, meta)
    write_window(ref, kv, meta)
    assert_store_equal(st, ref)
    written = torch.zeros(NUM_SLOTS, W, dtype=torch.bool)
    for s, p0, n, t0 in ((3, 5, W + 4, 0), (1, 0, 3, W + 4), (0, 17, 1, W + 7)):
        for p in range(max(p0, p0 + n - W), p0 + n):
            written[s, p % W] = True
            torch.testing.assert_close(kv_read(st, (s, p % W)).float(), kv[t0 + p - p0].float(),
                                       atol=0.0 if kind == "f32" else 0.05, rtol=0.0 if kind == "f32" else 0.07)
    for x, x0 in zip(bases, before):
        changed = ~((x == x0) | (torch.isnan(x) & torch.isnan(x0)))
        assert not changed[~written].any()  # other slots / rows untouched
        assert not changed[..., x.shape[-1] - 3:].any()  # padding columns untouched


def test_split_counts_agree_on_one_decode_token():
    """One decode token over a long HCA list (window 8 + 19 entries): automatic split count (1 here),
    forced 3 and forced 8 (more splits than tiles: empty splits) all equal the reference."""
    c = Case("f32", "hca", 2, H=4, seed=111, lens=[40])
    write_window_triton(c.window, c.kv[0][:39], ForwardMeta.build([SLOTS[0]], [0], [39]))
    args = (c.q[0][-1:], c.kv[0][-1:], c.window, c.sink, 0.125, ForwardMeta.build([SLOTS[0]], [39], [1]),
            c.pool, c.block_table, None, 2)
    ref = sparse_attention_reference(*args)
    for splits in (None, 3, 8):
        got = sparse_attention_impl(*args, num_splits=splits, block_n=16)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda s: f"num_splits={splits}: {s}")


@pytest.mark.parametrize("kind,H,D,block_h,splits", [("f32", 4, 64, 16, 1), ("ocp-bf16", 20, 64, 16, 1),
                                                     ("ocp-bf16", 20, 64, 16, 3), ("fnuz", 4, 96, 16, 4),
                                                     ("ocp-bf16", 17, 96, 32, 2)])
def test_inverse_rope_in_the_output_writer(kind, H, D, block_h, splits, monkeypatch):
    """`inv_rope`: the kernel that writes the output (the attention kernel, or the combine of split-KV) de-rotates
    it bit for bit as apply_rope(inverse=True) after the plain call does (rounded to q's dtype before and after,
    positions up to 1e6), for every token of a mixed prefill + decode step, padded head lanes (H 20 / 17 in
    blocks of 16 / 32), a ragged D (96, BLOCK_D 128) and both FP8 dialects; the reference with `inv_rope` is
    the reference then apply_rope; with the fusion off (knob) the wrapper applies the rope after, same bits."""
    import dsv4.kernels.triton.attention as kattn
    from dsv4.kernels.triton.rope import apply_rope_triton
    from dsv4.ops.rope import apply_rope_reference, rope_inv_freq

    c = Case(kind, "csa", 4, H=H, seed=131, lens=[9, 30], D=D)
    write_window_triton(c.window, c.kv[1][:26], ForwardMeta.build([SLOTS[1]], [999_964], [26]))
    meta = ForwardMeta.build([SLOTS[0], SLOTS[1]], [0, 999_990], [9, 4])  # large angles too
    q = torch.cat([c.q[0][:9], c.q[1][26:30]])
    kv = torch.cat([c.kv[0][:9], c.kv[1][26:30]])
    g = torch.Generator().manual_seed(5)
    topk = torch.randint(-1, 3, (13, TOPK), generator=g)
    inv = rope_inv_freq(10000.0, 16)
    args = (q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, topk, 4)
    launch = dict(num_splits=splits, block_h=block_h, block_n=16)
    plain = sparse_attention_impl(*args, **launch)
    fused = sparse_attention_impl(*args, inv, **launch)
    want = apply_rope_triton(plain, meta.positions, inv, inverse=True)
    assert fused.dtype == q.dtype and torch.equal(fused, want)
    assert not torch.equal(fused, plain)
    ref = sparse_attention_reference(*args)
    assert torch.equal(sparse_attention_reference(*args, inv), apply_rope_reference(ref, meta.positions, inv, True))
    monkeypatch.setattr(kattn, "FUSE_INV_ROPE", False)
    assert torch.equal(sparse_attention_impl(*args, inv, **launch), want)


@pytest.mark.parametrize("kind,splits,rope", [("f32", 3, False), ("ocp-bf16", 5, True), ("fnuz", 8, False)])
def test_last_split_program_combines(kind, splits, rope, monkeypatch, launches):
    """Split-KV: the last split program of each (token, head block) combines the splits (no combine launch),
    equal bit for bit to the combine kernel over three calls (the tile counters reset), with the inverse RoPE,
    more splits than tiles (empty splits), a mixed prefill + decode step."""
    import dsv4.kernels.triton.attention as kattn
    from dsv4.kernels.triton import common
    from dsv4.ops.rope import rope_inv_freq

    c = Case(kind, "hca", 4, H=20, seed=141, lens=[9, 30])
    write_window_triton(c.window, c.kv[1][:26], ForwardMeta.build([SLOTS[1]], [0], [26]))
    meta = ForwardMeta.build([SLOTS[0], SLOTS[1]], [0, 26], [9, 4])
    q = torch.cat([c.q[0][:9], c.q[1][26:30]])
    kv = torch.cat([c.kv[0][:9], c.kv[1][26:30]])
    args = (q, kv, c.window, c.sink, 0.125, meta, c.pool, c.block_table, None, 4,
            rope_inv_freq(10000.0, 16) if rope else None)
    launch = dict(num_splits=splits, block_h=16, block_n=16)
    monkeypatch.setattr(kattn, "LAST_COMBINE", False)
    want = sparse_attention_impl(*args, **launch)
    monkeypatch.setattr(kattn, "LAST_COMBINE", True)
    launched = launches(kattn, "_combine_kernel")
    for _ in range(3):
        assert torch.equal(sparse_attention_impl(*args, **launch), want)
    assert not launched, "the combine kernel still ran"
    assert int(common._COUNTERS[("cpu", None)].abs().sum()) == 0, "tile counters not reset"


def test_gpu_check_cases_measure_flash_attention(monkeypatch):
    """The GPU check measures the attention the model runs: every case at DeepSeek-V4-Flash shapes (heads,
    head / rope dims, window, top-k, HCA ratio, the cache's page size, all from the config); CSA, HCA and
    window-only layers each in decode and prefill; decode in every KV format the engine stores (bf16, FP8
    OCP and fnuz), from one sequence to at least the engine's default batch, and with more CSA entries than
    top-k (the selection does select); KV writes in decode and prefill; record names unique. The cases:
    benchmarks/kernel_cases/attention.py."""
    import inspect
    import json
    from importlib import resources

    import benchmarks.kernel_cases.attention as ka
    from dsv4.cache.model_cache import default_page_tokens
    from dsv4.config import HCA, EngineConfig, ModelConfig

    cfg = ModelConfig.from_dict(json.loads(resources.files("dsv4.configs").joinpath("deepseek-v4-flash.json")
                                           .read_text()))
    calls = {"_gpu_case": [], "_gpu_write_case": []}
    for fn, log in calls.items():  # each case's arguments, the function's own defaults applied
        sig = inspect.signature(getattr(ka, fn))
        monkeypatch.setattr(ka, fn, lambda *a, _s=sig, _l=log, **kw: _l.append(_s.bind(*a, **kw)))
    names = [n for n, _ in ka.gpu_check_cases()]
    assert len(names) == len(set(names))
    for b in calls["_gpu_case"] + calls["_gpu_write_case"]:
        b.apply_defaults()
    attn = [b.arguments for b in calls["_gpu_case"]]
    writes = [b.arguments for b in calls["_gpu_write_case"]]
    (hca_ratio,) = {r for t, r in zip(cfg.layer_types, cfg.compress_ratios) if t == HCA}
    flash = dict(H=cfg.num_heads, D=cfg.head_dim, r=cfg.rope_head_dim, W=cfg.sliding_window, K=cfg.index_topk,
                 hca_ratio=hca_ratio, page_tokens=default_page_tokens(cfg))
    for a in attn:
        assert {k: a[k] for k in flash} == flash, a
        assert a["ctx"] <= cfg.max_position_embeddings and a["device"] == "cuda" and a["bench"], a
    for mode in ("csa", "hca", "swa"):
        assert {a["prefill"] for a in attn if a["mode"] == mode} == {False, True}, mode
    decode = [a for a in attn if not a["prefill"]]
    assert {a["kv_kind"] for a in decode} == {"bf16", "fp8", "fp8-fnuz"}
    batches = {a["batch"] for a in decode}
    assert min(batches) == 1 and max(batches) >= EngineConfig().max_num_seqs, batches
    assert any(a["ctx"] // cfg.csa_ratio() > cfg.index_topk for a in decode if a["mode"] == "csa")
    for w in writes:
        assert (w["D"], w["r"], w["W"]) == (cfg.head_dim, cfg.rope_head_dim, cfg.sliding_window), w
    assert {w["n_new"] == 1 for w in writes} == {True, False}


@pytest.mark.parametrize("mode,prefill,kind", [("csa", False, "fp8"), ("hca", False, "fp8-fnuz"),
                                               ("csa", True, "bf16"), ("swa", False, "fp8")])
def test_gpu_check_case_smoke(mode, prefill, kind):
    """The GPU check code itself (input building, reference comparison, byte counts) at tiny shapes on
    the CPU, without timing: the lead runs it once on the GPU."""
    from benchmarks.kernel_cases.attention import _gpu_case, _gpu_write_case

    kw = dict(device="cpu", H=4, D=64, r=16, W=8, K=6, page_tokens=16, hca_ratio=8, bench=False)
    res = _gpu_case(mode, 6 if prefill else 2, 36, kind, prefill=prefill, sweep=[dict(num_splits=2, block_n=16)],
                    **kw)()
    assert res["max_abs_err"] < 1e-4 and res["bytes"] > 0 and res["flops"] > 0, res
    assert res["sweep {'num_splits': 2, 'block_n': 16}"]["max_abs_err"] < 1e-4
    assert _gpu_write_case(2, 3, kind, device="cpu", D=64, r=16, W=8, bench=False)()["bytes_equal_reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,mode,ratio", [("ocp", "swa", 0), ("ocp", "csa", 4), ("ocp", "hca", 16),
                                             ("fnuz", "hca", 16), ("bf16", "csa", 4)])
def test_gpu_compiled_flash_widths(kind, mode, ratio):
    """Compiled kernels at Flash widths (64 heads x 512 = 448 FP8 dims in 7 scale blocks + 64 rope dims), a step
    mixing a prefill chunk that reaches into the ring with decodes (the hardware OCP decode where the GPU has
    it), launch shapes of both regimes (head blocks of 16-64, split-KV on and off), against the reference on
    the same stores."""
    from dsv4.kernels.triton.rope import apply_rope_triton
    from dsv4.ops.kv_format import kv_alloc
    from dsv4.ops.rope import rope_inv_freq

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(91)
    H, D, R, Wn, PT, K = 64, 512, 64, 128, 256, 64
    fp8 = kind != "bf16"
    dialect = Fp8Dialect.FNUZ if kind == "fnuz" else Fp8Dialect.OCP
    slots, starts, news = [1, 0, 2], [200, 1000, 7], [37, 1, 1]
    meta = ForwardMeta.build(slots, starts, news, device=dev)
    T = meta.num_tokens
    window = kv_alloc((3, Wn), D, R, fp8, torch.bfloat16, dev, dialect)
    kv_write(window, (Ellipsis,), 3.0 * torch.randn(3, Wn, D, device=dev, generator=g))
    pool = bt = topk = None
    if ratio:
        E = PT // ratio
        pps = math.ceil(1001 / PT)
        pool = kv_alloc((3 * pps + 2, E), D, R, fp8, torch.bfloat16, dev, dialect)
        kv_write(pool, (Ellipsis,), 3.0 * torch.randn(3 * pps + 2, E, D, device=dev, generator=g))
        bt = torch.randperm(3 * pps + 2, device=dev, generator=g)[:3 * pps].view(3, pps)
        if mode == "csa":
            vis = (meta.positions + 1) // ratio
            score = torch.rand(T, 1001 // ratio, device=dev, generator=g)
            score = score.masked_fill(torch.arange(score.shape[1], device=dev)[None, :] >= vis[:, None], -1.0)
            val, ids = score.topk(K, dim=-1)
            topk = torch.where(val < 0, torch.full_like(ids, -1), ids)
    q = torch.randn(T, H, D, device=dev, generator=g).to(torch.bfloat16)
    kv = torch.randn(T, D, device=dev, generator=g).to(torch.bfloat16)
    sink = torch.randn(H, device=dev, generator=g)
    args = (q, kv, window, sink, D ** -0.5, meta, pool, bt, topk, ratio)
    ref = sparse_attention_reference(*args).float()
    inv = rope_inv_freq(10000.0, R)
    for launch in ({}, {"num_splits": 1}, {"num_splits": 7}, {"block_h": 16, "num_splits": 1},
                   {"block_h": 32, "num_stages": 2, "num_splits": 5}, {"block_h": 64, "block_n": 16, "num_warps": 8}):
        out = sparse_attention_impl(*args, **launch)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda s: f"{launch}: {s}")
        fused = sparse_attention_impl(*args, inv, **launch)  # inverse RoPE in the output writer: same bits
        assert torch.equal(fused, apply_rope_triton(out, meta.positions, inv, inverse=True)), launch
        if launch.get("num_splits", 1) > 1:  # the last split program's combine equals the combine kernel
            import dsv4.kernels.triton.attention as kattn
            kattn.LAST_COMBINE = not kattn.LAST_COMBINE
            try:
                assert torch.equal(sparse_attention_impl(*args, inv, **launch), fused), launch
            finally:
                kattn.LAST_COMBINE = not kattn.LAST_COMBINE
