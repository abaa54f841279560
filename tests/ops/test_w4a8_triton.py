"""W4A8 building blocks (dsv4/kernels/triton/w4a8.py) in the Triton interpreter: the in-kernel E2M1 -> e4m3
mapping for every code at every offset of the window in both dialects, and the dense W4A8 GEMM against the
official-numerics product (FP8 activations x dequantised MXFP4 weights, float64) on ragged shapes."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.triton.w4a8 import fp4_to_fp8_bytes, w4a8_linear, w4a8_weight_to_fp8
from dsv4.numerics.fp4 import E2M1_VALUES, dequantize_fp4_blocks, quantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, fp8_encode, quantize_fp8_blocks
from dsv4.numerics.w4a8 import fp4_block_offsets, fp4_blocks_to_fp8, fp8_window

DIALECTS = [Fp8Dialect.OCP, Fp8Dialect.FNUZ]


@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
def test_mapping_every_code_every_offset(dialect):
    kmin, kmax = fp8_window(dialect)
    ks = torch.arange(kmin, kmax + 1)
    codes = torch.arange(16).repeat(len(ks))
    offs = ks.repeat_interleave(16)
    got = fp4_to_fp8_bytes(codes, offs, dialect)
    vals = torch.tensor(E2M1_VALUES)[codes] * torch.exp2(offs.float())
    want = fp8_encode(vals, dialect)
    assert torch.equal(got, want), [(int(c), int(k), int(a), int(b)) for c, k, a, b in
                                    zip(codes, offs, got, want) if a != b][:8]


def every_code_every_offset_weight(dialect):
    """Packed codes [rows, 256] and offsets covering all 16 codes at every offset of the window in every
    sub-block position, with random codes elsewhere."""
    kmin, kmax = fp8_window(dialect)
    g = torch.Generator().manual_seed(2)
    ks = list(range(kmin, kmax + 1))
    rows = 4 * len(ks)
    codes = torch.randint(0, 16, (rows, 512), generator=g, dtype=torch.uint8)
    codes[:, :32] = torch.arange(16, dtype=torch.uint8).repeat(2)
    offs = torch.randint(kmin, kmax + 1, (rows, 16), generator=g)
    offs[:, 0] = torch.tensor(ks).repeat(4)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, offs.to(torch.int8), codes


@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
def test_weight_bytes_in_kernel_layout(dialect):
    """The kernels' weight tile (nibbles decoded and joined back into column order) equals the elementwise
    mapping at every code, offset and column."""
    packed, offs, codes = every_code_every_offset_weight(dialect)
    got = w4a8_weight_to_fp8(packed, offs, dialect, use_asm=False)
    want = fp4_to_fp8_bytes(codes, offs.to(torch.int32).repeat_interleave(32, dim=1), dialect)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
def test_gpu_ptx_conversion_bit_exact(dialect):
    """The PTX conversion (table prmt, sign by prmt sign-replicate) gives the same bytes as the Triton
    arithmetic, every code at every offset (but -0, which it writes as +0: the same operand for the MMA), and
    the bytes the numerics reference builds from the scales."""
    packed, offs, codes = every_code_every_offset_weight(dialect)
    asm = w4a8_weight_to_fp8(packed.cuda(), offs.cuda(), dialect, use_asm=True).cpu()
    ref = w4a8_weight_to_fp8(packed.cuda(), offs.cuda(), dialect, use_asm=False).cpu()
    ref = torch.where(ref == 0x80, 0, ref)  # OCP -0
    assert torch.equal(asm, ref), (asm != ref).nonzero()[:8].tolist()
    assert int((codes == 8).sum()) > 0 and not bool((asm == 0x80).any())
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 0.05
    wp, wsc = quantize_fp4_blocks(w)
    koff, _, fits = fp4_block_offsets(wsc, dialect, packed=wp)
    assert bool(fits.all())
    want = fp4_blocks_to_fp8(wp, wsc, dialect)[0]
    assert torch.equal(w4a8_weight_to_fp8(wp.cuda(), koff.cuda(), dialect, use_asm=True).cpu(),
                       torch.where(want == 0x80, 0, want))


def _operands(M, N, K, dialect, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 1, K)
    w = torch.randn(N, K, generator=g) * 0.05
    xq, xs = quantize_fp8_blocks(x, (128,), dialect)
    wp, wsc = quantize_fp4_blocks(w)
    koff, base, fits = fp4_block_offsets(wsc, dialect)
    assert bool(fits.all())
    want = dequantize_fp8_blocks(xq, xs, (128,), dialect).double() @ dequantize_fp4_blocks(wp, wsc).double().t()
    return (xq, xs, wp, koff, base), want


@pytest.mark.parametrize("dialect", DIALECTS, ids=["ocp", "fnuz"])
@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (33, 100, 384), (5, 3, 256)])
def test_gemm_matches_official_product(M, N, K, dialect):
    """Products are exact (FP8 x FP8 values), so the fp32 result differs from the float64 reference by summation
    order only. Ragged M and N (masked rows / columns)."""
    ops, want = _operands(M, N, K, dialect, seed=M + N + K)
    got = w4a8_linear(*ops, dialect=dialect, block_m=16, block_n=16)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_gemm_block_scales_matter():
    """A weight row whose blocks sit at very different scales (offsets and block scales both used)."""
    g = torch.Generator().manual_seed(9)
    M, N, K = 4, 16, 512
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    w[:, 128:256] *= 2.0 ** 9  # block 1 far above block 0
    w[:, 256 + 32:256 + 64] *= 2.0 ** -10  # one sub-block ~10 binades below its neighbours: offsets -4 / -5
    xq, xs = quantize_fp8_blocks(x, (128,), "ocp")
    wp, wsc = quantize_fp4_blocks(w)
    koff, base, fits = fp4_block_offsets(wsc, "ocp")
    assert bool(fits.all()) and int(koff.min()) <= fp8_window("ocp")[0] + 1  # at the edge of the window
    want = dequantize_fp8_blocks(xq, xs, (128,), "ocp").double() @ dequantize_fp4_blocks(wp, wsc).double().t()
    got = w4a8_linear(xq, xs, wp, koff, base, block_m=16, block_n=16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_bad_shapes_name_the_problem():
    ops, _ = _operands(2, 16, 256, "ocp", seed=1)
    xq, xs, wp, koff, base = ops
    with pytest.raises(ValueError, match="K % 128"):
        w4a8_linear(xq[:, :200], xs, wp, koff, base)
    with pytest.raises(ValueError, match="offsets"):
        w4a8_linear(xq, xs, wp, koff[:, :3], base)
    with pytest.raises(ValueError, match="x_scale"):
        w4a8_linear(xq, xs[:, :1], wp, koff, base)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 256, 1024), (64, 512, 4096), (200, 96, 640)])
def test_gpu_native_fp8_dot(M, N, K):
    """Compiled, with FP8 operands on the tensor cores where the GPU has them (OCP on NVIDIA sm_89+), against
    the float64 official-numerics product: the FP8 MMA's own accumulation within a 128-block is the only
    difference, so the tolerance is looser than the interpreter's."""
    ops, want = _operands(M, N, K, "ocp", seed=3)
    got = w4a8_linear(*[t.cuda() for t in ops], out_dtype=torch.float32).cpu()
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_prepare_counts_and_names_out_of_window_blocks(caplog):
    """Load-time preparation: experts with a block outside the window are flagged (the others keep exact
    W4A8 operands), and the log line names the tensor, the count and the experts."""
    from dsv4.kernels.triton.w4a8 import prepare_w4a8

    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 8, 256, generator=g)
    w[3, 2, 0:32] *= 2.0 ** 24  # expert 3: one 32-block 24 binades above the rest of its 128-block
    packed, scale = quantize_fp4_blocks(w)
    with caplog.at_level("WARNING"):
        prep = prepare_w4a8(packed, scale, name="layers.1.ffn.experts.w13")
    assert prep.expert_fits.tolist() == [True, True, True, False, True]
    assert prep.bad_blocks == 1
    msg = caplog.text
    assert "layers.1.ffn.experts.w13" in msg and "1 of 80" in msg and "[3]" in msg and "W4A16" in msg
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_w4a8(*quantize_fp4_blocks(torch.randn(2, 4, 128, generator=g)), name="fine")
    assert "W4A8" not in caplog.text
