"""The Triton MoE kernels (dsv4/kernels/triton/moe.py) and the expert map / dispatch layout
(dsv4/ops/moe_dispatch.py) in the interpreter (fp32), against the references: experts with 0, 1 and many
tokens, token counts not a multiple of the block, all tokens on one expert (also twice per token), one
token, 1024+ tokens, every tile regime forced, dense / FP8 (both dialects) / FP4 weights over several
K and N tiles, act_quant in both dialects (fnuz == OCP bit for bit; fnuz bytes read as OCP must fail), an
expert map with half the experts remote (vs the reference restricted to local experts, and the proposed
mapped reference), padding lanes poisoned (sentinel slots past the logical bound, valid-looking slots in
unused blocks, NaN activation rows around x, sentinel-filled workspaces that must stay untouched), the
dispatch invariants, and the fused router vs the reference (learned with / without bias, hash, every score
function, extreme logits). The generic op tests in test_small_ops.py also run these providers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.triton import moe as km  # noqa: E402
from dsv4.kernels.triton import router as kr  # noqa: E402
from dsv4.numerics.fp4 import quantize_fp4_blocks  # noqa: E402
from dsv4.numerics.fp8 import Fp8Dialect, ocp_to_fnuz, quantize_fp8_blocks  # noqa: E402
from dsv4.ops.linear import linear_reference  # noqa: E402
from dsv4.ops.moe import moe_experts_reference, moe_route_reference, swiglu  # noqa: E402
from dsv4.ops.moe_dispatch import (ExpertMap, check_expert_ids, dispatch_reference,  # noqa: E402
                                   dispatch_sizes)
from dsv4.ops.registry import all_ops  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

OCP, FNUZ = Fp8Dialect.OCP, Fp8Dialect.FNUZ
LIMIT = 1.5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================= inputs


def make_experts(fmt: str, E: int, D: int, I: int, seed: int, dialect=OCP):
    """Expert weights in `fmt` with magnitudes varying per scale block (so a misplaced scale shows)."""
    g = gen(seed)
    w13 = 0.3 * torch.randn(E, 2 * I, D, generator=g)
    w2 = 0.2 * torch.randn(E, D, I, generator=g)
    if fmt == "dense":
        return w13, None, w2, None
    if fmt == "fp4":
        w13 = w13 * torch.exp2(torch.randint(-2, 2, (E, 2 * I, D // 32), generator=g).float()).repeat_interleave(32, -1)
        w2 = w2 * torch.exp2(torch.randint(-2, 2, (E, D, I // 32), generator=g).float()).repeat_interleave(32, -1)
        a, sa = quantize_fp4_blocks(w13, 32)
        b, sb = quantize_fp4_blocks(w2, 32)
        return a, sa, b, sb

    def fp8(w):
        n, k = w.shape[1], w.shape[2]
        mag = torch.exp2(torch.randint(-2, 2, (w.shape[0], -(-n // 128), -(-k // 128)), generator=g).float())
        w = w * mag.repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)[:, :, :k]
        q, s = quantize_fp8_blocks(w, (128, 128), OCP)
        q = torch.where(q == 0x80, torch.zeros_like(q), q)  # -0 -> +0 (not the fnuz NaN byte)
        if dialect is FNUZ:
            q, s = ocp_to_fnuz(q, s)
        return q.view(dialect.torch_dtype), s

    a, sa = fp8(w13)
    b, sb = fp8(w2)
    return a, sa, b, sb


def make_inputs(T: int, D: int, ids: torch.Tensor, seed: int):
    x = torch.randn(T, D, generator=gen(seed))
    w = 0.2 + torch.rand(ids.shape, generator=gen(seed + 1))
    return x, w


def random_ids(T: int, E: int, k: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k,
                                                                                                       dtype=torch.long)


def skewed_ids(T: int = 21, E: int = 8) -> torch.Tensor:
    """Expert 0: no token; expert 1: exactly one; expert 2: every token; the rest random. k = 3."""
    g = gen(5)
    rest = torch.randint(3, E, (T, 2), generator=g)
    rest[:, 1] = torch.where(rest[:, 1] == rest[:, 0], 3 + (rest[:, 0] - 3 + 1) % (E - 3), rest[:, 1])
    ids = torch.cat([torch.full((T, 1), 2), rest], dim=1)
    ids[T // 2, 1] = 1
    c = torch.bincount(ids.flatten(), minlength=E)
    assert c[0] == 0 and c[1] == 1 and c[2] == T
    return ids


def check(got, want, atol=1e-5, rtol=1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=rtol)


# ============================================================================= expert map


def test_provider_registered():
    ops = all_ops()
    assert "triton" in ops["moe_route"].providers and "triton" in ops["moe_experts"].providers


def test_expert_map():
    m = ExpertMap(10, (7, 2, 5))
    assert m.num_local == 3 and not m.is_identity
    g2l = m.global_to_local("cpu")
    assert g2l.dtype == torch.int32 and g2l.tolist() == [-1, -1, 1, -1, -1, 2, -1, 0, -1, -1]
    assert m.global_to_local("cpu") is g2l  # cached per device
    assert m == ExpertMap(10, [7, 2, 5]) and hash(m) == hash(ExpertMap(10, (7, 2, 5)))
    ident = ExpertMap.identity(4)
    assert ident.is_identity and ident.global_to_local().tolist() == [0, 1, 2, 3]
    parts = [ExpertMap.contiguous(10, r, 3) for r in range(3)]
    assert sum((p.local_ids for p in parts), ()) == tuple(range(10))
    for bad in ((10, (3, 3)), (10, (10,)), (10, (-1,))):
        with pytest.raises(ValueError):
            ExpertMap(*bad)


def test_max_blocks_bound():
    """sum_e cdiv(c_e, bm) <= cdiv(N, bm) + min(E_local, N) for every distribution of N pairs."""
    g = gen(6)
    for _ in range(300):
        E = int(torch.randint(1, 40, (1,), generator=g))
        N = int(torch.randint(0, 300, (1,), generator=g))
        bm = int(2 ** torch.randint(0, 7, (1,), generator=g))
        c = torch.bincount(torch.randint(0, E, (N,), generator=g), minlength=E) if N else torch.zeros(E, dtype=torch.long)
        need = int(((c + bm - 1) // bm).sum())
        assert need <= dispatch_sizes(N, E, bm)[0]


# ============================================================================= dispatch


def test_dispatch_reference_layout():
    ids = torch.tensor([[3, 0], [0, 2], [3, 0]])  # pairs 0..5 -> experts 3, 0, 0, 2, 3, 0
    m = ExpertMap(4, (0, 3))  # expert 2 remote, expert 3 at local index 1
    slots, bexp, nvb = dispatch_reference(ids, m, 2)
    assert dispatch_sizes(6, 2, 2) == (5, 10)
    assert slots.tolist() == [1, 2, 5, -1, 0, 4, -1, -1, -1, -1]
    assert bexp.tolist() == [0, 0, 1, -1, -1] and int(nvb) == 3


def check_dispatch_invariants(slots, bexp, nvb, ids, emap, bm):
    N = ids.numel()
    mb, mr = dispatch_sizes(N, emap.num_local, bm)
    assert slots.shape == (mr,) and bexp.shape == (mb,) and slots.dtype == bexp.dtype == torch.int32
    loc = emap.global_to_local()[ids.reshape(-1)]
    nv = int(nvb)
    assert (bexp[:nv] >= 0).all() and (bexp[nv:] == -1).all()
    assert (bexp[:nv].diff() >= 0).all()  # experts in local order, each contiguous
    assert (slots[nv * bm:] == -1).all()
    seen = []
    for b in range(nv):
        blk = slots[b * bm:(b + 1) * bm]
        valid = blk[blk >= 0]
        assert valid.numel() > 0  # a used block holds at least one pair
        assert (blk[: valid.numel()] >= 0).all()  # padding only at the end of a block
        assert (loc[valid.long()] == bexp[b]).all()  # single-expert blocks
        seen += valid.tolist()
    want = sorted(i for i in range(N) if loc[i] >= 0)
    assert sorted(seen) == want  # every local pair exactly once, remote pairs nowhere


DISPATCH_CASES = {
    "skewed": (lambda: skewed_ids(), ExpertMap.identity(8), 4),
    "one_expert_twice": (lambda: torch.full((19, 2), 5), ExpertMap.identity(8), 16),
    "one_token": (lambda: torch.tensor([[5, 0, 3]]), ExpertMap.identity(8), 16),
    "half_remote": (lambda: random_ids(37, 16, 4, 7), ExpertMap(16, (13, 2, 7, 0, 9, 4, 15, 10)), 8),
    "all_remote": (lambda: torch.tensor([[1, 3], [3, 5]]), ExpertMap(8, (0, 2)), 16),
    "many": (lambda: random_ids(1100, 8, 2, 8), ExpertMap.identity(8), 64),
}


@pytest.mark.parametrize("case", sorted(DISPATCH_CASES))
@pytest.mark.parametrize("path", ["default", "three_launch", "one_program"])
def test_dispatch(case, path, monkeypatch):
    """Every case through the default choice, the three-launch path and the one-program path (N <= 256 only:
    its [N, N] comparison)."""
    mk, emap, bm = DISPATCH_CASES[case]
    ids = mk()
    from dsv4.kernels.triton import moe_dispatch as kd

    if path == "three_launch":
        monkeypatch.setattr(kd, "SMALL_N", 0)
    elif path == "one_program":
        if ids.numel() > 256:
            pytest.skip("the one-program dispatch is for few pairs")
        monkeypatch.setattr(kd, "SMALL_N", 256)
    ref = dispatch_reference(ids, emap, bm)
    check_dispatch_invariants(*ref, ids, emap, bm)
    slots, bexp, nvb, counts, ok, rows = km.moe_dispatch_triton(ids, emap, bm)
    check_dispatch_invariants(slots, bexp, nvb, ids, emap, bm)
    assert ok.tolist() == [1] and rows.tolist() == [int(nvb) * bm]
    assert torch.equal(bexp, ref[1]) and int(nvb) == int(ref[2])
    loc = emap.global_to_local()[ids.reshape(-1)]
    assert counts[:-1].tolist() == [int((loc == e).sum()) for e in range(emap.num_local)] and int(counts[-1]) == 0
    for b in range(int(nvb)):  # same pairs per expert (order inside an expert is free)
        e = int(bexp[b])
        mine = slots[(bexp == e).repeat_interleave(bm)]
        theirs = ref[0][(ref[1] == e).repeat_interleave(bm)]
        assert sorted(mine.tolist()) == sorted(theirs.tolist())


@pytest.mark.parametrize("N_tok,k,E,bm", [(1, 6, 256, 8), (4, 6, 256, 16), (10, 6, 64, 16), (3, 2, 8, 4)])
def test_dispatch_one_program_equals_reference(N_tok, k, E, bm, monkeypatch):
    """Decode-sized calls (with the one-program dispatch on: SMALL_N 64) take it, whose pair order inside an expert
    is ascending like the reference's: the layout equals the reference slot for slot (pad value included),
    counters and flags written without a memset (the buffers start as garbage: torch.empty)."""
    from dsv4.kernels.triton import moe_dispatch as kd

    monkeypatch.setattr(kd, "SMALL_N", 64)
    assert N_tok * k <= kd.SMALL_N
    for seed in range(3):
        ids = random_ids(N_tok, E, k, seed=40 + seed)
        if seed == 2:
            ids[0, :] = ids[0, 0]  # one expert hit k times by one token
        emap = ExpertMap.identity(E)
        ref = dispatch_reference(ids, emap, bm)
        for pad in (-1, ids.numel()):
            slots, bexp, nvb, counts, ok, rows = kd.moe_dispatch_triton(ids, emap, bm, pad=pad)
            want = torch.where(ref[0] == -1, torch.full_like(ref[0], pad), ref[0])
            assert torch.equal(slots, want) and torch.equal(bexp, ref[1]) and int(nvb) == int(ref[2])
            assert rows.tolist() == [int(ref[2]) * bm]
            loc = ids.reshape(-1)
            assert counts.tolist() == [int((loc == e).sum()) for e in range(E)] + [0] and ok.tolist() == [1]


def test_dispatch_counts_out_of_range_ids():
    ids = torch.tensor([[0, 9], [-1, 2]])
    _, _, _, counts, ok, _ = km.moe_dispatch_triton(ids, ExpertMap.identity(4), 16)
    assert counts.tolist() == [1, 0, 1, 0, 2]  # two bad ids counted in the last slot
    assert ok.tolist() == [0]  # the flag the consumers' device-side assert reads
    assert km.moe_dispatch_triton(ids.clamp(0, 3), ExpertMap.identity(4), 16)[4].tolist() == [1]
    assert km.moe_dispatch_triton(ids[:0], ExpertMap.identity(4), 16)[4].tolist() == [1]  # nothing to check


def test_experts_out_of_range_id_asserts():
    """An expert id past the map fails the call through the device-side assert on the dispatch's flag (on the
    CPU `_assert_async` raises at once); the same call with ids in range runs."""
    E, D, I, T = 4, 64, 32, 3
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=34)
    ids = torch.tensor([[0, 1], [2, 3], [1, 9]])
    x, w = make_inputs(T, D, ids.clamp(0, E - 1), seed=35)
    km.moe_experts_triton(x, w13, s13, w2, s2, ids.clamp(0, E - 1), w, LIMIT, True, OCP, ExpertMap.identity(E))
    with pytest.raises(RuntimeError, match="expert id out of range"):
        km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, True, OCP, ExpertMap.identity(E))


# ============================================================================= experts vs reference


SCEN = {
    "skewed": lambda E: skewed_ids(21, E),  # 0 / 1 / every token per expert; 21 rows: not a multiple of 16
    "one_expert": lambda E: torch.full((19, 1), 4),
    "one_expert_twice": lambda E: torch.full((9, 2), 3),  # the same expert in both slots of a token
    "one_token": lambda E: torch.tensor([[5, 0, 3, 7, 1, 6]]),
    "random": lambda E: random_ids(33, E, 4, 9),
}


@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("scen", sorted(SCEN))
def test_experts_plain(fmt, scen):
    E, D, I = 8, 64, 32
    ids = SCEN[scen](E)
    w13, s13, w2, s2 = make_experts(fmt, E, D, I, seed=10)
    x, w = make_inputs(ids.shape[0], D, ids, seed=11)
    got = km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, False)
    check(got, moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, False))


@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("scen", ["skewed", "one_token", "one_expert_twice"])
@pytest.mark.parametrize("dialect", [OCP, FNUZ])
def test_experts_act_quant(fmt, scen, dialect):
    E, D, I = 8, 64, 32
    ids = SCEN[scen](E)
    w13, s13, w2, s2 = make_experts(fmt, E, D, I, seed=12)
    x, w = make_inputs(ids.shape[0], D, ids, seed=13)
    got = km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, True, dialect)
    check(got, moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True, dialect))


def test_experts_many_tokens():
    """1100 tokens x k 2 on 8 experts: the prefill regime (block_m 64, ~4 blocks per expert)."""
    E, D, I = 8, 64, 32
    ids = random_ids(1100, E, 2, 14)
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=15)
    x, w = make_inputs(1100, D, ids, seed=16)
    assert km.moe_tiles(2200, E, I, D, False)["block_m"] == 64
    got = km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, False)
    check(got, moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, False))


@pytest.mark.parametrize("fmt,dialect", [("fp4", OCP), ("fp8", OCP), ("fp8", FNUZ)])
def test_experts_several_tiles(fmt, dialect):
    """D 256 / I 128: two K tiles in the gate-up GEMM, FP8 scale blocks along both N (w1 vs w3 rows
    straddle a 128-row block) and K, several N tiles; the act_quant h round trip as a separate pass
    (bn_gate 64 < I) and fused (bn_gate 128) must agree bit for bit."""
    E, D, I = 4, 256, 128
    ids = random_ids(7, E, 2, 17)
    w13, s13, w2, s2 = make_experts(fmt, E, D, I, seed=18, dialect=dialect)
    x, w = make_inputs(7, D, ids, seed=19)
    check(km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, False),
          moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, False))
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    sep = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, bn_gate=64)
    fused = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, bn_gate=128)
    check(sep, want)
    assert torch.equal(sep, fused)


@pytest.mark.parametrize("block_m,bn_gate,bn_down", [(16, 16, 16), (32, 32, 64), (64, 16, 32), (128, 32, 16)])
def test_experts_forced_tiles(block_m, bn_gate, bn_down):
    """Every regime's tile shapes (and ones the chooser never picks) give the same result."""
    E, D, I = 8, 64, 32
    ids = skewed_ids(21, E)
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=20)
    x, w = make_inputs(21, D, ids, seed=21)
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    got = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, block_m=block_m, bn_gate=bn_gate,
                              bn_down=bn_down)
    check(got, want)


def test_tile_regimes():
    cfg = [km.moe_tiles(T * 6, 256, 2048, 4096, False) for T in (1, 64, 256, 1024, 2048, 8192)]
    assert [c["block_m"] for c in cfg] == [16, 16, 16, 32, 64, 64]
    assert [(c["bn_gate"], c["bn_down"]) for c in cfg[3:]] == [(64, 64), (64, 128), (128, 128)]
    # two ranks, 128 local experts, 1024 gathered tokens: r = 48, the 64-row middle tiles
    assert km.moe_tiles(1024 * 6, 128, 2048, 4096, False)["block_m"] == 64


@pytest.mark.parametrize("limit", [232448, 166912, 101376, 65536])  # H100/H200, A100, sm86/89, MI300X LDS
def test_tiles_fit_shared_memory(limit):
    """Every regime x weight format x activation dtype x shape fits the device's shared memory after fit_smem
    (bf16 dense experts at prefill tiles asked an H200 for 245,760 bytes and failed to launch); tiles that
    already fit are left alone."""
    raw = {"fp4": 0.5, "fp8": 1, "bf16": 2, "fp32": 4}
    for D, I in [(1024, 256), (4096, 2048), (7168, 2048), (256, 64)]:
        for T in (1, 64, 512, 8192):
            for fmt, xb in [("fp4", 2), ("fp8", 2), ("bf16", 2), ("fp32", 4)]:
                cfg = km.moe_tiles(T * 6, 16, I, D, xb == 4)
                fit = km.fit_smem(cfg, limit, xb, raw[fmt], raw[fmt])
                for bn, bk, tiles, wb in [("bn_gate", "bk_gate", 2, raw[fmt]), ("bn_down", "bk_down", 1, raw[fmt])]:
                    assert km.tile_smem_bytes(fit["block_m"], fit[bn], fit[bk], fit["num_stages"], xb, wb,
                                              tiles) * 1.1 <= limit, (D, I, T, fmt, fit)
                if 1.1 * max(km.tile_smem_bytes(cfg["block_m"], cfg[b], cfg[k], cfg["num_stages"], xb, raw[fmt], n)
                             for b, k, n in [("bn_gate", "bk_gate", 2), ("bn_down", "bk_down", 1)]) <= limit:
                    assert fit == cfg
    bf16_prefill = km.moe_tiles(8192 * 6, 16, 256, 1024, False)
    assert km.tile_smem_bytes(bf16_prefill["block_m"], bf16_prefill["bn_gate"], bf16_prefill["bk_gate"],
                              bf16_prefill["num_stages"], 2, 2, 2) > 232448  # the crash this guards against
    assert km.fit_smem(bf16_prefill, None, 2, 2, 2) == bf16_prefill  # the interpreter: no limit


def test_packed_fp4_decode_arithmetic():
    """The packed PTX decode (_fp4_unpack_bf16x2) step by step in torch bf16, for every code and every scale
    byte it serves (0..240): magnitude bits to bf16 bits 6..8 and the sign to bit 15 (e2m1 * 2^-126, code
    0b001 a bf16 subnormal), times 2^112, times 2^(s - 113) = e2m1 * 2^(s - 127) exactly."""
    from dsv4.numerics.fp4 import fp4_decode

    codes = torch.arange(16, dtype=torch.int32)
    bits = ((codes & 7) << 6) | ((codes & 8) << 12)
    m = bits.to(torch.int16).view(torch.bfloat16)
    assert torch.equal(m.float(), fp4_decode(codes.to(torch.uint8)).float() * 2.0**-126)
    m = m * torch.tensor(2.0**112, dtype=torch.bfloat16)
    s = torch.arange(0, 241, dtype=torch.int32)
    f = ((s + 14) << 7).to(torch.int16).view(torch.bfloat16)  # the kernel's factor bits
    assert torch.equal(f.double(), 2.0 ** (s.double() - 113))
    got = (m[:, None] * f[None, :]).double()
    want = fp4_decode(codes.to(torch.uint8)).double()[:, None] * 2.0 ** (s.double()[None, :] - 127)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.version.cuda is None, reason="NVIDIA GPU only (PTX)")
def test_packed_fp4_decode_equals_register_decode_gpu():
    """On an NVIDIA GPU: the packed PTX decode gives the per-value decode's output bit for bit, scale bytes
    over the whole supported range, bf16 activations and FP8 (act_quant). Compiled kernels only: the
    interpreter turns the packed decode off (the comparison would be of one path with itself)."""
    from dsv4.kernels.triton.common import interpreting

    assert not interpreting(torch.device("cuda")), "the Triton interpreter is on: packed=True would not be packed"
    E, D, I = 8, 256, 128
    ids = random_ids(37, E, 2, 31).cuda()
    w13, s13, w2, s2 = (t.cuda() for t in make_experts("fp4", E, D, I, seed=32))
    g = torch.Generator().manual_seed(33)
    s13 = torch.randint(100, 141, s13.shape, generator=g, dtype=torch.uint8).cuda()
    s2 = torch.randint(100, 141, s2.shape, generator=g, dtype=torch.uint8).cuda()
    x, w = make_inputs(37, D, ids.cpu(), seed=34)
    x, w = (x * 2.0**-20).bfloat16().cuda(), w.cuda()
    for aq in (False, True):
        reg = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 1e30, aq, scaled_dot=False, packed=False)
        pk = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, 1e30, aq, scaled_dot=False, packed=True)
        assert torch.equal(reg, pk)
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 1e30, aq)
        assert ((pk.double() - want.double()).abs().max() <= 1e-2 * want.double().abs().max())


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_act_quant_fnuz_equals_ocp_exactly(fmt):
    """Activations quantised in fnuz (scale x2, clamp 224) give the very same values as OCP; FP8 weights
    converted to fnuz exactly give the same result; the same fnuz bytes read as OCP are off by 2x."""
    E, D, I = 8, 64, 32
    ids = skewed_ids(21, E)
    x, w = make_inputs(21, D, ids, seed=23)
    a, sa, b, sb = make_experts(fmt, E, D, I, seed=22)
    ocp = km.moe_experts_triton(x, a, sa, b, sb, ids, w, LIMIT, True, OCP)
    assert torch.equal(ocp, km.moe_experts_triton(x, a, sa, b, sb, ids, w, LIMIT, True, FNUZ))
    if fmt == "fp8":
        fa, fsa, fb, fsb = make_experts(fmt, E, D, I, seed=22, dialect=FNUZ)
        assert torch.equal(ocp, km.moe_experts_triton(x, fa, fsa, fb, fsb, ids, w, LIMIT, True, FNUZ))
        assert torch.equal(ocp, km.moe_experts_triton(x, fa, fsa, fb, fsb, ids, w, LIMIT, True, OCP))
        wrong = km.moe_experts_triton(x, fa.view(torch.float8_e4m3fn), fsa, fb.view(torch.float8_e4m3fn), fsb,
                                      ids, w, LIMIT, True, OCP)
        assert not torch.allclose(wrong, ocp, atol=1e-3, rtol=1e-2)  # the factor-of-two trap is visible


def test_experts_bf16_activations():
    """bf16 x (the interpreter dots in fp32, roundings to bf16 on the bits): close to the bf16 reference."""
    E, D, I = 8, 64, 32
    ids = skewed_ids(21, E)
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=24)
    x, w = make_inputs(21, D, ids, seed=25)
    xb = x.to(torch.bfloat16)
    for aq in (False, True):
        got = km.moe_experts_triton(xb, w13, s13, w2, s2, ids, w, LIMIT, aq)
        want = moe_experts_reference(xb, w13, s13, w2, s2, ids, w, LIMIT, aq)
        check(got, want, atol=3e-2, rtol=3e-2)
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_experts_empty_and_errors():
    E, D, I = 8, 64, 32
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=26)
    out = km.moe_experts_triton(torch.randn(0, D), w13, s13, w2, s2, torch.zeros(0, 2, dtype=torch.long),
                                torch.zeros(0, 2), LIMIT, False)
    assert out.shape == (0, D)
    x = torch.randn(2, D)
    for bad in (E, -1, 100):
        with pytest.raises((ValueError, RuntimeError)):
            km.moe_experts_triton(x, w13, s13, w2, s2, torch.tensor([[0, 1], [bad, 2]]), torch.ones(2, 2), LIMIT,
                                  False)
    with pytest.raises(ValueError):  # map with more local experts than the weights hold
        km.moe_experts_triton(x, w13, s13, w2, s2, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2), LIMIT, False,
                              OCP, ExpertMap.identity(E + 1))


# ============================================================================= expert parallel map


LOCAL_A = (13, 2, 7, 0, 9, 4, 15, 10)  # half of 16 experts, in a shuffled local order


@pytest.mark.parametrize("fmt,act_quant", [("fp4", False), ("fp4", True), ("fp8", True), ("dense", False)])
def test_experts_half_remote(fmt, act_quant):
    """Weights hold only the local experts (in the map's order); remote pairs contribute nothing. Equals
    (1) the reference on all experts with the remote pairs' routing weights zeroed, (2) the proposed mapped
    reference; and the two complementary halves add up to the single-rank result."""
    E, D, I = 16, 64, 32
    ids = random_ids(37, E, 4, 27)
    ids[5] = torch.tensor([1, 3, 5, 6])  # a token whose experts are all remote on map A
    w13, s13, w2, s2 = make_experts(fmt, E, D, I, seed=28)
    x, w = make_inputs(37, D, ids, seed=29)
    full = km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, act_quant)
    total = torch.zeros_like(full)
    for local in (LOCAL_A, tuple(sorted(set(range(E)) - set(LOCAL_A)))):
        emap = ExpertMap(E, local)
        sel = torch.tensor(local)
        lw = [None if t is None else t[sel] for t in (w13, s13, w2, s2)]
        got = km.moe_experts_triton(x, lw[0], lw[1], lw[2], lw[3], ids, w, LIMIT, act_quant, OCP, emap)
        is_local = (emap.global_to_local()[ids] >= 0).float()
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w * is_local, LIMIT, act_quant)
        check(got, want)
        check(got, moe_experts_reference(x, lw[0], lw[1], lw[2], lw[3], ids, w, LIMIT, act_quant, OCP, emap))
        if local == LOCAL_A:
            assert (got[5] == 0).all()
        total += got
    check(total, full, atol=1e-5, rtol=1e-5)


def test_reference_expert_map_permuted_and_split():
    """The reference reads the map: a permuted map over permuted weights equals the identity; two
    complementary halves add up to the whole (in float32, up to summation order)."""
    E, D, I = 8, 64, 32
    ids = skewed_ids(21, E)
    w13, s13, w2, s2 = make_experts("fp4", E, D, I, seed=30)
    x, w = make_inputs(21, D, ids, seed=31)
    full = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    pm = ExpertMap(E, tuple(perm))
    got = moe_experts_reference(x, w13[perm], s13[perm], w2[perm], s2[perm], ids, w, LIMIT, expert_map=pm)
    assert torch.equal(got, full)
    halves = [(0, 2, 4, 6), (1, 3, 5, 7)]
    parts = [moe_experts_reference(x, w13[list(h)], s13[list(h)], w2[list(h)], s2[list(h)], ids, w, LIMIT,
                                   expert_map=ExpertMap(E, h)) for h in halves]
    assert not torch.equal(parts[0], full)
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert map"):
        moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, expert_map=ExpertMap(E, halves[0]))


# ============================================================================= padding lanes


@pytest.mark.parametrize("sentinel", ["N", "huge"])
@pytest.mark.parametrize("remote", [False, True])
def test_padding_lanes_poisoned(sentinel, remote):
    """Padding slots replaced by values past the LOGICAL bound (N: the token row just past x, which is
    NaN in the storage x is a view of; or 2^30), unused blocks filled with the valid-looking slot 0, x a
    view between NaN rows, h / y workspaces pre-filled with sentinels. A kernel masking rows by their
    position in the padded buffer instead of by slot validity would read the NaN row, store padding
    rows of h, or write y rows past N; the result must be exactly the clean one and nothing outside the
    written region may change."""
    E, D, I, T, k = 8, 64, 32, 21, 3
    ids = skewed_ids(T, E)
    emap = ExpertMap(E, (2, 5, 1, 6)) if remote else ExpertMap.identity(E)
    sel = torch.tensor(emap.local_ids)
    w13, s13, w2, s2 = (t[sel] for t in make_experts("fp4", E, D, I, seed=32))
    x0, w = make_inputs(T, D, ids, seed=33)
    clean = km.moe_experts_triton(x0, w13, s13, w2, s2, ids, w, LIMIT, True, OCP, emap)
    N = T * k
    bm = 16
    slots, bexp, nvb, _, _, _ = km.moe_dispatch_triton(ids, emap, bm)
    nv = int(nvb)
    poisoned = slots.clone()
    pad = poisoned == -1
    poisoned[pad] = N if sentinel == "N" else 2 ** 30
    poisoned[nv * bm:] = 0  # unused blocks (block_expert -1): a valid-looking pair that must not be used
    store = torch.full((T + 2, D), float("nan"))
    store[1:T + 1] = x0
    x = store[1:T + 1]
    mr = slots.shape[0]
    h_store = torch.full((mr, I), 12345.0)
    y_store = torch.full((N + 8, D), 777.0)
    got = km.moe_experts_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, OCP, emap, block_m=bm,
                              dispatch=(poisoned, bexp), h_buf=h_store, y_buf=y_store[:N])
    assert torch.equal(got, clean) and torch.isfinite(got).all()
    assert (h_store[pad] == 12345.0).all()  # padding rows of h never written
    assert (h_store[~pad].ne(12345.0)).any(dim=-1).all()  # valid rows written
    assert (y_store[N:] == 777.0).all()  # nothing written past the N (token, slot) rows
    loc = emap.global_to_local()[ids.reshape(-1)]
    assert (y_store[:N][loc < 0] == 777.0).all()  # remote pairs' rows untouched


# ============================================================================= router


def route_inputs(T, E, D, seed):
    g = gen(seed)
    x = torch.randn(T, D, generator=g)
    gw = 0.3 * torch.randn(E, D, generator=g)
    bias = 0.8 * torch.randn(E, generator=g)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:6] for _ in range(50)])
    input_ids = torch.randint(0, 50, (T,), generator=g)
    return x, gw, bias, tid2eid, input_ids


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("use_bias,norm", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("T,E,D,k", [(1, 16, 200, 6), (21, 16, 48, 6), (70, 8, 32, 2), (3, 256, 2112, 6)])
def test_route_learned(func, use_bias, norm, T, E, D, k):
    """Top-k of scores (+ bias), in the reference's (descending) order; weights the unbiased scores.
    T 1 with D 200: split-K logits (4 partial sums); T 21 / 70: several token tiles; T 3 with 256 experts and
    D 2112: 33 partials summed 16 at a time (three chunks, the last one masked)."""
    x, gw, bias, _, _ = route_inputs(T, E, D, seed=40 + T)
    gw = gw * min(1.0, (64 / D) ** 0.5)  # logits of std <= ~2.4: no sigmoid saturated to a tie at 1.0
    b = bias if use_bias else None
    w, i = kr.moe_route_triton(x, gw, b, None, None, k, func, norm, 2.5)
    ww, wi = moe_route_reference(x, gw, b, None, None, k, func, norm, 2.5)
    assert i.dtype == torch.int64 and w.dtype == torch.float32 and i.shape == (T, k)
    assert torch.equal(i, wi)
    torch.testing.assert_close(w, ww, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("func", ["sqrtsoftplus", "softmax"])
def test_route_hash(func):
    x, gw, _, tid2eid, input_ids = route_inputs(21, 16, 48, seed=50)
    w, i = kr.moe_route_triton(x, gw, None, tid2eid, input_ids, 6, func, True, 1.5)
    ww, wi = moe_route_reference(x, gw, None, tid2eid, input_ids, 6, func, True, 1.5)
    assert torch.equal(i, wi)
    torch.testing.assert_close(w, ww, atol=1e-6, rtol=1e-5)


def test_route_extreme_logits():
    """Logits of +-40: softplus keeps x past 20, and tiny scores (sqrt(softplus(-40)) ~ 2e-9) keep their
    relative accuracy (log1p), as hash routing can select such experts."""
    T, E, D = 4, 16, 32
    x = torch.zeros(T, D)
    x[:, 0] = 1.0
    gw = torch.zeros(E, D)
    gw[:, 0] = torch.linspace(-40, 40, E)
    tid2eid = torch.stack([torch.arange(0, 6), torch.arange(10, 16)])
    ids_in = torch.tensor([0, 1, 0, 1])
    w, i = kr.moe_route_triton(x, gw, None, tid2eid, ids_in, 6, "sqrtsoftplus", False, 1.0)
    ww, wi = moe_route_reference(x, gw, None, tid2eid, ids_in, 6, "sqrtsoftplus", False, 1.0)
    assert torch.equal(i, wi)
    torch.testing.assert_close(w, ww, atol=0, rtol=1e-5)
    w2, i2 = kr.moe_route_triton(x, gw, None, None, None, 3, "sqrtsoftplus", True, 1.0)
    assert (i2 == torch.tensor([15, 14, 13])).all()


@pytest.mark.parametrize("T,E,D,hashed", [(1, 256, 2112, False), (2, 16, 200, False), (2, 16, 48, True),
                                           (1, 16, 16, False)])
def test_route_last_program_select_equals_two_kernels(T, E, D, hashed, monkeypatch, launches):
    """Up to LAST_SELECT_T tokens the last logits program selects (one launch): ids and weights equal the two
    kernels bit for bit over three calls (the counter reset each time), learned (bias) and hash routing, split-K
    partials summed in chunks (256 experts, 33 partials), no split (D 16); the select kernel is not launched."""
    x, gw, bias, tid2eid, input_ids = route_inputs(T, E, D, seed=60 + T)
    gw = gw * min(1.0, (64 / D) ** 0.5)
    args = (x, gw, None, tid2eid, input_ids, 6, "sqrtsoftplus", True, 1.5) if hashed else \
        (x, gw, bias, None, None, 6, "sqrtsoftplus", True, 2.5)
    monkeypatch.setattr(kr, "LAST_SELECT_T", 0)
    ww, wi = kr.moe_route_triton(*args)
    monkeypatch.setattr(kr, "LAST_SELECT_T", 2)
    launched = launches(kr, "_router_select_kernel")
    for _ in range(3):
        w, i = kr.moe_route_triton(*args)
        assert torch.equal(i, wi) and torch.equal(w, ww)
    assert not launched, "the select kernel still ran"
    from dsv4.kernels.triton import common
    assert int(common._COUNTERS[("cpu", None)].abs().sum()) == 0, "tile counters not reset"
    wr, ir = moe_route_reference(*args)
    assert torch.equal(i, ir)


@pytest.mark.parametrize("w_bf16", [False, True], ids=["gate_f32", "gate_bf16"])
@pytest.mark.parametrize("T,D", [(9, 64), (1, 2112), (70, 200)])
def test_route_bf16_input(w_bf16, T, D, launches):
    """bf16 x; the gate weight float32 or bf16 (a release's, compacted): ids equal the reference's (the float32
    matmul of the upcast operands), weights within float32 summation error, and the bf16 weight's routing equals
    its float32 copy's. Compiled, both bf16 take the bf16 dot (NATIVE, test_gpu_route_bf16_gate); the interpreter
    never does (its bf16 tl.dot is garbage): the IEEE fp32 dot of the same values."""
    x, gw, bias, _, _ = route_inputs(T, 16, D, seed=51 + T)
    gw = gw * min(1.0, (64 / D) ** 0.5)
    xb = x.to(torch.bfloat16)
    if w_bf16:
        gw = gw.to(torch.bfloat16)
    seen = launches(kr, "_router_logits_kernel", arg="NATIVE")
    w, i = kr.moe_route_triton(xb, gw, bias, None, None, 6, "sqrtsoftplus", True, 1.5)
    ww, wi = moe_route_reference(xb, gw, bias, None, None, 6, "sqrtsoftplus", True, 1.5)
    assert seen == [False]  # (interpreter)
    assert torch.equal(i, wi)
    torch.testing.assert_close(w, ww, atol=1e-6, rtol=1e-5)
    if w_bf16:
        w32, i32 = kr.moe_route_triton(xb, gw.float(), bias, None, None, 6, "sqrtsoftplus", True, 1.5)
        assert torch.equal(i, i32)
        torch.testing.assert_close(w, w32, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_gpu_route_bf16_gate(T, launches):
    """Compiled, Flash shapes (256 experts, hidden 4096, top-6, sqrt-softplus with bias): the bf16 gate weight's
    bf16 dot (NATIVE) routes as the float32 reference (ids equal, weights within float32 summation error)."""
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g).bfloat16()
    gw = (torch.randn(256, 4096, device="cuda", generator=g) / 64).bfloat16()
    bias = 0.05 * torch.randn(256, device="cuda", generator=g)
    seen = launches(kr, "_router_logits_kernel", arg="NATIVE")
    w, i = kr.moe_route_triton(x, gw, bias, None, None, 6, "sqrtsoftplus", True, 1.5)
    ww, wi = moe_route_reference(x, gw, bias, None, None, 6, "sqrtsoftplus", True, 1.5)
    assert seen == [True]
    assert (i == wi).float().mean() > 0.999  # (a near-tie may order differently under another summation order)
    torch.testing.assert_close(w, ww, atol=1e-5, rtol=1e-4)


# ============================================================================= GPU check code


def test_gpu_check_cases_measure_flash_moe_and_run(monkeypatch):
    """The GPU check measures the MoE the model runs: every experts / routing case at DeepSeek-V4-Flash shapes
    (hidden size, expert width, experts, top-k, all from the config); experts with FP8 and bf16 activations,
    each also through the register decode (scaled dot off); learned and hash routing; from one token up to at
    least the engine's largest step; record names unique. Then the check code itself runs at tiny shapes. The
    cases: benchmarks/kernel_cases/moe.py and router.py."""
    import inspect
    import json
    from importlib import resources

    from benchmarks.kernel_cases import moe as kcm
    from benchmarks.kernel_cases import router as kcr
    from dsv4.config import EngineConfig, ModelConfig

    cfg = ModelConfig.from_dict(json.loads(resources.files("dsv4.configs").joinpath("deepseek-v4-flash.json")
                                           .read_text()))
    calls = {(kcm, "experts_case"): [], (kcr, "route_case"): []}
    for (mod, fn), log in calls.items():  # each case's arguments, the function's own defaults applied
        sig = inspect.signature(getattr(mod, fn))
        monkeypatch.setattr(mod, fn, lambda *a, _s=sig, _l=log, **kw: _l.append(_s.bind(*a, **kw)))
    names = [n for n, _ in kcm.gpu_check_cases() + kcr.gpu_check_cases()]
    assert len(names) == len(set(names))
    for log in calls.values():
        for b in log:
            b.apply_defaults()
    experts = [b.arguments for b in calls[(kcm, "experts_case")]]
    routes = [b.arguments for b in calls[(kcr, "route_case")]]
    flash = dict(D=cfg.hidden_size, I=cfg.moe_intermediate_size, E=cfg.n_routed_experts, k=cfg.num_experts_per_tok)
    for a in experts + routes:
        assert {n: a[n] for n in flash if n in a} == {n: v for n, v in flash.items() if n in a}, a
        assert a["device"] == "cuda" and a["bench"], a
    biggest = EngineConfig().max_num_batched_tokens
    for aq in (True, False):
        for register_decode in (False, True):
            ts = {a["T"] for a in experts if a["act_quant"] == aq and (a["scaled_dot"] is False) == register_decode}
            assert ts and min(ts) == 1 and max(ts) >= biggest, (aq, register_decode, sorted(ts))
    for hashed in (False, True):
        ts = {a["T"] for a in routes if a["hashed"] == hashed}
        assert ts and min(ts) == 1 and max(ts) >= biggest, (hashed, sorted(ts))
    monkeypatch.undo()
    # the check code itself, at tiny shapes on the CPU (no timing)
    r = kcm.experts_case(9, True, D=64, I=32, E=16, k=4, device="cpu", bench=False)()
    assert r["max_rel_err"] < 1e-5 and r["unique_experts"] > 1 and r["flops"] == 2 * 9 * 4 * 3 * 32 * 64
    r = kcr.route_case(5, D=64, E=16, k=4, device="cpu", bench=False)()
    assert r["ids_match_frac"] == 1.0 and r["max_rel_err"] < 1e-5


@pytest.mark.gpu
def test_gpu_dispatch_one_program_equals_reference():
    """Compiled: the one-program dispatch (pad fill and scatter by different threads, ordered by the barrier)
    equals the reference slot for slot at Flash's 256 experts, decode sizes, humming's pad value."""
    from dsv4.kernels.triton import moe_dispatch as kd

    emap = ExpertMap.identity(256)
    for T in (1, 2, 4, 8, 10):
        for seed in range(10):
            ids = random_ids(T, 256, 6, seed=seed)
            for bm in (8, 16):
                ref = dispatch_reference(ids, emap, bm)
                slots, bexp, nvb, counts, ok, rows = kd.moe_dispatch_triton(ids.cuda(), emap, bm, pad=ids.numel())
                want = torch.where(ref[0] == -1, torch.full_like(ref[0], ids.numel()), ref[0])
                assert torch.equal(slots.cpu(), want) and torch.equal(bexp.cpu(), ref[1]), (T, seed, bm)
                assert int(nvb) == int(ref[2]) and ok.tolist() == [1] and int(rows) == int(ref[2]) * bm


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_swiglu_quant(T):
    """Compiled, the shared expert's width (I = 2048): swiglu's act_quant of h equals the standalone quantiser's."""
    from dsv4.kernels.triton.quant import fp8_act_quant_triton

    gu = (3.0 * torch.randn(T, 4096, generator=gen(T))).bfloat16().cuda()
    h, (q, s) = km.swiglu_triton(gu, 10.0, quant=Fp8Dialect.OCP)
    wq, ws = fp8_act_quant_triton(h, 128, Fp8Dialect.OCP)
    assert torch.equal(h, km.swiglu_triton(gu, 10.0)) and torch.equal(q[:T], wq) and torch.equal(s, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2])
def test_gpu_route_last_program_select(T, monkeypatch):
    """Compiled, Flash's router (256 experts, D 4096, top-6, sqrt-softplus with bias): the last logits program's
    select equals the two kernels bit for bit, eagerly and replayed from a CUDA graph (the counter reset)."""
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g).bfloat16()
    gw = 0.02 * torch.randn(256, 4096, device="cuda", generator=g)
    bias = 0.1 * torch.randn(256, device="cuda", generator=g)
    args = (x, gw, bias, None, None, 6, "sqrtsoftplus", True, 2.5)
    monkeypatch.setattr(kr, "LAST_SELECT_T", 0)
    ww, wi = kr.moe_route_triton(*args)
    monkeypatch.setattr(kr, "LAST_SELECT_T", 2)
    w, i = kr.moe_route_triton(*args)
    assert torch.equal(i, wi) and torch.equal(w, ww)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, i = kr.moe_route_triton(*args)
    for _ in range(3):
        w.zero_()
        i.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(i, wi) and torch.equal(w, ww)
