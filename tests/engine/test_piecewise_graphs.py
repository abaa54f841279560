"""Piecewise graphs (engine/piecewise_graphs.py) against eager steps.

On the CPU the padded step runs without capture: token buckets, the pieces under host mirrors that raise when
read, each layer's core on the step's real rows with the step's metadata, its output copied into a padded
tensor whose padding rows are zero. Greedy tokens and logprobs must equal an engine without piecewise graphs
(fp32, plain numerics) with chunked prefill mixed with decodes, prefix caching (snapshots inside steps: the
cores' redo functions) and eager speculative verification. On a CUDA device (marker `gpu`, `pytest --gpu`)
the same engines capture and replay the pieces.
"""

from __future__ import annotations

import pytest
import torch

import dsv4.engine.piecewise_graphs as pwg
from dsv4.config import EngineConfig
from dsv4.engine.cuda_graphs import GraphCaptureError
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.piecewise_graphs import PiecewiseGraphs
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.step_batch import StepBuffers, build_eager

MAX_TOKENS = 5


def engine(lm, **kw):
    cfg = dict(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=1024, max_num_seqs=4,
               max_num_batched_tokens=96)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), lm=lm)


def attach(eng, monkeypatch, buckets=(8, 32, 64, 96)):
    """Piecewise graphs without capture on a CPU engine (reference providers allowed: nothing is captured, and
    the frozen host mirrors still catch a piece that reads per-step host values)."""
    monkeypatch.setattr(pwg, "capture_blockers", lambda ops: [])
    scratch = eng.kv.take_scratch_slot()
    pw = PiecewiseGraphs(eng.lm.model, eng.cache, scratch, eng.buffers, max(buckets), buckets=buckets, capture=False)
    pw.capture_all()
    eng.runner.piecewise = pw
    return pw


def run(eng, waves):
    out = {}
    for w, wave in enumerate(waves):
        for i, p in enumerate(wave):
            eng.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False,
                                              logprobs=2), request_id=f"{w}-{i}")
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o
    return out


def assert_same(got, want, tol=1e-4):
    assert got.keys() == want.keys()
    for k in want:
        a, b = got[k].outputs[0], want[k].outputs[0]
        assert a.token_ids == b.token_ids, k
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.token_id == lb.token_id
            assert abs(la.logprob - lb.logprob) < tol, f"request {k}: {la.logprob} vs {lb.logprob}"
            assert [t for t, _ in la.top] == [t for t, _ in lb.top], k


@pytest.fixture(scope="module")
def waves():
    g = torch.Generator().manual_seed(3)

    def rand(n):
        return torch.randint(0, 129280, (n,), generator=g).tolist()

    shared = rand(300)  # crosses a page (256), HCA (128) and CSA (4) boundaries
    first = [rand(5), rand(37), shared + rand(11), rand(130)]
    second = [shared + rand(7), list(first[1]), rand(1)]
    return [first, second]


@pytest.fixture(scope="module")
def reference(lm, waves):
    return run(engine(lm), waves)


def test_padded_steps_match_eager(lm, waves, reference, monkeypatch):
    """Prefill chunks of up to 96 tokens mixed with decodes, every step padded to a bucket."""
    eng = engine(lm)
    pw = attach(eng, monkeypatch)
    got = run(eng, waves)
    assert_same(got, reference)
    assert eng.runner.piecewise_steps == eng.num_steps > 0  # (no decode graphs on the CPU: every step)
    assert pw.replays == eng.num_steps
    last = eng.runner.last_batch  # the cores' output buffer: the last step's padding rows are zero
    T, Tb = last.num_tokens, last.piecewise
    outs = [b for k, b in pw._shared.items() if k[0] == "out"]
    assert T < Tb and outs and all(not b[T:Tb].any() for b in outs)


def test_prefix_caching_snapshots_inside_piecewise_steps(lm, waves, reference, monkeypatch):
    """Snapshots taken inside a step redo the cores' writes after the forward (the cores got copies)."""
    eng = engine(lm, enable_prefix_caching=True, max_num_batched_tokens=512)
    attach(eng, monkeypatch, buckets=(16, 64, 512))
    got = run(eng, waves)
    assert_same(got, reference)
    assert eng.prefix_cache_stats()["hits"] > 0
    assert eng.runner.piecewise_steps > 0


def test_speculative_verification_in_piecewise_steps(lm, waves, reference, monkeypatch):
    """Eager verify steps (drafts from the MTP block) roll rejected drafts back through the cores' redo."""
    eng = engine(lm, speculative_tokens=2)
    attach(eng, monkeypatch)
    got = run(eng, waves)
    assert_same(got, reference)
    assert eng.spec_stats.drafted > 0


def test_a_core_inside_a_piece_fails_loudly(lm, monkeypatch):
    """The guard: the layer core reads the step's host values, so run inside a piece it raises."""
    eng = engine(lm)
    pw = attach(eng, monkeypatch)
    ids = pw._stage_padding(8)
    with pytest.raises(GraphCaptureError, match="host mirror"):
        lm.model(ids, pw._piece_meta(8, None), eng.cache)


def test_buckets_and_padded_staging():
    buf = StepBuffers(64, 4, "cpu")
    pw = PiecewiseGraphs.__new__(PiecewiseGraphs)
    pw.buckets, pw.failed = [8, 32, 64], {32}
    assert [pw.bucket(n) for n in (1, 8, 9, 33, 64, 65)] == [8, 8, None, 64, 64, None]
    b = build_eager(buf, [], [3, 0], [2, 1], [1, 2], torch.zeros(4, 1, dtype=torch.int64), ids=[7, 8, 9], pad_to=8)
    assert b.piecewise == 8 and b.ids.tolist() == [7, 8, 9] and b.meta.positions.tolist() == [3, 4, 0]
    d = buf.device_views(8, 1)  # what the pieces read: the 8-row layout, padding rows token 0 at position 0
    assert d["ids"].tolist() == [7, 8, 9, 0, 0, 0, 0, 0]
    assert d["positions"].tolist() == [3, 4, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="cannot be padded"):
        build_eager(buf, [], [0], [9], [1], torch.zeros(4, 1, dtype=torch.int64), ids=[1] * 9, pad_to=8)


@pytest.mark.gpu
def test_captured_pieces_match_eager_cuda(tiny_dir, monkeypatch):
    """Real capture and replay on a CUDA device: the tiny model through its Triton providers."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import dsv4.model.builder as builder
    from dsv4.model import build_model
    from tests.engine.test_decode_graphs import triton_table

    monkeypatch.setattr(builder, "resolve", triton_table)
    lm = build_model(tiny_dir, device="cuda", dtype="float32", numerics="plain")
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(0, 129280, (n,), generator=g).tolist()  # noqa: E731
    shared = rand(300)
    waves = [[rand(5), rand(37), shared + rand(11), rand(130)], [shared + rand(7), rand(3)]]
    # 200-token steps: the 311-token prompt's snapshot at 256 falls inside a step (the cores' redo, from copies)
    kw = dict(device="cuda", kv_cache_memory=1 << 28, max_num_batched_tokens=200)
    want = run(engine(lm, enforce_eager=True, **kw), waves)
    for extra in (dict(enable_prefix_caching=True), dict(speculative_tokens=2)):
        eng = engine(lm, **extra, **kw)
        assert eng.runner.piecewise is not None and eng.runner.piecewise.steps
        got = run(eng, waves)
        assert eng.piecewise_steps > 0
        assert_same(got, want, tol=2e-3)
    assert eng.spec_stats.drafted > 0


def test_a_bucket_whose_capture_failed_runs_eagerly(lm, waves, reference, monkeypatch):
    """A bucket that fails to capture at start-up is logged and its steps run eagerly, with the same outputs.
    (Steps synchronous: the test counts them through `execute`, which async decode steps do not take.)"""
    eng = engine(lm, async_scheduling=False)
    real = PiecewiseGraphs.capture

    def capture(self, Tb):
        if Tb == 8:
            raise GraphCaptureError("test: this bucket does not capture")
        return real(self, Tb)

    monkeypatch.setattr(PiecewiseGraphs, "capture", capture)
    pw = attach(eng, monkeypatch)
    assert pw.failed == {8} and pw.bucket(5) is None and pw.bucket(9) == 32
    sizes = []
    orig = eng.runner.execute

    def execute(scheduled):
        sizes.append((sum(n for _, n in scheduled), eng.runner.piecewise_steps))
        return orig(scheduled)

    monkeypatch.setattr(eng.runner, "execute", execute)
    got = run(eng, waves)
    assert_same(got, reference)
    eager = [t for (t, before), (_, after) in zip(sizes, sizes[1:] + [(0, eng.runner.piecewise_steps)])
             if after == before]
    assert eager and all(t <= 8 for t in eager), eager
    assert eng.runner.piecewise_steps > 0
