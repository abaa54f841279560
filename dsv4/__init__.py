"""dsv4: an inference engine for DeepSeek-V4-Flash (PyTorch + Triton)."""

__version__ = "0.1.0"
