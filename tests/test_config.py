"""ModelConfig: the official config.json form and the transformers form give the same object; derived
values of DeepSeek-V4-Flash (spec §1); invalid configs fail with a ConfigError naming the field and the
value; `to_official_dict` round-trips."""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources

import pytest

from dsv4.config import (CSA, HASH_MOE, HCA, MOE, SWA, ConfigError, Fp8Quantization, ModelConfig, RopeSpec,
                         YarnScaling)

# transformers' spellings of the layer kinds -> ours (written out here, not imported from dsv4.config)
HF_ATTN = {"sliding_attention": SWA, "compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA}
HF_MLP = {"hash_moe": HASH_MOE, "moe": MOE}


def flash_official() -> dict:
    return json.loads(resources.files("dsv4.configs").joinpath("deepseek-v4-flash.json").read_text())


def flash_transformers_form() -> dict:
    """The Flash config written the way transformers names things: no compress_ratios / num_hash_layers /
    qk_rope_head_dim / rope_scaling / rope thetas at the top level."""
    off = flash_official()
    ratios = off["compress_ratios"][:43]
    d = {k: v for k, v in off.items() if k not in (
        "compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling", "rope_theta",
        "compress_rope_theta", "torch_dtype")}
    d["layer_types"] = [{0: "sliding_attention", 4: "compressed_sparse_attention",
                         128: "heavily_compressed_attention"}[r] for r in ratios]
    d["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * 40
    d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    d["partial_rotary_factor"] = 0.125
    d["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                     "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                     "partial_rotary_factor": 0.125, "attention_factor": 1.0},
    }
    d["dtype"] = "bfloat16"
    return d


@pytest.fixture(scope="module")
def flash() -> ModelConfig:
    return ModelConfig.from_dict(flash_official())


# ---- equivalence of the two forms -------------------------------------------------------------------


def test_official_and_transformers_forms_are_equal(flash):
    hf = ModelConfig.from_dict(flash_transformers_form())
    assert hf == flash
    # `==` must compare real fields: change one and they differ
    assert dataclasses.replace(hf, index_topk=1024) != flash
    # ... but not `extra` (the raw dict), which differs between the two forms
    assert hf.extra != flash.extra


def test_transformers_own_conversion_of_the_official_config(flash):
    """transformers' DeepseekV4Config folds the official keys into its own (layer_types, rope_parameters
    {main, compress}, partial_rotary_factor); its to_dict() must parse to the same config."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.DeepseekV4Config(**copy.deepcopy(flash_official()))
    d = hf_cfg.to_dict()
    assert "layer_types" in d and "rope_parameters" in d  # really the transformers form
    assert ModelConfig.from_dict(d) == flash


HF_PATTERNS = [
    dict(num_hidden_layers=4, sliding_window=8, index_topk=64,
         layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                      "compressed_sparse_attention"],
         compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
         mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
    # hash layers that are not a prefix, and CSA at ratio 8: expressible only in the transformers form
    dict(num_hidden_layers=3, layer_types=["compressed_sparse_attention", "sliding_attention",
                                           "heavily_compressed_attention"],
         compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 32},
         mlp_layer_types=["moe", "hash_moe", "moe"]),
    # transformers' own default schedule (2 HCA, then CSA / HCA interleaved; 3 hash layers)
    dict(num_hidden_layers=6),
]


@pytest.mark.parametrize("overrides", HF_PATTERNS, ids=["swa-csa-hca", "csa8-nonprefix-hash", "hf-default"])
@pytest.mark.parametrize("how", ["to_dict", "save_pretrained"])
def test_transformers_config_parses_to_its_layer_pattern(overrides, how, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "model"))
    from hf_reference import HF_BASE

    kw = copy.deepcopy(HF_BASE)
    kw.update(copy.deepcopy(overrides))
    hc = transformers.DeepseekV4Config(**kw)
    if how == "to_dict":
        cfg = ModelConfig.from_dict(hc.to_dict())
    else:
        hc.save_pretrained(tmp_path)
        cfg = ModelConfig.from_file(tmp_path)  # a folder: reads its config.json
    n = hc.num_hidden_layers
    assert cfg.num_layers == n
    assert cfg.layer_types == tuple(HF_ATTN[t] for t in hc.layer_types)
    assert cfg.compress_ratios == tuple(0 if t == "sliding_attention" else hc.compress_rates[t]
                                        for t in hc.layer_types)
    assert cfg.mlp_layer_types == tuple(HF_MLP[t] for t in hc.mlp_layer_types)
    assert cfg.rope_head_dim == hc.qk_rope_head_dim == HF_BASE["qk_rope_head_dim"]
    assert cfg.rope_main == RopeSpec(hc.rope_theta, None)
    assert cfg.rope_compress == RopeSpec(hc.compress_rope_theta, YarnScaling(16.0, 64, 32.0, 1.0))
    assert cfg.num_mtp_layers == hc.num_nextn_predict_layers
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.n_routed_experts) == (64, 4, 32, 8)
    assert cfg.quantization is None and cfg.expert_dtype is None


# ---- derived values of Flash ------------------------------------------------------------------------


def test_flash_layer_schedule(flash):
    assert flash.num_layers == 43 and flash.num_mtp_layers == 1
    assert flash.layer_types.count(CSA) == 21
    assert flash.layer_types.count(HCA) == 20
    assert flash.layer_types.count(SWA) == 2
    assert flash.layer_types[:2] == (SWA, SWA)
    assert all(flash.layer_types[i] == CSA and flash.compress_ratios[i] == 4 for i in range(2, 43, 2))
    assert all(flash.layer_types[i] == HCA and flash.compress_ratios[i] == 128 for i in range(3, 43, 2))
    assert flash.num_hash_layers == 3
    assert flash.mlp_layer_types[:3] == (HASH_MOE,) * 3 and set(flash.mlp_layer_types[3:]) == {MOE}
    assert flash.csa_ratio() == 4


def test_flash_dimensions_and_rope(flash):
    assert (flash.vocab_size, flash.hidden_size, flash.num_heads, flash.head_dim) == (129280, 4096, 64, 512)
    assert flash.rope_head_dim == 64 and flash.nope_head_dim == 448
    assert flash.hc_mix_dim == 24 and flash.hc_mult * flash.hidden_size == 16384
    assert flash.num_heads * flash.head_dim // flash.o_groups == 4096
    assert flash.o_groups * flash.o_lora_rank == 8192
    assert flash.index_n_heads * flash.index_head_dim == 8192
    assert flash.shared_intermediate_size == 2048
    assert (flash.n_routed_experts, flash.num_experts_per_tok) == (256, 6)
    assert flash.rope_main == RopeSpec(10000.0, None)
    assert flash.rope_compress == RopeSpec(160000.0, YarnScaling(factor=16.0, original_max_position_embeddings=65536,
                                                                 beta_fast=32.0, beta_slow=1.0))
    assert flash.rope_for(SWA) is flash.rope_main
    assert flash.rope_for(CSA) is flash.rope_compress and flash.rope_for(HCA) is flash.rope_compress
    assert flash.quantization == Fp8Quantization((128, 128), "ue8m0", "dynamic")
    assert flash.expert_dtype == "fp4"
    assert flash.scoring_func == "sqrtsoftplus" and flash.routed_scaling_factor == 1.5
    assert flash.bos_token_id == 0 and flash.eos_token_ids == (1,)


def test_replace_truncates_the_schedule(flash):
    c = flash.replace(num_layers=4)
    assert c.num_layers == 4
    assert c.layer_types == (SWA, SWA, CSA, HCA) and c.compress_ratios == (0, 0, 4, 128)
    assert c.mlp_layer_types == (HASH_MOE,) * 3 + (MOE,)
    with pytest.raises(ConfigError, match="num_layers.*44"):
        flash.replace(num_layers=44)


# ---- invalid configs ----------------------------------------------------------------------------


def _set(key, value):
    def f(d):
        d[key] = value
    return f


def _del(key):
    def f(d):
        del d[key]
    return f


def _quant_block(d):
    d["quantization_config"]["weight_block_size"] = [64, 64]


def _rope_linear(d):
    d["rope_scaling"] = {"type": "linear", "factor": 4.0}


def _yarn_factor_text(d):
    d["rope_scaling"]["factor"] = "sixteen"


BAD_OFFICIAL = [
    ("model_type", _set("model_type", "deepseek_v3"), ["model_type", "'deepseek_v3'"]),
    ("negative_hidden", _set("hidden_size", -4096), ["hidden_size", "-4096"]),
    ("ratios_length", _set("compress_ratios", [0, 4, 128] * 5), ["compress_ratios", "15 entries", "43"]),
    ("topk_gt_experts", _set("num_experts_per_tok", 300), ["num_experts_per_tok", "300", "n_routed_experts", "256"]),
    ("heads_vs_groups", _set("num_attention_heads", 60), ["num_attention_heads", "60", "o_groups", "8"]),
    ("rope_linear", _rope_linear, ["rope_scaling", "yarn", "'linear'"]),
    ("yarn_factor_text", _yarn_factor_text, ["rope_scaling", "sixteen"]),
    ("block_64", _quant_block, ["weight_block_size", "[64, 64]"]),
    ("block_scalar", lambda d: d["quantization_config"].__setitem__("weight_block_size", 128),
     ["weight_block_size", "128"]),
    ("missing_vocab", _del("vocab_size"), ["missing field", "'vocab_size'"]),
    ("missing_head_dim", _del("head_dim"), ["missing field", "'head_dim'"]),
    ("missing_layers", _del("num_hidden_layers"), ["missing field", "'num_hidden_layers'"]),
    ("bad_scoring", _set("scoring_func", "relu"), ["scoring_func", "'relu'"]),
    ("kv_heads", _set("num_key_value_heads", 8), ["num_key_value_heads", "8"]),
    ("mtp_not_swa", _set("compress_ratios", [0, 0] + [4, 128] * 20 + [4, 4]), ["compress_ratios[43]", "4"]),
    ("expert_dtype", _set("expert_dtype", "int4"), ["expert_dtype", "'int4'"]),
    ("yarn_mscale", lambda d: d["rope_scaling"].__setitem__("attention_factor", 1.2),
     ["rope_scaling.attention_factor", "1.2"]),
]


@pytest.mark.parametrize("mutate,needles", [(m, n) for _, m, n in BAD_OFFICIAL], ids=[i for i, _, _ in BAD_OFFICIAL])
def test_invalid_official_config(mutate, needles):
    d = flash_official()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d, source="flash.json")
    msg = str(ei.value)
    assert msg.startswith("flash.json: ")
    for s in needles:
        assert s in msg, (s, msg)


def _hf_unknown_layer(d):
    d["layer_types"][5] = "full_attention"


def _hf_compress_linear(d):
    d["rope_parameters"]["compress"]["rope_type"] = "linear"


def _hf_main_yarn(d):
    d["rope_parameters"]["main"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)


def _hf_bad_mlp(d):
    d["mlp_layer_types"][0] = "dense"


def _hf_prf(d):
    d["qk_rope_head_dim"] = 32  # disagrees with partial_rotary_factor 0.125 x 512 = 64


BAD_HF = [
    ("unknown_layer_type", _hf_unknown_layer, ["layer_types[5]", "'full_attention'"]),
    ("compress_linear", _hf_compress_linear, ["rope_parameters.compress", "'linear'"]),
    ("main_yarn", _hf_main_yarn, ["rope_parameters.main", "YaRN"]),
    ("bad_mlp_type", _hf_bad_mlp, ["mlp_layer_types[0]", "'dense'"]),
    ("rope_dim_mismatch", _hf_prf, ["qk_rope_head_dim", "32", "partial_rotary_factor"]),
    ("rate_not_int", lambda d: d["compress_rates"].__setitem__("heavily_compressed_attention", "128"),
     ["compress_rates['heavily_compressed_attention']", "'128'"]),
    ("short_layer_types", lambda d: d.__setitem__("layer_types", d["layer_types"][:40]), ["layer_types", "40", "43"]),
]


@pytest.mark.parametrize("mutate,needles", [(m, n) for _, m, n in BAD_HF], ids=[i for i, _, _ in BAD_HF])
def test_invalid_transformers_config(mutate, needles):
    d = flash_transformers_form()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d)
    for s in needles:
        assert s in str(ei.value), (s, str(ei.value))


def test_config_file_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "deepseek_v4", "vocab_size": 129280,')  # cut off
    with pytest.raises(ConfigError, match="not valid JSON") as ei:
        ModelConfig.from_file(bad)
    assert str(bad) in str(ei.value)
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(tmp_path)  # the folder: its config.json
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "absent.json")
    # a valid file parses, naming it in later errors
    d = flash_official()
    d["hidden_size"] = 0
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_file(bad)
    assert str(ei.value).startswith(str(bad)) and "hidden_size" in str(ei.value)


# ---- to_official_dict ---------------------------------------------------------------------------


def test_to_official_dict_reproduces_the_release_config(flash):
    out = flash.to_official_dict()
    off = flash_official()
    for k, v in out.items():
        assert k in off, k
        assert off[k] == v, (k, off[k], v)
    # only bookkeeping fields of the release are not written back
    assert set(off) - set(out) == {"attention_dropout", "initializer_range", "use_cache", "transformers_version"}
    assert ModelConfig.from_dict(out) == flash
    assert ModelConfig.from_dict(json.loads(json.dumps(out))) == flash  # survives JSON


def test_to_official_dict_round_trips_other_configs(flash):
    from dsv4.tiny import TINY_CONFIG

    tiny = ModelConfig.from_dict(dict(TINY_CONFIG))
    assert ModelConfig.from_dict(tiny.to_official_dict()) == tiny
    hf4 = ModelConfig.from_dict(dict(flash_transformers_form(), num_hidden_layers=4, layer_types=[
        "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}))
    back = ModelConfig.from_dict(hf4.to_official_dict())
    assert back == hf4 and back.compress_ratios == (0, 4, 16, 0) and back.num_hash_layers == 1
    dense = flash.replace(quantization=None, expert_dtype=None, eos_token_ids=(1, 7), bos_token_id=None)
    d = dense.to_official_dict()
    assert "quantization_config" not in d and "expert_dtype" not in d and d["eos_token_id"] == [1, 7]
    assert ModelConfig.from_dict(d) == dense


def test_to_official_dict_refuses_what_it_cannot_express(flash):
    # CSA at ratio 8 would be read back as HCA (the official form marks CSA by ratio 4)
    csa8 = flash.replace(compress_ratios=tuple(8 if r == 4 else r for r in flash.compress_ratios))
    assert csa8.layer_types[2] == CSA
    with pytest.raises(ConfigError, match="ratio 4"):
        csa8.to_official_dict()
    # hash layers that are not a prefix
    mixed = flash.replace(mlp_layer_types=(MOE,) + flash.mlp_layer_types[1:])
    with pytest.raises(ConfigError, match="prefix"):
        mixed.to_official_dict()
