"""pipeq's native asynchronous jobs, the contract for any language:

POST /v1/jobs                  submit: 202 + the job (Location, Retry-After);
                               `Prefer: wait=N` (N <= 60): 200 once done within N s
PUT  /v1/jobs/{id}             the same with the caller's own id: idempotent
GET  /v1/jobs/{id}             the job (Retry-After while queued or running)
GET  /v1/jobs/{id}/result      the pipeline's result (200), or 202 not yet (?wait=S)
POST /v1/jobs/{id}/cancel      200 cancelled; 409 when it can no longer be
GET  /v1/jobs/{id}/events      server-sent events from the job's Redis Stream
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeq._client import JobState
from pipeq.serve._app import CallerDep, GatewayDep
from pipeq.serve._auth import Caller
from pipeq.serve._errors import ApiError, error_response
from pipeq.serve._jobs import (
    MAX_WAIT_S,
    POLL_AFTER_S,
    Gateway,
    JobView,
    digest_of,
    parse_json,
    valid_job_id,
)

router = APIRouter(prefix="/v1", tags=["jobs"])


class JobRequest(BaseModel):
    """A job to run: by `deployment`, or by `task` (and `model`: the deployment of that
    task serving exactly that model)."""

    model_config = ConfigDict(extra="forbid")

    deployment: str | None = Field(None, description="a deployment's name")
    task: str | None = Field(None, description="a task; its default deployment runs it")
    model: str | None = Field(None, description="with `task`: the deployment serving it")
    inputs: Any = Field(description="what the pipeline takes: a text, a list, a dict")
    params: dict[str, Any] = Field(default_factory=dict, description="the pipeline's kwargs")
    expires: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="seconds by which it must have started"
    )
    priority: Literal["high", "normal", "low"] = Field(
        "normal", description="high jobs are taken and batched before normal, normal before low"
    )
    webhook: str | None = Field(
        None,
        max_length=2048,
        description="a URL (in the gateway's allowlist) that the job's events are POSTed to",
    )
    webhook_events_filter: list[Literal["start", "output", "completed"]] | None = Field(
        None, min_length=1, description="which events go to `webhook` (default: completed)"
    )


_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": JobRequest.model_json_schema()}},
    }
}
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)", re.IGNORECASE)


async def job_request(request: Request, *, digest: bool = False) -> tuple[JobRequest, str]:
    """The body as a JobRequest, and (`digest`) its digest, for idempotent PUT; 422
    otherwise."""
    body = parse_json(await request.body())
    try:
        job = JobRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "InvalidRequest", f"{where}: {first.get('msg')}") from None
    if (job.deployment is None) == (job.task is None):
        raise ApiError(422, "InvalidRequest", "name one of `deployment` or `task`")
    if job.deployment is not None and job.model is not None:
        raise ApiError(422, "InvalidRequest", "`model` goes with `task`, not `deployment`")
    if job.webhook_events_filter is not None and job.webhook is None:
        raise ApiError(422, "InvalidRequest", "`webhook_events_filter` goes with `webhook`")
    return job, digest_of(body) if digest else ""


def prefer_wait(prefer: str | None) -> float:
    """`Prefer: wait=N` (RFC 7240) in seconds, at most MAX_WAIT_S; 0 without it."""
    found = _PREFER_WAIT.search(prefer or "")
    return min(MAX_WAIT_S, float(found.group(1))) if found else 0.0


def job_response(view: JobView, status: int, **headers: str) -> JSONResponse:
    if not view.status.done:
        headers.setdefault("Retry-After", str(POLL_AFTER_S))
    return JSONResponse(view.as_json(), status_code=status, headers=headers)


async def _submit(
    gw: Gateway,
    who: Caller,
    job: JobRequest,
    digest: str,
    prefer: str | None,
    job_id: str | None = None,
) -> Response:
    wait = prefer_wait(prefer)
    view, created = await gw.submit(
        who,
        job.deployment or job.task or "",
        job.inputs,
        model=job.model,
        params=job.params,
        expires=job.expires,
        job_id=job_id,
        digest=digest,
        wait_s=wait,
        webhook=job.webhook,
        webhook_events=tuple(dict.fromkeys(job.webhook_events_filter or ["completed"])),
        priority=job.priority,
    )
    if wait and not created:  # a repeated PUT: the job may be done by now
        view = await _waiting(gw, view, wait)
    headers = {"Location": view.urls()["self"]}
    if wait:
        headers["Preference-Applied"] = f"wait={wait:g}"
    return job_response(view, 200 if view.status.done or not created else 202, **headers)


async def _waiting(gw: Gateway, view: JobView, wait_s: float) -> JobView:
    gw.metrics.waiting.inc()
    try:
        return await gw.wait(view, wait_s)
    finally:
        gw.metrics.waiting.dec()


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit a job",
    openapi_extra=_BODY,
    responses={200: {"description": "done within `Prefer: wait`"}},
)
async def submit_job(
    request: Request,
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    prefer: str | None = Header(None, description="`wait=N`: answer once done, N <= 60 s"),
) -> Response:
    job, digest = await job_request(request)
    return await _submit(gw, who, job, digest, prefer)


@router.put(
    "/jobs/{job_id}",
    status_code=202,
    summary="Submit a job with your own id (idempotent)",
    openapi_extra=_BODY,
    responses={
        200: {"description": "this id and body were submitted before: the job"},
        409: {"description": "this id was submitted with another body"},
    },
)
async def put_job(
    job_id: str,
    request: Request,
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    prefer: str | None = Header(None),
) -> Response:
    valid_job_id(job_id)
    job, digest = await job_request(request, digest=True)
    return await _submit(gw, who, job, digest, prefer, job_id=job_id)


@router.get("/jobs/{job_id}", summary="A job's status (and result once done)")
async def get_job(job_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Response:
    view = await gw.read(job_id, who)
    return job_response(view, 200)


@router.get(
    "/jobs/{job_id}/result",
    summary="A job's result, in the pipeline's own shape",
    responses={202: {"description": "not done yet (the job object)"}},
)
async def get_result(
    job_id: str,
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    wait: float = Query(0.0, ge=0, le=MAX_WAIT_S, description="wait up to this many seconds"),
) -> Response:
    view = await gw.read(job_id, who)
    if wait:
        view = await _waiting(gw, view, wait)
    if view.status is JobState.SUCCEEDED:
        return JSONResponse(view.result)
    if view.error is not None:
        return error_response(view.error)
    return job_response(view, 202, Location=view.urls()["self"])


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a job",
    responses={409: {"description": "it can no longer be cancelled"}},
)
async def cancel_job(job_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Response:
    view = await gw.read(job_id, who)
    outcome = await gw.cancel(view)
    if outcome == "cancelled":
        return job_response(await gw.read(job_id, where=view), 200)
    why = {
        "running": "its forward pass has begun: it will finish",
        "finished": "it is finished",
    }.get(outcome, "it is not known")
    raise ApiError(409, "Conflict", f"the job cannot be cancelled: {why}", job_id=job_id)


@router.get(
    "/jobs/{job_id}/events",
    summary="The job's events, as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    last_event_id: str | None = Header(None),
) -> Response:
    view = await gw.read(job_id, who)
    last = _stream_id(last_event_id) if last_event_id else None
    return StreamingResponse(
        _events(gw, view, last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _stream_id(text: str) -> str:
    if not re.fullmatch(r"\d{1,20}-\d{1,20}", text.strip()):
        raise ApiError(422, "InvalidRequest", "Last-Event-ID must be an event id sent before")
    return text.strip()


def _sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()


async def _events(gw: Gateway, view: JobView, last: str | None) -> AsyncIterator[bytes]:
    """start / restart (a new attempt: its worker died), output {item, text}, each with
    its stream entry's id as the SSE id; then completed (the job: status, result or
    error). A comment every keepalive_s while nothing else is sent. A client that goes
    away ends only this generator: the job runs on."""
    said = _Said(await gw.attempts_before(view, last) if last else 0, last or "0-0")
    async for chunk in gw.follow(view, said):
        yield chunk
    assert said.view is not None
    yield _sse("completed", said.view.as_json())


class _Said:
    """Where a reader of a job's stream is: its last entry, the attempts seen."""

    def __init__(self, attempts: int, cursor: str) -> None:
        self.attempts = attempts
        self.cursor = cursor
        self.view: JobView | None = None  # the ended job's (Gateway.follow)

    def events(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> list[bytes]:
        out = []
        for entry_id, fields in entries:
            self.cursor = entry_id
            if b"start" in fields:
                self.attempts += 1
                kind = "start" if self.attempts == 1 else "restart"
                out.append(_sse(kind, {"attempt": self.attempts}, entry_id))
            elif b"t" in fields:
                item = int(fields.get(b"i", b"0"))
                out.append(_sse("output", {"item": item, "text": fields[b"t"].decode()}, entry_id))
        return out


__all__ = ["JobRequest", "router"]
