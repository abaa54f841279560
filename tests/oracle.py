"""The test oracle: a plain batched generation loop over one model, without the engine (no scheduler, no
pages to reuse, no graphs, one sampler of its own). Every prompt is prefilled in one step, then all
sequences decode together until each meets EOS or max_tokens. The engine's outputs are checked against it
(tests/engine/test_engine_consistency.py, tests/parallel/)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dsv4.cache.direct import DirectCache
from dsv4.model.builder import LoadedModel


def validate_sampling(temperature: float, top_p: float) -> None:
    if not (temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] float32 logits -> [B] int64 token ids: greedy (temperature 0), temperature, nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(dim=-1) - sp < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # model log-probability of each generated token
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class GenerateResult:
    outputs: list[Generation]
    prefill_seconds: float
    decode_seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.generated_tokens - len(self.outputs)
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else float("nan")


@torch.no_grad()
def generate(lm: LoadedModel, prompts: list[list[int]], max_tokens: int = 32, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, stop_token_ids: tuple[int, ...] | None = None,
             ignore_eos: bool = False) -> GenerateResult:
    validate_sampling(temperature, top_p)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    V = lm.cfg.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary 0..{V - 1}")
    stop = set(lm.cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    dev = lm.platform.torch_device
    model = lm.model
    dc = DirectCache(lm.cfg, len(prompts), max(len(p) for p in prompts) + max_tokens, dev, lm.opts.dtype)
    slots = [dc.add() for _ in prompts]
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    outs = [Generation(list(p)) for p in prompts]

    def step(active: list[int], start: list[int], tokens: list[list[int]]) -> None:
        meta = dc.meta([slots[i] for i in active], start, [len(t) for t in tokens])
        ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.int64, device=dev)
        X = model(ids, meta, dc.cache)
        last = torch.tensor(meta.query_start_host[1:], device=dev) - 1
        logits = model.logits(X[last])
        nxt = sample(logits, temperature, top_p, gen)
        lp = torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None])[:, 0]
        for i, t, l in zip(active, nxt.tolist(), lp.tolist()):
            o = outs[i]
            o.token_ids.append(t)
            o.logprobs.append(l)
            if t in stop and not ignore_eos:
                o.finish_reason = "stop"
            elif len(o.token_ids) >= max_tokens:
                o.finish_reason = "length"

    t0 = time.perf_counter()
    step(list(range(len(prompts))), [0] * len(prompts), prompts)
    _sync(dev)
    t1 = time.perf_counter()
    while True:
        active = [i for i, o in enumerate(outs) if o.finish_reason is None]
        if not active:
            break
        step(active, [len(outs[i].prompt_token_ids) + len(outs[i].token_ids) - 1 for i in active],
             [[outs[i].token_ids[-1]] for i in active])
    _sync(dev)
    t2 = time.perf_counter()
    for s in slots:
        dc.remove(s)
    return GenerateResult(outs, t1 - t0, t2 - t1)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
