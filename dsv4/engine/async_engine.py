"""Async front end for serving: each request is an async iterator of outputs (streaming), and can be
aborted at any moment (e.g. when its client disconnects). The engine runs either on a thread of this
process (the default; `engine=` given, tests, offline use) or, with `engine_process=True` (what
`dsv4 serve` uses), in its own process (engine/core_process.py): then this process validates, tokenises,
detokenises and applies stop strings, and the core process only schedules, runs the model and sends back
each step's new token ids, so HTTP handling and the engine loop do not share one interpreter lock.

    llm = AsyncLLM(EngineConfig(model="tiny"))                          # engine on a thread
    llm = AsyncLLM(EngineConfig(model="tiny"), engine_process=True)     # engine in a core process
    async for out in llm.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].delta_text, end="")
    await llm.shutdown()

A request that fails validation raises ValueError from `generate` before anything is queued; an error
inside the engine step fails the requests in flight (each gets an `EngineStepError`) and the engine
keeps serving new ones; `health()` says whether it can (a core process that died: every request in flight
gets an `EngineDeadError`, new ones too). Every request that ends (finished, aborted, failed) is reported
once to the `finish_listeners` (metrics), from the engine thread (or the core client's receiver thread).

Each request's outputs wait for its consumer in a bounded buffer: an output its consumer has not taken yet
absorbs the next ones (delta tokens, text and logprobs appended; cumulative fields replaced by the newer), so
a consumer that stops reading holds one pending output whose size is that of its own tokens, not one object
per step, and the engine never waits for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace
from typing import AsyncIterator

from dsv4.config import EngineConfig
from dsv4.engine.client import EngineClient
from dsv4.engine.llm import start_one_rank
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger("dsv4.async")


class EngineDeadError(RuntimeError):
    """The engine is shut down (or shutting down, or its core process died) and cannot take or finish this
    request."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight; the request was stopped."""


# a failed step makes the engine unhealthy until a step succeeds, or until this long without one
FAILED_STEP_UNHEALTHY_S = 30.0


class _Merged:
    """Several outputs of one request merged into one: the newest, with the delta fields (and, for
    output_kind "delta", the token ids, logprobs and prompt logprobs) of all of them. Appends are O(new)."""

    def __init__(self, first: RequestOutput, kind: str):
        c = first.outputs[0]
        self.out = first
        self.delta = kind == "delta"
        self.delta_ids = list(c.delta_token_ids)
        self.delta_text = [c.delta_text]
        if self.delta:
            self.ids = list(c.token_ids)
            self.lps = None if c.logprobs is None else list(c.logprobs)
            self.plp = first.prompt_logprobs

    def add(self, new: RequestOutput) -> None:
        c = new.outputs[0]
        self.delta_ids += c.delta_token_ids
        self.delta_text.append(c.delta_text)
        if self.delta:
            self.ids += c.token_ids
            if self.lps is not None and c.logprobs:
                self.lps += c.logprobs
            if self.plp is None:
                self.plp = new.prompt_logprobs
        self.out = new

    def result(self) -> RequestOutput:
        o = self.out
        kw = dict(delta_token_ids=self.delta_ids, delta_text="".join(self.delta_text))
        if self.delta:
            kw.update(token_ids=self.ids, logprobs=self.lps)
        return replace(o, outputs=[replace(o.outputs[0], **kw)],
                       prompt_logprobs=self.plp if self.delta else o.prompt_logprobs)


class _Stream:
    """One request's outputs on their way to its consumer (an async generator on `loop`), filled from
    another thread. Bounded: an output not yet taken absorbs the next ones (`_Merged`), so it holds at most
    one output and then at most one exception, however many steps its consumer misses."""

    __slots__ = ("loop", "kind", "_lock", "_items", "_merged", "_event", "_notified")

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str):
        self.loop, self.kind = loop, kind
        self._lock = threading.Lock()
        self._items: deque = deque()
        self._merged: _Merged | None = None  # the merge of the last item, when it absorbed others
        self._event = asyncio.Event()
        self._notified = False  # a wake-up is on its way to the consumer's loop

    def __len__(self) -> int:
        """Outputs (and exceptions) waiting for the consumer."""
        return len(self._items)

    def put(self, item) -> bool:
        """Queue an output or an exception; True when the consumer's loop must be woken (`wake`)."""
        with self._lock:
            last = self._items[-1] if self._items else None
            if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
                if self._merged is None:
                    self._merged = _Merged(last, self.kind)
                self._merged.add(item)
            else:
                self._items.append(item)
            if self._notified:
                return False
            self._notified = True
            return True

    def wake(self) -> None:
        """On the consumer's loop."""
        self._event.set()

    async def get(self):
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if self._merged is not None and isinstance(item, RequestOutput):
                        item, self._merged = self._merged.result(), None
                    return item
                self._notified = False
                self._event.clear()
            await self._event.wait()


def _wake_all(streams) -> None:
    for s in streams:
        s.wake()


class AsyncLLM:
    """The engine is an EngineClient (engine/client.py): one given, or one made by `start_engine(config,
    dist)`: here one device only; the public dsv4.AsyncLLM (dsv4/entry.py) binds
    dsv4.parallel.launch.start_engine, which starts one rank or many. With `engine_process=True` the engine is
    started that same way, inside a core process (engine/core_process.py), and `self.engine` is a view of it
    (config, cfg, tokenizer, max_model_len, plan, load(), counters)."""

    start_engine = staticmethod(start_one_rank)

    def __init__(self, config: EngineConfig | None = None, engine: EngineClient | None = None, dist=None,
                 engine_process: bool = False, **kwargs):
        """`engine`: one already started (an LLMEngine, or rank 0's DPEngine of several ranks); `dist`: this
        process is rank 0 of a torchrun-started group (dsv4.parallel.launch.DistSpec) (with engine_process,
        the core process takes rank 0's part); `engine_process`: run the engine in its own process."""
        self._streams: dict[str, _Stream] = {}
        self._stop = False
        self._closing: str | None = None  # why new requests are refused (shutdown under way)
        self.finish_listeners: list = []  # callables(RequestOutput): every request that ends, once
        self._failed_steps = 0  # consecutive failed steps
        self._last_failure: tuple[float, str] | None = None
        self._ids = itertools.count()
        self._core = None
        self._thread = None
        if engine_process:
            if engine is not None:
                raise ValueError("engine_process=True starts its own engine in the core process: give a config, "
                                 "not an engine")
            from dsv4.engine.core_process import CoreClient

            self._core = CoreClient(type(self).start_engine, config or EngineConfig(**kwargs), dist,
                                    deliver=self._push_many, fail=self._fail_ended, on_step=self._stepped,
                                    dead_error=EngineDeadError, step_error=EngineStepError)
            self.engine = self._core.engine
            return
        self.engine: EngineClient = engine or self.start_engine(config or EngineConfig(**kwargs), dist)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def engine_process(self):
        """The core process (multiprocessing.Process) when the engine runs in one, else None."""
        return None if self._core is None else self._core.proc

    def _alive(self) -> bool:
        return self._core.alive if self._core is not None else self._thread.is_alive()

    # ---- client side ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stop or self._closing:
            raise EngineDeadError(self._closing or "the engine is shut down")
        if self._core is not None and not self._core.alive:
            raise EngineDeadError(self._core.death or "the engine core process is not running")
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        stream = _Stream(loop, (params or SamplingParams()).output_kind)
        finished = False
        if self._core is not None:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = stream  # before the request can produce anything
            try:
                self._core.add(rid, prompt, params)
            except BaseException:
                self._streams.pop(rid, None)
                raise
        try:
            if self._core is None:
                added = loop.create_future()
                self._cmds.put(("add", (prompt, params, rid), stream, added))
                self._wake.set()
                # a cancellation while the engine thread admits the request still aborts it (the abort
                # command queues behind the add); a validation error raises here and aborts nothing
                try:
                    await added
                except ValueError:
                    finished = True
                    raise
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation): free everything
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)
            return
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def pending_outputs(self, request_id: str) -> int:
        """Outputs (and errors) of a request waiting for its consumer: at most 2 (one merged output, one error)."""
        s = self._streams.get(request_id)
        return 0 if s is None else len(s)

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished_requests()

    def health(self) -> str | None:
        """None when the engine can serve; otherwise why not (for /health)."""
        if self._stop:
            return "the engine is shut down"
        if self._core is not None and not self._core.alive:
            return self._core.death or "the engine core process is not running"
        if self._core is None and not self._thread.is_alive():
            return "the engine is shut down"
        if self._closing:
            return self._closing
        if self.engine.closed:  # an expert-parallel group that stopped its ranks
            why = getattr(self.engine, "failure", None) or (self._last_failure[1] if self._last_failure
                                                             else "its ranks were stopped")
            return f"the expert-parallel engine cannot serve: {why}"
        if self._failed_steps and self._last_failure is not None:
            at, why = self._last_failure
            if time.monotonic() - at < FAILED_STEP_UNHEALTHY_S:
                return f"the last {self._failed_steps} engine step(s) failed: {why}"
        return None

    async def drain(self, timeout: float, reason: str = "the server is shutting down") -> None:
        """Refuse new requests; let those in flight finish for up to `timeout` s, then fail the rest
        with an EngineDeadError naming `reason` (clients get a readable error, not a cut connection)."""
        self._closing = reason
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._streams and loop.time() < deadline and self._alive():
            await asyncio.sleep(0.02)
        if self._streams and self._alive():
            log.warning("%d request(s) still running after the %.1f s grace period: stopping them",
                        len(self._streams), timeout)
            why = f"{reason}; the request was stopped after the {timeout:g} s grace period"
            if self._core is not None:
                self._core.fail_all(lambda: EngineDeadError(why))
                return
            done = loop.create_future()
            self._cmds.put(("fail_all", why, loop, done))
            self._wake.set()
            await done

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to `timeout` s, then fail the rest and stop."""
        await self.drain(timeout)
        loop = asyncio.get_running_loop()
        if self._core is not None:
            self._stop = True
            await loop.run_in_executor(None, self._core.close)
            return
        self._cmds.put(("stop",))
        self._wake.set()
        await loop.run_in_executor(None, self._thread.join)
        self.engine.shutdown()  # the other ranks of an expert-parallel engine

    # ---- delivery (the engine thread, or the core client's receiver thread) -------------------------
    def _ended(self, out: RequestOutput, reason: str | None = None) -> None:
        """Report a request that ended (once) to the finish listeners; `reason` overrides its
        finish reason (an engine failure ends requests as "error")."""
        if reason is not None:
            for c in out.outputs:
                c.finish_reason = reason
        for f in self.finish_listeners:
            try:
                f(out)
            except Exception:  # a broken listener must not take the engine down
                log.exception("finish listener failed")

    def _push_many(self, items) -> None:
        """Hand [(request id, output or exception), ...] to their consumers, waking each loop once."""
        wake: dict = {}
        for rid, item in items:
            if not isinstance(item, BaseException) and item.finished:
                self._ended(item)
            s = self._streams.get(rid)
            if s is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(rid, None)
            if s.put(item):
                wake.setdefault(s.loop, []).append((rid, s))
        for loop, streams in wake.items():
            try:
                loop.call_soon_threadsafe(_wake_all, [s for _, s in streams])
            except RuntimeError:  # the client's loop is closed: drop the streams, free the requests
                for rid, s in streams:
                    self._streams.pop(rid, None)
                    self._abort_orphan(rid)

    def _push(self, rid: str, item) -> None:
        self._push_many([(rid, item)])

    def _abort_orphan(self, rid: str) -> None:
        """Stop a request whose consumer's loop is gone."""
        if self._core is not None:
            self._core.abort(rid)
            return
        out = self.engine.abort_request(rid)  # (on the engine thread)
        if out is not None:
            self._ended(out)

    def _fail_ended(self, rid: str, err: BaseException, out: RequestOutput | None) -> None:
        """A request already stopped (its final output `out`) that failed: listeners see it as an "error",
        its consumer gets `err`."""
        if out is not None:
            self._ended(out, "error")
        self._push(rid, err)

    def _stepped(self, why: str | None) -> None:
        """After each engine step: None when it succeeded, else why it failed."""
        if why is None:
            self._failed_steps = 0
        else:
            self._failed_steps += 1
            self._last_failure = (time.monotonic(), why)

    # ---- engine thread ----------------------------------------------------------------------------
    def _fail(self, rid: str, err: BaseException) -> None:
        """Stop a request in flight and hand its client `err`."""
        self._fail_ended(rid, err, self.engine.abort_request(rid))

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                (prompt, params, rid), stream, fut = cmd[1:]
                loop = stream.loop
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                    self._streams[rid] = stream
                    loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
                except Exception as e:  # a bad request fails that request only
                    loop.call_soon_threadsafe(lambda f=fut, e=e: f.done() or f.set_exception(e))
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._push(cmd[1], out)
            elif cmd[0] == "fail_all":
                reason, loop, fut = cmd[1:]
                for rid in list(self._streams):
                    self._fail(rid, EngineDeadError(reason))
                loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
            elif cmd[0] == "stop":
                self._stop = True

    def _run(self) -> None:
        while True:
            self._drain()
            if self._stop:
                break
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # fail what is in flight, keep the engine alive for new ones
                log.exception("engine step failed; failing the requests in flight")
                self._stepped(f"engine step failed: {type(e).__name__}: {e}")
                for rid in list(self._streams):
                    self._fail(rid, EngineStepError(self._last_failure[1]))
                continue
            self._stepped(None)
            self._push_many([(o.request_id, o) for o in outs])
        for rid in list(self._streams):
            self._fail(rid, EngineDeadError("the engine shut down before this request finished"))
