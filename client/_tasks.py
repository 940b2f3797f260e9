"""What each task accepts, checked at submit before anything is enqueued.

This module is light (no torch, no transformers): producers use it to refuse bad
requests early, workers use it again on what they receive. It also translates the
Hugging Face course's spellings that transformers 5 renamed (`grouped_entities=True`
is `aggregation_strategy="simple"` now), and puts per-item results back into the
shape `transformers.pipeline` returns for a list.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeq.errors import InvalidRequest, UnknownDeployment

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_NESTING",
    "RESULT_BYTES_MAX",
    "TaskSpec",
    "canonical_task",
    "check_item",
    "check_limits",
    "check_param_limits",
    "chat_ids",
    "check_positions",
    "combine",
    "continues_final",
    "is_task",
    "items_of",
    "iterated",
    "request_bytes",
    "sort_out",
    "spec",
    "split_items",
    "validate_params",
]

Check = Callable[[str, Any], None]


def _fail(name: str, what: str, value: Any) -> None:
    raise InvalidRequest(f"parameter {name!r} must be {what}, got {value!r}")


def _int(lo: int = 1, *, none_ok: bool = False) -> Check:
    def check(name: str, v: Any) -> None:
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            _fail(name, f"an integer >= {lo}" + (" or None" if none_ok else ""), v)

    return check


def _number(lo: float = 0.0, hi: float | None = None, *, above: bool = False) -> Check:
    """A finite number from `lo` (excluded when `above`) up to `hi`."""
    what = f"a finite number {'>' if above else '>='} {lo}" + (f" and <= {hi}" if hi else "")

    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            _fail(name, what, v)
        if v < lo or (above and v == lo) or (hi is not None and v > hi):
            _fail(name, what, v)

    return check


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(name, "true or false", v)


def _str(name: str, v: Any) -> None:
    if not isinstance(v, str):
        _fail(name, "a string", v)


def _hypothesis_template(name: str, v: Any) -> None:
    """zero-shot's template: a string the label is put into (`{}`), as transformers checks
    (`template.format(label) == template` is its ValueError)."""
    _str(name, v)
    try:
        placed = v.format("label")
    except (IndexError, KeyError, ValueError):
        placed = v
    if placed == v:
        _fail(name, "a string with one {} where the label goes, as 'This example is {}.'", v)


def _choice(*options: str) -> Check:
    def check(name: str, v: Any) -> None:
        if not isinstance(v, str) or v.lower() not in options:
            _fail(name, f"one of {list(options)}", v)

    return check


def _labels(name: str, v: Any) -> None:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        _fail(name, "a non-empty string or list of non-empty strings", v)


def _str_list(name: str, v: Any) -> None:
    if isinstance(v, str):
        return
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        _fail(name, "a string or a list of strings", v)


def _dict(name: str, v: Any) -> None:
    if not isinstance(v, dict):
        _fail(name, "a mapping", v)


def _padding(name: str, v: Any) -> None:
    if not isinstance(v, bool) and v not in ("longest", "max_length", "do_not_pad"):
        _fail(name, "true, false, 'longest', 'max_length' or 'do_not_pad'", v)


def _dict_list(name: str, v: Any) -> None:
    if not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
        _fail(name, "a list of mappings", v)


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _token_ids(name: str, v: Any) -> None:
    """A token id, or a non-empty list of them (`eos_token_id` may be several)."""
    if not (_is_id(v) or (isinstance(v, list) and v and all(_is_id(x) for x in v))):
        _fail(name, "a token id or a list of token ids", v)


def _token_id_list(name: str, v: Any) -> None:
    if not (isinstance(v, list) and all(_is_id(x) for x in v)):
        _fail(name, "a list of token ids", v)


def _token_id_lists(name: str, v: Any) -> None:
    """`bad_words_ids`: a list of token-id sequences."""
    if not (
        isinstance(v, list)
        and v
        and all(isinstance(s, list) and s and all(_is_id(x) for x in s) for s in v)
    ):
        _fail(name, "a list of non-empty lists of token ids", v)


#: the tasks whose jobs `Job.stream()` follows (their workers write `pipeq:stream:<id>`)
STREAMING = frozenset({"text-generation", "summarization", "translation"})


def _seed(name: str, v: Any) -> None:
    """`seed`: the job's own random generator's seed, 0 <= seed < 2**64."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
        _fail(name, "an integer from 0 to 2**64 - 1", v)


def samples(task: str, params: Mapping[str, Any]) -> bool:
    """The job may sample: transformers 5's text-generation pipeline samples unless told
    `do_sample=False` (or the model's generation config says so, which a producer does
    not see); the seq2seq tasks sample only when told."""
    if canonical_task(task) == "text-generation":
        return params.get("do_sample") is not False
    return params.get("do_sample") is True and canonical_task(task) in (
        "summarization",
        "translation",
    )


def with_seed(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params`, with a `seed` chosen now if the job may sample and has none: the job
    records it, so its text can be made again (`seed=` gives the same text)."""
    if "seed" in params or not samples(task, params):
        return params
    return {**params, "seed": secrets.randbits(63)}


def continues_final(chat: Any, params: Mapping[str, Any]) -> bool:
    """Whether a text-generation chat continues its last message rather than getting a
    reply: `continue_final_message` as given, else transformers' pipeline's rule (the last
    message is the assistant's)."""
    final = params.get("continue_final_message")
    if final is None:
        return bool(chat) and isinstance(chat[-1], dict) and chat[-1].get("role") == "assistant"
    return bool(final)


def chat_ids(tokenizer: Any, chat: Any, final: bool) -> list[int]:
    """A chat's prompt token ids as the text-generation pipeline renders it: the
    tokenizer's chat template, with a generation prompt unless it continues the final
    message (`continues_final`). Raises what `apply_chat_template` raises (ValueError
    without a template)."""
    rendered = tokenizer.apply_chat_template(
        chat, add_generation_prompt=not final, continue_final_message=final, return_dict=True
    )
    return list(rendered["input_ids"])


GENERATE: dict[str, Check] = {
    "seed": _seed,
    "max_length": _int(1),
    "max_new_tokens": _int(1),
    "min_length": _int(0),
    "min_new_tokens": _int(0),
    "num_return_sequences": _int(1),
    "do_sample": _bool,
    "temperature": _number(0.0),
    "top_k": _int(0),
    "top_p": _number(0.0, 1.0),
    "typical_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, above=True),
    "no_repeat_ngram_size": _int(0),
    "num_beams": _int(1),
    "early_stopping": _bool,
    "length_penalty": _number(-1e9),
    "clean_up_tokenization_spaces": _bool,
    # what transformers passes through to generate() (GenerationConfig's request settings);
    # token ids are checked against the vocabulary on the worker
    "pad_token_id": _int(0),
    "bos_token_id": _int(0),
    "eos_token_id": _token_ids,
    "decoder_start_token_id": _int(0),
    "forced_bos_token_id": _int(0),
    "forced_eos_token_id": _token_ids,
    "bad_words_ids": _token_id_lists,
    "suppress_tokens": _token_id_list,
    "begin_suppress_tokens": _token_id_list,
    "stop_strings": _str_list,
    "max_time": _number(0.0, above=True),
    "min_p": _number(0.0, 1.0),
    "epsilon_cutoff": _number(0.0, 1.0),
    "eta_cutoff": _number(0.0, 1.0),
    "diversity_penalty": _number(0.0),
    "encoder_repetition_penalty": _number(0.0, above=True),
    "encoder_no_repeat_ngram_size": _int(0),
    "num_beam_groups": _int(1),
    "renormalize_logits": _bool,
    "remove_invalid_values": _bool,
    "use_cache": _bool,
}


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, input form, parameters and batching defaults."""

    name: str
    inputs: str  # "text" | "qa" | "generation"
    params: Mapping[str, Check]
    #: course (transformers 4) spellings -> function giving the transformers 5 ones
    renamed: Mapping[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = field(
        default_factory=dict
    )
    required: tuple[str, ...] = ()
    #: the reference answers an empty or blank text (refused where it crashes)
    empty_ok: bool = True
    max_batch_size: int = 16
    #: 0: a batch is what waited while the model was busy; an idle worker runs a lone job
    #: at once (measured: any wait is pure latency for it, and under load batches fill
    #: without one). Raise it to hold an idle worker's first job for batch-mates.
    max_batch_wait_ms: float = 0.0


def _return_all_scores(v: Any, params: dict[str, Any]) -> dict[str, Any]:
    return {"top_k": None} if v else {}


def _grouped_entities(v: Any, params: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(v, bool):
        _fail("grouped_entities", "true or false", v)
    if not v:
        return {"aggregation_strategy": "none"}
    first = params.get("ignore_subwords") is True
    return {"aggregation_strategy": "first" if first else "simple"}


def _ignore_subwords(v: Any, params: dict[str, Any]) -> dict[str, Any]:
    if "grouped_entities" not in params:
        raise InvalidRequest(
            "parameter 'ignore_subwords' was removed in transformers 5; "
            "use aggregation_strategy='first' instead"
        )
    return {}  # folded into grouped_entities


def _multi_class(v: Any, params: dict[str, Any]) -> dict[str, Any]:
    return {"multi_label": v}


def _topk(v: Any, params: dict[str, Any]) -> dict[str, Any]:
    return {"top_k": v}


_QA = {
    "top_k": _int(1),
    "max_answer_len": _int(1),
    "handle_impossible_answer": _bool,
    "max_seq_len": _int(8),
    "doc_stride": _int(0),
    "max_question_len": _int(1),
    "align_to_words": _bool,
    "padding": _padding,
}
_SEQ2SEQ = {
    **GENERATE,
    "truncation": _bool,
    "return_text": _bool,
    "return_tensors": _bool,
    "return_type": _choice("text", "tensors"),
    "stop_sequence": _str,
}

SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec(
            "text-classification",
            "text",
            {
                "top_k": _int(1, none_ok=True),
                "function_to_apply": _choice("default", "sigmoid", "softmax", "none"),
                # tokenizer arguments, which transformers passes to the tokenizer
                "truncation": _bool,
                "max_length": _int(1),
                "padding": _padding,
            },
            renamed={"return_all_scores": _return_all_scores},
            max_batch_size=32,
        ),
        TaskSpec(
            "zero-shot-classification",
            "text",
            {
                "candidate_labels": _labels,
                "hypothesis_template": _hypothesis_template,
                "multi_label": _bool,
            },
            renamed={"multi_class": _multi_class},
            required=("candidate_labels",),
            max_batch_size=8,
        ),
        TaskSpec(
            "text-generation",
            "generation",
            {
                **GENERATE,
                "return_full_text": _bool,
                "return_text": _bool,
                "prefix": _str,
                "stop_sequence": _str,
                "truncation": _bool,
                "skip_special_tokens": _bool,
                "continue_final_message": _bool,
                "return_tensors": _bool,
                "handle_long_generation": _choice("hole"),
                "tokenizer_encode_kwargs": _dict,
                "documents": _dict_list,
                "tools": _dict_list,
            },
            max_batch_size=8,
        ),
        TaskSpec(
            "fill-mask",
            "text",
            {"top_k": _int(1), "targets": _str_list, "tokenizer_kwargs": _dict},
            max_batch_size=32,
        ),
        TaskSpec(
            "token-classification",
            "text",
            {
                "aggregation_strategy": _choice("none", "simple", "first", "average", "max"),
                "ignore_labels": _str_list,
                "stride": _int(0),
                "delimiter": _str,
            },
            renamed={"grouped_entities": _grouped_entities, "ignore_subwords": _ignore_subwords},
            max_batch_size=32,
        ),
        TaskSpec(
            "feature-extraction",
            "text",
            {"truncation": _bool, "tokenize_kwargs": _dict, "return_tensors": _bool},
            max_batch_size=32,
        ),
        TaskSpec(
            "question-answering",
            "qa",
            _QA,
            renamed={"topk": _topk},
            empty_ok=False,
            max_batch_size=16,
        ),
        TaskSpec("summarization", "text", _SEQ2SEQ, max_batch_size=8),
        TaskSpec(
            "translation",
            "text",
            {**_SEQ2SEQ, "src_lang": _str, "tgt_lang": _str},
            max_batch_size=8,
        ),
    )
}

ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
}
_TRANSLATION = re.compile(r"translation_[A-Za-z-]+_to_[A-Za-z-]+")


def is_task(name: str) -> bool:
    return name in SPECS or name in ALIASES or bool(_TRANSLATION.fullmatch(name))


def canonical_task(name: str) -> str:
    """'sentiment-analysis' -> 'text-classification', 'translation_fr_to_en' -> 'translation'."""
    if name in SPECS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if _TRANSLATION.fullmatch(name):
        return "translation"
    raise UnknownDeployment(
        f"unknown task {name!r}; pipeq serves {sorted(set(SPECS) | set(ALIASES))}"
    )


def spec(task: str) -> TaskSpec:
    return SPECS[canonical_task(task)]


def _check_text(v: Any, where: str, empty_ok: bool = False) -> None:
    if not isinstance(v, str):
        raise InvalidRequest(f"{where} must be a string, got {type(v).__name__}: {v!r:.80}")
    if not empty_ok and not v.strip():
        raise InvalidRequest(f"{where} is an empty string")


def _check_pair(v: Any, where: str) -> None:
    """text-classification's text pair: {"text": ..., "text_pair": ...}."""
    extra = set(v) - {"text", "text_pair"}
    if extra or "text" not in v:
        raise InvalidRequest(
            f"{where} must be a string or a pair {{'text': ..., 'text_pair': ...}}, "
            f"got keys {sorted(v)}"
        )
    for key in v:
        _check_text(v[key], f"{where}[{key!r}]", empty_ok=True)


def _check_qa(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        raise InvalidRequest(
            f"{where} must be a mapping with 'question' and 'context', got {type(v).__name__}"
        )
    extra = set(v) - {"question", "context"}
    if extra:
        raise InvalidRequest(f"{where} has unknown keys {sorted(extra)}")
    for key in ("question", "context"):
        if key not in v:
            raise InvalidRequest(f"{where} is missing {key!r}")
        _check_text(v[key], f"{where}[{key!r}]", empty_ok=True)
        if v[key] == "":  # as 4.57: empty is refused, blank is answered
            raise InvalidRequest(f"{where}[{key!r}] cannot be empty")


def _check_chat(v: Any, where: str) -> None:
    for i, m in enumerate(v):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidRequest(f"{where}[{i}] must be a message {{'role': str, 'content': str}}")


def items_of(task: str, inputs: Any) -> tuple[list[Any], bool]:
    """The items of a request, unchecked, and whether it was a list (result is a list too)."""
    if inputs is None:
        raise InvalidRequest("inputs are missing (None)")
    if spec(task).inputs == "generation" and isinstance(inputs, list) and inputs:
        if all(isinstance(m, dict) for m in inputs):  # one chat
            return [inputs], False
    if isinstance(inputs, list | tuple):
        if not inputs:
            raise InvalidRequest("inputs is an empty list")
        return list(inputs), True
    return [inputs], False


def check_item(task: str, item: Any, where: str = "inputs") -> None:
    """One item's type and content; InvalidRequest names what is wrong."""
    s = spec(task)
    if s.inputs == "qa":
        _check_qa(item, where)
    elif s.inputs == "generation" and isinstance(item, list):
        _check_chat(item, where)
    elif s.name == "text-classification" and isinstance(item, dict):
        _check_pair(item, where)
    elif s.name == "zero-shot-classification" and item == "":
        raise InvalidRequest(f"{where} is empty: zero-shot classification needs a sequence")
    else:
        _check_text(item, where, empty_ok=s.empty_ok)


def sort_out(items: list[Any], check: Callable[[Any, str], None]) -> tuple[list[Any], list[int]]:
    """Check each item alone: (outcomes holding each bad item's InvalidRequest, good indices)."""
    outcomes: list[Any] = [None] * len(items)
    good: list[int] = []
    for i, item in enumerate(items):
        try:
            check(item, f"inputs[{i}]")
            good.append(i)
        except InvalidRequest as e:
            outcomes[i] = e
    return outcomes, good


def split_items(task: str, inputs: Any) -> tuple[list[Any], bool]:
    """The checked items of a request and whether it was a list."""
    items, many = items_of(task, inputs)
    for i, item in enumerate(items):
        check_item(task, item, f"inputs[{i}]" if many else "inputs")
    return items, many


def validate_params(
    task: str, params: Mapping[str, Any], *, complete: bool = True
) -> dict[str, Any]:
    """Check parameters (all required ones present when `complete`); translate renamed ones."""
    s = spec(task)
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in s.renamed:
            out.update(s.renamed[name](value, dict(params)))
        elif name in s.params:
            s.params[name](name, value)
            out[name] = value
        else:
            raise InvalidRequest(
                f"unknown parameter {name!r} for {s.name}; accepted: {sorted(s.params)}"
            )
    for name in s.required if complete else ():
        if name not in out:
            raise InvalidRequest(f"{s.name} needs the parameter {name!r}")
    if out.get("temperature") == 0 and samples(task, out):
        # transformers' ValueError in the worker otherwise ("has to be a strictly positive
        # float"); OpenAI's temperature 0, greedy decoding, is do_sample=False here
        raise InvalidRequest(
            "parameter 'temperature' must be > 0 when sampling (the text-generation "
            "pipeline samples unless do_sample=False): pass do_sample=False for greedy "
            "decoding"
        )
    return out


#: What one request may ask of a worker, unless its deployment says otherwise. TGI and TEI
#: bound requests the same way (TEI's payload limit is 2 MB): one 10 MB input took a
#: distilbert-base-size worker from 0.7 GB to 7.9 GB of memory, never given back.
DEFAULT_LIMITS: dict[str, int] = {
    "request_bytes": 2_000_000,
    # a job's stored result (JSON, floats packed): a feature-extraction job of 1,000
    # texts of 1,900 characters would make 860 MB (161M floats), and took a worker from
    # 0.4 GB to 7 GB as lists. Celery stores at most 512 MiB (RESULT_BYTES_MAX).
    "result_bytes": 64_000_000,
    "items_per_job": 1024,
    "max_new_tokens": 1024,
    "num_return_sequences": 16,
    "num_beams": 8,
}
#: the most `limits.result_bytes` may be: Celery's result backend refuses a larger value
#: (`BackendStoreError`), as Redis does past its 512 MB `proto-max-bulk-len`
RESULT_BYTES_MAX = 500_000_000
#: lists and mappings nested deeper than this are refused (JSON encoders recurse)
MAX_NESTING = 32
_LIMITED_PARAMS = {
    "max_new_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "num_return_sequences": "num_return_sequences",
    "num_beams": "num_beams",
}


def _nesting_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else ()
        if children and depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def request_bytes(inputs: Any, params: Mapping[str, Any]) -> int:
    """The size of a request's inputs and parameters as UTF-8 JSON."""
    try:
        text = json.dumps({"inputs": inputs, "params": params}, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"the request is not JSON-serialisable: {e}") from None
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"the request holds text that is not valid Unicode (a lone surrogate at "
            f"{e.object[e.start : e.end]!r})"
        ) from None


def check_limits(
    task: str, limits: Mapping[str, int] | None, inputs: Any, params: Mapping[str, Any]
) -> None:
    """InvalidRequest for a request past its deployment's `limits` (DEFAULT_LIMITS for
    those it does not set), or nested more than MAX_NESTING deep."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    if _nesting_exceeds({"inputs": inputs, "params": dict(params)}, MAX_NESTING):
        raise InvalidRequest(f"the request nests lists or mappings more than {MAX_NESTING} deep")
    size = request_bytes(inputs, params)
    if size > lim["request_bytes"]:
        raise InvalidRequest(
            f"the request is {size} bytes of JSON; this deployment takes at most "
            f"{lim['request_bytes']} (limits.request_bytes)"
        )
    items, many = items_of(task, inputs)
    if many and len(items) > lim["items_per_job"]:
        raise InvalidRequest(
            f"{len(items)} inputs in one job; this deployment takes at most "
            f"{lim['items_per_job']} (limits.items_per_job): Client.map sends many jobs"
        )
    check_param_limits(lim, params)


def check_param_limits(limits: Mapping[str, int] | None, params: Mapping[str, Any]) -> None:
    """InvalidRequest for a generation parameter past its deployment's limit."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    for name, limit_name in _LIMITED_PARAMS.items():
        value = params.get(name)
        if isinstance(value, int) and value > lim[limit_name]:
            raise InvalidRequest(
                f"{name}={value} is over this deployment's limit of {lim[limit_name]} "
                f"(limits.{limit_name})"
            )


def check_positions(max_positions: int | None, params: Mapping[str, Any]) -> None:
    """InvalidRequest for a generation length that no input can fit in a model of
    `max_positions` (what its worker announces: the tokens one generated sequence may
    hold, as `generate`'s max_length counts them). A prompt, or an encoder-decoder's
    start token, takes at least one, so max_new_tokens must be below it. The worker
    checks the rest, once it knows the prompt's tokens."""
    if not isinstance(max_positions, int) or max_positions < 1:
        return
    new, length = params.get("max_new_tokens"), params.get("max_length")
    if isinstance(new, int) and not isinstance(new, bool):
        if new >= max_positions:
            raise InvalidRequest(
                f"max_new_tokens={new} leaves no room for the input: the model takes at most "
                f"{max_positions} tokens in a sequence, its first (the prompt, or the "
                "decoder's start token) and the new ones together"
            )
    elif isinstance(length, int) and not isinstance(length, bool) and length > max_positions:
        raise InvalidRequest(
            f"max_length={length} is past the model's context: it takes at most "
            f"{max_positions} tokens in a sequence"
        )


def iterated(task: str, params: Mapping[str, Any], result: Any) -> Any:
    """One item's result as the reference's iterator yields it for a generator input:
    text-classification's dict without its list (as for a list input); the rest as for
    one input."""
    if canonical_task(task) == "text-classification" and "top_k" not in params:
        return result[0] if isinstance(result, list) else result
    return result


def combine(task: str, params: Mapping[str, Any], results: list[Any]) -> Any:
    """Per-item results (each what `pipe(item)` returns) -> what `pipe(items)` returns,
    by the reference's own rule for a list (transformers 5; 4.57 for the three tasks 5
    removed). Applied to a whole job's items, never to a batch's: a job's shape depends
    on what it sent, not on what shared its forward pass."""
    t = canonical_task(task)
    if t == "text-classification" and "top_k" not in params:
        # a lone string's dict comes wrapped in a list (a text pair's does not)
        return [r[0] if isinstance(r, list) else r for r in results]
    if t in ("fill-mask", "question-answering") and len(results) == 1:
        return results[0]  # both unwrap a list of one input
    if t in ("summarization", "translation") and all(len(r) == 1 for r in results):
        return [r[0] for r in results]  # 4.57's text2text: one dict per text, flattened
    return results
