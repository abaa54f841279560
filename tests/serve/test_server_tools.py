"""Reasoning and DSML tool calls end to end through the live server with the real openai client. A
random model never writes DSML, so the engine's runner is scripted to emit the tokens of a fixed
answer (everything else — scheduler, detokenizer, parser, HTTP, SSE — is the real path)."""

import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_fixture import LiveServer  # noqa: E402

from dsv4.engine.model_runner import StepResult  # noqa: E402
from dsv4.model import build_model  # noqa: E402
from dsv4.serve.encoding import EOS, THINK_END, render_tool_calls  # noqa: E402

CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
         {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]
REASONING = "The user wants the weather and the time; call both tools."
ANSWER = REASONING + THINK_END + "\n\n" + render_tool_calls(CALLS) + EOS
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("get_weather", "get_time")]


@pytest.fixture(scope="module")
def srv(tiny_dir):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")
    with LiveServer(lm, async_scheduling=False) as s:  # (the scripted runner replaces `execute`: every step goes there)
        script = s.engine.tokenizer.encode(ANSWER, add_bos=False)

        def execute(scheduled):
            out = []
            for req, n in scheduled:
                done = req.num_computed_tokens + n == req.num_tokens
                k = len(req.output_token_ids)
                out.append(StepResult(token_id=script[min(k, len(script) - 1)] if done else None))
            return out

        s.engine.runner.execute = execute
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          tools=TOOLS, max_tokens=200, extra_body={"thinking": True}, **kw)


def test_tool_calls_non_streaming(client):
    r = ask(client)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.model_extra["reasoning_content"] == REASONING
    assert not c.message.content
    got = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert got == [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"tz": "Europe/Paris"}')]
    assert all(t.id and t.type == "function" for t in c.message.tool_calls)


def test_tool_calls_streaming(client):
    chunks = list(ask(client, stream=True))
    reasoning, content, calls = "", "", {}
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for t in d.tool_calls or []:
            slot = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            if t.id:
                slot["id"] = t.id
            if t.function and t.function.name:
                slot["name"] += t.function.name
            if t.function and t.function.arguments:
                slot["arguments"] += t.function.arguments
    assert reasoning == REASONING
    assert "DSML" not in content and "DSML" not in reasoning and content.strip() == ""
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == [
        ("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"tz": "Europe/Paris"}')]
    assert all(calls[i]["id"] for i in calls)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
