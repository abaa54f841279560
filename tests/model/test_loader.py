"""Loading checkpoints: the tiny release-format checkpoint (make-tiny) round trip, transformers' names
(save_pretrained and a raw state_dict), every kind of broken checkpoint (the message must name the tensor
and the file), FP8 dialect conversion both ways, and dummy weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.config import ModelConfig
from dsv4.model import build_model
from dsv4.model import builder as builder_mod
from dsv4.model.checkpoint_format import official_tensors
from dsv4.model.loader import INDEX_FILE, CheckpointError
from dsv4.numerics.fp4 import dequantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, e8m0_to_float, ocp_to_fnuz
from dsv4.platforms import Platform

sys.path.insert(0, str(Path(__file__).parent))

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# ---- helpers ------------------------------------------------------------------------------------


def read_shards(folder: Path) -> dict[str, tuple[torch.Tensor, str, Path]]:
    """Every tensor of every *.safetensors in `folder`: name -> (tensor, safetensors dtype, file)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = (h.get_tensor(k), h.get_slice(k).get_dtype(), f)
    return out


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {n: b for n, b in model.named_buffers() if n in sd}


_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w1|w2|w3)\.(weight|scale)$")


def region_of(bufs: dict[str, torch.Tensor], official: str) -> torch.Tensor:
    """The part of the model's buffers that the official tensor `official` fills (written independently
    of dsv4.model.names: experts are stacked per layer, w13 = [w1; w3])."""
    m = _EXPERT.match(official)
    if not m:
        return bufs[official]
    base, e, w, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    b = bufs[f"{base}.{'w2' if w == 'w2' else 'w13'}{'_scale' if kind == 'scale' else ''}"][e]
    if w == "w2":
        return b
    h = b.shape[0] // 2
    return b[:h] if w == "w1" else b[h:]


def same_content(buf: torch.Tensor, disk: torch.Tensor) -> bool:
    """Bytes for quantised data (FP8, FP4, E8M0), values for everything else."""
    if disk.dtype in FP8 + (torch.int8, torch.uint8, torch.float8_e8m0fnu):
        return torch.equal(buf.contiguous().view(torch.uint8), disk.contiguous().view(torch.uint8))
    if disk.is_floating_point():
        return buf.dtype.is_floating_point and torch.equal(buf.float(), disk.float())
    return torch.equal(buf, disk.to(buf.dtype))


def clone(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src`: json / tokenizer files copied, shards symlinked (see rewrite)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def rewrite(shard: Path, edit) -> None:
    """Replace `shard` by a rewritten copy: edit(dict of tensors) mutates the dict. The symlink is
    removed first so the original checkpoint is never written through."""
    with safe_open(str(shard), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    shard.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})


def edit_index(folder: Path, edit) -> None:
    p = folder / INDEX_FILE
    idx = json.loads(p.read_text())
    edit(idx["weight_map"])
    p.write_text(json.dumps(idx))


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]


def load_error(folder: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as ei:
        build_model(folder, device="cpu", **kw)
    return str(ei.value)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk(tiny_dir):
    return read_shards(Path(tiny_dir))


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir):
    return build_model(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_bufs(tiny_lm):
    return persistent_buffers(tiny_lm.model)


# ---- make-tiny round trip -------------------------------------------------------------------------


def test_tiny_folder_layout(tiny_dir):
    root = Path(tiny_dir)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    assert len(shards) >= 2
    nums = [SHARD_RE.match(s) for s in shards]
    assert all(nums) and [int(m.group(1)) for m in nums] == list(range(1, len(shards) + 1))
    assert {int(m.group(2)) for m in nums} == {len(shards)}
    for f in (INDEX_FILE, "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (root / f).is_file(), f
    idx = json.loads((root / INDEX_FILE).read_text())
    on_disk = {}
    for s in shards:
        with safe_open(str(root / s), framework="pt") as h:
            on_disk.update({k: s for k in h.keys()})
    assert idx["weight_map"] == on_disk  # the index names exactly the shard that holds each tensor
    cfg = ModelConfig.from_file(root)
    assert idx["metadata"]["total_size"] == sum(s.nbytes for s in official_tensors(cfg))
    # release layout: embedding in the first shard, head before MTP, MTP alone in the last shard
    assert on_disk["embed.weight"] == shards[0]
    assert {v for k, v in on_disk.items() if k.startswith("mtp.")} == {shards[-1]}
    assert {k for k, v in on_disk.items() if v == shards[-1]} == {k for k in on_disk if k.startswith("mtp.")}


def test_tiny_tensors_have_the_official_names_shapes_dtypes(tiny_dir, disk):
    cfg = ModelConfig.from_file(tiny_dir)
    want = {s.name: (tuple(s.shape), s.dtype) for s in official_tensors(cfg)}
    got = {k: (tuple(t.shape), dt) for k, (t, dt, _) in disk.items()}
    assert got == want
    # every kind of layer is present in the tiny model
    assert set(cfg.layer_types) == {"swa", "csa", "hca"} and set(cfg.mlp_layer_types) == {"hash", "moe"}
    assert cfg.num_mtp_layers == 1 and cfg.quantization is not None and cfg.expert_dtype == "fp4"


def test_tiny_load_keeps_quantised_dtypes(tiny_lm, tiny_bufs):
    m = tiny_lm.model
    assert len(m.mtp) == 1
    assert m.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert m.layers[1].attn.indexer.wq_b.weight.dtype == torch.float8_e4m3fn
    assert m.mtp[0].e_proj.weight.dtype == torch.float8_e4m3fn
    assert m.layers[0].attn.wq_a.scale.dtype == torch.uint8
    e = m.layers[2].ffn.experts
    assert e.w13.dtype == e.w2.dtype == e.w13_scale.dtype == e.w2_scale.dtype == torch.uint8
    cfg = tiny_lm.cfg
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert tuple(e.w13.shape) == (E, 2 * I, D // 2) and tuple(e.w13_scale.shape) == (E, 2 * I, D // 32)
    assert tuple(e.w2.shape) == (E, D, I // 2)
    n_fp8 = sum(b.dtype == torch.float8_e4m3fn for b in tiny_bufs.values())
    assert n_fp8 > 0 and not any(b.dtype == torch.float8_e4m3fnuz for b in tiny_bufs.values())


def test_tiny_every_buffer_equals_its_tensor_on_disk(tiny_bufs, disk):
    filled = set()
    for name, (t, _, _) in disk.items():
        r = region_of(tiny_bufs, name)
        assert tuple(r.shape) == tuple(t.shape), name
        assert same_content(r, t), name
        filled.add(name if not _EXPERT.match(name) else None)
    # every persistent buffer is accounted for (experts through their stacked buffers)
    stacked = {n for n in tiny_bufs if re.search(r"\.experts\.(w13|w2)(_scale)?$", n)}
    assert set(tiny_bufs) - stacked == filled - {None}
    assert any(n.startswith("mtp.0.") for n in filled)


def test_tiny_dequantised_weights_equal_the_disk(tiny_lm, disk):
    m = tiny_lm.model
    for mod, name in [(m.layers[0].attn.wq_b, "layers.0.attn.wq_b"), (m.layers[3].attn.wo_a, "layers.3.attn.wo_a"),
                      (m.layers[1].attn.indexer.wq_b, "layers.1.attn.indexer.wq_b"),
                      (m.mtp[0].h_proj, "mtp.0.h_proj"),
                      (m.layers[4].ffn.shared_experts.w2, "layers.4.ffn.shared_experts.w2")]:
        ours = dequantize_fp8_blocks(mod.weight, mod.scale, (128, 128))
        ref = dequantize_fp8_blocks(disk[name + ".weight"][0], disk[name + ".scale"][0], (128, 128))
        assert torch.isfinite(ref).all() and ref.abs().max() > 0
        assert torch.equal(ours, ref), name
    ex = m.layers[2].ffn.experts
    I = tiny_lm.cfg.moe_intermediate_size
    for e in (0, 7, tiny_lm.cfg.n_routed_experts - 1):
        w13 = dequantize_fp4_blocks(ex.w13[e], ex.w13_scale[e])
        w1 = dequantize_fp4_blocks(disk[f"layers.2.ffn.experts.{e}.w1.weight"][0], disk[f"layers.2.ffn.experts.{e}.w1.scale"][0])
        w3 = dequantize_fp4_blocks(disk[f"layers.2.ffn.experts.{e}.w3.weight"][0], disk[f"layers.2.ffn.experts.{e}.w3.scale"][0])
        w2 = dequantize_fp4_blocks(disk[f"layers.2.ffn.experts.{e}.w2.weight"][0], disk[f"layers.2.ffn.experts.{e}.w2.scale"][0])
        assert torch.equal(w13[:I], w1) and torch.equal(w13[I:], w3)
        assert torch.equal(dequantize_fp4_blocks(ex.w2[e], ex.w2_scale[e]), w2)


def test_num_layers_and_with_mtp(tiny_dir, disk):
    lm = build_model(tiny_dir, device="cpu", num_layers=2)
    assert len(lm.model.layers) == 2 and lm.cfg.num_layers == 2 and len(lm.model.mtp) == 1
    bufs = persistent_buffers(lm.model)
    assert same_content(bufs["layers.1.attn.compressor.ape"], disk["layers.1.attn.compressor.ape"][0])
    assert same_content(bufs["mtp.0.e_proj.weight"], disk["mtp.0.e_proj.weight"][0])
    lm = build_model(tiny_dir, device="cpu", with_mtp=False)
    assert len(lm.model.mtp) == 0 and len(lm.model.layers) == 5


def test_builtin_full_size_name_has_no_weights():
    with pytest.raises(CheckpointError, match="no weights here.*dummy"):
        build_model("deepseek-v4-flash", device="cpu", load_format="safetensors")


# ---- transformers' names --------------------------------------------------------------------------

HF_LAYERS = dict(
    num_hidden_layers=4, sliding_window=8, index_topk=64,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"])

# transformers parameter suffix (after "model.layers.N.") -> our buffer suffix (after "layers.N.")
HF_LAYER_MAP = {
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.experts.gate_up_proj": "ffn.experts.w13",
    "mlp.experts.down_proj": "ffn.experts.w2",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
}
HF_TOP_MAP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
              "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
              "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}


def ours_of_hf(name: str) -> str:
    if name in HF_TOP_MAP:
        return HF_TOP_MAP[name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    assert m and m.group(2) in HF_LAYER_MAP, f"unmapped transformers parameter {name}"
    return f"layers.{m.group(1)}.{HF_LAYER_MAP[m.group(2)]}"


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_reference import make_hf_model

    model = make_hf_model(3, **HF_LAYERS)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    a = tmp_path_factory.mktemp("hf_save_pretrained")
    model.save_pretrained(a)
    b = tmp_path_factory.mktemp("hf_state_dict")
    save_file(sd, str(b / "model.safetensors"))
    model.config.save_pretrained(b)
    return {"save_pretrained": a, "state_dict": b}, sd


@pytest.mark.parametrize("form", ["save_pretrained", "state_dict"])
def test_transformers_checkpoint_loads_every_parameter(hf_checkpoints, form):
    dirs, sd = hf_checkpoints
    if form == "state_dict":  # really transformers' module names on disk
        names = set(read_shards(dirs[form]))
        assert "model.layers.0.mlp.experts.gate_up_proj" in names and "lm_head.weight" in names
    lm = build_model(dirs[form], device="cpu", dtype="float32", numerics="plain")
    assert len(lm.model.mtp) == 0  # transformers keeps no MTP weights
    bufs = persistent_buffers(lm.model)
    mapped = {}
    for hf_name, t in sd.items():
        ours = ours_of_hf(hf_name)
        assert ours not in mapped, (ours, hf_name)
        mapped[ours] = hf_name
        b = bufs[ours]
        assert tuple(b.shape) == tuple(t.shape), hf_name
        assert torch.equal(b, t.to(b.dtype)), hf_name
    assert set(mapped) == set(bufs)  # every buffer came from exactly one transformers parameter
    # the representative tensors are really non-trivial, so equality above means something
    assert bufs["layers.1.ffn.experts.w13"].dim() == 3
    assert len(torch.unique(bufs["layers.0.ffn.gate.tid2eid"])) > 1
    assert bufs["layers.2.ffn.gate.bias"].abs().min() > 0
    assert bufs["layers.1.attn.indexer.compressor.ape"].abs().max() > 0
    assert not torch.equal(bufs["layers.1.attn.kv_norm.weight"], torch.ones_like(bufs["layers.1.attn.kv_norm.weight"]))


# ---- broken checkpoints -------------------------------------------------------------------------


@pytest.fixture
def broken(tiny_dir, tmp_path):
    return clone(Path(tiny_dir), tmp_path / "ckpt")


def test_missing_tensor(broken):
    name = "layers.1.attn.indexer.wq_b.scale"
    shard = shard_of(broken, name)
    rewrite(shard, lambda t: t.pop(name))
    edit_index(broken, lambda wm: wm.pop(name))
    msg = load_error(broken)
    assert "1 missing tensor(s)" in msg and repr(name) in msg and str(broken) in msg


def test_missing_expert_piece_is_named_as_in_the_checkpoint(broken):
    name = "mtp.0.ffn.experts.5.w3.scale"
    rewrite(shard_of(broken, name), lambda t: t.pop(name))
    edit_index(broken, lambda wm: wm.pop(name))
    msg = load_error(broken)
    assert "1 missing tensor(s)" in msg and repr(name) in msg


def test_tensor_listed_in_the_index_but_not_in_its_shard(broken):
    name = "mtp.0.attn.wkv.weight"
    shard = shard_of(broken, name)
    rewrite(shard, lambda t: t.pop(name))
    msg = load_error(broken)
    assert repr(name) in msg and shard.name in msg and INDEX_FILE in msg


def test_unexpected_tensor(broken):
    name = "mtp.0.attn.extra_proj.weight"
    shard = shard_of(broken, "mtp.0.attn.wkv.weight")
    rewrite(shard, lambda t: t.__setitem__(name, torch.zeros(4, 4)))
    edit_index(broken, lambda wm: wm.__setitem__(name, shard.name))
    msg = load_error(broken)
    assert "1 unexpected tensor(s)" in msg and repr(name) in msg and shard.name in msg


def test_tensor_missing_from_the_index(broken):
    name = "mtp.0.attn.extra_proj.weight"
    shard = shard_of(broken, "mtp.0.attn.wkv.weight")
    rewrite(shard, lambda t: t.__setitem__(name, torch.zeros(4, 4)))
    msg = load_error(broken)
    assert repr(name) in msg and str(shard) in msg and "not listed" in msg and INDEX_FILE in msg


def test_expert_out_of_range(broken, tiny_lm):
    E = tiny_lm.cfg.n_routed_experts
    name = f"mtp.0.ffn.experts.{E}.w1.weight"
    shard = shard_of(broken, "mtp.0.ffn.experts.0.w1.weight")
    rewrite(shard, lambda t: t.__setitem__(name, t["mtp.0.ffn.experts.0.w1.weight"].clone()))
    edit_index(broken, lambda wm: wm.__setitem__(name, shard.name))
    msg = load_error(broken)
    assert repr(name) in msg and str(shard) in msg and f"expert {E} out of range" in msg


def test_wrong_shape(broken):
    name = "mtp.0.attn.wo_b.weight"
    shard = shard_of(broken, name)
    good = {}

    def edit(t):
        good["shape"] = list(t[name].shape)
        t[name] = t[name][: t[name].shape[0] // 2]

    rewrite(shard, edit)
    msg = load_error(broken)
    bad_shape = [good["shape"][0] // 2, good["shape"][1]]
    assert f"tensor {name!r} in {shard}: shape {bad_shape}, expected {good['shape']}" in msg
    assert "missing" not in msg  # reported once, for its shape


def test_wrong_dtype_bf16_for_fp8(broken):
    name = "mtp.0.e_proj.weight"
    shard = shard_of(broken, name)
    rewrite(shard, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    msg = load_error(broken)
    assert f"tensor {name!r} in {shard}: dtype BF16, expected FP8" in msg and "F8_E4M3" in msg
    assert "missing" not in msg


def test_wrong_dtype_of_scales(broken):
    w = "mtp.0.h_proj.scale"
    shard = shard_of(broken, w)
    rewrite(shard, lambda t: t.__setitem__(w, t[w].view(torch.uint8).to(torch.int64)))
    msg = load_error(broken)
    assert f"tensor {w!r} in {shard}: dtype I64, expected E8M0" in msg


def test_all_problems_reported_together(broken):
    shard = shard_of(broken, "mtp.0.e_proj.weight")

    def edit(t):
        t.pop("mtp.0.enorm.weight")
        t["mtp.0.bogus"] = torch.zeros(2)
        t["mtp.0.hnorm.weight"] = torch.zeros(3, dtype=torch.bfloat16)
        t["mtp.0.e_proj.weight"] = t["mtp.0.e_proj.weight"].to(torch.float32)

    rewrite(shard, edit)
    edit_index(broken, lambda wm: (wm.pop("mtp.0.enorm.weight"), wm.__setitem__("mtp.0.bogus", shard.name)))
    msg = load_error(broken)
    for s in ("'mtp.0.enorm.weight'", "'mtp.0.bogus'", "'mtp.0.hnorm.weight'", "shape [3]",
              "'mtp.0.e_proj.weight'", "dtype F32"):
        assert s in msg, (s, msg)


def test_fp8_checkpoint_with_a_config_without_quantization(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["quantization_config"], cfg["expert_dtype"]
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = load_error(broken)
    assert "quantization_config" in msg.splitlines()[1]  # the cause comes first
    m = re.search(r"tensor '([^']+)' in (\S+): dtype F8_E4M3, expected a float tensor \(the checkpoint is "
                  r"quantised but config.json has no quantization_config\)", msg)
    assert m, msg
    with safe_open(m.group(2), framework="pt") as h:
        assert h.get_slice(m.group(1)).get_dtype() == "F8_E4M3"
    assert len(msg.splitlines()) < 60  # long lists are cut, not thousands of lines


def test_float32_power_of_two_scales_load_exactly(broken, tiny_bufs):
    """The "FP8 mixed" Base checkpoints store scales as F32 powers of two; they load to the same bytes."""
    shard = shard_of(broken, "mtp.0.e_proj.scale")

    def edit(t):
        for k in [k for k in t if k.endswith(".scale")]:
            t[k] = e8m0_to_float(t[k])

    rewrite(shard, edit)
    lm = build_model(broken, device="cpu")
    bufs = persistent_buffers(lm.model)
    for n in ("mtp.0.e_proj.scale", "mtp.0.ffn.experts.w13_scale", "mtp.0.attn.wq_b.scale"):
        assert torch.equal(bufs[n], tiny_bufs[n]), n


def test_float32_scales_that_are_not_powers_of_two(broken):
    name = "mtp.0.e_proj.scale"
    shard = shard_of(broken, name)
    rewrite(shard, lambda t: t.__setitem__(name, e8m0_to_float(t[name]) * 1.5))
    msg = load_error(broken)
    assert repr(name) in msg and str(shard) in msg and "powers of two" in msg


def test_truncated_shard(broken):
    shard = shard_of(broken, "mtp.0.e_proj.weight")
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) - 1000])
    msg = load_error(broken)
    assert str(shard) in msg and "not a readable safetensors file" in msg


def test_file_that_is_not_safetensors(broken):
    shard = shard_of(broken, "head.weight")
    shard.unlink()
    shard.write_text("this is not a safetensors file\n" * 20)
    msg = load_error(broken)
    assert str(shard) in msg and "not a readable safetensors file" in msg


def test_index_names_a_missing_shard(broken):
    edit_index(broken, lambda wm: wm.__setitem__("norm.weight", "model-00009-of-00009.safetensors"))
    msg = load_error(broken)
    assert INDEX_FILE in msg and str(broken / "model-00009-of-00009.safetensors") in msg


def test_index_that_is_not_json(broken):
    (broken / INDEX_FILE).write_text("{ not json")
    msg = load_error(broken)
    assert str(broken / INDEX_FILE) in msg and "not a valid safetensors index" in msg


@pytest.mark.parametrize("bad", [16, -1])
def test_tid2eid_out_of_range(broken, tiny_lm, bad):
    E = tiny_lm.cfg.n_routed_experts
    name = "layers.0.ffn.gate.tid2eid"
    shard = shard_of(broken, name)
    rewrite(shard, lambda t: t[name].__setitem__((7, 1), bad if bad >= 0 else -1))
    msg = load_error(broken)
    assert f"tensor {name!r} in {shard}" in msg and f"0..{E - 1}" in msg and str(bad) in msg


# ---- FP8 dialects ---------------------------------------------------------------------------------


def _fnuz_cpu(device=None):
    return Platform(name="cpu", device="cpu", arch="fnuz-simulated", fp8_dialect=Fp8Dialect.FNUZ)


def _fp8_pairs(bufs):
    """(weight name, scale name) of every FP8 weight buffer."""
    return [(n, n[: -len("weight")] + "scale") for n, b in bufs.items() if b.dtype in FP8]


def _check_same_model(fnuz_bufs, ocp_bufs, fnuz_scale_offset: int):
    """`fnuz_bufs` holds the OCP model's weights in FNUZ: byte 0x80 -> 0, FP8 scale bytes + offset,
    identical dequantised values, everything else identical."""
    pairs = _fp8_pairs(ocp_bufs)
    assert len(pairs) > 20
    fp8_scales = {s for _, s in pairs}
    for w, s in pairs:
        a, b = ocp_bufs[w].view(torch.uint8), fnuz_bufs[w]
        assert b.dtype == torch.float8_e4m3fnuz, w
        assert torch.equal(b.view(torch.uint8), torch.where(a == 0x80, torch.zeros_like(a), a)), w
        assert torch.equal(fnuz_bufs[s].int(), ocp_bufs[s].int() + fnuz_scale_offset), s
        ref = dequantize_fp8_blocks(ocp_bufs[w], ocp_bufs[s], (128, 128))
        assert torch.equal(dequantize_fp8_blocks(b, fnuz_bufs[s], (128, 128)), ref), w
        # the same bytes read in the wrong dialect are off by 2x: the check above has teeth
        wrong = dequantize_fp8_blocks(b.view(torch.uint8), fnuz_bufs[s], (128, 128), dialect=Fp8Dialect.OCP)
        assert not torch.equal(wrong, ref)
    for n, b in ocp_bufs.items():
        if b.dtype not in FP8 and n not in fp8_scales:
            assert torch.equal(fnuz_bufs[n], b), n


def test_ocp_checkpoint_on_a_fnuz_platform(tiny_dir, tiny_lm, tiny_bufs, monkeypatch):
    monkeypatch.setattr(builder_mod, "detect", _fnuz_cpu)
    lm = build_model(tiny_dir)
    assert lm.platform.fp8_dialect == Fp8Dialect.FNUZ and lm.opts.fp8_dtype == torch.float8_e4m3fnuz
    bufs = persistent_buffers(lm.model)
    assert not any(b.dtype == torch.float8_e4m3fn for b in bufs.values())
    _check_same_model(bufs, tiny_bufs, fnuz_scale_offset=1)
    # the FP4 experts and their scales are dialect-free
    assert torch.equal(bufs["layers.2.ffn.experts.w13_scale"], tiny_bufs["layers.2.ffn.experts.w13_scale"])
    # and the model computes the same thing
    ids = torch.tensor([0, 17, 4242, 99, 1000, 5, 6, 7], dtype=torch.int64)
    assert torch.allclose(_last_logits(lm, ids), _last_logits(tiny_lm, ids), atol=1e-5, rtol=0)


def _last_logits(lm, ids):
    from dsv4.cache.direct import DirectCache

    dc = DirectCache(lm.cfg, 1, 64, "cpu", lm.opts.dtype)
    slot = dc.add()
    with torch.no_grad():
        X = lm.model(ids, dc.meta([slot], [0], [len(ids)]), dc.cache)
        return lm.model.logits(X[-1:]).float()


@pytest.fixture(scope="module")
def fnuz_checkpoint(tiny_dir, tmp_path_factory):
    """The tiny checkpoint converted to F8_E4M3FNUZ weights (scale bytes + 1) with numerics.ocp_to_fnuz."""
    out = tmp_path_factory.mktemp("tiny_fnuz")
    for f in Path(tiny_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
            continue
        with safe_open(str(f), framework="pt") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
        for k in [k for k, v in t.items() if v.dtype == torch.float8_e4m3fn]:
            s = k[: -len("weight")] + "scale"
            w, sc = ocp_to_fnuz(t[k], t[s])
            t[k], t[s] = w.view(torch.float8_e4m3fnuz), sc.view(torch.float8_e8m0fnu)
        save_file(t, str(out / f.name), metadata={"format": "pt"})
    return out


def test_fnuz_checkpoint_on_an_ocp_platform(fnuz_checkpoint, tiny_bufs):
    dtypes = {dt for _, dt, _ in read_shards(fnuz_checkpoint).values()}
    assert "F8_E4M3FNUZ" in dtypes and "F8_E4M3" not in dtypes
    lm = build_model(fnuz_checkpoint, device="cpu")
    bufs = persistent_buffers(lm.model)
    # back in OCP: the original bytes (OCP -0 came back as +0) and the original scales
    for n, b in tiny_bufs.items():
        if b.dtype in FP8:
            a = b.view(torch.uint8)
            assert bufs[n].dtype == torch.float8_e4m3fn
            assert torch.equal(bufs[n].view(torch.uint8), torch.where(a == 0x80, torch.zeros_like(a), a)), n
        else:
            assert torch.equal(bufs[n], b), n


def test_fnuz_checkpoint_on_a_fnuz_platform(fnuz_checkpoint, tiny_bufs, monkeypatch):
    monkeypatch.setattr(builder_mod, "detect", _fnuz_cpu)
    lm = build_model(fnuz_checkpoint)
    bufs = persistent_buffers(lm.model)
    _check_same_model(bufs, tiny_bufs, fnuz_scale_offset=1)
    disk = read_shards(fnuz_checkpoint)
    assert same_content(bufs["mtp.0.e_proj.weight"], disk["mtp.0.e_proj.weight"][0])  # bytes taken verbatim


# ---- dummy weights --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_only(tiny_dir, tmp_path_factory):
    """A folder with only config.json: dummy loading must not need any weights."""
    d = tmp_path_factory.mktemp("config_only")
    shutil.copy(Path(tiny_dir) / "config.json", d / "config.json")
    return d


@pytest.fixture(scope="module")
def dummy0(config_only):
    return persistent_buffers(build_model(config_only, device="cpu", load_format="dummy", seed=0).model)


def test_dummy_has_real_dtypes_and_shapes(dummy0, tiny_bufs):
    assert set(dummy0) == set(tiny_bufs)
    for n, b in tiny_bufs.items():
        assert (dummy0[n].dtype, dummy0[n].shape) == (b.dtype, b.shape), n


def test_dummy_values_are_valid(dummy0):
    for w, s in _fp8_pairs(dummy0):
        v = dequantize_fp8_blocks(dummy0[w], dummy0[s], (128, 128))
        assert torch.isfinite(v).all() and v.abs().max() > 0, w
    for n, b in dummy0.items():
        if n.endswith((".experts.w13", ".experts.w2")):
            v = dequantize_fp4_blocks(b, dummy0[n + "_scale"])
            assert torch.isfinite(v).all() and v.abs().max() > 0, n
        elif b.dtype.is_floating_point and b.dtype not in FP8:
            assert torch.isfinite(b).all(), n
        elif b.dtype == torch.uint8 and n.endswith("scale"):
            assert (b != 255).all(), n  # 255 is the E8M0 NaN
    E = dummy0["layers.0.ffn.gate.weight"].shape[0]
    for n in [n for n in dummy0 if n.endswith("tid2eid")]:
        t = dummy0[n]
        assert t.min() >= 0 and t.max() < E, n
        srt = t.sort(dim=1).values
        assert (srt[:, 1:] != srt[:, :-1]).all(), n  # distinct experts in every row
        assert len(torch.unique(t[:, 0])) > 1


def test_dummy_is_seeded(config_only, dummy0):
    same = persistent_buffers(build_model(config_only, device="cpu", load_format="dummy", seed=0).model)
    other = persistent_buffers(build_model(config_only, device="cpu", load_format="dummy", seed=1).model)

    def eq(a, b):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype in FP8 else torch.equal(a, b)

    assert all(eq(same[n], b) for n, b in dummy0.items())
    for n in ("embed.weight", "layers.0.attn.wq_a.weight", "layers.0.ffn.gate.tid2eid", "layers.2.ffn.experts.w13",
              "mtp.0.e_proj.weight", "layers.1.attn.compressor.ape"):
        assert not eq(other[n], dummy0[n]), n
