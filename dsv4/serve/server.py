"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every failure a client can cause is an OpenAI-style 4xx that fails that request only; a client that
disconnects aborts its request (freeing its cache); a full queue answers 429; an optional API key
guards /v1; shutdown lets in-flight requests finish for a grace period, then fails the rest cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

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


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, limits: ServeLimits | None = None,
              shutdown_grace_s: float = 30.0) -> FastAPI:
    serving = OpenAIServing(llm, model_name, limits)
    metrics = ServerMetrics(llm.engine)
    serving.on_finish = metrics.observe

    @asynccontextmanager
    async def lifespan(app):
        yield
        await llm.shutdown(timeout=shutdown_grace_s)

    app = FastAPI(title="dsv4", lifespan=lifespan)
    app.state.serving, app.state.metrics = serving, metrics

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
        if llm._stop:
            return _error(503, "the engine is shut down", "service_unavailable")
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
            return StreamingResponse(serving.completions_stream(r, setup), media_type="text/event-stream")
        return await _until_disconnect(request, serving.completions(r))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        r = await _parse(request, ChatCompletionRequest)
        if r.stream:
            setup = serving._chat_setup(r)
            return StreamingResponse(serving.chat_stream(r, setup), media_type="text/event-stream")
        return await _until_disconnect(request, serving.chat(r))

    return app


def serve(llm: AsyncLLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits | None = None, log_level: str = "info") -> None:
    import uvicorn

    app = build_app(llm, model_name, api_key, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=35)
