"""Question answering's call forms and parameters, read and checked as 4.57 read them."""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import check_bool, check_int, type_name, unknown_params

_QA_PARAMS = frozenset(
    {
        "top_k",
        "topk",
        "doc_stride",
        "max_answer_len",
        "max_seq_len",
        "max_question_len",
        "handle_impossible_answer",
        "align_to_words",
        "padding",
        "batch_size",
        "num_workers",
    }
)
_PADDING_VALUES = frozenset({"do_not_pad", "longest", "max_length"})


def _check_text(field: str, value: Any) -> str:
    if value is None:
        raise InvalidRequest(f"`{field}` cannot be None")
    if not isinstance(value, str):
        raise InvalidRequest(f"`{field}` must be a string, got {type_name(value)}")
    if not value:  # as 4.57: empty is refused, blank is answered (a blank context: "")
        raise InvalidRequest(f"`{field}` cannot be empty")
    return value


def normalize_example(item: Any, where: str) -> tuple[str, str]:
    """One example as (question, context), each a non-empty string; `where` names it in errors."""
    if not isinstance(item, Mapping):
        raise InvalidRequest(
            f"{where} must be a dict with `question` and `context`, got {type_name(item)}"
        )
    missing = [k for k in ("question", "context") if k not in item]
    if missing:
        raise InvalidRequest(
            f"{where} needs both `question` and `context`; missing: "
            + ", ".join(f"`{k}`" for k in missing)
        )
    extra = set(item) - {"question", "context"}
    if extra:
        raise InvalidRequest(
            f"{where} has unknown key(s): " + ", ".join(f"`{k}`" for k in sorted(map(str, extra)))
        )
    prefix = "" if where == "input" else f"{where}."
    question = _check_text(f"{prefix}question", item["question"])
    context = _check_text(f"{prefix}context", item["context"])
    return question, context


def parse_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], bool]:
    """Mirror of 4.57's QuestionAnsweringArgumentHandler: (raw items, came as generator)."""
    if args:
        if len(args) == 1:
            inputs = args[0]
        elif len(args) == 2 and all(isinstance(a, str) for a in args):
            inputs = [{"question": args[0], "context": args[1]}]
        else:
            inputs = list(args)
    elif "X" in kwargs:
        inputs = kwargs.pop("X")
    elif "data" in kwargs:
        inputs = kwargs.pop("data")
    elif "question" in kwargs or "context" in kwargs:
        missing = [k for k in ("question", "context") if k not in kwargs]
        if missing:
            raise InvalidRequest(
                "question-answering needs both `question` and `context`; missing: "
                + ", ".join(f"`{k}`" for k in missing)
            )
        question, context = kwargs.pop("question"), kwargs.pop("context")
        if isinstance(question, list) and isinstance(context, list):
            if len(question) != len(context):
                raise InvalidRequest(
                    f"`question` and `context` lists differ in length "
                    f"({len(question)} and {len(context)})"
                )
            inputs = [{"question": q, "context": c} for q, c in zip(question, context, strict=True)]
        elif isinstance(question, list):
            _check_text("context", context)
            inputs = [{"question": q, "context": context} for q in question]
        elif isinstance(context, list):
            raise InvalidRequest(
                "`context` is a list but `question` is not: pass one question per context"
            )
        else:
            inputs = [{"question": question, "context": context}]
    else:
        raise InvalidRequest("question-answering needs `question` and `context`")

    generator = isinstance(inputs, types.GeneratorType)
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    elif isinstance(inputs, str | bytes) or not isinstance(inputs, Iterable):
        raise InvalidRequest(
            "question-answering input must be a dict with `question` and `context` or a "
            f"list of them, got {type_name(inputs)}"
        )
    else:
        inputs = list(inputs)
    return inputs, generator


def parse_params(kwargs: dict[str, Any], *, task: str, tokenizer: Any) -> dict[str, Any]:
    """The parameters of a call, checked, with 4.57's defaults filled in."""
    unknown = set(kwargs) - _QA_PARAMS
    if unknown:
        raise unknown_params(task, unknown)
    p: dict[str, Any] = {}
    top_k = kwargs.get("top_k")
    if top_k is None:
        top_k = kwargs.get("topk")
    p["top_k"] = 1 if top_k is None else check_int("top_k", top_k, 1)
    mal = kwargs.get("max_answer_len")
    p["max_answer_len"] = 15 if mal is None else check_int("max_answer_len", mal, 1)
    hia = kwargs.get("handle_impossible_answer")
    p["handle_impossible_answer"] = (
        False if hia is None else check_bool("handle_impossible_answer", hia)
    )
    atw = kwargs.get("align_to_words")
    p["align_to_words"] = True if atw is None else check_bool("align_to_words", atw)
    max_seq_len = kwargs.get("max_seq_len")
    if max_seq_len is None:
        max_seq_len = min(int(tokenizer.model_max_length), 384)
    else:
        max_seq_len = check_int("max_seq_len", max_seq_len, 1)
    doc_stride = kwargs.get("doc_stride")
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    else:
        doc_stride = check_int("doc_stride", doc_stride, 0)
    if doc_stride > max_seq_len:
        raise InvalidRequest(
            f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})"
        )
    p["max_seq_len"], p["doc_stride"] = max_seq_len, doc_stride
    if kwargs.get("max_question_len") is not None:  # used by 4.57's slow tokenizers only
        check_int("max_question_len", kwargs["max_question_len"], 1)
    padding = kwargs.get("padding")
    if padding is None:
        padding = "do_not_pad"
    elif not isinstance(padding, bool) and padding not in _PADDING_VALUES:
        raise InvalidRequest(
            "`padding` must be true, false, 'do_not_pad', 'longest' or 'max_length', "
            f"got {padding!r}"
        )
    p["padding"] = padding
    for name in ("batch_size", "num_workers"):
        if kwargs.get(name) is not None:
            check_int(name, kwargs[name], 0 if name == "num_workers" else 1)
    return p
