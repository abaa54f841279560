"""Page pool and slot bookkeeping under random admit / grow / finish / abort / preempt sequences:
nothing leaks, nothing is owned twice, the null page is never handed out, block-table rows (on the device,
after the once-per-step sync) match the pages each request owns. Lengths: a step must continue each slot
where it stopped."""

from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from dsv4.cache.kv_manager import KVCacheManager, PagePool
from dsv4.cache.model_cache import NULL_PAGE, ModelCache
from dsv4.config import ModelConfig
from dsv4.tiny import TINY_CONFIG

CFG = ModelConfig.from_dict(dict(TINY_CONFIG, num_hidden_layers=3, compress_ratios=[0, 4, 128, 0]))
PAGE = 256


@dataclass(eq=False)
class Holder:
    request_id: str
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    tokens: int = 0


def make_manager(num_slots=4, num_pages=10, max_len=PAGE * 6):
    cache = ModelCache(CFG, num_slots, max_len, "cpu", torch.float32, page_tokens=PAGE, num_pages=num_pages)
    return KVCacheManager(cache)


def check_invariants(kv: KVCacheManager, live: list[Holder]) -> None:
    kv.check()
    kv.sync_block_table()
    owned = [p for h in live for p in h.pages]
    assert len(owned) == len(set(owned)), "a page owned twice"
    assert len(owned) + kv.num_free_pages == kv.cache.num_pages, "pages leaked"
    slots = [h.slot for h in live if h.slot is not None]
    assert len(slots) == len(set(slots)), "a slot owned twice"
    assert len(slots) + kv.num_free_slots == kv.cache.num_slots, "slots leaked"
    for h in live:
        if h.slot is not None:
            row = kv.cache.block_table[h.slot, :len(h.pages)].tolist()
            assert row == h.pages
            rest = kv.cache.block_table[h.slot, len(h.pages):]
            assert bool((rest == NULL_PAGE).all())
            assert NULL_PAGE not in h.pages
            assert kv.pages_for(h.tokens) <= len(h.pages)
    assert torch.equal(kv.cache.block_table, kv.table)


OPS = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "abort", "preempt"]),
                         st.integers(0, 7), st.integers(1, 700)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_operations_keep_the_books(ops):
    kv = make_manager()
    live: list[Holder] = []
    n = 0
    for op, pick, amount in ops:
        if op == "admit":
            h = Holder(f"r{n}")
            n += 1
            if kv.admit(h):
                live.append(h)
                if kv.reserve(h, amount):
                    h.tokens = amount
            else:
                assert kv.num_free_slots == 0
        elif live:
            h = live[pick % len(live)]
            if op == "grow":
                before = list(h.pages)
                free_before = kv.num_free_pages
                if kv.reserve(h, h.tokens + amount):
                    h.tokens += amount
                    assert h.pages[:len(before)] == before  # existing pages never move
                else:  # all or nothing
                    assert h.pages == before and kv.num_free_pages == free_before
            else:  # finish, abort and preempt all free everything the request holds
                kv.release(h)
                assert h.slot is None and h.pages == []
                kv.release(h)  # idempotent
                live.remove(h)
        check_invariants(kv, live)
    for h in live:
        kv.release(h)
    check_invariants(kv, [])
    assert kv.num_free_pages == kv.cache.num_pages and kv.num_free_slots == kv.cache.num_slots


def test_admit_resets_the_slot_state():
    kv = make_manager(num_slots=1)
    h = Holder("a")
    assert kv.admit(h)
    lc = kv.cache.layers[1]
    slot = h.slot
    lc.state[slot].fill_(3.0)
    kv.release(h)
    h2 = Holder("b")
    assert kv.admit(h2) and h2.slot == slot
    assert bool(torch.isinf(lc.state[h2.slot, 0]).all()) and bool((lc.state[h2.slot, 1:] == 0).all())


def test_reserve_refuses_beyond_the_sequence_limit():
    kv = make_manager(num_pages=100, max_len=PAGE * 2)
    h = Holder("a")
    assert kv.admit(h)
    assert kv.reserve(h, PAGE * 2)
    assert not kv.reserve(h, PAGE * 2 + 1)
    assert len(h.pages) == 2


def test_page_pool_double_free_is_an_error():
    pool = PagePool(3)
    pages = pool.allocate(2)
    pool.free(pages)
    try:
        pool.free(pages[:1])
    except RuntimeError as e:
        assert "not in use" in str(e)
    else:
        raise AssertionError("double free not detected")
    assert pool.allocate(4) is None and pool.num_free == 3


def test_release_by_a_non_owner_is_detected():
    kv = make_manager()
    a, b = Holder("a"), Holder("b")
    assert kv.admit(a)
    b.slot = a.slot  # a bug elsewhere: two holders claim one slot
    try:
        kv.release(b)
    except RuntimeError as e:
        assert "not its owner" in str(e)
    else:
        raise AssertionError("foreign release not detected")


def test_block_table_rows_reach_the_device_in_one_copy_per_sync():
    kv = make_manager(num_slots=4, num_pages=20)
    hs = [Holder(f"r{i}") for i in range(4)]
    for h in hs:
        assert kv.admit(h) and kv.reserve(h, PAGE * 3)
    assert bool((kv.cache.block_table == NULL_PAGE).all())  # nothing sent before the sync
    kv.sync_block_table()
    assert kv.table_syncs == 1
    for h in hs:
        assert kv.cache.block_table[h.slot, :3].tolist() == h.pages
    kv.sync_block_table()  # nothing changed: no copy
    assert kv.table_syncs == 1
    kv.release(hs[0])
    assert kv.reserve(hs[1], PAGE * 5)
    kv.sync_block_table()
    assert kv.table_syncs == 2
    assert torch.equal(kv.cache.block_table, kv.table)


def test_steps_must_continue_where_the_slot_stopped():
    kv = make_manager(num_slots=2, max_len=PAGE * 2)
    a = Holder("a")
    assert kv.admit(a)
    kv.begin_step([a.slot], [0], [5])
    assert kv.seq_len(a.slot) == 5
    with pytest.raises(ValueError, match="holds 5 tokens but the step starts at position 4"):
        kv.begin_step([a.slot], [4], [6])
    with pytest.raises(ValueError, match="would reach"):
        kv.begin_step([a.slot], [5], [PAGE * 2 + 1])
    assert kv.seq_len(a.slot) == 5  # a refused step records nothing
    kv.begin_step([a.slot], [5], [6])
    kv.release(a)
    b = Holder("b")
    assert kv.admit(b) and kv.seq_len(b.slot) == 0  # admission empties the length
