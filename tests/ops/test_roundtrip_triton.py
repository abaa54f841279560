"""The Triton FP8 / FP4 round trips (dsv4/kernels/triton/quant.py: fp8_roundtrip, fp4_roundtrip) in the
interpreter, bit for bit (signed zeros included) against the op references (dsv4.numerics), on float32,
bfloat16 and float16 inputs: ragged K (a partial last block), 1 / 7 / 33 rows, strided and 3-D inputs,
both FP8 dialects plus the proof that the dialect flag matters (bytes decoded in the other dialect are
exactly 2x / 0.5x), ties at every e4m3 / e2m1 midpoint, exact powers of two, zero rows and the amax floors,
huge and tiny magnitudes, and writes past the logical end. The generic check (every registered provider
of both ops, the PyTorch reference included, against a naive nearest-grid-point oracle) is at the end.

The interpreter runs each program as numpy code, so most tests set RT_TARGET_PROGRAMS = 1 (few, large
programs); test_many_programs keeps the default so the tail-masking of small groups runs too."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.triton import quant as kquant  # noqa: E402
from dsv4.numerics.fp4 import E2M1_VALUES  # noqa: E402
from dsv4.numerics.fp4 import fp4_roundtrip as np_fp4_roundtrip  # noqa: E402
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, fp8_decode_table, quantize_fp8_blocks  # noqa: E402
from dsv4.numerics.fp8 import fp8_roundtrip as np_fp8_roundtrip  # noqa: E402
from dsv4.ops.quant import fp4_roundtrip_reference, fp8_roundtrip_reference  # noqa: E402
from providers import provider_params, providers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(r, k) for r in (1, 7, 33) for k in (64, 448, 512, 100)]


@pytest.fixture(autouse=True)
def few_programs(monkeypatch, request):
    if "many_programs" not in request.node.name:
        monkeypatch.setattr(kquant, "RT_TARGET_PROGRAMS", 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of t (widened exactly to float32), so signed zeros count."""
    return t.float().view(torch.int32)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want), f"{int((got != want).sum())} values differ"
    assert torch.equal(bits(got), bits(want)), "signed zeros differ"


def fp8_rt(x, block=64, dialect=Fp8Dialect.OCP, width=None):
    return kquant.fp8_roundtrip_triton(x, block, dialect, width)


def fp4_rt(x, block=32, hadamard=False):
    return kquant.fp4_roundtrip_triton(x, block, hadamard)


def random_rows(R: int, K: int, dtype, seed: int, block: int, pad: int = 0, lo: int = -12,
                hi: int = 40) -> torch.Tensor:
    """Gaussian values times a random power of two 2^lo .. 2^hi per block (the default stays above the
    FP8 amax floor; the floors have their own test), a view of NaN-padded storage when pad > 0 (a read
    past K would poison the last block's amax)."""
    nb = -(-K // block)
    v = torch.randn(R, K, generator=gen(seed))
    mag = torch.exp2(torch.randint(lo, hi, (R, nb), generator=gen(seed + 1)).float())
    v = (v * mag.repeat_interleave(block, dim=1)[:, :K]).to(dtype)
    if not pad:
        return v
    big = torch.full((R, K + pad), float("nan"), dtype=dtype)
    big[:, :K] = v
    return big[:, :K]


# ============================================================================= registration


def test_registered():
    from benchmarks.kernel_cases import quant as kc_quant

    for name in ("fp8_roundtrip", "fp4_roundtrip"):
        assert "triton" in [p for p, _ in providers(name)], name
    names = [n for n, f in kc_quant.gpu_check_cases()]
    assert sum(n.startswith("fp8_roundtrip[") for n in names) >= 3
    assert sum(n.startswith("fp4_roundtrip[") for n in names) >= 3


# ============================================================================= random inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,K", SHAPES)
@pytest.mark.parametrize("dialect", list(Fp8Dialect))
def test_fp8_random(dtype, R, K, dialect):
    x = random_rows(R, K, dtype, seed=R * 1000 + K, block=64, pad=5)
    assert_bit_equal(fp8_rt(x, 64, dialect), fp8_roundtrip_reference(x, 64, dialect))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,K", SHAPES)
def test_fp4_random(dtype, R, K):
    x = random_rows(R, K, dtype, seed=R * 1000 + K + 7, block=32, pad=3, lo=-110, hi=110)
    assert_bit_equal(fp4_rt(x, 32), fp4_roundtrip_reference(x, 32))


@pytest.mark.parametrize("block", [16, 48, 128])
def test_other_blocks_and_fp16(block):
    """Blocks other than 64 / 32 (48: not a power of two, lanes masked inside every block) and float16
    (whose subnormals make the final cast round)."""
    for dtype in (torch.float32, torch.float16):
        x = random_rows(5, 300, torch.float32, seed=block, block=block)
        x = (x / x.abs().max() * 1000).to(dtype)
        for d in Fp8Dialect:
            assert_bit_equal(fp8_rt(x, block, d), fp8_roundtrip_reference(x, block, d))
        assert_bit_equal(fp4_rt(x, block), fp4_roundtrip_reference(x, block))


@pytest.mark.parametrize("target", [256, 8])
def test_many_programs(monkeypatch, target):
    """Several programs: the default target (G = 1: one block per program) on a small case, then a target
    of 8 programs (G = 2 .. 64 blocks per program: the flattened (row, block) ids cross rows, the last
    group is partial); plus an output buffer longer than the result, sentinel-filled: nothing past the
    logical end is written."""
    monkeypatch.setattr(kquant, "RT_TARGET_PROGRAMS", target)
    for R, K in ((7, 100),) if target == 256 else ((7, 100), (33, 448), (300, 64)):
        x = random_rows(R, K, torch.bfloat16, seed=R + K, block=64, pad=4)
        for d in Fp8Dialect:
            assert_bit_equal(fp8_rt(x, 64, d), fp8_roundtrip_reference(x, 64, d))
        x4 = random_rows(R, K, torch.bfloat16, seed=R + K + 1, block=32, pad=4)
        assert_bit_equal(fp4_rt(x4, 32), fp4_roundtrip_reference(x4, 32))
        n = R * K
        for kern, ref, extra, flags in ((kquant._fp8_roundtrip_kernel, fp8_roundtrip_reference(x, 64), (K,),
                                         dict(FNUZ=False, DEC_FNUZ=False)),
                                        (kquant._fp4_roundtrip_kernel, fp4_roundtrip_reference(x, 32), (),
                                         dict(AMAX_FLOOR=kquant.FP4_AMAX_FLOOR))):
            out = torch.full((n + 97,), float("nan"), dtype=x.dtype)
            kquant._rt_launch(kern, x, 64 if "FNUZ" in flags else 32, out, *extra, **flags)
            assert torch.equal(out[:n].view(R, K), ref)
            assert out[n:].isnan().all()


def test_strided_and_3d_inputs():
    """The attention call (a [T, 448] column slice of the [T, 512] kv), the indexer call ([T, 64, 128]),
    a 1-D row, a non-collapsible 3-D view (copied first) and a stride-2 last dim; outputs are fresh
    contiguous tensors of x's shape."""
    kv = random_rows(9, 512, torch.bfloat16, seed=3, block=64)
    x = kv[:, :448]
    assert x.stride(0) == 512
    for d in Fp8Dialect:
        assert_bit_equal(fp8_rt(x, 64, d), fp8_roundtrip_reference(x, 64, d))
    q = random_rows(3 * 64, 128, torch.bfloat16, seed=4, block=32).view(3, 64, 128)
    assert_bit_equal(fp4_rt(q, 32), fp4_roundtrip_reference(q, 32))
    t = random_rows(4 * 5, 96, torch.float32, seed=5, block=32).view(4, 5, 96).transpose(0, 1)
    assert not t.is_contiguous()
    assert_bit_equal(fp4_rt(t, 32), fp4_roundtrip_reference(t, 32))
    assert_bit_equal(fp8_rt(t, 64), fp8_roundtrip_reference(t, 64))
    sl = random_rows(2, 3, torch.float32, seed=6, block=32).view(2, 3)[:, :, None].expand(2, 3, 40)[:, 1:]
    assert_bit_equal(fp8_rt(sl, 64), fp8_roundtrip_reference(sl, 64))
    one = random_rows(1, 100, torch.float32, seed=7, block=32)[0]
    assert_bit_equal(fp4_rt(one, 32), fp4_roundtrip_reference(one, 32))
    wide = random_rows(6, 200, torch.float32, seed=8, block=64)[:, ::2]
    assert_bit_equal(fp8_rt(wide, 64), fp8_roundtrip_reference(wide, 64))
    empty = torch.zeros(0, 64)
    assert fp8_rt(empty).shape == (0, 64) and fp4_rt(empty).shape == (0, 64)


def test_fp8_width_rounds_the_head_and_copies_the_tail():
    """`width`: attention's call rounds the first 448 channels of the [T, 512] kv and copies its 64 RoPE channels
    in one pass, bit for bit the reference's round trip + cat, both dialects; width 0 copies, width K is the
    plain round trip; a width that splits a block or exceeds K is refused by name."""
    kv = random_rows(9, 512, torch.bfloat16, seed=13, block=64)
    for d in Fp8Dialect:
        got = fp8_rt(kv, 64, d, 448)
        assert_bit_equal(got, fp8_roundtrip_reference(kv, 64, d, 448))
        assert_bit_equal(got[:, 448:].contiguous(), kv[:, 448:].contiguous())
        assert not torch.equal(got[:, :448], kv[:, :448])  # premise: the round trip changes the head
        assert_bit_equal(got[:, :448].contiguous(), fp8_roundtrip_reference(kv[:, :448], 64, d))
    assert_bit_equal(fp8_rt(kv, 64, "ocp", 0), kv)
    assert_bit_equal(fp8_rt(kv, 64, "ocp", 512), fp8_roundtrip_reference(kv, 64))
    for bad in (100, 576, -64):
        for fn in (fp8_rt, fp8_roundtrip_reference):
            with pytest.raises(ValueError, match="width"):
                fn(kv, 64, "ocp", bad)


# ============================================================================= dialects


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_dialects_same_values_and_flag_matters(dtype):
    """fnuz and OCP round trips give the same values (zeros of negative inputs: -0.0 in OCP, +0.0 in
    fnuz, as the reference); the kernel decoding fnuz bytes as OCP gives exactly 2x and OCP bytes as fnuz
    0.5x, so a dialect flag not threaded through encode, exponent and decode cannot pass the tests above;
    the same holds for the reference's bytes."""
    x = random_rows(7, 100, dtype, seed=11, block=64)
    x[0, :3] = torch.tensor([-0.0, 0.0, -1e-30])
    ocp, fnuz = fp8_rt(x, 64, "ocp"), fp8_rt(x, 64, Fp8Dialect.FNUZ)
    assert torch.equal(ocp, fnuz)
    assert torch.equal(bits(ocp)[0, :3], bits(torch.tensor([-0.0, 0.0, -0.0])))
    assert torch.equal(bits(fnuz)[0, :3], bits(torch.zeros(3)))
    assert (ocp != 0).sum() > 600

    def mixed(enc_fnuz, dec_fnuz):
        return kquant._rt_launch(kquant._fp8_roundtrip_kernel, x, 64, None, x.shape[-1], FNUZ=enc_fnuz,
                                 DEC_FNUZ=dec_fnuz)

    assert torch.equal(mixed(True, True), fnuz) and torch.equal(mixed(False, False), ocp)
    assert torch.equal(mixed(True, False), (2 * fnuz.float()).to(dtype))
    assert torch.equal(mixed(False, True), (0.5 * ocp.float()).to(dtype))
    q, s = quantize_fp8_blocks(x.float(), (64,), Fp8Dialect.FNUZ)
    as_ocp = dequantize_fp8_blocks(q, s, (64,), Fp8Dialect.OCP)
    assert torch.equal(as_ocp, 2 * fnuz.float())


# ============================================================================= ties, powers of two


def fp8_grid_rows(K: int = 64) -> torch.Tensor:
    """Rows whose first element is 448 (s = 1) followed by every positive e4m3 value, every midpoint
    between consecutive values (a tie: to the even mantissa) and the float32 neighbours of each
    midpoint; the same rows negated and scaled by 2^-20 and 2^30 (s = 2^k, still exact)."""
    grid = fp8_decode_table(Fp8Dialect.OCP)[:0x7F]  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    up = torch.nextafter(mids, torch.tensor(float("inf")))
    dn = torch.nextafter(mids, torch.tensor(0.0))
    vals = torch.cat([grid, mids, up, dn])
    per = K - 1
    n = -(-vals.numel() // per)
    vals = torch.cat([vals, torch.zeros(n * per - vals.numel())]).view(n, per)
    rows = torch.cat([torch.full((n, 1), 448.0), vals], 1)
    return torch.cat([rows, -rows, rows * 2.0**-20, rows * 2.0**30])


def test_fp8_ties_and_grid():
    x = fp8_grid_rows()
    want = fp8_roundtrip_reference(x, 64)
    for d in Fp8Dialect:
        assert_bit_equal(fp8_rt(x, 64, d), fp8_roundtrip_reference(x, 64, d))
    # spot checks of round-to-nearest-even on the grid (s = 1): 1.0625 -> 1.0, 1.1875 -> 1.25,
    # subnormal midpoints 2^-10 -> 0, 3 * 2^-10 -> 2^-8, 464 -> clamped 448
    t = torch.tensor([[448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 2.0**-9]])
    assert fp8_rt(t).tolist() == [[448.0, 1.0, 1.25, 0.0, 2.0**-8, 2.0**-9]]
    g = fp8_rt(x, 64)
    n = x.shape[0] // 4
    assert torch.equal(g[:n, 1:].flatten()[:127], x[:n, 1:].flatten()[:127])  # grid points are exact
    assert torch.equal(g, want)
    bf = x.to(torch.bfloat16)  # bf16 keeps the grid and (3-bit-mantissa) midpoints exactly
    assert_bit_equal(fp8_rt(bf, 64), fp8_roundtrip_reference(bf, 64))


def test_fp4_ties_and_grid():
    """Every e2m1 value, every midpoint (ties to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4) and its float32 neighbours, with amax 6 * 2^k (s = 2^k)."""
    mag = torch.tensor(E2M1_VALUES[:8])
    mids = (mag[:-1] + mag[1:]) / 2
    vals = torch.cat([mag, mids, torch.nextafter(mids, torch.tensor(9.0)), torch.nextafter(mids, torch.tensor(0.0))])
    row = torch.cat([vals, torch.zeros(32 - vals.numel())])  # 29 values, amax 6
    rows = [row * 2.0**k * sgn for k in (-120, -30, 0, 7, 100) for sgn in (1, -1)]
    x = torch.stack(rows).repeat(1, 3)[:, :80]  # K = 80: two full blocks and a partial one
    got = fp4_rt(x, 32)
    assert_bit_equal(got, fp4_roundtrip_reference(x, 32))
    s1 = got[4, :22] / 1.0  # k = 0, positive
    assert s1[:8].tolist() == list(E2M1_VALUES[:8])
    assert s1[8:15].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the ties
    assert s1[15:22].tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # just above
    assert_bit_equal(fp4_rt(x.to(torch.bfloat16), 32), fp4_roundtrip_reference(x.to(torch.bfloat16), 32))


def test_powers_of_two():
    """Blocks of exact powers of two (amax on the boundary: ceil(log2) must not round up) and their
    float32 neighbours as amax, exponents across the range."""
    k = torch.arange(-60, 61, 4).float()
    for scale, block, rt, ref in ((448.0, 64, fp8_rt, fp8_roundtrip_reference),
                                  (6.0, 32, fp4_rt, fp4_roundtrip_reference),
                                  (1.0, 64, fp8_rt, fp8_roundtrip_reference),
                                  (1.0, 32, fp4_rt, fp4_roundtrip_reference)):
        a = scale * torch.exp2(k)
        fill = torch.exp2(-torch.arange(block - 1).float() % 12)  # powers of two below 1
        x = a[:, None] * torch.cat([torch.ones(1), fill])[None]
        up = x.clone()
        up[:, 0] = torch.nextafter(a, torch.tensor(float("inf")))
        dn = x.clone()
        dn[:, 0] = torch.nextafter(a, torch.tensor(0.0))
        xs = torch.cat([x, up, dn, -x])
        assert_bit_equal(rt(xs, block), ref(xs, block))
    x = 448.0 * torch.exp2(k[k >= -20])[:, None] * torch.ones(1, 64)  # (above the 1e-4 floor)
    assert torch.equal(fp8_rt(x), x)  # powers of two times 448 survive exactly
    x = 6.0 * torch.exp2(k)[:, None] * torch.ones(1, 32)
    assert torch.equal(fp4_rt(x), x)


# ============================================================================= floors, zeros, magnitudes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_and_floors(dtype):
    """Zero rows (+0 and -0), and blocks below the amax floors: FP8 values ~1e-9 (the floor 1e-4 sets the
    scale 2^-22, so they land on e4m3 subnormals) and FP4 values ~2^-127 (floor 6 * 2^-126, float32
    subnormals): equal to the reference and different from the same recipe without the floor, so the
    floor is really applied. The FP4 floor shows only on float32 subnormals / bf16 subnormals, and the
    interpreter converts bf16 subnormals wrongly (both ways; exact on GPUs), so that part runs in
    float32 only."""
    z = torch.zeros(3, 100, dtype=dtype)
    z[1] = -0.0
    for d in Fp8Dialect:
        assert_bit_equal(fp8_rt(z, 64, d), fp8_roundtrip_reference(z, 64, d))
    assert_bit_equal(fp4_rt(z, 32), fp4_roundtrip_reference(z, 32))
    assert bits(fp4_rt(z, 32))[1].lt(0).all()  # -0.0 kept

    x8 = (torch.randn(4, 128, generator=gen(40)) * 1e-9).to(dtype)
    x8[:, 64:] *= 1e9  # a normal block next to the tiny one
    got = fp8_rt(x8, 64)
    assert_bit_equal(got, fp8_roundtrip_reference(x8, 64))
    no_floor = np_fp8_roundtrip(x8, 64, Fp8Dialect.OCP, amax_floor=1e-30)
    assert not torch.equal(got[:, :64], no_floor[:, :64]) and torch.equal(got[:, 64:], no_floor[:, 64:])
    for d in Fp8Dialect:
        assert_bit_equal(fp8_rt(x8, 64, d), fp8_roundtrip_reference(x8, 64, d))

    if dtype != torch.float32:
        return
    x4 = torch.randn(4, 64, generator=gen(41)) * 2.0**-127
    x4[:, 0] = 3 * 2.0**-128  # 0.75 * 2^-126: the floor's scale 2^-126 makes it a tie going up to 1
    x4[:, 32:] *= 2.0**100
    got = fp4_rt(x4, 32)
    assert_bit_equal(got, fp4_roundtrip_reference(x4, 32))
    no_floor = np_fp4_roundtrip(x4, 32, amax_floor=2.0**-149)
    assert not torch.equal(got[:, :32], no_floor[:, :32])
    assert (got[:, 0] == 2.0**-126).all()


def test_huge_and_tiny_magnitudes():
    """Blocks near the float32 maximum (FP8 scale 2^120, FP4 2^126) and float32 subnormals, mixed in a row."""
    for dtype in DTYPES:
        x = torch.randn(6, 192, generator=gen(50))
        x[0, :64] *= 5e37
        x[0, 64] = 3.0e38
        if dtype == torch.float32:  # (bf16 subnormals: wrong in the interpreter, see test_zeros_and_floors)
            x[1, :64] *= 1e-40  # subnormal float32 (FP8 floor applies)
        x[2, :32] = 3.0e38 * torch.sign(x[2, :32])  # FP4: rounds to 4 * 2^126 = inf in both (finite x)
        x[3] *= 2.0**-100
        x[4, ::7] = 0.0
        x = x.to(dtype)
        for d in Fp8Dialect:
            assert_bit_equal(fp8_rt(x, 64, d), fp8_roundtrip_reference(x, 64, d))
        assert_bit_equal(fp4_rt(x, 32), fp4_roundtrip_reference(x, 32))


# ============================================================================= every provider vs a naive oracle


def naive_roundtrip(x: torch.Tensor, block: int, qmax: float, grid: torch.Tensor, floor: float) -> torch.Tensor:
    """Nearest point of `grid` (non-negative magnitudes, ascending; ties to the even index = even mantissa)
    of |x| / s, s = 2^ceil(log2(amax / qmax)) from float64 log2, times s with x's sign; float64."""
    xd = x.double()
    out = torch.empty_like(xd)
    g = grid.double()
    for b in range(0, x.shape[-1], block):
        seg = xd[..., b:b + block]
        amax = seg.abs().amax(-1, keepdim=True).clamp(min=floor)
        s = torch.exp2(torch.ceil(torch.log2(amax / qmax)))
        a = (seg.abs() / s).clamp(max=qmax)
        d = (a[..., None] - g).abs()
        best = d.min(-1, keepdim=True).values
        idx = torch.arange(g.numel())
        cand = torch.where(d == best, idx, g.numel() + idx)  # among the ties prefer the even index
        even = torch.where((cand % 2 == 0) & (cand < g.numel()), cand, 10 * g.numel())
        pick = torch.where(even.min(-1).values < g.numel(), even.min(-1).values, cand.min(-1).values)
        out[..., b:b + block] = torch.copysign(g[pick] * s, seg)
    return out


@pytest.mark.parametrize("fn", provider_params("fp8_roundtrip"))
def test_fp8_roundtrip_providers(fn):
    x = random_rows(7, 100, torch.float32, seed=60, block=64)
    want = naive_roundtrip(x, 64, 448.0, fp8_decode_table(Fp8Dialect.OCP)[:0x7F], 1e-4)
    grid = fp8_grid_rows()
    want_g = naive_roundtrip(grid, 64, 448.0, fp8_decode_table(Fp8Dialect.OCP)[:0x7F], 1e-4)
    for d in Fp8Dialect:
        assert torch.equal(fn(x, 64, d).double(), want)
        assert torch.equal(fn(grid, 64, d).double(), want_g)


@pytest.mark.parametrize("fn", provider_params("fp4_roundtrip"))
def test_fp4_roundtrip_providers(fn):
    x = random_rows(7, 100, torch.float32, seed=61, block=32)
    mag = torch.tensor(E2M1_VALUES[:8])
    ties = torch.cat([torch.tensor([6.0]), (mag[:-1] + mag[1:]) / 2, mag]).repeat(4)[:64].view(2, 32)
    for t in (x, ties, -ties * 2.0**-9):
        assert torch.equal(fn(t, 32).double(), naive_roundtrip(t, 32, 6.0, mag, 6 * 2.0**-126))


# ============================================================================= Hadamard + FP4 (indexer queries)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64, 128), (3, 5, 128), (7, 32), (2, 1024), (0, 64, 128)])
def test_fp4_hadamard_fused_bit_equal(dtype, shape):
    """fp4_roundtrip(x, 32, hadamard=True) in one kernel: bit for bit hadamard_transform (fp32 butterfly, scaled,
    rounded to x's dtype) then the FP4 round trip, at the indexer's [T, 64, 128], ragged row counts (rows not
    filling a program), the smallest (32) and the widest (1024) fused rows, and no rows."""
    x = (3.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))).to(dtype)
    got = fp4_rt(x, 32, hadamard=True)
    want = fp4_roundtrip_reference(x, 32, hadamard=True)
    assert got.shape == x.shape and got.dtype == dtype
    assert_bit_equal(got, want)
    if x.numel():  # premise: the rotation matters (without it the result differs)
        assert not torch.equal(got, fp4_roundtrip_reference(x, 32))


def test_fp4_hadamard_fallbacks_and_views():
    """Rows the fused kernel does not take (2048 wide, a 64-wide block) go through the unfused path with the
    same result as the reference; a strided [T, 64, 128] view (every other head) is read through its strides;
    a row that is not a power of two is refused as hadamard_transform refuses it."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 2048, generator=g).bfloat16()
    assert_bit_equal(fp4_rt(wide, 32, hadamard=True), fp4_roundtrip_reference(wide, 32, hadamard=True))
    x = torch.randn(3, 128, generator=g)
    assert_bit_equal(fp4_rt(x, 64, hadamard=True), fp4_roundtrip_reference(x, 64, hadamard=True))
    q = torch.randn(2, 128, 128, generator=g).bfloat16()[:, ::2]
    assert not q.is_contiguous()
    assert_bit_equal(fp4_rt(q, 32, hadamard=True), fp4_roundtrip_reference(q, 32, hadamard=True))
    with pytest.raises(ValueError, match="power of two"):
        fp4_rt(torch.randn(2, 96), 32, hadamard=True)
