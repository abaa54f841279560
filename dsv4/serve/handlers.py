"""The OpenAI API's request -> response logic over the async engine, independent of HTTP (the server
and the batch runner both use it). Bad input raises `ApiError` (an OpenAI-style 4xx); nothing here
lets one request disturb another."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

from dsv4.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams
from dsv4.serve.encoding import encode_messages
from dsv4.serve.parsing import ChatStreamParser
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("dsv4.serve")
SEED_MAX = 2**63 - 1  # seeds are 64-bit; choice i of n uses seed + i (mod 2^63)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, e: BaseException) -> "ApiError":
        """The error a client gets for an exception raised while its request ran."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, EngineDeadError):
            return cls(503, str(e), "service_unavailable", code="engine_unavailable")
        if isinstance(e, EngineStepError):
            return cls(500, f"the engine failed while running this request ({e})", "server_error",
                       code="engine_step_failed")
        if isinstance(e, ValueError):
            return cls(400, str(e))
        log.error("request failed", exc_info=e)
        return cls(500, "internal error", "internal_error")


@dataclass
class ServeLimits:
    max_queued: int = 256  # requests waiting or running beyond which new ones get 429


class _Ticket:
    """A reservation of n places in the server's queue bound, released exactly once, on the event
    loop, by whoever owns the request's work: the handler when it returns, the streaming response
    when it ends (whether or not its body ever started)."""

    def __init__(self, serving: "OpenAIServing", n: int):
        self.serving, self.n = serving, n
        serving._inflight += n

    def release(self) -> None:
        if self.n:
            self.serving._inflight -= self.n
            self.n = 0


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
        if n > self.limits.max_queued:
            raise ApiError(400, f"this request needs {n} sequences (prompts x n) but the server admits at most "
                           f"{self.limits.max_queued} at a time", param="n", code="too_many_sequences")
        if self._inflight + n > self.limits.max_queued:
            raise ApiError(429, f"the server is at capacity ({self.limits.max_queued} requests queued or running); "
                           "retry later", "rate_limit_error", code="server_busy")
        return _Ticket(self, n)

    @staticmethod
    def _check_fields(r) -> None:
        bad = r.field_error()
        if bad is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unknown_parameter")

    def _logit_bias(self, r) -> dict[int, float] | None:
        if not r.logit_bias:
            return None
        out = {}
        for k, v in r.logit_bias.items():
            try:
                t = int(k)
            except ValueError:
                raise ApiError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            if not 0 <= t < self.vocab_size:
                raise ApiError(400, f"logit_bias: token id {t} outside the vocabulary 0..{self.vocab_size - 1}",
                               param="logit_bias")
            if not -100 <= v <= 100:
                raise ApiError(400, f"logit_bias values must lie in [-100, 100], got {v} for token {t}",
                               param="logit_bias")
            out[t] = float(v)
        return out

    def _params(self, r, max_tokens: int | None, prompt_len: int, prompt_field: str, **extra) -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if r.seed is not None and not -SEED_MAX - 1 <= r.seed <= SEED_MAX:
            raise ApiError(400, f"seed must be a 64-bit signed integer (-2^63 .. 2^63-1), got {r.seed}", param="seed")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                           f"has {prompt_len}", param=prompt_field, code="context_length_exceeded")
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
                  stop=r.stop, stop_token_ids=r.stop_token_ids or [], ignore_eos=r.ignore_eos,
                  include_stop_str_in_output=r.include_stop_str_in_output, logit_bias=self._logit_bias(r),
                  # a stream needs each step's new tokens only, a plain response only the end: no per-step
                  # copies of everything generated so far (quadratic in the output length)
                  output_kind="delta" if r.stream else "final_only")
        kw.update(extra)
        try:
            p = SamplingParams(**kw)
            p.validate(self.vocab_size)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param=str(e).split(" ")[0]) from None
        return p

    def _jobs(self, ids: list[int], params: SamplingParams, n: int, rid: str, first: int = 0) -> list:
        """The n engine requests of one prompt (choice i seeded seed + i), numbered from `first`."""
        def seed(i):
            return None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63
        return [(first + i, ids, replace(params, seed=seed(i)), f"{rid}-{i}") for i in range(n)]

    async def _run(self, jobs: list) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run engine requests [(choice index, prompt ids, params, request id)] concurrently; yields
        (choice index, output) as they come. On exit (done, failed, or the consumer went away) every
        request still running is aborted and every helper task has ended before this returns."""
        if len(jobs) == 1:
            i, ids, params, rid = jobs[0]
            async for out in self.llm.generate(ids, params, request_id=rid):
                yield i, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, ids, params, rid):
            try:
                async for out in self.llm.generate(ids, params, request_id=rid):
                    q.put_nowait((i, out))
            except asyncio.CancelledError:
                raise  # the consumer went away: generate's own cleanup aborts the request
            except Exception as e:  # forwarded to the consumer
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        done = 0
        try:
            while done < len(jobs):
                i, item = await q.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            # wait for the pumps to unwind (each closes its generator, which aborts its request)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _error_events(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE lines of a stream whose failure after the 200 went out becomes an error event the client
        can read (`data: {"error": ...}`, as OpenAI's clients expect), then the end of the stream."""
        try:
            async for line in lines:
                yield line
        except Exception as e:
            yield _sse(ApiError.of(e).body())
            yield "data: [DONE]\n\n"

    def _token_str(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
        """OpenAI usage; `cached`: prompt tokens served from the prefix cache (the first choice of each prompt)."""
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

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
        self._check_fields(r)
        if r.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if r.best_of is not None and r.best_of != r.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if r.logprobs is not None and not 0 <= r.logprobs <= 20:
            raise ApiError(400, f"logprobs must be between 0 and 20, got {r.logprobs}", param="logprobs")
        prompts = self._completion_prompts(r)
        max_tokens = 16 if r.max_tokens is None else r.max_tokens
        params = [self._params(r, max_tokens, len(ids), "prompt", logprobs=r.logprobs,
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

    def _completion_jobs(self, r: CompletionRequest, prompts, params, rid: str) -> list:
        """Every (prompt, choice) of the request, run concurrently; choice index k * n + i."""
        return [job for k, (ids, p) in enumerate(zip(prompts, params))
                for job in self._jobs(ids, p, r.n, f"{rid}-{k}", first=k * r.n)]

    async def completions(self, r: CompletionRequest) -> dict:
        prompts, params, ticket = self._completion_setup(r)
        try:
            return await self._completions(r, prompts, params)
        except Exception as e:
            raise ApiError.of(e) from e
        finally:
            ticket.release()

    async def _completions(self, r: CompletionRequest, prompts, params) -> dict:
        rid = f"cmpl-{uuid.uuid4().hex}"
        finals: dict[int, RequestOutput] = {}
        async for j, out in self._run(self._completion_jobs(r, prompts, params, rid)):
            if out.finished:
                finals[j] = out
        choices, n_prompt, n_out = [], 0, 0
        for k, ids in enumerate(prompts):
            n_prompt += len(ids)
            for i in range(r.n):
                o = finals[k * r.n + i]
                c = o.outputs[0]
                text = c.text
                prefix = self.tokenizer.decode(ids) if r.echo else ""
                lp = None
                if r.logprobs is not None:
                    lp = self._completion_logprobs(c.logprobs or [], len(prefix))
                choices.append({"index": k * r.n + i, "text": prefix + text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                n_out += len(c.token_ids)
        cached = sum(finals[k * r.n].num_cached_tokens for k in range(len(prompts)))
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": self._usage(n_prompt, n_out, cached)}

    async def completions_stream(self, r: CompletionRequest, setup=None) -> AsyncIterator[str]:
        """SSE lines. Pass `setup=self._completion_setup(r)` to raise request errors before streaming."""
        prompts, params, ticket = setup or self._completion_setup(r)
        try:
            async for line in self._error_events(self._completions_stream(r, prompts, params)):
                yield line
        finally:
            ticket.release()

    async def _completions_stream(self, r: CompletionRequest, prompts, params) -> AsyncIterator[str]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n_prompt, n_out, cached = sum(len(ids) for ids in prompts), 0, 0
        async for j, out in self._run(self._completion_jobs(r, prompts, params, rid)):
            c = out.outputs[0]
            lp = None
            if r.logprobs is not None and c.logprobs:
                lp = self._completion_logprobs(c.logprobs[len(c.logprobs) - len(c.delta_token_ids):], 0)
            if c.delta_text or out.finished or lp:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [{"index": j, "text": c.delta_text, "logprobs": lp,
                                         "finish_reason": c.finish_reason if out.finished else None}]})
            if out.finished:
                n_out += out.metrics.num_generated_tokens
                cached += out.num_cached_tokens if j % r.n == 0 else 0
        if r.stream_options and r.stream_options.include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": self._usage(n_prompt, n_out, cached)})
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    @staticmethod
    def _check_tools(r: ChatCompletionRequest) -> None:
        """What OpenAI's API refuses about tools: parameters that are not a JSON-schema object, a
        tool_choice naming a function that is not defined, a tool_choice without tools."""
        names = set()
        for j, t in enumerate(r.tools or []):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict):
                continue  # the encoder names the problem
            names.add(fn.get("name"))
            if "parameters" in fn:
                ps = fn["parameters"]
                if not isinstance(ps, dict) or ps.get("type", "object") != "object":
                    got = type(ps).__name__ if not isinstance(ps, dict) else f"type {ps.get('type')!r}"
                    raise ApiError(400, f"tools[{j}].function.parameters: expected a JSON Schema object "
                                   f"(type 'object'), got {got}", param=f"tools[{j}].function.parameters")
        tc = r.tool_choice
        if tc is None or tc in ("none", "auto"):
            return
        if not r.tools:
            raise ApiError(400, "tool_choice is only allowed when tools are specified", param="tool_choice")
        if isinstance(tc, dict):
            fn = tc.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if tc.get("type", "function") != "function" or not isinstance(name, str):
                raise ApiError(400, 'tool_choice: expected "none", "auto", "required" or '
                               '{"type": "function", "function": {"name": ...}}', param="tool_choice")
            if name not in names:
                raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                               f"({', '.join(sorted(str(n) for n in names))})", param="tool_choice")

    def _chat_setup(self, r: ChatCompletionRequest):
        self._check_model(r.model)
        self._check_fields(r)
        self._check_tools(r)
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
            # the encoder's messages start with the field at fault: "messages[2].role: ...", "tools[0]...",
            # "response_format.type: ...", "reasoning_effort: ..."
            msg = str(e).strip("'\"")
            field = msg.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
            param = field if field in ("messages", "tools", "response_format", "reasoning_effort") else "messages"
            raise ApiError(400, msg, param=param) from None
        ids = self.tokenizer.encode(prompt, add_bos=False)
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        params = self._params(r, max_tokens, len(ids), "messages",
                              logprobs=(r.top_logprobs or 0) if r.logprobs else None, skip_special_tokens=False)
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
        except Exception as e:
            raise ApiError.of(e) from e
        finally:
            ticket.release()

    async def _chat(self, r: ChatCompletionRequest, ids, params, thinking, tools) -> dict:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._run(self._jobs(ids, params, r.n, rid)):
            if out.finished:
                finals[i] = out
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
                "choices": choices, "usage": self._usage(len(ids), n_out, finals[0].num_cached_tokens)}

    async def chat_stream(self, r: ChatCompletionRequest, setup=None) -> AsyncIterator[str]:
        """SSE lines. Pass `setup=self._chat_setup(r)` to raise request errors before streaming."""
        ids, params, thinking, tools, ticket = setup or self._chat_setup(r)
        try:
            async for line in self._error_events(self._chat_stream(r, ids, params, thinking, tools)):
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
        n_out = cached = 0
        async for i, out in self._run(self._jobs(ids, params, r.n, rid)):
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
                n_out += out.metrics.num_generated_tokens
                cached += out.num_cached_tokens if i == 0 else 0
                finish = "tool_calls" if saw_tools[i] and c.finish_reason == "stop" else c.finish_reason
                yield chunk(i, {}, finish)
        if r.stream_options and r.stream_options.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [], "usage": self._usage(len(ids), n_out, cached)})
        yield "data: [DONE]\n\n"
