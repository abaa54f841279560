"""Prefix caching (cache/prefix_cache.py): requests sharing prefixes of many lengths (crossing the 128-token
window, CSA (4) and HCA (128) boundaries and 256-token pages, ending mid-page and on a page boundary) give
exactly the greedy tokens and logprobs of an engine without caching (fp32, plain numerics), also with
chunked prefill, eviction, preemption, an aborted creator and speculative decoding; hits happen where they
should; skipping the restore of the window ring or of the compressor state changes the outputs (so these
tests see it); reference counts and the page pool stay consistent under random operations."""

import random

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams

PAGE = 256
MAX_TOKENS = 6


def engine(lm, **kw):
    cfg = dict(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=1280, max_num_seqs=4)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), lm=lm)


@pytest.fixture(scope="module")
def prompts():
    """(wave, prompt) pairs: wave 0 creates cache entries, wave 1 (after wave 0 finished) should hit them."""
    g = torch.Generator().manual_seed(7)

    def rand(n):
        return torch.randint(0, 129280, (n,), generator=g).tolist()

    sys_a = rand(700)  # a shared "system prompt" crossing pages 0-2
    sys_b = rand(300)
    first = [sys_a + rand(40), sys_b + rand(5), rand(512), rand(257)]
    second = [
        sys_a + rand(40),  # same system prompt, another question (hits the divergence snapshot? made below)
        sys_a + rand(3),  # ... again: the snapshot at 512 made by the one above (or its own wave's twin)
        first[0] + rand(9),  # the next turn of a conversation: extends first[0] (hit at 512 = its h_last)
        list(first[1]),  # resent exactly (305 tokens: hit at 256, recompute 49)
        list(first[2]),  # 512 tokens, ends on a page boundary: hit at 256 (one token must be computed)
        first[3] + rand(300),  # extends a 257-token prompt: hit at 256
        sys_b[:100] + rand(200),  # shares less than a page: no hit
    ]
    return first, second


def run_waves(eng, waves, params, stagger=False):
    """Each wave's requests to completion (wave by wave); outputs by (wave, index)."""
    final = {}
    for w, wave in enumerate(waves):
        pending = list(enumerate(wave))
        while pending or eng.has_unfinished_requests():
            for _ in range(1 if stagger else len(pending)):
                if pending:
                    i, p = pending.pop(0)
                    eng.add_request(p, params(w, i), request_id=f"{w}-{i}")
            for out in eng.step():
                if out.finished:
                    final[tuple(int(x) for x in out.request_id.split("-"))] = out
    return final


def greedy(w=0, i=0):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False, logprobs=2)


@pytest.fixture(scope="module")
def reference(lm, prompts):
    return run_waves(engine(lm, max_num_batched_tokens=2048), prompts, greedy)


def assert_same(final, reference, tol=1e-4):
    assert final.keys() == reference.keys()
    for key, ref in reference.items():
        a, b = final[key].outputs[0], ref.outputs[0]
        assert a.token_ids == b.token_ids, f"request {key}"
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.token_id == lb.token_id
            assert abs(la.logprob - lb.logprob) < tol, f"request {key}: {la.logprob} vs {lb.logprob}"


def no_leaks(eng):
    kv = eng.kv
    kv.check()
    assert not kv.pages._ref, "pages still held after every request finished"
    assert kv.num_free_pages == eng.cache.num_pages


@pytest.mark.parametrize("budget", [2048, 100])
def test_hits_give_the_outputs_of_an_engine_without_cache(lm, prompts, reference, budget):
    eng = engine(lm, max_num_batched_tokens=budget, enable_prefix_caching=True)
    final = run_waves(eng, prompts, greedy)
    assert_same(final, reference)
    cached = {k: o.num_cached_tokens for k, o in final.items()}
    assert all(cached[(0, i)] == 0 for i in range(4)), cached
    # second wave: the first two share sys_a (700 tokens): the first made the snapshot at 512 where it left
    # wave 0's pages (wave 0 snapshotted 512 = h_last of its 740-token prompt too, so both hit 512)
    assert cached[(1, 0)] == 512 and cached[(1, 1)] == 512, cached
    assert cached[(1, 2)] == 512 and cached[(1, 3)] == 256 and cached[(1, 4)] == 256, cached
    assert cached[(1, 5)] == 256 and cached[(1, 6)] == 0, cached
    st = eng.prefix_cache_stats()
    assert st["hits"] == sum(cached.values()) and st["queries"] == sum(len(p) for w in prompts for p in w)
    no_leaks(eng)


def test_the_shared_system_prompt_gets_a_snapshot_where_requests_diverge(lm):
    g = torch.Generator().manual_seed(11)
    sys_p = torch.randint(0, 129280, (600,), generator=g).tolist()
    qs = [sys_p + torch.randint(0, 129280, (n,), generator=g).tolist() for n in (300, 20, 90)]
    ref = run_waves(engine(lm), [[q] for q in qs], greedy)
    eng = engine(lm, enable_prefix_caching=True)
    final = run_waves(eng, [[q] for q in qs], greedy)
    assert [final[(w, 0)].num_cached_tokens for w in range(3)] == [0, 0, 512]  # the second one made it
    assert_same(final, ref)


def test_the_next_turn_starts_where_the_answer_reached_a_boundary(lm):
    """A conversation: turn 1 (480 tokens) decodes 40 tokens, passing 512 while decoding (a snapshot there);
    turn 2 = turn 1 + its answer + 5 tokens starts at 512, not at turn 1's prompt boundary (256)."""
    g = torch.Generator().manual_seed(13)
    t1 = torch.randint(0, 129280, (480,), generator=g).tolist()

    def long(w, i):
        return SamplingParams(max_tokens=40 if w == 0 else 4, temperature=0, ignore_eos=True, detokenize=False,
                              logprobs=2)

    ref1 = run_waves(engine(lm), [[t1]], long)[(0, 0)]
    t2 = t1 + ref1.outputs[0].token_ids + torch.randint(0, 129280, (5,), generator=g).tolist()
    ref = run_waves(engine(lm), [[t1], [t2]], long)
    eng = engine(lm, enable_prefix_caching=True)
    final = run_waves(eng, [[t1], [t2]], long)
    assert [final[(w, 0)].num_cached_tokens for w in range(2)] == [0, 512]
    assert_same(final, ref)
    assert len(eng.kv.prefix.snap_of) == 2  # 256 (turn 1's prompt), 512 (its answer); turn 2's 512 is the same
    no_leaks(eng)


def test_only_full_pages_are_shared(lm):
    """A request aborted inside a page (600 of its 900 tokens computed) must not offer that page: the next
    request with the same tokens computes it (snapshot at 768) and a third one hits at 768 reading a
    complete page."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 129280, (900,), generator=g).tolist()
    ref = run_waves(engine(lm), [[x]], greedy)[(0, 0)]
    eng = engine(lm, enable_prefix_caching=True, max_num_batched_tokens=100)
    eng.add_request(x, greedy(), request_id="a")
    while eng.requests["a"].num_computed_tokens < 600:
        eng.step()
    eng.abort_request("a")
    final = run_waves(eng, [[x], [x]], greedy)
    assert [final[(w, 0)].num_cached_tokens for w in range(2)] == [0, 768]
    assert_same(final, {(w, 0): ref for w in range(2)})


@pytest.mark.parametrize("what", ["ring", "state"])
def test_skipping_the_restore_of_ring_or_compressor_state_changes_outputs(lm, prompts, reference, what,
                                                                          monkeypatch):
    """The mutation guard: a hit that restores only part of the slot state must not go unnoticed."""
    from dsv4.ops.kv_format import kv_tensors

    orig = ModelCache.copy_slots

    def partial(self, src, dst):
        if dst and dst[0] in self._snap_slots:  # taking a snapshot: whole
            return orig(self, src, dst)
        s, d = torch.tensor(src), torch.tensor(dst)
        for lc in self.layers + self.mtp_layers:
            ts = kv_tensors(lc.window) if what == "state" else [t for pr in lc.states() for t in pr if t is not None]
            for t in ts:
                t.index_copy_(0, d, t.index_select(0, s))

    eng = engine(lm, enable_prefix_caching=True)
    eng.cache._snap_slots = set(eng.kv.prefix.snapshot_slots)
    monkeypatch.setattr(ModelCache, "copy_slots", partial)
    final = run_waves(eng, prompts, greedy)
    diff = max(abs(a.logprob - b.logprob) for k, r in reference.items()
               for a, b in zip(final[k].outputs[0].logprobs, r.outputs[0].logprobs))
    assert any(final[k].outputs[0].token_ids != r.outputs[0].token_ids for k, r in reference.items()) or diff > 1e-3


def test_eviction_under_memory_pressure(lm, prompts, reference):
    probe = engine(lm)
    layout = probe.plan.layout
    # 4 slots + 2 snapshots, and 12 pages: wave 0 leaves more cached pages than fit beside wave 1's
    budget = 6 * layout.slot_bytes + 13 * layout.page_bytes
    eng = engine(lm, kv_cache_memory=budget, enable_prefix_caching=True, prefix_cache_snapshots=2,
                 max_num_batched_tokens=300)
    assert eng.plan.num_pages == 12
    final = run_waves(eng, prompts, greedy)
    assert_same(final, reference)
    st = eng.prefix_cache_stats()
    assert st["page_evictions"] > 0 and st["snapshot_evictions"] > 0, st
    assert st["hits"] > 0, st
    no_leaks(eng)


def test_preemption_and_recompute_with_the_cache(lm, prompts, reference):
    layout = engine(lm).plan.layout
    budget = 5 * layout.slot_bytes + 7 * layout.page_bytes  # 4 slots, 1 snapshot, 6 pages
    eng = engine(lm, kv_cache_memory=budget, enable_prefix_caching=True, prefix_cache_snapshots=1,
                 max_num_batched_tokens=128)
    final = run_waves(eng, prompts, greedy, stagger=True)
    assert sum(o.metrics.num_preemptions for o in final.values()) > 0, "the cache was not tight enough"
    assert_same(final, reference)
    no_leaks(eng)


def test_abort_of_the_request_that_made_the_entries(lm, prompts, reference):
    first, second = prompts
    eng = engine(lm, enable_prefix_caching=True)
    eng.add_request(first[0], greedy(), request_id="creator")
    while eng.requests["creator"].num_computed_tokens < len(first[0]):
        eng.step()
    assert eng.abort_request("creator").outputs[0].finish_reason == "abort"
    eng.add_request(second[0], greedy(), request_id="1-0")
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert outs[0].num_cached_tokens == 512
    assert outs[0].outputs[0].token_ids == reference[(1, 0)].outputs[0].token_ids
    no_leaks(eng)


def test_prompt_logprobs_requests_compute_every_position(lm, prompts):
    first, second = prompts

    def plp(w, i):
        return SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, detokenize=False, prompt_logprobs=1)

    waves = [first[:1], second[:1]]
    ref = run_waves(engine(lm), waves, plp)
    eng = engine(lm, enable_prefix_caching=True)
    final = run_waves(eng, waves, plp)
    assert final[(1, 0)].num_cached_tokens == 0
    for k in ref:
        a, b = final[k].prompt_logprobs, ref[k].prompt_logprobs
        assert len(a) == len(b) == len(waves[k[0]][0])
        assert all(x is None and y is None or abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b))
        assert final[k].outputs[0].token_ids == ref[k].outputs[0].token_ids


def test_with_speculative_decoding(lm, prompts, reference):
    """Outputs equal; a resent prompt (same token after the hit point) drafts exactly as without the cache:
    the snapshot holds the MTP block's ring too (taken inside a step: its MTP pass's writes redone)."""
    plain = run_waves(engine(lm, speculative_tokens=2), prompts, greedy)
    eng = engine(lm, enable_prefix_caching=True, speculative_tokens=2)
    final = run_waves(eng, prompts, greedy)
    for k, r in reference.items():
        assert final[k].outputs[0].token_ids == r.outputs[0].token_ids, k
    for k in [(1, 3), (1, 4)]:
        assert final[k].num_cached_tokens == 256
        a, b = final[k].metrics, plain[k].metrics
        assert (a.num_draft_tokens, a.num_accepted_tokens) == (b.num_draft_tokens, b.num_accepted_tokens), k
    no_leaks(eng)


def test_a_failed_step_offers_nothing_to_the_cache(lm, prompts):
    eng = engine(lm, enable_prefix_caching=True)

    class Broken:  # the forward writes the cache, then the step fails
        def __init__(self, m):
            self.m = m

        def __call__(self, *a, **kw):
            self.m(*a, **kw)
            raise RuntimeError("injected step failure")

        def __getattr__(self, name):
            return getattr(self.m, name)

    eng.runner.model = Broken(eng.runner.model)
    eng.add_request(prompts[0][0], greedy(), request_id="a")
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    eng.abort_request("a")  # (what the serving loops do with the requests of a failed step)
    st = eng.prefix_cache_stats()
    assert st["known_pages"] == 0 and st["snapshots"] == 0, st
    assert len(eng.kv.prefix._free_snaps) == len(eng.kv.prefix.snapshot_slots)  # (the step's one given back)
    no_leaks(eng)


def test_a_snapshot_inside_a_step_equals_one_at_a_step_end(lm):
    """The state at 256 of a 305-token prompt: snapshotted inside the one prefill step (slot copied before it,
    the step's writes of tokens 0..255 redone onto the copy, the MTP block's included) equals the slot of
    an engine whose step ends at 256 (window rings, compressor accumulators, MTP ring)."""
    x = torch.randint(0, 129280, (305,), generator=torch.Generator().manual_seed(12)).tolist()
    snaps = []
    for budget in (256, 2048):
        eng = engine(lm, enable_prefix_caching=True, max_num_batched_tokens=budget, speculative_tokens=2)
        run_waves(eng, [[x]], greedy)
        (s,) = eng.kv.prefix.snap_of.values()
        snaps.append([t[s].clone() for t in eng.cache.slot_tensors()])
    assert len(snaps[0]) == 16  # (4 layers' rings and accumulators, the MTP ring)
    for a, b in zip(*snaps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, equal_nan=True)


def test_with_fp8_kv_cache(lm, prompts):
    """FP8 window rings (values, scales, rotary dims: three tensors per ring) are snapshotted and restored. With
    plain numerics, tokens of one chunk attend to each other at full precision but to earlier ones through
    the FP8 ring, so where a computation resumes moves logprobs (chunked prefill alone: up to 5e-3; a hit
    here: 3e-2): tokens are compared exactly, logprobs at 0.1 (restoring only the FP8 values, not their
    scales and rotary dims, moves them by 1.1)."""
    waves = [prompts[0][:2], prompts[1][2:4]]  # the next turn of the first (hit 512), the second resent (256)
    ref = run_waves(engine(lm, kv_cache_dtype="fp8"), waves, greedy)
    eng = engine(lm, kv_cache_dtype="fp8", enable_prefix_caching=True)
    final = run_waves(eng, waves, greedy)
    assert [final[(1, i)].num_cached_tokens for i in range(2)] == [512, 256]
    assert_same(final, ref, tol=0.1)


def test_reset_prefix_cache(lm, prompts):
    from dsv4.engine.llm import LLM

    eng = engine(lm, enable_prefix_caching=True)
    run_waves(eng, [prompts[0][:1]], greedy)
    assert eng.kv.pages.num_cached > 0
    LLM.from_engine(eng).reset_prefix_cache()
    assert eng.kv.pages.num_cached == 0 and not eng.kv.prefix.snap_of
    out = run_waves(eng, [prompts[0][:1]], greedy)
    assert out[(0, 0)].num_cached_tokens == 0
    no_leaks(eng)


# ---- bookkeeping under random operations ----------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "abort", "preempt"]),
                         st.integers(0, 7), st.integers(1, 700)), min_size=1, max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(0, 3))
def test_reference_counts_stay_consistent(ops, seed):
    run_ops(ops, seed)


def run_ops(ops, seed) -> int:
    """Requests over a few shared token streams are admitted (taking cached prefixes), grow (committing full
    pages and snapshots), finish, abort or are preempted in random order; a page is held exactly by the
    requests whose page lists name it, cached pages are known to the cache, nothing leaks."""
    from dsv4.config import ModelConfig
    from dsv4.tiny import TINY_CONFIG

    cfg = ModelConfig.from_dict(dict(TINY_CONFIG, num_hidden_layers=3, compress_ratios=[0, 4, 128, 0]))
    cache = ModelCache(cfg, 6, PAGE * 6, "cpu", torch.float32, page_tokens=PAGE, num_pages=12)
    kv = KVCacheManager(cache)
    pc = kv.enable_prefix_caching(2)
    rng = random.Random(seed)
    streams = [[rng.randrange(1000) for _ in range(PAGE * 6)] for _ in range(2)]
    live: list[Request] = []
    params = SamplingParams(max_tokens=1)
    for n, (op, i, k) in enumerate(ops):
        if op == "admit":
            r = Request(f"r{n}", streams[i % 2][:min(k + PAGE * (i % 3), PAGE * 6 - 1)], params, 1, frozenset())
            if kv.admit(r):
                kv.attach_prefix(r)
                if kv.reserve(r, r.num_computed_tokens + 1):
                    pc.record(r)
                    live.append(r)
                else:
                    kv.release(r)
        elif live:
            r = live[i % len(live)]
            if op == "grow":  # compute up to k more prompt tokens (as far as the pages allow)
                c = r.num_computed_tokens
                n_new = min(k, r.num_tokens - c)
                n_new = next((p - c for p in r.snapshot_points if c < p < c + n_new), n_new)  # (steps end there)
                if n_new and kv.reserve(r, c + n_new):
                    kv.begin_step([r.slot], [c], [c + n_new])
                    r.num_computed_tokens += n_new
                    kv.commit(r)
                    pc.flush()
            else:
                kv.release(r)
                live.remove(r)
                if op == "preempt":
                    r.num_computed_tokens, r.num_preemptions = 0, r.num_preemptions + 1
                    if kv.admit(r):
                        kv.attach_prefix(r)
                        live.append(r)
        kv.check()
        holders: dict[int, int] = {}
        for r in live:
            for p in r.pages:
                holders[p] = holders.get(p, 0) + 1
            assert r.num_computed_tokens <= len(r.pages) * PAGE
            assert kv.seq_len(r.slot) == r.num_computed_tokens
        assert holders == kv.pages._ref
        assert all(pc.page_of[key] == p for p, key in pc.key_of.items())
        assert len(pc.snap_of) <= 2 and set(pc.snap_of.values()) <= set(pc.snapshot_slots)
    for r in live:
        kv.release(r)
    kv.check()
    assert not kv.pages._ref and kv.num_free_pages == cache.num_pages
    return pc.hits


def test_reference_counts_with_hits():
    """The random test above, on one fixed busy sequence: it does take cached prefixes."""
    ops = [("admit", 0, 600), ("grow", 0, 700), ("grow", 0, 700), ("admit", 0, 700), ("admit", 3, 500),
           ("grow", 1, 300), ("finish", 0, 1), ("admit", 0, 650), ("preempt", 1, 1), ("grow", 0, 900),
           ("abort", 1, 1), ("admit", 3, 500), ("grow", 2, 999), ("finish", 1, 1)] * 3
    assert run_ops(ops, 0) > 0


def test_one_snapshot_slot_refilled_within_a_step(lm):
    """One snapshot slot, two requests reaching boundaries in the same step: the slot holds the state the
    cache says it holds (the later copy, made once; index_copy_ with a repeated index is undefined). Steps
    synchronous: the slot is compared with its owner's right after the step that took it (an async step
    would have the owner one token further)."""
    g = torch.Generator().manual_seed(21)
    a, b = (torch.randint(0, 129280, (250,), generator=g).tolist() for _ in range(2))
    eng = engine(lm, enable_prefix_caching=True, prefix_cache_snapshots=1, max_num_batched_tokens=512,
                 async_scheduling=False)
    for i, p in enumerate((a, b)):
        eng.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True, detokenize=False), request_id=str(i))
    while eng.requests["0"].num_computed_tokens < 256:  # both decode in lockstep and reach 256 in one step
        eng.step()
    assert eng.requests["1"].num_computed_tokens == 256
    pc = eng.kv.prefix
    assert pc.snapshots_taken == 2 and pc.snapshot_evictions == 1
    (key, slot), = pc.snap_of.items()
    owner = eng.requests["1"] if key == pc.keys(eng.requests["1"], 1)[0] else eng.requests["0"]
    for t in eng.cache.slot_tensors():
        assert torch.equal(t[slot], t[owner.slot])
    while eng.has_unfinished_requests():
        eng.step()
    no_leaks(eng)
