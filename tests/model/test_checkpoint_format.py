"""official_tensors: the release's tensor inventory derived from a config (spec §3.2-3.5). For the Flash
config it must reproduce the release exactly: 69,187 tensors, 159,609,485,896 bytes, the dtype counts
and the per-component byte totals; for the Pro config the published 145,116 tensors / 864,704,792,696
bytes."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from dsv4.config import ModelConfig
from dsv4.model.checkpoint_format import official_tensors


def _flash_dict() -> dict:
    return json.loads(resources.files("dsv4.configs").joinpath("deepseek-v4-flash.json").read_text())


@pytest.fixture(scope="module")
def flash_cfg() -> ModelConfig:
    return ModelConfig.from_dict(_flash_dict())


@pytest.fixture(scope="module")
def specs(flash_cfg):
    return official_tensors(flash_cfg)


@pytest.fixture(scope="module")
def by_name(specs):
    return {s.name: s for s in specs}


def test_flash_totals(specs):
    assert len(specs) == 69_187
    assert len({s.name for s in specs}) == len(specs)  # no duplicate names
    assert sum(s.nbytes for s in specs) == 159_609_485_896
    assert Counter(s.dtype for s in specs) == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167,
                                               "I64": 3, "I8": 33_792}
    assert sum(s.name.startswith("mtp.0.") for s in specs) == 1_575
    assert not any(s.name.startswith("mtp.1.") for s in specs)


def test_flash_bytes_per_component(specs):
    """Spec §3.5, byte for byte."""
    main = [s for s in specs if not s.name.startswith("mtp.")]

    def total(pred):
        return sum(s.nbytes for s in main if pred(s.name))

    assert total(lambda n: ".ffn.experts." in n) == 147_169_738_752
    assert total(lambda n: ".attn." in n and ".compressor." not in n and ".indexer." not in n) == 4_599_478_144
    assert total(lambda n: ".attn.compressor." in n) == 525_722_624
    assert total(lambda n: ".attn.indexer." in n) == 275_353_344
    assert total(lambda n: ".shared_experts." in n) == 1_082_196_480
    assert total(lambda n: ".ffn.gate." in n) == 108_834_816
    assert total(lambda n: "hc_" in n) == 135_537_756
    assert total(lambda n: n.endswith(("attn_norm.weight", "ffn_norm.weight")) or n == "norm.weight") == 712_704
    assert total(lambda n: n == "embed.weight") == total(lambda n: n == "head.weight") == 1_059_061_760
    assert total(lambda n: True) == 156_015_698_140
    # one routed expert: 12,582,912 packed bytes + 786,432 scale bytes
    assert total(lambda n: n.startswith("layers.7.ffn.experts.31.")) == 13_369_344


def test_flash_file_order(specs):
    names = [s.name for s in specs]
    assert names[0] == "embed.weight"
    first_mtp = next(i for i, n in enumerate(names) if n.startswith("mtp."))
    assert names[first_mtp - 1] == "head.weight"
    assert all(n.startswith("mtp.0.") for n in names[first_mtp:])
    layer_ids = [int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d+)\.", n))]
    assert layer_ids == sorted(layer_ids) and set(layer_ids) == set(range(43))


# (name, shape, dtype) from spec §3.2
SPOT = [
    ("embed.weight", (129280, 4096), "BF16"),
    ("head.weight", (129280, 4096), "BF16"),
    ("norm.weight", (4096,), "BF16"),
    ("hc_head_fn", (4, 16384), "F32"),
    ("hc_head_base", (4,), "F32"),
    ("hc_head_scale", (1,), "F32"),
    ("layers.0.hc_attn_fn", (24, 16384), "F32"),
    ("layers.0.hc_ffn_base", (24,), "F32"),
    ("layers.0.hc_attn_scale", (3,), "F32"),
    ("layers.0.attn_norm.weight", (4096,), "BF16"),
    ("layers.0.attn.attn_sink", (64,), "F32"),
    ("layers.0.attn.wq_a.weight", (1024, 4096), "F8_E4M3"),
    ("layers.0.attn.wq_a.scale", (8, 32), "F8_E8M0"),
    ("layers.0.attn.q_norm.weight", (1024,), "BF16"),
    ("layers.0.attn.wq_b.weight", (32768, 1024), "F8_E4M3"),
    ("layers.0.attn.wq_b.scale", (256, 8), "F8_E8M0"),
    ("layers.0.attn.wkv.weight", (512, 4096), "F8_E4M3"),
    ("layers.0.attn.wkv.scale", (4, 32), "F8_E8M0"),
    ("layers.0.attn.kv_norm.weight", (512,), "BF16"),
    ("layers.0.attn.wo_a.weight", (8192, 4096), "F8_E4M3"),
    ("layers.0.attn.wo_a.scale", (64, 32), "F8_E8M0"),
    ("layers.0.attn.wo_b.weight", (4096, 8192), "F8_E4M3"),
    ("layers.0.attn.wo_b.scale", (32, 64), "F8_E8M0"),
    ("layers.0.ffn.gate.weight", (256, 4096), "BF16"),
    ("layers.0.ffn.gate.tid2eid", (129280, 6), "I64"),
    ("layers.3.ffn.gate.bias", (256,), "F32"),
    ("layers.0.ffn.shared_experts.w1.weight", (2048, 4096), "F8_E4M3"),
    ("layers.0.ffn.shared_experts.w1.scale", (16, 32), "F8_E8M0"),
    ("layers.0.ffn.shared_experts.w2.weight", (4096, 2048), "F8_E4M3"),
    ("layers.0.ffn.shared_experts.w2.scale", (32, 16), "F8_E8M0"),
    ("layers.42.ffn.experts.255.w1.weight", (2048, 2048), "I8"),
    ("layers.42.ffn.experts.255.w1.scale", (2048, 128), "F8_E8M0"),
    ("layers.0.ffn.experts.0.w3.weight", (2048, 2048), "I8"),
    ("layers.0.ffn.experts.0.w2.weight", (4096, 1024), "I8"),
    ("layers.0.ffn.experts.0.w2.scale", (4096, 64), "F8_E8M0"),
    # CSA compressor (overlapping windows: twice the width) and HCA compressor
    ("layers.2.attn.compressor.ape", (4, 1024), "F32"),
    ("layers.2.attn.compressor.wkv.weight", (1024, 4096), "BF16"),
    ("layers.2.attn.compressor.wgate.weight", (1024, 4096), "BF16"),
    ("layers.2.attn.compressor.norm.weight", (512,), "BF16"),
    ("layers.3.attn.compressor.ape", (128, 512), "F32"),
    ("layers.3.attn.compressor.wkv.weight", (512, 4096), "BF16"),
    ("layers.3.attn.compressor.wgate.weight", (512, 4096), "BF16"),
    ("layers.41.attn.compressor.norm.weight", (512,), "BF16"),
    # indexer (CSA layers)
    ("layers.2.attn.indexer.wq_b.weight", (8192, 1024), "F8_E4M3"),
    ("layers.2.attn.indexer.wq_b.scale", (64, 8), "F8_E8M0"),
    ("layers.42.attn.indexer.weights_proj.weight", (64, 4096), "BF16"),
    ("layers.2.attn.indexer.compressor.ape", (4, 256), "F32"),
    ("layers.2.attn.indexer.compressor.wkv.weight", (256, 4096), "BF16"),
    ("layers.2.attn.indexer.compressor.wgate.weight", (256, 4096), "BF16"),
    ("layers.2.attn.indexer.compressor.norm.weight", (128,), "BF16"),
    # MTP
    ("mtp.0.e_proj.weight", (4096, 4096), "F8_E4M3"),
    ("mtp.0.e_proj.scale", (32, 32), "F8_E8M0"),
    ("mtp.0.h_proj.weight", (4096, 4096), "F8_E4M3"),
    ("mtp.0.h_proj.scale", (32, 32), "F8_E8M0"),
    ("mtp.0.enorm.weight", (4096,), "BF16"),
    ("mtp.0.hnorm.weight", (4096,), "BF16"),
    ("mtp.0.norm.weight", (4096,), "BF16"),
    ("mtp.0.hc_head_fn", (4, 16384), "F32"),
    ("mtp.0.hc_head_base", (4,), "F32"),
    ("mtp.0.hc_head_scale", (1,), "F32"),
    ("mtp.0.ffn.gate.bias", (256,), "F32"),
    ("mtp.0.attn.wq_b.weight", (32768, 1024), "F8_E4M3"),
    ("mtp.0.ffn.experts.255.w2.weight", (4096, 1024), "I8"),
]


@pytest.mark.parametrize("name,shape,dtype", SPOT, ids=[s[0] for s in SPOT])
def test_flash_spot_shapes(by_name, name, shape, dtype):
    s = by_name[name]
    assert (s.shape, s.dtype) == (shape, dtype)


def test_flash_per_layer_structure(by_name):
    for i in range(43):
        p = f"layers.{i}."
        csa, hca = i >= 2 and i % 2 == 0, i >= 3 and i % 2 == 1
        assert (p + "attn.compressor.ape" in by_name) == (csa or hca), i
        assert (p + "attn.indexer.wq_b.weight" in by_name) == csa, i
        assert (p + "attn.indexer.compressor.ape" in by_name) == csa, i
        if csa or hca:
            assert by_name[p + "attn.compressor.ape"].shape == ((4, 1024) if csa else (128, 512))
        assert (p + "ffn.gate.tid2eid" in by_name) == (i < 3), i
        assert (p + "ffn.gate.bias" in by_name) == (i >= 3), i
        assert all(f"{p}ffn.experts.{e}.{w}.{k}" in by_name
                   for e in (0, 255) for w in ("w1", "w2", "w3") for k in ("weight", "scale"))
        assert p + "ffn.experts.256.w1.weight" not in by_name
    # MTP: a sliding-window, learned-routing block; shares embed and head with the main model
    assert not any(n.startswith("mtp.0.attn.compressor.") or n.startswith("mtp.0.attn.indexer.") for n in by_name)
    assert "mtp.0.ffn.gate.tid2eid" not in by_name
    assert not any(n.startswith("mtp.") and ("embed" in n or n.endswith("head.weight")) for n in by_name)


def test_every_fp8_weight_has_its_block_scale(specs, by_name):
    for s in specs:
        if s.dtype == "F8_E4M3":
            sc = by_name[s.name[: -len("weight")] + "scale"]
            assert sc.dtype == "F8_E8M0"
            assert sc.shape == (-(-s.shape[0] // 128), -(-s.shape[1] // 128)), s.name
        elif s.dtype == "I8":
            sc = by_name[s.name[: -len("weight")] + "scale"]
            assert sc.shape == (s.shape[0], 2 * s.shape[1] // 32), s.name  # one E8M0 per 32 FP4 values


def test_without_mtp(flash_cfg, specs):
    main = official_tensors(flash_cfg, with_mtp=False)
    assert [s.name for s in main] == [s.name for s in specs if not s.name.startswith("mtp.")]
    assert sum(s.nbytes for s in main) == 156_015_698_140


def test_pro_totals():
    """Spec §1.5: Pro differs only in sizes and schedule; the same derivation must give its published totals."""
    d = _flash_dict()
    d.update(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
             n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5, index_topk=1024,
             compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0])
    cfg = ModelConfig.from_dict(d)
    assert (cfg.layer_types.count("csa"), cfg.layer_types.count("hca"), cfg.layer_types.count("swa")) == (30, 31, 0)
    specs = official_tensors(cfg)
    assert len(specs) == 145_116
    assert sum(s.nbytes for s in specs) == 864_704_792_696
    got = {s.name: s.shape for s in specs}
    assert got["layers.5.attn.wq_a.weight"] == (1536, 7168)
    assert got["layers.5.attn.wq_b.weight"] == (65536, 1536)
    assert got["layers.5.attn.wo_a.weight"] == (16384, 4096)
    assert got["layers.5.attn.wo_b.weight"] == (7168, 16384)
    assert got["layers.5.ffn.experts.383.w1.weight"] == (3072, 3584)
    assert got["layers.5.ffn.experts.383.w1.scale"] == (3072, 224)
    assert got["layers.5.ffn.experts.0.w2.weight"] == (7168, 1536)
    assert got["layers.5.ffn.experts.0.w2.scale"] == (7168, 96)
    assert got["layers.5.ffn.gate.weight"] == (384, 7168)
    assert got["layers.5.hc_attn_fn"] == (24, 28672)


def test_dense_config_has_no_quantised_tensors():
    """Without quantization_config / expert_dtype every linear weight is BF16 and has no scale."""
    d = _flash_dict()
    del d["quantization_config"], d["expert_dtype"]
    d.update(num_hidden_layers=3, compress_ratios=[0, 4, 128], n_routed_experts=4, num_experts_per_tok=2)
    specs = official_tensors(ModelConfig.from_dict(d))
    dtypes = Counter(s.dtype for s in specs)
    assert set(dtypes) == {"BF16", "F32", "I64"}
    assert not any(s.name.endswith(".scale") for s in specs)
    by = {s.name: s for s in specs}
    assert by["layers.1.ffn.experts.3.w1.weight"].shape == (2048, 4096)  # unpacked
    assert by["layers.1.attn.wq_b.weight"].dtype == "BF16"
