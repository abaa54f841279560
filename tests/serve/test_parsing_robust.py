"""Output parsing, issue 20 items 11 and 12: the whitespace around a DSML block, and malformed tool-call
output.

Item 11: only the "\\n\\n" right before the block is its separator (as in DeepSeek's reference parser and
what the encoder writes), so other whitespace stays in the content or reasoning, and a completion the
model generated re-encodes to the same text.

Item 12: a finished response never carries tool-call arguments that are not a JSON object; closers
missing at the very end of the output, a parameter closed implicitly by the next tag, a closing marker
quoted inside a value and a JSON body inside an invoke are recovered; other damaged markup becomes
content in place without swallowing the calls after it. Every case gives the same result for every split
of the text into two pieces and for char-by-char feeding."""

import json
import random
import re
import sys
from pathlib import Path

import pytest

from dsv4.serve.encoding import ASSISTANT, EOS, THINK_END, encode_messages, render_tool_calls
from dsv4.serve.parsing import parse_completion

sys.path.insert(0, str(Path(__file__).parent))
from test_parsing import CASES, check_deltas, run, summary  # noqa: E402  (the same drivers and checks)

D = "｜DSML｜"
OPEN, CLOSE = f"<{D}tool_calls>", f"</{D}tool_calls>"
PCLOSE, ICLOSE = f"</{D}parameter>", f"</{D}invoke>"


def inv(name):
    return f'<{D}invoke name="{name}">'


def par(name, string=True):
    return f'<{D}parameter name="{name}" string="{"true" if string else "false"}">'


def param(name, value, string=True):
    return par(name, string) + value + PCLOSE


def invoke(name, *params):
    return inv(name) + "\n" + "".join(p + "\n" for p in params) + ICLOSE


def block(*invokes):
    return "\n\n" + OPEN + "\n" + "\n".join(invokes) + "\n" + CLOSE


def all_splits(text, thinking, tools, well_formed):
    """One piece, every split into two pieces, and char by char: the same final fields."""
    p, deltas = run([text], thinking, tools)
    check_deltas(p, deltas, well_formed)
    ref = summary(p)
    for k in range(len(text) + 1):
        p, deltas = run([text[:k], text[k:]], thinking, tools)
        assert summary(p) == ref, k
        check_deltas(p, deltas, well_formed)
    p, deltas = run(list(text), thinking, tools)
    assert summary(p) == ref, "char by char"
    check_deltas(p, deltas, well_formed)
    return ref


# name -> (text, thinking, (reasoning, content, [(name, arguments)]), well_formed)
WHITESPACE = {
    "space_before_block": (
        "Let me check. " + block(invoke("f")) + EOS, False, ("", "Let me check. ", [("f", "{}")]), True),
    "newline_before_block": (
        "Hello.\n" + block(invoke("f")) + EOS, False, ("", "Hello.\n", [("f", "{}")]), True),
    "blank_lines_before_block": (
        "a\n\n" + block(invoke("f")) + EOS, False, ("", "a\n\n", [("f", "{}")]), True),
    "tab_and_newline_before_block": (
        "a \t\n" + block(invoke("f")) + EOS, False, ("", "a \t\n", [("f", "{}")]), True),
    "single_newline_separator": (
        "a\n" + OPEN + "\n" + invoke("f") + "\n" + CLOSE + EOS, False, ("", "a\n", [("f", "{}")]), True),
    "newline_after_think_then_block": (
        "r" + THINK_END + "\n" + block(invoke("f")) + EOS, True, ("r", "\n", [("f", "{}")]), True),
    "newline_after_think_then_text": (
        "r" + THINK_END + "\nAnswer.\n" + EOS, True, ("r", "\nAnswer.\n", []), True),
    "whitespace_reasoning_then_block": (
        "I will look. \n" + block(invoke("f")) + EOS, True, ("I will look. \n", "", [("f", "{}")]), True),
    "whitespace_only_content": (
        THINK_END + "  \n" + block(invoke("f")) + EOS, True, ("", "  \n", [("f", "{}")]), True),
}

PRE = "\n\n" + OPEN + "\n"
MALFORMED = {
    "missing_param_close_at_end": (
        PRE + inv("f") + "\n" + par("a") + "x" + EOS, False, ("", "", [("f", '{"a": "x"}')]), True),
    "missing_param_close_at_end_newline": (
        PRE + inv("f") + "\n" + par("a") + "x\n" + EOS, False, ("", "", [("f", '{"a": "x"}')]), True),
    "missing_param_close_json_at_end": (
        PRE + inv("f") + "\n" + par("n", False) + "5" + EOS, False, ("", "", [("f", '{"n": 5}')]), True),
    "missing_param_close_bad_json_at_end": (
        PRE + inv("f") + "\n" + par("n", False) + "[1, 2" + EOS, False, ("", "", [("f", '{"n": "[1, 2"}')]), True),
    "missing_invoke_close_at_end": (
        PRE + inv("f") + "\n" + param("a", "x") + "\n" + EOS, False, ("", "", [("f", '{"a": "x"}')]), True),
    "missing_invoke_close_no_params": (
        PRE + inv("f") + "\n" + EOS, False, ("", "", [("f", "{}")]), True),
    "cut_in_string_value": (  # token limit: no EOS
        "r" + THINK_END + PRE + inv("f") + "\n" + param("a", "1", False) + "\n" + par("s") + "long text cut",
        True, ("r", "", [("f", '{"a": 1, "s": "long text cut"}')]), True),
    "cut_in_json_value": (
        PRE + inv("f") + "\n" + par("o", False) + '{"k": [1', False, ("", "", [("f", '{"o": "{\\"k\\": [1"}')]),
        True),
    "cut_in_close_tag": (
        PRE + inv("f") + "\n" + par("a") + "x" + PCLOSE[:5], False, ("", "", [("f", '{"a": "x"}')]), True),
    "cut_after_param_close": (
        PRE + inv("f") + "\n" + param("a", "x") + "\n<" + D[:2], False, ("", "", [("f", '{"a": "x"}')]), True),
    "param_implicitly_closes_previous": (
        block(inv("f") + "\n" + par("a") + "x\n" + param("b", "y") + "\n" + ICLOSE) + EOS, False,
        ("", "", [("f", '{"a": "x", "b": "y"}')]), True),
    "param_implicitly_closes_previous_json": (
        block(inv("f") + "\n" + par("n", False) + "5\n" + param("b", "y") + "\n" + ICLOSE) + EOS, False,
        ("", "", [("f", '{"n": 5, "b": "y"}')]), True),
    "invoke_close_implicitly_closes_param": (
        block(inv("f") + "\n" + par("a") + "x\n" + ICLOSE, invoke("g")) + EOS, False,
        ("", "", [("f", '{"a": "x"}'), ("g", "{}")]), True),
    "next_invoke_implicitly_closes_call": (
        block(inv("f") + "\n" + param("a", "x") + "\n" + invoke("g", param("b", "1", False))) + EOS, False,
        ("", "", [("f", '{"a": "x"}'), ("g", '{"b": 1}')]), True),
    "block_close_implicitly_closes_call": (
        PRE + inv("f") + "\n" + par("a") + "x\n" + CLOSE + "\n\nDone." + EOS, False,
        ("", "\n\nDone.", [("f", '{"a": "x"}')]), True),
    "close_marker_quoted_in_string": (
        block(invoke("f", param("code", 's = "' + PCLOSE + '"\nprint(s)'))) + EOS, False,
        ("", "", [("f", json.dumps({"code": 's = "' + PCLOSE + '"\nprint(s)'}, ensure_ascii=False))]), True),
    "close_marker_quoted_in_json": (
        block(invoke("f", param("o", '{"t": "' + PCLOSE + '"}', False))) + EOS, False,
        ("", "", [("f", '{"o": {"t": "' + PCLOSE + '"}}')]), True),
    "close_marker_then_text_in_string": (
        block(invoke("f", param("s", "a" + PCLOSE + " b"), param("t", "c"))) + EOS, False,
        ("", "", [("f", json.dumps({"s": "a" + PCLOSE + " b", "t": "c"}, ensure_ascii=False))]), True),
    "json_body_in_invoke": (
        block(inv("f") + '\n{"a": 1, "b": [2, "x"]}\n' + ICLOSE, invoke("g")) + EOS, False,
        ("", "", [("f", '{"a": 1, "b": [2, "x"]}'), ("g", "{}")]), True),
    "json_body_at_end": (
        PRE + inv("f") + '\n{"a": "z"}' + EOS, False, ("", "", [("f", '{"a": "z"}')]), True),
    "json_body_not_an_object": (
        block(inv("f") + "\n[1, 2]\n" + ICLOSE) + EOS, False, ("", "\n[1, 2]", [("f", "{}")]), False),
    "text_body_in_invoke": (
        block(inv("f") + "\nsome words\n" + ICLOSE, invoke("g")) + EOS, False,
        ("", "\nsome words", [("f", "{}"), ("g", "{}")]), False),
    "unknown_tag_between_calls": (
        block(invoke("f", param("a", "1")), f"<{D}note>", invoke("g", param("b", "2"))) + EOS, False,
        ("", f"\n<{D}note>", [("f", '{"a": "1"}'), ("g", '{"b": "2"}')]), False),
    "unknown_tag_inside_invoke": (
        block(invoke("f", param("a", "1"), f"<{D}note>hi", param("b", "2")), invoke("g")) + EOS, False,
        ("", f"\n<{D}note>hi", [("f", '{"a": "1", "b": "2"}'), ("g", "{}")]), False),
    "damaged_invoke_tag_then_good_call": (
        block(invoke("f"), f'<{D}invoke name="g"\n' + param("a", "1") + "\n" + ICLOSE, invoke("h", param("b", "2")))
        + EOS, False,
        ("", f'\n<{D}invoke name="g"\n' + param("a", "1") + "\n" + ICLOSE, [("f", "{}"), ("h", '{"b": "2"}')]),
        False),
    "invoke_without_name_then_good_call": (
        block(invoke("f"), f'<{D}invoke nam="g">oops\n' + ICLOSE, invoke("h")) + EOS, False,
        ("", f'\n<{D}invoke nam="g">oops\n' + ICLOSE, [("f", "{}"), ("h", "{}")]), False),
    "unknown_tag_in_content_then_block": (
        f"See <{D}oops> here." + block(invoke("g", param("q", "x"))) + EOS, False,
        ("", f"See <{D}oops> here.", [("g", '{"q": "x"}')]), False),
    "stray_closer_in_content_then_block": (
        f"a {PCLOSE} b" + block(invoke("g")) + EOS, False, ("", f"a {PCLOSE} b", [("g", "{}")]), False),
    "damaged_tag_in_content_then_block": (
        f"a <{D}invoke name=" + block(invoke("g")) + EOS, False, ("", f"a <{D}invoke name=", [("g", "{}")]), False),
    "opener_then_prose_in_reasoning": (
        f"hmm {OPEN} not really{THINK_END}answer" + EOS, True, (f"hmm {OPEN} not really", "answer", []), False),
    "opener_then_prose_then_block": (
        f"x{PRE}no tools after all." + block(invoke("g")) + EOS, False,
        ("", f"x\n\n{OPEN}\nno tools after all.", [("g", "{}")]), False),
    "truncated_in_tag": (  # a tag cut off at the end inside a block is dropped
        "ok" + PRE + inv("f") + f"\n<{D}param", False, ("", "ok", [("f", "{}")]), True),
}


@pytest.mark.parametrize("name", list(WHITESPACE) + list(MALFORMED))
def test_case(name):
    text, thinking, want, well_formed = {**WHITESPACE, **MALFORMED}[name]
    reasoning, content, calls = parse_completion(text, thinking, True)
    assert (reasoning, content, [(c.name, c.arguments) for c in calls]) == want
    ref = all_splits(text, thinking, True, well_formed)
    assert (ref[0], ref[1], [(n, a) for _, n, a in ref[2]]) == want


CONTENTS = ["", "Sure.", "Let me check. ", "Hello.\n", "\n", " ", "\n\n", "a \n \n", "\tx\n\n\n", "Line\n\nbreak"]


def test_round_trip_whitespace():
    """parse(encode(message)) gives the message back, and the generated text re-encodes to itself:
    the history the client sends back renders exactly what the model generated."""
    calls = [{"name": "f", "arguments": {"a": "x", "n": 2}}, {"name": "g", "arguments": {}}]
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
    user = {"role": "user", "content": "q"}
    for thinking in (False, True):
        for reasoning in (["", "why", "why\n", " why \n\n"] if thinking else [""]):
            for content in CONTENTS:
                for with_calls in (False, True):
                    completion = (reasoning + THINK_END if thinking else "") + content
                    if with_calls:
                        completion += "\n\n" + render_tool_calls(calls)
                    completion += EOS
                    r, c, parsed = parse_completion(completion, thinking, True)
                    assert (r, c) == (reasoning, content), (thinking, reasoning, content, with_calls)
                    assert [(x.name, json.loads(x.arguments)) for x in parsed] == (
                        [(x["name"], x["arguments"]) for x in calls] if with_calls else [])
                    msg = {"role": "assistant", "content": c, "reasoning_content": r, "tool_calls": [
                        {"id": x.id, "type": "function", "function": {"name": x.name, "arguments": x.arguments}}
                        for x in parsed]}
                    prompt = encode_messages([user], thinking=thinking, tools=tools)
                    history = encode_messages([user, msg], thinking=thinking, tools=tools)
                    assert history == prompt + completion
                    assert history.split(ASSISTANT)[-1].endswith(completion)


def test_every_split_of_existing_cases():
    """The cases of test_parsing.py: every two-piece split and char-by-char feeding agree, and no
    finished call carries arguments that are not a JSON object."""
    for name, (text, thinking, tools, _, well_formed) in CASES.items():
        all_splits(text, thinking, tools, well_formed)


_PIECES = ["a", " ", "\n", "\n\n", "<", "</", ">", '"', "x\\y", "中", "{", "}", '{"k": 1}', "[1", "null",
           THINK_END, EOS, D, "<" + D, "</" + D, OPEN, CLOSE, inv("f"), inv("g"), ICLOSE, par("s"), par("j", False),
           PCLOSE, f"<{D}param", f'<{D}invoke name="h"', f"<{D}bogus>", f'<{D}invoke nam="z">', PRE]


def test_fuzz_arguments_always_json_objects_and_split_invariant():
    """Random mixes of markup: arguments are JSON objects, and every two-piece split of the text (and
    char-by-char feeding) gives the same final fields."""
    rng = random.Random(20)
    for _ in range(300):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 14)))
        thinking = rng.random() < 0.4
        all_splits(text, thinking, True, False)


def test_fuzz_damaged_well_formed_output():
    """Well-formed outputs with one piece of markup deleted, duplicated or inserted: arguments are JSON
    objects and the result does not depend on the split."""
    rng = random.Random(12)
    base = ("Let me check. " + block(invoke("f", param("a", "x\ny"), param("n", "[1, 2]", False)),
                                     invoke("g", param("s", 'say "hi" <b>'))) + EOS)
    cuts = sorted({m.start() for m in re.finditer("<|>|\n", base)} | {len(base)})
    for _ in range(150):
        i, j = sorted(rng.sample(cuts, 2))
        if j - i > 60:
            j = i + rng.randint(0, 60)
        op = rng.randrange(3)
        if op == 0:
            text = base[:i] + base[j:]
        elif op == 1:
            text = base[:j] + base[i:j] + base[j:]
        else:
            text = base[:i] + rng.choice(_PIECES) + base[i:]
        all_splits(text, rng.random() < 0.3, True, False)
