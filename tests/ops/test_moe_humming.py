"""The humming `moe_experts` provider (dsv4/kernels/vendor/humming_moe.py) on the CPU: humming itself needs
an NVIDIA GPU, so its indexed MoE GEMM is replaced by a plain-PyTorch stand-in with the semantics the
provider relies on (rows `sorted_ids` grouped by expert in blocks of block_m, padding slots >= T k skipped,
input row slot // top_k, output row slot); everything dsv4 adds around it (dispatch at humming's block size,
padding moved to T k, FP8 activation round trip, SwiGLU + routing weight + FP8 round trip of h, combine)
runs in the Triton interpreter and must equal the reference. The stand-in fills its whole output with NaN
first, so a row the pipeline reads without the GEMM having written it shows. The GPU check
(benchmarks/moe_floor.py) runs the real library."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.triton import moe as km  # noqa: E402
from dsv4.kernels.vendor import humming_moe as hm  # noqa: E402
from dsv4.numerics.fp4 import quantize_fp4_blocks  # noqa: E402
from dsv4.numerics.fp8 import Fp8Dialect  # noqa: E402
from dsv4.ops.linear import linear_reference  # noqa: E402
from dsv4.ops.moe import moe_experts_reference  # noqa: E402
from dsv4.ops.moe_dispatch import ExpertMap  # noqa: E402
from dsv4.ops.registry import all_ops, resolve  # noqa: E402
from dsv4.platforms import detect  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
LIMIT = 1.5


class IndexedStandIn:
    """humming's indexed MoE GEMM for one stacked FP4 weight, in plain PyTorch."""

    calls: list = []

    def __init__(self, w, s, bm, a8=False):
        self.w, self.s, self.bm, self.a8 = w, s, bm, a8

    def block_m(self, rows):
        return self.bm

    def __call__(self, a, top_k, sorted_ids, expert_ids, num_padded, out, a_scale=None):
        rows = a.shape[0] * top_k
        if self.a8:  # FP8 e4m3 rows with fp32 scales per (row, 128)
            assert a.dtype == torch.float8_e4m3fn and a_scale.shape == (a.shape[0], a.shape[1] // 128)
            a = a.float() * a_scale.repeat_interleave(128, dim=1)
        else:
            assert a_scale is None and a.dtype in (torch.float32, torch.bfloat16)
        assert sorted_ids.dtype == torch.int32 and sorted_ids.numel() % self.bm == 0
        assert int(sorted_ids.min()) >= 0, "padding must be >= T k (humming has no -1 padding)"
        assert int(sorted_ids.max()) <= rows, "padding is T k exactly"
        out.fill_(float("nan"))
        n_blocks = int(num_padded.item()) // self.bm
        assert int(num_padded.item()) % self.bm == 0
        for b in range(n_blocks):
            e = int(expert_ids[b])
            assert 0 <= e < self.w.shape[0]
            for slot in sorted_ids[b * self.bm:(b + 1) * self.bm].tolist():
                if slot < rows:
                    out[slot] = linear_reference(a[slot // top_k][None], self.w[e], self.s[e]).to(out.dtype)[0]
        IndexedStandIn.calls.append((tuple(a.shape), top_k, self.bm, n_blocks, self.a8))
        return out


def stand_in(bm13, bm2):
    """The provider asks for the gate-up weight first, then the down weight."""
    made = []

    def gemm(w, s, a8=False):
        made.append(w)
        return IndexedStandIn(w, s, bm13 if len(made) % 2 == 1 else bm2, a8)
    return gemm


def experts(E, D, I, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = 0.3 * torch.randn(E, 2 * I, D, generator=g)
    w13 = w13 * torch.exp2(torch.randint(-2, 2, (E, 2 * I, D // 32), generator=g).float()).repeat_interleave(32, -1)
    w2 = 0.2 * torch.randn(E, D, I, generator=g)
    a, sa = quantize_fp4_blocks(w13, 32)
    b, sb = quantize_fp4_blocks(w2, 32)
    return a, sa, b, sb


def inputs(T, D, E, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[:, 0] = 2  # one expert gets every token
    x = torch.randn(T, D, generator=g).to(dtype)
    w = 0.2 + torch.rand(T, k, generator=g)
    return x, ids, w


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("T,bm13,bm2", [(1, 16, 16), (13, 16, 32), (40, 64, 16)])
def test_pipeline_equals_reference(T, bm13, bm2, act_quant):
    E, D, I, k = 8, 128, 64, 3
    w13, s13, w2, s2 = experts(E, D, I, seed=T)
    x, ids, w = inputs(T, D, E, k, seed=T + 1)
    IndexedStandIn.calls = []
    got = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, act_quant, gemm=stand_in(bm13, bm2))
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, act_quant)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    (a13, k13, b13, _, q13), (a2, k2, b2, _, q2) = IndexedStandIn.calls
    assert (a13, k13, b13) == ((T, D), k, bm13) and (a2, k2, b2) == ((T * k, I), 1, bm2)
    assert not q13 and not q2  # W4A16 unless asked (W4A8_MIN_ROWS)


@pytest.mark.parametrize("T", [1, 13])
def test_w4a8_pipeline_equals_reference(T):
    """W4A8: x and h quantised by the official 1x128 recipe into FP8 bytes + fp32 power-of-two scales (h
    quantised again after its round trip gives back the same values); plain numerics never take W4A8."""
    E, D, I, k = 8, 256, 128, 3
    w13, s13, w2, s2 = experts(E, D, I, seed=T + 10)
    x, ids, w = inputs(T, D, E, k, seed=T + 11)
    IndexedStandIn.calls = []
    got = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, gemm=stand_in(16, 32), a8=True)
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert [c[-1] for c in IndexedStandIn.calls] == [True, True]
    IndexedStandIn.calls = []
    hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, False, gemm=stand_in(16, 32), a8=True)
    assert [c[-1] for c in IndexedStandIn.calls] == [False, False]


def test_no_memory_for_the_copy_falls_back_to_triton():
    """prepared() returns None when the device cannot hold humming's copy: the call runs the Triton kernels
    (same result as the reference), never a half-converted pipeline."""
    E, D, I, k, T = 8, 128, 64, 2, 7
    w13, s13, w2, s2 = experts(E, D, I, seed=8)
    x, ids, w = inputs(T, D, E, k, seed=9)
    IndexedStandIn.calls = []
    got = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, gemm=lambda w_, s_, a8=False: None)
    torch.testing.assert_close(got, moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True).float(),
                               atol=1e-5, rtol=1e-5)
    assert IndexedStandIn.calls == []


def test_w4a8_scale_window():
    """The load-time check: scales of blocks with a nonzero code within W4A8_SCALE_WINDOW binades per row;
    an all-zero block's scale does not count; one row over the window fails the whole weight."""
    E, N, K = 2, 4, 128
    w = torch.randint(1, 256, (E, N, K // 2), dtype=torch.uint8)
    s = torch.full((E, N, K // 32), 120, dtype=torch.uint8)
    s[:, :, 0] = 120 - hm.W4A8_SCALE_WINDOW
    assert hm.scale_window_ok(w, s)
    s[1, 2, 3] = 121
    assert not hm.scale_window_ok(w, s)
    w[1, 2, 48:64] = 0  # the block with the high scale holds only zeros
    assert hm.scale_window_ok(w, s)


def test_pipeline_half_remote_and_fnuz():
    """Expert parallel (half the experts remote: their pairs are dispatched nowhere and add nothing), and
    act_quant in the fnuz dialect gives the OCP values exactly."""
    E, D, I, k, T = 8, 128, 64, 3, 17
    emap = ExpertMap(E, (1, 3, 5, 7))
    w13, s13, w2, s2 = experts(E, D, I, seed=3)
    loc = list(emap.local_ids)
    x, ids, w = inputs(T, D, E, k, seed=4)
    got = hm.moe_experts_humming(x, w13[loc], s13[loc], w2[loc], s2[loc], ids, w, LIMIT, True, Fp8Dialect.OCP, emap,
                                 gemm=stand_in(16, 16))
    want = moe_experts_reference(x, w13[loc], s13[loc], w2[loc], s2[loc], ids, w, LIMIT, True, Fp8Dialect.OCP, emap)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    fnuz = hm.moe_experts_humming(x, w13[loc], s13[loc], w2[loc], s2[loc], ids, w, LIMIT, True, Fp8Dialect.FNUZ, emap,
                                  gemm=stand_in(16, 16))
    assert torch.equal(fnuz, got)


def test_pipeline_bf16():
    E, D, I, k, T = 8, 128, 64, 2, 9
    w13, s13, w2, s2 = experts(E, D, I, seed=5)
    x, ids, w = inputs(T, D, E, k, seed=6, dtype=torch.bfloat16)
    got = hm.moe_experts_humming(x, w13, s13, w2, s2, ids, w, LIMIT, True, gemm=stand_in(16, 16))
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    d = (got.double() - want.double()).abs().max()
    assert d <= 1e-2 * want.double().abs().max()


def test_swiglu_rows_equals_reference_epilogue():
    """swiglu_rows == the reference's SwiGLU, routing weight, rounding and FP8 round trip of h, ragged I
    (a partial last 128-channel group), remote rows left untouched."""
    from dsv4.ops.moe import swiglu

    for I, aq in [(192, True), (64, True), (96, False)]:
        g = torch.Generator().manual_seed(I)
        T, k = 5, 2
        gu = (3 * torch.randn(T * k, 2 * I, generator=g)).bfloat16()
        ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 3]])
        emap = ExpertMap(4, (0, 1, 2))  # expert 3 remote
        rw = torch.rand(T, k, generator=g)
        out = torch.full((T * k, I), 7.0, dtype=torch.bfloat16)
        h = km.swiglu_rows(gu, ids, rw, emap, LIMIT, aq, Fp8Dialect.OCP, out=out)
        want = (swiglu(gu, LIMIT) * rw.reshape(-1, 1)).bfloat16()
        if aq:
            want = km.act_roundtrip(want.float(), Fp8Dialect.OCP).bfloat16()
        remote = (ids.reshape(-1) == 3)
        assert torch.equal(h[~remote], want[~remote]), I
        assert (h[remote] == 7.0).all()


def test_registered_skipped_on_cpu_and_delegates():
    op = all_ops()["moe_experts"]
    assert "humming" in op.providers and op.providers["humming"].priority > op.providers["triton"].priority
    choice = resolve(detect("cpu")).choices["moe_experts"]
    assert choice.provider == "torch" and dict(choice.skipped)["humming"].startswith("needs CUDA")
    E, D, I = 4, 128, 64
    w13, s13, w2, s2 = experts(E, D, I, seed=7)
    x = torch.randn(3, D)
    assert hm.delegate_reason(x, w13, w2) == "not on CUDA"
    assert hm.delegate_reason(x.to("meta"), w13, w2) == "not on CUDA"
    d = torch.empty(E, 2 * I, D)
    assert "not MXFP4" in (hm.delegate_reason_shapes(torch.bfloat16, d, d) or "")
    assert "multiples of 64" in hm.delegate_reason_shapes(torch.bfloat16, w13[:, :96], w2)
    assert hm.delegate_reason_shapes(torch.float32, w13, w2).startswith("activations")
    assert hm.delegate_reason_shapes(torch.bfloat16, w13, w2) is None
