"""The Triton FP8 bit-arithmetic helpers (dsv4/kernels/triton/common.py) against dsv4.numerics, for
both dialects, in the Triton interpreter: all 256 codes decode to the table values; encoding random,
tie and subnormal values gives the numerics module's bytes (zero of either sign -> 0x00)."""

import pytest
import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import fp8_decode, fp8_encode
from dsv4.numerics.fp8 import Fp8Dialect, fp8_decode_table, fp8_encode as ref_encode


@triton.jit
def _decode_kernel(b_ptr, out_ptr, n, FNUZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, fp8_decode(tl.load(b_ptr + offs, mask=m, other=0), FNUZ), mask=m)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, FNUZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, fp8_encode(tl.load(x_ptr + offs, mask=m, other=0.0), FNUZ), mask=m)


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
def test_decode_all_codes(dialect):
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, dtype=torch.float32)
    _decode_kernel[(1,)](codes, out, 256, FNUZ=dialect == Fp8Dialect.FNUZ, BLOCK=256)
    ref = fp8_decode_table(dialect)
    finite = ~torch.isnan(ref)
    assert torch.equal(out[finite], ref[finite])


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
def test_encode_matches_numerics(dialect):
    g = torch.Generator().manual_seed(0)
    mx = dialect.max_finite
    table = fp8_decode_table(dialect)
    vals = table[~torch.isnan(table)]
    vals = vals[vals.abs() <= mx]
    srt = vals.unique().sort().values
    mids = (srt[1:] + srt[:-1]) / 2  # exact ties between neighbours
    rnd = (torch.rand(20000, generator=g) * 2 - 1) * mx * torch.exp2(-torch.randint(0, 20, (20000,), generator=g).float())
    x = torch.cat([vals, mids, torch.nextafter(mids, torch.zeros_like(mids)), rnd, torch.tensor([0.0, -0.0])]).float()
    out = torch.empty(x.numel(), dtype=torch.uint8)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), FNUZ=dialect == Fp8Dialect.FNUZ, BLOCK=1024)
    ref = ref_encode(x, dialect)
    zero = table[ref.long()] == 0
    assert torch.equal(out[~zero], ref[~zero])
    assert bool((out[zero] == 0).all())
