"""Checkpoint tensor names -> the model's buffers.

The model's buffers carry the official names (`layers.N.attn.wq_a.weight`, `.scale`, ...), except the
routed experts, which it holds stacked per layer (`ffn.experts.w13` = [w1; w3] of every expert,
`ffn.experts.w2`, and their `_scale`s). Accepted checkpoint spellings:
  - the official release (what `make-tiny` writes);
  - transformers' module names (`model.layers.N.self_attn.q_a_proj.weight`, `mlp.experts.gate_up_proj`,
    `weight_scale_inv`, ...; spec §3.6);
  - what transformers' `save_pretrained` writes for DeepSeek-V4 (official names under `model.`, plus
    `model.embed_tokens.weight`, `model.hc_head.hc_fn`, and `attn.norm.weight` for the attention kv_norm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (pattern, replacement) applied in order to a name with any leading "model." removed.
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), r) for p, r in [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.weight_scale_inv$", ".scale"),
    # transformers' indexer lives inside the compressor and owns its compressor's weights directly
    (r"\.attn\.compressor\.indexer\.(kv_proj|gate_proj|position_bias|kv_norm)", r".attn.indexer.compressor.\1"),
    (r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"^((?:layers|mtp)\.\d+)\.attn\.norm\.weight$", r"\1.attn.kv_norm.weight"),  # save_pretrained's spelling
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]]

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w1|w2|w3)\.(weight|scale)$")
_STACKED = re.compile(r"^(.*\.ffn\.experts)\.(gate_up_proj|down_proj)(_scale_inv|_scale)?$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: buffer `name`, and within it expert `expert` (None: whole
    buffer along dim 0) and half `half` of the stacked w13 (0: w1, 1: w3, None: all)."""

    name: str
    expert: int | None = None
    half: int | None = None

    def piece(self) -> tuple:
        return (self.name, self.expert, self.half)


def official_name(name: str) -> str:
    """The official spelling of a checkpoint tensor name (unchanged if it already is one)."""
    if name.startswith("model."):
        name = name[len("model."):]
    for pat, rep in _RULES:
        name = pat.sub(rep, name)
    return name


def target_of(name: str) -> Target:
    """The model buffer (and piece of it) a checkpoint tensor fills."""
    n = official_name(name)
    m = _EXPERT.match(n)
    if m:
        base, e, w, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        buf = f"{base}.{'w2' if w == 'w2' else 'w13'}" + ("_scale" if kind == "scale" else "")
        return Target(buf, e, None if w == "w2" else (0 if w == "w1" else 1))
    m = _STACKED.match(n)
    if m:
        buf = f"{m.group(1)}.{'w13' if m.group(2) == 'gate_up_proj' else 'w2'}" + ("_scale" if m.group(3) else "")
        return Target(buf)
    return Target(n)
