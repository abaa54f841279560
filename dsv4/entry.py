"""The public front ends, `dsv4.LLM` and `dsv4.AsyncLLM`: the engine package's LLM and AsyncLLM with the engine
started by dsv4.parallel.launch.start_engine, the one place that decides one rank or many (a plain LLMEngine
for one device; rank 0's DPEngine over `gpus` ranks, or over a torchrun group given as `dist`). This module
sits above both engine/ and parallel/ (the layer table in dsv4/__init__.py), so neither imports the other
upward; the CLI starts its engines here too.

    llm = LLM(model="tiny", gpus=2)               # or LLM.from_config(EngineConfig(...), dist)
    llm = AsyncLLM(EngineConfig(model="tiny"))    # or AsyncLLM(engine=<an EngineClient>)
    llm = AsyncLLM(EngineConfig(model="tiny", gpus=2), engine_process=True)   # the engine in a core process
                                                  # (it starts the other ranks itself)
"""

from __future__ import annotations

from dsv4.engine import async_engine, llm
from dsv4.parallel.launch import start_engine

__all__ = ["LLM", "AsyncLLM", "start_engine"]


class LLM(llm.LLM):
    """Offline batch inference (dsv4.engine.llm.LLM) on one device or several ranks: LLM(model=..., gpus=N, ...)
    with EngineConfig's fields, or LLM.from_config(config, dist) on rank 0 of a torchrun group."""

    start_engine = staticmethod(start_engine)


class AsyncLLM(async_engine.AsyncLLM):
    """The async front end for serving (dsv4.engine.async_engine.AsyncLLM) on one device or several ranks:
    AsyncLLM(config, dist=None) or AsyncLLM(**EngineConfig fields), or AsyncLLM(engine=...) to drive one;
    `engine_process=True` starts the engine (through this same start_engine) in a core process
    (engine/core_process.py), which `dsv4 serve` does by default."""

    start_engine = staticmethod(start_engine)
