"""The engine core in its own process (issue 17, item 3; dsv4/engine/core_process.py): the outputs equal the
in-process engine's, an abort frees the request in the core, a consumer that never reads holds one merged
output (not one per step) while the core keeps serving, and a core that dies fails what runs, turns /health
unhealthy and takes no new requests, without hanging; a core whose front end is killed leaves too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM, EngineDeadError
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _config(tiny_dir) -> EngineConfig:
    return EngineConfig(model=str(tiny_dir), device="cpu", dtype="float32", numerics="plain", max_model_len=512,
                        max_num_seqs=64)


@pytest.fixture(scope="module")
def core(tiny_dir):
    llm = AsyncLLM(_config(tiny_dir), engine_process=True)
    ended = []
    llm.finish_listeners.append(lambda o: ended.append((o.request_id, o.outputs[0].finish_reason,
                                                        o.metrics.num_generated_tokens)))
    llm.ended = ended
    yield llm
    asyncio.run(llm.shutdown(timeout=0))
    assert llm.engine_process.exitcode == 0


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """The same engine on a thread of this process."""
    llm = AsyncLLM(engine=LLMEngine(_config(tiny_dir)))
    yield llm
    asyncio.run(llm.shutdown(timeout=0))


async def _collect(llm, prompt, params, rid=None):
    return [o async for o in llm.generate(prompt, params, request_id=rid)]


def _lp(lps):
    return None if lps is None else [(x.token_id, _Close(x.logprob), x.rank, [(t, _Close(v)) for t, v in x.top])
                                     for x in lps]


class _Close(float):
    """A log-probability compared to 1e-4: the two engines batch the requests differently."""

    def __eq__(self, other):
        return abs(self - other) < 1e-4

    __hash__ = float.__hash__


def _plp(plp):
    return None if plp is None else [None if x is None else _lp([x])[0] for x in plp]


def _summary(outs, kind):
    """What a consumer ends up with, independent of how the steps were grouped into outputs."""
    last = outs[-1]
    c = last.outputs[0]
    assert last.finished and all(not o.finished for o in outs[:-1])
    deltas = [i for o in outs for i in o.outputs[0].delta_token_ids]
    text = "".join(o.outputs[0].delta_text for o in outs)
    assert text == c.text
    if kind == "delta":
        ids = deltas
        lps = None if c.logprobs is None else [x for o in outs for x in o.outputs[0].logprobs]
        plp = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    else:
        assert c.token_ids == deltas
        ids, lps, plp = c.token_ids, c.logprobs, last.prompt_logprobs
    if kind == "final_only":
        assert len(outs) == 1
    return dict(ids=ids, text=c.text, lps=_lp(lps), plp=_plp(plp), finish=c.finish_reason, stop=c.stop_reason,
                n=last.metrics.num_generated_tokens, prompt=last.prompt, prompt_ids=last.prompt_token_ids,
                error=last.error)


def test_outputs_equal_the_in_process_engine(core, ref):
    """Concurrent requests of every output kind, with stop strings (the core runs past them: the front end cuts
    and aborts), stop token ids, min_tokens, logprobs and prompt logprobs; then the server's n > 1 expansion."""
    from dsv4.serve.handlers import OpenAIServing
    from dsv4.serve.protocol import CompletionRequest

    greedy = dict(temperature=0, ignore_eos=True)
    base = asyncio.run(_collect(ref, "Once upon a time", SamplingParams(max_tokens=16, **greedy)))[-1].outputs[0]
    stop = base.text[12:15]  # met mid-stream
    assert len(stop) == 3 and 9 <= base.text.find(stop) and len(base.text) > 40
    stop_id = base.token_ids[6]
    cases = [
        ("Hello", SamplingParams(max_tokens=12, logprobs=2, output_kind="delta", **greedy)),
        ([0, 7, 8, 9], SamplingParams(max_tokens=10, logprobs=0, prompt_logprobs=1, **greedy)),
        ([0, 7, 8, 9], SamplingParams(max_tokens=10, prompt_logprobs=2, output_kind="delta", **greedy)),
        ("x", SamplingParams(max_tokens=10, temperature=0.8, seed=3, output_kind="final_only", logprobs=1)),
        ("Once upon a time", SamplingParams(max_tokens=16, stop=[stop], output_kind="delta", logprobs=1, **greedy)),
        ("Once upon a time", SamplingParams(max_tokens=16, stop=["zzzq", stop], include_stop_str_in_output=True,
                                            **greedy)),
        ("Once upon a time", SamplingParams(max_tokens=16, stop=[stop], min_tokens=12, output_kind="delta",
                                            **greedy)),
        ("Once upon a time", SamplingParams(max_tokens=16, stop_token_ids=[stop_id], output_kind="final_only",
                                            **greedy)),
        ([0, 3], SamplingParams(max_tokens=8, temperature=0, output_kind="delta")),  # EOS allowed
        # ends by length while the text's tail could still start a stop string: the tail is released at the end
        ("Once upon a time", SamplingParams(max_tokens=16, stop=[base.text[-2:] + "\u2603"], output_kind="delta",
                                            **greedy)),
    ]

    async def run(llm):
        return await asyncio.gather(*(_collect(llm, p, sp) for p, sp in cases))

    async def both(f):  # the core process and the engine thread at once
        return await asyncio.gather(f(core), f(ref))

    got, want = asyncio.run(both(run))
    for (p, sp), g, w in zip(cases, got, want):
        assert _summary(g, sp.output_kind) == _summary(w, sp.output_kind), (p, sp)
    stopped = _summary(got[4], "delta")
    assert stopped["finish"] == "stop" and stopped["stop"] == stop and not stopped["text"].endswith(stop)
    assert _summary(got[5], "cumulative")["text"].endswith(stop)
    assert _summary(got[7], "final_only")["stop"] == stop_id
    assert _summary(got[9], "delta")["text"] == base.text

    async def serve(llm):
        s = OpenAIServing(llm, "tiny")
        body = dict(prompt=[0, 5, 6], n=3, max_tokens=10, temperature=0.9, seed=7, logprobs=1, stop=[stop])
        r = await s.completions(CompletionRequest(**body))
        lines = [x async for x in s.completions_stream(CompletionRequest(**body, stream=True))]
        return r, lines

    (r1, l1), (r2, l2) = asyncio.run(both(serve))
    for r in (r1, r2):
        r.pop("id"), r.pop("created")
        for c in r["choices"]:
            c["logprobs"]["token_logprobs"] = [_Close(v) for v in c["logprobs"]["token_logprobs"]]
            c["logprobs"]["top_logprobs"] = [{k: _Close(v) for k, v in d.items()} for d in c["logprobs"]["top_logprobs"]]
    assert r1 == r2

    def streamed(lines):
        import json

        text, finish = {}, {}
        for ln in lines:
            if ln.startswith("data: {"):
                for ch in json.loads(ln[6:])["choices"]:
                    text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
                    finish[ch["index"]] = ch["finish_reason"] or finish.get(ch["index"])
        return text, finish

    assert streamed(l1) == streamed(l2)
    assert streamed(l1)[0] == {c["index"]: c["text"] for c in r1["choices"]}


async def _until_idle(llm, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = llm.engine.load()
        if load["running"] == load["waiting"] == 0 or time.monotonic() > deadline:
            return load
        await asyncio.sleep(0.01)


def test_abort_mid_stream_frees_the_request_in_the_core(core):
    """A consumer that leaves aborts its request in the core; so does a stop string the front end finds (the
    core, which never sees stop strings, would otherwise generate to max_tokens)."""
    greedy = dict(temperature=0, ignore_eos=True)

    async def main():
        gen = core.generate([0, 5], SamplingParams(max_tokens=450, **greedy), request_id="ab")
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        left = await _until_idle(core)
        text = (await _collect(core, "Once upon a time", SamplingParams(max_tokens=16, **greedy)))[-1].outputs[0].text
        t0 = time.monotonic()
        last = (await _collect(core, "Once upon a time", SamplingParams(max_tokens=450, stop=text[12:15], **greedy)))[-1]
        return left, last, await _until_idle(core), time.monotonic() - t0

    left, last, after_stop, took = asyncio.run(main())
    assert left["running"] == left["waiting"] == 0, left
    reason = {r: (why, n) for r, why, n in core.ended}["ab"]
    assert reason[0] == "abort" and reason[1] < 100, reason
    assert last.outputs[0].finish_reason == "stop" and last.metrics.num_generated_tokens < 16
    assert after_stop["running"] == after_stop["waiting"] == 0 and took < 5, (after_stop, took)
    load = core.engine.load()
    assert load["free_pages"] == load["pages"] and load["free_slots"] == load["slots"] and core.num_unfinished == 0


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_client_that_never_reads_holds_one_merged_output(mode, core, ref):
    """Hundreds of tokens are made for a stream nobody reads: its buffer holds one output (merged), the core
    serves other requests meanwhile, and the output finally read carries every token since the last read."""
    llm = core if mode == "process" else ref
    N = 150

    async def main():
        params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, output_kind="delta", logprobs=0)
        rid = f"lazy-{mode}"
        gen = llm.generate([0, 9], params, request_id=rid)
        first = await gen.__anext__()
        others = asyncio.gather(*(_collect(llm, [0, 20 + i], SamplingParams(max_tokens=10, temperature=0,
                                                                            ignore_eos=True)) for i in range(2)))
        most = 0
        while rid in llm._streams:  # (until its last output is in the buffer)
            most = max(most, llm.pending_outputs(rid))
            await asyncio.sleep(0.002)
        done = await others
        rest = [o async for o in gen]
        return first, rest, done, most

    first, rest, done, most = asyncio.run(main())
    assert most <= 1, f"{most} outputs queued for a consumer that does not read"
    assert all(len(o[-1].outputs[0].token_ids) == 10 for o in done)  # the others were served meanwhile
    assert len(rest) == 1 and rest[0].finished  # one merged output
    c = rest[0].outputs[0]
    assert len(first.outputs[0].token_ids) + len(c.token_ids) == N == rest[0].metrics.num_generated_tokens
    assert c.delta_token_ids == c.token_ids and len(c.logprobs) == len(c.token_ids)
    assert first.outputs[0].delta_text + c.delta_text == c.text


class _FaultyEngine(LLMEngine):
    """Its step fails while a request whose prompt starts 0, 77 is in it."""

    def step(self):
        if any(r.prompt_token_ids[:2] == [0, 77] for r in self.requests.values()):
            raise RuntimeError("simulated device fault")
        return super().step()


def _start_faulty(config, dist=None):  # (runs in the core process)
    return _FaultyEngine(config)


class _FaultyLLM(AsyncLLM):
    start_engine = staticmethod(_start_faulty)


def test_a_core_that_dies_fails_running_requests_and_turns_unhealthy(tiny_dir):
    """First a failing step (in the core): its request gets an EngineStepError, /health says why until a step
    succeeds. Then the core is killed: running requests end with an EngineDeadError, /health names the death,
    new requests are refused, shutdown does not hang."""
    from dsv4.engine.async_engine import EngineStepError

    async def main():
        llm = _FaultyLLM(_config(tiny_dir), engine_process=True)
        ended = []
        llm.finish_listeners.append(lambda o: ended.append(o.outputs[0].finish_reason))
        assert llm.health() is None
        with pytest.raises(EngineStepError, match="simulated device fault"):
            await asyncio.wait_for(_collect(llm, [0, 77, 5], SamplingParams(max_tokens=4)), 20)
        assert "simulated device fault" in llm.health()
        assert len((await _collect(llm, [0, 5], SamplingParams(max_tokens=3)))[-1].outputs[0].token_ids) == 3
        assert llm.health() is None and ended == ["error", "length"]
        ended.clear()
        started = asyncio.Event()
        seen = []

        async def stream(i):
            n = 0
            try:
                async for _ in llm.generate([0, 30 + i], SamplingParams(max_tokens=480, ignore_eos=True)):
                    n += 1
                    seen.append(i)
                    if len(set(seen)) == 3:
                        started.set()
            except EngineDeadError as e:
                return n, str(e)
            return n, None

        tasks = [asyncio.create_task(stream(i)) for i in range(3)]
        await asyncio.wait_for(started.wait(), 30)
        os.kill(llm.engine_process.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        why = llm.health()
        with pytest.raises(EngineDeadError, match="core process died"):
            async for _ in llm.generate([0, 1], SamplingParams(max_tokens=2)):
                pass
        await asyncio.wait_for(llm.shutdown(timeout=5), 20)
        return results, why, ended

    results, why, ended = asyncio.run(main())
    for n, err in results:
        assert err is not None and "core process died" in err and "SIGKILL" in err and n < 480, (n, err)
    assert why is not None and "core process died" in why and "SIGKILL" in why, why
    assert ended == ["error"] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_core_dies_with_its_front_end(tiny_dir):
    script = textwrap.dedent(f"""
        import time
        import torch
        torch.set_num_threads(1)
        from dsv4.engine.async_engine import AsyncLLM
        from dsv4.config import EngineConfig
        llm = AsyncLLM(EngineConfig(model={str(tiny_dir)!r}, device="cpu", dtype="float32", numerics="plain",
                                    max_model_len=512), engine_process=True)
        print(llm.engine_process.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        pid = int(proc.stdout.readline())
        assert _running(pid)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.time() + 10
        while time.time() < deadline and _running(pid):
            time.sleep(0.05)
        assert not _running(pid), "the core process outlived its front end"
    finally:
        proc.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_speculative_decoding_and_prefix_caching_through_the_core_process(tiny_dir, ref):
    """Speculative decoding (MTP drafts) and prefix caching in the core process: a greedy stream has the
    tokens and text of the plain in-thread engine, several tokens may arrive per output, the request's
    metrics report the verify steps and drafts, and the same prompt sent again reports its cached tokens."""
    cfg = EngineConfig(model=str(tiny_dir), device="cpu", dtype="float32", numerics="plain", max_model_len=512,
                       max_num_seqs=8, speculative_tokens=2, enable_prefix_caching=True)
    llm = AsyncLLM(cfg, engine_process=True)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, output_kind="delta")
        prompt = list(range(3, 300))
        want = asyncio.run(_collect(ref, prompt, params))
        for cached in (0, 256):
            got = asyncio.run(_collect(llm, prompt, params))
            ids = [t for o in got for t in o.outputs[0].delta_token_ids]
            assert ids == [t for o in want for t in o.outputs[0].delta_token_ids]
            assert "".join(o.outputs[0].delta_text for o in got) == "".join(o.outputs[0].delta_text for o in want)
            m = got[-1].metrics
            assert m.num_spec_steps > 0 and m.num_draft_tokens >= m.num_spec_steps
            assert 0 <= m.num_accepted_tokens <= m.num_draft_tokens
            assert got[-1].num_cached_tokens == cached
    finally:
        asyncio.run(llm.shutdown(timeout=0))
