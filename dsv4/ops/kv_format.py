"""Storage formats of K=V rows (window rings, compressed entries, indexer keys).

A KV store is either
  - a float tensor [*lead, D] (bf16 / fp16 / fp32): rows stored as they are, or
  - an `Fp8KV`: the D - r non-rotary dims as FP8 e4m3 bytes in the platform's dialect with one
    power-of-two E8M0 scale per 64 dims (the official KV simulation's blocks), and the r rotary dims in
    a float dtype. For Flash that is 448 + 7 + 128 = 583 bytes per 512-dim row instead of 1,024.
`kv_read` / `kv_write` index the lead dims like tensor indexing (`store[idx]`) and convert on the way.
Rows already rounded through the official FP8 simulation (same 64-wide blocks, power-of-two scales)
are stored exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.numerics.fp8 import Fp8Dialect, dequantize_fp8_blocks, quantize_fp8_blocks

FP8_BLOCK = 64


@dataclass
class Fp8KV:
    nope: torch.Tensor  # uint8 [*lead, D - r]
    scale: torch.Tensor  # uint8 [*lead, ceil((D - r) / 64)]
    rope: torch.Tensor  # float [*lead, r]
    dialect: Fp8Dialect

    @property
    def shape(self) -> tuple:
        return tuple(self.nope.shape[:-1]) + (self.nope.shape[-1] + self.rope.shape[-1],)

    @property
    def dtype(self) -> torch.dtype:
        return self.rope.dtype

    @property
    def device(self) -> torch.device:
        return self.nope.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.nope, self.scale, self.rope))


KVStore = torch.Tensor | Fp8KV


def kv_alloc(lead: tuple, dim: int, rope_dim: int, fp8: bool, float_dtype: torch.dtype, device,
             dialect: Fp8Dialect = Fp8Dialect.OCP) -> KVStore:
    lead = tuple(lead)
    if not fp8:
        return torch.zeros(lead + (dim,), dtype=float_dtype, device=device)
    nope = dim - rope_dim
    return Fp8KV(nope=torch.zeros(lead + (nope,), dtype=torch.uint8, device=device),
                 scale=torch.full(lead + (math.ceil(nope / FP8_BLOCK),), 127, dtype=torch.uint8, device=device),
                 rope=torch.zeros(lead + (rope_dim,), dtype=float_dtype, device=device), dialect=Fp8Dialect.parse(dialect))


def kv_row_bytes(dim: int, rope_dim: int, fp8: bool, float_dtype: torch.dtype) -> int:
    fb = torch.empty((), dtype=float_dtype).element_size()
    if not fp8:
        return dim * fb
    nope = dim - rope_dim
    return nope + math.ceil(nope / FP8_BLOCK) + rope_dim * fb


def kv_read(store: KVStore, idx) -> torch.Tensor:
    """Rows store[idx] as a float tensor in the store's float dtype."""
    if isinstance(store, torch.Tensor):
        return store[idx]
    q, s, r = store.nope[idx], store.scale[idx], store.rope[idx]
    x = dequantize_fp8_blocks(q, s, (FP8_BLOCK,), store.dialect, out_dtype=torch.float32)
    return torch.cat([x.to(r.dtype), r], dim=-1)


def kv_write(store: KVStore, idx, x: torch.Tensor) -> None:
    """store[idx] = x (rows of D values), quantising the non-rotary dims for an Fp8KV store."""
    if isinstance(store, torch.Tensor):
        store[idx] = x.to(store.dtype)
        return
    nope = store.nope.shape[-1]
    q, s = quantize_fp8_blocks(x[..., :nope].float(), (FP8_BLOCK,), store.dialect)
    store.nope[idx] = q
    store.scale[idx] = s
    store.rope[idx] = x[..., nope:].to(store.rope.dtype)


def kv_tensors(store: KVStore) -> list[torch.Tensor]:
    """The tensors a KV store is made of (one for a float store; FP8 rows, their scales, the rotary dims)."""
    return [store.nope, store.scale, store.rope] if isinstance(store, Fp8KV) else [store]


def kv_dtype(store: KVStore) -> torch.dtype:
    return store.dtype
