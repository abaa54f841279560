"""DeepSeek-V4 chat prompt encoding for OpenAI-style requests.

The model ships no Jinja chat template; its prompt format is defined by DeepSeek's reference script
`encoding/encoding_dsv4.py` in the DeepSeek-V4-Flash release (spec §5.2). The fixed text below (the
tools block, the reasoning-effort "max" paragraph, the response-format header, the DSML layout) is
that script's text, character for character: it is part of the model's interface. The code that
assembles it is this project's own; the rules it follows are the reference script's:

- The prompt starts with BOS (unless `context` holds an already-encoded prefix).
- Thinking mode with reasoning_effort "max": REASONING_EFFORT_MAX before the first message.
- system: its text, then "\\n\\n" + the tools block if it carries tools, then "\\n\\n" + the
  response-format section if it carries a response_format. Request-level `tools` /
  `response_format` are attached to the leading system message (one is inserted when there is none).
- user: `<｜User｜>` + text. `tool` messages are not a role of the model: a run of them (and a user
  message right after them) becomes one user turn whose parts are joined by "\\n\\n", each result as
  `<tool_result>…</tool_result>` (verbatim, no escaping), sorted into the order of the preceding
  assistant's tool_call ids. Consecutive user messages are likewise joined into one turn.
- developer (DeepSeek's internal search-agent role): `<｜User｜>` + text + its tools / response format.
- latest_reminder: `<｜latest_reminder｜>` + text.
- assistant: [reasoning + `</think>`] + content + ["\\n\\n" + DSML tool calls] + EOS. The reasoning
  part appears only in thinking mode, for turns after the last user/developer message, or for all
  turns when thinking is not dropped; and never right after a quick-instruction task.
- After a user/developer message that is the last one or is followed by an assistant /
  latest_reminder message: `<｜Assistant｜>` + `<think>` (thinking mode, at or after the last user
  turn, or every turn when thinking is kept) or `</think>` (otherwise, and always in chat mode).
- drop_thinking (thinking mode): assistant turns before the last user/developer message lose their
  reasoning and developer messages before it are dropped. Disabled when any message carries tools.
- A message with a quick-instruction `task`: `action` appends `<｜Assistant｜>` + (`<think>` or
  `</think>`) + `<｜action｜>` instead of the usual transition; the other tasks append their token.

Messages are OpenAI chat messages: `content` a string, None, or a list of {"type": "text", "text"}
parts (joined with "\\n"; a tool result's parts are joined with "\\n\\n" as in the reference);
assistant `reasoning_content` (or `reasoning`) and `tool_calls` ([{"id", "type": "function",
"function": {"name", "arguments": JSON object string}}]); tool `tool_call_id`. System and developer
messages may also carry `tools` / `response_format` themselves (DeepSeek's own message format), and
any message a `task`. Malformed input raises ValueError naming the message and field.

Stricter than the reference (which never checks): a tool message's `tool_call_id` must name a call
of the closest preceding assistant message (it may be omitted only when those calls have no ids, as
in DeepSeek's own data), and `arguments` must be a JSON object (a string, or an object as is; an
empty string means no parameters) instead of being wrapped as {"arguments": raw}.
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"

TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

REASONING_EFFORTS = ("minimal", "low", "medium", "high", "xhigh", "max")  # only "max" changes the prompt

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# The tools block, with DSML / think tokens filled in; the tool schemas (one JSON object per line) go
# between the head and the tail.
TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "<tool_result>", "</tool_result>"
TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_CLOSE = f"</{DSML}parameter>"

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")


def to_json(value: Any) -> str:
    """JSON as the reference writes it: `json.dumps` with ensure_ascii=False and default separators."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


# ------------------------------------------------------------------------------------------------
# Validation and normalisation of the OpenAI-style input into plain internal dicts
# ------------------------------------------------------------------------------------------------

def _text(content: Any, where: str, sep: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            parts.append(part["text"])
        return sep.join(parts)
    raise ValueError(f"{where}.content: expected a string, null or a list of text parts, "
                     f"got {type(content).__name__}")


def _functions(tools: Any, where: str) -> list[dict]:
    """OpenAI tools [{"type": "function", "function": {...}}] -> the function dicts."""
    if not isinstance(tools, list):
        raise ValueError(f"{where}: expected a list of tools, got {type(tools).__name__}")
    out = []
    for j, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ValueError(f"{where}[{j}]: expected an object, got {type(t).__name__}")
        if t.get("type", "function") != "function":
            raise ValueError(f"{where}[{j}].type: only 'function' tools are supported, got {t.get('type')!r}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}[{j}].function: expected an object")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{j}].function.name: expected a non-empty string")
        out.append(fn)
    return out


def _response_format(rf: Any, where: str) -> dict | None:
    """The OpenAI response_format, rendered verbatim by the reference (`to_json(response_format)`);
    type "text" (the default) adds nothing."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ValueError(f"{where}: expected an object, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return rf
    if kind == "json_schema":
        if not isinstance(rf.get("json_schema"), dict):
            raise ValueError(f"{where}.json_schema: expected an object")
        return rf
    raise ValueError(f"{where}.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}")


def _arguments(args: Any, where: str) -> dict:
    if isinstance(args, dict):
        return args
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    if not isinstance(args, str):
        raise ValueError(f"{where}: expected a JSON object string, got {type(args).__name__}")
    try:
        value = json.loads(args)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise ValueError(f"{where}: expected a list, got {type(calls).__name__}")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(c, dict):
            raise ValueError(f"{w}: expected an object, got {type(c).__name__}")
        if c.get("type", "function") != "function":
            raise ValueError(f"{w}.type: expected 'function', got {c.get('type')!r}")
        fn = c.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{w}.function: expected an object")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{w}.function.name: expected a non-empty string")
        cid = c.get("id")
        if cid is not None and not isinstance(cid, str):
            raise ValueError(f"{w}.id: expected a string")
        out.append({"id": cid or None, "name": fn["name"],
                    "arguments": _arguments(fn.get("arguments"), f"{w}.function.arguments")})
    return out


def _normalize(messages: Any, label: str, start_calls: list | None,
               developer_as_system: bool = False) -> tuple[list[dict], list | None]:
    """Validated internal messages. Tool messages are checked against the tool calls of the closest
    preceding assistant message (`start_calls` carries that state in from the context)."""
    if not isinstance(messages, list):
        raise ValueError(f"{label}: expected a list of messages, got {type(messages).__name__}")
    out: list[dict] = []
    calls = start_calls  # tool calls of the latest assistant message; None before any assistant message
    for i, m in enumerate(messages):
        w = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{w}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{w}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "developer" and developer_as_system:
            role = "system"
        msg: dict[str, Any] = {"role": role}
        task = m.get("task")
        if task is not None:
            if task not in TASK_TOKENS:
                raise ValueError(f"{w}.task: unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
            msg["task"] = task
        if role == "tool":
            msg["content"] = _text(m.get("content"), w, "\n\n")
            tcid = m.get("tool_call_id")
            if tcid is not None and not isinstance(tcid, str):
                raise ValueError(f"{w}.tool_call_id: expected a string")
            if not calls:
                raise ValueError(f"{w}: a tool message must follow an assistant message with tool_calls")
            ids = [c["id"] for c in calls]
            if tcid:
                if tcid not in ids:
                    raise ValueError(f"{w}.tool_call_id: {tcid!r} matches no tool call of the preceding "
                                     f"assistant message (ids: {', '.join(repr(x) for x in ids if x)})")
            elif any(ids):
                raise ValueError(f"{w}.tool_call_id: missing (the preceding assistant's tool calls have ids)")
            msg["tool_call_id"] = tcid or ""
        else:
            msg["content"] = _text(m.get("content"), w, "\n")
        if role in ("system", "developer"):
            if m.get("tools"):
                msg["tools"] = _functions(m["tools"], f"{w}.tools")
            rf = _response_format(m.get("response_format"), f"{w}.response_format")
            if rf is not None:
                msg["response_format"] = rf
            if role == "developer" and not msg["content"]:
                raise ValueError(f"{w}.content: a developer message needs content")
        if role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning = m.get("reasoning")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"{w}.reasoning_content: expected a string")
            msg["reasoning"] = reasoning or ""
            tc = m.get("tool_calls")
            msg["tool_calls"] = _tool_calls(tc, f"{w}.tool_calls") if tc else []
            calls = msg["tool_calls"]
        out.append(msg)
    return out, calls


def _merge_turns(msgs: list[dict]) -> list[dict]:
    """Tool results become user turns: a run of tool messages, and a user message right after a
    merged turn, join into one user message of `blocks` (as the reference's merge_tool_messages)."""
    out: list[dict] = []
    for m in msgs:
        role = m["role"]
        prev = out[-1] if out else None
        if role == "tool":
            block = ("tool", m["tool_call_id"], m["content"])
            if prev is not None and prev["role"] == "user" and "blocks" in prev:
                prev["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        elif role == "user":
            if prev is not None and prev["role"] == "user" and "blocks" in prev and prev.get("task") is None:
                prev["blocks"].append(("text", m["content"]))
            else:
                new = {"role": "user", "blocks": [("text", m["content"])]}
                if "task" in m:
                    new["task"] = m["task"]
                out.append(new)
        else:
            out.append(dict(m))
    return out


def _order_tool_results(msgs: list[dict]) -> None:
    """Sort each user turn's tool results into the order of the preceding assistant's tool_call ids
    (a stable sort; an unknown id ranks as the first call, as in the reference)."""
    order: dict[str, int] = {}
    for m in msgs:
        if m["role"] == "assistant" and m["tool_calls"]:
            order = {c["id"]: k for k, c in enumerate(m["tool_calls"]) if c["id"]}
        elif m["role"] == "user" and "blocks" in m:
            slots = [k for k, b in enumerate(m["blocks"]) if b[0] == "tool"]
            if len(slots) > 1 and order:
                ranked = sorted((m["blocks"][k] for k in slots), key=lambda b: order.get(b[1], 0))
                for k, b in zip(slots, ranked):
                    m["blocks"][k] = b


def _last_user(msgs: list[dict]) -> int:
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_old_thinking(msgs: list[dict]) -> list[dict]:
    """Before the last user/developer message: assistant reasoning removed, developer messages dropped."""
    last = _last_user(msgs)
    out = []
    for i, m in enumerate(msgs):
        if i >= last or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append(dict(m, reasoning=""))
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def render_tools(functions: list[dict]) -> str:
    return TOOLS_HEAD + "\n".join(to_json(f) for f in functions) + TOOLS_TAIL


def render_tool_calls(calls: list[dict]) -> str:
    """The DSML block of an assistant turn (without the leading "\\n\\n")."""
    invokes = []
    for c in calls:
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else to_json(v)}{PARAMETER_CLOSE}"
            for k, v in c["arguments"].items())
        invokes.append(f'<{DSML}invoke name="{c["name"]}">\n{params}\n{INVOKE_CLOSE}')
    return TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _system_extras(m: dict) -> str:
    s = ""
    if m.get("tools"):
        s += "\n\n" + render_tools(m["tools"])
    if m.get("response_format"):
        s += "\n\n" + RESPONSE_FORMAT_HEAD + to_json(m["response_format"])
    return s


def _render(i: int, msgs: list[dict], last_user: int, thinking: bool, drop: bool, effort: str | None) -> str:
    m = msgs[i]
    role = m["role"]
    s = REASONING_EFFORT_MAX if i == 0 and thinking and effort == "max" else ""
    if role == "system":
        s += m["content"] + _system_extras(m)
    elif role == "developer":
        s += USER + m["content"] + _system_extras(m)
    elif role == "user":
        s += USER + "\n\n".join(b[1] if b[0] == "text" else TOOL_RESULT_OPEN + b[2] + TOOL_RESULT_CLOSE
                                for b in m["blocks"])
    elif role == "latest_reminder":
        s += LATEST_REMINDER + m["content"]
    elif role == "assistant":
        after_task = i > 0 and msgs[i - 1].get("task") is not None
        if thinking and not after_task and (not drop or i > last_user):
            s += m["reasoning"] + THINK_END
        s += m["content"]
        if m["tool_calls"]:
            s += "\n\n" + render_tool_calls(m["tool_calls"])
        s += EOS
    else:  # unreachable: tool messages were merged, unknown roles rejected
        raise ValueError(f"cannot render role {role!r}")

    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return s
    task = m.get("task")
    if task is not None:
        if task == "action":
            s += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            s += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        open_thinking = thinking and (not drop or i >= last_user)
        s += ASSISTANT + (THINK_START if open_thinking else THINK_END)
    return s


def _attach(msgs: list[dict], functions: list[dict] | None, rf: dict | None) -> list[dict]:
    """Request-level tools / response_format go on the leading system message (replacing its own);
    without one, a system message with empty text is inserted first."""
    if not functions and rf is None:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        head, rest = dict(msgs[0]), msgs[1:]
    else:
        head, rest = {"role": "system", "content": ""}, msgs
    if functions:
        head["tools"] = functions
    if rf is not None:
        head["response_format"] = rf
    return [head] + rest


def encode_messages(messages: list[dict], *, thinking: bool = False, reasoning_effort: str | None = None,
                    tools: list[dict] | None = None, response_format: dict | None = None,
                    drop_thinking: bool = True, add_bos: bool = True, context: list[dict] | None = None,
                    developer_as_system: bool = False) -> str:
    """The prompt text for `messages` (OpenAI chat messages), ending with the assistant transition.

    thinking: thinking mode (the prompt ends with `<think>`) or chat mode (ends with `</think>`).
    reasoning_effort: None or one of REASONING_EFFORTS; only "max" (in thinking mode) changes the prompt.
    tools / response_format: the request's OpenAI fields, attached to the leading system message.
    context: messages already encoded as a prefix of this prompt; only the text for `messages` is
    returned (no BOS), rendered as the reference does when continuing a context.
    developer_as_system: render `developer` messages as system messages (OpenAI's meaning of the
    role) instead of DeepSeek's internal developer turn (a user turn, dropped with old reasoning).
    Encode the result with `Tokenizer.encode(prompt, add_bos=False)`.
    """
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort: expected one of {', '.join(REASONING_EFFORTS)} or null, "
                         f"got {reasoning_effort!r}")
    functions = _functions(tools, "tools") if tools else None
    rf = _response_format(response_format, "response_format")

    ctx, calls = _normalize(context or [], "context", None, developer_as_system)
    msgs, _ = _normalize(messages, "messages", calls, developer_as_system)
    if ctx:
        ctx = _attach(ctx, functions, rf)
    else:
        msgs = _attach(msgs, functions, rf)
    ctx, msgs = _merge_turns(ctx), _merge_turns(msgs)
    full = ctx + msgs
    _order_tool_results(full)

    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        full = _drop_old_thinking(full)
        start = len(_drop_old_thinking(ctx))
    else:
        start = len(ctx)

    last_user = _last_user(full)
    parts = [BOS if add_bos and not ctx else ""]
    parts += [_render(i, full, last_user, thinking, drop, reasoning_effort) for i in range(start, len(full))]
    return "".join(parts)
