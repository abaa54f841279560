"""LinearGroup (model/linear.py): linears of one input fused into one GEMM after loading. The fused
outputs equal the members' own (FP8 with padding to whole 128-row scale blocks, FP4, dense; plain and
official numerics), the members' buffers become views of the fused tensor with unchanged values, a
member replaced afterwards is refused, and the tiny model gives the same logits fused and unfused."""

import pytest
import torch

import dsv4.model.builder as builder
from dsv4.model import build_model
from dsv4.model.builder import resolve_ops
from dsv4.model.linear import Linear, LinearGroup, fuse_linear_groups
from dsv4.model.options import ModelOptions
from dsv4.numerics.fp8 import Fp8Dialect, quantize_fp8_blocks
from dsv4.platforms import detect
from tests.oracle import generate


def _members(fmt: str, official: bool, sizes=(96, 200, 128), K=256, seed=0):
    opts = ModelOptions(dtype=torch.float32, numerics="official" if official else "plain",
                        fp8_dialect=Fp8Dialect.OCP, ops=resolve_ops(detect("cpu")), device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        lin = Linear(K, n, fmt, opts, dense_dtype=torch.float32)
        w = torch.randn(n, K, generator=g) / K ** 0.5
        if fmt == "fp8":
            q, s = quantize_fp8_blocks(w, (128, 128), Fp8Dialect.OCP)
            lin.weight.copy_(q.view(torch.float8_e4m3fn))
            lin.scale.copy_(s)
        elif fmt == "fp4":
            lin.weight.copy_(torch.randint(0, 256, lin.weight.shape, generator=g, dtype=torch.uint8))
            lin.scale.copy_(torch.randint(120, 130, lin.scale.shape, generator=g, dtype=torch.uint8))
        else:
            lin.weight.copy_(w)
        out.append(lin)
    return out


@pytest.mark.parametrize("fmt,official", [("fp8", True), ("fp8", False), ("fp4", False), ("dense", False)])
def test_fused_outputs_equal_the_members(fmt, official):
    members = _members(fmt, official)
    before = [(m.weight.clone(), None if m.scale is None else m.scale.clone()) for m in members]
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    want = [m(x) for m in members]
    grp = LinearGroup(*members)
    assert grp.fuse()
    got = grp(x)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    base = grp.weight.untyped_storage().data_ptr()
    for m, (w0, s0) in zip(members, before):  # views of the fused tensor, same values
        assert m.weight.untyped_storage().data_ptr() == base
        assert torch.equal(m.weight.view(torch.uint8) if fmt == "fp8" else m.weight,
                           w0.view(torch.uint8) if fmt == "fp8" else w0)
        if s0 is not None:
            assert torch.equal(m.scale, s0)
    if fmt == "fp8":  # 96 and 200 rows padded to 128 and 256: the members start on scale-block boundaries
        assert grp.spans == [(0, 96), (128, 328), (384, 512)] and not grp.contiguous
    torch.testing.assert_close(grp.joined(x), torch.cat(want, dim=-1), rtol=1e-5, atol=1e-5)


def test_a_replaced_member_is_refused():
    members = _members("dense", False, sizes=(64, 32))
    grp = LinearGroup(*members)
    assert grp.fuse() and grp.contiguous
    members[1].weight = members[1].weight.clone()  # e.g. a weight update after loading
    with pytest.raises(RuntimeError, match="replaced after the group was"):
        grp(torch.randn(2, 256))
    fp8 = _members("fp8", True, sizes=(128, 128))
    grp = LinearGroup(*fp8)
    assert grp.fuse()
    fp8[0].scale = fp8[0].scale.clone()  # a scale alone replaced is refused too
    with pytest.raises(RuntimeError, match="weight or scale"):
        grp(torch.randn(2, 256))
    assert grp.fuse()  # fusing again takes the members as they are now
    torch.testing.assert_close(grp(torch.ones(2, 256))[0], fp8[0](torch.ones(2, 256)))


def test_members_that_differ_are_not_fused():
    a = _members("dense", False, sizes=(64,))[0]
    b = _members("fp8", False, sizes=(128,))[0]
    grp = LinearGroup(a, b)
    assert grp.fusable() is not None and not grp.fuse()
    x = torch.randn(3, 256)
    torch.testing.assert_close(grp(x)[0], a(x))


@pytest.mark.parametrize("numerics", ["official", "plain"])
def test_tiny_model_same_tokens_fused_and_unfused(tiny_dir, monkeypatch, numerics):
    fused = build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics)
    monkeypatch.setattr(builder, "fuse_linear_groups", lambda net: 0)
    plain = build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics)
    assert fuse_linear_groups(plain.model) > 0  # the tiny model has groups to fuse (counted on the copy)
    plain = build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics)
    assert all(g.weight is None for m in plain.model.modules() for g in vars(m).values()
               if isinstance(g, LinearGroup))
    prompts = [list(range(3, 140)), [7, 9, 11]]
    a = generate(fused, prompts, max_tokens=6, temperature=0)
    b = generate(plain, prompts, max_tokens=6, temperature=0)
    for x, y in zip(a.outputs, b.outputs):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
