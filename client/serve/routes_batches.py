"""OpenAI's Files and Batch API (`_batches` holds the state and the runner):

    POST   /v1/files                 multipart `file` + `purpose` ("batch"): a JSONL file
                                     of at most FILE_MAX_LINES lines, and bytes under the
                                     gateway's body limit
    GET    /v1/files                 the key's files, newest first (?purpose=&after=&limit=
                                     &order=asc|desc; OpenAI's cursor page)
    GET    /v1/files/{id}            the file object
    GET    /v1/files/{id}/content    the file itself (input, output or error JSONL)
    DELETE /v1/files/{id}
    POST   /v1/batches               {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches/{id}          status (validating, in_progress, finalizing,
                                     completed, failed, expired, cancelling, cancelled)
                                     and request_counts
    GET    /v1/batches               the key's batches, newest first (?after=&limit=; an
                                     `after` not in the list: 400)
    POST   /v1/batches/{id}/cancel   cancelling, then cancelled once its jobs ended

Each line `{"custom_id", "method": "POST", "url": <endpoint>, "body"}` is one pipeq job
run by the routes' own code, with `expires` at the batch's deadline; its answer is one
line of the output file (`{"id", "custom_id", "response": {"status_code", "request_id"
(the job id), "body"}, "error": null}`), or of the error file: a request the route
refused or whose job failed (`response` with its error), or a line not in the format
or that the batch's deadline or cancel ended before it finished (`error`: invalid_line,
batch_expired, batch_cancelled; `_batches.stopped_error`). Files and batches belong to
the API key that made them.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeq.errors import InvalidRequest, PipeqError
from pipeq.serve import _batches, _openai
from pipeq.serve._app import CallerDep, GatewayDep
from pipeq.serve._auth import Caller
from pipeq.serve._batches import _TRANSIENT, BatchStore, Runner
from pipeq.serve._errors import ApiError
from pipeq.serve._jobs import Gateway, JobView
from pipeq.serve.routes_hf import SYNC_WAIT_S
from pipeq.serve.routes_openai import (
    OpenAIRoute,
    answer_generation,
    chat_request,
    completion_request,
    openai_error,
    run_embeddings,
    target_of,
)

__all__ = ["BatchRequest", "make_runner", "router", "run_line"]

router = APIRouter(prefix="/v1", tags=["openai batch"], route_class=OpenAIRoute)

#: a line's wait for its job beyond the batch's deadline: the runner cancels or expires
#: the job at the deadline first, so the line ends as expired, not as a timeout (s)
_PAST_DEADLINE_S = 5.0


class BatchRequest(BaseModel):
    """`POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


async def run_line(
    gw: Gateway,
    who: Caller,
    endpoint: str,
    body: dict[str, Any],
    job_id: str,
    expires_s: float,
    digest: str,
) -> tuple[int, Any, JobView | None]:
    """One batch line through the route's own code, as job `job_id` (idempotent with
    `digest`): (HTTP status, the route's response body, the job). Raises the errors that
    pass (no live worker, a full queue, Redis away) only before the job was sent."""
    view: JobView | None = None
    submit: dict[str, Any] = {
        "job_id": job_id,
        "expires": max(expires_s, 0.001),
        "digest": digest,
        "wait_s": min(SYNC_WAIT_S * 100, expires_s + _PAST_DEADLINE_S),
        # a batch is bulk work: its lines wait behind interactive requests (docs/scale.md)
        "priority": "low",
    }
    try:
        if body.get("stream"):
            raise InvalidRequest("stream: a batch line is answered whole")
        if endpoint == "/v1/embeddings":
            request = _openai.EmbeddingRequest.model_validate(body)
            target = await target_of(gw, request.model, "feature-extraction", endpoint)
            answer, view = await run_embeddings(gw, who, target, request, **submit)
            return 200, answer, view
        if endpoint == "/v1/completions":
            completion = _openai.CompletionRequest.model_validate(body)
            target = await target_of(gw, completion.model, "text-generation", endpoint)
            gen = completion_request(completion, target.name)
        else:
            chat = _openai.ChatRequest.model_validate(body)
            target = await target_of(gw, chat.model, "text-generation", endpoint)
            gen = chat_request(chat, target.name)
        submit["priority"] = gen.priority or submit["priority"]  # a line's own service_tier
        view, _ = await gw.submit(who, target.name, gen.inputs, params=gen.params, **submit)
        return 200, await answer_generation(gw, gen, view), view
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where or 'body'}: {first.get('msg')}"
        return 400, _openai.error_envelope(400, message, "InvalidRequest", where or None), view
    except (PipeqError, ApiError) as e:
        transient = isinstance(e, _TRANSIENT) or (
            isinstance(e, ApiError) and e.status in (429, 503)
        )
        if view is None and transient:
            raise
        response = openai_error(e)
        return response.status_code, json.loads(bytes(response.body)), view


def make_runner(gw: Gateway) -> Runner:
    """The gateway process's batch runner (started with the app)."""
    return Runner(gw, run_line)


# -- files -----------------------------------------------------------------------------
@router.post("/files", summary="Upload a batch's input file (JSONL)")
async def create_file(
    file: Annotated[UploadFile, File(description="JSONL, one request a line")],
    purpose: Annotated[str, Form(description="'batch'")],
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
) -> Any:
    if purpose != "batch":
        raise ApiError(400, "InvalidRequest", "purpose: this gateway takes 'batch' files only")
    content = await file.read()
    lines = _batches.parse_lines(content)
    return await BatchStore(gw).put_file(
        who.name, file.filename or "input.jsonl", purpose, content, len(lines)
    )


def list_page(found: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's cursor page of `found`, up to `limit + 1` objects (one more: `has_more`)."""
    data = found[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(found) > limit,
    }


@router.get("/files", summary="The key's files, newest first unless order=asc")
async def list_files(
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    purpose: str | None = Query(None),
    after: str | None = Query(None, description="the page after this file id"),
    limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = Query("desc", description="by created_at"),
) -> Any:
    found = await BatchStore(gw).files(who.name, purpose, after, limit + 1, order == "desc")
    return list_page(found, limit)


@router.get("/files/{file_id}", summary="A file's object")
async def get_file(file_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    return _batches.file_object(file_id, await BatchStore(gw).file(who.name, file_id))


@router.get("/files/{file_id}/content", summary="A file's content")
async def get_file_content(
    file_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep
) -> Response:
    data = await BatchStore(gw).content(who.name, file_id)
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    await BatchStore(gw).delete_file(who.name, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# -- batches -------------------------------------------------------------------------
@router.post("/batches", summary="Run a file of requests as a batch")
async def create_batch(
    body: BatchRequest, request: Request, who: Caller = CallerDep, gw: Gateway = GatewayDep
) -> Any:
    store = BatchStore(gw)
    record = await store.file(who.name, body.input_file_id)
    if record.get(b"purpose") != b"batch":
        raise ApiError(400, "InvalidRequest", "input_file_id: not a file of purpose 'batch'")
    window_s = _batches.parse_window(body.completion_window)
    seconds, _ = await gw.aredis.time()
    now = int(seconds)
    batch_id = "batch_" + uuid.uuid4().hex
    doc: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": body.endpoint,
        "errors": None,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + int(window_s),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": int(record.get(b"lines", b"0")), "completed": 0, "failed": 0},
        "metadata": body.metadata,
    }
    runner: Runner = request.app.state.batch_runner
    created = await store.create(who, doc, runner.me)
    runner.adopt(batch_id)
    return created


@router.get("/batches/{batch_id}", summary="A batch")
async def get_batch(batch_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    return await BatchStore(gw).batch(who.name, batch_id)


@router.get("/batches", summary="The key's batches, newest first")
async def list_batches(
    who: Caller = CallerDep,
    gw: Gateway = GatewayDep,
    after: str | None = Query(None),
    limit: int = Query(20, ge=1, le=100),
) -> Any:
    found = await BatchStore(gw).batches(who.name, after, limit + 1)
    return list_page(found, limit)


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(batch_id: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    return await BatchStore(gw).cancel(who.name, batch_id)
