"""The OpenAI API's request -> response logic over the async engine, independent of HTTP (the server
and the batch runner both use it). Bad input raises `ApiError` (an OpenAI-style 4xx); nothing here
lets one request disturb another."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams
from dsv4.serve.encoding import encode_messages
from dsv4.serve.parsing import ChatStreamParser
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeLimits:
    max_queued: int = 256  # requests waiting or running beyond which new ones get 429


class _Ticket:
    """A reservation of n places in the server's queue bound, released exactly once: explicitly when
    the request's work ends, or when the ticket is garbage-collected (a stream that never started)."""

    def __init__(self, serving: "OpenAIServing", n: int):
        self.serving, self.n = serving, n
        serving._inflight += n

    def release(self) -> None:
        if self.n:
            self.serving._inflight -= self.n
            self.n = 0

    def __del__(self):
        self.release()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_name: str, limits: ServeLimits | None = None):
        self.llm = llm
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        eng = llm.engine
        self.tokenizer = eng.tokenizer
        self.max_model_len = eng.max_model_len
        self.vocab_size = eng.cfg.vocab_size
        self.created = int(time.time())
        self.on_finish = None  # optional callback(RequestOutput) for metrics
        self._inflight = 0  # engine requests accepted here and not yet finished (event-loop thread only)

    # ---- shared --------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "dsv4", "max_model_len": self.max_model_len}]}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           "not_found_error", "model", "model_not_found")

    def _reserve(self, n: int) -> _Ticket:
        """Admit n more engine requests or answer 429. Counted here, synchronously, so that concurrent
        arrivals cannot all slip past the bound before the engine thread has seen them."""
        if self._inflight + n > self.limits.max_queued:
            raise ApiError(429, f"the server is at capacity ({self.limits.max_queued} requests queued or running); "
                           "retry later", "rate_limit_error", code="server_busy")
        return _Ticket(self, n)

    def _params(self, r, max_tokens: int | None, prompt_len: int, **extra) -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                           f"has {prompt_len}", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; you asked "
                           f"for {prompt_len} prompt + {max_tokens} completion tokens",
                           param="max_tokens", code="context_length_exceeded")
        if not 1 <= r.n <= 16:
            raise ApiError(400, f"n must be between 1 and 16, got {r.n}", param="n")
        kw = dict(temperature=1.0 if r.temperature is None else r.temperature,
                  top_p=1.0 if r.top_p is None else r.top_p, top_k=r.top_k or 0, min_p=r.min_p or 0.0, seed=r.seed,
                  presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0,
                  repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
                  max_tokens=max_tokens if max_tokens is not None else room, min_tokens=r.min_tokens or 0,
                  stop=r.stop, stop_token_ids=r.stop_token_ids or [], ignore_eos=r.ignore_eos)
        kw.update(extra)
        try:
            p = SamplingParams(**kw)
            p.validate(self.vocab_size)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param=str(e).split(" ")[0]) from None
        return p

    async def _run(self, ids: list[int], params: SamplingParams, n: int, rid: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run n samples of one prompt; yields (choice index, output) as they come. Aborts all on exit."""
        gens = [self.llm.generate(ids, replace(params, seed=None if params.seed is None else params.seed + i),
                                  request_id=f"{rid}-{i}") for i in range(n)]
        if n == 1:
            try:
                async for out in gens[0]:
                    yield 0, out
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, g):
            try:
                async for out in g:
                    await q.put((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await q.put((i, e))
            finally:
                await q.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        done = 0
        try:
            while done < n:
                i, item = await q.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise ApiError(400, str(item)) if isinstance(item, ValueError) else item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for g in gens:
                await g.aclose()

    def _finished(self, out: RequestOutput) -> None:
        if self.on_finish is not None:
            self.on_finish(out)

    def _token_str(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- /v1/completions ---------------------------------------------------------------------------
    def _completion_prompts(self, r: CompletionRequest) -> list[list[int]]:
        p = r.prompt
        if isinstance(p, str):
            return [self.tokenizer.encode(p)]
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) for x in p]
        else:
            prompts = [list(x) for x in p]
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, f"prompt {i} is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary 0..{self.vocab_size - 1}",
                               param="prompt")
        return prompts

    def _completion_setup(self, r: CompletionRequest):
        self._check_model(r.model)
        if r.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if r.best_of is not None and r.best_of != r.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if r.logprobs is not None and not 0 <= r.logprobs <= 20:
            raise ApiError(400, f"logprobs must be between 0 and 20, got {r.logprobs}", param="logprobs")
        prompts = self._completion_prompts(r)
        max_tokens = 16 if r.max_tokens is None else r.max_tokens
        params = [self._params(r, max_tokens, len(ids), logprobs=r.logprobs,
                               prompt_logprobs=r.logprobs if r.echo and r.logprobs is not None else None,
                               skip_special_tokens=r.skip_special_tokens) for ids in prompts]
        return prompts, params, self._reserve(len(prompts) * r.n)

    def _completion_logprobs(self, lps, offset0: int) -> dict:
        toks, tlp, top, offs = [], [], [], []
        off = offset0
        for lp in lps:
            s = self._token_str(lp.token_id)
            toks.append(s)
            tlp.append(lp.logprob)
            top.append({self._token_str(t): v for t, v in lp.top})
            offs.append(off)
            off += len(s)
        return {"tokens": toks, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}

    async def completions(self, r: CompletionRequest) -> dict:
        prompts, params, ticket = self._completion_setup(r)
        try:
            return await self._completions(r, prompts, params)
        finally:
            ticket.release()

    async def _completions(self, r: CompletionRequest, prompts, params) -> dict:
        rid = f"cmpl-{uuid.uuid4().hex}"
        choices, n_prompt, n_out = [], 0, 0
        for k, (ids, p) in enumerate(zip(prompts, params)):
            finals: dict[int, RequestOutput] = {}
            async for i, out in self._run(ids, p, r.n, f"{rid}-{k}"):
                if out.finished:
                    finals[i] = out
                    self._finished(out)
            n_prompt += len(ids)
            for i in range(r.n):
                o = finals[i]
                c = o.outputs[0]
                text = c.text
                prefix = self.tokenizer.decode(ids) if r.echo else ""
                lp = None
                if r.logprobs is not None:
                    lp = self._completion_logprobs(c.logprobs or [], len(prefix))
                choices.append({"index": k * r.n + i, "text": prefix + text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                n_out += len(c.token_ids)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": self._usage(n_prompt, n_out)}

    async def completions_stream(self, r: CompletionRequest, setup=None) -> AsyncIterator[str]:
        """SSE lines. Pass `setup=self._completion_setup(r)` to raise request errors before streaming."""
        prompts, params, ticket = setup or self._completion_setup(r)
        try:
            async for line in self._completions_stream(r, prompts, params):
                yield line
        finally:
            ticket.release()

    async def _completions_stream(self, r: CompletionRequest, prompts, params) -> AsyncIterator[str]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n_prompt, n_out = 0, 0
        for k, (ids, p) in enumerate(zip(prompts, params)):
            n_prompt += len(ids)
            async for i, out in self._run(ids, p, r.n, f"{rid}-{k}"):
                c = out.outputs[0]
                lp = None
                if r.logprobs is not None and c.logprobs:
                    lp = self._completion_logprobs(c.logprobs[len(c.logprobs) - len(c.delta_token_ids):], 0)
                if c.delta_text or out.finished or lp:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": [{"index": k * r.n + i, "text": c.delta_text, "logprobs": lp,
                                             "finish_reason": c.finish_reason if out.finished else None}]})
                if out.finished:
                    n_out += len(c.token_ids)
                    self._finished(out)
        if r.stream_options and r.stream_options.include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": self._usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    def _chat_setup(self, r: ChatCompletionRequest):
        self._check_model(r.model)
        thinking = r.thinking_enabled()
        tools = r.tools if r.tool_choice != "none" else None
        if r.top_logprobs is not None and not 0 <= r.top_logprobs <= 20:
            raise ApiError(400, f"top_logprobs must be between 0 and 20, got {r.top_logprobs}", param="top_logprobs")
        effort = r.reasoning_effort if r.reasoning_effort not in (None, "none") else None
        try:
            # OpenAI clients send "developer" for instructions: render it as the system prompt (the official
            # encoder's developer role is an internal search-agent turn)
            prompt = encode_messages(r.messages, thinking=thinking, reasoning_effort=effort, tools=tools,
                                     response_format=r.response_format, developer_as_system=True)
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"invalid messages: {e}", param="messages") from None
        ids = self.tokenizer.encode(prompt, add_bos=False)
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        params = self._params(r, max_tokens, len(ids), logprobs=(r.top_logprobs or 0) if r.logprobs else None,
                              skip_special_tokens=False)
        return ids, params, thinking, bool(tools), self._reserve(r.n)

    def _chat_logprobs(self, lps) -> dict:
        def entry(t, v):
            s = self._token_str(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                            for lp in lps]}

    @staticmethod
    def _tool_calls_json(calls) -> list[dict]:
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls]

    async def chat(self, r: ChatCompletionRequest) -> dict:
        ids, params, thinking, tools, ticket = self._chat_setup(r)
        try:
            return await self._chat(r, ids, params, thinking, tools)
        finally:
            ticket.release()

    async def _chat(self, r: ChatCompletionRequest, ids, params, thinking, tools) -> dict:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._run(ids, params, r.n, rid):
            if out.finished:
                finals[i] = out
                self._finished(out)
        choices, n_out = [], 0
        for i in range(r.n):
            c = finals[i].outputs[0]
            parser = ChatStreamParser(thinking=thinking, tools=tools)
            parser.feed(c.text)
            parser.finish()
            msg = {"role": "assistant", "content": parser.content or (None if parser.tool_calls else "")}
            if thinking and not parser.answered_in_reasoning:  # (an answer without </think> is the content)
                msg["reasoning_content"] = parser.reasoning
            if parser.tool_calls:
                msg["tool_calls"] = self._tool_calls_json(parser.tool_calls)
            finish = "tool_calls" if parser.tool_calls and c.finish_reason == "stop" else c.finish_reason
            choices.append({"index": i, "message": msg, "finish_reason": finish, "stop_reason": c.stop_reason,
                            "logprobs": self._chat_logprobs(c.logprobs) if r.logprobs else None})
            n_out += len(c.token_ids)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": self._usage(len(ids), n_out)}

    async def chat_stream(self, r: ChatCompletionRequest, setup=None) -> AsyncIterator[str]:
        """SSE lines. Pass `setup=self._chat_setup(r)` to raise request errors before streaming."""
        ids, params, thinking, tools, ticket = setup or self._chat_setup(r)
        try:
            async for line in self._chat_stream(r, ids, params, thinking, tools):
                yield line
        finally:
            ticket.release()

    async def _chat_stream(self, r: ChatCompletionRequest, ids, params, thinking, tools) -> AsyncIterator[str]:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(i, delta, finish=None, logprobs=None):
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        parsers = [ChatStreamParser(thinking=thinking, tools=tools) for _ in range(r.n)]
        saw_tools = [False] * r.n
        for i in range(r.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        n_out = 0
        async for i, out in self._run(ids, params, r.n, rid):
            c = out.outputs[0]
            deltas = [parsers[i].feed(c.delta_text)]
            if out.finished:
                deltas.append(parsers[i].finish())
            lp = None
            if r.logprobs and c.delta_token_ids:
                lp = self._chat_logprobs(c.logprobs[len(c.logprobs) - len(c.delta_token_ids):])
            for d in deltas:
                delta = {}
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.content:
                    delta["content"] = d.content
                if d.tool_calls:
                    saw_tools[i] = True
                    delta["tool_calls"] = [
                        {"index": t.index, **({"id": t.id, "type": "function"} if t.id else {}),
                         "function": {k: v for k, v in (("name", t.name), ("arguments", t.arguments)) if v is not None}}
                        for t in d.tool_calls]
                if delta or lp:
                    yield chunk(i, delta, logprobs=lp)
                    lp = None
            if out.finished:
                n_out += len(c.token_ids)
                self._finished(out)
                finish = "tool_calls" if saw_tools[i] and c.finish_reason == "stop" else c.finish_reason
                yield chunk(i, {}, finish)
        if r.stream_options and r.stream_options.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [], "usage": self._usage(len(ids), n_out)})
        yield "data: [DONE]\n\n"
