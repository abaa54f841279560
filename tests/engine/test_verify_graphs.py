"""Verify graphs (speculative decoding through engine/cuda_graphs.py with query_len = drafts + 1).

On the CPU the padded static-buffer verify step runs without capture, every op through its Triton provider
in the interpreter, with the frozen host mirrors (so no kernel reads a per-step host value), the state
snapshot taken by device ops inside the step, and the rollback fed by the step's own redo functions. Greedy
outputs with drafts (oracle drafts, some rejected; the MTP drafter) equal plain decoding, with batches
padded to a bucket (2 -> 4) by scratch-slot rows of q tokens, prompts crossing the tiny model's CSA (4) boundaries
and its 128-token window while drafting. On a CUDA device the same runs capture and replay graphs (`gpu`)."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch

pytest.importorskip("triton")

import dsv4.model.builder as builder  # noqa: E402
from dsv4.config import EngineConfig  # noqa: E402
from dsv4.engine.cuda_graphs import DecodeGraphs, _FrozenMirror  # noqa: E402
from dsv4.engine.draft_graphs import MTPDraftGraphs  # noqa: E402
from dsv4.engine.llm_engine import LLMEngine  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402
from dsv4.engine.spec_decode import OracleDrafter  # noqa: E402
from dsv4.model import build_model  # noqa: E402
from dsv4.ops.meta import ForwardMeta  # noqa: E402
from dsv4.ops.registry import OpTable  # noqa: E402
from dsv4.ops.registry import resolve as real_resolve  # noqa: E402

from test_decode_graphs import META_OPS, meta_triton_table, triton_table  # noqa: E402  (the same op tables)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")]

LENGTHS = [5, 126]
MAX_TOKENS = 9


def _compiled() -> bool:
    """A CUDA device and compiled Triton (`pytest --gpu`): graphs are captured for real."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


_MIRRORS = ("seq_lens_host", "seq_start_host", "seq_slots_host", "query_start_host")


def _in_graph_step(a, kw) -> bool:
    """The call's ForwardMeta has frozen host mirrors: a graph step (or a rollback / draft graph in it)."""
    meta = kw.get("meta") or next(x for x in a if isinstance(x, ForwardMeta))
    return any(isinstance(getattr(meta, f, None), _FrozenMirror) for f in _MIRRORS)


def meta_ops_table(platform, overrides=None):
    """CPU: the ops that read step metadata through their Triton providers (interpreted) in graph steps, where
    the frozen host mirrors prove they read no per-step host value, and through their references in eager steps
    (prefills, eager MTP passes: the interpreter took minutes there and proves nothing); references elsewhere
    (the interpreted GEMMs would take minutes)."""
    t, ref = meta_triton_table(platform, overrides), real_resolve(platform, overrides)
    fns = dict(t._fns)
    for n in META_OPS:
        fns[n] = functools.partial(_by_step, t._fns[n], ref._fns[n])
    return OpTable(platform, t.choices, fns)


def _by_step(graph_fn, eager_fn, *a, **kw):
    return (graph_fn if _in_graph_step(a, kw) else eager_fn)(*a, **kw)


@pytest.fixture(scope="module")
def tlm(tiny_dir):
    """The tiny model with the metadata ops through Triton (on a CUDA device: every op, capturable)."""
    mp = pytest.MonkeyPatch()
    cuda = _compiled()
    mp.setattr(builder, "resolve", triton_table if cuda else meta_ops_table)
    try:
        return build_model(tiny_dir, device="cuda" if cuda else "cpu", dtype="float32", numerics="plain")
    finally:
        mp.undo()


@pytest.fixture(autouse=True)
def _uncaptured_references(monkeypatch):
    """On the CPU nothing is captured: let the references of META_OPS-free ops through the capture check
    (the frozen host mirrors still fail any op that reads per-step host values)."""
    if not _compiled():
        monkeypatch.setattr("dsv4.engine.cuda_graphs.capture_blockers", lambda ops: [])


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 129280, (n,), generator=g).tolist() for n in LENGTHS]


def engine(lm, k=0, **kw):
    if lm.platform.torch_device.type == "cuda":  # (a fixed cache: engines of earlier tests may still hold theirs)
        kw.setdefault("kv_cache_memory", 1 << 28)
    cfg = EngineConfig(model="unused", device=str(lm.platform.torch_device), dtype="float32", numerics="plain",
                       max_model_len=256, max_num_seqs=4, speculative_tokens=k, **kw)
    return LLMEngine(cfg, lm=lm)


def attach_verify_graphs(eng, q, drafts=False):
    """What the engine builds on a device with graphs (on the CPU: the same steps, not captured); `drafts`:
    the MTP draft graphs too."""
    if eng.runner.verify_graphs is not None:
        return eng.runner.verify_graphs
    scratch = eng.kv.take_scratch_slot(q)
    cap = eng.device.type == "cuda"
    vg = DecodeGraphs(eng.lm.model, eng.cache, scratch, max_batch=4, batch_buckets=(1, 4), min_context=64,
                      capture=cap, buffers=eng.buffers, query_len=q, keep_streams=True)
    eng.runner.verify_graphs, eng.runner.scratch = vg, scratch
    if drafts:
        eng.runner.draft_graphs = MTPDraftGraphs(eng.lm.model, eng.cache, vg, capture=cap)
    return vg


def run(eng, prompts, params, rng):
    order = list(range(len(prompts)))
    rng.shuffle(order)
    final, steps = {}, 0
    while order or eng.has_unfinished_requests():
        for _ in range(rng.choice([0, 1, 2])):
            if order:
                i = order.pop()
                eng.add_request(prompts[i], params, request_id=str(i))
        for out in eng.step():
            if out.finished:
                final[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
        assert steps < 1000
    return final


@pytest.fixture(scope="module")
def plain(tlm, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    return run(engine(tlm), prompts, params, random.Random(0))


@pytest.mark.parametrize("k,accept", [(3, 0.5)])
def test_oracle_drafts_through_verify_graphs_equal_plain(tlm, prompts, plain, k, accept):
    eng = engine(tlm)
    vg = attach_verify_graphs(eng, k + 1)
    cont = {tuple(p): plain[i] for i, p in enumerate(prompts)}
    eng.runner.drafter = OracleDrafter(cont, k, accept, seed=k, vocab_size=tlm.cfg.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final = run(eng, prompts, params, random.Random(k))
    for i in range(len(prompts)):
        assert final[i] == plain[i], f"prompt {i} (len {LENGTHS[i]}), k={k}, accept={accept}"
    st = eng.spec_stats
    assert eng.runner.verify_graph_steps > 0 and st.drafted > st.accepted  # some drafts were rejected
    assert vg.batch_buckets == [1, 4]
    eng.kv.check()


@pytest.mark.parametrize("draft_graphs", [False, "host", "device"])
def test_mtp_drafter_through_verify_graphs_equals_plain(tlm, prompts, plain, draft_graphs, monkeypatch):
    """The MTP drafter after verify graph steps, eagerly or from its own graphs: greedy outputs are the plain
    ones. With draft graphs, every step's drafts are also checked against the eager MTPDrafter's from the
    same state (a copy of the MTP ring), and the ring the graph leaves equals the eager drafter's. "host": the
    sampler accepts on the host, then the draft graph runs; "device": acceptance on the device, the draft graph
    right after it (run_accepting), its verdict the host's."""
    eng = engine(tlm, k=2)
    attach_verify_graphs(eng, 3, drafts=bool(draft_graphs))
    eng.runner.device_accept = draft_graphs == "device"
    checked, calls = [], {"run": 0, "run_accepting": 0}
    if draft_graphs:
        dg = eng.runner.draft_graphs
        real_run, real_accepting = dg.run, dg.run_accepting

        def compare(call, tokens_of):
            rn = eng.runner
            b = rn.last_batch
            ring = [lc.window.clone() for lc in eng.cache.mtp_layers]
            got = call()
            ring_graph = [lc.window.clone() for lc in eng.cache.mtp_layers]
            for lc, r0 in zip(eng.cache.mtp_layers, ring):
                lc.window.copy_(r0)
            tokens, drafts = tokens_of(got)
            saved = [list(r.spec_ids) for r in b.reqs]
            kept = [len(t) for t in tokens]
            nxt = [r.spec_ids[:n - 1] + [t[-1]] for r, n, t in zip(b.reqs, kept, tokens)]
            rn.drafter.propose(b.reqs, X=rn.verify_graphs.streams, meta=b.meta, kept=kept, next_ids=nxt,
                               sample=[True] * len(tokens))
            assert [r.spec_ids for r in b.reqs] == drafts
            for lc, rg in zip(eng.cache.mtp_layers, ring_graph):
                for s in b.meta.seq_slots_host:
                    torch.testing.assert_close(lc.window[s], rg[s])
            for r, sp in zip(b.reqs, saved):
                r.spec_ids = sp
            checked.append(len(tokens))
            return got

        def run_and_compare(Bb, tokens, reqs=None):
            calls["run"] += 1

            def tokens_of(got):
                assert all(q is None for _, q in got)  # greedy requests: deterministic drafts
                return tokens, [d for d, _ in got]
            return compare(lambda: real_run(Bb, tokens, reqs), tokens_of)

        def accepting_and_compare(Bb, B):
            calls["run_accepting"] += 1
            return compare(lambda: real_accepting(Bb, B), lambda got: ([t[:n] for t, n, _, _ in got],
                                                                        [d for *_, d in got]))

        monkeypatch.setattr(dg, "run", run_and_compare)
        monkeypatch.setattr(dg, "run_accepting", accepting_and_compare)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final = run(eng, prompts, params, random.Random(7))
    for i in range(len(prompts)):
        assert final[i] == plain[i], f"prompt {i} (len {LENGTHS[i]})"
    assert eng.runner.verify_graph_steps > 0 and eng.spec_stats.drafted > 0
    if draft_graphs:
        assert checked and max(checked) == 2  # (a batch of 2 padded to 4)
        # every verify step of these plain-argmax requests took the path asked for
        assert calls["run_accepting" if draft_graphs == "device" else "run"] > 0
        assert calls["run" if draft_graphs == "device" else "run_accepting"] == 0
        if not _compiled():  # greedy steps ran the greedy variant: no q buffer (made by the sampled one)
            assert eng.runner.draft_graphs.q_rows is None
    eng.kv.check()


def test_device_acceptance_is_checked_on_the_host(tlm, prompts, monkeypatch):
    """The device's verdict is checked against the drafts: a verdict that keeps every draft whatever the argmax says
    fails the step by name; a non-finite logits row goes to the sampler, which reports it."""
    eng = engine(tlm, k=2)
    attach_verify_graphs(eng, 3, drafts=True)
    dg = eng.runner.draft_graphs
    real_body = dg._accept_body

    def accept_all(Bb):
        real_body(Bb)
        dg.out[:Bb, dg.k + dg.q] = dg.q  # every draft kept

    monkeypatch.setattr(dg, "_accept_body", accept_all)
    eng.add_request(prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, detokenize=False))
    with pytest.raises(RuntimeError, match="the device accepted 2 of the drafts"):
        for _ in range(20):
            eng.step()
    monkeypatch.setattr(dg, "_accept_body", real_body)
    eng = engine(tlm, k=2)
    vg = attach_verify_graphs(eng, 3, drafts=True)
    real_replay = vg.replay

    def nan_replay(key):
        out = real_replay(key)
        out[1, 5] = float("nan")
        return out

    monkeypatch.setattr(vg, "replay", nan_replay)
    eng.add_request(prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, detokenize=False))
    with pytest.raises(RuntimeError, match="no finite logit"):
        for _ in range(20):
            eng.step()


def test_paused_speculation_after_verify_graph_steps(tlm, prompts):
    """speculative_disable_by_batch_size = 1 with verify and draft graphs: one request drafts from the draft graph;
    a second one arrives, and the steps where both decode draft nothing (their MTP passes only write the ring);
    once it finished the first drafts from the draft graph again; greedy outputs equal plain decoding."""
    eng = engine(tlm, k=2, speculative_disable_by_batch_size=1)
    attach_verify_graphs(eng, 3, drafts=True)
    dg = eng.runner.draft_graphs
    replays = []  # sequences drafted by each draft graph replay (host or device acceptance)
    real_run, real_accepting = dg.run, dg.run_accepting
    dg.run = lambda *a, **kw: replays.append(len(a[1])) or real_run(*a, **kw)
    dg.run_accepting = lambda Bb, B: replays.append(B) or real_accepting(Bb, B)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, detokenize=False)
    ref = run(engine(tlm), [prompts[0]], greedy, random.Random(0))[0]
    eng.add_request(prompts[0], greedy, request_id="a")
    eng.step()  # prefill: drafts (one request decoding)
    eng.step()  # a verify graph step of one request: draft graph replayed
    assert len(replays) == 1
    eng.add_request(prompts[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, detokenize=False),
                    request_id="b")
    final = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
        steps += 1
        assert steps < 50
    assert final["a"] == ref and final["b"] == ref[:3]
    assert eng.runner.spec_paused_steps > 0 and len(replays) >= 2 and max(replays) == 1
    eng.kv.check()


def test_sampled_mtp_drafts_through_draft_graphs_equal_eager(tlm, prompts, monkeypatch):
    """Sampled requests (one greedy beside them): each step the draft graph's drafts and their distribution rows
    equal the eager MTPDrafter's from the same state and the same generator state (both draw the same k uniforms
    from each sampled request's generator: a seeded run is the same with draft graphs as without)."""
    eng = engine(tlm, k=2)
    attach_verify_graphs(eng, 3, drafts=True)
    dg = eng.runner.draft_graphs
    real_run = dg.run
    checked = []

    def run_and_compare(Bb, tokens, reqs=None):
        rn = eng.runner
        b = rn.last_batch
        ring = [lc.window.clone() for lc in eng.cache.mtp_layers]
        gens = [r.generator.get_state() if r.generator is not None else None for r in b.reqs]
        got = real_run(Bb, tokens, reqs)
        gens_after = [r.generator.get_state() if r.generator is not None else None for r in b.reqs]
        for lc, r0 in zip(eng.cache.mtp_layers, ring):
            lc.window.copy_(r0)
        for r, st in zip(b.reqs, gens):
            if st is not None:
                r.generator.set_state(st)
        saved = [(list(r.spec_ids), r.spec_q) for r in b.reqs]
        kept = [len(t) for t in tokens]
        nxt = [r.spec_ids[:n - 1] + [t[-1]] for r, n, t in zip(b.reqs, kept, tokens)]
        rn.drafter.propose(b.reqs, X=rn.verify_graphs.streams, meta=b.meta, kept=kept, next_ids=nxt,
                           sample=[True] * len(tokens))
        for r, (d, q), st in zip(b.reqs, got, gens_after):
            assert r.spec_ids == d
            assert (q is None) == r.params.greedy and (r.spec_q is None) == r.params.greedy
            if q is not None:
                torch.testing.assert_close(q, r.spec_q)
                assert all(float(q[j, t]) > 0 for j, t in enumerate(d))
                assert torch.equal(r.generator.get_state(), st)  # the same draws
                checked.append(r.request_id)
        for r, (sp, sq) in zip(b.reqs, saved):
            r.spec_ids, r.spec_q = sp, sq
        return got

    monkeypatch.setattr(dg, "run", run_and_compare)
    for i, params in enumerate([SamplingParams(max_tokens=6, temperature=0.9, seed=5, ignore_eos=True, detokenize=False),
                                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, detokenize=False),
                                SamplingParams(max_tokens=6, temperature=1.3, seed=6, ignore_eos=True, detokenize=False)]):
        eng.add_request(prompts[0], params, request_id=("s0", "g1", "s2")[i])
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        assert steps < 100
    assert {"s0", "s2"} <= set(checked) and eng.runner.verify_graph_steps > 0 and dg.q_rows is not None
    eng.kv.check()


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 3])
def test_engine_captures_verify_graphs_gpu(tlm, prompts, plain, k):
    """On a CUDA device the engine itself captures verify graphs for speculative decoding (MTP drafter);
    greedy outputs equal plain decoding (decode graphs) and steps replay the captured graphs."""
    eng = engine(tlm, k=k)
    vg = eng.runner.verify_graphs
    assert vg is not None and vg.q == k + 1 and vg.graphs
    dg = eng.runner.draft_graphs
    assert dg is not None and set(dg.graphs) == {(key[0], s) for key in vg.graphs for s in (True, False)}
    assert set(dg.accept_graphs) == {key[0] for key in vg.graphs}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    final = run(eng, prompts, params, random.Random(k))
    for i in range(len(prompts)):
        assert final[i] == plain[i], f"prompt {i}, k={k}"
    assert eng.runner.verify_graph_steps > 0
    eng.kv.check()


@pytest.mark.gpu
def test_engine_sampled_drafts_from_captured_graphs_gpu(tlm, prompts):
    """On a CUDA device, sampled requests draft by sampling inside the captured draft graphs: their drafts come with
    q rows (a distribution, nonzero at each draft), verify graph steps replay, and a seeded run is reproducible."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=9, ignore_eos=True, detokenize=False)
    outs, seen = [], []
    for _ in range(2):
        eng = engine(tlm, k=2)
        dg = eng.runner.draft_graphs
        assert dg is not None and dg.graphs
        real_run = dg.run

        def watched(*a, real_run=real_run, **kw):
            got = real_run(*a, **kw)
            seen.extend(q is not None and torch.allclose(q.sum(-1), torch.ones_like(q[:, 0]))
                        and all(float(q[j, t]) > 0 for j, t in enumerate(d)) for d, q in got)
            return got

        dg.run = watched
        outs.append(run(eng, prompts, params, random.Random(1)))
        assert eng.runner.verify_graph_steps > 0 and eng.spec_stats.drafted > 0
        eng.kv.check()
    assert seen and all(seen)
    assert outs[0] == outs[1]
