"""Async decode steps (engine/async_decode.py): the next decode step is launched before the previous one's
tokens are read back, its input ids copied on the device. Everything a user sees must equal the synchronous
engine's: tokens, logprobs, finish reasons, stops mid-stream, arrivals and aborts while a step is in flight,
requests whose sampling counts the in-flight token (penalties, min_tokens) or reads it back with its
logprobs, and the cache bookkeeping afterwards."""

import pytest
import torch

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams


def engine(lm, async_scheduling: bool, **kw):
    cfg = dict(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=256, max_num_seqs=8,
               async_scheduling=async_scheduling)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), lm=lm)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 129280, (int(L),), generator=g).tolist()
            for L in torch.randint(3, 30, (n,), generator=g)]


def run(eng, reqs, events=None, max_steps=500):
    """Step until done; events: {step index: fn(eng)} run before that step. Returns {id: (tokens, reason)}, with
    the logprobs third where asked."""
    for i, (p, sp) in enumerate(reqs):
        eng.add_request(p, sp, request_id=str(i))
    done = {}
    for step in range(max_steps):
        if events and step in events:
            out = events[step](eng)
            if out is not None:
                done[out.request_id] = result(out)
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                done[out.request_id] = result(out)
    assert not eng.has_unfinished_requests()
    eng.kv.check()
    assert eng.kv.num_free_pages == eng.cache.num_pages - len(getattr(eng.kv, "scratch_pages", []))
    return done


def result(out):
    o = out.outputs[0]
    r = (list(o.token_ids), o.finish_reason)
    return r if o.logprobs is None else r + ([(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in o.logprobs],)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False, **kw)


def sampled(n, seed, **kw):
    return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True, detokenize=False,
                          **kw)


def both(lm, reqs, events=None, **kw):
    """The same requests through the synchronous and the async engine: (sync, async, the async engine)."""
    a = engine(lm, False, **kw)
    want = run(a, reqs, events)
    assert a.runner.async_steps == 0
    b = engine(lm, True, **kw)
    got = run(b, reqs, events)
    return want, got, b


def test_async_steps_give_the_synchronous_tokens(lm):
    P = prompts(6)
    reqs = [(P[0], greedy(12)), (P[1], greedy(1)), (P[2], greedy(2)), (P[3], sampled(9, 7)), (P[4], sampled(5, 8)),
            (P[5], greedy(7))]
    want, got, eng = both(lm, reqs)
    assert got == want
    assert eng.runner.async_steps >= 5  # (the long requests decode several steps in a row asynchronously)


def test_a_stop_token_mid_stream_drops_the_step_in_flight(lm):
    """A request that stops on a token the host learns only after the next step was launched: the launched
    step's token for it is dropped and the output ends where the synchronous one does."""
    P = prompts(3, seed=1)
    probe = run(engine(lm, False), [(P[0], greedy(12))])
    stop = probe["0"][0][4]  # its fifth token: it stops there (or earlier, at an equal token)
    reqs = [(P[0], greedy(12, stop_token_ids=[stop])), (P[1], greedy(12)), (P[2], sampled(12, 3))]
    want, got, eng = both(lm, reqs)
    assert got == want
    assert want["0"][1] == "stop" and len(want["0"][0]) <= 5
    assert eng.runner.async_steps > 0


def test_arrivals_and_aborts_while_a_step_is_in_flight(lm):
    P = prompts(5, seed=2)
    reqs = [(P[0], greedy(20)), (P[1], greedy(20)), (P[2], sampled(20, 5))]

    def arrive(eng):
        eng.add_request(P[3], greedy(8), request_id="late")

    def abort(eng):
        return eng.abort_request("1")

    def later(eng):
        eng.add_request(P[4], sampled(6, 9), request_id="later")

    events = {4: arrive, 7: abort, 9: later}
    want, got, eng = both(lm, reqs, events)
    assert got == want
    assert got["1"][1] == "abort" and got["late"][1] == "length" and got["later"][1] == "length"
    assert eng.runner.async_steps > 0


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5, presence_penalty=0.3),
                                dict(logprobs=2), dict(min_tokens=6), dict(logit_bias={5: 3.0, 9: -2.0})])
def test_requests_that_read_their_last_token(lm, kw):
    """Penalties count the in-flight token on the device, min_tokens counts it on the host, logprobs come back
    with it: such requests decode asynchronously with the synchronous engine's tokens and logprobs (beside a
    plain request; greedy and sampled)."""
    P = prompts(3, seed=3)
    stop = [7] if "min_tokens" in kw else []
    one = SamplingParams(max_tokens=10, temperature=0, detokenize=False, ignore_eos=True, stop_token_ids=stop, **kw)
    two = SamplingParams(max_tokens=8, temperature=1.0, seed=4, detokenize=False, ignore_eos=True, **kw)
    reqs = [(P[0], one), (P[1], greedy(10)), (P[2], two)]
    want, got, eng = both(lm, reqs)
    assert got == want
    assert eng.runner.async_steps > 0
    if "logprobs" in kw:
        assert len(got["0"][2]) == 10 and all(len(t[3]) == 2 for t in got["0"][2])


def test_prefix_cache_hits_after_async_steps_give_the_cold_tokens(lm):
    """Snapshots and pages committed while a step is in flight hold the state of the length they are filed
    under: a second wave that starts from them emits what a cold engine emits."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(0, 129280, (250,), generator=g).tolist()
    first = [(base, greedy(20))]
    eng = engine(lm, True, enable_prefix_caching=True, max_model_len=640, max_num_batched_tokens=512)
    out1 = run(eng, first)
    # the next turn extends the answer: it starts from the snapshot the decode took at 256 tokens
    turn = base + out1["0"][0] + [5, 6, 7]
    out2 = run(eng, [(turn, greedy(8))])
    assert eng.kv.prefix.hits > 0 and eng.runner.async_steps > 0
    cold = run(engine(lm, False, max_model_len=640, max_num_batched_tokens=512), [(turn, greedy(8))])
    assert out2 == cold


def test_the_engine_config_switch(lm):
    eng = engine(lm, True)
    assert eng.runner.async_capable
    run(eng, [(prompts(1)[0], greedy(6))])
    assert eng.runner.async_steps > 0


def test_async_steps_through_decode_graphs(tiny_dir, monkeypatch):
    """The decode-graph path of an async step (the staged step's ids overwritten on the device by the previous
    step's tokens): equal to synchronous graph steps. On the CPU the padded static-buffer steps run uncaptured,
    the metadata ops through interpreted Triton with frozen host mirrors (test_verify_graphs' op table); with
    `--gpu` on a CUDA device the same engines capture and replay."""
    pytest.importorskip("triton")
    import dsv4.model.builder as builder
    from dsv4.engine.cuda_graphs import DecodeGraphs
    from dsv4.model import build_model
    from test_verify_graphs import _compiled, meta_ops_table, triton_table

    cuda = _compiled()
    with monkeypatch.context() as mp:
        mp.setattr(builder, "resolve", triton_table if cuda else meta_ops_table)
        tlm = build_model(tiny_dir, device="cuda" if cuda else "cpu", dtype="float32", numerics="plain")
    if not cuda:
        monkeypatch.setattr("dsv4.engine.cuda_graphs.capture_blockers", lambda ops: [])
    dev = str(tlm.platform.torch_device)
    P = prompts(3, seed=6)
    reqs = [(P[0], greedy(7)), (P[1], sampled(6, 2)), (P[2], greedy(3))]
    got = {}
    for on in (False, True):
        eng = engine(tlm, on, device=dev, max_num_seqs=4, kv_cache_memory=1 << 28 if cuda else None)
        if eng.runner.graphs is None:  # (the CPU: attach what a device with graphs builds, uncaptured)
            scratch = eng.kv.take_scratch_slot(0)
            eng.runner.graphs = DecodeGraphs(tlm.model, eng.cache, scratch, max_batch=4, batch_buckets=(1, 2, 4),
                                             min_context=64, capture=False, buffers=eng.buffers)
            eng.runner.scratch = scratch
        got[on] = run(eng, reqs)
        assert eng.runner.graph_steps > 0
        assert (eng.runner.async_steps > 0) == on
    assert got[True] == got[False]


@pytest.mark.gpu
def test_async_steps_through_decode_graphs_gpu(tiny_dir, monkeypatch):
    test_async_steps_through_decode_graphs(tiny_dir, monkeypatch)


def test_a_full_engine_keeps_decoding_async_while_requests_wait(lm):
    """max_num_seqs running and more waiting: nothing can be admitted until one finishes, so the steps stay async;
    the waiting requests are admitted after the finishes are read, with the synchronous engine's outputs."""
    P = prompts(5, seed=8)
    reqs = [(P[0], greedy(9)), (P[1], greedy(14)), (P[2], sampled(6, 1)), (P[3], greedy(4)), (P[4], greedy(5))]
    want, got, eng = both(lm, reqs, max_num_seqs=2)
    assert got == want
    assert eng.runner.async_steps >= 8


def test_the_in_flight_token_counts_for_penalties_and_min_tokens(lm):
    """Cases where counting the in-flight token decides the output: a logit_bias makes token 5, then 6, the argmax
    once the penalties count the 5 (a missed in-flight count repeats 5); a biased stop id is held back exactly
    until min_tokens (a missed in-flight count holds it one token longer)."""
    P = prompts(2, seed=9)
    pen = SamplingParams(max_tokens=6, temperature=0, detokenize=False, ignore_eos=True,
                         logit_bias={5: 50.0, 6: 48.0}, presence_penalty=2.0, frequency_penalty=2.0)
    mt = SamplingParams(max_tokens=12, temperature=0, detokenize=False, ignore_eos=True, min_tokens=6,
                        logit_bias={7: 100.0}, stop_token_ids=[7])
    want, got, eng = both(lm, [(P[0], pen), (P[1], mt)])
    assert got == want and eng.runner.async_steps > 0
    assert want["0"][0][:2] == [5, 6]
    toks, why = want["1"]
    assert why == "stop" and len(toks) == 7 and toks[-1] == 7 and 7 not in toks[:6]
