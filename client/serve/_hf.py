"""The Hugging Face inference format as pure functions: a `{"inputs", "parameters"}`
body -> pipeq's inputs and parameters, and a pipeq result -> what Hugging Face's clients
parse. No I/O here; `routes_hf` does the requests.

What the clients send and read was taken from their sources (huggingface_hub 2.4.0's
`InferenceClient` and its `hf-inference` provider; @huggingface/inference 4.13.30's
`hf-inference` helpers), pinned in constraints.txt and tests/js/package-lock.json:

    task                  body (besides "inputs")             what the client reads
    text-classification   parameters: top_k, function_to_apply  [[{label, score}, ...]]
    zero-shot             parameters: candidate_labels, ...     [{label, score}, ...]
    token-classification  parameters: aggregation_strategy, ... [{entity_group, score,
                                                                   word, start, end}, ...]
    fill-mask             parameters: top_k, targets            [{score, token, token_str,
                                                                   sequence}, ...]
    question-answering    inputs {question, context}; top_k...  {answer, score, start, end}
    summarization         parameters: generate_parameters {..}, [{summary_text}]
                          truncation, clean_up_tokenization_spaces
    translation           as summarization + src_lang, tgt_lang [{translation_text}]
    feature-extraction    normalize, truncate, ... at the root  nested float lists
    text-generation       TGI: parameters + "stream" at root    [{generated_text, details?}]
                                                                 or TGI's SSE token events

Errors are TGI's body, `{"error": message, "error_type": kind}` (what both clients
print and what `InferenceClient.text_generation` turns into ValidationError,
OverloadedError, GenerationError), plus pipeq's own `type`, `job_id`, `deployment`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeq import _tasks
from pipeq._registry import Announced
from pipeq.errors import (
    InvalidRequest,
    JobError,
    NoLiveWorker,
    Overloaded,
    PipeqError,
    UnknownDeployment,
)

__all__ = [
    "HFRequest",
    "find_deployment",
    "split_request",
    "stream_event",
    "tgi_error",
    "to_hf",
]

#: top-level keys every task's body may have besides "inputs" and "parameters": the
#: Inference API's `options` (`wait_for_model`, `use_cache`), which a queue ignores
_ENVELOPE = frozenset({"inputs", "parameters", "options"})
#: feature-extraction's parameters sit at the root of the body (TEI's format)
_FEATURE_ROOT = frozenset(
    {
        "normalize",
        "prompt_name",
        "truncate",
        "truncation_direction",
        "dimensions",
        "encoding_format",
    }
)
#: TGI parameters that need nothing from pipeq at these values
_TGI_NO_OP: dict[str, Any] = {
    "watermark": False,
    "best_of": 1,
    "decoder_input_details": False,
    "top_n_tokens": 0,
}
#: TGI parameters pipeq's workers cannot honour (with any other value than `_TGI_NO_OP`'s)
_TGI_UNSUPPORTED = {
    "best_of": "best_of (several sequences, the best kept)",
    "watermark": "watermarking",
    "decoder_input_details": "the prompt's token details",
    "top_n_tokens": "the top tokens of each step",
    "grammar": "grammar-constrained decoding",
    "adapter_id": "LoRA adapters",
    "frequency_penalty": "frequency_penalty (use repetition_penalty)",
    "truncate": "truncating the prompt to its last N tokens",
}
#: summarization's and translation's `truncation` (the tokenizer's strategies) ->
#: pipeq's boolean: with one text, every strategy but "do_not_truncate" truncates it
_TRUNCATION = {"do_not_truncate": False, "longest_first": True, "only_first": True}


@dataclass
class HFRequest:
    """One request in pipeq's terms: inputs and parameters as `Client.submit` takes
    them, whether the inputs were a list, and text-generation's TGI switches."""

    inputs: Any
    params: dict[str, Any] = field(default_factory=dict)
    many: bool = False
    stream: bool = False
    details: bool = False
    #: text-generation: the prompt leads `generated_text` (TGI's default: it does not)
    full_text: bool = False


def find_deployment(deployments: Mapping[str, Announced], m: str) -> Announced:
    """The deployment `/models/{m}` names, by pipeq's exact-model rules: a deployment's
    name, else the one deployment serving exactly that model (its Hub id, a legacy
    org-less name for it, its path, or the `hub_id` its checkpoint declares). Raises
    UnknownDeployment for none (naming those with a similar name) or several."""
    if m in deployments:
        return deployments[m]
    exact = [d for d in deployments.values() if d.serves_model(m)]
    if len(exact) == 1:
        return exact[0]
    listed = sorted(f"{d.name} ({d.task}: {d.model})" for d in exact)
    if exact:
        raise UnknownDeployment(
            f"several deployments serve {m!r}: {listed}; use /models/<deployment name>"
        )
    near = sorted(f"{d.name} ({d.model})" for d in deployments.values() if d.resembles(m))
    hint = f"; only similar names: {near}" if near else ""
    raise UnknownDeployment(
        f"no deployment is named {m!r} or serves that model{hint}; "
        f"deployments: {sorted(deployments)}"
    )


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _generate_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """summarization/translation: `generate_parameters` {...} spread among the others,
    and the tokenizer's truncation strategy as pipeq's boolean."""
    params = dict(params)
    nested = params.pop("generate_parameters", None)
    if nested is not None:
        for name, value in _object(nested, "parameters.generate_parameters").items():
            if name in params:
                raise InvalidRequest(
                    f"parameter {name!r} is given twice: in parameters and in "
                    "parameters.generate_parameters"
                )
            params[name] = value
    truncation = params.get("truncation")
    if isinstance(truncation, str):
        if truncation not in _TRUNCATION:
            raise InvalidRequest(
                f"parameter 'truncation' must be true, false or one of {sorted(_TRUNCATION)} "
                f"for one text, got {truncation!r}"
            )
        params["truncation"] = _TRUNCATION[truncation]
    return params


def _feature_parameters(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """feature-extraction: TEI's root-level fields -> the pipeline's; what a transformers
    feature-extraction pipeline cannot do (pooling-model options) is refused."""
    params = dict(params)
    for name in _FEATURE_ROOT & body.keys():
        if name in params:
            raise InvalidRequest(
                f"parameter {name!r} is given twice: at the root and in parameters"
            )
        params[name] = body[name]
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name == "truncate":
            if value is not None:
                out["truncation"] = value
        elif name == "normalize" and value in (None, False):
            continue
        elif name == "encoding_format" and value in (None, "float"):
            continue
        elif name in ("truncation_direction",) and value in (None, "right"):
            continue  # tokenizers truncate on the right
        elif name in ("prompt_name", "dimensions") and value is None:
            continue
        elif name in _FEATURE_ROOT:
            raise InvalidRequest(
                f"parameter {name!r}={value!r} is a sentence-embedding server's option; a "
                "feature-extraction pipeline returns the model's hidden states as they are"
            )
        else:
            out[name] = value
    return out


def _tgi_parameters(params: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """text-generation: TGI's parameters -> pipeq's, `details`, and whether the prompt
    leads the text (`return_full_text`, default false as in TGI)."""
    out: dict[str, Any] = {}
    details = params.get("details", False)
    if not isinstance(details, bool):
        raise InvalidRequest(f"parameter 'details' must be true or false, got {details!r}")
    full = params.get("return_full_text", False)
    if not isinstance(full, bool):
        raise InvalidRequest(f"parameter 'return_full_text' must be true or false, got {full!r}")
    for name, value in params.items():
        if name in ("details", "return_full_text") or value is None:
            continue
        if name in _TGI_UNSUPPORTED:
            if name in _TGI_NO_OP and value == _TGI_NO_OP[name]:
                continue
            raise InvalidRequest(
                f"parameter {name!r}: pipeq's workers do not support {_TGI_UNSUPPORTED[name]} yet"
            )
        if name == "seed":  # the job's own generator (sampled jobs)
            out["seed"] = value
            continue
        if name == "stop":
            if value == []:
                continue
            out["stop_strings"] = value
        else:
            out[name] = value
    out["return_full_text"] = full
    return out, details, full


def split_request(task: str, body: Any) -> HFRequest:
    """A Hugging Face request body for a deployment of `task` -> HFRequest. Raises
    InvalidRequest (422) for a body that is not such a request; the parameters
    themselves are checked by `Client`'s own validation when the job is submitted."""
    body = _object(body, "the body")
    task = _tasks.canonical_task(task)
    if "inputs" not in body:
        raise InvalidRequest('the body has no "inputs"')
    allowed = _ENVELOPE | (
        {"stream"}
        if task == "text-generation"
        else _FEATURE_ROOT
        if task == "feature-extraction"
        else set()
    )
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidRequest(
            f"unknown field(s) {extra} in the body; a {task} request has {sorted(allowed)}"
        )
    params = dict(_object(body.get("parameters") or {}, '"parameters"'))
    inputs = body["inputs"]
    if task == "text-generation" and isinstance(inputs, list) and inputs:
        many = not all(isinstance(m, dict) for m in inputs)  # a list of messages is one chat
    else:
        many = isinstance(inputs, list)
    request = HFRequest(inputs, many=many)
    if task in ("summarization", "translation"):
        params = _generate_parameters(params)
    elif task == "feature-extraction":
        params = _feature_parameters(body, params)
    elif task == "token-classification" and not {"aggregation_strategy", "grouped_entities"} & set(
        params
    ):
        # the Inference API's default: the clients read `entity_group`
        params["aggregation_strategy"] = "simple"
    elif task == "text-generation":
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest(f'"stream" must be true or false, got {stream!r}')
        params, request.details, request.full_text = _tgi_parameters(params)
        if stream and not isinstance(inputs, str):
            raise InvalidRequest('a stream ("stream": true) takes one prompt, a string')
        if stream:
            # the stream carries only new tokens, as TGI's; the prompt joins the
            # final event's generated_text when asked for
            params["return_full_text"] = False
        request.stream = stream
    request.params = params
    return request


def _labelled(result: Any) -> list[dict[str, Any]]:
    """zero-shot's {sequence, labels, scores} -> [{label, score}, ...]."""
    if isinstance(result, dict) and "labels" in result:
        pairs = zip(result["labels"], result["scores"], strict=True)
        return [{"label": label, "score": score} for label, score in pairs]
    return result  # type: ignore[no-any-return]


def _grouped(entities: Any) -> Any:
    """token-classification: every entity has `entity_group` (the clients require it);
    ungrouped ones (aggregation_strategy "none") keep their `entity` beside it."""
    if isinstance(entities, list):
        return [
            {**e, "entity_group": e["entity"]}
            if isinstance(e, dict) and "entity_group" not in e and "entity" in e
            else e
            for e in entities
        ]
    return entities


def to_hf(
    task: str, request: HFRequest, result: Any, pieces: Mapping[int, list[str]] | None = None
) -> Any:
    """A job's result (the transformers pipeline's shape for `request.inputs`) -> the
    body the Hugging Face clients parse for the task (see the module's table).
    `pieces`: text-generation with `details`, each prompt's text as its job's stream
    had it (prompt index -> pieces)."""
    task = _tasks.canonical_task(task)
    per_item = result if request.many else [result]
    if task == "text-classification":
        return [r if isinstance(r, list) else [r] for r in per_item]
    if task == "zero-shot-classification":
        out = [_labelled(r) for r in per_item]
        return out if request.many else out[0]
    if task == "token-classification":
        out = [_grouped(r) for r in per_item]
        return out if request.many else out[0]
    if task == "text-generation":
        prompts = request.inputs if request.many else [request.inputs]
        out = [
            _tgi_generated(request, r, p, (pieces or {}).get(i, []))
            for i, (r, p) in enumerate(zip(per_item, prompts, strict=False))
        ]
        return out if request.many else out[0]
    return result


def _tgi_generated(request: HFRequest, result: Any, prompt: Any, pieces: list[str]) -> Any:
    """One prompt's [{generated_text}, ...] with TGI's `details` on the first sequence."""
    if not request.details or not isinstance(result, list) or not result:
        return result
    first = result[0]
    text = first.get("generated_text") if isinstance(first, dict) else None
    if not isinstance(text, str):
        return result
    if request.full_text and isinstance(prompt, str) and text.startswith(prompt):
        text = text[len(prompt) :]
        pieces = _after(pieces, len(prompt))  # the stream has the prompt first
    return [{**first, "details": generation_details(request, text, pieces)}, *result[1:]]


def _after(pieces: list[str], skip: int) -> list[str]:
    """The pieces less their first `skip` characters."""
    out = []
    for piece in pieces:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        out.append(piece[skip:])
        skip = 0
    return out


def finish_reason(request: HFRequest, text: Any) -> str | None:
    """TGI's finish reason where the text shows it ("stop_sequence": it ends with a stop
    string); None where pipeq's result does not tell (end of text or token limit)."""
    stops = request.params.get("stop_strings")
    stops = [stops] if isinstance(stops, str) else stops or []
    if isinstance(text, str) and any(s and text.endswith(s) for s in stops):
        return "stop_sequence"
    return None


def as_pieces(text: str, streamed: list[str]) -> list[str]:
    """The new text as the stream endpoint sends it: the pieces the worker streamed, and
    what the result holds beyond them as one more (a job the dynamic batcher ran streams
    nothing: its text is one piece); the text as one piece if they disagree."""
    joined = "".join(streamed)
    if not text.startswith(joined):
        return [text] if text else []
    rest = text[len(joined) :]
    return [p for p in streamed if p] + ([rest] if rest else [])


def generation_details(request: HFRequest, text: str, streamed: list[str]) -> dict[str, Any]:
    """TGI's `details` with what pipeq knows: `tokens` are the pieces of the new text as
    the stream endpoint sends them (`as_pieces`: about one a decoding step under
    continuous batching), and a finish reason where the text shows it. pipeq's results
    carry no token ids, log-probabilities, token counts or seeds: those are null, never
    made up."""
    return {
        "finish_reason": finish_reason(request, text),
        "generated_tokens": None,
        "seed": None,
        "prefill": [],
        "tokens": [_token(p) for p in as_pieces(text, streamed)],
    }


def _token(text: str) -> dict[str, Any]:
    return {"id": None, "text": text, "logprob": None, "special": False}


def stream_event(
    request: HFRequest,
    index: int,
    piece: str,
    *,
    final_text: str | None = None,
    prompt: str = "",
) -> dict[str, Any]:
    """One of TGI's `/generate_stream` events for a piece of text; the last one
    (`final_text` given: the whole new text) carries `generated_text` (the prompt first
    when `return_full_text`) and, when asked, `details`."""
    event: dict[str, Any] = {
        "index": index,
        "token": _token(piece),
        "generated_text": None,
        "details": None,
        "top_tokens": None,
    }
    if final_text is not None:
        event["generated_text"] = (prompt if request.full_text else "") + final_text
        if request.details:
            event["details"] = {
                "finish_reason": finish_reason(request, final_text),
                "generated_tokens": None,
                "input_length": None,
                "seed": None,
            }
    return event


#: TGI's `error_type` of each kind of pipeq error (the most specific listed wins)
_ERROR_TYPES: list[tuple[type[PipeqError], str]] = [
    (InvalidRequest, "validation"),
    (Overloaded, "overloaded"),
    (NoLiveWorker, "unavailable"),
    (UnknownDeployment, "not_found"),
    (JobError, "generation"),
]


def tgi_error(exc: PipeqError) -> dict[str, Any]:
    """TGI's error body for a pipeq error, with pipeq's own `type`, `job_id` and
    `deployment`: `{"error": message, "error_type": kind, "type": class, ...}`."""
    kind = next((k for cls, k in _ERROR_TYPES if isinstance(exc, cls)), "unknown")
    body: dict[str, Any] = {"error": exc.message, "error_type": kind, "type": type(exc).__name__}
    if exc.job_id:
        body["job_id"] = exc.job_id
    if exc.deployment:
        body["deployment"] = exc.deployment
    return body
