"""`create_app`: the gateway's ASGI app, its middleware (body cap, metrics, access log)
and the dependencies every router uses (`gateway`, `caller`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request

from pipeq.serve import _openai
from pipeq.serve._auth import Caller, identify
from pipeq.serve._errors import ApiError, error_body, install_handlers
from pipeq.serve._jobs import Gateway, Settings
from pipeq.serve._metrics import Metrics

__all__ = ["CallerDep", "GatewayDep", "caller", "create_app", "gateway"]

access_log = logging.getLogger("pipeq.serve.access")


class GatewayMiddleware:
    """Pure ASGI (streams pass through untouched): refuses a body over the limit before
    reading it whole (413), counts and times each request, and logs one line per
    request: method, path, status, milliseconds, caller name. Never a body, a query's
    value or a header (keys travel in `Authorization`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state if "app" in scope else None
        started = time.perf_counter()
        status = 500
        gw: Gateway | None = getattr(state, "gateway", None)
        limit = await gw.body_limit() if gw is not None else 0
        length = _content_length(scope)

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if limit and length is not None and length > limit:
            await _refuse(scope, sending, limit)
        else:
            seen = 0

            async def receiving() -> dict[str, Any]:
                nonlocal seen
                message: dict[str, Any] = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if limit and seen > limit:
                        raise ApiError(413, "PayloadTooLarge", too_large(scope["path"], limit))
                return message

            await self.app(scope, receiving if limit else receive, sending)
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        elapsed = time.perf_counter() - started
        metrics: Metrics | None = getattr(state, "metrics", None) if state is not None else None
        if metrics is not None:
            metrics.requests.labels(template, scope["method"], str(status)).inc()
            metrics.latency.labels(template).observe(elapsed)
        access_log.info(
            "%s %s %d %.1fms %s",
            scope["method"],
            scope["path"],
            status,
            elapsed * 1000,
            scope.get("pipeq_caller", "-"),
        )


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(path: str, limit: int) -> str:
    """The 413's message: what is over the limit, and what sets the limit."""
    what = "the file is" if path.rstrip("/") == "/v1/files" else "the body is"
    return (
        f"{what} over the gateway's body limit ({limit} bytes: by default the largest "
        "limits.request_bytes of the deployments plus 64 KiB; pipeq serve --max-body-bytes)"
    )


async def _refuse(scope: dict[str, Any], send: Any, limit: int) -> None:
    message = too_large(scope["path"], limit)
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if scope["path"].startswith(_openai.OPENAI_PATHS):  # as OpenAI's routes answer (routes_openai)
        envelope = _openai.error_envelope(413, message, "PayloadTooLarge")
        headers.append((b"x-should-retry", b"false"))
    else:
        envelope = error_body("PayloadTooLarge", message)
    body = json.dumps(envelope).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- dependencies --------------------------------------------------------------------
async def gateway(request: Request) -> Gateway:
    """The process's Gateway (made at startup). Async: FastAPI runs a plain function
    dependency in a thread, a hop per request."""
    gw: Gateway = request.app.state.gateway
    return gw


async def caller(request: Request) -> Caller:
    """The request's caller (401 without a valid key; with none configured, 401 off
    loopback), after its rate limit (429)."""
    gw: Gateway = request.app.state.gateway
    who = identify(request, gw.keys)
    request.scope["pipeq_caller"] = who.name
    await gw.check_rate(who)
    return who


GatewayDep = Depends(gateway)
CallerDep = Depends(caller)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's ASGI app: native jobs (`/v1/jobs`), Hugging Face's inference format
    (`/models/{m}`), OpenAI's routes and Batch API (`/v1/models`, `/v1/completions`,
    `/v1/chat/completions`, `/v1/embeddings`, `/v1/files`, `/v1/batches`), operations
    (`/health`, `/ready`, `/metrics`), `/docs`."""
    from pipeq.serve import routes_batches, routes_hf, routes_jobs, routes_openai, routes_ops

    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway(settings, app.state.metrics)
        await gw.start()
        app.state.gateway = gw
        runner = routes_batches.make_runner(gw)  # runs batches, this process's and orphans
        await runner.start()
        app.state.batch_runner = runner
        try:
            yield
        finally:
            await runner.close()
            await gw.close()

    app = FastAPI(
        title="pipeq",
        summary="Hugging Face pipelines as asynchronous jobs, over HTTP",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.metrics = Metrics()
    install_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_hf.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_ops.router)
    app.add_middleware(GatewayMiddleware)
    return app


def _version() -> str:
    from pipeq import __version__

    return __version__
