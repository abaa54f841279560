"""The one-launch small-M FP8 linear (dsv4/kernels/triton/gemm_small_m.py) in the interpreter: against the
fp32 oracle of the exactly dequantised operands, and bit for bit against the general Triton path with the
same tiles and split (the quantiser in the prologue gives the standalone quantiser's FP8 values, the last
program's reduction sums the partials in the reduction kernel's order); one to sixteen rows, K and N off
the 128 block, several N tiles, split-K 1..several, both dialects, repeated calls (the tile counters reset
themselves), and what it refuses."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.triton import gemm as kg  # noqa: E402
from dsv4.kernels.triton import gemm_small_m as ks  # noqa: E402
from tests.ops.test_gemm_triton import FNUZ, OCP, acts, exact_fp32, fp8_weight  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")


@pytest.mark.parametrize("M,N,K,bn,split", [(1, 200, 384, 64, 3), (3, 96, 300, 32, 2), (16, 330, 256, 64, 1),
                                            (5, 1000, 512, 128, 4), (2, 64, 128, None, None)])
@pytest.mark.parametrize("dialect", [OCP, FNUZ])
def test_small_m_equals_the_general_path_and_the_oracle(M, N, K, bn, split, dialect):
    w, s = fp8_weight(N, K, seed=M + N, dialect=dialect)
    x = acts(M, K, seed=K)
    got = ks.linear_small_m(x, w, s, True, block_n=bn, split_k=split)
    cfg = kg._pick_tiles(M, N, K, 1, 1.0, 132, False)
    same = kg.linear_impl(x, w, s, True, block_n=bn or cfg["block_n"], split_k=split or cfg["split_k"])
    assert torch.equal(got, same)
    want = exact_fp32(x, w, s, True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
    again = ks.linear_small_m(x, w, s, True, block_n=bn, split_k=split)  # the counters were reset
    assert torch.equal(again, got)
    assert int(ks._COUNTERS[x.device].abs().sum()) == 0


def test_small_m_bf16_activations_three_dims():
    w, s = fp8_weight(256, 256, seed=1)
    x = acts(4, 256, seed=2).reshape(2, 2, 256).bfloat16()
    got = ks.linear_small_m(x, w, s, True, split_k=2)
    assert got.shape == (2, 2, 256) and got.dtype == torch.bfloat16
    want = exact_fp32(x.reshape(4, 256), w, s, True).reshape(2, 2, 256)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_refusals_and_the_provider_fallback():
    w, s = fp8_weight(128, 256, seed=3)
    x = acts(17, 256, seed=4)
    assert "M = 17" in ks.small_m_reason(x, w, s, True)
    assert "plain" in ks.small_m_reason(x[:2], w, s, False)
    with pytest.raises(ValueError, match="M = 17"):
        ks.linear_small_m(x, w, s, True)
    # the provider hands the call to the general path outside its range
    torch.testing.assert_close(ks.linear_triton_small_m(x, w, s, True), kg.linear_triton(x, w, s, True))
    torch.testing.assert_close(ks.linear_triton_small_m(x[:2], w, s, False), kg.linear_triton(x[:2], w, s, False))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(1536, 4096), (32768, 1024), (4096, 8192), (129280, 4096)])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_small_m_bit_exact_under_concurrency_and_graphs(M, N, K):
    """Compiled, programs really concurrent: the last-program reduction equals the general path (same
    tiles, same split, the reduction kernel) bit for bit, on every call and in CUDA-graph replays (the
    counters reset themselves)."""
    dev = torch.device("cuda")
    w, s = fp8_weight(N, K, seed=N % 97)
    w, s = w.to(dev), s.to(dev)
    x = acts(M, K, seed=M).to(dev).bfloat16()
    cfg = kg._pick_tiles(M, N, K, 1, 1.0, kg._facts(dev)[1], False)
    want = kg.linear_impl(x, w, s, True, block_n=cfg["block_n"], split_k=cfg["split_k"])
    for _ in range(3):
        assert torch.equal(ks.linear_small_m(x, w, s, True), want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ks.linear_small_m(x, w, s, True)
    for _ in range(3):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    assert int(ks._COUNTERS[x.device].abs().sum()) == 0
