"""Model configuration: one frozen `ModelConfig` built from config.json in either form.

The official release writes DeepSeek's names (`compress_ratios` with one entry per layer plus the MTP
layers, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`, `quantization_config`,
`expert_dtype`); transformers writes its own (`layer_types`, `compress_rates`, `mlp_layer_types`,
`rope_parameters`, `partial_rotary_factor`). Both give the same object. Every field is validated;
a bad value raises `ConfigError` naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWA, CSA, HCA = "swa", "csa", "hca"
HASH_MOE, MOE = "hash", "moe"

_HF_LAYER_TYPES = {
    "sliding_attention": SWA,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
_HF_MLP_TYPES = {"hash_moe": HASH_MOE, "moe": MOE}
_SCORING = ("sqrtsoftplus", "sigmoid", "softmax")
_EXPERT_DTYPES = ("fp4", "fp8", None)


class ConfigError(ValueError):
    """An invalid or unsupported model configuration (names the field and the value)."""


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer family: base theta and optional YaRN frequency blending (no mscale)."""

    theta: float
    yarn: YarnScaling | None = None


@dataclass(frozen=True)
class Fp8Quantization:
    """`quantization_config` of the release: e4m3 weights in 128x128 blocks with E8M0 scales."""

    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str = "ue8m0"
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]  # per main layer: swa | csa | hca
    compress_ratios: tuple[int, ...]  # per main layer: 0 for swa
    mlp_layer_types: tuple[str, ...]  # per main layer: hash | moe
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    swiglu_limit: float
    rms_norm_eps: float
    rope_main: RopeSpec
    rope_compress: RopeSpec
    max_position_embeddings: int
    num_mtp_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False
    quantization: Fp8Quantization | None = None  # None: dense (bf16/fp32) linear weights
    expert_dtype: str | None = None  # fp4 | fp8 | None (dense)
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def num_hash_layers(self) -> int:
        return sum(1 for t in self.mlp_layer_types if t == HASH_MOE)

    @property
    def hc_mix_dim(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    def csa_ratio(self) -> int | None:
        r = {c for t, c in zip(self.layer_types, self.compress_ratios) if t == CSA}
        return r.pop() if r else None

    def rope_for(self, layer_type: str) -> RopeSpec:
        return self.rope_main if layer_type == SWA else self.rope_compress

    def replace(self, **kw) -> "ModelConfig":
        """A copy with fields replaced, validated again (e.g. `num_layers` for a truncated model)."""
        if "num_layers" in kw and "layer_types" not in kw:
            n = kw["num_layers"]
            if not (isinstance(n, int) and 1 <= n <= self.num_layers):
                raise ConfigError(f"num_layers must be in 1..{self.num_layers}, got {n!r}")
            kw.setdefault("layer_types", self.layer_types[:n])
            kw.setdefault("compress_ratios", self.compress_ratios[:n])
            kw.setdefault("mlp_layer_types", self.mlp_layer_types[:n])
        new = dataclasses.replace(self, **kw)
        new.validate()
        return new

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def pos(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"config field {name!r} must be an integer >= {lo}, got {v!r}")

        for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "rope_head_dim",
                  "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                  "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "n_routed_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings"):
            pos(n)
        pos("n_shared_experts", 0)
        pos("num_mtp_layers", 0)
        if self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            raise ConfigError(f"qk_rope_head_dim must be even and <= head_dim ({self.head_dim}), got {self.rope_head_dim}")
        if self.rope_head_dim > self.index_head_dim:
            raise ConfigError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.rope_head_dim})")
        if self.num_heads % self.o_groups:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be divisible by o_groups ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        for name in ("layer_types", "compress_ratios", "mlp_layer_types"):
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries, expected num_hidden_layers = {self.num_layers}")
        for i, (t, r) in enumerate(zip(self.layer_types, self.compress_ratios)):
            if t not in (SWA, CSA, HCA):
                raise ConfigError(f"layer_types[{i}] must be one of swa/csa/hca, got {t!r}")
            if (t == SWA) != (r == 0) or not isinstance(r, int) or r < 0:
                raise ConfigError(f"layer {i}: compress ratio {r!r} does not fit layer type {t!r}")
        if len({r for t, r in zip(self.layer_types, self.compress_ratios) if t == CSA}) > 1:
            raise ConfigError(f"all CSA layers must share one compress ratio, got {self.compress_ratios}")
        for i, t in enumerate(self.mlp_layer_types):
            if t not in (HASH_MOE, MOE):
                raise ConfigError(f"mlp_layer_types[{i}] must be hash or moe, got {t!r}")
        if self.scoring_func not in _SCORING:
            raise ConfigError(f"scoring_func must be one of {_SCORING}, got {self.scoring_func!r}")
        if self.expert_dtype not in _EXPERT_DTYPES:
            raise ConfigError(f"expert_dtype must be fp4, fp8 or absent, got {self.expert_dtype!r}")
        if self.expert_dtype is not None and self.quantization is None:
            raise ConfigError(f"expert_dtype {self.expert_dtype!r} needs quantization_config (FP8 weights)")
        if self.quantization is not None and self.quantization.scale_fmt not in ("ue8m0",):
            raise ConfigError(f"quantization_config.scale_fmt must be 'ue8m0', got {self.quantization.scale_fmt!r}")
        for name in ("hc_eps", "rms_norm_eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"config field {name!r} must be a positive number, got {v!r}")
        for name in ("routed_scaling_factor", "swiglu_limit"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"config field {name!r} must be a positive number, got {v!r}")
        for rs, nm in ((self.rope_main, "rope_theta"), (self.rope_compress, "compress_rope_theta")):
            if not rs.theta > 0:
                raise ConfigError(f"{nm} must be positive, got {rs.theta!r}")
            if rs.yarn is not None and not (rs.yarn.factor >= 1 and rs.yarn.original_max_position_embeddings > 0):
                raise ConfigError(f"rope_scaling invalid: {rs.yarn}")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"torch_dtype must be bfloat16, float16 or float32, got {self.torch_dtype!r}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        try:
            cfg = _parse(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, KeyError, ValueError) as e:  # e.g. int("x"): still a ConfigError naming the file
            raise ConfigError(f"{source}: {type(e).__name__}: {e}") from None
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_official_dict(self) -> dict[str, Any]:
        """config.json in the official release's form (what `make-tiny` writes)."""
        y = self.rope_compress.yarn
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_rope_theta": self.rope_compress.theta,
            "compress_ratios": list(self.compress_ratios) + [0] * self.num_mtp_layers,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": self.scoring_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_main.theta,
            "rope_scaling": None if y is None else {
                "type": "yarn", "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow},
            "max_position_embeddings": self.max_position_embeddings,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "attention_bias": False,
        }
        if self.mlp_layer_types != tuple([HASH_MOE] * self.num_hash_layers + [MOE] * (self.num_layers - self.num_hash_layers)):
            raise ConfigError("hash layers are not a prefix: the official form cannot express this config")
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": q.scale_fmt,
                                        "weight_block_size": list(q.weight_block_size),
                                        "activation_scheme": q.activation_scheme}
        if self.expert_dtype is not None:
            d["expert_dtype"] = self.expert_dtype
        # The official form marks CSA by ratio 4 and nothing else (the parser reads any other non-zero
        # ratio as HCA), so CSA at another ratio must be refused here, not written as HCA.
        if self.layer_types != tuple(_official_type(r) for r in self.compress_ratios):
            raise ConfigError("the official form marks CSA by ratio 4; this config's layer types need the transformers form")
        return d


def _official_type(r: int, csa_ratio: int = 4) -> str:
    return SWA if r == 0 else (CSA if r == csa_ratio else HCA)


def _get(d: dict, *names, default=KeyError):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is KeyError:
        raise ConfigError(f"missing field {names[0]!r}")
    return default


def _parse_yarn(rs: dict | None, field_name: str) -> YarnScaling | None:
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{field_name} must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ConfigError(f"{field_name}: only yarn scaling is supported, got type {kind!r}")
    for k in ("attention_factor", "mscale", "mscale_all_dim"):
        # DeepSeek-V4 applies no YaRN attention scaling (spec §2.4); a config asking for one is not this model
        if rs.get(k) not in (None, 1, 1.0) and not (k != "attention_factor" and rs.get(k) == 0):
            raise ConfigError(f"{field_name}.{k} = {rs[k]!r}: DeepSeek-V4 uses no YaRN attention scaling (expected 1)")
    try:
        return YarnScaling(
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)))
    except KeyError as e:
        raise ConfigError(f"{field_name}: yarn needs field {e.args[0]!r}") from None
    except (TypeError, ValueError):  # e.g. "factor": "sixteen": name the field, not just the bad string
        raise ConfigError(f"{field_name}: yarn fields must be numbers, got {rs!r}") from None


def _parse(d: dict[str, Any]) -> ModelConfig:
    mt = d.get("model_type", "deepseek_v4")
    if mt != "deepseek_v4":
        raise ConfigError(f"model_type must be 'deepseek_v4', got {mt!r}")
    n = _get(d, "num_hidden_layers", "n_layers")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_hidden_layers must be a positive integer, got {n!r}")
    n_mtp = _get(d, "num_nextn_predict_layers", "n_mtp_layers", default=0)
    head_dim = _get(d, "head_dim")

    # Layer schedule: transformers' layer_types + compress_rates, or official compress_ratios.
    if d.get("layer_types") is not None:
        rates = dict(_get(d, "compress_rates", default={}) or {})
        rates.setdefault("compressed_sparse_attention", d.get("compress_rate_csa") or 4)
        rates.setdefault("heavily_compressed_attention", d.get("compress_rate_hca") or 128)
        lt = list(d["layer_types"])
        if len(lt) < n:
            raise ConfigError(f"layer_types has {len(lt)} entries, expected num_hidden_layers = {n}")
        types, ratios = [], []
        for i, t in enumerate(lt[:n]):
            if t not in _HF_LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] = {t!r} is not one of {sorted(_HF_LAYER_TYPES)}")
            types.append(_HF_LAYER_TYPES[t])
            if t != "sliding_attention" and (isinstance(rates[t], bool) or not isinstance(rates[t], int)):
                raise ConfigError(f"compress_rates[{t!r}] must be an integer, got {rates[t]!r}")
            ratios.append(0 if t == "sliding_attention" else rates[t])
        if "compress_ratios" in d and d["compress_ratios"] is not None:
            off = [int(r) for r in d["compress_ratios"][:n]]
            if off != ratios:
                raise ConfigError(f"compress_ratios {off} disagree with layer_types/compress_rates {ratios}")
    else:
        cr = _get(d, "compress_ratios")
        if not isinstance(cr, (list, tuple)) or not all(isinstance(r, int) and r >= 0 for r in cr):
            raise ConfigError(f"compress_ratios must be a list of non-negative integers, got {cr!r}")
        if len(cr) not in (n, n + n_mtp):
            raise ConfigError(f"compress_ratios has {len(cr)} entries, expected num_hidden_layers + "
                              f"num_nextn_predict_layers = {n} + {n_mtp}")
        ratios = list(cr[:n])
        types = [_official_type(r) for r in ratios]
        for i, r in enumerate(cr[n:]):
            if r != 0:
                raise ConfigError(f"compress_ratios[{n + i}] (MTP layer) = {r}: only sliding-window MTP layers are supported")

    if d.get("mlp_layer_types") is not None:
        ml = list(d["mlp_layer_types"])
        if len(ml) < n:
            raise ConfigError(f"mlp_layer_types has {len(ml)} entries, expected num_hidden_layers = {n}")
        mlp = []
        for i, t in enumerate(ml[:n]):
            if t not in _HF_MLP_TYPES:
                raise ConfigError(f"mlp_layer_types[{i}] = {t!r} is not one of {sorted(_HF_MLP_TYPES)}")
            mlp.append(_HF_MLP_TYPES[t])
        if d.get("num_hash_layers") is not None and d["num_hash_layers"] != sum(t == HASH_MOE for t in mlp):
            raise ConfigError(f"num_hash_layers {d['num_hash_layers']} disagrees with mlp_layer_types")
    else:
        nh = _get(d, "num_hash_layers", "n_hash_layers", default=3)
        if not isinstance(nh, int) or nh < 0:
            raise ConfigError(f"num_hash_layers must be a non-negative integer, got {nh!r}")
        mlp = [HASH_MOE] * min(n, nh) + [MOE] * max(0, n - nh)

    # Rotary dims and parameters.
    rope_dim = d.get("qk_rope_head_dim", d.get("rope_head_dim"))
    rp = d.get("rope_parameters") or {}
    prf = d.get("partial_rotary_factor")
    if prf is None and isinstance(rp.get("main"), dict):
        prf = rp["main"].get("partial_rotary_factor")
    if rope_dim is None:
        if prf is None:
            raise ConfigError("missing field 'qk_rope_head_dim' (or partial_rotary_factor)")
        rope_dim = int(round(head_dim * prf))
    elif prf is not None and int(round(head_dim * prf)) != rope_dim:
        raise ConfigError(f"qk_rope_head_dim {rope_dim} disagrees with partial_rotary_factor {prf} x head_dim {head_dim}")

    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main_theta = float(rp["main"].get("rope_theta", d.get("rope_theta", 10000.0)))
        comp_theta = float(rp["compress"].get("rope_theta", d.get("compress_rope_theta", 160000.0)))
        main_yarn = _parse_yarn(rp["main"], "rope_parameters.main")
        comp_yarn = _parse_yarn(rp["compress"], "rope_parameters.compress")
        if main_yarn is not None:
            raise ConfigError("rope_parameters.main: YaRN on sliding-window layers is not part of DeepSeek-V4")
    else:
        main_theta = float(_get(d, "rope_theta", default=10000.0))
        comp_theta = float(_get(d, "compress_rope_theta", default=160000.0))
        rs = d.get("rope_scaling")
        if rs is None and rp:
            rs = rp
        comp_yarn = _parse_yarn(rs, "rope_scaling")

    q = d.get("quantization_config")
    quant = None
    if q is not None:
        if not isinstance(q, dict):
            raise ConfigError(f"quantization_config must be an object, got {q!r}")
        if q.get("quant_method") != "fp8":
            raise ConfigError(f"quantization_config.quant_method must be 'fp8', got {q.get('quant_method')!r}")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config.fmt must be 'e4m3', got {q.get('fmt')!r}")
        bs = q.get("weight_block_size", (128, 128))
        if not isinstance(bs, (list, tuple)) or tuple(bs) != (128, 128):
            raise ConfigError(f"quantization_config.weight_block_size must be [128, 128], got {bs!r}")
        bs = tuple(bs)
        quant = Fp8Quantization(weight_block_size=bs, scale_fmt=q.get("scale_fmt", "ue8m0") or "ue8m0",
                                activation_scheme=q.get("activation_scheme", "dynamic"))
    expert_dtype = d.get("expert_dtype")
    if expert_dtype is None and quant is not None:
        expert_dtype = "fp8"  # the "FP8 mixed" Base checkpoints: experts in FP8 like the rest
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act must be 'silu', got {d.get('hidden_act')!r}")
    if d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"num_key_value_heads must be 1 (shared K=V), got {d.get('num_key_value_heads')!r}")
    if d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"topk_method must be 'noaux_tc', got {d.get('topk_method')!r}")
    eos = d.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"

    return ModelConfig(
        vocab_size=_get(d, "vocab_size"),
        hidden_size=_get(d, "hidden_size", "dim"),
        num_layers=n,
        num_heads=_get(d, "num_attention_heads", "n_heads"),
        head_dim=head_dim,
        rope_head_dim=rope_dim,
        q_lora_rank=_get(d, "q_lora_rank"),
        o_groups=_get(d, "o_groups"),
        o_lora_rank=_get(d, "o_lora_rank"),
        sliding_window=_get(d, "sliding_window", "window_size"),
        layer_types=tuple(types),
        compress_ratios=tuple(int(r) for r in ratios),
        mlp_layer_types=tuple(mlp),
        index_n_heads=_get(d, "index_n_heads"),
        index_head_dim=_get(d, "index_head_dim"),
        index_topk=_get(d, "index_topk"),
        hc_mult=_get(d, "hc_mult", default=4),
        hc_sinkhorn_iters=_get(d, "hc_sinkhorn_iters", default=20),
        hc_eps=_get(d, "hc_eps", default=1e-6),
        n_routed_experts=_get(d, "n_routed_experts"),
        n_shared_experts=_get(d, "n_shared_experts", default=1),
        num_experts_per_tok=_get(d, "num_experts_per_tok", "n_activated_experts"),
        moe_intermediate_size=_get(d, "moe_intermediate_size", "moe_inter_dim"),
        scoring_func=_get(d, "scoring_func", "score_func", default="sqrtsoftplus"),
        norm_topk_prob=bool(_get(d, "norm_topk_prob", default=True)),
        routed_scaling_factor=_get(d, "routed_scaling_factor", "route_scale", default=1.0),
        swiglu_limit=_get(d, "swiglu_limit", default=10.0),
        rms_norm_eps=_get(d, "rms_norm_eps", "norm_eps", default=1e-6),
        rope_main=RopeSpec(main_theta, None),
        rope_compress=RopeSpec(comp_theta, comp_yarn),
        max_position_embeddings=_get(d, "max_position_embeddings", default=1048576),
        num_mtp_layers=n_mtp,
        bos_token_id=d.get("bos_token_id", 0),
        eos_token_ids=eos_ids,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        quantization=quant,
        expert_dtype=expert_dtype,
        torch_dtype=str(dtype).replace("torch.", ""),
        extra={k: v for k, v in d.items()},
    )


KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8")


MAX_SPECULATIVE_TOKENS = 8


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model: what to load, on which device, and the serving limits.

    kv_cache_dtype: "auto" stores window and compressed KV in the activation dtype; "fp8" stores the
    non-rotary dims in FP8 (platform dialect, per-64 power-of-two scales) and the rotary dims in the
    activation dtype. Decode steps replay captured device graphs (engine/cuda_graphs.py) where the
    platform supports graphs and every op's provider is capturable, unless `enforce_eager`. Cache memory:
    `kv_cache_memory` bytes if given, else `gpu_memory_utilization` of
    the GPU's memory minus weights and the profiled activation peak (on the CPU: 1 GiB by default).
    `gpus` > 1: that many ranks (processes) on this node, each holding the attention and 1/gpus of the
    routed experts and serving its own requests (on the CPU: ranks sharing the CPU, for tests); cache limits
    (max_num_seqs, memory) are per rank.
    """

    model: str = "tiny"
    device: str | None = None
    dtype: str = "bfloat16"
    numerics: str = "official"
    load_format: str = "auto"
    seed: int = 0
    num_layers: int | None = None
    op_overrides: tuple = ()  # ((op name, provider), ...)
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # decode-latency budget: at most this many prefill tokens share a step with decodes (None: the whole
    # max_num_batched_tokens); a long prompt arriving then slows running decodes by a bounded amount
    prefill_tokens_with_decodes: int | None = None
    # decode-latency budget from measured step times (engine/latency_budget.py): a step with decodes may take at
    # most this multiple of a decode-only step; the prefill tokens joining it adapt (at least 16, at most
    # prefill_tokens_with_decodes or max_num_batched_tokens). None: off (the token cap alone)
    decode_latency_budget: float | None = None
    max_model_len: int | None = None
    page_tokens: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True: never use captured graphs (decode, verify, piecewise)
    # piecewise graphs (engine/piecewise_graphs.py) for steps decode graphs do not cover (prefill chunks, prefill
    # mixed with decodes) of up to this many tokens (None: min(max_num_batched_tokens, 2048); 0: off)
    piecewise_graph_tokens: int | None = None
    gpus: int = 1  # > 1: expert parallelism over GPUs 0..gpus-1 of this node, one front end (dsv4/parallel)
    # expert parallelism: how eager steps move tokens to the experts' ranks ("allgather": every token to every
    # rank; "alltoall": only to the ranks holding its experts); decode graphs always all-gather (parallel/ep.py)
    ep_exchange: str = "allgather"
    # speculative decoding: drafts per step from the checkpoint's MTP block, verified in one target forward
    # (engine/spec_decode.py); 0: off
    speculative_tokens: int = 0
    # speculation pauses while more than this many requests decode in a step (no drafts; the MTP block still writes
    # its window ring for every token, so drafts resume at full quality): where verification costs more than the
    # drafts save (large, compute-bound batches). None: never pauses. Not applied under expert parallelism
    speculative_disable_by_batch_size: int | None = None
    # automatic prefix caching (cache/prefix_cache.py): full pages and slot snapshots at page boundaries kept
    # for later requests with the same prefix; `prefix_cache_snapshots` slot snapshots (None: 2 x max_num_seqs,
    # at most a tenth of the cache memory)
    enable_prefix_caching: bool = False
    prefix_cache_snapshots: int | None = None
    # decode steps launched before the previous step's tokens are read back, so the host's output work overlaps
    # the device (engine/async_decode.py); applies to pure decode steps without speculative decoding or expert
    # parallelism. False: every step waits for its tokens before the next is scheduled
    async_scheduling: bool = True

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "gpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        v = self.speculative_disable_by_batch_size
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"speculative_disable_by_batch_size must be an integer >= 0 or None, got {v!r}")
        for name in ("prefill_tokens_with_decodes", "page_tokens", "prefix_cache_snapshots"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        v = self.decode_latency_budget
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1.0):
            raise ConfigError(f"decode_latency_budget must be a number > 1 (a multiple of a decode-only step) or "
                              f"None, got {v!r}")
        v = self.piecewise_graph_tokens
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"piecewise_graph_tokens must be an integer >= 0 (0: off) or None, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not (0 < self.gpu_memory_utilization <= 1):
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0):
            raise ConfigError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.ep_exchange not in ("allgather", "alltoall"):
            raise ConfigError(f"ep_exchange must be 'allgather' or 'alltoall', got {self.ep_exchange!r}")
        n = self.speculative_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"speculative_tokens must be an integer in 0..{MAX_SPECULATIVE_TOKENS}, got {n!r}")


def parse_bytes(s: str | int) -> int:
    """"4GiB", "512MiB", "1e9", 123 -> bytes."""
    if isinstance(s, int):
        return s
    t = str(s).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    low = t.lower()
    for u in sorted(units, key=len, reverse=True):
        if low.endswith(u):
            try:
                return int(float(low[: -len(u)].strip()) * units[u])
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise ConfigError(f"not a memory size: {s!r} (e.g. 8GiB, 512MiB, 1e9)") from None
