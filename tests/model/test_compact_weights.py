"""Float32 dense weights the release stores in bf16 (the compressors' wkv / wgate and the MoE router's weight,
which the official code upcasts and multiplies in float32) are held in bf16 once loaded when every value is a bf16 value and the activations are
bf16 (model.linear.compact_dense_weights), and their projections ask `linear` for float32 results (out_dtype):
the same exact products, so the model computes the same values with half the bytes of those weights."""

import pytest
import torch
import torch.nn.functional as F

import dsv4.model.builder as builder
from dsv4.cache.direct import DirectCache
from dsv4.kernels.triton import gemm as kg
from dsv4.kernels.vendor import scaled_mm as ksm
from dsv4.model import build_model
from dsv4.model.builder import resolve_ops
from dsv4.model.compressor import Compressor
from dsv4.model.linear import Linear, compact_dense_weights
from dsv4.model.moe import Gate
from dsv4.model.options import ModelOptions
from dsv4.numerics.fp8 import Fp8Dialect, quantize_fp8_blocks
from dsv4.ops.linear import linear_reference
from dsv4.platforms import detect


def _opts(dtype=torch.bfloat16):
    return ModelOptions(dtype=dtype, numerics="official", fp8_dialect=Fp8Dialect.OCP, ops=resolve_ops(detect("cpu")),
                        device=torch.device("cpu"))


def _compressor_linears(model):
    return [lin for m in model.modules() if isinstance(m, Compressor) for lin in (m.wkv, m.wgate)]


def _gates(model):
    return [m for m in model.modules() if isinstance(m, Gate)]


def test_compact_only_exact_bf16_values_and_bf16_activations():
    g = torch.Generator().manual_seed(0)
    exact = Linear(256, 64, "dense", _opts(), fp8_gemm=False, dense_dtype=torch.float32, compact=True)
    inexact = Linear(256, 64, "dense", _opts(), fp8_gemm=False, dense_dtype=torch.float32, compact=True)
    not_marked = Linear(256, 64, "dense", _opts(), fp8_gemm=False, dense_dtype=torch.float32)
    w = torch.randn(64, 256, generator=g)
    exact.weight.copy_(w.bfloat16().float())
    inexact.weight.copy_(w)
    not_marked.weight.copy_(w.bfloat16().float())
    mods = torch.nn.ModuleList([exact, inexact, not_marked])
    assert compact_dense_weights(mods, torch.float32) == 0  # float32 activations: x is no bf16 value
    assert exact.weight.dtype == torch.float32
    assert compact_dense_weights(mods, torch.bfloat16) == 1
    assert exact.weight.dtype == torch.bfloat16 and torch.equal(exact.weight.float(), w.bfloat16().float())
    assert inexact.weight.dtype == torch.float32 and torch.equal(inexact.weight, w)  # never rounded
    assert not_marked.weight.dtype == torch.float32


@pytest.mark.parametrize("provider", ["reference", "triton", "scaled_mm"])
def test_linear_out_dtype_float32_sums_exact_products(provider):
    """bf16 x times a bf16 weight into float32: every provider gives the float32 sum of the exact products (bf16
    rounding of the result, 2^-9 relative, would fail the bound), and the same bits as the upcast matmul here."""
    fn = {"reference": linear_reference, "triton": kg.linear_triton, "scaled_mm": ksm.linear_scaled_mm}[provider]
    g = torch.Generator().manual_seed(1)
    for M in (1, 5, 33):
        x = torch.randn(M, 512, generator=g).bfloat16()
        w = (torch.randn(160, 512, generator=g) / 20).bfloat16()
        y = fn(x, w, None, False, Fp8Dialect.OCP, None, torch.float32)
        assert y.dtype == torch.float32 and y.shape == (M, 160)
        exact = x.double() @ w.double().t()
        assert float((y.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
        assert torch.equal(y, F.linear(x.float(), w.float()))
    y3 = fn(x.view(3, 11, 512), w, None, False, Fp8Dialect.OCP, None, torch.float32)  # leading dims kept
    assert y3.shape == (3, 11, 160) and torch.equal(y3.view(33, 160), y)


def test_linear_out_dtype_refused_where_it_means_nothing():
    wq, ws = quantize_fp8_blocks(torch.randn(128, 256), (128, 128), Fp8Dialect.OCP)
    x = torch.randn(2, 256)
    for fn in (linear_reference, kg.linear_triton):
        with pytest.raises(ValueError, match="out_dtype.*dense weights without act_quant.*fp8"):
            fn(x, wq.view(torch.float8_e4m3fn), ws, True, Fp8Dialect.OCP, None, torch.float32)
        with pytest.raises(ValueError, match="act_quant=True"):
            fn(x, torch.randn(8, 256), None, True, Fp8Dialect.OCP, None, torch.float32)


def test_tiny_model_compressors_held_in_bf16_same_outputs(tiny_dir, monkeypatch):
    """bf16 activations: the tiny release-format checkpoint's compressor weights and router weights (BF16 on disk)
    are held in bf16, fused groups included, and a prefill past CSA and HCA boundaries then decode steps give the logits of the same
    model with those weights in float32, bit for bit."""
    m = build_model(tiny_dir, device="cpu", dtype="bfloat16", numerics="official")
    lins = _compressor_linears(m.model)
    assert lins and all(lin.weight.dtype == torch.bfloat16 for lin in lins)
    groups = [a._xf_proj for a in m.model.modules() if getattr(a, "_xf_proj", None) is not None]
    assert groups and all(g.weight.dtype == torch.bfloat16 for g in groups)
    assert _gates(m.model) and all(g.weight.dtype == torch.bfloat16 for g in _gates(m.model))  # (the MTP's too)
    monkeypatch.setattr(builder, "compact_dense_weights", lambda net, dtype: 0)
    f32 = build_model(tiny_dir, device="cpu", dtype="bfloat16", numerics="official")
    assert all(lin.weight.dtype == torch.float32 for lin in _compressor_linears(f32.model))
    assert all(g.weight.dtype == torch.float32 for g in _gates(f32.model))
    caches = [DirectCache(m.cfg, 2, 160, "cpu", torch.bfloat16) for _ in range(2)]
    for dc in caches:
        assert dc.add() == 0
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, m.cfg.vocab_size, (140,), generator=gen)
    with torch.no_grad():
        outs = [lm.model.logits(lm.model(ids, dc.meta([0], [0], [140]), dc.cache)) for lm, dc in zip((m, f32), caches)]
        assert torch.equal(outs[0], outs[1])
        for pos in range(140, 146):
            t = torch.randint(0, m.cfg.vocab_size, (1,), generator=gen)
            outs = [lm.model.logits(lm.model(t, dc.meta([0], [pos], [1]), dc.cache)) for lm, dc in zip((m, f32), caches)]
            assert torch.equal(outs[0], outs[1]), pos


def test_compressor_projections_are_float32_products(tiny_dir):
    """What the compressors pool is the float32 product of the layer's input and their weights (the official
    math), not a bf16-rounded one: kv and score as the compress op receives them, against the upcast matmul."""
    m = build_model(tiny_dir, device="cpu", dtype="bfloat16", numerics="official")
    seen = []
    for a in m.model.modules():
        comps = [c for c in (getattr(a, "compressor", None), getattr(getattr(a, "indexer", None), "compressor", None))
                 if isinstance(c, Compressor)]
        if not comps or not hasattr(a, "_xf_proj"):
            continue
        a.register_forward_pre_hook(lambda mod, args: seen.append(("x", args[0])))
        for c in comps:
            real = c._compress
            c._compress = (lambda kv, score, *rest, c=c, real=real:
                           (seen.append((c, kv, score)), real(kv, score, *rest))[1])
    dc = DirectCache(m.cfg, 1, 40, "cpu", torch.bfloat16)
    dc.add()
    with torch.no_grad():
        m.model(torch.arange(3, 40), dc.meta([0], [0], [37]), dc.cache)
    checked = 0
    x = None
    for item in seen:
        if item[0] == "x":
            x = item[1]
            continue
        c, kv, score = item
        for got, lin in ((kv, c.wkv), (score, c.wgate)):
            want = F.linear(x.float(), lin.weight.float())
            assert got.dtype == torch.float32
            assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
            checked += 1
    assert checked >= 4


def test_float32_model_keeps_float32_compressor_weights(tiny_dir):
    m = build_model(tiny_dir, device="cpu", dtype="float32", numerics="official")
    assert all(lin.weight.dtype == torch.float32 for lin in _compressor_linears(m.model))
    assert all(g.weight.dtype == torch.float32 for g in _gates(m.model))


def test_dummy_compressor_weights_are_bf16_values(tiny_dir):
    """Dummy weights (benchmarks) are bf16 values where the release's are, so they are compacted as a real
    checkpoint's."""
    m = build_model(tiny_dir, device="cpu", dtype="bfloat16", load_format="dummy")
    lins = _compressor_linears(m.model)
    assert lins and all(lin.weight.dtype == torch.bfloat16 for lin in lins)
    assert _gates(m.model) and all(g.weight.dtype == torch.bfloat16 for g in _gates(m.model))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 300])
def test_gpu_bf16_weights_into_float32(M):
    """On the GPU the bf16 GEMM with a float32 result runs (probed), at the Flash CSA layer's fused compressor
    shape (2,560 x 4,096), within float32 summation error of the exact products."""
    dev = torch.device("cuda")
    assert kg._mm_out_dtype_ok(dev)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 4096, generator=g).bfloat16()
    w = (torch.randn(2560, 4096, generator=g) / 64).bfloat16()
    y = kg.linear_triton(x.to(dev), w.to(dev), None, False, Fp8Dialect.OCP, None, torch.float32).cpu()
    exact = x.double() @ w.double().t()
    assert y.dtype == torch.float32
    assert float((y.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
