"""Helpers to build random transformers DeepseekV4ForCausalLM models for parity tests."""

from __future__ import annotations

import torch

HF_BASE = dict(
    vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, index_n_heads=4,
    index_head_dim=16, qk_rope_head_dim=8, hc_mult=4, max_position_embeddings=4096,
    rope_parameters={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1},
)


def make_hf_model(seed: int = 0, **overrides):
    """A random fp32 transformers model with every degenerate default (zero sinks, ape, biases, mHC
    bases, all-zero tid2eid, unit norms) replaced by random non-degenerate values."""
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    transformers.logging.set_verbosity_error()
    kw = dict(HF_BASE)
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**kw)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "tid2eid":
                n_exp = cfg.n_routed_experts
                p.copy_(torch.rand(p.shape[0], n_exp, generator=g).argsort(dim=1)[:, : p.shape[1]])
            elif leaf in ("sinks", "position_bias", "e_score_correction_bias", "base", "hc_base"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight") or leaf == "weight" and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("gate_up_proj", "down_proj") and p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.dim() == 2 and leaf in ("weight", "fn", "hc_fn") and p.is_floating_point():
                scale = 0.05 if leaf in ("fn", "hc_fn") else 1 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits [N, V] for every position: one forward call, or several calls with a cache."""
    from transformers import DynamicCache

    if chunks is None:
        return model(ids[None], use_cache=False).logits[0]
    cache = DynamicCache(config=model.config)
    out, p = [], 0
    for c in chunks:
        out.append(model(ids[None, p:p + c], past_key_values=cache, use_cache=True).logits[0])
        p += c
    return torch.cat(out)
