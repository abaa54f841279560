"""Token sampling from float32 logits: greedy (temperature 0), temperature, nucleus (top-p)."""

from __future__ import annotations

import torch


def validate_sampling(temperature: float, top_p: float) -> None:
    if not (temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] float32 logits -> [B] int64 token ids."""
    validate_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(dim=-1) - sp < top_p  # the smallest prefix whose mass reaches top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
