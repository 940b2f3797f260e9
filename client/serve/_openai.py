"""OpenAI's request and response shapes as pure functions: a request body -> pipeq's
inputs and parameters, a job's result -> what the `openai` client parses. No I/O here;
`routes_openai` does the requests.

    route                 deployment's task    pipeq job
    /v1/completions       text-generation      inputs: the prompt(s); params below
    /v1/chat/completions  text-generation      inputs: the messages (one chat, through
                                               the model's chat template)
    /v1/embeddings        feature-extraction   inputs: the texts; pooled per deployment

Sampling: `temperature` 0 is greedy decoding (`do_sample=False`: continuous batching
takes it); above 0, or left out (OpenAI's default is 1), samples. `max_tokens` (chat:
`max_completion_tokens` first) is `max_new_tokens`, 16 when left out (OpenAI's
completions default). `stop` (up to 4 strings) is transformers' `stop_strings`; the text
is cut before the first stop string, as OpenAI's is. `n` is `num_return_sequences`.
`seed` seeds a sampled job's own random generator (the same request and seed give the
same text, whatever else the worker runs); greedy decoding ignores it.

Errors are OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`, where
`code` is pipeq's error class (`Overloaded`, `NoLiveWorker`, ...).
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from pipeq.errors import InvalidRequest

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "OPENAI_PATHS",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "chat_inputs",
    "cut_at_stop",
    "embedding_data",
    "error_envelope",
    "generation_params",
    "pool",
]

#: `max_tokens` when a request leaves it out (OpenAI's completions default)
DEFAULT_MAX_TOKENS = 16
#: OpenAI's `stop`: at most this many strings
MAX_STOP = 4
#: OpenAI's `n`, as pipeq's own `num_return_sequences` limit
MAX_N = 16

#: the paths of OpenAI's routes (`routes_openai`, `routes_batches`): every error under
#: them is OpenAI's envelope, an unknown route's and a wrong method's included
OPENAI_PATHS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/files",
    "/v1/batches",
)

#: OpenAI's error `type` for each HTTP status the gateway answers
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_envelope(status: int, message: str, code: str | None, param: str | None = None) -> Any:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text_only(value: Any) -> Any:
    """Refuses OpenAI's token arrays (lists of token ids, as LangChain's
    `OpenAIEmbeddings` sends by default) by name: the gateway has no tokenizer."""
    if isinstance(value, list) and any(isinstance(v, int | list) for v in value):
        raise PydanticCustomError("token_arrays", "token arrays are not supported; send text")
    return value


#: a string or a list of them (a prompt, an embedding's input), never token ids
Texts = Annotated[str | list[str], BeforeValidator(_text_only)]


def _null_is(default: Any) -> BeforeValidator:
    """`null` for a field means its default (OpenAI's clients and SDKs in other languages
    send `"n": null`, `"stream": null`)."""
    return BeforeValidator(lambda value: default if value is None else value)


class _Request(BaseModel):
    """Fields every OpenAI request may carry; unknown ones are refused (400)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a deployment's name, or a model one deployment serves")
    user: str | None = Field(None, description="accepted, unused")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Annotated[int, _null_is(1)] = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: Annotated[bool, _null_is(False)] = False
    stream_options: StreamOptions | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(
        None, description='"priority": a high pipeq job; "flex": a low one; others: normal'
    )
    # accepted at OpenAI's defaults only (a request that sets them means something else)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None


class CompletionRequest(_Generation):
    """`POST /v1/completions`: `prompt` is a string or a list of them."""

    prompt: Texts
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    """A chat message: text content (a string or text parts); tool calls are refused."""

    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Generation):
    """`POST /v1/chat/completions`: `messages` through the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: `input` is a string or a list of them (token ids: no)."""

    input: Texts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def priority_of(service_tier: str | None) -> str | None:
    """OpenAI's `service_tier` as a pipeq priority: "priority" (OpenAI's faster, dearer
    tier) is high, "flex" (its slower, cheaper one) is low; "auto", "default", "scale" and
    none name no level (None: the route's own)."""
    return {"priority": "high", "flex": "low"}.get(service_tier or "")


def _at_default(request: _Generation) -> None:
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options: only allowed when stream is true (OpenAI's rule)")
    for name, default in (("presence_penalty", 0), ("frequency_penalty", 0)):
        if getattr(request, name) not in (None, default):
            raise InvalidRequest(f"{name}: pipeq's workers support only {default}")
    if request.logit_bias:
        raise InvalidRequest("logit_bias: pipeq's workers do not support it")
    if request.logprobs not in (None, False, 0):
        raise InvalidRequest("logprobs: pipeq's results carry no log-probabilities")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise InvalidRequest("echo: not supported")
        if request.best_of not in (None, 1):
            raise InvalidRequest("best_of: not supported (use n)")
        if request.suffix:
            raise InvalidRequest("suffix: not supported")


def stops_of(request: _Generation) -> list[str]:
    stop = request.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise InvalidRequest(f"stop: up to {MAX_STOP} non-empty strings")
    return stops


def generation_params(request: _Generation, max_tokens: int | None = None) -> dict[str, Any]:
    """A completion or chat request -> the text-generation job's parameters (the new text
    only: `return_full_text` false). Raises InvalidRequest for what pipeq cannot honour."""
    _at_default(request)
    sampling = request.temperature is None or request.temperature > 0
    params: dict[str, Any] = {
        "max_new_tokens": max_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
        "do_sample": sampling,
        "return_full_text": False,
    }
    if sampling:
        if request.seed is not None:  # the job's own generator: the same text again
            params["seed"] = request.seed
        params["temperature"] = 1.0 if request.temperature is None else request.temperature
        if request.top_p is not None and request.top_p < 1:
            params["top_p"] = request.top_p
    elif request.n > 1:
        raise InvalidRequest("n > 1 needs sampling (temperature > 0): greedy text is one")
    if request.n > 1:
        params["num_return_sequences"] = request.n
    stops = stops_of(request)
    if stops:
        params["stop_strings"] = stops
    return params


def chat_inputs(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI's messages -> the chat the pipeline takes (`[{"role", "content"}]`):
    content parts of type text are joined; any other part is refused."""
    chat = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"messages[{i}].content: only text parts, got {part.get('type')!r}"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        chat.append({"role": m.role, "content": content or ""})
    return chat


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string (OpenAI leaves it out; transformers keeps
    it), and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def new_texts(result: Any, prompts: int, n: int) -> list[str]:
    """A text-generation job's result -> each choice's new text, prompt by prompt then
    sequence by sequence (`[{"generated_text"}]` a prompt, or a list of those)."""
    per_prompt = result if prompts > 1 else [result]
    out = []
    for sequences in per_prompt:
        seqs = sequences if isinstance(sequences, list) else [sequences]
        for s in seqs[:n]:
            text = s.get("generated_text") if isinstance(s, dict) else s
            if isinstance(text, list):  # a chat with its new message last
                text = text[-1].get("content", "") if text else ""
            out.append(text if isinstance(text, str) else "")
    return out


def now_s() -> int:
    return int(time.time())


# -- embeddings --------------------------------------------------------------------------
def pool(hidden: Any, how: dict[str, Any]) -> list[float]:
    """One text's token vectors (the pipeline's `[1][tokens][width]`) -> one vector:
    `how["mode"]` "mean" (default), "cls" (the first token), "max" or "lasttoken";
    L2-normalised when `how["normalize"]`."""
    rows: list[list[float]] = hidden[0] if hidden and isinstance(hidden[0][0], list) else hidden
    mode = how.get("mode", "mean")
    if mode == "cls":
        vec = list(rows[0])
    elif mode == "lasttoken":
        vec = list(rows[-1])
    elif mode == "max":
        vec = [max(col) for col in zip(*rows, strict=True)]
    else:
        vec = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    if how.get("normalize"):
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        vec = [v / norm for v in vec]
    return vec


def embedding_data(vectors: list[list[float]], encoding_format: str) -> list[dict[str, Any]]:
    """OpenAI's `data`: one `{"object": "embedding", "index", "embedding"}` a text; the
    embedding as floats, or `base64` of little-endian float32s (what the client decodes)."""
    out = []
    for i, vec in enumerate(vectors):
        value: Any = vec
        if encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        out.append({"object": "embedding", "index": i, "embedding": value})
    return out
