"""Capacity planning: how many concurrent requests (slots) and cached tokens (pages) a memory budget
holds, or a clear refusal when the model and one maximum-length request do not fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4.cache.model_cache import CacheLayout


class CacheDoesNotFit(ValueError):
    pass


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def human_bytes(n: int) -> str:
    """A size in the largest binary unit it reaches (1.00 KiB, 3.52 MiB, ...; below 1 KiB: 12 B)."""
    for unit, size in _UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def at_least(n: int) -> str:
    """A memory size flag value (e.g. 3.53MiB) that parses back to n bytes or more, rounded up."""
    unit, size = next(((u, s) for u, s in _UNITS if n >= s), ("B", 1))
    v = math.ceil(n * 100 / size) / 100
    while int(float(f"{v:g}") * size) < n:  # float rounding: parse_bytes truncates
        v += 0.01
    return f"{v:g}{unit}"


@dataclass(frozen=True)
class CachePlan:
    num_slots: int
    num_pages: int
    layout: CacheLayout
    budget_bytes: int
    max_model_len: int

    @property
    def max_cached_tokens(self) -> int:
        return self.num_pages * self.layout.page_tokens

    @property
    def bytes(self) -> int:
        return self.num_slots * self.layout.slot_bytes + (self.num_pages + 1) * self.layout.page_bytes  # + null page

    def describe(self) -> str:
        L = self.layout
        return (f"KV cache: {gib(self.bytes)} of a {gib(self.budget_bytes)} budget: {self.num_slots} concurrent "
                f"requests ({L.slot_bytes / 2**20:.2f} MiB fixed state each), {self.num_pages} pages of "
                f"{L.page_tokens} tokens ({L.page_bytes / L.page_tokens:.0f} B/token) = "
                f"{self.max_cached_tokens:,} cached tokens; max_model_len {self.max_model_len:,}")


def plan_cache(layout: CacheLayout, budget_bytes: int, max_num_seqs: int, max_model_len: int) -> CachePlan:
    """`num_pages` counts the pages requests can own; the cache adds the reserved null page, whose bytes the
    plan counts (CachePlan.bytes <= budget_bytes)."""
    one = layout.slot_bytes + (math.ceil(max_model_len / layout.page_tokens) + 1) * layout.page_bytes
    if budget_bytes < one:
        raise CacheDoesNotFit(
            f"the KV cache budget ({human_bytes(budget_bytes)}, {budget_bytes:,} bytes) cannot hold one request "
            f"of max_model_len {max_model_len:,} tokens, which needs {human_bytes(one)} ({one:,} bytes); give "
            f"--kv-cache-memory {at_least(one)} or more, raise --gpu-memory-utilization, or lower --max-model-len")
    pages_one = math.ceil(max_model_len / layout.page_tokens)
    slots = max(1, min(max_num_seqs, (budget_bytes - (pages_one + 1) * layout.page_bytes)
                       // max(1, layout.slot_bytes)))
    if layout.page_bytes == 0:  # no compressed layers: pages cost nothing, give every slot a full sequence
        pages = slots * pages_one
    else:
        pages = (budget_bytes - slots * layout.slot_bytes) // layout.page_bytes - 1
    return CachePlan(num_slots=int(slots), num_pages=int(max(pages, pages_one)), layout=layout,
                     budget_bytes=budget_bytes, max_model_len=max_model_len)
