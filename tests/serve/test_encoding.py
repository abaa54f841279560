"""Prompt encoding: the official golden examples reproduced exactly (string and token ids with the
real tokenizer), extra reference-generated cases, OpenAI input forms, and errors."""

import copy
import json
from pathlib import Path

import pytest

from dsv4.serve.encoding import (ASSISTANT, BOS, EOS, REASONING_EFFORT_MAX, THINK_END, THINK_START, USER,
                                 encode_messages)
from dsv4.serve.parsing import parse_completion
from dsv4.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(None)


def _read(name):
    return (GOLDEN / name).read_text(encoding="utf-8")


def _official(n):
    """(messages, kwargs) of official case n, used as the reference test uses them."""
    data = json.loads(_read(f"test_input_{n}.json"))
    if n == 1:
        return data["messages"], {"tools": data["tools"], "thinking": True}
    return data, {"thinking": n != 4}


def _same(tok, got, gold):
    assert got == gold
    assert tok.encode(got, add_bos=False) == tok.encode(gold, add_bos=False)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_official_golden(tok, n):
    messages, kw = _official(n)
    _same(tok, encode_messages(messages, **kw), _read(f"test_output_{n}.txt"))


def test_official_golden_tokens_are_special_tokens(tok):
    ids = tok.encode(_read("test_output_1.txt"), add_bos=False)
    for s in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, "｜DSML｜"):
        assert tok.token_to_id(s) in ids, s


EXTRA = json.loads(_read("extra_cases.json"))


@pytest.mark.parametrize("case", EXTRA, ids=[c["name"] for c in EXTRA])
def test_extra_golden(tok, case):
    kw = {k: case[k] for k in ("thinking", "reasoning_effort", "tools", "response_format", "drop_thinking")
          if k in case}
    _same(tok, encode_messages(case["messages"], **kw), _read(f"extra_output_{case['name']}.txt"))


def test_extra_golden_covers_the_rules():
    out = {c["name"]: _read(f"extra_output_{c['name']}.txt") for c in EXTRA}
    assert out["max_effort_multiturn"].startswith(BOS + REASONING_EFFORT_MAX + "You are")
    assert REASONING_EFFORT_MAX not in out["max_effort_chat_mode_ignored"]
    assert out["keep_thinking_multiturn"].count(THINK_START) == 3
    reordered = out["chat_tools_parallel_calls_results_reordered"]
    assert (reordered.index("<tool_result>1024") < reordered.index("<tool_result>{\"population")
            < reordered.index("<tool_result>error") < reordered.index("Also, be brief."))
    assert "R1" not in out["thinking_drop_old_reasoning_after_tools_turn"]


def test_golden_completions_parse_back():
    """The assistant turns of the golden prompts parse back into the input messages."""
    for n in (1, 3):
        messages, _ = _official(n)
        gold = _read(f"test_output_{n}.txt")
        turns = gold.split(ASSISTANT + THINK_START)[1:]
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(turns) == len(assistants)
        for text, msg in zip(turns, assistants):
            text = text[:text.index(EOS) + len(EOS)]
            reasoning, content, calls = parse_completion(text, thinking=True, tools=True)
            assert reasoning == msg["reasoning_content"]
            assert content == (msg.get("content") or "")
            want = msg.get("tool_calls") or []
            assert [c.name for c in calls] == [c["function"]["name"] for c in want]
            assert [json.loads(c.arguments) for c in calls] == [json.loads(c["function"]["arguments"]) for c in want]


# ---- rules on OpenAI-style input ---------------------------------------------------------------------

def test_chat_and_thinking_transitions():
    msgs = [{"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == BOS + USER + "Hi" + ASSISTANT + THINK_END
    assert encode_messages(msgs, thinking=True) == BOS + USER + "Hi" + ASSISTANT + THINK_START
    assert encode_messages(msgs, thinking=True, add_bos=False) == USER + "Hi" + ASSISTANT + THINK_START
    assert encode_messages(msgs, thinking=True, reasoning_effort="max") == (
        BOS + REASONING_EFFORT_MAX + USER + "Hi" + ASSISTANT + THINK_START)
    for effort in ("low", "medium", "high"):
        assert encode_messages(msgs, thinking=True, reasoning_effort=effort) == encode_messages(msgs, thinking=True)


def test_content_parts_and_reasoning_alias():
    parts = [{"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
             {"role": "user", "content": [{"type": "text", "text": "Q"}]},
             {"role": "assistant", "content": None, "reasoning": "r",
              "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
             {"role": "tool", "tool_call_id": "x",
              "content": [{"type": "text", "text": "1"}, {"type": "text", "text": "2"}]}]
    p = encode_messages(parts, thinking=True, drop_thinking=False)
    assert p.startswith(BOS + "A\nB" + USER + "Q" + ASSISTANT + THINK_START + "r" + THINK_END)
    assert '<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>' in p
    assert p.endswith(USER + "<tool_result>1\n\n2</tool_result>" + ASSISTANT + THINK_START)


def test_request_tools_go_on_the_leading_system_message():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_sys = encode_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], tools=tools)
    assert with_sys.startswith(BOS + "S\n\n## Tools\n\n")
    assert '\n\n{"name": "f", "parameters": {}}\n\nYou MUST strictly follow' in with_sys
    no_sys = encode_messages([{"role": "user", "content": "Q"}], tools=tools)
    assert no_sys.startswith(BOS + "\n\n## Tools\n\n") and no_sys.endswith(USER + "Q" + ASSISTANT + THINK_END)
    rf = encode_messages([{"role": "user", "content": "Q"}], response_format={"type": "json_object"})
    assert rf == (BOS + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                  '{"type": "json_object"}' + USER + "Q" + ASSISTANT + THINK_END)
    assert encode_messages([{"role": "user", "content": "Q"}], response_format={"type": "text"}) == (
        encode_messages([{"role": "user", "content": "Q"}]))


def test_tools_disable_drop_thinking():
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
            {"role": "user", "content": "Q2"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "R1" not in encode_messages(msgs, thinking=True)
    assert "R1" in encode_messages(msgs, thinking=True, drop_thinking=False)
    assert "R1" + THINK_END + "A1" in encode_messages(msgs, thinking=True, tools=tools)


def test_tool_results_merge_in_call_order():
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(3)]
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c2", "content": "two"},
            {"role": "tool", "tool_call_id": "c0", "content": "zero"},
            {"role": "tool", "tool_call_id": "c1", "content": "one"},
            {"role": "user", "content": "thanks"}]
    p = encode_messages(msgs)
    assert p.endswith(EOS + USER + "<tool_result>zero</tool_result>\n\n<tool_result>one</tool_result>\n\n"
                      "<tool_result>two</tool_result>\n\nthanks" + ASSISTANT + THINK_END)


def test_context_continues_a_prefix():
    full = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    head = encode_messages(full[:3])
    assert head + encode_messages(full[3:], context=full[:3]) == encode_messages(full)
    assert not encode_messages(full[3:], context=full[:3]).startswith(BOS)


def test_quick_instruction_tasks():
    assert encode_messages([{"role": "user", "content": "Q", "task": "query"}]) == BOS + USER + "Q<｜query｜>"
    assert encode_messages([{"role": "user", "content": "Q", "task": "action"}], thinking=True) == (
        BOS + USER + "Q" + ASSISTANT + THINK_START + "<｜action｜>")


def test_developer_role():
    """DeepSeek's developer turn (a user turn, dropped before the last user message in thinking mode)
    or, on request, OpenAI's meaning (a system message)."""
    msgs = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Q"}]
    assert encode_messages(msgs) == BOS + USER + "Be terse." + USER + "Q" + ASSISTANT + THINK_END
    assert encode_messages(msgs, thinking=True) == BOS + USER + "Q" + ASSISTANT + THINK_START
    assert encode_messages(msgs, thinking=True, developer_as_system=True) == (
        BOS + "Be terse." + USER + "Q" + ASSISTANT + THINK_START)


def test_input_is_not_modified():
    messages, kw = _official(1)
    before = copy.deepcopy((messages, kw))
    encode_messages(messages, **kw)
    assert (messages, kw) == before


_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("messages, where", [
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ("hello", "messages"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}], "messages[1]"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_CALL]},
      {"role": "tool", "tool_call_id": "c9", "content": "r"}], "messages[2].tool_call_id"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_CALL]},
      {"role": "tool", "content": "r"}], "messages[2].tool_call_id"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_CALL]},
      {"role": "assistant", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}], "messages[3]"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": 3}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": "f()"}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": "a", "reasoning_content": 1}], "messages[0].reasoning_content"),
    ([{"role": "developer", "content": ""}], "messages[0].content"),
    ([{"role": "user", "content": "q", "task": "dance"}], "messages[0].task"),
    ([{"role": "system", "content": "s", "response_format": {"type": "yaml"}}], "messages[0].response_format.type"),
])
def test_malformed_messages(messages, where):
    with pytest.raises(ValueError) as e:
        encode_messages(messages)
    assert str(e.value).startswith(where), str(e.value)


@pytest.mark.parametrize("kw, where", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_malformed_request_fields(kw, where):
    with pytest.raises(ValueError) as e:
        encode_messages([{"role": "user", "content": "q"}], **kw)
    assert str(e.value).startswith(where), str(e.value)


def test_lenient_arguments():
    """Empty arguments mean no parameters; an object (not a string) is accepted as is."""
    for args in ("", None, "{}", {}):
        msg = {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                    "function": {"name": "f", "arguments": args}}]}
        assert '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>' in encode_messages([msg])
