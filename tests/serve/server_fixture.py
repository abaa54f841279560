"""A live dsv4 server on 127.0.0.1 for tests: uvicorn in a background thread over the tiny model."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.llm_engine import LLMEngine
from dsv4.serve.handlers import ServeLimits
from dsv4.serve.server import Server, build_app, server_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, lm, model_name="tiny", api_key=None, max_queued=1024, shutdown_grace_s=5.0, **engine_kw):
        kw = dict(model="unused", device="cpu", dtype="float32", numerics="plain", max_model_len=512,
                  max_num_seqs=256, max_num_batched_tokens=2048)
        kw.update(engine_kw)
        self.engine = LLMEngine(EngineConfig(**kw), lm=lm)
        self.llm = AsyncLLM(engine=self.engine)
        self.ended = []  # (request id, finish reason, generated tokens) of every request that ended
        self.llm.finish_listeners.append(
            lambda o: self.ended.append((o.request_id, o.outputs[0].finish_reason, o.metrics.num_generated_tokens)))
        self.app = build_app(self.llm, model_name, api_key=api_key, limits=ServeLimits(max_queued=max_queued),
                             shutdown_grace_s=shutdown_grace_s)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = Server(server_config(self.app, "127.0.0.1", self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_idle(self, timeout=30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.engine.num_unfinished_requests():
            time.sleep(0.02)
        assert self.engine.num_unfinished_requests() == 0, "requests still in flight"

    def assert_no_leaks(self) -> None:
        self.wait_idle()
        time.sleep(0.1)
        kv = self.engine.kv
        kv.check()
        assert kv.num_free_pages == self.engine.cache.num_pages, "cache pages leaked"
        assert kv.num_free_slots == self.engine.cache.num_slots, "cache slots leaked"
        assert not self.engine.requests
