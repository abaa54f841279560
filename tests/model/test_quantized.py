"""Quantised checkpoints: the FP8 / FP4 path equals dequantise-then-reference; a checkpoint converted to
the fnuz dialect and run as fnuz gives the OCP logits; bytes read in the wrong dialect are caught."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.cache.direct import DirectCache
from dsv4.model import build_model
from dsv4.model import builder as builder_mod
from dsv4.numerics.fp4 import dequantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, ocp_to_fnuz
from dsv4.platforms.cpu import cpu_platform

N = 150  # crosses a 128-token HCA window and the 128-token sliding window


def _rewrite(src, dst, fn, config_fn=None):
    """Copy checkpoint `src` to `dst`, passing every shard's tensors through fn(dict) -> dict."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = fn(tensors)
        save_file(tensors, str(dst / shard))
        new_map.update({k: shard for k in tensors})
    index["weight_map"] = new_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    if config_fn:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config_fn(cfg)))
    return dst


def _dequantise(tensors):
    out = {}
    for k, v in tensors.items():
        if k.endswith(".scale"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = dequantize_fp8_blocks(v, tensors[k[:-6] + "scale"], (128, 128))
        elif v.dtype == torch.int8:
            out[k] = dequantize_fp4_blocks(v, tensors[k[:-6] + "scale"], 32)
        else:
            out[k] = v
    return out


def _to_fnuz(tensors):
    out = dict(tensors)
    for k, v in tensors.items():
        if v.dtype == torch.float8_e4m3fn:
            w, s = ocp_to_fnuz(v, tensors[k[:-6] + "scale"])
            out[k] = w.view(torch.float8_e4m3fnuz)
            out[k[:-6] + "scale"] = s.view(torch.float8_e8m0fnu)
    return out


def _drop_quant(cfg):
    cfg.pop("quantization_config", None)
    cfg.pop("expert_dtype", None)
    return cfg


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 129280, (N,), generator=torch.Generator().manual_seed(0))


def logits_of(lm, ids, chunks=(N,)):
    dc = DirectCache(lm.cfg, 1, N, "cpu", torch.float32)
    s = dc.add()
    out, p = [], 0
    with torch.no_grad():
        for c in chunks:
            out.append(lm.model.logits(lm.model(ids[p:p + c], dc.meta([s], [p], [c]), dc.cache)))
            p += c
    return torch.cat(out)


@pytest.fixture
def fnuz_platform(monkeypatch):
    p = cpu_platform()
    fnuz = type(p)(**{**p.__dict__, "fp8_dialect": Fp8Dialect.FNUZ})
    monkeypatch.setattr(builder_mod, "detect", lambda device=None: fnuz)
    return fnuz


@pytest.mark.parametrize("numerics", ["plain", "official"])
def test_quantised_equals_dequantised_reference(tiny_dir, tmp_path, ids, numerics):
    dense_dir = _rewrite(tiny_dir, tmp_path / "dense", _dequantise, _drop_quant)
    q = build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics)
    d = build_model(dense_dir, device="cpu", dtype="float32", numerics=numerics)
    assert q.model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert q.model.layers[0].ffn.experts.w13.dtype == torch.uint8
    assert d.model.layers[0].attn.wq_a.weight.dtype == torch.float32
    err = (logits_of(q, ids) - logits_of(d, ids)).abs().max().item()
    assert err <= 1e-5, f"{numerics}: quantised vs dequantised max |diff| {err:.2e}"


@pytest.mark.parametrize("numerics", ["plain", "official"])
def test_fnuz_checkpoint_on_fnuz_platform_gives_ocp_logits(tiny_dir, tmp_path, ids, numerics, monkeypatch):
    ocp = logits_of(build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics), ids)
    fnuz_dir = _rewrite(tiny_dir, tmp_path / "fnuz", _to_fnuz)
    with safe_open(str(next(fnuz_dir.glob("model-00001-*"))), "pt") as f:
        assert f.get_slice("layers.0.attn.wq_a.weight").get_dtype() == "F8_E4M3FNUZ"
    p = cpu_platform()
    monkeypatch.setattr(builder_mod, "detect", lambda device=None: type(p)(**{**p.__dict__,
                                                                              "fp8_dialect": Fp8Dialect.FNUZ}))
    lm = build_model(fnuz_dir, device="cpu", dtype="float32", numerics=numerics)
    assert lm.model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fnuz
    err = (logits_of(lm, ids) - ocp).abs().max().item()
    assert err <= 1e-5, f"{numerics}: fnuz vs OCP max |diff| {err:.2e}"


def test_ocp_checkpoint_converted_at_load_for_fnuz(tiny_dir, ids, fnuz_platform, monkeypatch):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="official")
    assert lm.model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fnuz
    monkeypatch.setattr(builder_mod, "detect", lambda device=None: cpu_platform())
    ref = build_model(tiny_dir, device="cpu", dtype="float32", numerics="official")
    err = (logits_of(lm, ids) - logits_of(ref, ids)).abs().max().item()
    assert err <= 1e-5, f"OCP checkpoint run as fnuz: max |diff| {err:.2e}"


def test_wrong_dialect_is_caught(tiny_dir, tmp_path, ids):
    """fnuz bytes labelled as OCP (the bug class 'FP8 read in the wrong dialect') load as values twice
    the truth; the logits comparison must fail by a wide margin."""
    ref = logits_of(build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain"), ids)

    def mislabel(tensors):
        out = _to_fnuz(tensors)
        return {k: (v.view(torch.float8_e4m3fn) if v.dtype == torch.float8_e4m3fnuz else v) for k, v in out.items()}

    bad = build_model(_rewrite(tiny_dir, tmp_path / "bad", mislabel), device="cpu", dtype="float32", numerics="plain")
    w_bad = bad.model.layers[0].attn.wq_a
    good = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain").model.layers[0].attn.wq_a
    from dsv4.ops.linear import dequantize_weight
    ratio = dequantize_weight(w_bad.weight, w_bad.scale) / dequantize_weight(good.weight, good.scale)
    assert torch.allclose(ratio[ratio.isfinite()], torch.tensor(2.0))
    err = (logits_of(bad, ids) - ref).abs().max().item()
    assert err > 1e-1, f"wrong-dialect checkpoint was not detectable (max |diff| {err:.2e})"


def test_official_numerics_differ_but_stay_close(tiny_dir, ids):
    """The simulation is real (official != plain) and small (same model)."""
    a = logits_of(build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain"), ids[:40], (40,))
    b = logits_of(build_model(tiny_dir, device="cpu", dtype="float32", numerics="official"), ids[:40], (40,))
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < rel < 0.2, f"official vs plain relative difference {rel:.2e}"
