"""Hugging Face's inference format: `POST /models/{m}` (what `InferenceClient` and
`@huggingface/inference` send to an endpoint URL), text-generation as TGI answers it.

    POST /models/{m}                      {"inputs", "parameters"} -> the task's result
    POST /models/{m}/pipeline/{task}      the same (the Inference API's feature-extraction
                                          route); `task` must be the deployment's
    text-generation with "stream": true   TGI's server-sent token events

`{m}` is a deployment's name, or a model one deployment serves exactly (a Hub id, its
legacy org-less name, the `hub_id` a local checkpoint declares). The answer waits for
the job (up to `SYNC_WAIT_S`, then 504; the job goes on); `X-Pipeq-Job-Id` names it, for
the native routes (`/v1/jobs/{id}`: follow it, cancel it). Errors are TGI's body
(`_hf.tgi_error`) with pipeq's status table, but a job that ran and failed is 424 as in
TGI, and a bad request is always 422: a 400 makes `InferenceClient` stop sending its
text-generation parameters to that URL (and refuse `stream=True`) for the rest of the
process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from pipeq import _tasks
from pipeq._redis import masked
from pipeq._registry import Announced
from pipeq.errors import PipeqError, StreamRestarted, UnknownDeployment
from pipeq.serve import _hf
from pipeq.serve._app import GatewayDep, caller
from pipeq.serve._auth import Caller
from pipeq.serve._errors import HF_STATUS, ApiError, error_response
from pipeq.serve._jobs import Gateway, Hub, JobView, parse_json

__all__ = ["JOB_HEADER", "SYNC_WAIT_S", "router"]

router = APIRouter(tags=["hugging face"])

#: the header that names the job a request ran (follow or cancel it at /v1/jobs/{id})
JOB_HEADER = "X-Pipeq-Job-Id"
#: the longest a `/models/{m}` request waits for its job before 504 (the job goes on)
SYNC_WAIT_S = 300.0
#: TGI's `error_type` of the gateway's own errors
_API_ERROR_TYPES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "validation",
    415: "validation",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
}

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "inputs": {"description": "what the task's pipeline takes"},
                        "parameters": {"type": "object"},
                        "stream": {"type": "boolean", "description": "text-generation"},
                    },
                }
            }
        },
    }
}


def hf_error(exc: BaseException) -> Response:
    """An error as TGI answers it: `{"error": message, "error_type": kind, "type", ...}`
    with pipeq's status (424 for a job that failed) and `Retry-After` where it applies;
    anything else as the gateway answers it (500, logged, no detail)."""
    response: Response = error_response(exc, HF_STATUS)
    if isinstance(exc, PipeqError):
        body = _hf.tgi_error(exc)
    elif isinstance(exc, ApiError):
        body = {"error": exc.message, "error_type": _API_ERROR_TYPES.get(exc.status, "unknown")}
        body["type"] = exc.type
        if exc.job_id:
            body["job_id"] = exc.job_id
    else:
        return response
    retry = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return JSONResponse(body, status_code=response.status_code, headers=retry)


def _down(hubs: list[Hub]) -> ApiError:
    said = ", ".join(masked(hub.url) for hub in hubs)
    return ApiError(503, "BrokerUnavailable", f"Redis at {said} did not answer", retry_after_s=5)


async def _deployments(gw: Gateway) -> dict[str, Announced]:
    """Every Redis' deployments; those of a Redis that does not answer are left out
    (503 when none answers)."""
    found, down = await gw.deployments()
    if down and len(down) == len(gw.hubs):
        raise _down(down)
    return found


async def find(gw: Gateway, m: str) -> Announced:
    """The deployment `m` names (`_hf.find_deployment`) on any Redis; 503 rather than
    UnknownDeployment when a Redis that does not answer may hold it."""
    found, down = await gw.deployments(m)
    try:
        return _hf.find_deployment(found, m)
    except UnknownDeployment:
        if down:
            raise _down(down) from None
        raise


async def _answer(gw: Gateway, who: Caller, m: str, request: Request, task: str | None) -> Response:
    target = await find(gw, m)
    if task is not None and _tasks.canonical_task(task) != target.canonical_task:
        raise ApiError(
            422,
            "InvalidRequest",
            f"{target.name} serves {target.task}, not {task}",
        )
    hf = _hf.split_request(target.task, parse_json(await request.body()))
    wait_s = 0.0 if hf.stream else SYNC_WAIT_S  # watched from before the send
    view, _ = await gw.submit(who, target.name, hf.inputs, params=hf.params, wait_s=wait_s)
    if hf.stream:
        prompt = hf.inputs if isinstance(hf.inputs, str) else ""
        return StreamingResponse(
            _tgi_events(gw, view, hf, prompt),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_HEADER: view.id},
        )
    result = await gw.outcome(view, SYNC_WAIT_S)
    pieces = await _streamed(gw, view) if hf.details else None
    return JSONResponse(_hf.to_hf(target.task, hf, result, pieces), headers={JOB_HEADER: view.id})


async def _streamed(gw: Gateway, view: JobView) -> dict[int, list[str]]:
    """The pieces of text a done text-generation job's stream holds, by prompt index,
    of its last attempt."""
    pieces: dict[int, list[str]] = {}
    for _, fields in await gw.stream_entries(view, "0-0", None):
        if b"start" in fields:
            pieces = {}
        elif b"t" in fields:
            pieces.setdefault(int(fields.get(b"i", b"0")), []).append(fields[b"t"].decode())
    return pieces


@router.post(
    "/models/{m:path}",
    summary="Run a deployment in Hugging Face's inference format",
    openapi_extra=_BODY,
    responses={
        200: {"description": "the task's result, as Hugging Face's clients read it"},
        422: {"description": "not a request for this task (TGI's error body)"},
        424: {"description": "the job ran and failed (TGI's error body)"},
    },
)
async def run_model(m: str, request: Request, gw: Gateway = GatewayDep) -> Response:
    task = None
    head, sep, tail = m.rpartition("/pipeline/")
    if sep and _tasks.is_task(tail):  # /models/{m}/pipeline/{task}
        m, task = head, tail
    try:
        # the caller here, not as a dependency: a 401 or a rate limit's 429 is TGI's body
        # too (InferenceClient raises OverloadedError for it)
        who = await caller(request)
        return await _answer(gw, who, m, request, task)
    except (PipeqError, ApiError) as e:
        return hf_error(e)


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _tgi_events(
    gw: Gateway, view: JobView, hf: _hf.HFRequest, prompt: str
) -> AsyncIterator[bytes]:
    """TGI's `/generate_stream` events from the job's Redis Stream (`Gateway.follow`):
    one event a piece of text as the worker streams it (`_Tokens`); a job the dynamic
    batcher runs comes as one piece when done. An error after the stream began is TGI's
    `{"error", "error_type"}` event."""
    tokens = _Tokens(hf, view)
    try:
        async for chunk in gw.follow(view, tokens):
            yield chunk
        assert tokens.view is not None
        yield tokens.last(tokens.view, prompt)
    except PipeqError as e:
        yield _sse(_hf.tgi_error(e))


class _Tokens:
    """A TGI stream's reader of a job's stream entries (prompt 0 of its last attempt):
    each piece is sent when the next one comes, so that the last can carry
    `generated_text`; StreamRestarted if a restarted attempt makes other text."""

    def __init__(self, hf: _hf.HFRequest, view: JobView) -> None:
        self.hf = hf
        self.job = view
        self.view: JobView | None = None  # the ended job's (Gateway.follow)
        self.cursor = "0-0"
        self.attempt = ""  # the text of the attempt running now
        self.said = ""  # the text sent in events
        self.held: str | None = None  # the newest piece, not sent yet
        self.index = 0

    def _restarted(self) -> StreamRestarted:
        return StreamRestarted(
            "the job restarted on another worker and made other text",
            job_id=self.job.id,
            deployment=self.job.deployment,
        )

    def events(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> list[bytes]:
        out = []
        for entry_id, fields in entries:
            self.cursor = entry_id
            if b"start" in fields:
                self.attempt = ""
            elif b"t" in fields and int(fields.get(b"i", b"0")) == 0:
                self.attempt += fields[b"t"].decode()
                sofar = self.said + (self.held or "")
                if not (self.attempt.startswith(sofar) or sofar.startswith(self.attempt)):
                    raise self._restarted()
                if len(self.attempt) > len(sofar):
                    if self.held is not None:
                        out.append(_sse(_hf.stream_event(self.hf, self.index, self.held)))
                        self.index, self.said = self.index + 1, self.said + self.held
                    self.held = self.attempt[len(self.said) :]
        return out

    def last(self, view: JobView, prompt: str) -> bytes:
        """The final event: the rest of the text, `generated_text` and `details`; the
        job's error if it has one."""
        if view.error is not None:
            raise view.error
        text = _generated_text(view.result)
        if not text.startswith(self.said):
            raise self._restarted()
        rest = text[len(self.said) :]
        return _sse(_hf.stream_event(self.hf, self.index, rest, final_text=text, prompt=prompt))


def _generated_text(result: Any) -> str:
    """One prompt's text: [{"generated_text": ...}, ...] -> the first sequence's."""
    record = result[0] if isinstance(result, list) and result else result
    text = record.get("generated_text", "") if isinstance(record, dict) else ""
    return text if isinstance(text, str) else ""
