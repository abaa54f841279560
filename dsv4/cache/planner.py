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
        return self.num_slots * self.layout.slot_bytes + self.num_pages * self.layout.page_bytes

    def describe(self) -> str:
        L = self.layout
        return (f"KV cache: {gib(self.bytes)} of a {gib(self.budget_bytes)} budget: {self.num_slots} concurrent "
                f"requests ({L.slot_bytes / 2**20:.2f} MiB fixed state each), {self.num_pages} pages of "
                f"{L.page_tokens} tokens ({L.page_bytes / L.page_tokens:.0f} B/token) = "
                f"{self.max_cached_tokens:,} cached tokens; max_model_len {self.max_model_len:,}")


def plan_cache(layout: CacheLayout, budget_bytes: int, max_num_seqs: int, max_model_len: int) -> CachePlan:
    one = layout.slot_bytes + math.ceil(max_model_len / layout.page_tokens) * layout.page_bytes
    if budget_bytes < one:
        raise CacheDoesNotFit(
            f"the KV cache budget ({gib(budget_bytes)}) cannot hold one request of max_model_len "
            f"{max_model_len:,} tokens, which needs {gib(one)}; raise --kv-cache-memory or "
            f"--gpu-memory-utilization, or lower --max-model-len")
    pages_one = math.ceil(max_model_len / layout.page_tokens)
    slots = max(1, min(max_num_seqs, (budget_bytes - pages_one * layout.page_bytes) // max(1, layout.slot_bytes)))
    if layout.page_bytes == 0:  # no compressed layers: pages cost nothing, give every slot a full sequence
        pages = slots * pages_one
    else:
        pages = (budget_bytes - slots * layout.slot_bytes) // layout.page_bytes
    return CachePlan(num_slots=int(slots), num_pages=int(max(pages, pages_one)), layout=layout,
                     budget_bytes=budget_bytes, max_model_len=max_model_len)
