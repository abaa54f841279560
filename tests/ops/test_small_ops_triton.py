"""The Triton small ops (dsv4/kernels/triton/{norm,rope,hyper_connection,quant}.py) in the interpreter,
against the op references, on the shapes that break kernels: ragged sizes (D not a power of two, blocks
not filling a row), one token, many rows, rows longer than one tile, inputs that are strided views of
NaN-padded storage (a read past the logical bound shows up as NaN), both FP8 dialects byte for byte
with exponent edge cases, and the fnuz-read-as-OCP factor of two. The generic op tests in
test_small_ops.py also run these providers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.config import YarnScaling  # noqa: E402
from dsv4.kernels.triton import hyper_connection as khc  # noqa: E402
from dsv4.kernels.triton import norm as knorm  # noqa: E402
from dsv4.kernels.triton import quant as kquant  # noqa: E402
from dsv4.kernels.triton import rope as krope  # noqa: E402
from dsv4.numerics.fp8 import (Fp8Dialect, dequantize_fp8_blocks, fp8_decode,  # noqa: E402
                               pow2_scale_exponent, quantize_fp8_blocks)
from dsv4.ops.hyper_connection import hc_head_reference, hc_post_reference, hc_pre_reference  # noqa: E402
from dsv4.ops.norm import rms_norm_reference  # noqa: E402
from dsv4.ops.rope import apply_rope_reference, rope_inv_freq  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padded_view(shape, pad: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Random values of `shape` as a view into storage whose last dim is `pad` longer and NaN there."""
    big = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype)
    big[..., :shape[-1]] = (scale * torch.randn(*shape, generator=gen(seed))).to(dtype)
    return big[..., :shape[-1]]


def test_providers_registered():
    from benchmarks.kernel_cases import hyper_connection as kc_hc
    from benchmarks.kernel_cases import norm as kc_norm
    from benchmarks.kernel_cases import quant as kc_quant
    from benchmarks.kernel_cases import rope as kc_rope
    from dsv4.ops.registry import all_ops

    ops = all_ops()
    for name in ("rms_norm", "apply_rope", "hc_pre", "hc_post", "hc_head", "fp8_act_quant"):
        assert "triton" in ops[name].providers, name
    for mod in (kc_norm, kc_rope, kc_hc, kc_quant):  # their GPU check cases (benchmarks/kernel_cases/)
        cases = mod.gpu_check_cases()
        assert cases and all(isinstance(n, str) and callable(f) for n, f in cases)


# ============================================================================= rms_norm


@pytest.mark.parametrize("shape", [(1, 7), (1, 4096), (37, 24), (3, 5, 100), (300, 33), (2, 9000), (2, 16384)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(shape, weighted):
    """Ragged N, one row, many rows (several per program), and rows past one tile (chunked kernel:
    9000 and the 16384-wide flattened mHC stream); the input is a view of NaN-padded storage."""
    x = padded_view(shape, 3, seed=1, scale=3.0)
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=gen(2)) if weighted else None
    y = knorm.rms_norm_triton(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, rms_norm_reference(x.contiguous(), w, 1e-6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("N", [64, 5000])
def test_rms_norm_bf16_rounded_once(N):
    """bf16 in and out, fp32 weight multiplied before the one rounding: equal to the reference's bf16
    almost everywhere (an fp32 ulp can flip a tie), never more than one bf16 ulp away."""
    x = torch.randn(9, N, generator=gen(3)).to(torch.bfloat16)
    w = 1.0 + 0.5 * torch.randn(N, generator=gen(4))
    y = knorm.rms_norm_triton(x, w, 1e-6)
    want = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    assert (y == want).float().mean() > 0.99
    torch.testing.assert_close(y.float(), want.float(), atol=1e-6, rtol=2 ** -7)


# ============================================================================= apply_rope

FREQ8 = (1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))).float()
YARN16 = rope_inv_freq(160000.0, 16, YarnScaling(factor=16.0, original_max_position_embeddings=65536))


@pytest.mark.parametrize("shape,freq", [((1, 3, 24), FREQ8), ((5, 12), FREQ8), ((4, 37, 20), FREQ8),
                                        ((3, 2, 200, 20), FREQ8), ((4, 13), FREQ8), ((3, 8), FREQ8),
                                        ((5, 3, 48), YARN16)])
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope(shape, freq, inverse):
    """Odd D (the rotary part starting at an odd index), r == D, one token, many heads (several head
    blocks per token), NaN-padded strided input; positions up to 1,000,000; copied dims bit-exact."""
    x = padded_view(shape, 5, seed=5)
    pos = torch.tensor([0, 1_000_000, 999_999, 131_071, 7][: shape[0]], dtype=torch.int64)
    y = krope.apply_rope_triton(x, pos, freq, inverse)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    want = apply_rope_reference(x.contiguous(), pos, freq, inverse)
    r = 2 * freq.numel()
    assert torch.equal(y[..., :-r], x[..., :-r])
    torch.testing.assert_close(y, want, atol=2e-6, rtol=1e-5)
    back = krope.apply_rope_triton(y, pos, freq, not inverse)
    torch.testing.assert_close(back, x.contiguous(), atol=1e-5, rtol=1e-5)
    if shape[0] > 1:
        assert not torch.allclose(y[1:], x[1:], atol=1e-3)


def test_apply_rope_bf16_and_int32_positions():
    x = torch.randn(4, 6, 40, generator=gen(6)).to(torch.bfloat16)
    pos = torch.tensor([3, 70_000, 500_000, 1_000_000], dtype=torch.int32)
    y = krope.apply_rope_triton(x, pos, YARN16)
    want = apply_rope_reference(x, pos, YARN16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[..., :-16], x[..., :-16])
    assert (y == want).float().mean() > 0.98  # one rounding of the fp32 rotation
    torch.testing.assert_close(y.float(), want.float(), atol=1e-2, rtol=2 ** -7)


# ============================================================================= mHC


def hc_inputs(seed, T, n, D, dtype=torch.float32, logit_scale=1.0, head=False):
    g = gen(seed)
    X = torch.randn(T, n, D, generator=g).to(dtype)
    rows = n if head else (2 + n) * n
    fn = 0.3 * torch.randn(rows, n * D, generator=g) / (n * D) ** 0.5 * 8
    scale = logit_scale * (0.5 + torch.rand(1 if head else 3, generator=g))
    base = 0.5 * torch.randn(rows, generator=g)
    return X, fn, scale, base


@pytest.mark.parametrize("T,n,D", [(1, 4, 8), (5, 4, 40), (17, 4, 24), (3, 2, 300), (1, 4, 300), (20, 2, 20),
                                   (4, 3, 20)])
@pytest.mark.parametrize("hc_eps,iters", [(1e-6, 20), (0.05, 20), (0.05, 1), (0.2, 3)])
def test_hc_pre(T, n, D, hc_eps, iters):
    """n = 4, 2 and 3 (padded to 4), ragged D and K = nD (K split over programs with a ragged last range:
    D = 300), one token and several token blocks, eps large enough that its placement shows, iters = 1
    (the softmax + one column normalisation only)."""
    X, fn, scale, base = hc_inputs(7, T, n, D, logit_scale=1.5)
    u, post, comb = khc.hc_pre_triton(X, fn, scale, base, 1e-6, hc_eps, iters)
    wu, wpost, wcomb = hc_pre_reference(X, fn, scale, base, 1e-6, hc_eps, iters)
    assert u.shape == (T, D) and u.dtype == X.dtype
    assert post.shape == (T, n) and post.dtype == torch.float32
    assert comb.shape == (T, n, n) and comb.dtype == torch.float32
    torch.testing.assert_close(u, wu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post, wpost, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, wcomb, atol=1e-5, rtol=1e-5)
    if n > 2:  # (a 2 x 2 doubly stochastic matrix is symmetric)
        assert not torch.allclose(comb, comb.transpose(1, 2), atol=1e-3), "premise: comb is not symmetric"


def test_hc_pre_bf16_streams():
    X, fn, scale, base = hc_inputs(8, 6, 4, 72, dtype=torch.bfloat16)
    u, post, comb = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20)
    wu, wpost, wcomb = hc_pre_reference(X, fn, scale, base, 1e-6, 0.05, 20)
    assert u.dtype == torch.bfloat16
    torch.testing.assert_close(post, wpost, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, wcomb, atol=1e-5, rtol=1e-5)
    assert (u == wu).float().mean() > 0.98
    torch.testing.assert_close(u.float(), wu.float(), atol=1e-2, rtol=2 ** -7)


def test_hc_pre_ignores_storage_past_T():
    """X as the first T tokens of a larger NaN-filled buffer: masked token lanes never leak."""
    big = torch.full((40, 4, 24), float("nan"))
    X, fn, scale, base = hc_inputs(9, 3, 4, 24)
    big[:3] = X
    u, post, comb = khc.hc_pre_triton(big[:3], fn, scale, base, 1e-6, 0.05, 20)
    wu, wpost, wcomb = hc_pre_reference(X, fn, scale, base, 1e-6, 0.05, 20)
    torch.testing.assert_close(u, wu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, wcomb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,n,D", [(1, 4, 8), (6, 4, 300), (40, 2, 24)])
@pytest.mark.parametrize("hc_eps", [1e-6, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_head(T, n, D, hc_eps, dtype):
    X, fn, scale, base = hc_inputs(10, T, n, D, dtype=dtype, logit_scale=3.0, head=True)
    got = khc.hc_head_triton(X, fn, scale, base, 1e-6, hc_eps)
    want = hc_head_reference(X, fn, scale, base, 1e-6, hc_eps)
    assert got.shape == (T, D) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert (got == want).float().mean() > 0.98
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("T,n,D", [(1, 4, 8), (6, 4, 300), (3, 4, 4096), (2, 3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", [False, True], ids=["pre", "head"])
def test_hc_norm_fused_equals_finish_then_rms_norm(T, n, D, dtype, head, monkeypatch):
    """The finish kernel with the following RMSNorm fused (one program per token holds the whole row) against the
    finish kernel, then the Triton rms_norm: ragged D (300), one token, n = 3, both dtypes; and the fallback for a
    D wider than MAX_NORM_D (two launches) against the same. post / comb unchanged bit for bit."""
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)  # the fused norm on (off by default)
    X, fn, scale, base = hc_inputs(15, T, n, D, dtype=dtype, logit_scale=1.5, head=head)
    w = 0.5 + torch.rand(D, generator=gen(16))
    if head:
        plain = khc.hc_head_triton(X, fn, scale, base, 1e-6, 0.05)
        got = khc.hc_head_triton(X, fn, scale, base, 1e-6, 0.05, norm=(w, 1e-5))
    else:
        plain, post0, comb0 = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20)
        got, post, comb = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5))
        assert torch.equal(post, post0) and torch.equal(comb, comb0)
    want = knorm.rms_norm_triton(plain, w, 1e-5)
    assert got.dtype == dtype and got.shape == (T, D)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # the same bf16 u; the sum of squares may be reduced in another order: one bf16 ulp at most
        assert (got == want).float().mean() > 0.98
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
    monkeypatch.setattr(khc, "MAX_NORM_D", 4)  # every D here: the unfused fallback
    if head:
        again = khc.hc_head_triton(X, fn, scale, base, 1e-6, 0.05, norm=(w, 1e-5))
    else:
        again = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5))[0]
    assert torch.equal(again, want)


@pytest.mark.parametrize("T,n,D", [(1, 4, 4096), (6, 4, 300), (5, 4, 128), (2, 3, 24)])
@pytest.mark.parametrize("dialect", [Fp8Dialect.OCP, Fp8Dialect.FNUZ], ids=["ocp", "fnuz"])
@pytest.mark.parametrize("max_norm_d,fuse_m", [(8192, 0), (0, 1 << 30), (0, 0)],
                         ids=["in_finish", "in_rms_norm", "after_rms_norm"])
def test_hc_pre_quant_equals_act_quant(T, n, D, dialect, max_norm_d, fuse_m, monkeypatch):
    """hc_pre(norm=, quant=): the fourth output is the act_quant of the normed output, byte for byte what the
    standalone Triton quantiser gives (D = 300: a partial last block; D = 24: too narrow to fuse, the
    standalone quantiser itself); the bytes' rows padded to a multiple of 4; the other outputs unchanged. Made
    by the finish kernel with the norm in it (MAX_NORM_D on), by the rms_norm kernel after it (its
    FUSE_QUANT_MAX_M on), or by the standalone quantiser after that (the defaults)."""
    monkeypatch.setattr(khc, "MAX_NORM_D", max_norm_d)
    monkeypatch.setattr(knorm, "FUSE_QUANT_MAX_M", fuse_m)
    X, fn, scale, base = hc_inputs(17, T, n, D, dtype=torch.bfloat16, logit_scale=1.5)
    w = 0.5 + torch.rand(D, generator=gen(18))
    u0, post0, comb0 = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5))
    u, post, comb, (q, qs) = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5), quant=dialect)
    assert torch.equal(u, u0) and torch.equal(post, post0) and torch.equal(comb, comb0)
    wq, ws = kquant.fp8_act_quant_triton(u, 128, dialect)
    assert q.shape[0] >= T and q.shape[1] == D and torch.equal(q[:T], wq) and torch.equal(qs, ws)
    assert int(wq.count_nonzero()) > q[:T].numel() // 2  # premise: real bytes, not zeros
    with pytest.raises(ValueError, match="needs norm"):
        khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, quant=dialect)


def _hc_all(X, fn, scale, base, head, w, quant):
    """Every output of one hc_pre / hc_head call (norm and act_quant as asked)."""
    norm = (w, 1e-5) if w is not None else None
    if head:
        return [khc.hc_head_triton(X, fn, scale, base, 1e-6, 0.05, norm=norm)]
    out = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=norm, quant=quant)
    return list(out[:3]) + ([out[3][0][:X.shape[0]], out[3][1]] if quant is not None else [])  # (rows past T: padding)


@pytest.mark.parametrize("T,n,D,norm,quant", [(1, 4, 4096, True, True), (2, 4, 300, True, False),
                                              (1, 4, 1500, False, False), (5, 3, 24, True, False),
                                              (2, 2, 200, False, False)])
@pytest.mark.parametrize("head", [False, True], ids=["pre", "head"])
def test_hc_last_program_finish_equals_two_kernels(T, n, D, norm, quant, head, monkeypatch, launches):
    """Up to LAST_FINISH_T tokens the last mixing program runs the finish (one launch): every output (u, post, comb,
    the act_quant bytes) equals the two-kernel path bit for bit, over three calls (the tile counter is reset each
    time: a stale count would skip or double the finish); several tokens in the loop (T = 5 with the limit raised),
    the finish in two channel chunks (D = 1500 without norm), n = 2 / 3; the finish kernel is not launched."""
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)  # the finish with the norm and act_quant (off by default)
    X, fn, scale, base = hc_inputs(21, T, n, D, dtype=torch.bfloat16, logit_scale=1.5, head=head)
    w = 0.5 + torch.rand(D, generator=gen(22)) if norm else None
    q = Fp8Dialect.OCP if quant and not head else None
    monkeypatch.setattr(khc, "LAST_FINISH_T", 0)
    want = _hc_all(X, fn, scale, base, head, w, q)
    monkeypatch.setattr(khc, "LAST_FINISH_T", 8)
    launched = launches(khc, "_hc_finish_kernel")
    for _ in range(3):
        got = _hc_all(X, fn, scale, base, head, w, q)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert not launched, "the finish kernel still ran"
    from dsv4.kernels.triton import common
    assert int(common._COUNTERS[("cpu", None)].abs().sum()) == 0, "tile counters not reset"


@pytest.mark.parametrize("T,n,D,quant,fused", [(1, 4, 1024, True, True), (2, 4, 4096, True, True),
                                                (1, 2, 1536, False, True), (2, 3, 320, False, True),
                                                (1, 4, 64, True, True), (1, 4, 300, True, False),
                                                (3, 4, 1024, True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_after_post_in_one_launch(T, n, D, quant, fused, dtype, monkeypatch, launches):
    """hc_pre(prev=(f, post, comb)): the previous sublayer's hc_post applied by the mixing programs of the one
    launch (each forms its K range of the new streams, which the last program's finish reads back) equals
    hc_post then hc_pre through the separate kernels bit for bit: the new streams, u (normed), post, comb and the
    act_quant bytes; n = 2 / 3 / 4; K splits that cross streams (D 320, 64); D not a multiple of the 64-column
    step (300) and T above LAST_FINISH_T (3): the separate kernels; the strided X of a larger buffer; the
    reference returns the same tuple layout."""
    from dsv4.ops.hyper_connection import hc_pre_reference
    monkeypatch.setattr(khc, "LAST_FINISH_T", 2)  # the one-launch path on (off by default)
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)
    g = gen(31 + T + D)
    big = torch.randn(T + 2, n, D + 8, generator=g).to(dtype)
    X = big[1:T + 1, :, 4:D + 4]  # strided streams
    _, fn, scale, base = hc_inputs(32, T, n, D, dtype=dtype, logit_scale=1.5)
    f = torch.randn(T, D, generator=g).to(dtype)
    p0 = 2 * torch.rand(T, n, generator=g)
    c0 = torch.rand(T, n, n, generator=g)
    w = 0.5 + torch.rand(D, generator=g)
    q = Fp8Dialect.OCP if quant else None

    def run(**kw):
        out = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5), quant=q, **kw)
        return list(out[:4]) + ([out[4][0][:T], out[4][1]] if quant else [])

    Xn = khc.hc_post_triton(f, X, p0, c0)
    sep = khc.hc_pre_triton(Xn, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5), quant=q)
    want = [Xn] + list(sep[:3]) + ([sep[3][0][:T], sep[3][1]] if quant else [])
    launched = launches(khc, "_hc_post_kernel")
    for _ in range(2):
        got = run(prev=(f, p0, c0))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert bool(launched) is not fused
    ref = hc_pre_reference(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5), quant=q, prev=(f, p0, c0))
    assert len(ref) == len(got) - (1 if quant else 0) and ref[0].shape == (T, n, D)
    torch.testing.assert_close(ref[0].float(), Xn.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("T,n,D", [(1, 4, 8), (5, 4, 1500), (9, 2, 40), (3, 4, 4096), (2, 3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_post(T, n, D, dtype):
    """Ragged D over two chunks, n = 2, one token; f and X are views of NaN-padded storage; comb is
    not symmetric (a transposed comb fails)."""
    X = padded_view((T, n, D), 7, seed=11, dtype=dtype)
    f = padded_view((T, D), 3, seed=12, dtype=dtype)
    post = 2 * torch.rand(T, n, generator=gen(13))
    comb = torch.rand(T, n, n, generator=gen(14))
    got = khc.hc_post_triton(f, X, post, comb)
    want = hc_post_reference(f.contiguous(), X.contiguous(), post, comb)
    assert got.shape == (T, n, D) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        wrong = hc_post_reference(f.contiguous(), X.contiguous(), post, comb.transpose(1, 2))
        assert not torch.allclose(got, wrong, atol=1e-3)
    else:
        assert (got == want).float().mean() > 0.98
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -7)


# ============================================================================= fp8_act_quant


def same_bytes(q, wq, dialect):
    """Byte equality, except that both zeros count as equal (the kernel writes 0x00 for -0)."""
    zero = (fp8_decode(q, dialect) == 0) & (fp8_decode(wq, dialect) == 0)
    return bool(((q == wq) | zero).all())


def edge_rows(K: int, block: int) -> torch.Tensor:
    """Rows whose blocks hit the exponent boundaries and the special cases."""
    rows = []
    nb = -(-K // block)
    base = torch.randn(K, generator=gen(20))

    def with_amax(a: float, neg=False):
        r = base.clone()
        for b in range(nb):
            seg = r[b * block:(b + 1) * block]
            seg.mul_(0.9 * a / seg.abs().max())
            seg[0] = -a if neg else a
        return r

    for k in (-30, -8, 0, 1, 20):
        a = 448.0 * 2.0 ** k  # exactly on a power-of-two boundary: s = 2^k, the max maps to 448
        rows += [with_amax(a), with_amax(a, neg=True)]
        up = float(torch.nextafter(torch.tensor(a), torch.tensor(float("inf"))))
        dn = float(torch.nextafter(torch.tensor(a), torch.tensor(0.0)))
        rows += [with_amax(up), with_amax(dn)]
    rows.append(with_amax(2.0 ** -5))  # amax an exact power of two
    rows.append(with_amax(3e-5))  # below the 1e-4 floor: s from the floor
    rows.append(torch.zeros(K))  # all zero
    mixed = base.clone()
    mixed[:block] *= 1e-6  # a tiny block next to normal ones
    if K > block:
        mixed[block:2 * block] = 0.0
    rows.append(mixed)
    rows.append(base * 1e30)  # huge values: large exponents
    return torch.stack(rows)


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
@pytest.mark.parametrize("M,K,block", [(1, 128, 128), (33, 200, 128), (5, 4096, 128), (7, 77, 128),
                                       (6, 300, 64), (4, 96, 32), (3, 100, 48)])
def test_act_quant_random(dialect, M, K, block):
    """Random rows with a different magnitude per row, ragged K, the x view NaN-padded past K (a read
    past the last partial block would poison its amax)."""
    x = padded_view((M, K), 9, seed=21)
    x.mul_(torch.exp2(torch.randint(-20, 20, (M, 1), generator=gen(22)).float()))
    q, s = kquant.fp8_act_quant_triton(x, block, dialect)
    wq, ws = quantize_fp8_blocks(x.contiguous(), (block,), dialect)
    assert q.dtype == torch.uint8 and q.shape == (M, K) and s.dtype == torch.uint8 and s.shape == ws.shape
    assert torch.equal(s, ws)
    assert same_bytes(q, wq, dialect)


@pytest.mark.parametrize("dialect", list(Fp8Dialect))
@pytest.mark.parametrize("K", [256, 200])
def test_act_quant_edges(dialect, K):
    """Exact powers of two and their float32 neighbours as block amax, tiny (< 1e-4), zero and huge
    blocks: scale bytes from the exact exponent (numerics.pow2_scale_exponent), q bytes equal."""
    x = edge_rows(K, 128)
    q, s = kquant.fp8_act_quant_triton(x, 128, dialect)
    wq, ws = quantize_fp8_blocks(x, (128,), dialect)
    assert torch.equal(s, ws)
    assert same_bytes(q, wq, dialect)
    amax = torch.stack([x[:, i:i + 128].abs().amax(1) for i in range(0, K, 128)], 1).clamp(min=1e-4)
    e = pow2_scale_exponent(amax, 448.0) + dialect.scale_exp_offset
    assert torch.equal(s.int(), e + 127)
    # the boundary rows really are on the boundaries: max |q| decodes to the clamp (448 / 224)
    for r in (4, 5, 8, 9):  # amax 448 * 2^-8 and 448 (either sign)
        assert float(fp8_decode(q[r], dialect).abs().max()) == dialect.quant_max


def test_act_quant_bf16_input():
    x = (3 * torch.randn(5, 384, generator=gen(23))).to(torch.bfloat16)
    for d in Fp8Dialect:
        q, s = kquant.fp8_act_quant_triton(x, 128, d)
        wq, ws = quantize_fp8_blocks(x.float(), (128,), d)
        assert torch.equal(s, ws) and same_bytes(q, wq, d)


def test_act_quant_dialects_and_factor_two():
    """fnuz and OCP quantise to the same values (fnuz scale byte = OCP + 1); fnuz bytes read as OCP are
    exactly 2x (so a dialect mix-up fails loudly), OCP bytes read as fnuz 0.5x."""
    x = torch.randn(6, 200, generator=gen(24))
    qo, so = kquant.fp8_act_quant_triton(x, 128, "ocp")
    qf, sf = kquant.fp8_act_quant_triton(x, 128, Fp8Dialect.FNUZ)
    assert torch.equal(sf.int(), so.int() + 1)
    vo = dequantize_fp8_blocks(qo, so, (128,), Fp8Dialect.OCP)
    vf = dequantize_fp8_blocks(qf, sf, (128,), Fp8Dialect.FNUZ)
    assert torch.equal(vo, vf)
    torch.testing.assert_close(vo, x, atol=0, rtol=2 ** -4)  # e4m3 rounding only
    wrong = dequantize_fp8_blocks(qf, sf, (128,), Fp8Dialect.OCP)  # fnuz bytes decoded as OCP
    assert torch.equal(wrong, 2 * vo)
    assert not torch.allclose(wrong, x, atol=1e-2, rtol=0.1)
    assert torch.equal(dequantize_fp8_blocks(qo, so, (128,), Fp8Dialect.FNUZ), vo / 2)


# ============================================================================= norm_rope (q and kv rows, one kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["q", "kv", "kv_fnuz", "ragged", "one_token"])
def test_norm_rope_fused_equals_the_three_kernels(dtype, case):
    """norm_rope in one kernel equals rms_norm -> apply_rope -> fp8_roundtrip(width) through the Triton kernels bit
    for bit, and the reference within its roundings: q-like rows (6 heads of 128, no weight), kv-like rows (a
    weight, 64 RoPE channels, the first 192 through FP8, both dialects), a row of 96 (not a power of two: masked
    lanes), one token; positions up to 1e6 (the angle's range reduction)."""
    from dsv4.numerics.fp8 import Fp8Dialect
    from dsv4.ops.rope import norm_rope_reference
    T, H, D, half, width, weighted, dialect = {
        "q": (5, 6, 128, 32, 0, False, Fp8Dialect.OCP), "kv": (7, 1, 256, 32, 192, True, Fp8Dialect.OCP),
        "kv_fnuz": (3, 1, 256, 32, 192, True, Fp8Dialect.FNUZ), "ragged": (4, 3, 96, 8, 64, True, Fp8Dialect.OCP),
        "one_token": (1, 1, 128, 16, 64, True, Fp8Dialect.OCP)}[case]
    g = gen(hash(case) % 1000)
    x = (2.0 * torch.randn(T, H, D, generator=g)).to(dtype)
    if H == 1:
        x = x[:, 0]
    w = (1 + 0.3 * torch.randn(D, generator=g)) if weighted else None
    pos = torch.tensor([0, 7, 4096, 999_999, 123, 5, 77][:T])
    inv = rope_inv_freq(10000.0, 2 * half)
    got = krope.norm_rope_triton(x, w, 1e-6, pos, inv, width, dialect)
    three = krope.apply_rope_triton(knorm.rms_norm_triton(x, w, 1e-6), pos, inv)
    if width:
        three = kquant.fp8_roundtrip_triton(three, 64, dialect, width)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, three)
    want = norm_rope_reference(x, w, 1e-6, pos, inv, width, dialect)
    close = torch.isclose(got.float(), want.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert float(close.float().mean()) > 0.99  # the norm's and the angle's fp32 roundings differ from torch's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,half", [((1, 64, 128), 32), ((3, 5, 128), 32), ((4, 64), 8), ((2, 3, 1024), 16)])
def test_rope_hadamard_fp4_bit_equal(dtype, shape, half):
    """rope_hadamard_fp4(x, positions, inv_freq) in one kernel: bit for bit apply_rope (the Triton kernel's angles:
    the same interpreter cos / sin) then the fused Hadamard + FP4, for the indexer's
    [T, 64, 128] and other row widths, several rows per token in a program and tokens straddling programs
    (5 rows per token), positions up to 1e6; a strided view through the unfused path; the reference composes
    its own apply_rope (torch's cos / sin: within the FP4 grid's rounding)."""
    from dsv4.ops.quant import fp4_roundtrip_reference
    from dsv4.ops.rope import rope_hadamard_fp4_reference

    fp4_rt = kquant.fp4_roundtrip_triton
    g = torch.Generator().manual_seed(sum(shape) + half)
    x = (3.0 * torch.randn(*shape, generator=g)).to(dtype)
    pos = torch.tensor([999_999, 0, 77, 4096][:shape[0]])
    inv = rope_inv_freq(10000.0, 2 * half)
    got = krope.rope_hadamard_fp4_triton(x, pos, inv)
    want = fp4_rt(krope.apply_rope_triton(x, pos, inv), 32, hadamard=True)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, want)
    assert not torch.equal(got, fp4_rt(x, 32, hadamard=True))  # premise: the rotation matters
    ref = rope_hadamard_fp4_reference(x, pos, inv)
    assert torch.equal(ref, fp4_roundtrip_reference(apply_rope_reference(x, pos, inv), 32, hadamard=True))
    assert float((ref == got).float().mean()) > 0.9
    if x.dim() == 3 and x.shape[1] > 1:  # a strided view (every other head): the same values as its copy
        v = torch.cat([x, x], dim=1)[:, ::2]
        assert torch.equal(krope.rope_hadamard_fp4_triton(v, pos, inv),
                           krope.rope_hadamard_fp4_triton(v.contiguous(), pos, inv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,H,DQ,DK,half,width,dialect", [(3, 6, 128, 256, 32, 192, Fp8Dialect.OCP),
                                                           (1, 64, 64, 128, 16, 64, Fp8Dialect.FNUZ),
                                                           (2, 5, 96, 96, 8, 0, Fp8Dialect.OCP),
                                                           (2, 3, 128, 129, 8, 0, Fp8Dialect.OCP)])
def test_norm_rope_qkv_one_launch(dtype, T, H, DQ, DK, half, width, dialect):
    """norm_rope_qkv: q rows (no weight) and the kv row (weight, FP8 width, both dialects) in one launch equal the
    two norm_rope kernels bit for bit (head blocks of q plus the kv column of programs; 64 heads; ragged widths;
    no FP8 width; an odd kv row: the two kernels' own fallback); the reference is the two references."""
    from dsv4.ops.rope import norm_rope_qkv_reference, norm_rope_reference

    g = gen(T * H + DK)
    q = (2.0 * torch.randn(T, H, DQ, generator=g)).to(dtype)
    kv = (2.0 * torch.randn(T, DK, generator=g)).to(dtype)
    w = 1 + 0.3 * torch.randn(DK, generator=g)
    pos = torch.tensor([999_999, 7, 4096][:T])
    inv = rope_inv_freq(10000.0, 2 * half)
    width = width if DK % 64 == 0 or not width else 0
    gq, gkv = krope.norm_rope_qkv_triton(q, kv, w, 1e-6, 1e-5, pos, inv, width, dialect)
    assert torch.equal(gq, krope.norm_rope_triton(q, None, 1e-6, pos, inv))
    assert torch.equal(gkv, krope.norm_rope_triton(kv, w, 1e-5, pos, inv, width, dialect))
    rq, rkv = norm_rope_qkv_reference(q, kv, w, 1e-6, 1e-5, pos, inv, width, dialect)
    assert torch.equal(rq, norm_rope_reference(q, None, 1e-6, pos, inv))
    assert torch.equal(rkv, norm_rope_reference(kv, w, 1e-5, pos, inv, width, dialect))


def test_norm_rope_fallback_and_empty():
    """An odd row (the even / odd lane split cannot pair it from the row start) takes the three kernels; no
    tokens gives an empty result; a width that splits a block is refused."""
    g = gen(3)
    inv = rope_inv_freq(10000.0, 8)
    x = torch.randn(3, 2, 33, generator=g)
    pos = torch.tensor([1, 2, 3])
    want = krope.apply_rope_triton(knorm.rms_norm_triton(x, None, 1e-6), pos, inv)
    assert torch.equal(krope.norm_rope_triton(x, None, 1e-6, pos, inv), want)
    assert krope.norm_rope_triton(torch.zeros(0, 4, 64), None, 1e-6, pos[:0], inv).shape == (0, 4, 64)
    with pytest.raises(ValueError, match="width"):
        krope.norm_rope_triton(torch.randn(2, 128), None, 1e-6, pos[:2], inv, 100)


def gpu_hc_params(g, n: int, D: int, head: bool):
    """(fn, scale, base) of an hc_pre (head: hc_head) on the GPU, drawn from generator g."""
    rows = n if head else (2 + n) * n
    fn = 0.02 * torch.randn(rows, n * D, device="cuda", generator=g)
    scale = 0.5 + torch.rand(1 if head else 3, device="cuda", generator=g)
    base = 0.5 * torch.randn(rows, device="cuda", generator=g)
    return fn, scale, base


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 300])
def test_gpu_hc_norm_fused(T, monkeypatch):
    """Compiled, Flash widths (n = 4, D = 4096, bf16 streams): hc_pre / hc_head with the norm fused against the
    finish kernel then the Triton rms_norm (one bf16 ulp: the sum of squares' order) and the reference."""
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)
    g = torch.Generator(device="cuda").manual_seed(T)
    n, D = 4, 4096
    X = torch.randn(T, n, D, device="cuda", generator=g).bfloat16()
    w = 0.5 + torch.rand(D, device="cuda", generator=g)
    for head in (False, True):
        fn, scale, base = gpu_hc_params(g, n, D, head)
        if head:
            plain = khc.hc_head_triton(X, fn, scale, base, 1e-6, 1e-6)
            got = khc.hc_head_triton(X, fn, scale, base, 1e-6, 1e-6, norm=(w, 1e-6))
            ref = hc_head_reference(X, fn, scale, base, 1e-6, 1e-6, norm=(w, 1e-6))
        else:
            plain = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 1e-6, 20)[0]
            got = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 1e-6, 20, norm=(w, 1e-6))[0]
            ref = hc_pre_reference(X, fn, scale, base, 1e-6, 1e-6, 20, norm=(w, 1e-6))[0]
        want = knorm.rms_norm_triton(plain, w, 1e-6)
        assert (got == want).float().mean() > 0.98, head
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2 ** -6)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2])
def test_gpu_hc_last_program_finish(T, monkeypatch):
    """Compiled, Flash widths: hc_pre (norm + act_quant) and hc_head (norm) with the finish run by the last mixing
    program equal the two kernels bit for bit, eagerly and replayed from a CUDA graph (the counter reset)."""
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)
    g = torch.Generator(device="cuda").manual_seed(T + 11)
    n, D = 4, 4096
    X = torch.randn(T, n, D, device="cuda", generator=g).bfloat16()
    w = 0.5 + torch.rand(D, device="cuda", generator=g)
    for head in (False, True):
        fn, scale, base = gpu_hc_params(g, n, D, head)
        q = None if head else Fp8Dialect.OCP
        monkeypatch.setattr(khc, "LAST_FINISH_T", 0)
        want = _hc_all(X, fn, scale, base, head, w, q)
        monkeypatch.setattr(khc, "LAST_FINISH_T", 2)
        got = _hc_all(X, fn, scale, base, head, w, q)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), head
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _hc_all(X, fn, scale, base, head, w, q)
        for _ in range(3):
            for o in out:
                o.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(out, want)), head
        if not head:  # hc_pre(prev=): the previous hc_post in the same launch, against hc_post then hc_pre
            f = torch.randn(T, D, device="cuda", generator=g).bfloat16()
            p0 = 2 * torch.rand(T, n, device="cuda", generator=g)
            c0 = torch.rand(T, n, n, device="cuda", generator=g)
            Xn = khc.hc_post_triton(f, X, p0, c0)
            sep = _hc_all(Xn, fn, scale, base, head, w, q)
            one = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5), quant=q, prev=(f, p0, c0))
            assert torch.equal(one[0], Xn)
            assert all(torch.equal(a, b) for a, b in zip(list(one[1:4]) + [one[4][0][:T], one[4][1]], sep))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_hc_quant(T, monkeypatch):
    """Compiled, Flash widths: hc_pre's act_quant of its normed output equals the standalone quantiser's bytes."""
    monkeypatch.setattr(khc, "MAX_NORM_D", 8192)
    g = torch.Generator(device="cuda").manual_seed(T + 7)
    n, D = 4, 4096
    X = torch.randn(T, n, D, device="cuda", generator=g).bfloat16()
    w = 0.5 + torch.rand(D, device="cuda", generator=g)
    fn, scale, base = gpu_hc_params(g, n, D, False)
    u, _, _, (q, qs) = khc.hc_pre_triton(X, fn, scale, base, 1e-6, 1e-6, 20, norm=(w, 1e-6), quant=Fp8Dialect.OCP)
    wq, ws = kquant.fp8_act_quant_triton(u, 128, Fp8Dialect.OCP)
    assert torch.equal(q[:T], wq) and torch.equal(qs, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(1, 1536), (64, 1536), (7, 512)])
def test_gpu_rms_norm_quant(M, N, monkeypatch):
    """Compiled: rms_norm's act_quant of its output (the q norm's, 1,536 wide; several rows per program at 512)
    written by the norm kernel (FUSE_QUANT_MAX_M on) equals the standalone quantiser's bytes."""
    monkeypatch.setattr(knorm, "FUSE_QUANT_MAX_M", 1 << 30)
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    w = 0.5 + torch.rand(N, device="cuda", generator=g)
    y, (q, s) = knorm.rms_norm_triton(x, w, 1e-6, quant=Fp8Dialect.OCP)
    wq, ws = kquant.fp8_act_quant_triton(y, 128, Fp8Dialect.OCP)
    assert torch.equal(y, knorm.rms_norm_triton(x, w, 1e-6)) and torch.equal(q[:M], wq) and torch.equal(s, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_rope_hadamard_fp4(T):
    """Compiled, the indexer queries [T, 64, 128] in bf16: RoPE + Hadamard + FP4 in one kernel equals apply_rope
    then the Hadamard + FP4 kernel bit for bit."""

    g = torch.Generator(device="cuda").manual_seed(T)
    x = (3.0 * torch.randn(T, 64, 128, device="cuda", generator=g)).bfloat16()
    pos = torch.randint(0, 200_000, (T,), device="cuda", generator=g)
    inv = rope_inv_freq(160000.0, 64)
    got = krope.rope_hadamard_fp4_triton(x, pos, inv)
    want = kquant.fp4_roundtrip_triton(krope.apply_rope_triton(x, pos, inv), 32, True)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_norm_rope_qkv(T):
    """Compiled, Flash's attention rows (q 64 x 512, kv 512 with 448 FP8 channels): one launch equals the two
    norm_rope kernels bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(T + 3)
    q = torch.randn(T, 64, 512, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 512, device="cuda", generator=g).bfloat16()
    w = (1 + 0.3 * torch.randn(512, device="cuda", generator=g)).bfloat16()
    pos = torch.randint(0, 200_000, (T,), device="cuda", generator=g)
    inv = rope_inv_freq(10000.0, 64)
    gq, gkv = krope.norm_rope_qkv_triton(q, kv, w, 1e-6, 1e-6, pos, inv, 448, Fp8Dialect.OCP)
    assert torch.equal(gq, krope.norm_rope_triton(q, None, 1e-6, pos, inv))
    assert torch.equal(gkv, krope.norm_rope_triton(kv, w, 1e-6, pos, inv, 448, Fp8Dialect.OCP))
