"""Tests for dsv4.numerics.fp4: E2M1 codes, nibble packing, MXFP4 block quantisation."""

import math

import pytest
import torch

from dsv4.numerics import (
    E2M1_VALUES,
    dequantize_fp4_blocks,
    e8m0_to_float,
    fp4_decode,
    fp4_encode,
    fp4_pack,
    fp4_roundtrip,
    fp4_unpack,
    quantize_fp4_blocks,
)


def _e2m1_from_bits(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else math.ldexp(1 + m / 2, e - 1)
    return sign * mag


def _nearest_even(v: float) -> int:
    """Brute-force reference: nearest E2M1 magnitude, ties to even code, saturating."""
    a = min(abs(v), 6.0)
    dists = [(abs(a - E2M1_VALUES[c]), c % 2, c) for c in range(8)]
    best = min(dists)[2]
    return best | (8 if math.copysign(1.0, v) < 0 else 0)


def test_all_16_codes():
    assert len(E2M1_VALUES) == 16
    for c in range(16):
        assert E2M1_VALUES[c] == _e2m1_from_bits(c)
        assert math.copysign(1, E2M1_VALUES[c]) == math.copysign(1, _e2m1_from_bits(c))
    v = fp4_decode(torch.arange(16, dtype=torch.uint8))
    assert v.dtype == torch.float32 and v.tolist() == list(E2M1_VALUES)
    assert fp4_decode(torch.arange(16)).tolist() == list(E2M1_VALUES)  # int64 codes
    with pytest.raises(ValueError):
        fp4_decode(torch.tensor([16]))


def test_pack_unpack_nibble_order():
    assert fp4_unpack(torch.tensor([0x21], dtype=torch.uint8)).tolist() == [1, 2]
    assert fp4_unpack(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)).tolist() == [[1, 2, 0, 15]]
    assert fp4_pack(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    # the checkpoint stores I8: negative int8 bytes are viewed as uint8
    assert fp4_unpack(torch.tensor([-0x80 + 0x21], dtype=torch.int8)).tolist() == [1, 0xA]
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8, generator=g)
    c = fp4_unpack(p)
    assert c.shape == (3, 5, 32) and c.dtype == torch.uint8
    assert torch.equal(c[..., 0::2], p & 0xF) and torch.equal(c[..., 1::2], p >> 4)
    assert torch.equal(fp4_pack(c), p)
    assert torch.equal(fp4_unpack(p.view(torch.float4_e2m1fn_x2)), c)
    with pytest.raises(ValueError, match="even"):
        fp4_pack(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        fp4_pack(torch.tensor([3, 17], dtype=torch.uint8))


def test_encode_codes_roundtrip():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fp4_encode(fp4_decode(codes)), codes)  # -0.0 -> code 8
    assert torch.equal(fp4_encode(fp4_decode(codes).bfloat16()), codes)


def test_encode_ties_to_even():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    got = fp4_decode(fp4_encode(torch.tensor(ties)))
    assert got.tolist() == expect
    assert fp4_decode(fp4_encode(-torch.tensor(ties))).tolist() == [-v for v in expect]
    # one ulp either side of each tie goes to the nearer value
    t = torch.tensor(ties)
    up = fp4_decode(fp4_encode(torch.nextafter(t, torch.full_like(t, 10.0)))).tolist()
    dn = fp4_decode(fp4_encode(torch.nextafter(t, torch.zeros_like(t)))).tolist()
    assert up == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert dn == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def test_encode_saturation_nan_and_random():
    x = torch.tensor([6.0, 6.5, 100.0, math.inf, -7.0, -math.inf, math.nan, -0.0, -0.1, 0.1])
    assert fp4_encode(x).tolist() == [7, 7, 7, 7, 15, 15, 0, 8, 8, 0]
    g = torch.Generator().manual_seed(5)
    r = (torch.rand(4000, generator=g) - 0.5) * 16
    r = torch.cat([r, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * -1])
    assert fp4_encode(r).tolist() == [_nearest_even(v) for v in r.tolist()]
    assert fp4_encode(r.double()).tolist() == [_nearest_even(v) for v in r.tolist()]


def test_block_quant_error_bound_and_scales():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (6, 1), generator=g).float())
    packed, s = quantize_fp4_blocks(x)
    assert packed.shape == (6, 128) and packed.dtype == torch.uint8
    assert s.shape == (6, 8) and s.dtype == torch.uint8
    blocks = x.reshape(6, 8, 32)
    for i in range(6):
        for j in range(8):
            amax = blocks[i, j].abs().max().item()
            e = s[i, j].item() - 127
            assert 2.0 ** (e - 1) < amax / 6 <= 2.0**e
    dq = dequantize_fp4_blocks(packed, s)
    sf = e8m0_to_float(s).repeat_interleave(32, dim=-1)
    y = (x / sf).abs()
    half_step = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0)) * sf
    assert ((dq - x).abs() <= half_step).all()
    codes = fp4_unpack(packed)
    assert torch.equal(codes, fp4_encode((x / sf).clamp(-6, 6)))
    assert torch.equal(fp4_roundtrip(x), dq)


def test_zero_block_amax_floor_and_ragged():
    x = torch.zeros(2, 40)
    x[1, :3] = torch.tensor([1.0, -3.0, 0.5])
    packed, s = quantize_fp4_blocks(x)
    assert packed.shape == (2, 20)
    assert s.tolist() == [[1, 1], [126, 1]]  # amax 3 -> 2^-1; floor 6*2^-126 -> 2^-126 (byte 1)
    assert torch.equal(dequantize_fp4_blocks(packed, s), x)
    y = torch.randn(3, 33, dtype=torch.bfloat16)
    r = fp4_roundtrip(y)
    assert r.dtype == torch.bfloat16 and r.shape == y.shape
    with pytest.raises(ValueError, match="even"):
        quantize_fp4_blocks(y)
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp4_blocks(packed, s[:, :1])


def test_dequantize_random_bytes_vs_python_reference():
    g = torch.Generator().manual_seed(9)
    packed = torch.randint(-128, 128, (3, 32), dtype=torch.int8, generator=g)  # K = 64
    scale = torch.randint(100, 150, (3, 2), dtype=torch.uint8, generator=g)
    out = dequantize_fp4_blocks(packed, scale.view(torch.float8_e8m0fnu), out_dtype=torch.float64)
    assert out.shape == (3, 64) and out.dtype == torch.float64
    for r in range(3):
        for k in range(64):
            byte = packed[r, k // 2].item() & 0xFF
            code = (byte >> 4) if k % 2 else (byte & 0xF)
            ref = _e2m1_from_bits(code) * 2.0 ** (scale[r, k // 32].item() - 127)
            assert out[r, k].item() == ref
