"""What a careless or hostile client found in the server (issue 20): each test failed on the server as
it was before the fix. Disconnect tests use long requests and check that the request really stopped
early (ended as "abort" with few tokens) and freed its pages."""

import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_fixture import LiveServer  # noqa: E402


LONG = 400  # tokens a disconnecting client asks for; an abort must stop it far earlier


@pytest.fixture(scope="module")
def srv(lm):
    with LiveServer(lm) as s:
        yield s


class _Errors(logging.Handler):
    """ERROR records of the server's and uvicorn's loggers (uvicorn's do not reach the root logger)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def errors():
    h = _Errors()
    names = ["uvicorn.error", "dsv4", "dsv4.serve", "dsv4.async"]
    for n in names:
        logging.getLogger(n).addHandler(h)
    yield h.records
    for n in names:
        logging.getLogger(n).removeHandler(h)


def _metric(srv, name: str, **labels) -> float:
    text = httpx.get(srv.base + "/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_stream_n4_disconnect_unwinds_cleanly_and_counts_aborts(srv, errors):
    """Item 1 + 10: a streaming n=4 request whose client leaves ends every choice as an abort (in
    /metrics too), with no 'aclose(): asynchronous generator is already running' error or 500."""
    mark = len(srv.ended)
    aborts0 = _metric(srv, "dsv4_requests_finished_total", finish_reason="abort")
    gen0 = _metric(srv, "dsv4_generation_tokens_total")
    e500 = _metric(srv, "dsv4_http_errors_total", status="500")
    body = {"prompt": [0, 5, 6], "max_tokens": LONG, "n": 4, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 8:
                    break  # leave mid-stream
    srv.assert_no_leaks()
    time.sleep(0.3)
    ended = srv.ended[mark:]
    assert len(ended) == 4, ended
    assert all(reason == "abort" and n < LONG // 2 for _, reason, n in ended), ended
    assert not [r for r in errors if "aclose" in r.getMessage() or r.exc_info], [r.getMessage() for r in errors]
    assert _metric(srv, "dsv4_http_errors_total", status="500") == e500
    assert _metric(srv, "dsv4_requests_finished_total", finish_reason="abort") == aborts0 + 4
    assert _metric(srv, "dsv4_generation_tokens_total") == gen0 + sum(n for _, _, n in ended)


def test_streaming_disconnects_stop_their_requests(srv):
    """Clients that leave a long stream mid-way: their requests end as aborts long before max_tokens;
    those that stay get everything."""
    mark = len(srv.ended)

    async def one(c, i, leave):
        body = {"prompt": [0, 50 + i], "max_tokens": LONG if leave else 6, "temperature": 0, "ignore_eos": True,
                "stream": True}
        n = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    n += 1
                    ch = json.loads(line[6:])["choices"][0]
                    if leave and n == 3:
                        return "left"
                    if ch["finish_reason"]:
                        return ch["finish_reason"]
        return "eof"

    async def main():
        async with httpx.AsyncClient(base_url=srv.base, timeout=120) as c:
            return await asyncio.gather(*(one(c, i, i % 3 == 0) for i in range(12)))

    got = asyncio.run(main())
    assert got == ["left" if i % 3 == 0 else "length" for i in range(12)]
    srv.assert_no_leaks()
    time.sleep(0.3)
    ended = srv.ended[mark:]
    aborted = [e for e in ended if e[1] == "abort"]
    assert len(aborted) == 4 and all(n < LONG // 2 for _, _, n in aborted), ended


def test_non_streaming_disconnect_stops_the_request(srv):
    mark = len(srv.ended)
    body = {"prompt": [0, 7, 7, 7], "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base + "/v1/completions", json=body, timeout=0.5)
    srv.assert_no_leaks()
    time.sleep(0.3)
    ended = srv.ended[mark:]
    assert len(ended) == 1 and ended[0][1] == "abort" and ended[0][2] < LONG // 2, ended


def test_multi_prompt_completion_runs_prompts_concurrently(srv):
    """Item 8: the prompts of one /v1/completions request share engine steps."""
    steps0 = srv.engine.num_steps
    body = {"prompt": [[0, 11, 12], [0, 13], [0, 14, 15]], "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    r = httpx.post(srv.base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert r.json()["usage"]["completion_tokens"] == 60
    assert srv.engine.num_steps - steps0 < 30  # one after another would take >= 60 steps
    # each prompt's text is what it gets alone
    for k, p in enumerate(body["prompt"]):
        one = httpx.post(srv.base + "/v1/completions", json=dict(body, prompt=p), timeout=60).json()
        assert one["choices"][0]["text"] == r.json()["choices"][k]["text"]
    # and streaming: the choices interleave
    order = []
    with httpx.stream("POST", srv.base + "/v1/completions", json=dict(body, stream=True), timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                order.append(json.loads(line[6:])["choices"][0]["index"])
    assert order.index(2) < len(order) - order[::-1].index(0) - 1  # prompt 2 started before prompt 0 ended


def test_logit_bias(srv):
    """Item 3: logit_bias has its effect (+100 forces a token, -100 bans one)."""
    c = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    def tokens(**kw):
        r = c.completions.create(model="tiny", prompt=[0, 5, 6], max_tokens=6, temperature=0, logprobs=0, **kw)
        return r.choices[0].logprobs.tokens

    tok77 = srv.engine.tokenizer.decode([77], skip_special_tokens=False)
    free = tokens()
    assert free != [tok77] * 6
    assert tokens(logit_bias={"77": 100}) == [tok77] * 6
    first = srv.engine.tokenizer.encode(free[0], add_bos=False)
    assert len(first) == 1
    banned = tokens(logit_bias={str(first[0]): -100})
    assert banned[0] != free[0]
    for bias, needle in [({"x": 1}, "token ids"), ({"999999": 1}, "outside the vocabulary"), ({"5": 101}, "-100, 100")]:
        r = httpx.post(srv.base + "/v1/completions", json={"prompt": [0, 5], "logit_bias": bias})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "logit_bias"


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path,extra,status,param,needle", [
    ("/v1/chat/completions", {"frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ("/v1/completions", {"frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, 400, "functions", "not supported"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, 400, "modalities", "not supported"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True, "bogus": 1}}, 400, "stream_options.bogus", ""),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, 400,
     "tools[0].function.parameters", "JSON Schema object"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     400, "tools[0].function.parameters", "JSON Schema object"),
    ("/v1/chat/completions", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice", "'nope'"),
    ("/v1/chat/completions", {"tool_choice": "required"}, 400, "tool_choice", "only allowed when tools"),
    ("/v1/completions", {"prompt": [0] + [5] * 600}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": [0, 5], "seed": 2**80}, 400, "seed", "64-bit"),
    ("/v1/chat/completions", {"seed": -2**70}, 400, "seed", "64-bit"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, 400, "response_format", "response_format.type"),
    ("/v1/chat/completions", {"reasoning_effort": "extreme"}, 400, "reasoning_effort", "reasoning_effort"),
])
def test_request_errors_name_the_field(srv, path, extra, status, param, needle):
    """Items 3 + 9: refused fields, tool definitions and error details as OpenAI's API gives them."""
    body = dict(CHAT if path.endswith("chat/completions") else {"prompt": [0, 5], "max_tokens": 2}, **extra)
    r = httpx.post(srv.base + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert not err["message"].startswith("invalid messages")


def test_accepted_and_ignored_fields(srv):
    body = dict(CHAT, user="u1", store=False, metadata={"a": "b"}, parallel_tool_calls=True, modalities=["text"],
                tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = httpx.post(srv.base + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_unknown_paths_answer_in_openai_shape(srv):
    r = httpx.get(srv.base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(srv.base + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_request_that_can_never_fit_is_400_not_429(lm):
    with LiveServer(lm, max_queued=4) as s:
        r = httpx.post(s.base + "/v1/completions", json={"prompt": [0, 5], "n": 5, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences", r.text
        r = httpx.post(s.base + "/v1/completions", json={"prompt": [[0, 5], [0, 6], [0, 7]], "n": 2, "max_tokens": 2})
        assert r.status_code == 400, r.text
        r = httpx.post(s.base + "/v1/completions", json={"prompt": [0, 5], "n": 4, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_health_reports_a_failing_engine(lm):
    """Item 6: after a failed step /health is 503 and says why; the failed request gets a readable 500;
    the next good step makes it healthy again."""
    with LiveServer(lm) as s:
        real = s.engine.step
        fail = {"on": True}

        def step():
            if fail["on"]:
                raise RuntimeError("simulated device fault")
            return real()

        s.engine.step = step
        r = httpx.post(s.base + "/v1/completions", json={"prompt": [0, 5], "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "simulated device fault" in r.json()["error"]["message"], r.text
        h = httpx.get(s.base + "/health")
        assert h.status_code == 503 and "simulated device fault" in h.json()["error"]["message"], h.text
        fail["on"] = False
        r = httpx.post(s.base + "/v1/completions", json={"prompt": [0, 5], "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        assert httpx.get(s.base + "/health").status_code == 200
        s.engine.closed = True  # what an expert-parallel engine that stopped its ranks reports
        h = httpx.get(s.base + "/health")
        assert h.status_code == 503 and "expert-parallel" in h.json()["error"]["message"]
        del s.engine.closed
        s.assert_no_leaks()


def test_shutdown_ends_long_streams_with_a_readable_error(lm):
    """Item 5: on shutdown a stream that outlives the grace period ends with an error event (not a cut
    connection or a 35 s wait), and the server is down within a few seconds."""
    s = LiveServer(lm, shutdown_grace_s=0.5)
    got = {"events": []}
    with s:
        def stream():
            with httpx.stream("POST", s.base + "/v1/completions", timeout=120,
                              json={"prompt": [0, 9], "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got["events"].append(line[6:])

        t = threading.Thread(target=stream)
        t.start()
        while not s.engine.num_unfinished_requests():
            time.sleep(0.01)
        time.sleep(0.2)
        t0 = time.monotonic()
        s.server.should_exit = True
        t.join(timeout=60)
        s.thread.join(timeout=60)
        took = time.monotonic() - t0
    assert not s.thread.is_alive() and took < 8, took
    ev = got["events"]
    assert ev[-1] == "[DONE]"
    err = json.loads(ev[-2])["error"]
    assert err["code"] == "engine_unavailable" and "shutting down" in err["message"] and "grace" in err["message"]
    assert s.ended and s.ended[-1][1] == "error"
    assert s.engine.num_unfinished_requests() == 0


def test_ticket_released_when_stream_never_starts():
    """Item 7: the queue place of a streaming request is released by the response itself, even when
    the client is gone before the first byte (no reliance on garbage collection)."""
    from dsv4.serve.server import _TicketedStream

    class Ticket:
        released = 0

        def release(self):
            self.released += 1

    async def body():
        yield "data: x\n\n"

    async def send(msg):
        raise OSError("client gone")

    async def receive():
        return {"type": "http.disconnect"}

    t = Ticket()
    resp = _TicketedStream(body(), t, media_type="text/event-stream")
    with pytest.raises(Exception):  # starlette turns the OSError into ClientDisconnect
        asyncio.run(resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert t.released == 1
