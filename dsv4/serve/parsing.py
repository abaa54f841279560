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

- Text that may still turn out to be `</think>`, EOS or the start of a DSML block (a partial
  `<｜DSML｜`, and with tools the whitespace before it) is held back until decided, so no DSML markup,
  not even a prefix of it, reaches reasoning or content in well-formed output.
- EOS ends the turn: it is removed, and anything after it is ignored.
- Tool calls (only with `tools=True`; otherwise DSML is plain text): the first delta of a call has
  its id and name (as soon as the invoke tag is complete) and empty arguments; argument text then
  streams as parameters arrive: `{"KEY": ` when a parameter opens, a string value's JSON-escaped
  text as it comes, a JSON value when its parameter closes, `}` when the invoke closes. The final
  arguments are the concatenation: `{"k": "v", "n": 5}` (string="true" values JSON-encoded as
  strings, the others kept as the model wrote them when they are valid JSON, else JSON-encoded as a
  string). A DSML block inside reasoning (a call made without closing the thinking) ends the
  reasoning. Text after a block is content again (whitespace right after a block is dropped when no
  text follows it).
- Malformed DSML (text that is not the expected markup, a tag left open at the end) is not lost:
  from the failure on, the raw text, including the markup not yet turned into tool-call deltas,
  becomes content. Calls already announced stay as they are (a call cut off by the token limit keeps
  its partial arguments, as OpenAI's API does).
- Thinking mode and no `</think>`: if generation ended with EOS (the model answered without closing
  its thinking, vLLM #48645), the text is the answer: it is also emitted as content (it was already
  streamed as reasoning and stays there, so streamed deltas and final fields agree;
  `answered_in_reasoning` is set so a non-streaming response may drop the duplicate reasoning). If it
  ended otherwise (token limit, stop string) it stays reasoning only: it was cut-off thinking.

Invariants (tested): the final fields do not depend on how the text is split into pieces, and the
concatenated deltas equal the final fields. Decode the generated tokens with
skip_special_tokens=False so that `</think>`, `｜DSML｜` and EOS reach the parser.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from dsv4.serve.encoding import DSML, EOS, THINK_END, to_json

_DSML_MARKS = ("<" + DSML, "</" + DSML, DSML)  # what may start DSML markup
_PARAM_CLOSE = "</" + DSML + "parameter"
_TAG = re.compile(r"<(/?)" + re.escape(DSML) + r"([A-Za-z_]+)((?:\s+[\w\-]+\s*=\s*\"[^\"]*\")*)\s*>")
_ATTR = re.compile(r"([\w\-]+)\s*=\s*\"([^\"]*)\"")
_MAX_TAG = 1024  # an unclosed "<｜DSML｜..." longer than this is not a tag
_MAX_WS = 64  # at most this much whitespace before a DSML block is taken as its separator


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


def _dsml_start(buf: str) -> int:
    """Where DSML markup starts in `buf` (with the whitespace before it), or -1."""
    j = buf.find(DSML)
    if j < 0:
        return -1
    if buf[max(0, j - 2):j] == "</":
        j -= 2
    elif buf[j - 1:j] == "<":
        j -= 1
    stop = max(0, j - _MAX_WS)
    while j > stop and buf[j - 1].isspace():
        j -= 1
    return j


def _reject_constant(name):
    raise ValueError(name)


def _json_value(raw: str) -> str:
    """A string="false" value: kept as written when it is valid JSON, else JSON-encoded as a string."""
    try:
        json.loads(raw, parse_constant=_reject_constant)
        return raw
    except ValueError:
        return to_json(raw)


def _new_call_id(index: int) -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatStreamParser:
    def __init__(self, thinking: bool, tools: bool, *, id_factory: Callable[[int], str] | None = None):
        self.thinking = thinking
        self.tools = tools
        self._id_factory = id_factory or _new_call_id
        self._state = "reasoning" if thinking else "content"
        self._buf = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict] = []  # {"id", "name", "args": [str], "closed": bool}
        self._out = ParseDelta()
        self._eos = False
        self._finished = False
        self._after_block = False
        self._post_ws: list[str] = []
        self.answered_in_reasoning = False
        # inside a DSML block
        self._bstate = "open"  # open | calls | invoke | value
        self._raw = ""  # consumed block text not yet turned into tool-call deltas
        self._nparams = 0
        self._pstring = False
        self._vscan = 0  # where to resume looking for the parameter close in a JSON value

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
        self._raw = ""

    def _new_call(self, name: str) -> None:
        idx = len(self._calls)
        cid = self._id_factory(idx)
        self._calls.append({"id": cid, "name": name, "args": [], "closed": False})
        self._out.tool_calls.append(ToolCallDelta(idx, cid, name, ""))
        self._nparams = 0
        self._raw = ""

    # ---- the state machine -----------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while self._state != "done":
            step = getattr(self, "_step_" + self._state)
            if not step(final):
                break

    def _close(self) -> None:
        """End of the turn (EOS or finish); `_run(final=True)` has consumed everything."""
        if self._state == "reasoning" and self._eos:
            self.answered_in_reasoning = True
            self._say_content(self.reasoning)
        self._state = "done"
        self._buf = ""

    def _hold(self, buf: str, marks) -> int:
        held = _partial_suffix(buf, marks)
        if self.tools:  # whitespace before a DSML block belongs to the block
            s = len(buf) - held
            stop = max(0, s - _MAX_WS)
            while s > stop and buf[s - 1].isspace():
                s -= 1
            held = len(buf) - s
        return held

    def _step_reasoning(self, final: bool) -> bool:
        buf = self._buf
        i = buf.find(THINK_END)
        j = _dsml_start(buf) if self.tools else -1
        if i >= 0 and (j < 0 or i < j):
            self._say_reasoning(buf[:i])
            self._buf = buf[i + len(THINK_END):]
            self._state = "content"
            return True
        if j >= 0:
            self._say_reasoning(buf[:j])
            self._start_block(buf[j:])
            return True
        held = 0 if final else self._hold(buf, (THINK_END,) + (_DSML_MARKS if self.tools else ()))
        self._say_reasoning(buf[:len(buf) - held])
        self._buf = buf[len(buf) - held:]
        return False

    def _step_content(self, final: bool) -> bool:
        buf = self._buf
        if self._after_block:  # whitespace right after a block: dropped unless text follows
            lead = len(buf) - len(buf.lstrip())
            self._post_ws.append(buf[:lead])
            buf = self._buf = buf[lead:]
            if not buf:
                if final:
                    self._post_ws = []
                return False
            self._after_block = False
            buf = self._buf = "".join(self._post_ws) + buf
            self._post_ws = []
        if not self.tools:
            self._say_content(buf)
            self._buf = ""
            return False
        j = _dsml_start(buf)
        if j >= 0:
            self._say_content(buf[:j])
            self._start_block(buf[j:])
            return True
        held = 0 if final else self._hold(buf, _DSML_MARKS)
        self._say_content(buf[:len(buf) - held])
        self._buf = buf[len(buf) - held:]
        return False

    def _step_raw(self, final: bool) -> bool:
        self._say_content(self._buf)
        self._buf = ""
        return False

    def _start_block(self, buf: str) -> None:
        self._state, self._bstate, self._raw, self._buf = "block", "open", "", buf

    def _abort_block(self) -> None:
        """Malformed or unfinished DSML: the text not turned into tool-call deltas becomes content."""
        self._say_content(self._raw + self._buf)
        self._raw, self._buf = "", ""
        self._state = "raw"

    def _step_block(self, final: bool) -> bool:
        if self._bstate == "value":
            return self._step_value(final)
        buf = self._buf
        lead = len(buf) - len(buf.lstrip())
        if lead:
            self._raw += buf[:lead]
            buf = self._buf = buf[lead:]
        if not buf:
            if final:
                if self._bstate == "calls" and not self._raw.strip():  # only the block's closing tag is missing
                    self._raw, self._state = "", "content"
                else:
                    self._abort_block()
            return False
        m = _TAG.match(buf)
        if m is None:
            viable = (any(mark.startswith(buf) for mark in _DSML_MARKS[:2])
                      or (buf.startswith(_DSML_MARKS[:2]) and ">" not in buf and len(buf) <= _MAX_TAG))
            if final or not viable:
                self._abort_block()
                return not final
            return False
        closing, name, attrs = m.group(1) == "/", m.group(2), dict(_ATTR.findall(m.group(3)))
        tag = buf[:m.end()]
        if not self._on_tag(closing, name, attrs, tag):
            self._abort_block()
            return not final
        self._buf = buf[m.end():]
        return True

    def _on_tag(self, closing: bool, name: str, attrs: dict, tag: str) -> bool:
        st = self._bstate
        if st == "open":
            if not closing and name == "tool_calls":
                self._raw += tag
                self._bstate = "calls"
                return True
            if not closing and name == "invoke":  # the block opener is missing: accept the call
                self._bstate = "calls"
                return self._on_tag(closing, name, attrs, tag)
            return False
        if st == "calls":
            if not closing and name == "invoke" and attrs.get("name"):
                self._new_call(attrs["name"])
                self._bstate = "invoke"
                return True
            if closing and name == "tool_calls":
                self._raw = ""
                self._state, self._after_block = "content", True
                return True
            return False
        if st == "invoke":
            if not closing and name == "parameter" and attrs.get("name") is not None:
                self._pstring = attrs.get("string") == "true"
                self._say_args(("{" if self._nparams == 0 else ", ") + to_json(attrs["name"]) + ": "
                               + ('"' if self._pstring else ""))
                self._bstate, self._vscan = "value", 0
                return True
            if closing and name == "invoke":
                self._say_args("{}" if self._nparams == 0 else "}")
                self._calls[-1]["closed"] = True
                self._bstate = "calls"
                return True
            return False
        return False

    def _step_value(self, final: bool) -> bool:
        buf = self._buf
        k = buf.find(_PARAM_CLOSE, self._vscan)
        if k < 0:
            if self._pstring:  # stream the part that cannot be the start of the closing tag
                held = _partial_suffix(buf, (_PARAM_CLOSE,))
                if len(buf) > held:
                    self._say_args(json.dumps(buf[:len(buf) - held], ensure_ascii=False)[1:-1])
                    self._buf = buf[len(buf) - held:]
            else:
                self._vscan = max(0, len(buf) - len(_PARAM_CLOSE) + 1)
            if final:  # cut off inside the value: the call keeps what it has
                self._abort_block()
            return False
        rest = buf[k + len(_PARAM_CLOSE):]
        gt = len(rest) - len(rest.lstrip())
        if gt == len(rest) or rest[gt] != ">":  # ">" not there (yet)
            if self._pstring and k:  # the value itself is complete: it belongs to the call
                self._say_args(json.dumps(buf[:k], ensure_ascii=False)[1:-1])
                self._buf = buf = buf[k:]
                k = 0
            if gt == len(rest) and not final:
                self._vscan = k
                return False
            self._abort_block()
            return not final
        value, self._buf = buf[:k], rest[gt + 1:]
        if self._pstring:
            self._say_args((json.dumps(value, ensure_ascii=False)[1:-1] if value else "") + '"')
        else:
            self._say_args(_json_value(value))
        self._nparams += 1
        self._bstate = "invoke"
        return True


def parse_completion(text: str, thinking: bool, tools: bool) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, tool_calls) of a whole completion text."""
    p = ChatStreamParser(thinking, tools)
    p.feed(text)
    p.finish()
    return p.reasoning, p.content, p.tool_calls
