"""The DeepSeek-V4 model: modules, checkpoint format, loading."""

from dsv4.model.builder import LoadedModel, build_model, resolve_model  # noqa: F401
from dsv4.model.deepseek_v4 import Transformer  # noqa: F401
from dsv4.model.options import ModelOptions  # noqa: F401
