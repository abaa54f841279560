"""Async front end for serving: the engine steps in its own thread; each request is an async iterator
of outputs (streaming), and can be aborted at any moment (e.g. when its client disconnects).

    llm = AsyncLLM(EngineConfig(model="tiny"))
    async for out in llm.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].delta_text, end="")
    await llm.shutdown()

A request that fails validation raises ValueError from `generate` before anything is queued; an error
inside the engine step fails the requests in flight (each gets the exception) and the engine keeps
serving new ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger("dsv4.async")


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None, dist=None, **kwargs):
        """`engine`: one already built (an LLMEngine, or rank 0's DPEngine of several ranks); `dist`: this
        process is rank 0 of a torchrun-started group (dsv4.parallel.launch.DistSpec)."""
        from dsv4.engine.llm import _start

        self.engine = engine or _start(config or EngineConfig(**kwargs), dist)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- client side ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stop:
            raise EngineDeadError("the engine is shut down")
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        added = loop.create_future()
        self._cmds.put(("add", (prompt, params, rid), loop, q, added))
        self._wake.set()
        await added  # raises the validation error, if any
        finished = False
        try:
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

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to `timeout` s, then fail the rest and stop."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self._cmds.put(("stop",))
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        stop = getattr(self.engine, "shutdown", None)  # the other ranks of an expert-parallel engine
        if stop is not None:
            stop()

    # ---- engine thread ----------------------------------------------------------------------------
    def _push(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is None:
            return
        loop, q = s
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: drop the stream, free the request
            self.engine.abort_request(rid)

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
                for rid in list(self._streams):
                    self.engine.abort_request(rid)
                    self._push(rid, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for o in outs:
                self._push(o.request_id, o)
        for rid in list(self._streams):
            self.engine.abort_request(rid)
            self._push(rid, EngineDeadError("the engine shut down before this request finished"))
