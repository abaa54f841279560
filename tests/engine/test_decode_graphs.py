"""Decode graphs (dsv4/engine/cuda_graphs.py) against eager decode steps.

On the CPU the padded static-buffer step runs without capture, the ops that read step metadata through their
Triton providers in the interpreter (the others through their references, which read none), with the frozen
host mirrors: this proves the kernels read no per-step host value and that
bucket padding (scratch-slot rows) does not disturb real rows. On a CUDA device the same scenario captures
and replays graphs (marker `gpu`: run there with `benchmarks/gpu_tests.sh`, i.e. `pytest --gpu`, compiled Triton).

Scenario: sequences prefilled to different lengths, then decode steps in which the batch size changes
(bucket padding 3 -> 4, a single entry, back up), a sequence joins at position 0 (an empty cache), and
lengths cross the CSA compression boundary (every 4 tokens in the tiny model): every step's
logits equal the eager step's on an identical cache.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import dsv4.model.builder as builder  # noqa: E402
from dsv4.cache.direct import DirectCache  # noqa: E402
from dsv4.engine.cuda_graphs import (DecodeGraphs, GraphCaptureError, _FrozenMirror, capture_blockers,  # noqa: E402
                                     context_buckets)
from dsv4.model import build_model  # noqa: E402
from dsv4.ops.registry import OpTable, all_ops  # noqa: E402
from dsv4.ops.registry import resolve as real_resolve  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")


def triton_table(platform, overrides=None):
    """Every op through its Triton provider where it has one (the interpreter on the CPU)."""
    t = real_resolve(platform, overrides)
    ops = all_ops()
    fns, choices = {}, {}
    for n, c in t.choices.items():
        p = "triton" if "triton" in ops[n].providers else c.provider
        fns[n] = ops[n].providers[p].fn
        choices[n] = type(c)(c.op, p, "test: interpreted Triton", ())
    return OpTable(platform, choices, fns)


def test_frozen_mirror_and_buckets():
    m = _FrozenMirror([1, 2, 3])
    assert len(m) == 3
    with pytest.raises(GraphCaptureError, match="host mirror"):
        max(m)
    with pytest.raises(GraphCaptureError):
        m[0]
    assert context_buckets(5000, 1024) == [1024, 2048, 4096, 5000]
    assert context_buckets(64, 64) == [64]


def test_references_block_capture(tiny_dir):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")
    assert "rms_norm=torch" in capture_blockers(lm.ops)
    dc = DirectCache(lm.cfg, 2, 64, "cpu", torch.float32)
    with pytest.raises(GraphCaptureError, match="references"):
        DecodeGraphs(lm.model, dc.cache, 1, max_batch=1, capture=False)


def test_reference_op_reading_host_mirror_fails_loudly(tiny_dir, monkeypatch):
    """The guard: a provider that reads per-step host values raises under the frozen meta."""
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")
    dc = DirectCache(lm.cfg, 3, 64, "cpu", torch.float32)
    monkeypatch.setattr("dsv4.engine.cuda_graphs.capture_blockers", lambda ops: [])  # let references through
    g = DecodeGraphs(lm.model, dc.cache, 2, max_batch=2, min_context=64, capture=False)
    with pytest.raises(GraphCaptureError, match="host mirror"):
        g.run(torch.tensor([5, 6]), [0, 1], [0, 0])


# the ops whose references read per-step host values (ForwardMeta mirrors); the others are plain torch on whole
# tensors, the same in a graph step as in an eager one
META_OPS = ("sparse_attention", "write_window", "compress_kv", "indexer_topk")


def meta_triton_table(platform, overrides=None):
    """The ops that read step metadata through Triton, the references elsewhere (CPU: the interpreted GEMMs and
    MoE took minutes and read no step metadata, so the frozen mirrors prove nothing about them)."""
    t, ref = triton_table(platform, overrides), real_resolve(platform, overrides)
    pick = {n: (t if n in META_OPS else ref) for n in t.choices}
    return OpTable(platform, {n: pick[n].choices[n] for n in pick}, {n: pick[n]._fns[n] for n in pick})


def _scenario(device: str, tiny_dir, monkeypatch, dtype="float32", numerics="plain"):
    ref = build_model(tiny_dir, device=device, dtype=dtype, numerics=numerics)  # fast prefills (references)
    cuda = torch.device(device).type == "cuda"
    monkeypatch.setattr(builder, "resolve", triton_table if cuda else meta_triton_table)
    lm = build_model(tiny_dir, device=device, dtype=dtype, numerics=numerics)
    if cuda:
        assert not capture_blockers(lm.ops)
    else:  # (the references of the other ops run uncaptured here: let them through the capture check)
        monkeypatch.setattr("dsv4.engine.cuda_graphs.capture_blockers", lambda ops: [])
    dt = lm.opts.dtype
    S, L = 5, 96
    eager, graph = DirectCache(lm.cfg, S, L, device, dt), DirectCache(lm.cfg, S, L, device, dt)
    for dc in (eager, graph):
        assert [dc.add() for _ in range(S - 1)] == [0, 1, 2, 3]
    scratch = S - 1  # never added: its block-table row is the null page
    graphs = DecodeGraphs(lm.model, graph.cache, scratch, max_batch=4, batch_buckets=(1, 2, 4),
                          min_context=32, capture=torch.device(device).type == "cuda")
    gen = torch.Generator().manual_seed(0)
    lens = {0: 0, 1: 0, 2: 0, 3: 0}
    with torch.no_grad():
        # prefill slots 0..2 to different lengths on both caches (slot 3 stays empty: joins later)
        for slot, n in ((0, 13), (1, 6), (2, 29)):
            ids = torch.randint(0, 129280, (n,), generator=gen)
            for dc in (eager, graph):
                ref.model(ids.to(device), dc.meta([slot], [0], [n]), dc.cache)
            lens[slot] = n
        # (slots decoding this step): batch 3 (padded to 4), 1 (single), 4 with slot 3 joining at position 0,
        # then 2 and 3 (padded) again; slots cross multiples of 4 (CSA entries and indexer keys emitted inside the graph)
        plan = [[0, 1, 2], [1], [0, 1, 2, 3], [2, 3], [3, 1, 0]]
        worst = 0.0
        for slots in plan:
            pos = [lens[s] for s in slots]
            ids = torch.randint(0, 129280, (len(slots),), generator=gen)
            want = lm.model.logits(lm.model(ids.to(device), eager.meta(slots, pos, [1] * len(slots)),
                                            eager.cache)).float()
            got = graphs.run(ids, slots, pos).float()
            worst = max(worst, (got - want).abs().max().item())
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (slots, pos)
            for s in slots:
                lens[s] += 1
        # every (batch, context) bucket used was captured once, not per step
        if graphs.use_capture:
            assert 1 <= len(graphs.graphs) <= 3 * len(graphs.ctx_buckets)
    return worst


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the Triton kernels on CPU tensors: needs the interpreter (TRITON_INTERPRET=1)")
def test_padded_static_step_matches_eager_cpu(tiny_dir, monkeypatch):
    assert _scenario("cpu", tiny_dir, monkeypatch) < 1e-4


@pytest.mark.gpu
def test_captured_graphs_match_eager_cuda(tiny_dir, monkeypatch):
    assert _scenario("cuda", tiny_dir, monkeypatch) < 1e-4
