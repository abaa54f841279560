"""Allocation of cache slots and pages to requests (pure bookkeeping + block-table rows on the device).

A request holds one slot (its fixed state: window rings, compressor accumulators) from admission to
finish / preemption / abort, and the pages covering its first `len(pages) * page_tokens` raw tokens.
Invariants (tests/engine/test_kv_manager.py checks them under random sequences of operations):
every page and slot is either free or owned by exactly one request; freeing returns everything.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from dsv4.cache.model_cache import UNUSED_PAGE, ModelCache


class Holder(Protocol):
    request_id: str
    slot: int | None
    pages: list[int]


class PagePool:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise RuntimeError(f"page {p} freed but not in use")
            self._used.remove(p)
            self._free.append(p)


class KVCacheManager:
    def __init__(self, cache: ModelCache):
        if not cache.paged:
            raise ValueError("KVCacheManager needs a paged ModelCache (num_pages given)")
        self.cache = cache
        self.page_tokens = cache.page_tokens
        self.pages = PagePool(cache.num_pages)
        self._free_slots = list(range(cache.num_slots - 1, -1, -1))
        self._owner: dict[int, str] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_pages(self) -> int:
        return self.pages.num_free

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_tokens)

    def admit(self, req: Holder) -> bool:
        """Give `req` a slot with empty state; False if none is free."""
        if req.slot is not None:
            raise RuntimeError(f"request {req.request_id} already holds slot {req.slot}")
        if not self._free_slots:
            return False
        req.slot = self._free_slots.pop()
        self._owner[req.slot] = req.request_id
        req.pages = []
        self.cache.reset([req.slot])
        return True

    def take_scratch_slot(self) -> int:
        """A slot no request will ever get (bucket-padding rows of captured decode graphs write there)."""
        if not self._free_slots:
            raise RuntimeError("no free slot left for the scratch slot")
        s = self._free_slots.pop(0)  # the highest-numbered slot
        self._owner[s] = "<scratch>"
        self.cache.reset([s])
        return s

    def reserve(self, req: Holder, num_tokens: int) -> bool:
        """Make `req` own the pages for its first `num_tokens` tokens; False (nothing taken) if the
        pool is short."""
        need = self.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        if self.pages_for(num_tokens) > self.cache.pages_per_seq:
            return False
        new = self.pages.allocate(need)
        if new is None:
            return False
        start = len(req.pages)
        req.pages.extend(new)
        self.cache.block_table[req.slot, start:start + need] = torch.tensor(new, dtype=torch.int64).to(
            self.cache.block_table.device, non_blocking=True)
        return True

    def release(self, req: Holder) -> None:
        """Return everything `req` holds (idempotent)."""
        if req.pages:
            self.pages.free(req.pages)
            if req.slot is not None:
                self.cache.block_table[req.slot, :len(req.pages)] = UNUSED_PAGE
            req.pages = []
        if req.slot is not None:
            if self._owner.pop(req.slot, None) != req.request_id:
                raise RuntimeError(f"slot {req.slot} released by {req.request_id}, not its owner")
            self._free_slots.append(req.slot)
            req.slot = None

    def check(self) -> None:
        """Raise if the bookkeeping is inconsistent (used by tests)."""
        if len(set(self._free_slots)) != len(self._free_slots) or set(self._free_slots) & set(self._owner):
            raise AssertionError("slot bookkeeping inconsistent")
        if len(self._free_slots) + len(self._owner) != self.cache.num_slots:
            raise AssertionError("slots leaked")
        if len(set(self.pages._free)) != len(self.pages._free) or set(self.pages._free) & self.pages._used:
            raise AssertionError("page bookkeeping inconsistent")
        if len(self.pages._free) + len(self.pages._used) != self.pages.num_pages:
            raise AssertionError("pages leaked")
