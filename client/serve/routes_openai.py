"""OpenAI's routes (what the `openai` clients, and libraries built on them, send to a
`base_url`), each request one pipeq job:

    GET  /v1/models                 each deployment the key may use, with its Hub id
    GET  /v1/models/{model}         one of them
    POST /v1/completions            text-generation deployments (`_openai` for the fields)
    POST /v1/chat/completions       text-generation, through the model's chat template
    POST /v1/embeddings             feature-extraction, pooled as the deployment announces

`model` is a deployment's name, or a model one deployment serves exactly (as on
`/models/{m}`). A request waits for its job (up to `SYNC_WAIT_S`, then 504; the job goes
on); `X-Pipeq-Job-Id` names it, and a completion's `id` is `cmpl-<job id>` (chat:
`chatcmpl-<job id>`). `stream: true` answers server-sent chunks as the worker streams
the text (greedy decoding under continuous batching: about a token a chunk; other jobs
in one chunk when done), then `data: [DONE]`; a client that goes away before the end
cancels the job. `usage` comes from the worker's tokenizer (the stream's `end` entry).
Every error is OpenAI's envelope (`_openai.error_envelope`), with `Retry-After` on 429
and 503 and `x-should-retry: false` on the others (`RETRYABLE`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeq._registry import Announced
from pipeq.errors import InvalidRequest, PipeqError, StreamRestarted, UnknownDeployment
from pipeq.serve import _openai
from pipeq.serve._app import CallerDep, GatewayDep
from pipeq.serve._auth import Caller
from pipeq.serve._errors import ApiError, error_response
from pipeq.serve._jobs import Gateway, JobView
from pipeq.serve.routes_hf import JOB_HEADER, SYNC_WAIT_S, _deployments, find

__all__ = [
    "Generation",
    "answer_generation",
    "chat_request",
    "completion_request",
    "openai_error",
    "router",
    "run_embeddings",
    "target_of",
]

log = logging.getLogger("pipeq.serve")

#: OpenAI answers a bad request 400 (pipeq's own routes: 422)
_OPENAI_STATUS: dict[type[PipeqError], int] = {InvalidRequest: 400}
#: the statuses a client should send again (after `Retry-After`): a full queue, no live
#: worker yet, Redis away. OpenAI's clients also retry 408, 409 and every 5xx unless told
#: `x-should-retry: false`, which every other error says: a retry would submit the job
#: again after it was cancelled, expired, failed or lost (three runs of a failing job at
#: the client's default `max_retries`), or after a 504 whose job goes on
RETRYABLE = (429, 503)
NO_RETRY = {"x-should-retry": "false"}


def openai_error(exc: BaseException) -> Response:
    """Any error as OpenAI's envelope, with pipeq's status (400 for a bad request) and
    `Retry-After` where it applies; `code` is pipeq's error class."""
    if isinstance(exc, RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(
            _openai.error_envelope(400, message, "InvalidRequest", where[0] if where else None),
            status_code=400,
            headers=NO_RETRY,
        )
    if isinstance(exc, StarletteHTTPException):
        exc = ApiError(exc.status_code, "HTTPError", str(exc.detail))
    response = error_response(exc, _OPENAI_STATUS)
    if isinstance(exc, ApiError):
        message, code = exc.message, exc.type
    elif isinstance(exc, PipeqError):
        message, code = exc.message, type(exc).__name__
    else:
        return response  # 500, logged, no detail
    param = "model" if isinstance(exc, UnknownDeployment) else None
    if isinstance(exc, UnknownDeployment):
        code = "model_not_found"
    status = response.status_code
    retry = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    body = _openai.error_envelope(status, message, code, param)
    return JSONResponse(body, status_code=status, headers={**retry, **_no_retry(status)})


def _no_retry(status: int) -> dict[str, str]:
    return {} if status in RETRYABLE else NO_RETRY


class OpenAIRoute(APIRoute):
    """A route whose every error, body validation and authentication included, answers
    in OpenAI's envelope (FastAPI's custom route class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                raise
            except Exception as e:
                return openai_error(e)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


# -- models --------------------------------------------------------------------------------
def _model(d: Announced) -> dict[str, Any]:
    return {
        "id": d.name,
        "object": "model",
        "created": 0,
        "owned_by": "pipeq",
        "task": d.task,
        "hub_id": d.info.get("hub_id") or d.model,
    }


@router.get("/models", summary="The deployments this key may use (OpenAI's models)")
async def list_models(who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    found = await _deployments(gw)
    return {
        "object": "list",
        "data": [_model(d) for name, d in sorted(found.items()) if who.may_use(name)],
    }


@router.get("/models/{model:path}", summary="One deployment (OpenAI's model)")
async def get_model(model: str, who: Caller = CallerDep, gw: Gateway = GatewayDep) -> Any:
    target = await find(gw, model)
    who.require(target.name)
    return _model(target)


async def target_of(gw: Gateway, model: str, task: str, route: str) -> Announced:
    target = await find(gw, model)
    if target.canonical_task != task:
        raise InvalidRequest(f"model {model!r} is a {target.task} deployment; {route} needs {task}")
    return target


# -- completions and chat ------------------------------------------------------------------
@dataclass
class Generation:
    """One completion or chat request in pipeq's terms, and how to answer it."""

    chat: bool
    model: str
    inputs: Any
    params: dict[str, Any]
    prompts: int
    n: int
    include_usage: bool = False
    stops: list[str] = field(default_factory=list)
    #: the level its service_tier names (`_openai.priority_of`), None: the route's own
    priority: str | None = None

    @property
    def live(self) -> bool:
        """Pieces streamed as they come (else the text at the end, cut at its stop)."""
        return self.n == 1 and not self.stops

    def object_id(self, job_id: str) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + job_id

    def choice(self, index: int, text: str | None, finish: str | None, first: bool) -> Any:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    def chunk(self, job_id: str, created: int, choices: list[Any], usage: Any = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.object_id(job_id),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return _sse(body)

    def answers(
        self, result: Any, counts: list[Any] | None
    ) -> tuple[list[tuple[str, str]], dict[str, int] | None]:
        """Each choice's (text, finish_reason), and `usage` (None without the worker's
        counts): "stop" at a stop string or the end of text, "length" at max_tokens."""
        texts = _openai.new_texts(result, self.prompts, self.n)
        out = []
        for k, text in enumerate(texts):
            cut, stopped = _openai.cut_at_stop(text, self.stops)
            made = _made(counts, k // self.n, k % self.n)
            full = made is not None and made >= self.params["max_new_tokens"]
            out.append((cut, "length" if full and not stopped else "stop"))
        return out, _usage(counts)


def _made(counts: list[Any] | None, prompt: int, seq: int) -> int | None:
    try:
        return int(counts[prompt][1][seq]) if counts else None
    except (IndexError, TypeError, ValueError):
        return None


def _usage(counts: list[Any] | None) -> dict[str, int] | None:
    if not counts:
        return None
    try:
        prompt = sum(int(c[0] or 0) for c in counts)
        made = sum(int(n) for c in counts for n in c[1])
    except (IndexError, TypeError, ValueError):
        return None
    return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def answer_generation(gw: Gateway, gen: Generation, view: JobView) -> Any:
    """The body OpenAI returns for a done completion or chat job."""
    result = await gw.outcome(view, SYNC_WAIT_S)
    answers, usage = gen.answers(result, await gw.token_counts(view))
    choices: list[Any] = []
    for k, (text, finish) in enumerate(answers):
        choice: dict[str, Any] = {"index": k, "finish_reason": finish, "logprobs": None}
        if gen.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    return {
        "id": gen.object_id(view.id),
        "object": "chat.completion" if gen.chat else "text_completion",
        "created": int(view.created_at or _openai.now_s()),
        "model": gen.model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def completion_request(body: _openai.CompletionRequest, target: str) -> Generation:
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if not prompts:
        raise InvalidRequest("prompt: at least one")
    return Generation(
        chat=False,
        model=target,
        inputs=body.prompt,
        params=_openai.generation_params(body),
        prompts=len(prompts) if isinstance(body.prompt, list) else 1,
        n=body.n,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        stops=_openai.stops_of(body),
        priority=_openai.priority_of(body.service_tier),
    )


def chat_request(body: _openai.ChatRequest, target: str) -> Generation:
    return Generation(
        chat=True,
        model=target,
        inputs=_openai.chat_inputs(body.messages),
        params=_openai.generation_params(body, body.max_completion_tokens),
        prompts=1,
        n=body.n,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        stops=_openai.stops_of(body),
        priority=_openai.priority_of(body.service_tier),
    )


async def _generate(
    gw: Gateway, who: Caller, target: Announced, gen: Generation, stream: bool
) -> Response:
    level = gen.priority or "normal"
    if not stream:
        view, _ = await gw.submit(
            who, target.name, gen.inputs, params=gen.params, wait_s=SYNC_WAIT_S, priority=level
        )
        return JSONResponse(await answer_generation(gw, gen, view), headers={JOB_HEADER: view.id})
    view, _ = await gw.submit(who, target.name, gen.inputs, params=gen.params, priority=level)
    return StreamingResponse(
        _chunks(gw, gen, view),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_HEADER: view.id},
    )


@router.post("/completions", summary="OpenAI's completions, on a text-generation deployment")
async def completions(
    body: _openai.CompletionRequest, who: Caller = CallerDep, gw: Gateway = GatewayDep
) -> Response:
    target = await target_of(gw, body.model, "text-generation", "/v1/completions")
    return await _generate(gw, who, target, completion_request(body, target.name), body.stream)


@router.post("/chat/completions", summary="OpenAI's chat, through the model's chat template")
async def chat_completions(
    body: _openai.ChatRequest, who: Caller = CallerDep, gw: Gateway = GatewayDep
) -> Response:
    target = await target_of(gw, body.model, "text-generation", "/v1/chat/completions")
    return await _generate(gw, who, target, chat_request(body, target.name), body.stream)


class _Deltas:
    """A chunk stream's reader of a job's stream entries (`Gateway.follow`): each new
    piece of text of an item becomes a chunk of that choice; StreamRestarted if a
    restarted attempt makes other text than was sent."""

    def __init__(self, gen: Generation, view: JobView, created: int) -> None:
        self.gen, self.job, self.created = gen, view, created
        self.view: JobView | None = None
        self.cursor = "0-0"
        self.attempt: dict[int, str] = {}
        self.said: dict[int, str] = {}

    def events(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> list[bytes]:
        out = []
        for entry_id, fields in entries:
            self.cursor = entry_id
            if b"start" in fields:
                self.attempt = {}
            elif b"t" in fields and self.gen.live:
                i = int(fields.get(b"i", b"0"))
                text = self.attempt.get(i, "") + fields[b"t"].decode()
                self.attempt[i] = text
                said = self.said.get(i, "")
                if not (text.startswith(said) or said.startswith(text)):
                    raise self.restarted()
                if len(text) > len(said):
                    self.said[i] = text
                    choice = self.gen.choice(i, text[len(said) :], None, False)
                    out.append(self.gen.chunk(self.job.id, self.created, [choice]))
        return out

    def restarted(self) -> StreamRestarted:
        return StreamRestarted(
            "the job restarted on another worker and made other text",
            job_id=self.job.id,
            deployment=self.job.deployment,
        )


async def _chunks(gw: Gateway, gen: Generation, view: JobView) -> AsyncIterator[bytes]:
    """The job's text as OpenAI's chunks, then each choice's finish, `usage` (when
    asked) and `[DONE]`; an error after the stream began is an `{"error": ...}` event.
    A client that goes away before the end cancels the job."""
    created = int(view.created_at or _openai.now_s())
    reader = _Deltas(gen, view, created)
    ended = False
    try:
        first = [gen.choice(k, "", None, True) for k in range(gen.prompts * gen.n)]
        yield gen.chunk(view.id, created, first)
        async for chunk in gw.follow(view, reader):
            yield chunk
        ended = True
        assert reader.view is not None
        answers, usage = gen.answers(
            await gw.outcome(reader.view, SYNC_WAIT_S), await gw.token_counts(view)
        )
        for k, (text, finish) in enumerate(answers):
            said = reader.said.get(k, "")
            if not text.startswith(said):
                raise reader.restarted()
            rest = text[len(said) :]
            yield gen.chunk(view.id, created, [gen.choice(k, rest, finish, False)])
        if gen.include_usage:
            yield gen.chunk(view.id, created, [], usage)
        yield b"data: [DONE]\n\n"
    except (PipeqError, ApiError) as e:
        ended = True
        yield _error_event(e)
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):
                try:
                    await gw.cancel(view)
                except Exception:
                    log.warning("could not cancel %s after its client left", view.id)


def _error_event(e: Exception) -> bytes:
    response = openai_error(e)
    return b"data: " + bytes(response.body) + b"\n\n"


# -- embeddings ------------------------------------------------------------------------
async def run_embeddings(
    gw: Gateway, who: Caller, target: Announced, body: _openai.EmbeddingRequest, **submit: Any
) -> tuple[Any, JobView]:
    """OpenAI's embeddings body for a request, and its job; `submit`: more of
    `Gateway.submit`'s arguments (a batch line's `job_id`, `expires`, `digest`)."""
    texts = body.input if isinstance(body.input, list) else [body.input]
    if not texts:
        raise InvalidRequest("input: at least one text")
    if "" in texts:
        raise InvalidRequest("input: an empty string cannot be embedded")
    width = target.info.get("feature_width")
    if body.dimensions is not None and body.dimensions != width:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {width}",
        )
    submit.setdefault("wait_s", SYNC_WAIT_S)
    how = target.info.get("pooling") or {"mode": "mean", "normalize": False}
    if how.get("max_seq_length"):  # as sentence-transformers encodes: its length, cut there
        cut = {"truncation": True, "max_length": how["max_seq_length"]}
        submit.setdefault("params", {"tokenize_kwargs": cut})
    view, _ = await gw.submit(who, target.name, texts, **submit)
    result = await gw.outcome(view, submit["wait_s"])
    vectors = [_openai.pool(r, how) for r in result]
    tokens = sum(len(r[0]) if r and isinstance(r[0][0], list) else len(r) for r in result)
    return {
        "object": "list",
        "data": _openai.embedding_data(vectors, body.encoding_format),
        "model": target.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, view


@router.post("/embeddings", summary="OpenAI's embeddings, on a feature-extraction deployment")
async def embeddings(
    body: _openai.EmbeddingRequest, who: Caller = CallerDep, gw: Gateway = GatewayDep
) -> Response:
    target = await target_of(gw, body.model, "feature-extraction", "/v1/embeddings")
    answer, view = await run_embeddings(gw, who, target, body)
    return JSONResponse(answer, headers={JOB_HEADER: view.id})
