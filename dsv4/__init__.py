"""dsv4: an inference engine for DeepSeek-V4-Flash (PyTorch + Triton)."""

from dsv4 import envs as _envs  # noqa: F401  (first: sets library defaults before torch loads)

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import dsv4` stays cheap
    if name == "LLM":
        from dsv4.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from dsv4.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "AsyncLLM":
        from dsv4.engine.async_engine import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "AsyncLLM", "__version__"]
