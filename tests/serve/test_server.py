"""The server with the real `openai` client (and raw HTTP) against a live server on 127.0.0.1 over the
tiny model: completions and chat, streaming and not, logprobs, n, seeds, usage, errors, API key,
metrics; malformed and fuzzed requests never produce a 5xx or disturb other requests; 200 concurrent
streaming clients with random disconnects lose nothing and leak no cache pages."""

import asyncio
import json
import random
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_fixture import LiveServer  # noqa: E402



@pytest.fixture(scope="module")
def srv(lm):
    with LiveServer(lm) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_health_metrics(srv, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(srv.base + "/health").json() == {"status": "ok"}
    text = httpx.get(srv.base + "/metrics").text
    for name in ("dsv4_num_requests_waiting", "dsv4_num_requests_running", "dsv4_kv_cache_usage",
                 "dsv4_time_to_first_token_seconds", "dsv4_time_per_output_token_seconds",
                 "dsv4_generation_tokens_total"):
        assert name in text, name


def test_prefix_caching_is_reported(lm):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field) and the prefix-cache counters of /metrics."""
    with LiveServer(lm, enable_prefix_caching=True) as srv:
        c = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = list(range(5, 305))
        a, b = (c.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0) for _ in range(2))
        assert (a.usage.prompt_tokens_details.cached_tokens, b.usage.prompt_tokens_details.cached_tokens) == (0, 256)
        assert a.choices[0].text == b.choices[0].text
        chunks = [list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 300}],
                                                 max_tokens=2, stream=True, stream_options={"include_usage": True}))
                  for _ in range(2)]
        assert chunks[0][-1].usage.prompt_tokens_details.cached_tokens == 0
        assert chunks[1][-1].usage.prompt_tokens_details.cached_tokens >= 256
        text = httpx.get(srv.base + "/metrics").text
        hits = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("dsv4_prefix_cache_hits_total"))
        assert hits == 256 + chunks[1][-1].usage.prompt_tokens_details.cached_tokens
        assert "dsv4_prefix_cache_queries_total" in text
        srv.wait_idle()


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    assert r.usage.prompt_tokens == 2 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(c.logprobs.tokens) == r.usage.completion_tokens == len(c.logprobs.token_logprobs)
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert "".join(c.logprobs.tokens) == c.text
    # streaming gives the same greedy text
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    # token-id prompts, echo, several prompts, n
    r2 = client.completions.create(model="tiny", prompt=[[0, 11, 12], [0, 13]], max_tokens=3, temperature=0.9,
                                   n=2, seed=4)
    assert sorted(ch.index for ch in r2.choices) == [0, 1, 2, 3]
    r3 = client.completions.create(model="tiny", prompt=[[0, 11, 12], [0, 13]], max_tokens=3, temperature=0.9,
                                   n=2, seed=4)
    assert [ch.text for ch in r2.choices] == [ch.text for ch in r3.choices]  # seeded


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("length", "stop", "tool_calls")
    assert len(c.logprobs.content) == r.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert "DSML" not in text


def test_chat_thinking_and_tools_requests_are_accepted(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Weather in Paris?"}],
                                       tools=tools, max_tokens=8, temperature=0,
                                       extra_body={"thinking": True, "reasoning_effort": "max"})
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
    assert isinstance(reasoning, str) and (msg.content or "").find("DSML") < 0


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "maximum context length"),
    ({"messages": [{"role": "user", "content": " hello" * 700}]}, 400, "maximum context length"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": "hello"}, 400, "messages"),
])
def test_errors_are_openai_4xx(srv, body, status, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(srv.base + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_completion_errors(srv):
    for body, needle in [({"prompt": [0, 999999]}, "outside the vocabulary"), ({"prompt": []}, "empty"),
                         ({"prompt": "x", "logprobs": 50}, "logprobs"), ({"prompt": "x", "suffix": "y"}, "suffix")]:
        r = httpx.post(srv.base + "/v1/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_api_key(lm):
    with LiveServer(lm, api_key="sekret") as s:
        assert httpx.get(s.base + "/v1/models").status_code == 401
        assert httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = openai.OpenAI(base_url=s.base + "/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        assert httpx.get(s.base + "/health").status_code == 200  # health stays open


def test_queue_full_answers_429(lm):
    with LiveServer(lm, max_queued=1) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.base, timeout=60) as c:
                body = {"prompt": [0, 1, 2], "max_tokens": 40, "ignore_eos": True}
                rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))
                return [r.status_code for r in rs]
        codes = asyncio.run(main())
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        s.assert_no_leaks()


def test_fuzzed_requests_never_5xx_nor_disturb_others(srv):
    rng = random.Random(0)
    atoms = [None, True, 0, -1, 1.5, 1e308, "x", "", [], {}, [1, "a"], {"role": "user"}, "\u0000\ud800"[:1],
             2**63, -2**63, [[]], [[0]], "tiny"]
    keys = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop",
            "logprobs", "top_logprobs", "seed", "tools", "tool_choice", "response_format", "presence_penalty",
            "stream_options", "max_completion_tokens", "reasoning_effort", "thinking", "min_p", "stop_token_ids"]

    def rand_value(depth=0):
        if depth < 2 and rng.random() < 0.3:
            return [rand_value(depth + 1) for _ in range(rng.randint(0, 3))]
        if depth < 2 and rng.random() < 0.2:
            return {rng.choice(keys + ["role", "content"]): rand_value(depth + 1) for _ in range(rng.randint(0, 3))}
        return rng.choice(atoms)

    async def main():
        async with httpx.AsyncClient(base_url=srv.base, timeout=120) as c:
            good = asyncio.create_task(c.post("/v1/completions", json={"prompt": [0, 5, 6], "max_tokens": 24,
                                                                       "temperature": 0, "ignore_eos": True}))
            codes = []
            for i in range(150):
                body = {k: rand_value() for k in rng.sample(keys, rng.randint(0, 6))}
                if rng.random() < 0.5:
                    body["messages"] = rng.choice([[{"role": "user", "content": rand_value()}], rand_value()])
                path = rng.choice(["/v1/chat/completions", "/v1/completions"])
                data = json.dumps(body) if rng.random() > 0.1 else json.dumps(body)[: rng.randint(0, 20)]
                r = await c.post(path, content=data, headers={"content-type": "application/json"})
                codes.append((r.status_code, data, r.text[:200]))
                if body.get("stream") is True and r.status_code == 200:
                    pass
            ref = await good
            return codes, ref
    codes, ref = asyncio.run(main())
    bad = [(s, d, t) for s, d, t in codes if s >= 500]
    assert not bad, bad[:3]
    assert ref.status_code == 200 and ref.json()["usage"]["completion_tokens"] == 24
    srv.assert_no_leaks()


def test_200_streaming_clients_with_disconnects(srv):
    rng = random.Random(1)
    plan = [(i, rng.random() < 0.3, rng.randint(1, 4)) for i in range(200)]  # (id, disconnects, after k chunks)

    async def one(c, i, leave, k):  # a client that leaves asks for far more than it reads
        body = {"prompt": [0, 100 + i], "max_tokens": 300 if leave else 6, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text, n = "", 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                n += 1
                if leave and n >= k:
                    return i, None  # disconnect mid-stream
                if ch["finish_reason"]:
                    return i, (text, ch["finish_reason"])
        return i, (text, "eof")

    async def main():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=srv.base, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c, i, leave, k) for i, leave, k in plan))

    mark = len(srv.ended)
    results = dict(asyncio.run(main()))
    finished = {i: r for i, r in results.items() if r is not None}
    assert len(finished) == sum(1 for _, leave, _ in plan if not leave)
    assert all(fr == "length" for _, fr in finished.values())
    # nothing lost: a finished stream carries exactly the tokens a non-streaming request gets
    for i in list(finished)[:5]:
        full = httpx.post(srv.base + "/v1/completions", json={"prompt": [0, 100 + i], "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True}, timeout=60)
        assert full.json()["choices"][0]["text"] == finished[i][0]
    srv.assert_no_leaks()
    # every client that left stopped its request early: an abort, far short of its 300 tokens
    import time
    time.sleep(0.3)
    aborted = [(r, n) for _, r, n in srv.ended[mark:] if r == "abort"]
    assert len(aborted) == sum(1 for _, leave, _ in plan if leave) and max(n for _, n in aborted) < 150


def test_graceful_shutdown_finishes_in_flight(lm):
    """Shutting down lets a running stream finish (within the grace period) instead of cutting it."""
    import threading

    s = LiveServer(lm, shutdown_grace_s=60)  # (generous: a loaded CI machine must not cut the stream)
    with s:
        got = {}

        def stream():
            text, finish = "", None
            with httpx.stream("POST", s.base + "/v1/completions", timeout=120,
                              json={"prompt": [0, 9], "max_tokens": 30, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["text"]
                        finish = ch["finish_reason"] or finish
            got["finish"] = finish

        t = threading.Thread(target=stream)
        t.start()
        while not s.engine.num_unfinished_requests():
            pass
        s.server.should_exit = True  # what SIGINT / SIGTERM do
        t.join(timeout=120)
    assert got.get("finish") == "length"
    assert s.llm._stop  # the engine thread stopped after the stream finished
