"""The opt-in W4A8 MoE provider (dsv4/kernels/triton/moe_w4a8.py) in the interpreter against the reference with
official numerics (act_quant): MXFP4 experts whose sub-block scales vary (offsets in use), skewed routing (an
expert with no token, one with one, one with every token), one token, several K blocks and N tiles, both FP8
dialects, bf16 activations, an expert map with remote experts, padding rows poisoned, and the delegations to the
Triton provider (no act_quant, an out-of-window weight) with their log lines."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.triton import moe as km
from dsv4.kernels.triton import moe_w4a8 as kw
from dsv4.numerics.fp4 import quantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.moe import moe_experts_reference
from dsv4.ops.moe_dispatch import ExpertMap
from dsv4.ops.registry import all_ops

OCP, FNUZ = Fp8Dialect.OCP, Fp8Dialect.FNUZ
LIMIT = 1.5


def experts(E: int, D: int, I: int, seed: int, spread: int = 4):
    """MXFP4 w13 [E, 2I, D/2] / w2 [E, D, I/2] with 32-block magnitudes 2^-spread .. 2^spread (offsets used)."""
    g = torch.Generator().manual_seed(seed)
    w13 = 0.3 * torch.randn(E, 2 * I, D, generator=g)
    w2 = 0.2 * torch.randn(E, D, I, generator=g)

    def mag(*shape):  # a power of two per 32-block
        return torch.exp2(torch.randint(-spread, spread + 1, shape, generator=g).float()).repeat_interleave(32, -1)

    w13 = w13 * mag(E, 2 * I, D // 32)
    w2 = w2 * mag(E, D, I // 32)
    a, sa = quantize_fp4_blocks(w13)
    b, sb = quantize_fp4_blocks(w2)
    return a, sa, b, sb


def skewed(T: int, E: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(E - 3, generator=g)[:2] + 3 for _ in range(T)])
    ids = torch.cat([torch.full((T, 1), 2), ids], dim=1)  # expert 2: every token
    ids[T // 2, 1] = 1  # expert 1: one token; expert 0: none
    return ids


def inputs(T: int, D: int, ids: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g) * 2.0, 0.2 + torch.rand(ids.shape, generator=g)


def test_registered_opt_in():
    p = all_ops()["moe_experts"].providers
    assert "triton_w4a8" in p and p["triton_w4a8"].priority < p["triton"].priority


@pytest.mark.parametrize("dialect", [OCP, FNUZ], ids=["ocp", "fnuz"])
@pytest.mark.parametrize("T", [1, 13])
def test_matches_reference(T, dialect):
    """fp32 activations: the products are exact (FP8 x FP8 values), only the fp32 summation order differs."""
    E, D, I = 8, 256, 256
    ids = skewed(T, E) if T > 1 else torch.tensor([[4, 0, 7]])
    w13, s13, w2, s2 = experts(E, D, I, seed=T)
    x, w = inputs(T, D, ids, seed=T + 1)
    got = kw.moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True, dialect)
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, LIMIT, True, dialect)
    assert got.dtype == torch.float32 and got.shape == (T, D)
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_bf16_activations_and_poisoned_padding():
    """bf16 x: close to the bf16 reference; the h / y workspaces filled with NaN (rows of padding and of other
    blocks) never reach the output."""
    E, D, I = 6, 128, 384
    ids = skewed(11, E)
    w13, s13, w2, s2 = experts(E, D, I, seed=7)
    x, w = inputs(11, D, ids, seed=8)
    xb = x.to(torch.bfloat16)
    from dsv4.ops.moe_dispatch import dispatch_sizes

    mb, mr = dispatch_sizes(ids.numel(), E, 16)
    h_buf = (torch.full((mr, I), 0x7F, dtype=torch.uint8), torch.full((mr, I // 128), 255, dtype=torch.uint8))  # NaN
    y_buf = torch.full((ids.numel(), D), float("nan"), dtype=torch.bfloat16)
    got = kw.moe_experts_w4a8_impl(xb, w13, s13, w2, s2, ids, w, LIMIT, True, OCP, block_m=16, h_buf=h_buf,
                                   y_buf=y_buf)
    want = moe_experts_reference(xb, w13, s13, w2, s2, ids, w, LIMIT, True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.float(), atol=3e-2 * float(want.abs().max()), rtol=3e-2)
    tri = km.moe_experts_triton(xb, w13, s13, w2, s2, ids, w, LIMIT, True)
    assert (got - tri).abs().max() <= 0.02 * tri.abs().max()


def test_expert_map_with_remote_experts():
    E, D, I = 8, 128, 128
    ids = skewed(9, E)
    w13, s13, w2, s2 = experts(E, D, I, seed=9)
    x, w = inputs(9, D, ids, seed=10)
    emap = ExpertMap(E, (6, 2, 5, 0))
    loc = list(emap.local_ids)
    got = kw.moe_experts_w4a8_impl(x, w13[loc], s13[loc], w2[loc], s2[loc], ids, w, LIMIT, True, OCP, emap)
    is_local = torch.isin(ids, torch.tensor(loc))
    want = moe_experts_reference(x, w13, s13, w2, s2, ids, w * is_local, LIMIT, True)
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_delegations_are_logged_and_exact(caplog):
    """Calls the W4A8 kernels do not serve go to the Triton provider, with a log line naming why: no act_quant;
    a weight with a 128-block outside the window (also counted by the preparation)."""
    E, D, I = 4, 128, 128
    ids = skewed(5, E)
    w13, s13, w2, s2 = experts(E, D, I, seed=11)
    x, w = inputs(5, D, ids, seed=12)
    kw._WARNED.clear()
    with caplog.at_level("WARNING"):
        got = kw.moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, LIMIT, False)
    assert torch.equal(got, km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, False))
    assert "act_quant" in caplog.text and "Triton provider" in caplog.text
    s13b = s13.clone()
    s13b[1, 3, 0] = s13b[1, 3, 1] + 20  # expert 1: one 32-block 20 binades above its neighbours
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = kw.moe_experts_w4a8_impl(x, w13, s13b, w2, s2, ids, w, LIMIT, True)
    assert torch.equal(got, km.moe_experts_triton(x, w13, s13b, w2, s2, ids, w, LIMIT, True))
    assert "1 of" in caplog.text and "[1]" in caplog.text and "outside the exact FP8 window" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_gpu_compiled(T):
    """Compiled with FP8 dots on the tensor cores where the GPU has them, bf16 activations, Flash-like widths."""
    E, D, I = 32, 1024, 512
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:6] for _ in range(T)])
    w13, s13, w2, s2 = [t.cuda() for t in experts(E, D, I, seed=T, spread=3)]
    x, w = inputs(T, D, ids, seed=T + 1)
    x, w, ids = x.to(torch.bfloat16).cuda(), w.cuda(), ids.cuda()
    got = kw.moe_experts_w4a8_impl(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    want = km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, True)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.gpu
def test_gpu_graph_capture():
    """The provider in a CUDA graph: weights not yet prepared -> the capture is served by the Triton provider
    (no host read inside the capture); prepared by an eager call -> the captured W4A8 kernels replayed at a new
    routing equal the eager call bit for bit."""
    E, D, I, T = 32, 1024, 512, 512  # 96 rows per expert: the W4A8 regime
    g = torch.Generator().manual_seed(0)
    w13, s13, w2, s2 = [t.cuda() for t in experts(E, D, I, seed=3, spread=3)]
    x, w = inputs(T, D, torch.zeros(T, 6), seed=4)
    x, w = x.to(torch.bfloat16).cuda(), w.cuda()
    ids = torch.stack([torch.randperm(E, generator=g)[:6] for _ in range(T)]).cuda()

    def run():
        return kw.moe_experts_triton_w4a8(x, w13, s13, w2, s2, ids, w, LIMIT, True)

    def capture():
        st = torch.cuda.Stream()
        with torch.cuda.stream(st):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=st):
                out = run()
        torch.cuda.synchronize()
        return graph, out

    kw._PREPARED.clear()
    km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, True)  # compile the Triton provider's kernels
    graph, out = capture()
    graph.replay()
    assert torch.equal(out, km.moe_experts_triton(x, w13, s13, w2, s2, ids, w, LIMIT, True))
    eager = run()  # prepares
    assert not torch.equal(eager, out)  # the W4A8 kernels (FP8 MMA), not the Triton provider's
    graph, out = capture()
    ids.copy_(torch.stack([torch.randperm(E, generator=g)[:6] for _ in range(T)]).cuda())
    graph.replay()
    assert torch.equal(out, run())


def test_registered_provider_hands_small_batches_to_triton(monkeypatch):
    """On a compiled GPU run the registered provider sends calls with < 64 rows per expert, or without the PTX
    conversion, to the Triton provider, and the others to the W4A8 kernels (devices faked: the regime rule
    itself, which the interpreter never exercises)."""
    called = []
    monkeypatch.setattr(kw, "interpreting", lambda dev: False)
    monkeypatch.setattr(kw, "moe_experts_triton", lambda *a, **k: called.append("triton"))
    monkeypatch.setattr(kw, "moe_experts_w4a8_impl", lambda *a, **k: called.append("w4a8"))
    E = 8
    w13 = torch.zeros(E, 4, 2, dtype=torch.uint8)
    x = torch.zeros(1, 4)
    for asm, T, want in ((True, 64 * E // 2 - 1, "triton"), (True, 64 * E // 2, "w4a8"), (False, 4096, "triton")):
        monkeypatch.setattr(kw, "fp4_asm_supported", lambda dev, a=asm: a)
        ids = torch.zeros(T, 2, dtype=torch.int64)
        kw.moe_experts_triton_w4a8(x, w13, None, None, None, ids, None, LIMIT, True)
        assert called[-1] == want, (asm, T)


def test_sm90_build_keeps_fp8_wgmma_and_a_short_loop():
    """Compiled for sm_90a on this machine (Triton's bundled ptxas / nvdisasm, benchmarks/kernel_sass.py, in a
    process without the interpreter): the down kernel multiplies on FP8 wgmma, does not spill, and its K loop
    stays far below what the per-code integer conversion costs (3,566 SASS per 128-block with it, ~740 with
    the PTX one)."""
    import json
    import os
    import subprocess
    import sys

    import triton

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    if not os.access(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"), os.X_OK):
        pytest.skip("Triton's bundled ptxas is not available")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root)
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_sass.py"), "moe_w4a8",
                        "bm=64,bn=128,warps=4,stages=3,asm=1", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])["down"]
    assert any("wgmma" in m and "e4m3.e4m3" in m for m in r["mma"]), r["mma"]
    assert r["spill_store_bytes"] == 0
    assert r["loops"] and r["loops"][-1]["instructions"] < 1200, r["loops"][-1]
