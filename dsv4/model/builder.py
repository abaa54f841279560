"""Build a ready-to-run model from a checkpoint folder or a built-in name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.model.deepseek_v4 import Transformer
from dsv4.model.dummy import fill_dummy
from dsv4.model.linear import compact_dense_weights, fuse_linear_groups
from dsv4.model.loader import CheckpointError, index_checkpoint, load_checkpoint
from dsv4.model.names import target_of
from dsv4.model.options import ModelOptions
from dsv4.ops.registry import OpTable, resolve
from dsv4.platforms import Platform, detect

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Built-in models: "tiny" is materialised on first use (a small random model in the release's format,
# with the real tokenizer); the full-size configs come without weights (use --load-format dummy).
BUILTIN_CONFIGS = {"deepseek-v4-flash": "deepseek-v4-flash.json", "deepseek-ai/DeepSeek-V4-Flash": "deepseek-v4-flash.json"}
DEFAULT_MODEL = "tiny"


@dataclass
class LoadedModel:
    model: Transformer
    cfg: ModelConfig
    opts: ModelOptions
    platform: Platform
    path: Path | None  # checkpoint / tokenizer folder (None: a config-only built-in)

    @property
    def ops(self) -> OpTable:
        return self.opts.ops


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model(model: str | Path) -> tuple[Path | None, ModelConfig]:
    """(folder with weights and tokenizer or None, config) for a path or a built-in name."""
    s = str(model)
    if s == "tiny":
        from dsv4.model.tiny import ensure_builtin_tiny
        path = ensure_builtin_tiny()
        return path, ModelConfig.from_file(path)
    if s in BUILTIN_CONFIGS and not Path(s).exists():
        text = resources.files("dsv4.configs").joinpath(BUILTIN_CONFIGS[s]).read_text()
        import json
        return None, ModelConfig.from_dict(json.loads(text), source=f"built-in config {s!r}")
    p = Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model {s!r}: no such folder, and not a built-in name "
                                f"({', '.join(['tiny', *BUILTIN_CONFIGS])})")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model folder {p} has no config.json")
    return p, ModelConfig.from_file(p)


def resolve_ops(platform: Platform, overrides: dict | None = None) -> OpTable:
    """Bind every op to its provider on `platform`. The providers (dsv4.kernels) register against the ops
    when imported: they sit above dsv4.ops, so they are imported here, where the op table is made."""
    import dsv4.kernels  # noqa: F401

    return resolve(platform, overrides)


def build_model(model: str | Path = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype = "bfloat16",
                numerics: str = "official", load_format: str = "auto", op_overrides: dict | None = None,
                seed: int = 0, num_layers: int | None = None, with_mtp: bool | None = None,
                progress: bool = False, expert_map=None, expert_parallel=None) -> LoadedModel:
    """Resolve `model`, pick the platform and the ops, construct the model on the device and fill it.
    `expert_parallel` (dsv4.parallel.ExpertParallel): hold and load only this rank's share of the routed experts
    and exchange tokens with the other ranks in every MoE layer (implies its expert map)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    path, cfg = resolve_model(model)
    if num_layers is not None and num_layers != cfg.num_layers:
        cfg = cfg.replace(num_layers=num_layers)
    platform = detect(device)
    if expert_parallel is not None:
        if expert_map is not None:
            raise ValueError("give expert_map or expert_parallel, not both")
        expert_map = expert_parallel.expert_map(cfg.n_routed_experts)
    opts = ModelOptions(dtype=parse_dtype(dtype), numerics=numerics, fp8_dialect=platform.fp8_dialect,
                        ops=resolve_ops(platform, op_overrides), device=platform.torch_device, expert_map=expert_map,
                        expert_parallel=expert_parallel)
    if load_format == "auto":
        load_format = "safetensors" if path is not None else "dummy"
    ckpt = None
    if load_format == "safetensors":
        if path is None:
            raise CheckpointError(f"built-in {str(model)!r} has no weights here; use --load-format dummy "
                                  f"or give the checkpoint folder")
        ckpt = index_checkpoint(path)
        if with_mtp is None:
            with_mtp = cfg.num_mtp_layers > 0 and ckpt.has_mtp()
        layer_re = re.compile(r"^layers\.(\d+)\.")
        for name in list(ckpt.files):
            t = target_of(name).name
            m = layer_re.match(t)
            if (m and int(m.group(1)) >= cfg.num_layers) or (t.startswith("mtp.") and not with_mtp):
                del ckpt.files[name]
    elif with_mtp is None:
        with_mtp = cfg.num_mtp_layers > 0
    with torch.device(platform.torch_device):
        net = Transformer(cfg, opts, with_mtp=bool(with_mtp))
    if ckpt is not None:
        load_checkpoint(net, ckpt, progress=progress, expert_map=expert_map)
    else:
        fill_dummy(net, seed)
    compact_dense_weights(net, opts.dtype)  # the compressors' bf16-valued float32 weights held in bf16
    fuse_linear_groups(net)  # after the weights are in: linears of one input become one GEMM
    net.eval()
    return LoadedModel(net, cfg, opts, platform, path)
