"""Model output -> OpenAI chat fields (reasoning_content, content, tool_calls), streaming or not.

The output of one assistant turn (spec §5.2) is, in thinking mode (the prompt ends with `<think>`),
`reasoning </think> content`, in chat mode `content`, optionally followed by a DSML tool-call block
and then EOS:

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY2" string="false">JSON</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls><｜end▁of▁sentence｜>

`ChatStreamParser.feed(text)` takes the decoded output in pieces of any size and returns what is
decided so far; `finish()` flushes at the end of generation. Rules:

- Text that may still turn out to be `</think>`, EOS or DSML markup (a partial `<｜DSML｜` tag, and
  with tools the "\\n\\n" before it) is held back until decided, so no DSML markup, not even a prefix
  of it, reaches reasoning or content in well-formed output.
- EOS ends the turn: it is removed, and anything after it is ignored.
- Tool calls (only with `tools=True`; otherwise DSML is plain text). A block starts at a
  `<｜DSML｜tool_calls>` tag or, its opener missing, at an `<｜DSML｜invoke name="...">` tag. Only the
  "\\n\\n" right before that tag is the separator the encoder writes (as in DeepSeek's reference
  parser); any other whitespace before it stays in the content or reasoning, so a generated turn
  re-encodes to the same text. A block inside reasoning (a call made without closing the thinking)
  ends the reasoning. Text after a block is content again (whitespace right after a block is dropped
  when no text follows it).
- The first delta of a call has its id and name (as soon as the invoke tag is complete) and empty
  arguments; argument text then streams as parameters arrive: `{"KEY": ` when a parameter opens, a
  string value's JSON-escaped text as it comes, a JSON value when its parameter closes, `}` when the
  invoke closes. The final arguments are the concatenation: `{"k": "v", "n": 5}` (string="true"
  values JSON-encoded as strings, the others kept as the model wrote them when they are valid JSON,
  else JSON-encoded as a string). They are always a JSON object once the output is finished.
- Malformed DSML. Recovered where the intent is clear:
  - closers missing at the end of the output (`</parameter>`, `</invoke>`, `</tool_calls>`, or a
    closing tag cut off part-way): the value, call and block are closed there;
  - a value is closed implicitly by the next parameter or invoke tag, `</invoke>` or `</tool_calls>`
    (the "\\n" the encoder puts before that tag is not part of the value); a call by the next invoke
    tag or `</tool_calls>`;
  - `</｜DSML｜parameter>` inside a value that is not followed by DSML markup (or the end) is text of
    the value (a closing marker quoted in a string);
  - an invoke holding a JSON object instead of parameters: that object is the arguments.
  Anything else that does not fit where it stands (text between calls, an unknown or damaged tag, a
  non-object body) becomes content in place, with the whitespace before it, and parsing goes on, so
  the calls after it are still calls. A `<｜DSML｜tool_calls>` tag followed by anything but a call is
  not a block: it stays text of the reasoning or content it was in.
- Thinking mode and no `</think>`: if generation ended with EOS (the model answered without closing
  its thinking, vLLM #48645), the text is the answer: it is also emitted as content (it was already
  streamed as reasoning and stays there, so streamed deltas and final fields agree;
  `answered_in_reasoning` is set so a non-streaming response may drop the duplicate reasoning). If it
  ended otherwise (token limit, stop string) it stays reasoning only: it was cut-off thinking.

Invariants (tested): the final fields do not depend on how the text is split into pieces (every
decision waits for the text that settles it), and the concatenated deltas equal the final fields.
Decode the generated tokens with skip_special_tokens=False so that `</think>`, `｜DSML｜` and EOS reach
the parser.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

from dsv4.serve.encoding import DSML, EOS, THINK_END, to_json

_OPEN_MARK, _CLOSE_MARK = "<" + DSML, "</" + DSML
_MARKS = (_OPEN_MARK, _CLOSE_MARK)  # what starts DSML markup
_SEP = "\n\n"  # the separator the encoder writes before a block
_MAX_TAG = 1024  # a "<｜DSML｜..." without ">" within this many characters is not a tag
_TAG_SPACE = " \t\r\n"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object string


@dataclass
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ParseDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class _Tag:
    closing: bool
    name: str
    attrs: dict
    end: int  # index just after its ">"

    def opens(self, name: str) -> bool:
        return not self.closing and self.name == name

    def closes(self, name: str) -> bool:
        return self.closing and self.name == name

    def opens_call(self) -> bool:
        return self.opens("invoke") and bool(self.attrs.get("name"))

    def opens_param(self) -> bool:
        return self.opens("parameter") and "name" in self.attrs


def _partial_suffix(buf: str, marks) -> int:
    """Length of the longest end of `buf` that is a proper prefix of one of `marks`."""
    best, n = 0, len(buf)
    for m in marks:
        i = buf.find(m[0], max(0, n - len(m) + 1))
        while 0 <= i and n - i > best:
            if m.startswith(buf[i:]):
                best = n - i
                break
            i = buf.find(m[0], i + 1)
    return best


def _next_mark(buf: str, pos: int) -> tuple[int, bool]:
    """(i, complete): the first i >= pos where `<｜DSML｜` or `</｜DSML｜` starts; complete is False when
    `buf` ends at i with a proper prefix of one of them. (-1, False) when there is none."""
    i = buf.find("<", pos)
    while i >= 0:
        if buf.startswith(_MARKS, i):
            return i, True
        rest = buf[i:]
        if len(rest) < len(_CLOSE_MARK) and (_OPEN_MARK.startswith(rest) or _CLOSE_MARK.startswith(rest)):
            return i, False
        i = buf.find("<", i + 1)
    return -1, False


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalpha() or c == "_")


def _is_attr_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "_-")


def _scan_tag(buf: str, i: int):
    """The DSML tag at `buf[i]` (where a complete mark starts):

        <｜DSML｜NAME ATTR="VALUE" ...>   or   </｜DSML｜NAME>

    Returns ("ok", _Tag); ("partial", None) when the text up to the end of `buf` may still become a
    tag; or ("bad", j): not a tag, and the text stops being one at j > i (the caller goes on from j).
    The answer depends only on `buf[i:j]`, never on where `buf` happens to end. An attribute value
    holds no `"`, `<` or newline; a tag is at most _MAX_TAG characters."""
    n, stop = len(buf), i + _MAX_TAG
    lim = min(n, stop)
    closing = buf.startswith(_CLOSE_MARK, i)
    k = i + len(_CLOSE_MARK if closing else _OPEN_MARK)

    def run_out():
        return ("bad", stop) if lim == stop else ("partial", None)

    def skip(k, keep):  # past the characters `keep` accepts, up to the limit
        while k < lim and keep(buf[k]):
            k += 1
        return k

    def space(c):
        return c in _TAG_SPACE

    start = k
    k = skip(k, _is_name_char)
    if k == lim:
        return run_out()
    name = buf[start:k]
    if not name:
        return "bad", k
    attrs = {}
    while True:
        ws = k
        k = skip(k, space)
        if k == lim:
            return run_out()
        if buf[k] == ">":
            return "ok", _Tag(closing, name, attrs, k + 1)
        if k == ws or not _is_attr_char(buf[k]):
            return "bad", k
        a = k
        k = skip(k, _is_attr_char)
        key = buf[a:k]
        for want in "=\"":  # KEY = "VALUE": spaces allowed around the =
            k = skip(k, space)
            if k == lim:
                return run_out()
            if buf[k] != want:
                return "bad", k
            k += 1
        v = k
        k = skip(k, lambda c: c not in '"<\n')
        if k == lim:
            return run_out()
        if buf[k] != '"':
            return "bad", k
        attrs[key] = buf[v:k]
        k += 1


def _reject_constant(name):
    raise ValueError(name)


def _json_value(raw: str) -> str:
    """A string="false" value: kept as written when it is valid JSON, else JSON-encoded as a string."""
    try:
        json.loads(raw, parse_constant=_reject_constant)
        return raw
    except ValueError:
        return to_json(raw)


def _is_json_object(raw: str) -> bool:
    try:
        return isinstance(json.loads(raw, parse_constant=_reject_constant), dict)
    except ValueError:
        return False


def _json_text(s: str) -> str:
    """`s` JSON-escaped, without the quotes (so pieces escape to the escape of their concatenation)."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _new_call_id(index: int) -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatStreamParser:
    def __init__(self, thinking: bool, tools: bool, *, id_factory: Callable[[int], str] | None = None):
        self.thinking = thinking
        self.tools = tools
        self._id_factory = id_factory or _new_call_id
        self._state = "reasoning" if thinking else "content"  # reasoning | content | block | done
        self._buf = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict] = []  # {"id", "name", "args": [str], "closed": bool}
        self._out = ParseDelta()
        self._eos = False
        self._finished = False
        self._after_block = False
        self.answered_in_reasoning = False
        # inside a DSML block
        self._bstate = "open"  # open (no call yet) | calls | invoke | value
        self._outer = "content"  # the state the block started in
        self._raw = ""  # open: the separator and opener, given back if this is not a block after all
        self._nparams = 0
        self._body: str | None = None  # invoke without parameters: text that may be a JSON-object body
        self._pstring = False
        self._vscan = 0  # where to resume looking for markup in a JSON value

    # ---- results ---------------------------------------------------------------------------------
    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c["id"], c["name"], "".join(c["args"])) for c in self._calls]

    # ---- input -----------------------------------------------------------------------------------
    def feed(self, text: str) -> ParseDelta:
        if self._finished:
            raise RuntimeError("ChatStreamParser.feed after finish()")
        if self._state == "done" or not text:
            return ParseDelta()
        buf = self._buf + text
        i = buf.find(EOS)
        if i >= 0:
            self._buf, self._eos = buf[:i], True
            self._run(final=True)
            self._close()
        else:
            held = _partial_suffix(buf, (EOS,))
            self._buf = buf[:len(buf) - held]
            self._run(final=False)
            self._buf += buf[len(buf) - held:]
        return self._take()

    def finish(self, eos: bool = False) -> ParseDelta:
        """Flush at the end of generation. `eos=True` says it ended with EOS even when the EOS text
        was not in the fed text (decoded with skip_special_tokens=True)."""
        if self._finished:
            return ParseDelta()
        self._finished = True
        if self._state != "done":
            self._eos = self._eos or eos
            self._run(final=True)
            self._close()
        return self._take()

    # ---- output helpers --------------------------------------------------------------------------
    def _take(self) -> ParseDelta:
        out, self._out = self._out, ParseDelta()
        return out

    def _say_reasoning(self, s: str) -> None:
        if s:
            self._reasoning.append(s)
            self._out.reasoning += s

    def _say_content(self, s: str) -> None:
        if s:
            self._content.append(s)
            self._out.content += s

    def _say_args(self, s: str) -> None:
        idx = len(self._calls) - 1
        self._calls[idx]["args"].append(s)
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == idx:
            last.arguments += s
        else:
            self._out.tool_calls.append(ToolCallDelta(idx, None, None, s))

    # ---- the state machine -----------------------------------------------------------------------
    # Each step consumes a decided prefix of self._buf and returns True to go on, or returns False to
    # wait for more text. With final=True (end of output) nothing waits: the step decides.
    def _run(self, final: bool) -> None:
        while self._state != "done":
            step = self._step_block if self._state == "block" else self._step_text
            if not step(final):
                break

    def _close(self) -> None:
        """End of the turn (EOS or finish); `_run(final=True)` has consumed everything."""
        if self._state == "reasoning" and self._eos:
            self.answered_in_reasoning = True
            self._say_content(self.reasoning)
        self._state = "done"
        self._buf = ""

    def _step_text(self, final: bool) -> bool:
        """Reasoning or content, up to `</think>` (reasoning) or a block opener (with tools)."""
        buf = self._buf
        reasoning = self._state == "reasoning"
        say = self._say_reasoning if reasoning else self._say_content
        if self._after_block:  # whitespace right after a block: dropped unless text follows
            if not buf.strip():
                if final:
                    self._buf = ""
                return False
            self._after_block = False
        pos = 0
        t = buf.find(THINK_END) if reasoning else -1  # (no skipped tag text can hold it: no "<" inside)
        while True:
            m, complete = _next_mark(buf, pos) if self.tools else (-1, False)
            if t >= 0 and (m < 0 or t < m):
                say(buf[:t])
                self._buf = buf[t + len(THINK_END):]
                self._state = "content"
                return True
            if m < 0:
                break
            status, tag = _scan_tag(buf, m) if complete else ("partial", None)
            if status == "bad":
                pos = tag
                continue
            if status == "ok":
                if tag.opens("tool_calls") or tag.opens_call():
                    sep = m - len(_SEP) if m >= len(_SEP) and buf.startswith(_SEP, m - len(_SEP)) else m
                    say(buf[:sep])
                    self._outer, self._state = self._state, "block"
                    self._raw, self._buf = buf[sep:tag.end], buf[tag.end:]
                    if tag.opens("tool_calls"):
                        self._bstate = "open"
                    else:
                        self._new_call(tag.attrs["name"])
                    return True
                pos = tag.end  # any other tag is text here
                continue
            if final:  # unfinished markup at the end: text
                break
            h = m - len(_SEP) if m >= len(_SEP) and buf.startswith(_SEP, m - len(_SEP)) else m
            say(buf[:h])
            self._buf = buf[h:]
            return False
        held = 0
        if not final:
            if reasoning:
                held = _partial_suffix(buf, (THINK_END,))
            if self.tools:  # a "\n\n" that may be the separator before a block
                nl = len(buf) - len(buf.rstrip("\n"))
                held = max(held, min(nl, len(_SEP)))
        say(buf[:len(buf) - held])
        self._buf = buf[len(buf) - held:]
        return False

    # ---- inside a block --------------------------------------------------------------------------
    def _new_call(self, name: str) -> None:
        idx = len(self._calls)
        cid = self._id_factory(idx)
        self._calls.append({"id": cid, "name": name, "args": [], "closed": False})
        self._out.tool_calls.append(ToolCallDelta(idx, cid, name, ""))
        self._bstate, self._raw = "invoke", ""
        self._nparams, self._body = 0, ""

    def _flush_body(self) -> None:
        """The text collected as a possible JSON body is not one: it is content."""
        if self._body:
            self._say_content(self._body)
        self._body = None

    def _end_call(self) -> None:
        body, self._body = self._body, None
        if body and _is_json_object(body.strip()):  # a JSON object instead of parameters
            self._say_args(body.strip())
        else:
            if body:
                self._say_content(body)
            self._say_args("{}" if self._nparams == 0 else "}")
        self._calls[-1]["closed"] = True
        self._bstate = "calls"

    def _end_block(self) -> None:
        self._state, self._after_block = "content", True

    def _not_a_block(self) -> bool:
        """An opener followed by no call: its text goes back to where it stood; the rest is read again there."""
        (self._say_reasoning if self._outer == "reasoning" else self._say_content)(self._raw)
        self._raw, self._state = "", self._outer
        return True

    def _stray(self, text: str, n: int) -> bool:
        """Text (or markup) that does not fit in the block: content, in place; `n` characters consumed."""
        if self._bstate == "open":
            return self._not_a_block()
        self._flush_body()
        self._say_content(text)
        self._buf = self._buf[n:]
        return True

    def _step_block(self, final: bool) -> bool:
        if self._bstate == "value":
            return self._step_value(final)
        buf = self._buf
        rest = buf.lstrip()
        lead = buf[:len(buf) - len(rest)]
        if not rest:
            if not final:
                return False
            if self._bstate == "open":
                return self._not_a_block()
            if self._bstate == "invoke":  # closers missing at the end
                self._end_call()
            self._buf = ""
            self._end_block()
            return True
        m, complete = _next_mark(rest, 0)
        if m != 0:  # text up to the next markup (or the end), without the whitespace before that
            text = (rest if m < 0 else rest[:m]).rstrip()
            n = len(lead) + len(text)
            if self._bstate == "invoke" and self._body is not None:
                self._body += lead + text
                self._buf = buf[n:]
                return True
            return self._stray(lead + text, n)
        status, tag = _scan_tag(rest, 0) if complete else ("partial", None)
        if status == "partial":
            if not final:
                return False
            if self._bstate == "open":
                return self._not_a_block()
            self._buf = ""  # a tag cut off at the end of the output: dropped
            return True
        if status == "bad":
            return self._stray(lead + rest[:tag], len(lead) + tag)
        n = len(lead) + tag.end
        st = self._bstate
        if st in ("open", "calls"):
            if tag.opens_call():
                self._buf = buf[n:]
                self._new_call(tag.attrs["name"])
                return True
            if tag.closes("tool_calls"):
                self._buf, self._raw = buf[n:], ""
                self._end_block()
                return True
            return self._stray(lead + rest[:tag.end], n)
        # invoke
        if tag.opens_param():
            self._flush_body()
            self._buf = buf[n:]
            self._pstring = tag.attrs.get("string") == "true"
            self._say_args(("{" if self._nparams == 0 else ", ") + to_json(tag.attrs["name"]) + ": "
                           + ('"' if self._pstring else ""))
            self._bstate, self._vscan = "value", 0
            return True
        if tag.closes("invoke") or tag.opens_call() or tag.closes("tool_calls"):
            self._end_call()
            if tag.closes("invoke"):
                self._buf = buf[n:]
            else:  # the next call or the block's end closes this call: read that tag again
                self._buf = rest
            return True
        return self._stray(lead + rest[:tag.end], n)

    def _value_ends(self, tag: _Tag) -> str | None:
        """What a tag inside a value means: "close", "implicit" (it closes the value and is read
        again in the invoke) or None (text of the value)."""
        if tag.closes("parameter"):
            return "close"
        if tag.opens_param() or tag.opens_call() or tag.closes("invoke") or tag.closes("tool_calls"):
            return "implicit"
        return None

    def _end_value(self, value: str) -> None:
        if self._pstring:
            self._say_args(_json_text(value) + '"')
        else:
            self._say_args(_json_value(value))
        self._nparams += 1
        self._bstate = "invoke"

    def _step_value(self, final: bool) -> bool:
        """A parameter's value: string values stream (all but text that may still be markup, and the
        "\\n" before it); JSON values are kept until they end."""
        buf = self._buf
        pos, undecided = self._vscan, -1
        while True:
            m, complete = _next_mark(buf, pos)
            if m < 0:
                break
            status, tag = _scan_tag(buf, m) if complete else ("partial", None)
            if status == "bad":
                pos = tag
                continue
            if status == "partial":
                if final:  # cut off at the end inside a tag: the value ends before it
                    self._end_value(buf[:m][:-1] if buf[:m].endswith("\n") else buf[:m])
                    self._buf = buf[m:]
                    return True
                undecided = m
                break
            kind = self._value_ends(tag)
            if kind == "implicit":
                value = buf[:m]
                self._end_value(value[:-1] if value.endswith("\n") else value)
                self._buf = buf[m:]
                return True
            if kind == "close":
                after = buf[tag.end:].lstrip()
                if after.startswith(_MARKS) or (final and any(mk.startswith(after) for mk in _MARKS)):
                    self._end_value(buf[:m])
                    self._buf = buf[tag.end:]
                    return True
                if not final and any(mk.startswith(after) for mk in _MARKS):
                    undecided = m  # wait for what follows
                    break
            pos = tag.end  # text of the value (a quoted closing marker, another tag)
        if final:  # closers missing at the end of the output
            self._end_value(buf[:-1] if buf.endswith("\n") else buf)
            self._buf = ""
            return True
        h = len(buf) if undecided < 0 else undecided
        if h and buf[h - 1] == "\n":
            h -= 1
        if self._pstring:
            if h:
                self._say_args(_json_text(buf[:h]))
                self._buf = buf[h:]
            self._vscan = 0
        else:
            self._vscan = h
        return False


def parse_completion(text: str, thinking: bool, tools: bool) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, tool_calls) of a whole completion text."""
    p = ChatStreamParser(thinking, tools)
    p.feed(text)
    p.finish()
    return p.reasoning, p.content, p.tool_calls
