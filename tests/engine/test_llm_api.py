"""The offline `LLM` API and the async engine over the tiny model: outputs, n > 1, stop strings,
logprobs and prompt logprobs through chunked prefill, streaming, abort, capacity planning."""

import asyncio
import math

import pytest
import torch

from dsv4.cache.model_cache import CacheLayout
from dsv4.cache.planner import CacheDoesNotFit, plan_cache
from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.llm import LLM
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


def make_llm(lm, **kw):
    llm = LLM.__new__(LLM)
    cfg = dict(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=600)
    cfg.update(kw)
    llm.engine = LLMEngine(EngineConfig(**cfg), lm=lm)
    return llm


def test_generate_outputs(lm):
    llm = make_llm(lm)
    outs = llm.generate(["Hello there", [0, 5, 6, 7], {"prompt_token_ids": [0, 9]}],
                        SamplingParams(max_tokens=5, temperature=0, logprobs=3), use_tqdm=False)
    assert [o.request_id for o in outs] == ["0", "1", "2"]
    assert outs[0].prompt == "Hello there" and outs[0].prompt_token_ids[0] == 0
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == len(c.logprobs) <= 5 and c.finish_reason in ("length", "stop")
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        for t, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 3
            assert lp.rank == 1 and lp.top[0][0] == t  # greedy takes the most likely token
        m = o.metrics
        assert m.ttft is not None and m.ttft > 0 and m.latency >= m.ttft and m.num_generated_tokens == len(c.token_ids)


def test_n_and_seeds(lm):
    llm = make_llm(lm)
    sp = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11)
    a = llm.generate("Hi", sp, use_tqdm=False)[0]
    b = llm.generate("Hi", sp, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # seeded: reproducible
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # the n samples differ (seed + i)


def test_stop_string_and_stop_token(lm):
    llm = make_llm(lm)
    free = llm.generate([[0, 42, 43]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    c = free[0].outputs[0]
    text, ids = c.text, c.token_ids
    # a stop string made of the text of tokens 3..5 (spanning several tokens)
    tok = llm.tokenizer
    piece = tok.decode(ids[3:6], skip_special_tokens=True)
    assert piece and text.find(piece) >= 0
    stopped = llm.generate([[0, 42, 43]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                         stop=[piece]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == piece
    assert stopped.text == text[:text.find(piece)]
    st = llm.generate([[0, 42, 43]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[ids[4]]), use_tqdm=False)[0].outputs[0]
    assert st.finish_reason == "stop" and st.stop_reason == ids[4] and st.token_ids == ids[:ids.index(ids[4]) + 1]


def test_prompt_logprobs_survive_chunking(lm):
    """prompt_logprobs from a prefill split into 7-token chunks equal a direct log_softmax of the
    model's logits at every prompt position."""
    from dsv4.cache.direct import DirectCache

    prompt = torch.randint(0, 129280, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = make_llm(lm, max_num_batched_tokens=7)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    dc = DirectCache(lm.cfg, 1, 64, "cpu", torch.float32)
    s = dc.add()
    with torch.no_grad():
        ref = torch.log_softmax(lm.model.logits(lm.model(torch.tensor(prompt), dc.meta([s], [0], [30]), dc.cache)),
                                dim=-1)
    for p in range(1, len(prompt)):
        assert plp[p].token_id == prompt[p]
        assert plp[p].logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4)
        assert len(plp[p].top) == 2


def test_async_streaming_and_abort(lm):
    engine = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                    max_model_len=600), lm=lm)
    ref = LLM.__new__(LLM)
    ref.engine = engine

    async def main():
        llm = AsyncLLM(engine=engine)
        llm.finish_listeners.append(lambda o: ended.update({o.request_id: (o.outputs[0].finish_reason,
                                                                            len(o.outputs[0].token_ids))}))
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

        async def collect(prompt):
            pieces, last = [], None
            async for out in llm.generate(prompt, params):
                pieces.append(out.outputs[0].delta_text)
                last = out
            return "".join(pieces), last

        async def abandon(prompt):  # a client that disconnects after two outputs
            n = 0
            gen = llm.generate(prompt, SamplingParams(max_tokens=580, temperature=0, ignore_eos=True),
                               request_id="abandoned")
            async for _ in gen:
                n += 1
                if n == 2:
                    break
            await gen.aclose()  # what the server does when its client goes away
            return n

        results = await asyncio.gather(collect("Hello"), collect([0, 7, 8]), abandon("long one"), collect("x"))
        with pytest.raises(ValueError, match="temperature"):
            async for _ in llm.generate("bad", SamplingParams(temperature=-1)):
                pass
        for _ in range(200):  # the abandoned request is aborted and freed by the engine thread
            if engine.num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.01)
        await llm.shutdown()
        return results

    ended = {}
    results = asyncio.run(main())
    reason, n = ended["abandoned"]
    assert reason == "abort" and n < 100, ended["abandoned"]  # stopped when abandoned, not at max_tokens
    for text, last in (results[0], results[1], results[3]):
        assert last.finished and text == last.outputs[0].text and len(last.outputs[0].token_ids) == 8
    assert results[2] == 2
    assert engine.num_unfinished_requests() == 0
    engine.kv.check()
    assert engine.kv.num_free_pages == engine.cache.num_pages
    # the streamed greedy tokens equal the offline ones
    offline = ref.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert offline[0].outputs[0].text == results[0][0]


def test_cancel_while_admission_is_pending_aborts(lm):
    """A consumer cancelled while the engine thread has not yet admitted its request (it awaits the
    admission) must not leave the request generating to max_tokens."""
    import time

    engine = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                    max_model_len=600), lm=lm)
    real_add = engine.add_request

    def slow_add(*a, **kw):  # the engine thread is busy when the request arrives
        time.sleep(0.3)
        return real_add(*a, **kw)

    engine.add_request = slow_add
    ended = {}

    async def main():
        llm = AsyncLLM(engine=engine)
        llm.finish_listeners.append(lambda o: ended.update({o.request_id: (o.outputs[0].finish_reason,
                                                                            len(o.outputs[0].token_ids))}))

        async def consume():
            async for _ in llm.generate([0, 5, 6], SamplingParams(max_tokens=580, ignore_eos=True), request_id="z"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)  # inside `await added`
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if "z" in ended:
                break
            await asyncio.sleep(0.01)
        await llm.shutdown(timeout=0)

    asyncio.run(main())
    assert "z" in ended, "the cancelled request was never stopped"
    reason, n = ended["z"]
    assert reason == "abort" and n < 100, ended["z"]
    assert engine.num_unfinished_requests() == 0
    engine.kv.check()
    assert engine.kv.num_free_pages == engine.cache.num_pages


def test_capacity_planner(tiny_dir):
    from dsv4.config import ModelConfig

    cfg = ModelConfig.from_file(tiny_dir)
    L = CacheLayout.of(cfg, torch.bfloat16, False)
    plan = plan_cache(L, 64 * 2**20, max_num_seqs=32, max_model_len=4096)
    assert plan.num_slots == 32 and plan.bytes <= 64 * 2**20
    assert plan.max_cached_tokens == plan.num_pages * L.page_tokens >= 4096
    assert "32 concurrent requests" in plan.describe() and "cached tokens" in plan.describe()
    need = L.slot_bytes * 3 + (math.ceil(4096 / L.page_tokens) + 1) * L.page_bytes  # + the reserved null page
    few = plan_cache(L, need, 32, 4096)
    assert few.num_slots == 3 and few.bytes <= need
    assert plan_cache(L, need - 1, 32, 4096).num_slots == 2
    with pytest.raises(CacheDoesNotFit, match="cannot hold one request of max_model_len 4,096"):
        plan_cache(L, L.slot_bytes, 32, 4096)
    flash = ModelConfig.from_file(__import__("dsv4").__path__[0] + "/configs/deepseek-v4-flash.json")
    F = CacheLayout.of(flash, torch.bfloat16, True)
    p = plan_cache(F, 40 * 2**30, 256, 131072)
    # FP8 KV: ~4.5 KB per token (main entries in FP8, indexer keys bf16), 3.6 MiB fixed state per request
    assert p.num_slots == 256 and p.num_pages == (40 * 2**30 - 256 * F.slot_bytes) // F.page_bytes - 1
    assert p.bytes <= 40 * 2**30
    assert 9_000_000 < p.max_cached_tokens < 9_500_000


def test_engine_refuses_a_cache_that_cannot_fit(lm):
    with pytest.raises(CacheDoesNotFit, match="--kv-cache-memory"):
        LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", max_model_len=600,
                               kv_cache_memory=1000), lm=lm)
