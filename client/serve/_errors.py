"""pipeq's error tree as HTTP: the one table of status codes, and the one JSON body.

Every error the gateway answers is `{"error": {"type", "message", "job_id"?,
"deployment"?}}`, never a traceback: `type` is the pipeq error class (`Overloaded`), or
one of the gateway's own (`Unauthorized`, `Forbidden`, `NotFound`, `Conflict`,
`PayloadTooLarge`, `RateLimited`, `MethodNotAllowed`, `InternalError`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeq.errors import (
    BrokerUnavailable,
    InvalidRequest,
    ItemsFailed,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    ModelLoadError,
    NoLiveWorker,
    Overloaded,
    PipeqError,
    StreamRestarted,
    UnknownDeployment,
    UnknownJob,
)
from pipeq.serve import _openai

__all__ = [
    "RETRY_AFTER_S",
    "STATUS",
    "ApiError",
    "error_response",
    "install_handlers",
    "status_of",
]

log = logging.getLogger("pipeq.serve")

#: HTTP status of each pipeq error (the most specific class listed wins); the Hugging Face
#: routes answer JobFailed and JobLost with 424, as TGI does (`status_of(..., HF_STATUS)`)
STATUS: dict[type[PipeqError], int] = {
    InvalidRequest: 422,
    UnknownDeployment: 404,
    UnknownJob: 404,
    NoLiveWorker: 503,
    ModelLoadError: 503,
    BrokerUnavailable: 503,
    Overloaded: 429,
    JobFailed: 500,
    JobLost: 500,
    ItemsFailed: 500,
    JobTimeout: 504,
    JobCancelled: 409,
    JobExpired: 409,
    StreamRestarted: 409,
    PipeqError: 500,
}
#: where TGI differs: a job that ran and failed is a failed dependency
HF_STATUS: dict[type[PipeqError], int] = {JobFailed: 424, JobLost: 424}
#: `Retry-After` (s) with each status that says "try again later"
RETRY_AFTER_S: dict[int, int] = {429: 1, 503: 5}


class ApiError(Exception):
    """An HTTP error of the gateway's own (not a pipeq error): status, type, message."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        job_id: str | None = None,
        deployment: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.job_id = job_id
        self.deployment = deployment
        self.retry_after_s = retry_after_s


def status_of(exc: PipeqError, overrides: Mapping[type[PipeqError], int] | None = None) -> int:
    """The HTTP status of a pipeq error: `overrides` first, then `STATUS`, by the class's
    method resolution order (a subclass not listed takes its parent's)."""
    for cls in type(exc).__mro__:
        if overrides and cls in overrides:
            return overrides[cls]
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(
    type_: str, message: str, job_id: str | None = None, deployment: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if job_id:
        error["job_id"] = job_id
    if deployment:
        error["deployment"] = deployment
    return {"error": error}


def _retry_headers(status: int, retry_after_s: float | None = None) -> dict[str, str]:
    seconds = retry_after_s if retry_after_s is not None else RETRY_AFTER_S.get(status)
    return {} if seconds is None else {"Retry-After": str(max(1, round(seconds + 0.499)))}


def error_response(
    exc: BaseException, overrides: Mapping[type[PipeqError], int] | None = None
) -> JSONResponse:
    """The JSON response for an error: a PipeqError by `STATUS` (+ `Retry-After` for 429
    and 503), an ApiError as it says, anything else 500 with no detail (logged)."""
    if isinstance(exc, ApiError):
        body = error_body(exc.type, exc.message, exc.job_id, exc.deployment)
        headers = _retry_headers(exc.status, exc.retry_after_s)
        return JSONResponse(body, status_code=exc.status, headers=headers)
    if isinstance(exc, PipeqError):
        status = status_of(exc, overrides)
        body = error_body(type(exc).__name__, exc.message, exc.job_id, exc.deployment)
        return JSONResponse(body, status_code=status, headers=_retry_headers(status))
    log.error("internal error: %s", type(exc).__name__, exc_info=exc)
    body = error_body("InternalError", "the gateway failed to answer; see its log")
    return JSONResponse(body, status_code=500)


_HTTP_TYPES = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidRequest",
    429: "RateLimited",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    """Every error the app raises answers with the one JSON body."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        overrides = getattr(request.state, "status_overrides", None)
        return error_response(exc, overrides)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(ApiError(422, "InvalidRequest", _validation_message(exc)))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = _HTTP_TYPES.get(exc.status_code, "HTTPError")
        message = exc.detail if isinstance(exc.detail, str) else kind
        response = error_response(ApiError(exc.status_code, kind, message))
        if request.url.path.startswith(_openai.OPENAI_PATHS):  # no route of OpenAI's took
            # it (404, 405): OpenAI's envelope all the same, as `routes_openai` answers
            body = _openai.error_envelope(exc.status_code, message, kind)
            response = JSONResponse(body, exc.status_code, {"x-should-retry": "false"})
        response.headers.update(exc.headers or {})
        return response

    async def on_redis(request: Request, exc: Exception) -> JSONResponse:
        # a Redis call no route turned into its own 503 (files, batches): the same answer
        said = f"Redis did not answer ({type(exc).__name__})"
        error = ApiError(503, "BrokerUnavailable", said, retry_after_s=5)
        return error_response(error, getattr(request.state, "status_overrides", None))

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # the client left: nobody reads this, nothing to log

    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(redis.RedisError, on_redis)
    app.add_exception_handler(TimeoutError, on_redis)  # `Gateway.bounded`'s
    app.add_exception_handler(PipeqError, on_error)
    app.add_exception_handler(ApiError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
