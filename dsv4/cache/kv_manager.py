"""Allocation of cache slots and pages to requests, and the lengths they hold (host bookkeeping; the
block table reaches the device once per step).

A request holds one slot (its fixed state: window rings, compressor accumulators) from admission to
finish / preemption / abort, and the pages covering its first `len(pages) * page_tokens` raw tokens.
Pages are 1..cache.num_pages; page 0 is the cache's reserved null page (ModelCache.NULL_PAGE).
The manager owns each slot's length (tokens in the cache): `begin_step` checks that a step continues
every sequence exactly where its slot stopped and fits the cache, and records the new lengths.
Block-table changes are made in a host copy and sent to the device by `sync_block_table` (the runner
calls it once per step): one copy for all the rows that changed.
Invariants (tests/engine/test_kv_manager.py checks them under random sequences of operations):
every page and slot is either free or owned by exactly one request; freeing returns everything.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Protocol

import torch

from dsv4.cache.model_cache import NULL_PAGE, ModelCache


class Holder(Protocol):
    request_id: str
    slot: int | None
    pages: list[int]


class PagePool:
    """Pages 1..num_pages (0 is the null page). A page is free, held (its reference count: the requests
    using it, one each; prefix caching shares full pages), or cached: held by no one but kept because the
    prefix cache knows its content (`keeps(page)`), reusable until evicted to serve an allocation, least
    recently released first (`on_evict(page)` tells the prefix cache it is gone)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages, 0, -1))
        self._ref: dict[int, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # evictable, the next to evict first
        self.keeps: Callable[[int], bool] = lambda page: False
        self.on_evict: Callable[[int], None] = lambda page: None
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Pages an allocation can take (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) if fewer are free; cached pages are evicted when the free
        ones run out."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._cached.popitem(last=False)
                self.on_evict(p)
                self.evictions += 1
            self._ref[p] = 1
            out.append(p)
        return out

    def share(self, pages: list[int]) -> None:
        """One more holder for each of `pages` (held or cached ones)."""
        for p in pages:
            if p in self._ref:
                self._ref[p] += 1
            elif p in self._cached:
                del self._cached[p]
                self._ref[p] = 1
            else:
                raise RuntimeError(f"page {p} shared but neither held nor cached")

    def free(self, pages: list[int]) -> None:
        """One holder fewer for each of `pages`, in order: a page nobody holds becomes cached (if the prefix
        cache keeps it; evicted in the order released) or free."""
        for p in pages:
            c = self._ref.get(p)
            if c is None:
                raise RuntimeError(f"page {p} freed but not in use")
            if c > 1:
                self._ref[p] = c - 1
                continue
            del self._ref[p]
            if self.keeps(p):
                self._cached[p] = None
            else:
                self._free.append(p)

    def uncache(self, page: int) -> None:
        """The prefix cache forgot a cached page: it is free."""
        if page in self._cached:
            del self._cached[page]
            self._free.append(page)

    def check(self) -> None:
        held, free, cached = set(self._ref), set(self._free), set(self._cached)
        if len(free) != len(self._free) or held & free or held & cached or free & cached:
            raise AssertionError("page bookkeeping inconsistent")
        if NULL_PAGE in held | free | cached:
            raise AssertionError("the null page was handed out")
        if len(held) + len(free) + len(cached) != self.num_pages:
            raise AssertionError("pages leaked")
        if any(c < 1 for c in self._ref.values()):
            raise AssertionError("a held page with no holder")
        if any(not self.keeps(p) for p in cached):
            raise AssertionError("a cached page the prefix cache does not know")


class KVCacheManager:
    def __init__(self, cache: ModelCache):
        self.cache = cache
        self.page_tokens = cache.page_tokens
        self.pages = PagePool(cache.num_pages)
        self._free_slots = list(range(cache.num_slots - 1, -1, -1))
        self._owner: dict[int, str] = {}
        self._lens = [0] * cache.num_slots
        self.table = torch.full(tuple(cache.block_table.shape), NULL_PAGE, dtype=torch.int64)  # host copy
        self._dirty: set[int] = set()  # slots whose block-table row changed since the last sync
        self.table_syncs = 0  # host -> device block-table copies made (tests check they are batched)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_pages(self) -> int:
        return self.pages.num_free

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_tokens)

    # ---- prefix caching (cache/prefix_cache.py) ---------------------------------------------------------
    prefix = None

    def enable_prefix_caching(self, num_snapshots: int):
        """Keep full pages and `num_snapshots` slot snapshots for later requests with the same prefix (the
        snapshot slots are taken from the free ones, as the scratch slot is)."""
        from dsv4.cache.prefix_cache import PrefixCache
        if num_snapshots > len(self._free_slots):
            raise RuntimeError(f"{num_snapshots} prefix-cache snapshot slots asked, {len(self._free_slots)} free")
        snaps = [self._free_slots.pop(0) for _ in range(num_snapshots)]
        for s in snaps:
            self._owner[s] = "<prefix-cache>"
        self.prefix = PrefixCache(self.cache, self.pages, snaps)
        return self.prefix

    def attach_prefix(self, req) -> int:
        """Right after `admit`: start `req` at its deepest prefix-cache hit (its first pages shared, the
        snapshot copied into its slot, its length and num_computed_tokens set); the tokens it skips."""
        if self.prefix is None:
            return 0
        pages = self.prefix.attach(req, req.slot)
        if pages:
            req.pages = list(pages)
            self.table[req.slot, :len(pages)] = torch.tensor(pages, dtype=torch.int64)
            self._dirty.add(req.slot)
        n = len(pages) * self.page_tokens
        self._lens[req.slot] = n
        req.num_computed_tokens = n
        return n

    def commit(self, req) -> None:
        """After a step: the prefix cache learns `req`'s full pages (and snapshots its slot at its points)."""
        if self.prefix is not None and req.slot is not None:
            self.prefix.commit(req, self._lens[req.slot])

    def distrust(self, reqs) -> None:
        """A step failed midway: what these requests' caches hold is never offered to the prefix cache."""
        for r in reqs:
            r.snapshot_points = []
            r.num_registered_pages = 1 << 62

    def admit(self, req: Holder) -> bool:
        """Give `req` a slot with empty state; False if none is free."""
        if req.slot is not None:
            raise RuntimeError(f"request {req.request_id} already holds slot {req.slot}")
        if not self._free_slots:
            return False
        req.slot = self._free_slots.pop()
        self._owner[req.slot] = req.request_id
        req.pages = []
        self._lens[req.slot] = 0
        self.cache.reset([req.slot])
        return True

    def take_scratch_slot(self, tokens: int = 0) -> int:
        """A slot no request will ever get (bucket-padding rows of captured decode graphs write there), with
        pages for its first `tokens` tokens (verify graphs' padding rows complete compressed entries)."""
        if not self._free_slots:
            raise RuntimeError("no free slot left for the scratch slot")
        s = self._free_slots.pop(0)  # the highest-numbered slot
        need = self.pages_for(tokens)
        pages = self.pages.allocate(need) if need else []
        if pages is None:
            raise RuntimeError(f"no free page left for the scratch slot's {tokens} tokens")
        self.table[s, :need] = torch.tensor(pages, dtype=torch.int64)
        self._dirty.add(s)
        self.scratch_pages = pages
        self._owner[s] = "<scratch>"
        self._lens[s] = 0
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
        self.table[req.slot, start:start + need] = torch.tensor(new, dtype=torch.int64)
        self._dirty.add(req.slot)
        return True

    def release(self, req: Holder) -> None:
        """Return everything `req` holds (idempotent). With prefix caching, what it computed is offered to the
        cache first; its pages are released deepest first (so evicted before the ones they extend)."""
        if req.pages:
            self.commit(req)
            if self.prefix is not None:
                self.prefix.flush()  # (before the slot is anyone else's)
            self.pages.free(req.pages[::-1])
            if req.slot is not None:
                self.table[req.slot, :len(req.pages)] = NULL_PAGE
                self._dirty.add(req.slot)
            req.pages = []
        if req.slot is not None:
            if self._owner.pop(req.slot, None) != req.request_id:
                raise RuntimeError(f"slot {req.slot} released by {req.request_id}, not its owner")
            self._free_slots.append(req.slot)
            req.slot = None

    def sync_block_table(self) -> None:
        """Send the block-table rows changed since the last call to the device (one copy)."""
        if not self._dirty:
            return
        rows = torch.tensor(sorted(self._dirty), dtype=torch.int64)
        self._dirty.clear()
        dev = self.cache.block_table
        if dev.device.type == "cpu":
            dev[rows] = self.table[rows]
        else:
            src = self.table[rows].pin_memory()
            dev.index_copy_(0, rows.to(dev.device, non_blocking=True), src.to(dev.device, non_blocking=True))
        self.table_syncs += 1

    # ---- lengths ----------------------------------------------------------------------------------
    def seq_len(self, slot: int) -> int:
        """Tokens in the cache for `slot`."""
        return self._lens[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Cut the tokens recorded in `slot` back to `length` (speculative decoding: rejected drafts)."""
        if not 0 <= length <= self._lens[slot]:
            raise ValueError(f"slot {slot} holds {self._lens[slot]} tokens; cannot cut it back to {length}")
        self._lens[slot] = length

    def begin_step(self, slots: list[int], starts: list[int], ends: list[int]) -> None:
        """Check that each sequence continues exactly where its slot stopped, fits the cache and its pages,
        and record the new lengths. Raises ValueError (nothing recorded) otherwise."""
        cap = self.cache.max_seq_len
        for s, p0, p1 in zip(slots, starts, ends):
            if p0 != self._lens[s]:
                raise ValueError(f"slot {s} holds {self._lens[s]} tokens but the step starts at position {p0}")
            if p1 > cap:
                raise ValueError(f"sequence in slot {s} would reach {p1} tokens; this cache holds {cap}")
        for s, p1 in zip(slots, ends):
            self._lens[s] = p1

    def check(self) -> None:
        """Raise if the bookkeeping is inconsistent (used by tests)."""
        if len(set(self._free_slots)) != len(self._free_slots) or set(self._free_slots) & set(self._owner):
            raise AssertionError("slot bookkeeping inconsistent")
        if len(self._free_slots) + len(self._owner) != self.cache.num_slots:
            raise AssertionError("slots leaked")
        self.pages.check()
