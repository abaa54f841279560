"""The official on-disk tensor inventory (spec §3.2), derived from a config.

`official_tensors(cfg)` lists every tensor of a release-format checkpoint with its shape and
safetensors dtype. For the DeepSeek-V4-Flash config it gives exactly the release's 69,187 tensors and
159,609,485,896 bytes (tests check this), so it is also the definition `make-tiny` writes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4.config import CSA, HASH_MOE, SWA, ModelConfig

DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    role: str  # fp8_weight | fp8_scale | fp4_weight | fp4_scale | norm | hc_fn | hc_base | hc_scale | sink | ape
    #            | dense (BF16 linear) | gate | bias | tid2eid | embed | head

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def _linear(out: list, name: str, n_out: int, n_in: int, quantised: bool) -> None:
    if quantised:
        out.append(TensorSpec(f"{name}.weight", (n_out, n_in), "F8_E4M3", "fp8_weight"))
        out.append(TensorSpec(f"{name}.scale", (math.ceil(n_out / 128), math.ceil(n_in / 128)), "F8_E8M0", "fp8_scale"))
    else:
        out.append(TensorSpec(f"{name}.weight", (n_out, n_in), "BF16", "dense"))


def _expert(out: list, name: str, n_out: int, n_in: int, fmt: str | None) -> None:
    if fmt == "fp4":
        out.append(TensorSpec(f"{name}.weight", (n_out, n_in // 2), "I8", "fp4_weight"))
        out.append(TensorSpec(f"{name}.scale", (n_out, math.ceil(n_in / 32)), "F8_E8M0", "fp4_scale"))
    else:
        _linear(out, name, n_out, n_in, fmt == "fp8")


def _hc(out: list, prefix: str, rows: int, width: int, scales: int) -> None:
    out.append(TensorSpec(f"{prefix}_fn", (rows, width), "F32", "hc_fn"))
    out.append(TensorSpec(f"{prefix}_base", (rows,), "F32", "hc_base"))
    out.append(TensorSpec(f"{prefix}_scale", (scales,), "F32", "hc_scale"))


def _compressor(out: list, p: str, cfg: ModelConfig, dim: int, ratio: int, overlap: bool) -> None:
    c = 2 if overlap else 1
    out.append(TensorSpec(f"{p}.ape", (ratio, c * dim), "F32", "ape"))
    out.append(TensorSpec(f"{p}.wkv.weight", (c * dim, cfg.hidden_size), "BF16", "dense"))
    out.append(TensorSpec(f"{p}.wgate.weight", (c * dim, cfg.hidden_size), "BF16", "dense"))
    out.append(TensorSpec(f"{p}.norm.weight", (dim,), "BF16", "norm"))


def _block(out: list, p: str, cfg: ModelConfig, layer_type: str, ratio: int, mlp_type: str) -> None:
    q = cfg.quantization is not None
    D, H, d, n = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.hc_mult
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    _hc(out, f"{p}.hc_attn", cfg.hc_mix_dim, n * D, 3)
    _hc(out, f"{p}.hc_ffn", cfg.hc_mix_dim, n * D, 3)
    out.append(TensorSpec(f"{p}.attn_norm.weight", (D,), "BF16", "norm"))
    out.append(TensorSpec(f"{p}.ffn_norm.weight", (D,), "BF16", "norm"))
    a = f"{p}.attn"
    out.append(TensorSpec(f"{a}.attn_sink", (H,), "F32", "sink"))
    _linear(out, f"{a}.wq_a", cfg.q_lora_rank, D, q)
    out.append(TensorSpec(f"{a}.q_norm.weight", (cfg.q_lora_rank,), "BF16", "norm"))
    _linear(out, f"{a}.wq_b", H * d, cfg.q_lora_rank, q)
    _linear(out, f"{a}.wkv", d, D, q)
    out.append(TensorSpec(f"{a}.kv_norm.weight", (d,), "BF16", "norm"))
    _linear(out, f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, H * d // cfg.o_groups, q)
    _linear(out, f"{a}.wo_b", D, cfg.o_groups * cfg.o_lora_rank, q)
    if layer_type != SWA:
        _compressor(out, f"{a}.compressor", cfg, d, ratio, layer_type == CSA)
    if layer_type == CSA:
        _linear(out, f"{a}.indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, q)
        out.append(TensorSpec(f"{a}.indexer.weights_proj.weight", (cfg.index_n_heads, D), "BF16", "dense"))
        _compressor(out, f"{a}.indexer.compressor", cfg, cfg.index_head_dim, ratio, True)
    f = f"{p}.ffn"
    out.append(TensorSpec(f"{f}.gate.weight", (E, D), "BF16", "gate"))
    if mlp_type == HASH_MOE:
        out.append(TensorSpec(f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "I64", "tid2eid"))
    else:
        out.append(TensorSpec(f"{f}.gate.bias", (E,), "F32", "bias"))
    for e in range(E):
        _expert(out, f"{f}.experts.{e}.w1", I, D, cfg.expert_dtype)
        _expert(out, f"{f}.experts.{e}.w2", D, I, cfg.expert_dtype)
        _expert(out, f"{f}.experts.{e}.w3", I, D, cfg.expert_dtype)
    if cfg.n_shared_experts:
        Is = cfg.shared_intermediate_size
        _linear(out, f"{f}.shared_experts.w1", Is, D, q)
        _linear(out, f"{f}.shared_experts.w2", D, Is, q)
        _linear(out, f"{f}.shared_experts.w3", Is, D, q)


def official_tensors(cfg: ModelConfig, with_mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of the release-format checkpoint for `cfg`, in file order."""
    D, n, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    q = cfg.quantization is not None
    out = [TensorSpec("embed.weight", (V, D), "BF16", "embed")]
    for i, (t, r, m) in enumerate(zip(cfg.layer_types, cfg.compress_ratios, cfg.mlp_layer_types)):
        _block(out, f"layers.{i}", cfg, t, r, m)
    _hc(out, "hc_head", n, n * D, 1)
    out.append(TensorSpec("norm.weight", (D,), "BF16", "norm"))
    out.append(TensorSpec("head.weight", (V, D), "BF16", "head"))
    for j in range(cfg.num_mtp_layers if with_mtp else 0):
        p = f"mtp.{j}"
        _block(out, p, cfg, SWA, 0, "moe")
        _linear(out, f"{p}.e_proj", D, D, q)
        _linear(out, f"{p}.h_proj", D, D, q)
        for nm in ("enorm", "hnorm", "norm"):
            out.append(TensorSpec(f"{p}.{nm}.weight", (D,), "BF16", "norm"))
        _hc(out, f"{p}.hc_head", n, n * D, 1)
    return out
