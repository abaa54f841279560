"""dsv4: an inference engine for DeepSeek-V4-Flash (PyTorch + Triton).

Layers, lowest first. A package (or top-level module) imports only from its own layer and the layers below,
and no imports form a cycle; tests/test_import_graph.py reads this table and checks both.

    envs, config, configs, tokenizer, numerics: foundations (no dsv4 imports)
    platforms: devices and what they can do
    ops: op semantics, plain-PyTorch references, the registry
    kernels: providers of the ops (Triton, vendor libraries); they register against ops on import
    model, tiny: the transformer, checkpoints, the op table (imports kernels), the built-in tiny model
    cache: per-request state, paged pools, the planner
    engine: one engine; what it needs of several ranks (StepCoordinator) and what front ends use (EngineClient)
    parallel: several ranks: implements StepCoordinator and EngineClient; start_engine picks one rank or many
    serve, bench: the HTTP server and the benchmarks, over an engine
    entry, cli, __main__, dsv4: the public LLM / AsyncLLM and the command line (dsv4: this file)
"""

from dsv4 import envs as _envs  # noqa: F401  (first: sets library defaults before torch loads)

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import dsv4` stays cheap
    if name == "LLM":
        from dsv4.entry import LLM
        return LLM
    if name == "SamplingParams":
        from dsv4.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "AsyncLLM":
        from dsv4.entry import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "AsyncLLM", "__version__"]
