"""Offline batch inference: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dsv4.config import ConfigError, EngineConfig
from dsv4.engine.client import EngineClient
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict


def start_one_rank(config: EngineConfig, dist=None) -> LLMEngine:
    """The engine of a front end of this package: one device. Several ranks are started by
    dsv4.parallel.launch.start_engine, a layer above, which the public dsv4.LLM / dsv4.AsyncLLM use."""
    if config.gpus > 1 or dist is not None:
        raise ConfigError(f"dsv4.engine's LLM / AsyncLLM run on one device (gpus={config.gpus}"
                          f"{', under torchrun' if dist is not None else ''}): use dsv4.LLM / dsv4.AsyncLLM, "
                          "which start several ranks")
    return LLMEngine(config)


def _normalise_prompts(prompts) -> list[str | list[int]]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif prompts and isinstance(prompts, (list, tuple)) and all(isinstance(t, int) for t in prompts):
        prompts = [list(prompts)]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                p = list(p["prompt_token_ids"])
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise ValueError(f"prompt {i}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if not isinstance(p, (str, list)):
            raise ValueError(f"prompt {i}: expected text, a list of token ids or a dict, got {type(p).__name__}")
        out.append(p)
    return out


class LLM:
    """Runs the engine to completion over a batch of prompts (continuous batching inside).

    LLM(model="tiny" | checkpoint folder, device=..., dtype=..., kv_cache_dtype=..., max_num_seqs=...,
        max_num_batched_tokens=..., max_model_len=..., kv_cache_memory=..., gpus=..., ...)  (EngineConfig fields)

    The engine is an EngineClient (engine/client.py), made by `start_engine(config, dist)`: here one device
    only; the public dsv4.LLM (dsv4/entry.py) binds dsv4.parallel.launch.start_engine, which starts one rank
    or many.
    """

    start_engine = staticmethod(start_one_rank)

    def __init__(self, model: str = "tiny", **kwargs):
        self.engine: EngineClient = self.start_engine(EngineConfig(model=str(model), **kwargs), None)

    @classmethod
    def from_config(cls, config: EngineConfig, dist=None) -> "LLM":
        """`dist` (dsv4.parallel.launch.DistSpec): this process is rank 0 of a torchrun-started group."""
        self = cls.__new__(cls)
        self.engine = cls.start_engine(config, dist)
        return self

    @classmethod
    def from_engine(cls, engine: EngineClient) -> "LLM":
        """Drive an engine that is already started."""
        self = cls.__new__(cls)
        self.engine = engine
        return self

    def shutdown(self) -> None:
        """Stop the other ranks of an expert-parallel engine (nothing to do for one device)."""
        self.engine.shutdown()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (prefix caching; requests running keep what they hold)."""
        reset = getattr(self.engine, "reset_prefix_cache", None)
        if reset is None:
            raise NotImplementedError("reset_prefix_cache: an expert-parallel engine caches on every rank; "
                                      "restart it to empty the caches")
        reset()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        plist = _normalise_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(plist)
        else:
            params = list(sampling_params)
            if len(params) != len(plist):
                raise ValueError(f"{len(params)} sampling params for {len(plist)} prompts")
        for p in params:
            p.validate(self.engine.cfg.vocab_size)
        eng = self.engine
        added = []
        try:
            for i, (prompt, sp) in enumerate(zip(plist, params)):
                for j in range(sp.n):
                    seed = None if sp.seed is None else sp.seed + j
                    sub = dataclasses.replace(sp, n=1, seed=seed)
                    added.append(eng.add_request(prompt, sub, request_id=f"llm-{id(self)}-{i}-{j}"))
        except Exception:
            for r in added:
                eng.abort_request(r.request_id)
            raise
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(added), desc="generating", unit="req")
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        k = 0
        for i, sp in enumerate(params):
            outs = [final[added[k + j].request_id] for j in range(sp.n)]
            k += sp.n
            first = outs[0]
            comps = []
            for j, o in enumerate(outs):
                c = o.outputs[0]
                c.index = j
                comps.append(c)
            results.append(dataclasses.replace(first, request_id=str(i), outputs=comps,
                                               error="; ".join(o.error for o in outs if o.error) or None))
        return results
