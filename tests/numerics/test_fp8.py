"""Tests for dsv4.numerics.fp8: FP8 e4m3 (OCP / FNUZ), E8M0 scales, block quantisation, conversion."""

import math
from fractions import Fraction

import pytest
import torch

from dsv4.numerics import (
    Fp8Dialect,
    dequantize_fp8_blocks,
    e8m0_to_float,
    float_to_e8m0,
    fnuz_to_ocp,
    fp8_decode,
    fp8_decode_table,
    fp8_encode,
    fp8_roundtrip,
    ocp_to_fnuz,
    pow2_scale_exponent,
    quantize_fp8_blocks,
)

DIALECTS = [Fp8Dialect.OCP, Fp8Dialect.FNUZ]
ALL_BYTES = torch.arange(256, dtype=torch.uint8)


# ----------------------------------------------------------------------------- dialect


def test_dialect_properties_and_parse():
    o, f = Fp8Dialect.OCP, Fp8Dialect.FNUZ
    assert (o.torch_dtype, f.torch_dtype) == (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    assert (o.max_finite, f.max_finite) == (448.0, 240.0)
    assert (o.quant_max, f.quant_max) == (448.0, 224.0)
    assert (o.scale_exp_offset, f.scale_exp_offset) == (0, 1)
    assert o.nan_bytes == (0x7F, 0xFF) and f.nan_bytes == (0x80,)
    for x in (o, "ocp", "OCP", "e4m3fn", torch.float8_e4m3fn):
        assert Fp8Dialect.parse(x) is o
    for x in (f, "fnuz", "e4m3fnuz", torch.float8_e4m3fnuz):
        assert Fp8Dialect.parse(x) is f
    for bad in ("e5m2", torch.float16, 3):
        with pytest.raises(ValueError, match="e5m2" if bad == "e5m2" else "unknown"):
            Fp8Dialect.parse(bad)


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("d", DIALECTS)
def test_decode_table_all_codes_vs_torch(d):
    table = fp8_decode_table(d)
    assert table.dtype == torch.float32 and table.shape == (256,)
    ref = ALL_BYTES.view(d.torch_dtype).float()
    nan_idx = set(torch.nonzero(table.isnan()).flatten().tolist())
    assert nan_idx == set(d.nan_bytes)
    assert set(torch.nonzero(ref.isnan()).flatten().tolist()) == nan_idx
    ok = ~table.isnan()
    assert torch.equal(table[ok], ref[ok])
    # signs of zero agree too
    assert torch.equal(torch.signbit(table[ok]), torch.signbit(ref[ok]))
    finite = table[ok]
    assert finite.max().item() == d.max_finite == table[d.max_finite_byte].item()
    assert finite.min().item() == -d.max_finite
    bias = 7 if d is Fp8Dialect.OCP else 8
    assert table[0x01].item() == 2.0 ** (1 - bias - 3)  # min subnormal: 2^-9 / 2^-10
    assert finite[finite > 0].min().item() == 2.0 ** (1 - bias - 3)
    assert table[0x08].item() == 2.0 ** (1 - bias)  # min normal


def test_decode_special_bytes():
    o, f = fp8_decode_table("ocp"), fp8_decode_table("fnuz")
    assert o[0x80].item() == 0.0 and math.copysign(1, o[0x80].item()) == -1
    assert math.isnan(f[0x80].item())
    assert (f[0x7F].item(), f[0xFF].item()) == (240.0, -240.0)
    assert math.isnan(o[0x7F].item()) and math.isnan(o[0xFF].item())


@pytest.mark.parametrize("d", DIALECTS)
def test_fp8_decode_tensor_inputs(d):
    b = torch.randint(0, 256, (7, 33), dtype=torch.uint8)
    v = fp8_decode(b, d)
    assert v.dtype == torch.float32 and v.shape == b.shape
    ref = b.view(d.torch_dtype).float()
    assert torch.equal(v.nan_to_num(123.0), ref.nan_to_num(123.0))
    # float8 tensors are viewed as bytes; dialect may be omitted
    assert torch.equal(fp8_decode(b.view(d.torch_dtype)).nan_to_num(1.0), v.nan_to_num(1.0))
    other = Fp8Dialect.FNUZ if d is Fp8Dialect.OCP else Fp8Dialect.OCP
    with pytest.raises(ValueError):
        fp8_decode(b.view(d.torch_dtype), other)
    with pytest.raises(ValueError):
        fp8_decode(b)  # raw bytes need a dialect


def test_fnuz_is_exactly_half_ocp():
    o, f = fp8_decode_table("ocp"), fp8_decode_table("fnuz")
    for byte in range(256):
        if byte in (0x7F, 0xFF, 0x80):
            continue
        assert f[byte].item() == o[byte].item() / 2, hex(byte)


def test_fnuz_bytes_read_as_ocp_are_doubled():
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 3
    q, s = quantize_fp8_blocks(x, (128,), "fnuz")
    true = dequantize_fp8_blocks(q, s, (128,), "fnuz")
    wrong = dequantize_fp8_blocks(q, s, (128,), "ocp")  # the trap: fnuz bytes + fnuz scale read as OCP
    assert torch.equal(wrong, 2 * true)
    assert (wrong != 0).any()
    # and the mirror image: OCP bytes read as FNUZ are halved
    qo, so = quantize_fp8_blocks(x, (128,), "ocp")
    assert torch.equal(dequantize_fp8_blocks(qo, so, (128,), "fnuz"), dequantize_fp8_blocks(qo, so, (128,), "ocp") / 2)


# ----------------------------------------------------------------------------- encode


@pytest.mark.parametrize("d", DIALECTS)
def test_encode_roundtrip_every_code(d):
    v = fp8_decode(ALL_BYTES, d)
    ok = ~v.isnan()
    enc = fp8_encode(v[ok], d)
    assert enc.dtype == torch.uint8
    assert torch.equal(enc, ALL_BYTES[ok])  # includes OCP -0 (0x80) -> 0x80
    assert torch.equal(fp8_decode(enc, d), v[ok])
    # float64 / bf16 inputs of exact code values too
    assert torch.equal(fp8_encode(v[ok].double(), d), ALL_BYTES[ok])
    exact_bf16 = v[ok].bfloat16().float() == v[ok]
    assert torch.equal(fp8_encode(v[ok].bfloat16()[exact_bf16], d), ALL_BYTES[ok][exact_bf16])


def _tie_values(d):
    """Midpoints between neighbouring positive codes, plus values one float32 ulp either side."""
    t = fp8_decode_table(d)
    pos = t[1 : d.max_finite_byte + 1]
    lo = torch.cat([torch.zeros(1), pos[:-1]])
    mids = (lo.double() + pos.double()) / 2
    mids = mids.float()
    assert torch.equal(mids.double(), (lo.double() + pos.double()) / 2)  # exact in float32
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    v = torch.cat([mids, up, down])
    return torch.cat([v, -v])


@pytest.mark.parametrize("d", DIALECTS)
def test_encode_matches_torch_cast(d):
    g = torch.Generator().manual_seed(1234)
    n = 100_000
    mant = 1 + torch.rand(n, generator=g)
    expo = torch.randint(-14, 9, (n,), generator=g).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.exp2(expo)  # spans underflow, subnormals and normals
    x = x.clamp(-d.max_finite, d.max_finite)
    ties = _tie_values(d)
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, d.max_finite, -d.max_finite])])
    mine = fp8_encode(x, d)
    ref = x.to(d.torch_dtype).view(torch.uint8)
    assert torch.equal(mine, ref)


def test_encode_ties_to_even_explicit():
    # 1 + 1/16 lies halfway between 1.0 (0x38) and 1.125 (0x39): even mantissa wins
    assert fp8_encode(torch.tensor([1.0625, 1.1875, -1.0625]), "ocp").tolist() == [0x38, 0x3A, 0xB8]
    # halfway between 0 and the min subnormal rounds to 0; 3/2 min subnormal rounds to 2 units
    s = 2.0**-9
    assert fp8_encode(torch.tensor([s / 2, 1.5 * s, 2.5 * s]), "ocp").tolist() == [0x00, 0x02, 0x02]
    # FNUZ: same codes at half the values
    assert fp8_encode(torch.tensor([1.0625 / 2, s / 4, 0.75 * s]), "fnuz").tolist() == [0x38, 0x00, 0x02]
    # subnormal -> normal carry: 7.5 units of 2^-9 rounds to 8 units = min normal (0x08)
    assert fp8_encode(torch.tensor([7.5 * s]), "ocp").tolist() == [0x08]


def test_encode_float64_is_exact():
    # just above a tie in float64; rounding to float32 first would create a false tie
    x = torch.tensor([1.0625 + 2.0**-40, 1.0625 - 2.0**-40], dtype=torch.float64)
    assert fp8_encode(x, "ocp").tolist() == [0x39, 0x38]


def test_encode_saturation_nan_zero():
    big = torch.tensor([448.0, 464.0, 500.0, 1e6, 3e38, math.inf])
    assert fp8_encode(big, "ocp").tolist() == [0x7E] * 6
    assert fp8_encode(-big, "ocp").tolist() == [0xFE] * 6
    bigf = torch.tensor([240.0, 247.0, 248.0, 1e6, math.inf])
    assert fp8_encode(bigf, "fnuz").tolist() == [0x7F] * 5
    assert fp8_encode(-bigf, "fnuz").tolist() == [0xFF] * 5
    nan = torch.tensor([math.nan, -math.nan])
    assert fp8_encode(nan, "ocp").tolist() == [0x7F, 0x7F]
    assert fp8_encode(nan, "fnuz").tolist() == [0x80, 0x80]
    z = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -(2.0**-149)])
    assert fp8_encode(z, "ocp").tolist() == [0x00, 0x80, 0x80, 0x00, 0x80]
    assert fp8_encode(z, "fnuz").tolist() == [0x00] * 5


# ----------------------------------------------------------------------------- E8M0


def test_e8m0_all_bytes():
    v = e8m0_to_float(ALL_BYTES)
    assert v.dtype == torch.float32
    for b in range(255):
        assert v[b].item() == math.ldexp(1.0, b - 127), b
    assert math.isnan(v[255].item())
    assert v[0].item() != 0.0 and v[0].item() == 2.0**-127
    assert v[0:1].view(torch.int32).item() == 0x00400000
    # float8_e8m0fnu tensors are reinterpreted, agreeing with torch's own conversion
    e = ALL_BYTES[:255].view(torch.float8_e8m0fnu)
    assert torch.equal(e8m0_to_float(e), v[:255])
    assert torch.equal(e.float(), v[:255])


def test_float_to_e8m0_roundtrip_and_errors():
    b = ALL_BYTES[:255]
    assert torch.equal(float_to_e8m0(e8m0_to_float(b)), b)
    assert torch.equal(float_to_e8m0(e8m0_to_float(b).double()), b)
    assert float_to_e8m0([1.0, 0.5, 2.0**-127, 2.0**127]).tolist() == [127, 126, 0, 254]
    for bad in (3.0, 0.0, -1.0, 1.0 + 2**-20, math.inf, math.nan):
        with pytest.raises(ValueError, match="power"):
            float_to_e8m0(torch.tensor([1.0, bad]))
    for bad in (2.0**128, 2.0**-128):
        with pytest.raises(ValueError, match="outside"):
            float_to_e8m0(torch.tensor([bad], dtype=torch.float64))


def test_e8m0_numeric_copy_is_not_reinterpretation():
    """The vLLM trap: numerically converting E8M0 scales to uint8 destroys them."""
    scales = torch.tensor([2.0**-7, 8.0, 1.0, 2.0**-20]).to(torch.float8_e8m0fnu)
    reinterpreted = scales.view(torch.uint8)
    copied = scales.to(torch.uint8)  # numeric: 2^-7 -> 0, 8 -> 8, 1 -> 1
    assert reinterpreted.tolist() == [120, 130, 127, 107]
    assert copied.tolist() != reinterpreted.tolist()
    assert torch.equal(e8m0_to_float(reinterpreted), scales.float())
    assert not torch.equal(e8m0_to_float(copied), scales.float())
    buf = torch.empty(4, dtype=torch.uint8)
    buf.copy_(scales)  # copy_ is numeric too
    assert not torch.equal(buf, reinterpreted)
    buf.copy_(scales.view(torch.uint8))
    assert torch.equal(e8m0_to_float(buf), scales.float())


# ----------------------------------------------------------------------------- pow2 exponent


def _ceil_log2_ratio(a: float, q: float) -> int:
    r = Fraction(a) / Fraction(q)
    e = math.floor(math.log2(r)) - 1
    while Fraction(2) ** e < r:
        e += 1
    return e


@pytest.mark.parametrize("qmax", [448.0, 224.0, 6.0, 1.0])
def test_pow2_scale_exponent_exact(qmax):
    ks = range(-40, 40)
    exact = torch.tensor([qmax * 2.0**k for k in ks], dtype=torch.float32)
    inf_ = torch.full_like(exact, math.inf)
    above = torch.nextafter(exact, inf_)
    below = torch.nextafter(exact, torch.zeros_like(exact))
    e = pow2_scale_exponent(exact, qmax)
    assert e.dtype == torch.int32
    assert e.tolist() == list(ks)
    assert pow2_scale_exponent(above, qmax).tolist() == [k + 1 for k in ks]
    assert pow2_scale_exponent(below, qmax).tolist() == list(ks)
    g = torch.Generator().manual_seed(7)
    rnd = torch.exp2(torch.rand(300, generator=g) * 60 - 30)
    got = pow2_scale_exponent(rnd, qmax).tolist()
    assert got == [_ceil_log2_ratio(a, qmax) for a in rnd.tolist()]
    # float64 input, and the float32 subnormal amax floor used by MXFP4
    assert pow2_scale_exponent(torch.tensor([qmax * 2.0**-200], dtype=torch.float64), qmax).item() == -200
    assert pow2_scale_exponent(torch.tensor([6 * 2.0**-126]), 6.0).item() == -126


# ----------------------------------------------------------------------------- block quantisation


def _ref_block_exponents(x: torch.Tensor, bs, floor=1e-4):
    """Per-block ceil(log2(amax/448)) computed element by element in Python."""
    xs = x.double()
    if len(bs) == 1:
        rows = xs.reshape(-1, xs.shape[-1])
        out = []
        for r in rows:
            out.append([_ceil_log2_ratio(max(r[i : i + bs[0]].abs().max().item(), floor), 448.0)
                        for i in range(0, r.numel(), bs[0])])
        nb = len(out[0])
        return torch.tensor(out).reshape(*x.shape[:-1], nb)
    n, k = xs.shape
    return torch.tensor([[_ceil_log2_ratio(max(xs[i : i + bs[0], j : j + bs[1]].abs().max().item(), floor), 448.0)
                          for j in range(0, k, bs[1])] for i in range(0, n, bs[0])])


def _half_step_bound(q: torch.Tensor, scale_f: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 quantum around each OCP-grid value y = x/s, times s (float64)."""
    # y itself is bounded in [0, 448]; quantum 2^(floor(log2|y|)-3), at least 2^-9 (subnormal)
    return scale_f.double() * torch.exp2((torch.floor(torch.log2(q.double().abs().clamp(min=2.0**-6))) - 3)) / 2


CASES = [((3, 200), (128,)), ((2, 5, 70), (64,)), ((200, 300), (128, 128)), ((4, 256), (128,)), ((2, 130, 129), (128, 128))]


@pytest.mark.parametrize("shape,bs", CASES)
def test_block_quant_ocp_recipe(shape, bs):
    g = torch.Generator().manual_seed(sum(shape) + sum(bs))
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape, generator=g).float())
    q, s = quantize_fp8_blocks(x, bs, "ocp")
    nl = x.dim() - len(bs)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert s.dtype == torch.uint8
    assert s.shape == x.shape[:nl] + tuple(-(-n // b) for n, b in zip(x.shape[nl:], bs))
    sf = e8m0_to_float(s)
    assert torch.equal(float_to_e8m0(sf), s)  # powers of two
    if x.dim() == len(bs) or len(bs) == 1:
        assert torch.equal(s.long() - 127, _ref_block_exponents(x, bs))
    # independent check of the bytes: torch's own e4m3fn cast of clamp(x/s)
    ref_sf = _expand_like(sf, x.shape, bs)
    ref_q = (x / ref_sf).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(q, ref_q)
    dq = dequantize_fp8_blocks(q, s, bs, "ocp")
    assert torch.equal(dq, fp8_decode(q, "ocp") * ref_sf)
    err = (dq.double() - x.double()).abs()
    assert (err <= _half_step_bound(x / ref_sf, ref_sf)).all()
    if len(bs) == 1:
        assert torch.equal(fp8_roundtrip(x, bs[0]), dq)


def _expand_like(sf, shape, bs):
    nb = len(bs)
    for i, b in enumerate(bs):
        dim = sf.dim() - nb + i
        sf = sf.repeat_interleave(b, dim=dim).narrow(dim, 0, shape[len(shape) - nb + i])
    return sf


def test_ragged_block_uses_partial_amax():
    x = torch.zeros(1, 130)
    x[0, :128] = 960.0
    x[0, 128:] = torch.tensor([0.5, -0.25])
    q, s = quantize_fp8_blocks(x, (128,), "ocp")
    assert s.tolist() == [[127 + _ceil_log2_ratio(960.0, 448), 127 + _ceil_log2_ratio(0.5, 448)]]
    assert torch.equal(dequantize_fp8_blocks(q, s, (128,), "ocp"), x)


def test_zero_block_uses_amax_floor():
    x = torch.zeros(2, 256)
    x[1, 128:] = 1.0
    q, s = quantize_fp8_blocks(x, (128,), "ocp")
    floor_byte = 127 + _ceil_log2_ratio(1e-4, 448.0)  # 2^-22
    assert floor_byte == 105
    assert s.tolist() == [[floor_byte, floor_byte], [floor_byte, 127 + _ceil_log2_ratio(1.0, 448.0)]]
    assert (q[0] == 0).all()
    q2, s2 = quantize_fp8_blocks(torch.zeros(128, 128), (128, 128), "fnuz")
    assert s2.item() == floor_byte + 1 and (q2 == 0).all()
    q3, s3 = quantize_fp8_blocks(torch.zeros(1, 128), (128,), "ocp", amax_floor=448.0)
    assert s3.item() == 127


@pytest.mark.parametrize("shape,bs", CASES)
def test_fnuz_quantisation_reproduces_ocp_bit_for_bit(shape, bs):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 10, shape, generator=g).float())
    x.view(-1)[::97] = -0.0
    qo, so = quantize_fp8_blocks(x, bs, "ocp")
    qf, sf = quantize_fp8_blocks(x, bs, Fp8Dialect.FNUZ)
    assert torch.equal(sf.long(), so.long() + 1)
    assert torch.equal(qf, torch.where(qo == 0x80, torch.zeros_like(qo), qo))
    do = dequantize_fp8_blocks(qo, so, bs, "ocp")
    df = dequantize_fp8_blocks(qf, sf, bs, "fnuz")
    assert torch.equal(do, df)
    assert torch.equal((do + 0.0).view(torch.int32), (df + 0.0).view(torch.int32))
    assert not df.isnan().any()


def test_dequantize_inputs_and_errors():
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    q, s = quantize_fp8_blocks(x, (128,), "ocp")
    a = dequantize_fp8_blocks(q, s, (128,), "ocp", out_dtype=torch.bfloat16)
    b = dequantize_fp8_blocks(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), (128,))
    assert a.dtype == torch.bfloat16 and torch.equal(a.float(), b)
    assert fp8_roundtrip(x, 128).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp8_blocks(q, s[:, :1], (128,), "ocp")
    with pytest.raises(ValueError):
        dequantize_fp8_blocks(q.view(torch.float8_e4m3fn), s, (128,), "fnuz")
    with pytest.raises(TypeError):
        dequantize_fp8_blocks(q, e8m0_to_float(s), (128,), "ocp")


# ----------------------------------------------------------------------------- conversion


def test_ocp_to_fnuz_random_weight_exact():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 384, generator=g) * 0.02
    q, s = quantize_fp8_blocks(w, (128, 128), "ocp")
    q8, s8 = q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)
    qf, sf = ocp_to_fnuz(q8, s8)
    assert qf.dtype == torch.uint8 and sf.dtype == torch.uint8
    assert torch.equal(sf.long(), s.long() + 1)
    ref = dequantize_fp8_blocks(q, s, (128, 128), "ocp")
    assert torch.equal(dequantize_fp8_blocks(qf, sf, (128, 128), "fnuz"), ref)
    assert torch.equal(q.view(torch.float8_e4m3fn).float() * _expand_like(s8.float(), q.shape, (128, 128)), ref)
    qo, so = fnuz_to_ocp(qf.view(torch.float8_e4m3fnuz), sf)
    assert torch.equal(qo, torch.where(q == 0x80, torch.zeros_like(q), q)) and torch.equal(so, s)
    assert torch.equal(dequantize_fp8_blocks(qo, so, (128, 128), "ocp"), ref)


def test_ocp_to_fnuz_every_byte():
    bytes_ = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8).reshape(2, 127)
    for sbyte in (1, 100, 127, 200, 253):
        s = torch.tensor([[sbyte]], dtype=torch.uint8)
        qf, sf = ocp_to_fnuz(bytes_, s)
        assert sf.item() == sbyte + 1
        assert torch.equal(qf, torch.where(bytes_ == 0x80, torch.zeros_like(bytes_), bytes_))
        a = dequantize_fp8_blocks(bytes_, s, (128, 128), "ocp")
        b = dequantize_fp8_blocks(qf, sf, (128, 128), "fnuz")
        assert torch.equal(a, b) and not b.isnan().any()
        qo, so = fnuz_to_ocp(qf, sf)
        assert torch.equal(qo, qf) and torch.equal(so, s)
    assert bytes_.unique().numel() == 254


def test_ocp_to_fnuz_errors():
    s = torch.full((1, 1), 127, dtype=torch.uint8)
    w = torch.zeros(4, 8, dtype=torch.uint8)
    w[0, 0], w[1, 1], w[2, 2] = 0x7F, 0xFF, 0x7F
    with pytest.raises(ValueError, match=r"corrupt: 3 NaN bytes"):
        ocp_to_fnuz(w, s)
    with pytest.raises(ValueError):
        ocp_to_fnuz(w.view(torch.float8_e4m3fn), s)
    w0 = torch.zeros(4, 8, dtype=torch.uint8)
    for bad in (254, 255):
        with pytest.raises(ValueError, match="254"):
            ocp_to_fnuz(w0, torch.full((1, 1), bad, dtype=torch.uint8))
    with pytest.raises(ValueError):  # a tensor already typed as fnuz is not OCP input
        ocp_to_fnuz(w0.view(torch.float8_e4m3fnuz), s)
    # inputs are not modified
    w1 = torch.tensor([[0x80, 0x01]], dtype=torch.uint8)
    out, _ = ocp_to_fnuz(w1, s)
    assert out.tolist() == [[0x00, 0x01]] and w1.tolist() == [[0x80, 0x01]]


def test_fnuz_to_ocp_errors():
    s = torch.full((1, 1), 127, dtype=torch.uint8)
    for bad in (0x7F, 0xFF):
        w = torch.zeros(2, 2, dtype=torch.uint8)
        w[1, 1] = bad
        with pytest.raises(ValueError, match="not representable"):
            fnuz_to_ocp(w, s)
    w = torch.zeros(2, 2, dtype=torch.uint8)
    w[0, 1] = 0x80
    with pytest.raises(ValueError, match="NaN"):
        fnuz_to_ocp(w, s)
    with pytest.raises(ValueError):
        fnuz_to_ocp(torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        fnuz_to_ocp(torch.zeros(2, 2, dtype=torch.uint8).view(torch.float8_e4m3fn), s)
