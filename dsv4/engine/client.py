"""What the front ends use of an engine: `LLM`, `AsyncLLM`, the HTTP server, the benchmarks and the CLI
drive an `EngineClient`, so that they drive one device or several ranks alike. `LLMEngine`
(engine/llm_engine.py) is one; rank 0's `DPEngine` (parallel/dp_engine.py) is one over N expert-parallel
ranks. It is defined here so that engine/ never imports dsv4.parallel: parallel/ implements it and depends
on engine/, never the reverse.

Which of the two a front end gets is decided in one place, dsv4.parallel.launch.start_engine; the public
dsv4.LLM / dsv4.AsyncLLM start their engine there (dsv4/entry.py). The engine package's own LLM / AsyncLLM
start one rank only (`start_one_rank`, engine/llm.py), or drive an engine they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from dsv4.cache.planner import CachePlan
    from dsv4.config import EngineConfig, ModelConfig
    from dsv4.engine.outputs import RequestOutput
    from dsv4.engine.request import Request
    from dsv4.engine.sampling_params import SamplingParams
    from dsv4.model.builder import LoadedModel
    from dsv4.tokenizer import Tokenizer


class EngineClient(Protocol):
    config: EngineConfig  # what it was started with (of one rank: each rank has one device)
    cfg: ModelConfig
    lm: LoadedModel  # the model in this process (under expert parallelism: rank 0's share of the experts)
    tokenizer: Tokenizer
    max_model_len: int  # prompt + output tokens of one request
    device: torch.device  # this process's device
    plan: CachePlan  # the KV cache of one rank (every rank has the same plan)
    world: int  # ranks (1: one device)
    num_steps: int  # engine steps so far

    @property
    def graph_steps(self) -> int:
        """Steps replayed from captured decode graphs so far (every rank takes the same kind of step)."""

    @property
    def closed(self) -> bool:
        """True once it can take no more steps (an expert-parallel group whose ranks were stopped)."""

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Validate and queue a request (ValueError: a bad request, nothing queued)."""

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its final output now, or (a request on another rank) from the next step."""

    def step(self) -> list[RequestOutput]:
        """One engine step: the outputs of the requests that made progress or ended."""

    def has_unfinished_requests(self) -> bool: ...

    def num_unfinished_requests(self) -> int: ...

    def load(self) -> dict:
        """Queue and cache occupancy (waiting, running, free_pages, pages, free_slots, slots), over all ranks."""

    def shutdown(self) -> None:
        """Release what it holds (stop the other ranks); unfinished requests are dropped."""
