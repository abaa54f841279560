"""Async front end for serving: the engine steps in its own thread; each request is an async iterator
of outputs (streaming), and can be aborted at any moment (e.g. when its client disconnects).

    llm = AsyncLLM(EngineConfig(model="tiny"))
    async for out in llm.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].delta_text, end="")
    await llm.shutdown()

A request that fails validation raises ValueError from `generate` before anything is queued; an error
inside the engine step fails the requests in flight (each gets an `EngineStepError`) and the engine
keeps serving new ones; `health()` says whether it can. Every request that ends (finished, aborted,
failed) is reported once to the `finish_listeners` (metrics), from the engine thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator

from dsv4.config import EngineConfig
from dsv4.engine.client import EngineClient
from dsv4.engine.llm import start_one_rank
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger("dsv4.async")


class EngineDeadError(RuntimeError):
    """The engine is shut down (or shutting down) and cannot take or finish this request."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight; the request was stopped."""


# a failed step makes the engine unhealthy until a step succeeds, or until this long without one
FAILED_STEP_UNHEALTHY_S = 30.0


class AsyncLLM:
    """The engine is an EngineClient (engine/client.py): one given, or one made by `start_engine(config,
    dist)`: here one device only; the public dsv4.AsyncLLM (dsv4/entry.py) binds
    dsv4.parallel.launch.start_engine, which starts one rank or many."""

    start_engine = staticmethod(start_one_rank)

    def __init__(self, config: EngineConfig | None = None, engine: EngineClient | None = None, dist=None,
                 **kwargs):
        """`engine`: one already started (an LLMEngine, or rank 0's DPEngine of several ranks); `dist`: this
        process is rank 0 of a torchrun-started group (dsv4.parallel.launch.DistSpec)."""
        self.engine: EngineClient = engine or self.start_engine(config or EngineConfig(**kwargs), dist)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._closing: str | None = None  # why new requests are refused (shutdown under way)
        self.finish_listeners: list = []  # callables(RequestOutput): every request that ends, once
        self._failed_steps = 0  # consecutive failed steps
        self._last_failure: tuple[float, str] | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- client side ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stop or self._closing:
            raise EngineDeadError(self._closing or "the engine is shut down")
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        added = loop.create_future()
        self._cmds.put(("add", (prompt, params, rid), loop, q, added))
        self._wake.set()
        finished = False
        try:
            # a cancellation while the engine thread admits the request still aborts it (the abort
            # command queues behind the add); a validation error raises here and aborts nothing
            try:
                await added
            except ValueError:
                finished = True
                raise
            while True:
                item = await q.get()
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
        self._cmds.put(("abort", request_id))
        self._wake.set()

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished_requests()

    def health(self) -> str | None:
        """None when the engine can serve; otherwise why not (for /health)."""
        if self._stop or not self._thread.is_alive():
            return "the engine is shut down"
        if self._closing:
            return self._closing
        if self.engine.closed:  # an expert-parallel group that stopped its ranks
            why = self._last_failure[1] if self._last_failure else "its ranks were stopped"
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
        while self._streams and loop.time() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.02)
        if self._streams and self._thread.is_alive():
            log.warning("%d request(s) still running after the %.1f s grace period: stopping them",
                        len(self._streams), timeout)
            done = loop.create_future()
            self._cmds.put(("fail_all", f"{reason}; the request was stopped after the {timeout:g} s grace period",
                            loop, done))
            self._wake.set()
            await done

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to `timeout` s, then fail the rest and stop."""
        await self.drain(timeout)
        self._cmds.put(("stop",))
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.engine.shutdown()  # the other ranks of an expert-parallel engine

    # ---- engine thread ----------------------------------------------------------------------------
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

    def _push(self, rid: str, item) -> None:
        if not isinstance(item, BaseException) and item.finished:
            self._ended(item)
        s = self._streams.get(rid)
        if s is None:
            return
        loop, q = s
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: drop the stream, free the request
            out = self.engine.abort_request(rid)
            if out is not None:
                self._ended(out)

    def _fail(self, rid: str, err: BaseException) -> None:
        """Stop a request in flight and hand its client `err`."""
        out = self.engine.abort_request(rid)
        if out is not None:
            self._ended(out, "error")
        self._push(rid, err)

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                (prompt, params, rid), loop, q, fut = cmd[1:]
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                    self._streams[rid] = (loop, q)
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
            except Exception as e:  # fail what is in flight, keep the engine alive for new requests
                log.exception("engine step failed; failing the requests in flight")
                why = f"engine step failed: {type(e).__name__}: {e}"
                self._failed_steps += 1
                self._last_failure = (time.monotonic(), why)
                for rid in list(self._streams):
                    self._fail(rid, EngineStepError(why))
                continue
            self._failed_steps = 0
            for o in outs:
                self._push(o.request_id, o)
        for rid in list(self._streams):
            self._fail(rid, EngineDeadError("the engine shut down before this request finished"))
