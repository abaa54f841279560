"""The GEMM providers in the interpreter (dsv4/kernels/triton/gemm.py: `linear`, `grouped_linear`) and the
CPU-checkable parts of the vendor provider (dsv4/kernels/vendor/scaled_mm.py): FP8 GEMM exact against
dequantise-then-matmul in fp32 (plain and official numerics, both dialects), one token to several M
tiles, K and N not multiples of the 128 x 128 block, fnuz == OCP bit for bit, the factor-of-two trap (fnuz
bytes read as OCP), dense delegation, FP4 weights, inputs that are views into poisoned storage (NaN
activations, NaN / huge weight bytes and scales past the logical bounds), forced tile shapes and split-K,
grouped wo_a for 2..8 groups, and the scaled_mm operand layouts (emulated on the CPU) and refusal off
CUDA. The generic op tests in test_small_ops.py also run these providers."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.triton import common  # noqa: E402
from dsv4.kernels.triton import gemm as kg  # noqa: E402
from dsv4.kernels.vendor import scaled_mm as ksm  # noqa: E402
from dsv4.numerics.fp8 import (Fp8Dialect, dequantize_fp8_blocks, e8m0_to_float, fp8_decode,  # noqa: E402
                               ocp_to_fnuz, quantize_fp8_blocks)
from dsv4.numerics.fp4 import dequantize_fp4_blocks, quantize_fp4_blocks  # noqa: E402
from dsv4.ops.linear import fp8_act_dequant, grouped_linear_reference, linear_reference  # noqa: E402
from dsv4.ops.quant import fp8_act_quant_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

OCP, FNUZ = Fp8Dialect.OCP, Fp8Dialect.FNUZ


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fp8_weight(N: int, K: int, seed: int, dialect=OCP):
    """FP8 block weight with a different power-of-two range per 128 x 128 block (so a misplaced block
    scale shows), in `dialect` (fnuz: converted exactly from the OCP bytes)."""
    g = gen(seed)
    nb, kb = -(-N // 128), -(-K // 128)
    mag = torch.exp2(torch.randint(-4, 3, (nb, kb), generator=g).float())
    w = 0.1 * torch.randn(N, K, generator=g) * mag.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    q, s = quantize_fp8_blocks(w, (128, 128), OCP)
    q = torch.where(q == 0x80, torch.zeros_like(q), q)  # -0 -> +0: same value, not the fnuz NaN byte
    if dialect is FNUZ:
        q, s = ocp_to_fnuz(q, s)
        return q.view(torch.float8_e4m3fnuz), s
    return q.view(torch.float8_e4m3fn), s


def acts(M: int, K: int, seed: int) -> torch.Tensor:
    """Activations whose (row, 128) blocks span different power-of-two ranges, one all-zero block."""
    g = gen(seed)
    x = torch.randn(M, K, generator=g)
    x = x * torch.exp2(torch.randint(-6, 6, (M, -(-K // 128)), generator=g).float()).repeat_interleave(128, 1)[:, :K]
    if M > 2 and K > 128:
        x[2, :128] = 0.0
    return x


def wdeq(w, s) -> torch.Tensor:
    return dequantize_fp8_blocks(w, s, (128, 128), out_dtype=torch.float64)


def exact_fp32(x, w, s, act_quant, dialect=OCP) -> torch.Tensor:
    """The explicit fp32 oracle: the exactly dequantised operands multiplied in float32."""
    a = fp8_act_dequant(x, dialect) if act_quant else x.float()
    return a.float() @ wdeq(w, s).float().t()


def close_rel(got, want, rtol=1e-5):
    got, want = got.double(), want.double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ============================================================================= FP8 linear


N_R, K_R = 200, 328  # ragged: 72 rows / channels in the last 128-block of each


@pytest.mark.parametrize("dialect", [OCP, FNUZ], ids=["ocp", "fnuz"])
@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
@pytest.mark.parametrize("M", [1, 3, 17, 300])
def test_fp8_gemm_exact_against_dequantise_then_matmul_fp32(M, act_quant, dialect):
    w, s = fp8_weight(N_R, K_R, seed=M, dialect=dialect)
    x = acts(M, K_R, seed=100 + M)
    y = kg.linear_triton(x, w, s, act_quant, dialect)
    assert y.shape == (M, N_R) and y.dtype == torch.float32
    want = exact_fp32(x, w, s, act_quant, dialect)
    close_rel(y, want, 1e-5)
    close_rel(y, linear_reference(x, w, s, act_quant, dialect), 1e-5)
    if act_quant:  # the activations really were rounded to FP8
        assert (y.double() - x.double() @ wdeq(w, s).t()).abs().max() > 1e-4 * want.abs().max()


@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
@pytest.mark.parametrize("M", [1, 17, 70])
def test_fnuz_equals_ocp_bit_for_bit(M, act_quant):
    """The weight converted to fnuz (bytes kept, scales x2) and fnuz activations give the OCP bits."""
    w, s = fp8_weight(N_R, K_R, seed=5)
    wf, sf = ocp_to_fnuz(w, s)
    x = acts(M, K_R, seed=6)
    ref = kg.linear_triton(x, w, s, act_quant, OCP)
    assert torch.equal(kg.linear_triton(x, wf.view(torch.float8_e4m3fnuz), sf, act_quant, FNUZ), ref)
    assert torch.equal(kg.linear_triton(x, w, s, act_quant, FNUZ), ref)  # act dialect alone: same values


@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
def test_factor_of_two_trap(act_quant):
    """fnuz bytes read as OCP (a dtype lost on the way) double every product; OCP bytes read as fnuz
    halve them: the comparison with the right answer must fail, by exactly 2x."""
    w, s = fp8_weight(N_R, K_R, seed=7)
    wf, sf = ocp_to_fnuz(w, s)
    x = acts(17, K_R, seed=8)
    right = kg.linear_triton(x, wf.view(torch.float8_e4m3fnuz), sf, act_quant, FNUZ)
    wrong = kg.linear_triton(x, wf.view(torch.float8_e4m3fn), sf, act_quant, OCP)
    assert torch.equal(wrong, 2 * right)
    assert not torch.allclose(wrong, right, rtol=0.1)
    halved = kg.linear_triton(x, w.view(torch.uint8).view(torch.float8_e4m3fnuz), s, act_quant)
    assert torch.equal(2 * halved, kg.linear_triton(x, w, s, act_quant))


def test_bf16_activations_plain_and_official():
    """bf16 in and out (the model's dtype): rounded once from the fp32 accumulator."""
    w, s = fp8_weight(N_R, K_R, seed=9)
    x = acts(5, K_R, seed=10).to(torch.bfloat16)
    for aq in (False, True):
        y = kg.linear_triton(x, w, s, aq)
        assert y.dtype == torch.bfloat16
        want = exact_fp32(x, w, s, aq)
        torch.testing.assert_close(y.double(), want.double(), rtol=2 ** -8, atol=2 ** -8 * float(want.abs().max()))


def test_leading_dims_and_empty():
    w, s = fp8_weight(N_R, K_R, seed=11)
    x = acts(6, K_R, seed=12)
    y = kg.linear_triton(x.view(2, 3, K_R), w, s, True)
    assert y.shape == (2, 3, N_R)
    assert torch.equal(y.view(6, N_R), kg.linear_triton(x, w, s, True))
    assert kg.linear_triton(x[:0], w, s, True).shape == (0, N_R)


@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
@pytest.mark.parametrize("fmt", ["fp8", "fnuz", "fp4"])
def test_padding_lanes_poisoned(fmt, act_quant):
    """x, weight and scales are views into storage poisoned past their logical bounds (NaN activations;
    weight bytes 0x7F = NaN in OCP / 448 or 240 by bit decoding; fp4 bytes 0x77 = 6, 6; scale bytes 0xFE =
    2^127): a lane read past a bound shows up as NaN / inf / a huge error."""
    M, N, K = 19, 150, 200
    xc = acts(M, K, seed=13)
    xbig = torch.full((M + 3, K + 9), float("nan"))
    xbig[:M, :K] = xc
    x = xbig[:M, :K]
    if fmt == "fp4":
        wc, sc = quantize_fp4_blocks(0.1 * torch.randn(N, K, generator=gen(14)), 32)
        wbig = torch.full((N + 5, K // 2 + 7), 0x77, dtype=torch.uint8)
        wbig[:N, :K // 2] = wc
        w = wbig[:N, :K // 2]
    else:
        wc, sc = fp8_weight(N, K, seed=14, dialect=FNUZ if fmt == "fnuz" else OCP)
        wbig = torch.full((N + 130, K + 7), 0x7F, dtype=torch.uint8)
        wbig[:N, :K] = wc.view(torch.uint8)
        w = wbig[:N, :K].view(wc.dtype)
    sbig = torch.full((sc.shape[0] + 2, sc.shape[1] + 3), 0xFE, dtype=torch.uint8)
    sbig[:sc.shape[0], :sc.shape[1]] = sc
    s = sbig[:sc.shape[0], :sc.shape[1]]
    y = kg.linear_triton(x, w, s, act_quant)
    assert torch.isfinite(y).all()
    close_rel(y, linear_reference(xc, wc, sc, act_quant), 1e-5)
    assert torch.isnan(xbig[M:]).all() and (wbig[N:] == (0x77 if fmt == "fp4" else 0x7F)).all()  # untouched


@pytest.mark.parametrize("bm,bn,split", [(16, 32, 1), (16, 32, 3), (16, 64, 16), (64, 64, 2), (64, 128, 1),
                                         (128, 128, 1)])
@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
def test_forced_tiles_and_split_k(bm, bn, split, act_quant):
    """Every regime's tile shape, with split-K (3 splits of 5 K tiles: 2 + 2 + 1; 16 > the 5 K tiles:
    clamped, no empty split) on shapes with partial tiles everywhere."""
    M, N, K = 40, 200, 520
    w, s = fp8_weight(N, K, seed=15)
    x = acts(M, K, seed=16)
    y = kg.linear_impl(x, w, s, act_quant, block_m=bm, block_n=bn, split_k=split)
    close_rel(y, exact_fp32(x, w, s, act_quant), 1e-5)


@pytest.mark.parametrize("grouped", [False, True], ids=["linear", "grouped"])
def test_last_program_split_k_reduction(monkeypatch, launches, grouped):
    """The last-program split-K reduction (no reduce launch) equals the reduce kernel's result bit for bit, on
    repeated calls (each leaves its tile counters at zero for the next call or graph replay)."""
    M, N, K, G = 3, 200, 640, 2
    w, s = fp8_weight(N * G if grouped else N, K, seed=21)
    x = acts(M * G if grouped else M, K, seed=22)
    if grouped:
        x = x.view(M, G, K)

        def run():
            return kg.grouped_linear_impl(x, w, s, block_m=16, block_n=32, split_k=5)
    else:
        def run():
            return kg.linear_impl(x, w, s, True, block_m=16, block_n=32, split_k=5)
    monkeypatch.setattr(kg, "LAST_REDUCE", False)
    want = run()
    monkeypatch.setattr(kg, "LAST_REDUCE", True)
    launched = launches(kg, "_splitk_reduce_kernel")
    for _ in range(3):
        got = run()
        assert torch.equal(got, want)
    assert not launched, "the reduce kernel still ran"
    cnt = common._COUNTERS[("cpu", None)]
    assert int(cnt.abs().sum()) == 0, "tile counters not reset"


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_producer_quantised_activations(fmt):
    """linear(x_q=(q, s)): the producer's act_quant of x (rows padded past M allowed) is used instead of
    quantising x again: the same result bit for bit; bytes that differ from x's change the result (so they are
    what the GEMM read); x_q in another dialect than the one the GEMM quantises in, or of the wrong shape, is
    ignored."""
    M, N, K = 5, 192, 512
    if fmt == "fp8":
        w, s = fp8_weight(N, K, seed=31)
    else:
        wq = quantize_fp4_blocks(torch.randn(N, K, generator=gen(31)), 32)
        w, s = wq
    x = acts(M, K, seed=32)
    want = kg.linear_impl(x, w, s, True)
    q, sq = fp8_act_quant_reference(x, 128, OCP)
    qp = torch.zeros((8, K), dtype=torch.uint8)
    qp[:M] = torch.where(q == 0x80, torch.zeros_like(q), q)  # the Triton quantiser writes +0 as 0x00
    assert torch.equal(kg.linear_impl(x, w, s, True, OCP, (qp, sq)), want)
    other = qp.clone()
    other[:M, :128] = 0  # zero one block: the result must change
    assert not torch.equal(kg.linear_impl(x, w, s, True, OCP, (other, sq)), want)
    fq, fs = fp8_act_quant_reference(x, 128, Fp8Dialect.FNUZ)
    if fmt == "fp8":  # an OCP weight quantises in OCP: FNUZ bytes are not taken
        assert torch.equal(kg.linear_impl(x, w, s, True, Fp8Dialect.FNUZ, (fq, fs)), want)
    assert torch.equal(kg.linear_impl(x, w, s, True, OCP, (other[:M, :256], sq)), want)  # wrong shape: ignored


def test_scaled_mm_takes_producer_bytes():
    """The scaled_mm provider's operands from a producer's act_quant (rows padded to 4) equal its own."""
    x = acts(6, 512, seed=33)
    a, sa, M = ksm.prepare_activation(x)
    q = torch.zeros((8, 512), dtype=torch.uint8)
    q[:6] = a.view(torch.uint8)[:6]
    s = kg.fp8_act_quant_triton(x, 128, OCP)[1]
    a2, sa2, M2 = ksm.prepare_activation(x, (q, s))
    assert a2.data_ptr() == q.data_ptr() and M2 == M
    assert torch.equal(a2.view(torch.uint8)[:6], a.view(torch.uint8)[:6]) and torch.equal(sa2, sa)
    a3, _, _ = ksm.prepare_activation(x, (q[:6], s))  # 6 rows: cuBLASLt needs 8, so it quantises itself
    assert a3.data_ptr() != q.data_ptr()


def test_tile_regimes_at_flash_shapes():
    """Decode: one M tile and split-K so ~2 programs per SM; prefill: 128 x 128 tiles, no split."""
    from benchmarks.kernel_cases.gemm import FLASH_LINEARS

    for _, N, K in FLASH_LINEARS:
        c1 = kg._pick_tiles(1, N, K, 1, 1.0, 132, False)
        assert c1["block_m"] == 16 and (c1["split_k"] > 1 or N // c1["block_n"] >= 132), (N, K, c1)
        c64 = kg._pick_tiles(64, N, K, 1, 1.0, 132, False)
        assert c64["block_m"] == 64 and (c64["split_k"] == 1 or c64["split_k"] * 64 * 32 <= K)  # partials <= W / 4
        c8k = kg._pick_tiles(8192, N, K, 1, 1.0, 132, False)
        assert (c8k["block_m"], c8k["block_n"], c8k["split_k"]) == (128, 128, 1)


# ============================================================================= dense / FP4 / plumbing


def test_dense_delegation():
    x = acts(7, 300, seed=17)
    w = 0.1 * torch.randn(90, 300, generator=gen(18))
    assert torch.equal(kg.linear_triton(x, w, None, False), torch.nn.functional.linear(x, w))
    close_rel(kg.linear_triton(x, w, None, True), linear_reference(x, w, None, True), 1e-6)
    wb = w.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(kg.linear_triton(xb, wb, None, False), torch.nn.functional.linear(xb, wb))


@pytest.mark.parametrize("act_quant", [False, True], ids=["plain", "official"])
@pytest.mark.parametrize("M,K", [(1, 200), (17, 96), (130, 264)])
def test_fp4_weights(M, K, act_quant):
    """MXFP4 weights (per-32 scales, ragged last block at K = 200) dequantised in registers."""
    N = 72
    w, s = quantize_fp4_blocks(0.1 * torch.randn(N, K, generator=gen(19)), 32)
    x = acts(M, K, seed=20)
    y = kg.linear_triton(x, w, s, act_quant)
    wd = dequantize_fp4_blocks(w, s, 32, out_dtype=torch.float32)
    a = fp8_act_dequant(x) if act_quant else x
    close_rel(y, a @ wd.t(), 1e-5)


def test_bad_scale_shape_rejected():
    w, s = fp8_weight(N_R, K_R, seed=21)
    with pytest.raises(ValueError, match="scale"):
        kg.linear_triton(acts(2, K_R, 1), w, s[:, :-1], True)


def test_providers_registered_and_cpu_decode_path():
    from dsv4.ops.registry import all_ops

    ops = all_ops()
    assert "triton" in ops["linear"].providers and "triton" in ops["grouped_linear"].providers
    assert ops["linear"].providers["scaled_mm"].priority > ops["linear"].providers["triton"].priority
    assert kg._facts(torch.device("cpu"))[0] == 0  # never the hardware float8 types on the CPU


# ============================================================================= grouped_linear


@pytest.mark.parametrize("fmt", ["fp8", "fnuz", "dense", "fp4"])
@pytest.mark.parametrize("G,R,Kg", [(2, 48, 136), (3, 64, 96), (8, 40, 130)])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_grouped_linear(M, G, R, Kg, fmt):
    """z[:, g] = x[:, g] W_g^T, one launch over all groups; R not a multiple of 128 (weight scale blocks
    straddle groups), Kg ragged; x a view into NaN-padded storage."""
    if fmt == "fp4":
        w, s = quantize_fp4_blocks(0.1 * torch.randn(G * R, Kg, generator=gen(22)), 32)
        wd = dequantize_fp4_blocks(w, s, 32, out_dtype=torch.float64)
    elif fmt == "dense":
        w, s = 0.1 * torch.randn(G * R, Kg, generator=gen(22)), None
        wd = w.double()
    else:
        w, s = fp8_weight(G * R, Kg, seed=22, dialect=FNUZ if fmt == "fnuz" else OCP)
        wd = wdeq(w, s)
    big = torch.full((M, G + 1, Kg + 5), float("nan"))
    big[:, :G, :Kg] = acts(M * G, Kg, seed=23).view(M, G, Kg)
    x = big[:, :G, :Kg]
    z = kg.grouped_linear_triton(x, w, s)
    assert z.shape == (M, G, R) and z.dtype == x.dtype
    want = torch.stack([x[:, g].double() @ wd[g * R:(g + 1) * R].t() for g in range(G)], dim=1)
    close_rel(z, want, 1e-5)
    close_rel(z, grouped_linear_reference(x.contiguous(), w, s), 1e-5)


def test_grouped_linear_fnuz_equals_ocp_and_split():
    G, R, Kg, M = 4, 96, 384, 3
    w, s = fp8_weight(G * R, Kg, seed=24)
    wf, sf = ocp_to_fnuz(w, s)
    x = acts(M * G, Kg, seed=25).view(M, G, Kg)
    ref = kg.grouped_linear_triton(x, w, s)
    assert torch.equal(kg.grouped_linear_triton(x, wf.view(torch.float8_e4m3fnuz), sf), ref)
    for bm, bn, split in ((16, 32, 3), (64, 64, 1)):
        close_rel(kg.grouped_linear_impl(x, w, s, block_m=bm, block_n=bn, split_k=split), ref, 1e-5)


# ============================================================================= vendor: scaled_mm


def test_scaled_mm_refuses_off_cuda():
    from dsv4.platforms import Platform
    from dsv4.platforms.cpu import cpu_platform

    assert "CUDA" in ksm.scaled_mm_supported(cpu_platform())
    ampere = Platform(name="cuda", device="cuda:0", arch="sm80", fp8_dialect=OCP, has_fp8_mma=False)
    assert "FP8 tensor cores" in ksm.scaled_mm_supported(ampere)  # refused before any device probe
    mi300 = Platform(name="rocm", device="cuda:0", arch="gfx942", fp8_dialect=FNUZ, has_fp8_mma=True)
    assert ksm.scaled_mm_supported(mi300) is not None


def emulate_blockwise_scaled_mm(a, b, sa, sb) -> torch.Tensor:
    """What cuBLASLt's 1x128 x 128x128 block scaling computes: out[m, n] = sum over K blocks kb of
    sa[m, kb] * sb[kb, n // 128] * (a[m, block kb] . b[block kb, n]), in float64 here."""
    Mp, K = a.shape
    N = b.shape[1]
    af = fp8_decode(a.view(torch.uint8), OCP).double()
    bf = fp8_decode(b.t().contiguous().view(torch.uint8), OCP).double().t()
    out = torch.zeros(Mp, N, dtype=torch.float64)
    for kb in range(-(-K // 128)):
        part = af[:, kb * 128:(kb + 1) * 128] @ bf[kb * 128:(kb + 1) * 128]
        out += part * sa[:, kb:kb + 1].double() * sb[kb].double().repeat_interleave(128)[:N][None, :]
    return out


@pytest.mark.parametrize("M", [1, 6, 8])
def test_scaled_mm_operand_layouts(M):
    """The exact torch._scaled_mm arguments, built on CPU tensors (Triton kernels in the interpreter):
    A padded to a multiple of 4 rows, scale_a (MP, K/128) fp32 with strides (1, MP) and 1.0 in padded
    rows, scale_b the weight scales as fp32 transposed (K/128, N/128) strides (1, K/128); the emulated
    block-scaled GEMM over them equals the reference."""
    N, K = 256, 512
    w, s = fp8_weight(N, K, seed=26)
    x = acts(M, K, seed=27).to(torch.bfloat16)
    a, b, sa, sb, m = ksm.prepare_operands(x, w, s)
    mp = -(-M // 4) * 4
    assert m == M and a.dtype == torch.float8_e4m3fn and a.shape == (mp, K)
    assert b.shape == (K, N) and b.stride() == (1, K) and b.dtype == torch.float8_e4m3fn
    assert sa.dtype == torch.float32 and sa.shape == (mp, K // 128) and sa.stride() == (1, mp)
    assert sb.dtype == torch.float32 and sb.shape == (K // 128, N // 128) and sb.stride() == (1, K // 128)
    q, qs = fp8_act_quant_reference(x, 128, OCP)
    ab = a.view(torch.uint8)[:M]
    assert ((ab == q) | ((fp8_decode(ab, OCP) == 0) & (fp8_decode(q, OCP) == 0))).all()  # +-0 by value
    assert torch.equal(sa[:M], e8m0_to_float(qs)) and (sa[M:] == 1.0).all()
    assert torch.equal(sb, e8m0_to_float(s).t())
    a_valid = a.view(torch.uint8).clone()
    a_valid[M:] = 0  # padded rows are never read back; give the emulation defined bytes
    got = emulate_blockwise_scaled_mm(a_valid.view(torch.float8_e4m3fn), b, sa, sb)[:M]
    close_rel(got, exact_fp32(x, w, s, True), 1e-6)


def test_scaled_mm_weight_scale_cached():
    w, s = fp8_weight(256, 512, seed=28)
    s1 = ksm.weight_scale_b(s)
    assert ksm.weight_scale_b(s).data_ptr() == s1.data_ptr()
    s.add_(0)  # an in-place write (a reload) bumps the version: converted again
    assert torch.equal(ksm.weight_scale_b(s), s1)


def test_scaled_mm_delegates_what_it_does_not_take():
    w, s = fp8_weight(256, 512, seed=29)
    x = acts(4, 512, seed=30)
    for aq in (False, True):  # CPU tensors: always the Triton provider
        assert torch.equal(ksm.linear_scaled_mm(x, w, s, aq), kg.linear_triton(x, w, s, aq))
    assert "plain" in ksm.delegate_reason(x, w, s, False)
    wf, sf = ocp_to_fnuz(w, s)
    assert "float8_e4m3fnuz" in ksm.delegate_reason(x, wf.view(torch.float8_e4m3fnuz), sf, True)
    assert "CUDA" in ksm.delegate_reason(x, w, s, True)


# ============================================================================= GPU check code


def flash_config():
    import json
    from importlib import resources

    from dsv4.config import ModelConfig

    return ModelConfig.from_dict(json.loads(resources.files("dsv4.configs").joinpath("deepseek-v4-flash.json")
                                            .read_text()))


def record_calls(fn, log: list):
    """A stand-in for `fn` that appends its bound arguments (defaults applied) to `log`."""
    sig = inspect.signature(fn)

    def rec(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        log.append(dict(bound.arguments))

    return rec


def test_gpu_check_cases_cover_every_flash_fp8_linear(monkeypatch):
    """The GPU check measures the GEMMs the model runs: the FP8 weight shapes of the DeepSeek-V4-Flash
    checkpoint (its official tensor inventory, MTP included) are exactly the linear cases' shapes plus the
    grouped wo_a; each shape in both numerics and through scaled_mm, from one token (decode) up to at least
    the engine's largest step; the grouped case at the config's o_groups; record names unique. The cases:
    benchmarks/kernel_cases/gemm.py."""
    from benchmarks.kernel_cases import gemm as kcg
    from dsv4.config import EngineConfig
    from dsv4.model.checkpoint_format import official_tensors

    cfg = flash_config()
    fp8 = {}  # weight shape -> the tensor names that have it (per layer names folded)
    for t in official_tensors(cfg):
        if t.role == "fp8_weight":
            fp8.setdefault(t.shape, set()).add(t.name.split(".", 2)[-1])
    (wo_a,) = [shape for shape, names in fp8.items() if "attn.wo_a.weight" in names]
    calls = {"_gpu_linear_case": [], "_gpu_grouped_case": []}
    for fn, log in calls.items():  # each case's arguments, the function's own defaults applied
        monkeypatch.setattr(kcg, fn, record_calls(getattr(kcg, fn), log))
    names = [n for n, _ in kcg.gpu_check_cases()]
    assert len(names) == len(set(names))
    linear = {}
    for a in calls["_gpu_linear_case"]:
        linear.setdefault((a["N"], a["K"]), set()).add((a["M"], a["act_quant"], a["provider"]))
    grouped = [(a["M"], a["G"], a["R"], a["Kg"]) for a in calls["_gpu_grouped_case"]]
    assert set(linear) == set(fp8) - {wo_a}, (sorted(set(fp8) - {wo_a} - set(linear)), sorted(set(linear) - set(fp8)))
    biggest = EngineConfig().max_num_batched_tokens
    for shape, runs in linear.items():
        for variant in ((False, "triton"), (True, "triton"), (True, "scaled_mm")):
            ms = {m for m, *v in runs if tuple(v) == variant}
            assert 1 in ms and max(ms) >= biggest, (shape, variant, sorted(ms))
    assert {(G * R, Kg) for _, G, R, Kg in grouped} == {wo_a} and {G for _, G, _, _ in grouped} == {cfg.o_groups}
    assert 1 in {m for m, *_ in grouped} and max(m for m, *_ in grouped) >= biggest


def test_gpu_case_smoke():
    """The GPU check code itself (inputs, reference comparison, byte / FLOP counts) at tiny shapes on the
    CPU, without timing."""
    from benchmarks.kernel_cases import gemm as kcg

    for aq in (False, True):
        r = kcg._gpu_linear_case(256, 512, 3, aq, device="cpu", bench=False)()
        assert r["max_rel_err"] < 1e-5 and r["bytes"] > 256 * 512 and r["flops"] == 2 * 3 * 256 * 512, r
    assert "skipped" in kcg._gpu_linear_case(256, 512, 3, True, "scaled_mm", device="cpu", bench=False)()
    r = kcg._gpu_grouped_case(2, G=2, R=64, Kg=256, device="cpu", bench=False)()
    assert r["max_rel_err"] < 1e-5 and r["flops"] == 2 * 2 * 2 * 64 * 256


def test_scaled_mm_hands_decode_sizes_to_triton():
    """At <= TRITON_MAX_M rows the scaled_mm provider delegates to the Triton GEMM (faster there on the GPU,
    docs/perf.md 2026-12-06); above, cuBLASLt takes the call. Host metadata only, so a stand-in for a CUDA
    tensor shows the rule on the CPU."""
    w, s = fp8_weight(256, 512, seed=7)

    class CudaLike:
        is_cuda, dtype = True, torch.bfloat16

        def __init__(self, m):
            self.shape = (m, 512)

        def numel(self):
            return self.shape[0] * 512

    for m in (1, 4, ksm.TRITON_MAX_M):
        assert "faster at decode sizes" in ksm.delegate_reason(CudaLike(m), w, s, True)
    assert ksm.delegate_reason(CudaLike(ksm.TRITON_MAX_M + 1), w, s, True) is None


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_gpu_last_program_reduction_and_prefetch(monkeypatch, M):
    """Compiled, at Flash linear shapes: the last-program split-K reduction (real concurrency among the tile's
    programs) and the decode-regime first-tile prefetch give the bits of the reduce-kernel, no-prefetch path,
    eagerly and in CUDA-graph replays; against the fp32 product of the exactly dequantised operands as well."""
    from benchmarks.kernel_cases.gemm import FLASH_LINEARS

    for name, N, K in FLASH_LINEARS:
        w, s = fp8_weight(N, K, seed=N + K)
        w, s = w.cuda(), s.cuda()
        x = acts(M, K, seed=M).to(torch.bfloat16).cuda()
        monkeypatch.setattr(kg, "LAST_REDUCE", False)
        monkeypatch.setattr(kg, "PREFETCH_W", False)
        want = kg.linear_impl(x, w, s, True)
        monkeypatch.setattr(kg, "LAST_REDUCE", True)
        monkeypatch.setattr(kg, "PREFETCH_W", True)
        for _ in range(3):
            assert torch.equal(kg.linear_impl(x, w, s, True), want), name
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kg.linear_impl(x, w, s, True)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want), name
        ref = exact_fp32(x.float(), w, s, True)
        assert (want.float() - ref).abs().max() <= 0.01 * ref.abs().max() + 1e-3, name
