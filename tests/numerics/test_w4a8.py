"""MXFP4 weights as exact FP8 e4m3 operands with one scale per 128-block (dsv4/numerics/w4a8.py)."""

from __future__ import annotations

import pytest
import torch

from dsv4.numerics.fp4 import dequantize_fp4_blocks, fp4_pack, quantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, fp8_decode
from dsv4.numerics.w4a8 import fp4_as_fp8_dequant, fp4_block_offsets, fp4_blocks_to_fp8, fp8_window

DIALECTS = [Fp8Dialect.OCP, Fp8Dialect.FNUZ]


def one_block_per_offset(dialect) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One row per offset k of the window (and a few outside it): a 128-block whose sub-block 1 holds all 16
    E2M1 codes twice at scale byte S - (KMAX - k) while the other three sit at S (the block's largest)."""
    kmin, kmax = fp8_window(dialect)
    S = 120
    ks = list(range(kmin - 2, kmax + 1))
    codes = torch.arange(16, dtype=torch.uint8).repeat(8)[None, :].repeat(len(ks), 1)  # [rows, 128]
    codes = codes[:, torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    scale = torch.full((len(ks), 4), S, dtype=torch.uint8)
    scale[:, 1] = torch.tensor([S - (kmax - k) for k in ks], dtype=torch.uint8)
    return fp4_pack(codes), scale, ks


@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
def test_every_code_at_every_offset(dialect):
    """All 16 codes x every offset of the window: exact, and flagged as fitting; offsets below the window are
    flagged as not fitting and their bytes are zero (never approximated)."""
    packed, scale, ks = one_block_per_offset(dialect)
    kmin, kmax = fp8_window(dialect)
    fp8, bscale, fits = fp4_blocks_to_fp8(packed, scale, dialect)
    assert fp8.shape == (len(ks), 128) and bscale.shape == (len(ks), 1) and fits.shape == (len(ks), 1)
    want = dequantize_fp4_blocks(packed, scale)
    got = fp4_as_fp8_dequant(fp8, bscale, dialect)
    for r, k in enumerate(ks):
        if k >= kmin:
            assert bool(fits[r, 0]), k
            assert int(bscale[r, 0]) == 120 - kmax
            assert torch.equal(got[r], want[r]), f"offset {k}"
        else:
            assert not bool(fits[r, 0]), k
            assert int(fp8[r].abs().sum()) == 0
    # the largest FP8 magnitude used is 6 * 2^KMAX: inside the format (448 OCP, 240 FNUZ)
    vals = fp8_decode(fp8, dialect).abs()
    assert float(vals.max()) == 6 * 2.0 ** kmax


@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
def test_random_weights_exact(dialect):
    """MXFP4 weights quantised from Gaussian rows with a few wide-range rows: every fitting block is exact;
    the blocks reported as not fitting are exactly those whose four scales span more than 11 binades."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 24, 512, generator=g)
    w[1, 5, 130:140] *= 2.0 ** 20  # one sub-block 2^20 larger than its neighbours: out of the window
    w[2, 7, 256:288] *= 2.0 ** -10  # 10-11 binades below: still inside
    packed, scale = quantize_fp4_blocks(w)
    fp8, bscale, fits = fp4_blocks_to_fp8(packed, scale, dialect)
    s = scale.to(torch.int32).view(3, 24, 4, 4)
    spread = s.amax(-1) - s.amin(-1)
    assert torch.equal(fits, spread <= 11)
    assert not bool(fits[1, 5, 1]) and bool(fits[2, 7, 2])
    want = dequantize_fp4_blocks(packed, scale).view(3, 24, 4, 128)
    got = fp4_as_fp8_dequant(fp8, bscale, dialect).view(3, 24, 4, 128)
    assert torch.equal(got[fits], want[fits])


def test_dialects_share_values_not_bytes():
    """The same weight in both dialects: equal dequantised values; FNUZ uses a block scale one binade larger."""
    g = torch.Generator().manual_seed(2)
    packed, scale = quantize_fp4_blocks(torch.randn(8, 256, generator=g))
    a = fp4_blocks_to_fp8(packed, scale, Fp8Dialect.OCP)
    b = fp4_blocks_to_fp8(packed, scale, Fp8Dialect.FNUZ)
    assert torch.equal(b[1].int() - a[1].int(), torch.ones_like(a[1].int()))
    assert torch.equal(fp4_as_fp8_dequant(a[0], a[1], "ocp"), fp4_as_fp8_dequant(b[0], b[1], "fnuz"))


def test_bad_shapes_name_the_problem():
    packed, scale = quantize_fp4_blocks(torch.randn(2, 96))
    with pytest.raises(ValueError, match="multiple of block"):
        fp4_blocks_to_fp8(packed, scale)
    packed, scale = quantize_fp4_blocks(torch.randn(2, 128))
    with pytest.raises(ValueError, match="scale shape"):
        fp4_blocks_to_fp8(packed, scale[:, :3])


def test_all_zero_sub_blocks_do_not_count():
    """A sub-block whose codes are all zero (+0 or -0) may carry any scale: with the codes given it neither
    sets the base nor breaks the window, and the block stays exact; from the scales alone it would not fit."""
    from dsv4.numerics.fp4 import fp4_pack, fp4_unpack

    g = torch.Generator().manual_seed(3)
    packed, scale = quantize_fp4_blocks(torch.randn(4, 256, generator=g))
    codes = fp4_unpack(packed)
    codes[1, 32:64] = 0
    codes[1, 40] = 8  # -0
    codes[2, 128:160] = 0
    packed = fp4_pack(codes)
    scale = scale.clone()
    scale[1, 1] = 0  # far below its neighbours
    scale[2, 4] = 250  # far above
    fp8, bscale, fits = fp4_blocks_to_fp8(packed, scale)
    assert bool(fits.all())
    assert torch.equal(fp4_as_fp8_dequant(fp8, bscale), dequantize_fp4_blocks(packed, scale))
    _, _, fits_scales_only = fp4_block_offsets(scale)
    assert not bool(fits_scales_only[1, 0]) and not bool(fits_scales_only[2, 1])
