"""Output parsing: one-shot results, and streaming invariance — the text cut at every position into two
pieces, into random 1-5 character pieces, and into the real tokenizer's decoded pieces gives the same
final fields, the concatenated deltas equal the final fields, and no delta carries DSML markup."""

import json
import random

import pytest

from dsv4.engine.detokenizer import IncrementalDetokenizer
from dsv4.serve.encoding import encode_messages
from dsv4.serve.parsing import ChatStreamParser, ToolCall, parse_completion
from dsv4.tokenizer import EOS, Tokenizer

D = "｜DSML｜"


def block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def invoke(name, *params):
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def param(name, value, string=True):
    return f'<{D}parameter name="{name}" string="{"true" if string else "false"}">{value}</{D}parameter>'


def ids(i):
    return f"call_{i}"


CODE = 'def f(x):\n    return "<b>" + x  # a \\ b\n\n'
# name -> (text, thinking, tools, expected (reasoning, content, [(name, arguments)]) or None, well_formed)
CASES = {
    "reasoning_content": (
        "Let me think: 2 < 3 and 3 > 2.\n\nSo yes.</think>Yes — 2 < 3.\n\nDone. 😀" + EOS, True, False,
        ("Let me think: 2 < 3 and 3 > 2.\n\nSo yes.", "Yes — 2 < 3.\n\nDone. 😀", []), True),
    "content_only": (
        "Plain answer with </b> and <think> looking text.\n\n" + EOS, False, True,
        ("", "Plain answer with </b> and <think> looking text.\n\n", []), True),
    "reasoning_tool_calls": (
        "I need the weather and a file.\n\n</think>Checking."
        + block(invoke("get_weather", param("location", "Beijing"), param("days", "3", False),
                       param("opts", '{"unit": "c", "hours": [1, 2]}', False)),
                invoke("write_file", param("path", "/tmp/a.py"), param("text", CODE),
                       param("flag", "true", False), param("none", "null", False), param("empty", "")))
        + EOS, True, True,
        ("I need the weather and a file.\n\n", "Checking.",
         [("get_weather", '{"location": "Beijing", "days": 3, "opts": {"unit": "c", "hours": [1, 2]}}'),
          ("write_file", json.dumps({"path": "/tmp/a.py", "text": CODE}, ensure_ascii=False)[:-1]
           + ', "flag": true, "none": null, "empty": ""}')]), True),
    "several_calls_chat": (
        block(invoke("ping"), invoke("search", param("q", "北京 天气")), invoke("ping")) + EOS, False, True,
        ("", "", [("ping", "{}"), ("search", '{"q": "北京 天气"}'), ("ping", "{}")]), True),
    "no_think_end_eos": (
        "The answer is 42." + EOS, True, True, ("The answer is 42.", "The answer is 42.", []), True),
    "no_think_end_cut": (
        "Still thinking about whether", True, True, ("Still thinking about whether", "", []), True),
    "call_inside_reasoning": (
        "I will look it up." + block(invoke("search", param("q", "x"))) + EOS, True, True,
        ("I will look it up.", "", [("search", '{"q": "x"}')]), True),
    "text_after_block": (
        "A." + block(invoke("f", param("a", "1", False))) + "\n\nB." + EOS, False, True,
        ("", "A.\n\nB.", [("f", '{"a": 1}')]), True),
    "bad_json_value": (
        block(invoke("f", param("n", "not json", False), param("m", "NaN", False))) + EOS, False, True,
        ("", "", [("f", '{"n": "not json", "m": "NaN"}')]), True),
    "missing_block_close": (
        "x" + f"\n\n<{D}tool_calls>\n" + invoke("f") + "\n" + EOS, False, True, ("", "x", [("f", "{}")]), True),
    "malformed_garbage": (
        "Hmm." + f"\n\n<{D}tool_calls>\nI changed my mind, no tools." + EOS, False, True,
        ("", f"Hmm.\n\n<{D}tool_calls>\nI changed my mind, no tools.", []), False),
    "malformed_after_call": (
        block(invoke("f", param("a", "x")), f'<{D}invoke nam="g">oops') + EOS, True, True,
        ("", f'\n<{D}invoke nam="g">oops', [("f", '{"a": "x"}')]), False),
    "truncated_in_value": (
        "r</think>" + f"\n\n<{D}tool_calls>\n" + f'<{D}invoke name="f">\n' + param("a", "1", False)
        + f'\n<{D}parameter name="s" string="true">long text cut', True, True,
        ("r", "", [("f", '{"a": 1, "s": "long text cut"}')]), True),
    "truncated_in_tag": (
        "ok" + f"\n\n<{D}tool_calls>\n" + f'<{D}invoke name="f">\n<{D}param', False, True,
        ("", "ok", [("f", "{}")]), True),
    "tools_off_dsml_is_text": (
        "see" + block(invoke("f")) + EOS, False, False, ("", "see" + block(invoke("f")), []), False),
    "after_eos_ignored": (
        "done</think>answer" + EOS + "garbage", True, False, ("done", "answer", []), True),
}


def run(pieces, thinking, tools, final_eos=False):
    p = ChatStreamParser(thinking, tools, id_factory=ids)
    deltas = [p.feed(x) for x in pieces] + [p.finish(eos=final_eos)]
    return p, deltas


def summary(p):
    return p.reasoning, p.content, [(c.id, c.name, c.arguments) for c in p.tool_calls]


def check_deltas(p, deltas, well_formed):
    assert "".join(d.reasoning for d in deltas) == p.reasoning
    assert "".join(d.content for d in deltas) == p.content
    calls: dict[int, list] = {}
    for d in deltas:
        for t in d.tool_calls:
            if t.index not in calls:
                assert t.index == len(calls) and t.id is not None and t.name is not None
                calls[t.index] = [t.id, t.name, ""]
            else:
                assert t.id is None and t.name is None
            calls[t.index][2] += t.arguments
    assert [tuple(calls[i]) for i in range(len(calls))] == [(c.id, c.name, c.arguments) for c in p.tool_calls]
    for c in p.tool_calls:  # a finished response never carries arguments that are not a JSON object
        assert isinstance(json.loads(c.arguments), dict), c.arguments
    if well_formed:
        for d in deltas:
            assert "DSML" not in d.reasoning + d.content and "｜" not in d.reasoning + d.content
            assert "<｜end" not in d.reasoning + d.content


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(None)


@pytest.mark.parametrize("name", list(CASES))
def test_one_shot(name):
    text, thinking, tools, want, _ = CASES[name]
    reasoning, content, calls = parse_completion(text, thinking, tools)
    r, c, tc = want
    assert (reasoning, content) == (r, c)
    if tc is not None:
        assert [(x.name, x.arguments) for x in calls] == tc
    for x in calls:
        assert isinstance(json.loads(x.arguments), dict)


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_invariance(tok, name):
    text, thinking, tools, _, well_formed = CASES[name]
    p, deltas = run([text], thinking, tools)
    ref = summary(p)
    check_deltas(p, deltas, well_formed)
    for k in range(len(text) + 1):
        p, deltas = run([text[:k], text[k:]], thinking, tools)
        assert summary(p) == ref, k
        check_deltas(p, deltas, well_formed)
    rng = random.Random(name)
    for _ in range(30):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 5)
            pieces.append(text[i:i + n])
            i += n
        p, deltas = run(pieces, thinking, tools)
        assert summary(p) == ref, pieces
        check_deltas(p, deltas, well_formed)
    # token by token, decoded by the engine's detokenizer with special tokens kept
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    pieces = [det.add(t) for t in tok.encode(text, add_bos=False)] + [det.flush()]
    assert "".join(pieces) == text
    p, deltas = run(pieces, thinking, tools)
    assert summary(p) == ref
    check_deltas(p, deltas, well_formed)


def test_tool_call_deltas_stream_arguments_incrementally():
    text = CASES["reasoning_tool_calls"][0]
    p = ChatStreamParser(True, True, id_factory=ids)
    updates = []
    for ch in text:
        d = p.feed(ch)
        updates += d.tool_calls
    p.finish()
    heads = [u for u in updates if u.id is not None]
    assert [(u.index, u.id, u.name, u.arguments) for u in heads] == [(0, "call_0", "get_weather", ""),
                                                                     (1, "call_1", "write_file", "")]
    # the long string value arrives in many fragments, before its parameter closes
    assert sum(1 for u in updates if u.index == 1 and u.id is None) > len(CODE) // 2


def test_eos_without_text_and_skip_special_tokens():
    """A server that decodes with skip_special_tokens=True can say finish(eos=True)."""
    p, _ = run(["An answer without thinking."], True, False, final_eos=True)
    assert (p.reasoning, p.content) == ("An answer without thinking.",) * 2 and p.answered_in_reasoning
    p, _ = run(["Cut off thinking"], True, False)
    assert (p.reasoning, p.content, p.answered_in_reasoning) == ("Cut off thinking", "", False)


def test_default_ids_are_unique():
    text = block(invoke("a"), invoke("b")) + EOS
    calls = parse_completion(text, False, True)[2] + parse_completion(text, False, True)[2]
    assert len({c.id for c in calls}) == 4 and all(c.id.startswith("call_") for c in calls)


def test_feed_after_finish_raises():
    p = ChatStreamParser(False, False)
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


def test_round_trip_through_the_encoder():
    """Assistant turns rendered by encode_messages parse back to the same message."""
    rng = random.Random(0)
    values = ["plain", "", "multi\nline \"quoted\" \\ text", "中文 😀", "</b> <i>", 0, -3.5, 1e21, True, False,
              None, [1, "two", [3]], {"k": {"n": [None]}}]
    for _ in range(200):
        calls = []
        for j in range(rng.randint(1, 3)):
            args = {f"p{k}": rng.choice(values) for k in range(rng.randint(0, 4))}
            calls.append({"id": f"c{j}", "type": "function",
                          "function": {"name": rng.choice(["f", "get_x", "多"]), "arguments": json.dumps(args)}})
        thinking = rng.random() < 0.5
        msg = {"role": "assistant", "content": rng.choice(["", "Sure.", "Line\n\nbreak"]),
               "reasoning_content": "why", "tool_calls": calls}
        prompt = encode_messages([{"role": "user", "content": "q"}, msg], thinking=thinking, tools=[
            {"type": "function", "function": {"name": "f"}}])
        completion = prompt.split("<｜Assistant｜>")[-1][len("<think>") if thinking else len("</think>"):]
        reasoning, content, parsed = parse_completion(completion, thinking, True)
        assert reasoning == ("why" if thinking else "") and content == msg["content"]
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_dataclasses():
    assert ToolCall("i", "n", "{}") == ToolCall(id="i", name="n", arguments="{}")
    assert not ChatStreamParser(False, False).feed("")


_SOUP = ["a", " ", "\n", "\n\n", "<", "</", ">", '"', "</think>", EOS[:5], EOS, D, "<" + D, "</" + D,
         f"<{D}tool_calls>", f"</{D}tool_calls>", f'<{D}invoke name="f">', f"</{D}invoke>",
         f'<{D}parameter name="k" string="true">', f'<{D}parameter name="j" string="false">', f"</{D}parameter>",
         "[1, 2]", "x\\y", "中", "😀", f"<{D}param", f"\n\n<{D}tool_calls>\n", "{", "null"]


def test_random_markup_is_split_invariant():
    """Arbitrary mixes of markup pieces, well-formed or not: never an exception, and the final fields and
    the delta invariants do not depend on the split."""
    rng = random.Random(7)
    for _ in range(1500):
        text = "".join(rng.choice(_SOUP) for _ in range(rng.randint(0, 25)))
        thinking, tools = rng.random() < 0.5, rng.random() < 0.8
        p, deltas = run([text], thinking, tools)
        ref = summary(p)
        check_deltas(p, deltas, False)
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            pieces.append(text[i:i + n])
            i += n
        p, deltas = run(pieces, thinking, tools)
        assert summary(p) == ref, (text, pieces)
        check_deltas(p, deltas, False)
