"""The small ops against naive oracles written from the spec (float64, explicit loops where it helps):
rms_norm, apply_rope (+ rope_inv_freq's YaRN table), hc_pre / hc_post / hc_head (spec §2.2, §2.9),
linear / grouped_linear over dense, FP8 and FP4 weights (spec §3.3, §3.4, §4), moe_route / moe_experts
(spec §2.8). FP8 / FP4 values are decoded here from the bit layouts of spec §4.1, §4.2, §4.6, not with
the library's decoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv4.config import YarnScaling
from dsv4.numerics import Fp8Dialect, ocp_to_fnuz, quantize_fp4_blocks, quantize_fp8_blocks
from dsv4.numerics.fp8 import dequantize_fp8_blocks
from dsv4.ops.quant import fp8_act_quant_reference
from dsv4.ops.rope import rope_inv_freq
from providers import provider_params


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================= rms_norm


def naive_rms_norm(x: torch.Tensor, w, eps: float) -> torch.Tensor:
    xs = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(xs)
    for r in range(xs.shape[0]):
        ms = sum(float(v) ** 2 for v in xs[r]) / xs.shape[1]
        out[r] = xs[r] / math.sqrt(ms + eps)
        if w is not None:
            out[r] *= w.double()
    return out.reshape(x.shape)


@pytest.mark.parametrize("fn", provider_params("rms_norm"))
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 40), (1, 7)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_fp32(fn, shape, weighted):
    g = gen(1)
    x = 3.0 * torch.randn(*shape, generator=g)
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=g) if weighted else None
    y = fn(x, w, 1e-6)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), naive_rms_norm(x, w, 1e-6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", provider_params("rms_norm"))
def test_rms_norm_bf16_keeps_dtype(fn):
    g = gen(2)
    x = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    w = (1.0 + 0.5 * torch.randn(64, generator=g))  # float32 weight, multiplied before the cast
    y = fn(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    want = naive_rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y.double(), want, atol=1e-2, rtol=2 ** -8)
    # the float32 result is rounded once: it equals the naive value rounded to bf16 nearly everywhere
    assert (y == want.to(torch.bfloat16)).float().mean() > 0.95
    y2 = fn(x, None, 1e-6)
    assert y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2.double(), naive_rms_norm(x, None, 1e-6), atol=1e-2, rtol=2 ** -8)


# ============================================================================= RoPE


def test_rope_inv_freq_yarn_flash():
    """Spec §2.4 with the Flash numbers: theta 160000, 64 rotary dims, factor 16, original 65536,
    beta_fast 32, beta_slow 1 -> low 15, high 25."""
    theta, dim, factor, orig = 160000.0, 64, 16.0, 65536

    def corr(n):
        return dim * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    assert (low, high) == (15, 25)
    omega = torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    ramp = torch.tensor([min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)], dtype=torch.float64)
    want = omega * ramp / factor + omega * (1 - ramp)
    got = rope_inv_freq(theta, dim, YarnScaling(factor=factor, original_max_position_embeddings=orig,
                                                beta_fast=32.0, beta_slow=1.0))
    assert got.dtype == torch.float32 and got.shape == (32,)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(got[:15].double(), omega[:15], rtol=2e-6, atol=0)  # unchanged
    torch.testing.assert_close(got[25:].double(), omega[25:] / 16, rtol=2e-6, atol=0)  # divided by 16
    assert ((got[15:25].double() < omega[15:25]) & (got[15:25].double() > omega[15:25] / 16)).all()
    # without YaRN (sliding-window layers, theta 10000): the plain table
    plain = rope_inv_freq(10000.0, dim, None)
    torch.testing.assert_close(plain.double(), torch.tensor([10000.0 ** (-2 * i / dim) for i in range(32)],
                                                           dtype=torch.float64), rtol=2e-6, atol=0)


def naive_rope(x: torch.Tensor, positions, inv_freq: torch.Tensor, inverse=False) -> torch.Tensor:
    """Complex multiplication of interleaved pairs of the trailing dims; the angle is float32(p) times
    float32(inv_freq) rounded to float32 (as a float32 table holds it), cos/sin in float64."""
    half = inv_freq.numel()
    D = x.shape[-1]
    out = x.double().clone()
    lead = out.reshape(x.shape[0], -1, D)
    for t, p in enumerate(positions):
        for i in range(half):
            ang = float(np.float32(p) * np.float32(inv_freq[i].item()))
            rot = complex(math.cos(ang), -math.sin(ang) if inverse else math.sin(ang))
            a = D - 2 * half + 2 * i
            for r in range(lead.shape[1]):
                z = complex(lead[t, r, a].item(), lead[t, r, a + 1].item()) * rot
                lead[t, r, a], lead[t, r, a + 1] = z.real, z.imag
    return lead.reshape(x.shape)


ROPE_FREQ = (1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))).float()


@pytest.mark.parametrize("fn", provider_params("apply_rope"))
@pytest.mark.parametrize("shape", [(5, 3, 24), (4, 12), (3, 2, 2, 8)])
def test_apply_rope_vs_naive(fn, shape):
    g = gen(3)
    x = torch.randn(*shape, generator=g)
    pos = torch.tensor([0, 1, 7, 300, 4095][: shape[0]], dtype=torch.int64)
    y = fn(x, pos, ROPE_FREQ)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[..., :-8], x[..., :-8]), "non-rotary (leading) dims changed"
    torch.testing.assert_close(y.double(), naive_rope(x, pos.tolist(), ROPE_FREQ), atol=1e-5, rtol=1e-5)
    yi = fn(x, pos, ROPE_FREQ, inverse=True)
    torch.testing.assert_close(yi.double(), naive_rope(x, pos.tolist(), ROPE_FREQ, inverse=True), atol=1e-5,
                               rtol=1e-5)
    back = fn(y, pos, ROPE_FREQ, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[1:], x[1:], atol=1e-3)  # it does rotate


@pytest.mark.parametrize("fn", provider_params("apply_rope"))
def test_apply_rope_large_positions(fn):
    """Positions up to 1,000,000 with the YaRN table: agrees with the float64 oracle (same float32
    angles) to ~1e-3."""
    g = gen(4)
    inv = rope_inv_freq(160000.0, 16, YarnScaling(factor=16.0, original_max_position_embeddings=65536))
    x = torch.randn(5, 2, 32, generator=g)
    pos = [999_999, 1_000_000, 654_321, 131_071, 65_536]
    y = fn(x, torch.tensor(pos), inv)
    torch.testing.assert_close(y.double(), naive_rope(x, pos, inv), atol=1e-3, rtol=1e-3)
    back = fn(y, torch.tensor(pos), inv, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fn", provider_params("apply_rope"))
def test_apply_rope_bf16(fn):
    g = gen(5)
    x = torch.randn(4, 3, 24, generator=g).to(torch.bfloat16)
    pos = torch.tensor([2, 9, 33, 100])
    y = fn(x, pos, ROPE_FREQ)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[..., :-8], x[..., :-8])
    torch.testing.assert_close(y.double(), naive_rope(x, pos.tolist(), ROPE_FREQ), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fn", provider_params("norm_rope"))
@pytest.mark.parametrize("shape,weighted", [((5, 3, 24), False), ((4, 40), True), ((2, 2, 128), True)])
def test_norm_rope_vs_naive(fn, shape, weighted):
    """norm_rope without the FP8 step = the naive RMS norm, then the naive rotation of its result (float32
    here: the oracles' float64 within float32 roundings); with fp8_width the first channels are FP8 grid
    values times a power of two per 64 (at most 8 distinct magnitudes per binade), the rest as without it."""
    g = gen(6)
    x = torch.randn(*shape, generator=g)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)) if weighted else None
    pos = torch.tensor([0, 5, 77, 4095, 12][: shape[0]])
    y = fn(x, w, 1e-6, pos, ROPE_FREQ)
    assert y.shape == x.shape and y.dtype == x.dtype
    want = naive_rope(naive_rms_norm(x, w, 1e-6).float(), pos.tolist(), ROPE_FREQ)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    if shape[-1] >= 128:
        y8 = fn(x, w, 1e-6, pos, ROPE_FREQ, 64)
        torch.testing.assert_close(y8[..., 64:], y[..., 64:], atol=0, rtol=0)
        blk = y8[..., :64].double()
        torch.testing.assert_close(blk, y[..., :64].double(), atol=0, rtol=2 ** -3)  # e4m3: 3 mantissa bits
        assert not torch.equal(y8[..., :64], y[..., :64])  # the round trip happened


# ============================================================================= mHC


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def naive_mix(X_t, fn, rms_eps):
    xb = X_t.double().flatten()
    rho = 1.0 / math.sqrt(float((xb * xb).mean()) + rms_eps)
    return [float(fn[k].double() @ xb) * rho for k in range(fn.shape[0])]


def naive_hc_pre(X, fn, scale, base, rms_eps, hc_eps, iters):
    T, n, _ = X.shape
    us, posts, combs = [], [], []
    sc, bs = scale.double().tolist(), base.double().tolist()
    for t in range(T):
        mu = naive_mix(X[t], fn, rms_eps)
        pre = [sigmoid(mu[j] * sc[0] + bs[j]) + hc_eps for j in range(n)]
        post = [2 * sigmoid(mu[n + j] * sc[1] + bs[n + j]) for j in range(n)]
        L = [[mu[2 * n + n * j + k] * sc[2] + bs[2 * n + n * j + k] for k in range(n)] for j in range(n)]
        C = []
        for j in range(n):  # row softmax + eps
            mx = max(L[j])
            e = [math.exp(v - mx) for v in L[j]]
            C.append([v / sum(e) + hc_eps for v in e])

        def col_norm(C):
            cs = [sum(C[j][k] for j in range(n)) for k in range(n)]
            return [[C[j][k] / (cs[k] + hc_eps) for k in range(n)] for j in range(n)]

        def row_norm(C):
            return [[C[j][k] / (sum(C[j]) + hc_eps) for k in range(n)] for j in range(n)]

        C = col_norm(C)
        for _ in range(iters - 1):
            C = col_norm(row_norm(C))
        us.append(sum(pre[j] * X[t, j].double() for j in range(n)))
        posts.append(post)
        combs.append(C)
    return torch.stack(us), torch.tensor(posts, dtype=torch.float64), torch.tensor(combs, dtype=torch.float64)


def hc_inputs(seed, T=5, n=4, Dm=8, logit_scale=1.0):
    g = gen(seed)
    X = torch.randn(T, n, Dm, generator=g)
    fn = 0.3 * torch.randn((2 + n) * n, n * Dm, generator=g)
    scale = logit_scale * (0.5 + torch.rand(3, generator=g))
    base = 0.5 * torch.randn((2 + n) * n, generator=g)
    return X, fn, scale, base


@pytest.mark.parametrize("fn_op", provider_params("hc_pre"))
@pytest.mark.parametrize("logit_scale", [1.0, 8.0])
@pytest.mark.parametrize("hc_eps", [1e-6, 0.05])  # the large eps makes its placement visible
def test_hc_pre(fn_op, logit_scale, hc_eps):
    X, fn, scale, base = hc_inputs(6, logit_scale=logit_scale)
    u, post, comb = fn_op(X, fn, scale, base, 1e-6, hc_eps, 20)
    wu, wpost, wcomb = naive_hc_pre(X, fn, scale, base, 1e-6, hc_eps, 20)
    assert u.shape == (5, 8) and u.dtype == X.dtype and post.shape == (5, 4) and comb.shape == (5, 4, 4)
    torch.testing.assert_close(u.double(), wu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post.double(), wpost, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb.double(), wcomb, atol=1e-5, rtol=1e-5)
    # properties: comb >= 0, post in [0, 2] (pre > 0: test_hc_pre_weights_are_positive)
    assert (comb >= 0).all()
    assert ((post >= 0) & (post <= 2)).all()
    if hc_eps < 1e-3:  # doubly stochastic: the last pass normalises columns
        torch.testing.assert_close(comb.sum(dim=-2), torch.ones(5, 4), atol=1e-5, rtol=0)
        if logit_scale == 1.0:  # moderate logits: 20 Sinkhorn passes also bring the rows to ~1
            torch.testing.assert_close(comb.sum(dim=-1), torch.ones(5, 4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fn_op", provider_params("hc_pre"))
def test_hc_pre_weights_are_positive(fn_op):
    """pre_j in (0, 1 + hc_eps): with only stream j non-zero (= v > 0), u = pre_j v."""
    X, fn, scale, base = hc_inputs(7)
    v = torch.rand(8, generator=gen(8)) + 0.5
    for j in range(4):
        Xs = torch.zeros(5, 4, 8)
        Xs[:, j] = v
        u, _, _ = fn_op(Xs, fn, scale, base, 1e-6, 1e-6, 20)
        pre_j = u / v
        assert (pre_j.std(dim=-1) < 1e-5).all(), "u is not a multiple of the only non-zero stream"
        assert ((pre_j > 0) & (pre_j < 1 + 2e-6)).all()
    # large logits saturate, but everything stays in range and finite
    u, post, comb = fn_op(X, fn, 50 * scale, base, 1e-6, 1e-6, 20)
    assert ((post >= 0) & (post <= 2)).all() and torch.isfinite(comb).all() and torch.isfinite(u).all()


@pytest.mark.parametrize("fn_op", provider_params("hc_post"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_post(fn_op, dtype):
    g = gen(9)
    T, n, Dm = 4, 4, 8
    X = torch.randn(T, n, Dm, generator=g).to(dtype)
    f = torch.randn(T, Dm, generator=g).to(dtype)
    post = 2 * torch.rand(T, n, generator=g)
    comb = torch.rand(T, n, n, generator=g)  # not symmetric: a transposed comb must fail
    got = fn_op(f, X, post, comb)
    assert got.shape == X.shape and got.dtype == dtype
    want = torch.zeros(T, n, Dm, dtype=torch.float64)
    for t in range(T):
        for k in range(n):
            want[t, k] = float(post[t, k]) * f[t].double()
            for j in range(n):
                want[t, k] += float(comb[t, j, k]) * X[t, j].double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("fn_op", provider_params("hc_head"))
@pytest.mark.parametrize("hc_eps", [1e-6, 0.05])
def test_hc_head(fn_op, hc_eps):
    g = gen(10)
    T, n, Dm = 3, 4, 8
    X = torch.randn(T, n, Dm, generator=g)
    fn = 0.3 * torch.randn(n, n * Dm, generator=g)
    scale = torch.tensor([0.7])
    base = 0.5 * torch.randn(n, generator=g)
    got = fn_op(X, fn, scale, base, 1e-6, hc_eps)
    assert got.shape == (T, Dm) and got.dtype == X.dtype
    want = torch.zeros(T, Dm, dtype=torch.float64)
    for t in range(T):
        mu = naive_mix(X[t], fn, 1e-6)
        for j in range(n):
            want[t] += (sigmoid(mu[j] * 0.7 + float(base[j])) + hc_eps) * X[t, j].double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # bf16 streams: dtype kept
    got16 = fn_op(X.bfloat16(), fn, scale, base, 1e-6, hc_eps)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), want, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("fn_op", provider_params("hc_pre"))
def test_hc_pre_norm_out(fn_op):
    """`norm=(w, eps)`: u comes out through the RMSNorm that follows it (of u in X's dtype), post / comb as without
    it; a provider that skips the weight or normalises the float32 u before its rounding fails."""
    X, fn, scale, base = hc_inputs(11, logit_scale=2.0)
    X = X.bfloat16()
    w = 0.5 + torch.rand(8, generator=gen(12))
    u0, post0, comb0 = fn_op(X, fn, scale, base, 1e-6, 0.05, 20)
    u, post, comb = fn_op(X, fn, scale, base, 1e-6, 0.05, 20, norm=(w, 1e-5))
    assert u.shape == u0.shape and u.dtype == torch.bfloat16
    torch.testing.assert_close(post, post0, atol=0, rtol=0)
    torch.testing.assert_close(comb, comb0, atol=0, rtol=0)
    torch.testing.assert_close(u.double(), naive_rms_norm(u0, w, 1e-5), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("fn_op", provider_params("hc_head"))
def test_hc_head_norm_out(fn_op):
    X, fn, scale, base = hc_inputs(13, logit_scale=2.0)
    X, fn, scale, base = X.bfloat16(), fn[:4], scale[:1], base[:4]
    w = 0.5 + torch.rand(8, generator=gen(14))
    h0 = fn_op(X, fn, scale, base, 1e-6, 0.05)
    h = fn_op(X, fn, scale, base, 1e-6, 0.05, norm=(w, 1e-5))
    assert h.shape == h0.shape and h.dtype == torch.bfloat16
    torch.testing.assert_close(h.double(), naive_rms_norm(h0, w, 1e-5), atol=1e-2, rtol=2 ** -7)


# ============================================================================= formats (naive decoders)


def e4m3_table(fnuz: bool) -> torch.Tensor:
    """Value of each of the 256 bytes, from the bit layout (spec §4.1 / §4.2), float64."""
    bias = 8 if fnuz else 7
    vals = []
    for b in range(256):
        s, e, m = (-1.0 if b & 0x80 else 1.0), (b >> 3) & 0xF, b & 7
        if (fnuz and b == 0x80) or (not fnuz and (b & 0x7F) == 0x7F):
            vals.append(float("nan"))
        elif e == 0:
            vals.append(s * 2.0 ** (1 - bias) * m / 8)
        else:
            vals.append(s * 2.0 ** (e - bias) * (1 + m / 8))
    return torch.tensor(vals, dtype=torch.float64)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def naive_fp8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] FP8 (dtype names the dialect) with E8M0 bytes per 128x128 block -> float64."""
    table = e4m3_table(q.dtype == torch.float8_e4m3fnuz)
    b = q.view(torch.uint8).long()
    N, K = b.shape
    out = torch.empty(N, K, dtype=torch.float64)
    for n0 in range(0, N, 128):
        for k0 in range(0, K, 128):
            s = 2.0 ** (int(scale[n0 // 128, k0 // 128]) - 127)
            out[n0:n0 + 128, k0:k0 + 128] = table[b[n0:n0 + 128, k0:k0 + 128]] * s
    return out


def naive_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes (element 2c in the low nibble of byte c) with E8M0 bytes per 32 -> [N, K] float64."""
    b = packed.view(torch.uint8).long()
    N, K = b.shape[0], 2 * b.shape[1]
    codes = torch.empty(N, K, dtype=torch.long)
    codes[:, 0::2] = b & 0xF
    codes[:, 1::2] = b >> 4
    vals = torch.tensor(E2M1, dtype=torch.float64)[codes]
    s = torch.tensor([[2.0 ** (int(v) - 127) for v in row] for row in scale], dtype=torch.float64)
    return vals * s.repeat_interleave(32, dim=1)[:, :K]


def naive_weight(w, scale):
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return naive_fp8_weight(w, scale)
    if w.dtype in (torch.uint8, torch.int8):
        return naive_fp4_weight(w, scale)
    return w.double()


_OCP = e4m3_table(False)
_GRID_CODES = torch.arange(0, 0x7F)  # non-negative finite OCP codes
_GRID = _OCP[_GRID_CODES]


def naive_act_quant(x: torch.Tensor) -> torch.Tensor:
    """x rounded through OCP e4m3 per (row, 128 channels): amax >= 1e-4, s = 2^ceil(log2(amax/448)),
    clamp +-448, round to nearest (ties to the even code); float64."""
    xs = x.double()
    out = torch.empty_like(xs)
    for r in range(xs.shape[0]):
        for k0 in range(0, xs.shape[1], 128):
            blk = xs[r, k0:k0 + 128]
            amax = max(float(blk.abs().max()), 1e-4)
            s = 2.0 ** math.ceil(math.log2(amax / 448.0))
            y = (blk / s).clamp(-448, 448)
            d = (y.abs().unsqueeze(-1) - _GRID).abs()
            cand = d == d.min(dim=-1, keepdim=True).values
            pick = (cand.long() * (2 - _GRID_CODES % 2)).argmax(dim=-1)  # an even code wins a tie
            out[r, k0:k0 + 128] = torch.sign(y) * _GRID[pick] * s
    return out


def make_weight(fmt: str, N: int, K: int, seed: int, amp: float = 0.1):
    w = amp * torch.randn(N, K, generator=gen(seed))
    if fmt == "dense":
        return w, None
    if fmt == "fp8":
        q, s = quantize_fp8_blocks(w, (128, 128), Fp8Dialect.OCP)
        q = torch.where(q == 0x80, torch.zeros_like(q), q)  # -0 -> +0: the same value, no FNUZ-NaN byte
        return q.view(torch.float8_e4m3fn), s
    if fmt == "fp4":
        return quantize_fp4_blocks(w, 32)
    raise ValueError(fmt)


# ============================================================================= linear

M, N, K = 5, 160, 200  # neither N nor K a multiple of 128: ragged weight / activation blocks


@pytest.mark.parametrize("fn", provider_params("linear"))
@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
def test_linear_plain_fp32(fn, fmt):
    w, s = make_weight(fmt, N, K, seed=11)
    x = torch.randn(M, K, generator=gen(12))
    y = fn(x, w, s, False)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ naive_weight(w, s).t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", provider_params("linear"))
@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
def test_linear_plain_bf16(fn, fmt):
    """act_quant False: the weight is dequantised to x's dtype and multiplied in x's dtype."""
    w, s = make_weight(fmt, N, K, seed=13)
    x = torch.randn(M, K, generator=gen(14)).to(torch.bfloat16)
    y = fn(x, w, s, False)
    assert y.dtype == torch.bfloat16
    wb = naive_weight(w, s).to(torch.bfloat16).double()  # exact for FP8 / FP4 values
    torch.testing.assert_close(y.double(), x.double() @ wb.t(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fn", provider_params("linear"))
@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
def test_linear_act_quant(fn, fmt):
    """act_quant True: fp32 matmul of the FP8-rounded activations (per row and 128 channels,
    power-of-two scales) with the exactly dequantised weight."""
    w, s = make_weight(fmt, N, K, seed=15)
    x = 2.0 * torch.randn(M, K, generator=gen(16))
    x[1, :128] *= 1e-3  # a block with a much smaller scale than its neighbour
    x[2, 128:] = 0.0  # an all-zero block (amax floor)
    y = fn(x, w, s, True)
    assert y.dtype == torch.float32
    wd = naive_weight(w, s)
    want = naive_act_quant(x) @ wd.t()
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert ((y.double() - x.double() @ wd.t()).abs().max() > 1e-3), "activations were not rounded"


@pytest.mark.parametrize("fn", provider_params("linear"))
def test_linear_fnuz_same_as_ocp(fn):
    """The fnuz activation dialect, and the weight converted to fnuz, give the OCP results exactly."""
    w, s = make_weight("fp8", N, K, seed=17)
    x = torch.randn(M, K, generator=gen(18))
    ref = fn(x, w, s, True, Fp8Dialect.OCP)
    assert torch.equal(fn(x, w, s, True, Fp8Dialect.FNUZ), ref)
    wf, sf = ocp_to_fnuz(w, s)
    wf = wf.view(torch.float8_e4m3fnuz)
    assert torch.equal(fn(x, wf, sf, True, Fp8Dialect.FNUZ), ref)
    assert torch.equal(fn(x, wf, sf, False), fn(x, w, s, False))


@pytest.mark.parametrize("fn", provider_params("linear"))
@pytest.mark.parametrize("act_quant", [False, True])
def test_linear_wrong_dialect_is_factor_two(fn, act_quant):
    """The same bytes read in the other dialect: OCP bytes as fnuz halve, fnuz bytes as OCP double."""
    w, s = make_weight("fp8", N, K, seed=19)
    x = torch.randn(M, K, generator=gen(20))
    right = fn(x, w, s, act_quant)
    as_fnuz = fn(x, w.view(torch.uint8).view(torch.float8_e4m3fnuz), s, act_quant)
    assert torch.equal(as_fnuz * 2, right)
    wf, sf = ocp_to_fnuz(w, s)
    as_ocp = fn(x, wf.view(torch.float8_e4m3fn), sf, act_quant)
    assert torch.equal(as_ocp, right * 2)
    assert right.abs().max() > 0.1


@pytest.mark.parametrize("fn", provider_params("grouped_linear"))
@pytest.mark.parametrize("fmt", ["dense", "fp8"])
@pytest.mark.parametrize("G,R,Kg", [(4, 32, 48), (3, 48, 136)])
def test_grouped_linear(fn, fmt, G, R, Kg):
    w, s = make_weight(fmt, G * R, Kg, seed=21)
    x = torch.randn(6, G, Kg, generator=gen(22))
    z = fn(x, w, s)
    assert z.shape == (6, G, R) and z.dtype == x.dtype
    wd = naive_weight(w, s)
    want = torch.empty(6, G, R, dtype=torch.float64)
    for g in range(G):
        want[:, g] = x[:, g].double() @ wd[g * R:(g + 1) * R].t()
    torch.testing.assert_close(z.double(), want, atol=1e-5, rtol=1e-5)


# ============================================================================= MoE routing

E_R, TOK, DM = 8, 9, 32


def naive_scores(logits, func):
    if func == "sqrtsoftplus":
        return [math.sqrt(math.log1p(math.exp(v))) for v in logits]
    if func == "sigmoid":
        return [sigmoid(v) for v in logits]
    mx = max(logits)
    e = [math.exp(v - mx) for v in logits]
    return [v / sum(e) for v in e]


def naive_route(x, gw, bias, tid2eid, ids_in, k, func, norm, scaling):
    out_w, out_i = [], []
    for t in range(x.shape[0]):
        logits = [float(gw[e].double() @ x[t].double()) for e in range(gw.shape[0])]
        s = naive_scores(logits, func)
        if tid2eid is not None:
            sel = [int(v) for v in tid2eid[int(ids_in[t])]]
        else:
            b = [0.0] * len(s) if bias is None else bias.double().tolist()
            key = [s[e] + b[e] for e in range(len(s))]
            order = sorted(range(len(s)), key=lambda e: -key[e])
            assert key[order[k - 1]] - key[order[k]] > 1e-5, "near tie in the test data"
            sel = order[:k]
        w = [s[e] for e in sel]
        if norm:
            w = [v / sum(w) for v in w]
        out_w.append([v * scaling for v in w])
        out_i.append(sel)
    return out_w, out_i


def route_inputs(seed):
    g = gen(seed)
    x = torch.randn(TOK, DM, generator=g)
    gw = 0.3 * torch.randn(E_R, DM, generator=g)
    bias = 0.8 * torch.randn(E_R, generator=g)
    tid2eid = torch.stack([torch.randperm(E_R, generator=g)[:3] for _ in range(20)])
    ids_in = torch.randint(0, 20, (TOK,), generator=g)
    return x, gw, bias, tid2eid, ids_in


def compare_route(got, want, T):
    gw_, gi = got
    ww, wi = want
    assert gi.shape == (T, len(wi[0])) and gi.dtype == torch.int64 and gw_.dtype == torch.float32
    for t in range(T):
        mine = sorted(zip(gi[t].tolist(), gw_[t].tolist()))
        ref = sorted(zip(wi[t], ww[t]))
        assert [a for a, _ in mine] == [a for a, _ in ref], f"token {t}: experts {mine} vs {ref}"
        np.testing.assert_allclose([b for _, b in mine], [b for _, b in ref], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", provider_params("moe_route"))
@pytest.mark.parametrize("func,norm,use_bias", [("sqrtsoftplus", True, True), ("sigmoid", True, True),
                                                ("softmax", False, False), ("sqrtsoftplus", True, False)])
def test_moe_route_learned(fn, func, norm, use_bias):
    x, gw, bias, _, ids_in = route_inputs(23)
    b = bias if use_bias else None
    got = fn(x, gw, b, None, ids_in, 3, func, norm, 1.5)
    want = naive_route(x, gw, b, None, ids_in, 3, func, norm, 1.5)
    compare_route(got, want, TOK)
    if use_bias:  # premise: the bias changes the choice for some token, so using it is tested
        unbiased = naive_route(x, gw, None, None, ids_in, 3, func, norm, 1.5)[1]
        assert any(sorted(a) != sorted(c) for a, c in zip(want[1], unbiased))
    if norm:
        torch.testing.assert_close(got[0].sum(-1), torch.full((TOK,), 1.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", provider_params("moe_route"))
def test_moe_route_hash(fn):
    x, gw, _, tid2eid, ids_in = route_inputs(24)
    got = fn(x, gw, None, tid2eid, ids_in, 3, "sqrtsoftplus", True, 1.5)
    compare_route(got, naive_route(x, gw, None, tid2eid, ids_in, 3, "sqrtsoftplus", True, 1.5), TOK)


# ============================================================================= swiglu (shared expert)


def naive_swiglu(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, L)) * clamp(u, -L, L) in float64, element by element (spec §2.8)."""
    I = gu.shape[-1] // 2
    flat = gu.double().reshape(-1, 2 * I)
    out = torch.empty(flat.shape[0], I, dtype=torch.float64)
    for r in range(flat.shape[0]):
        for j in range(I):
            g = min(float(flat[r, j]), limit)
            u = max(-limit, min(float(flat[r, I + j]), limit))
            out[r, j] = g / (1.0 + math.exp(-g)) * u
    return out.reshape(*gu.shape[:-1], I)


@pytest.mark.parametrize("fn", provider_params("swiglu"))
@pytest.mark.parametrize("T,I", [(1, 3), (5, 100), (2, 1100), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(fn, T, I, dtype):
    """Values past the limit on both sides, I not a power of two and wider than one program's block, and gu a
    strided view of NaN-padded storage (a read past 2I shows up as NaN)."""
    big = torch.full((T, 2 * I + 5), float("nan"))
    big[:, :2 * I] = 3.0 * torch.randn(T, 2 * I, generator=gen(7 + I))
    gu = big.to(dtype)[:, :2 * I]
    got = fn(gu, 2.5)
    want = naive_swiglu(gu, 2.5)
    assert got.dtype == dtype and got.shape == (T, I)
    if T:
        assert float(gu.float().abs().max()) > 2.5  # premise: the clamps bind somewhere
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    else:  # rounded once from fp32: within one bf16 ulp of the exact value, equal to its rounding nearly always
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-6)
        if T:
            assert float((got == want.to(dtype)).float().mean()) > 0.98


def check_act_quant(y, y_q, dialect):
    """y_q = (q, s) is y's act_quant: the values of the reference quantiser's (a Triton provider's bytes may be +0
    where the reference writes OCP -0), rows of q past y's allowed."""
    q, s = y_q
    M = y.shape[0]
    wq, ws = fp8_act_quant_reference(y, 128, dialect)
    assert q.shape[0] >= M and torch.equal(s, ws)
    got = dequantize_fp8_blocks(q[:M], s, (128,), dialect, out_dtype=torch.float64)
    want = dequantize_fp8_blocks(wq, ws, (128,), dialect, out_dtype=torch.float64)
    assert torch.equal(got, want) and int(wq.count_nonzero()) > wq.numel() // 2


@pytest.mark.parametrize("fn", provider_params("rms_norm"))
@pytest.mark.parametrize("M,N", [(3, 1536), (11, 512), (5, 300), (2, 64)])
@pytest.mark.parametrize("dialect", [Fp8Dialect.OCP, Fp8Dialect.FNUZ], ids=["ocp", "fnuz"])
@pytest.mark.parametrize("fuse_m", [1 << 30, 0], ids=["in_norm", "after_norm"])
def test_rms_norm_quant(fn, M, N, dialect, fuse_m, monkeypatch):
    """rms_norm(quant=): y as without it, and (q, s) y's act_quant: the same values as the reference quantiser's,
    rows of q past M allowed. N = 512: several rows per program (11 rows: a partial last program); N = 300: a
    partial block; N = 64: narrower than a block (the standalone quantiser). A Triton provider writes it in the
    norm kernel (its FUSE_QUANT_MAX_M on) or with the standalone quantiser after it (the default)."""
    if "triton" in str(getattr(fn, "__name__", fn)):
        monkeypatch.setattr("dsv4.kernels.triton.norm.FUSE_QUANT_MAX_M", fuse_m)
    elif fuse_m == 0:
        pytest.skip("the knob is the Triton provider's")
    x = (2.0 * torch.randn(M, N, generator=gen(5 + N))).bfloat16()
    w = 0.5 + torch.rand(N, generator=gen(6))
    y0 = fn(x, w, 1e-6)
    y, y_q = fn(x, w, 1e-6, quant=dialect)
    assert torch.equal(y, y0)
    check_act_quant(y, y_q, dialect)


@pytest.mark.parametrize("fn", provider_params("swiglu"))
@pytest.mark.parametrize("T,I", [(3, 2048), (5, 300), (2, 100)])
@pytest.mark.parametrize("dialect", [Fp8Dialect.OCP, Fp8Dialect.FNUZ], ids=["ocp", "fnuz"])
def test_swiglu_quant(fn, T, I, dialect):
    """swiglu(quant=): h as without it, and (q, s) h's act_quant: the same values as the reference quantiser's
    (bytes of a Triton provider may be +0 where the reference writes OCP -0), rows of q past T allowed."""
    big = torch.full((T, 2 * I + 5), float("nan"))
    big[:, :2 * I] = 3.0 * torch.randn(T, 2 * I, generator=gen(9 + I))
    gu = big.bfloat16()[:, :2 * I]
    h0 = fn(gu, 2.5)
    h, h_q = fn(gu, 2.5, quant=dialect)
    assert torch.equal(h, h0)
    check_act_quant(h, h_q, dialect)


# ============================================================================= MoE experts

E_X, D_X, I_X, LIMIT = 6, 64, 32, 1.5


def expert_weights(fmt, seed):
    g = gen(seed)
    w13 = 0.3 * torch.randn(E_X, 2 * I_X, D_X, generator=g)
    w2 = 0.2 * torch.randn(E_X, D_X, I_X, generator=g)
    if fmt == "dense":
        return w13, None, w2, None
    if fmt == "fp4":
        a, sa = quantize_fp4_blocks(w13, 32)
        b, sb = quantize_fp4_blocks(w2, 32)
        return a, sa, b, sb
    a, sa = quantize_fp8_blocks(w13, (128, 128))
    b, sb = quantize_fp8_blocks(w2, (128, 128))
    return a.view(torch.float8_e4m3fn), sa, b.view(torch.float8_e4m3fn), sb


def naive_experts(x, w13, s13, w2, s2, ids, weights, limit, act_quant, stats):
    T = x.shape[0]
    out = torch.zeros(T, w2.shape[1], dtype=torch.float64)
    deq13 = [naive_weight(w13[e], None if s13 is None else s13[e]) for e in range(w13.shape[0])]
    deq2 = [naive_weight(w2[e], None if s2 is None else s2[e]) for e in range(w2.shape[0])]
    xin = naive_act_quant(x) if act_quant else x.double()
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = deq13[e] @ xin[t]
            g, u = gu[:I_X], gu[I_X:]
            stats["g_above"] += int((g > limit).sum())
            stats["g_below"] += int((g < -limit).sum())
            stats["u_out"] += int((u.abs() > limit).sum())
            g = g.clamp(max=limit)  # the gate is clamped above only
            u = u.clamp(-limit, limit)
            h = g * torch.sigmoid(g) * u * float(weights[t, j])  # routing weight before w2
            h = h.to(x.dtype).double()
            if act_quant:
                h = naive_act_quant(h.unsqueeze(0))[0]
            out[t] += deq2[e] @ h
    return out


def check_experts(fn, fmt, ids, act_quant=False, seed=30):
    w13, s13, w2, s2 = expert_weights(fmt, seed)
    T = ids.shape[0]
    x = torch.randn(T, D_X, generator=gen(seed + 1))
    weights = 0.2 + torch.rand(ids.shape, generator=gen(seed + 2))
    got = fn(x, w13, s13, w2, s2, ids, weights, LIMIT, act_quant)
    assert got.shape == (T, D_X) and got.dtype == torch.float32
    stats = {"g_above": 0, "g_below": 0, "u_out": 0}
    want = naive_experts(x, w13, s13, w2, s2, ids, weights, LIMIT, act_quant, stats)
    assert stats["g_above"] and stats["g_below"] and stats["u_out"], f"clamps not exercised: {stats}"
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def skewed_ids():
    """Expert 0 gets no token, expert 1 exactly one, expert 2 every token, 3..5 the rest."""
    ids = torch.tensor([[2, 3], [4, 2], [2, 5], [1, 2], [2, 3], [5, 2], [2, 4]], dtype=torch.int64)
    counts = torch.bincount(ids.flatten(), minlength=E_X)
    assert counts[0] == 0 and counts[1] == 1 and counts[2] == ids.shape[0]
    return ids


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
def test_moe_experts_skewed(fn, fmt):
    check_experts(fn, fmt, skewed_ids())


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
@pytest.mark.parametrize("fmt", ["dense", "fp4"])
def test_moe_experts_all_on_one_expert(fn, fmt):
    check_experts(fn, fmt, torch.full((9, 1), 4, dtype=torch.int64), seed=40)


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
def test_moe_experts_act_quant_fp4(fn):
    check_experts(fn, "fp4", skewed_ids(), act_quant=True, seed=50)


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
@pytest.mark.parametrize("ids", ["skewed", "none_routed"])
def test_moe_experts_shared_folded_in(fn, ids):
    """`shared=`: the routed float32 sum plus the shared expert's output, rounded once to its dtype (bf16 here):
    equal to doing it after the call, bit for bit (the same float32 sum, one add, one rounding); with nothing
    routed (k = 0), the shared output itself."""
    w13, s13, w2, s2 = expert_weights("fp4", 80)
    idx = skewed_ids() if ids == "skewed" else torch.zeros(7, 0, dtype=torch.int64)
    T = idx.shape[0]
    x = torch.randn(T, D_X, generator=gen(81)).bfloat16()
    weights = 0.2 + torch.rand(idx.shape, generator=gen(82))
    shared = (4 * torch.randn(T, D_X, generator=gen(83))).bfloat16()
    routed = fn(x, w13, s13, w2, s2, idx, weights, LIMIT, True)
    got = fn(x, w13, s13, w2, s2, idx, weights, LIMIT, True, shared=shared)
    assert got.dtype == torch.bfloat16 and got.shape == (T, D_X)
    assert torch.equal(got, (routed.float() + shared.float()).to(torch.bfloat16))
    if ids == "skewed":
        assert not torch.equal(got, shared) and not torch.equal(got, routed.to(torch.bfloat16))


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
def test_moe_experts_one_token(fn):
    check_experts(fn, "dense", torch.tensor([[5, 0, 3]]), seed=60)


@pytest.mark.parametrize("fn", provider_params("moe_experts"))
@pytest.mark.parametrize("bad", [E_X, -1])
def test_moe_experts_out_of_range_id_raises(fn, bad):
    w13, s13, w2, s2 = expert_weights("dense", 70)
    x = torch.randn(3, D_X, generator=gen(71))
    ids = torch.tensor([[0, 1], [2, bad], [3, 4]])
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        fn(x, w13, s13, w2, s2, ids, torch.ones(3, 2), LIMIT, False)
