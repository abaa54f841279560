"""Automatic prefix caching for DSV4's hybrid state (design.md §3).

What a request needs to start at position h instead of 0, for h a page boundary (a multiple of
`page_tokens`, itself a multiple of the window W and of every compress ratio):
  - the pages before h: compressed CSA/HCA entries and indexer keys of tokens 0..h-1. A full page's content
    is a function of the tokens up to its end only, and nothing ever writes into it again, so full pages are
    shared read-only between requests (reference counts in the PagePool), found by a hash chain over
    page-aligned token blocks: key(i) = H(key(i-1), tokens of page i). No copy-on-write: a request resumes
    at a page boundary and writes only pages past it.
  - the slot's fixed state at h: the window ring (tokens h-W..h-1, every layer and the MTP block's ring) and
    the compressor accumulators (at a page boundary every open window is empty; CSA's `prev` statistics of
    the last window are not). These are not recomputable from the pages (the ring holds raw K=V rows; a
    layer's rows depend on the layers below over a receptive field far beyond W), so they are SNAPSHOTS:
    copies of a slot's state into one of a few dedicated snapshot slots, taken when a step ends exactly at
    a chosen boundary, and copied into a new request's slot on a hit (ModelCache.copy_slots: device copies
    ordered with the steps).

A snapshot costs about 3.5 pages of Flash cache (6.2 vs 1.8 MB in bf16), so not every boundary gets one.
Where they are taken (`Request.snapshot_points`, set at admission, for the prompt; inside the prefill step
that crosses one, or after a step that ends there):
  - the prompt's last boundary before its final token (h_last = floor((L-1)/P)*P): a resent prompt, and the
    next turn of a conversation (whose prompt extends this one), start there;
  - the end of the pages the request shares with cached ones when no snapshot is there yet (the point where
    its prompt leaves a cached one): the second request with a common system prompt makes the snapshot every
    later one starts from;
  - while decoding, each boundary the request reaches (after a step ending exactly there; a speculative step
    that jumps over one takes none), keeping only its latest: the next turn of a conversation, whose prompt
    holds this answer, starts there.
A hit at h leaves at least one token to compute (h <= L-1). Requests that want prompt logprobs never start
from a hit (those positions' logits are not kept); they still feed the cache.

Eviction: cached pages nobody holds are evicted by allocations, deepest page of a chain first (released in
reverse order, least recently released first); snapshots by least recent use when a new one needs a slot.
A snapshot whose pages were evicted is unreachable until the pages are computed again.

Exactness: a hit request reads state another request computed in other batches; with fp32 plain numerics
the tokens equal a cold run (tests/engine/test_prefix_cache.py); in bf16, as with chunked prefill, they may
differ by rounding. With speculative decoding, the MTP ring row of position h-1 was computed with the
creating request's token h: it may affect drafts (never outputs, which verification decides).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from dsv4.cache.model_cache import ModelCache


def chain_keys(req, n: int, page_tokens: int) -> list[bytes]:
    """The chain keys of at least the first n full pages of req's tokens (req.block_hashes, extended as
    needed): key(i) = blake2b-128(key(i-1) + the page's token ids as int64)."""
    ks = req.block_hashes
    if len(ks) < n:
        toks = req.all_token_ids
        prev = ks[-1] if ks else b""
        for i in range(len(ks), n):
            prev = hashlib.blake2b(prev + array("q", toks[i * page_tokens:(i + 1) * page_tokens]).tobytes(),
                                   digest_size=16).digest()
            ks.append(prev)
    return ks


class PrefixCache:
    def __init__(self, cache: ModelCache, pool, snapshot_slots: list[int]):
        """`pool`: the KVCacheManager's PagePool (cached pages live there); `snapshot_slots`: cache slots no
        request gets, holding snapshots."""
        self.cache, self.pool = cache, pool
        self.page_tokens = cache.page_tokens
        self.page_of: dict[bytes, int] = {}  # chain key of a full page -> the page holding that content
        self.key_of: dict[int, bytes] = {}  # page -> its chain key (pages the cache knows)
        self.snap_of: OrderedDict[bytes, int] = OrderedDict()  # key of the page before a boundary -> snapshot slot
        self.snapshot_slots = list(snapshot_slots)
        self._free_snaps = list(snapshot_slots)
        self._copies: list[tuple[int, int]] = []  # (request slot, snapshot slot) copies `flush` makes
        pool.keeps = self.key_of.__contains__
        pool.on_evict = self._forget_page
        # counters (tokens): prompt tokens looked up, of which found
        self.queries = self.hits = 0
        self.snapshots_taken = self.snapshot_evictions = 0

    # ---- keys ---------------------------------------------------------------------------------------------
    def keys(self, req, n: int) -> list[bytes]:
        """Chain keys of at least req's first n pages (cached on the request: its tokens only grow)."""
        return chain_keys(req, n, self.page_tokens)

    def _forget_page(self, page: int) -> None:
        key = self.key_of.pop(page)
        del self.page_of[key]

    # ---- admission ----------------------------------------------------------------------------------------
    def lookup(self, req) -> tuple[int, int]:
        """(pages covered by the deepest usable hit, pages whose content the cache holds) for req's tokens."""
        limit = (req.num_tokens - 1) // self.page_tokens  # a hit leaves at least one token to compute
        matched = best = 0
        ks = req.block_hashes
        for i in range(limit):
            k = ks[i] if i < len(ks) else self.keys(req, i + 1)[i]
            if k not in self.page_of:
                break
            matched = i + 1
            if k in self.snap_of:
                best = matched
        return best, matched

    def attach(self, req, slot: int) -> list[int]:
        """At admission (req holds `slot`, no pages, nothing computed): the pages of the deepest hit, shared
        (req must take them as its first pages), its snapshot copied into `slot`; sets req.snapshot_points."""
        pt = self.page_tokens
        use = req.params.prompt_logprobs is None
        best, matched = self.lookup(req)
        if not use:
            best = 0
        pages: list[int] = []
        if best:
            ks = req.block_hashes
            pages = [self.page_of[k] for k in ks[:best]]
            self.pool.share(pages)
            snap = self.snap_of[ks[best - 1]]
            self.snap_of.move_to_end(ks[best - 1])
            self.cache.copy_slots([snap], [slot])
        last = (req.num_tokens - 1) // pt
        points = set()
        if matched > best:
            points.add(matched * pt)
        if last > max(best, matched):
            points.add(last * pt)
        req.snapshot_points = sorted(points)
        req.num_registered_pages = best
        return pages

    def record(self, req) -> None:
        """req's admission stands (after `attach`): count its lookup (its first admission only)."""
        if req.num_preemptions == 0:
            self.queries += req.num_prompt_tokens
            req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            self.hits += req.num_cached_tokens

    # ---- after steps --------------------------------------------------------------------------------------
    def commit(self, req, length: int) -> None:
        """req's cache holds its first `length` tokens (all in req.all_token_ids): make its full pages known,
        and snapshot its slot if `length` is one of its snapshot points, or a page boundary it reached while
        decoding (its previous decoding snapshot is dropped). Snapshot copies wait for `flush`."""
        pt = self.page_tokens
        full = min(length // pt, len(req.pages))
        if full > req.num_registered_pages:
            ks = self.keys(req, full)
            for i in range(req.num_registered_pages, full):
                p = req.pages[i]
                if ks[i] not in self.page_of and p not in self.key_of:
                    self.page_of[ks[i]] = p
                    self.key_of[p] = ks[i]
            req.num_registered_pages = full
        pts = req.snapshot_points
        at_point = bool(pts) and pts[0] == length
        if pts and pts[0] <= length:  # (points inside a step were taken there: `inside`)
            req.snapshot_points = [p for p in pts if p > length]
        decoding = length >= req.num_prompt_tokens
        if full and full * pt == length and (at_point or decoding):
            key = self.keys(req, full)[full - 1]
            if key in self.snap_of:
                self.snap_of.move_to_end(key)
                return
            s = self.take_slot()
            if s is None:
                return
            self._copies.append((req.slot, s))  # (made by `flush`, once per step for all requests)
            self.put(key, s)
            if decoding:  # a decoding request keeps only its latest boundary (the next turn extends it)
                old, req.decode_snapshot = req.decode_snapshot, key
                if old is not None and old in self.snap_of:
                    self._free_snaps.append(self.snap_of.pop(old))

    def flush(self) -> None:
        """Make the snapshot copies `commit` queued (one batch of device copies)."""
        if self._copies:
            last = dict((d, s) for s, d in self._copies)  # (a slot evicted and refilled in one step: its last)
            self._copies = []
            self.cache.copy_slots(list(last.values()), list(last))

    def inside(self, req, start: int, n: int) -> list[tuple[int, bytes]]:
        """req's snapshot points strictly inside a step computing its tokens start .. start + n - 1 that no
        snapshot covers yet, with their keys: the runner snapshots them within the step (a copy of the slot
        before the step, the step's writes of tokens start .. point - 1 redone onto it)."""
        out = []
        for p in req.snapshot_points:
            if start < p < start + n:
                n = p // self.page_tokens
                key = self.keys(req, n)[n - 1]
                if key not in self.snap_of:
                    out.append((p, key))
        return out

    def take_slot(self) -> int | None:
        """A snapshot slot to fill (a free one, else the least recently used snapshot's); `put` or `give_back`."""
        if self._free_snaps:
            return self._free_snaps.pop()
        if not self.snap_of:
            return None
        _, s = self.snap_of.popitem(last=False)
        self.snapshot_evictions += 1
        return s

    def put(self, key: bytes, slot: int) -> None:
        """`slot` (from take_slot) now holds the state at the boundary `key` ends."""
        if key in self.snap_of:  # (another request of the same step took it)
            self._free_snaps.append(slot)
            return
        self.snap_of[key] = slot
        self.snapshots_taken += 1

    def give_back(self, slot: int) -> None:
        self._free_snaps.append(slot)

    def clear(self) -> None:
        """Forget everything cached (pages held by requests stay theirs)."""
        for p in list(self.key_of):
            del self.page_of[self.key_of.pop(p)]
            self.pool.uncache(p)
        self.snap_of.clear()
        self._free_snaps = list(self.snapshot_slots)

    def stats(self) -> dict:
        return {"queries": self.queries, "hits": self.hits, "cached_pages": self.pool.num_cached,
                "known_pages": len(self.key_of), "snapshots": len(self.snap_of),
                "snapshots_taken": self.snapshots_taken, "snapshot_evictions": self.snapshot_evictions,
                "page_evictions": self.pool.evictions}
