"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every failure a client can cause is an OpenAI-style 4xx that fails that request only (unknown paths
too); a client that disconnects aborts its request (freeing its cache); a full queue answers 429; an
optional API key guards /v1; /health answers 503 (with the reason) when the engine cannot serve.
Shutdown (SIGINT / SIGTERM) refuses new requests at once, lets those in flight finish for a grace
period, then ends the rest with an error their clients can read, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.engine.async_engine import AsyncLLM
from dsv4.serve.handlers import ApiError, OpenAIServing, ServeLimits
from dsv4.serve.metrics import ServerMetrics
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("dsv4.serve")


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_, param, code).body(), status_code=status)


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = e.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return f"{loc}: {first.get('msg', 'invalid')}" if loc else first.get("msg", "invalid request"), loc or None


class _TicketedStream(StreamingResponse):
    """A streaming response that releases its request's queue ticket when the response ends, whether
    its body ran to the end, failed, or never started (the client left before the first byte)."""

    def __init__(self, content, ticket, **kw):
        super().__init__(content, **kw)
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, limits: ServeLimits | None = None,
              shutdown_grace_s: float = 5.0) -> FastAPI:
    serving = OpenAIServing(llm, model_name, limits)
    metrics = ServerMetrics(llm.engine)
    llm.finish_listeners.append(metrics.observe)  # every request that ends, aborted and failed ones included

    @asynccontextmanager
    async def lifespan(app):
        yield
        await llm.shutdown(timeout=shutdown_grace_s)

    app = FastAPI(title="dsv4", lifespan=lifespan)
    app.state.serving, app.state.metrics, app.state.llm = serving, metrics, llm
    app.state.shutdown_grace_s = shutdown_grace_s

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    @app.exception_handler(Exception)
    async def _unexpected(request, e):  # never let an unexpected failure take more than this request down
        log.exception("unhandled error in %s", request.url.path)
        metrics.http_errors.labels("500").inc()
        return _error(500, "internal error", "internal_error")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, e):
        msg, param = _validation_message(e)
        metrics.http_errors.labels("400").inc()
        return _error(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # unknown path, wrong method: OpenAI's shape
        metrics.http_errors.labels(str(e.status_code)).inc()
        if e.status_code == 404:
            msg, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        elif e.status_code == 405:
            msg, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(e.detail), None
        return JSONResponse(ApiError(e.status_code, msg, "invalid_request_error", code=code).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        metrics.http_errors.labels(str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def _parse(request: Request, model):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param) from None

    async def _until_disconnect(request: Request, coro):
        """Await `coro`, cancelling it (which aborts its engine requests) if the client goes away."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
                return Response(status_code=499)
        return JSONResponse(task.result())

    @app.get("/health")
    async def health():
        why = llm.health()
        if why is not None:
            return _error(503, why, "service_unavailable", code="unhealthy")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return serving.models()

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        r = await _parse(request, CompletionRequest)
        if r.stream:
            setup = serving._completion_setup(r)
            return _TicketedStream(serving.completions_stream(r, setup), setup[-1], media_type="text/event-stream")
        return await _until_disconnect(request, serving.completions(r))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        r = await _parse(request, ChatCompletionRequest)
        if r.stream:
            setup = serving._chat_setup(r)
            return _TicketedStream(serving.chat_stream(r, setup), setup[-1], media_type="text/event-stream")
        return await _until_disconnect(request, serving.chat(r))

    return app


class Server(uvicorn.Server):
    """uvicorn's server with dsv4's shutdown: on SIGINT / SIGTERM the engine refuses new requests and
    gives those in flight the app's grace period before failing them with a readable error (so
    uvicorn's wait for open connections ends by itself), and the process exits 0, not by the signal."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.drain_task: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks

    async def shutdown(self, sockets=None):
        state = getattr(self.config.app, "state", None)
        if getattr(state, "llm", None) is not None:
            self.drain_task = asyncio.ensure_future(state.llm.drain(state.shutdown_grace_s))
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()  # handled: exit normally rather than re-raise it


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  **kw) -> uvicorn.Config:
    """The uvicorn config for `app`: uvicorn's own graceful wait outlasts the app's grace period."""
    grace = getattr(app.state, "shutdown_grace_s", 5.0)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=int(grace) + 10, **kw)


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now (before a model load of minutes), or raise OSError naming the
    address: the port in use, or the host unknown."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is outside 0..65535")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(llm: AsyncLLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits | None = None, log_level: str = "info", sock: socket.socket | None = None,
          shutdown_grace_s: float = 5.0) -> None:
    """Serve until SIGINT / SIGTERM. `sock`: a socket bound beforehand with `bind` (the CLI binds before
    loading the model, so a busy port is reported at once)."""
    app = build_app(llm, model_name, api_key, limits, shutdown_grace_s=shutdown_grace_s)
    server = Server(server_config(app, host, port, log_level))
    server.run(sockets=[sock] if sock is not None else None)
