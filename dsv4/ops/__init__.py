"""Ops: one module per op, each with its docstring (semantics, shapes, dtypes) and its plain-PyTorch
reference; providers (Triton, vendor) register against them. `resolve(platform)` binds one provider per
op for the life of a model (see registry.py)."""

from dsv4.ops import (attention, compressor, hyper_connection, indexer, linear, logits, moe, norm,  # noqa: F401
                      quant, rope)
from dsv4.ops.registry import OpResolutionError, OpTable, all_ops, parse_overrides, resolve  # noqa: F401
