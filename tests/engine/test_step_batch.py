"""One step, one derivation (engine/step_batch.py): the runner builds each step's metadata once, through one
staging buffer and one host -> device copy, and every layer of the model receives that one object."""

from __future__ import annotations

import random

import pytest
import torch

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.step_batch import StepBuffers, build_eager, stage_decode
from dsv4.model.deepseek_v4 import Block
from dsv4.ops.meta import ForwardMeta


def _req(i: int, n_prompt: int, n_out: int) -> Request:
    r = Request(request_id=f"r{i}", prompt_token_ids=list(range(100 * i, 100 * i + n_prompt)), params=SamplingParams(),
                max_tokens=8, eos_token_ids=frozenset())
    r.output_token_ids = list(range(7000 + i, 7000 + i + n_out))
    return r


@pytest.mark.parametrize("seed", range(5))
def test_eager_batch_equals_the_host_list_build(seed):
    rng = random.Random(seed)
    B = rng.randint(1, 6)
    reqs = [_req(i, rng.randint(1, 40), rng.randint(0, 5)) for i in range(B)]
    starts = [rng.randint(0, r.num_tokens - 1) for r in reqs]
    ns = [rng.randint(1, r.num_tokens - s) for r, s in zip(reqs, starts)]
    slots = rng.sample(range(10), B)
    table = torch.zeros(10, 4, dtype=torch.int64)
    buf = StepBuffers(256, 8, "cpu")
    for _ in range(2):  # the buffers are reused step after step
        batch = build_eager(buf, reqs, starts, ns, slots, table, ep_tokens=17)
    want = ForwardMeta.build(slots, starts, ns)
    m = batch.meta
    for f in ("positions", "token_seq", "seq_slots", "query_start", "seq_start", "seq_lens"):
        assert torch.equal(getattr(m, f), getattr(want, f)), f
    for f in ("query_start_host", "seq_start_host", "seq_lens_host", "seq_slots_host"):
        assert list(getattr(m, f)) == list(getattr(want, f)), f
    assert batch.ids.tolist() == [t for r, s, n in zip(reqs, starts, ns) for t in r.all_token_ids[s:s + n]]
    assert m.block_table is table and m.ep_tokens == 17
    assert buf.copies == 2


def test_decode_staging_pads_with_scratch_rows():
    buf = StepBuffers(16, 8, "cpu")
    ids = stage_decode(buf, 4, 9, [11, 12], [3, 5], [7, 2])
    d = buf.device_views(4, 4)
    assert ids.tolist() == [11, 12, 0, 0]
    assert d["slots"].tolist() == [3, 5, 9, 9]
    assert d["positions"].tolist() == [7, 2, 0, 0] and d["seq_start"].tolist() == [7, 2, 0, 0]
    assert d["seq_lens"].tolist() == [8, 3, 1, 1]
    assert d["token_seq"].tolist() == [0, 1, 2, 3] and d["query_start"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="exceeds the step buffers"):
        buf.stage(17, 1)
    # a verify step (q = 2 tokens per sequence) in the same buffers, then the first layout again with one
    # sequence: every field is rewritten (nothing left over from the earlier steps in the reused views)
    ids = stage_decode(buf, 2, 9, [21, 22, 23, 24], [3, 5], [7, 2], q=2)
    d = buf.device_views(4, 2)
    assert ids.tolist() == [21, 22, 23, 24] and d["positions"].tolist() == [7, 8, 2, 3]
    assert d["token_seq"].tolist() == [0, 0, 1, 1] and d["seq_lens"].tolist() == [9, 4]
    assert d["query_start"].tolist() == [0, 2, 4] and d["slots"].tolist() == [3, 5]
    ids = stage_decode(buf, 4, 9, [31], [6], [4])
    d = buf.device_views(4, 4)
    assert ids.tolist() == [31, 0, 0, 0] and d["slots"].tolist() == [6, 9, 9, 9]
    assert d["positions"].tolist() == [4, 0, 0, 0] and d["seq_lens"].tolist() == [5, 1, 1, 1]
    with pytest.raises(ValueError, match="2 sequences x 2 tokens"):
        stage_decode(buf, 4, 9, [1, 2, 3], [3, 5], [7, 2], q=2)


def test_the_model_receives_one_meta_per_step(lm, monkeypatch):
    """Across chunked prefills mixed with decodes, each model step sees exactly one ForwardMeta (the same
    object in every layer), built with one host -> device copy; block-table rows go in at most one copy. (An
    engine step runs zero to two forwards with async decode steps: counted per forward.)"""
    seen: list[int] = []
    orig = Block.forward

    def spy(self, X, input_ids, meta, lc, *args, **kw):
        seen.append(id(meta))
        return orig(self, X, input_ids, meta, lc, *args, **kw)

    monkeypatch.setattr(Block, "forward", spy)
    eng = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=256,
                                 max_num_batched_tokens=24), lm=lm)
    g = torch.Generator().manual_seed(0)
    for n in (40, 5, 17):
        eng.add_request(torch.randint(0, 129280, (n,), generator=g).tolist(),
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    copies0 = eng.buffers.copies
    syncs0 = eng.kv.table_syncs
    L = lm.cfg.num_layers
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.runner.async_steps > 0
    forwards = [seen[i:i + L] for i in range(0, len(seen), L)]
    assert len(seen) % L == 0 and all(len(set(f)) == 1 for f in forwards)
    assert eng.buffers.copies - copies0 == len(forwards)
    assert eng.kv.table_syncs - syncs0 <= len(forwards)


def test_finished_and_aborted_requests_release_their_sampler_state(lm):
    eng = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=128),
                    lm=lm)
    pen = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, repetition_penalty=1.2, frequency_penalty=0.5)
    a = eng.add_request([1, 2, 3, 4], pen)
    b = eng.add_request([5, 6, 7], pen)
    eng.step()
    eng.step()
    assert set(eng.runner.sampler._states) == {a.request_id, b.request_id}
    eng.abort_request(b.request_id)
    assert set(eng.runner.sampler._states) == {a.request_id}
    while eng.has_unfinished_requests():
        eng.step()
    assert not eng.runner.sampler._states
