"""Load a model and its tokenizer into the legacy pipeline for a task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeq.worker.legacy.common import resolve_device
from pipeq.worker.legacy.question_answering import QuestionAnsweringPipeline
from pipeq.worker.legacy.summarization import SummarizationPipeline
from pipeq.worker.legacy.translation import TRANSLATION_TASK, TranslationPipeline

#: The tasks served here (``translation_xx_to_yy`` is accepted by :func:`load_legacy_pipeline`).
LEGACY_TASKS: frozenset[str] = frozenset({"question-answering", "summarization", "translation"})


def load_legacy_pipeline(
    task: str,
    model: str,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Callable[..., Any]:
    """Load `model` (hub id or directory) and its tokenizer for `task` on `device`, its
    weights in `dtype` ("auto": the checkpoint's), with `from_pretrained`'s
    `trust_remote_code` and `attn_implementation` (None: the model's default)."""
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    is_translation = task == "translation" or bool(TRANSLATION_TASK.fullmatch(task))
    if task not in LEGACY_TASKS and not is_translation:
        raise ValueError(
            f"not a legacy task: {task!r} (expected one of {sorted(LEGACY_TASKS)} "
            "or translation_xx_to_yy)"
        )
    resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code
    )
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "question-answering":
        qa_model = AutoModelForQuestionAnswering.from_pretrained(model, revision=revision, **kwargs)
        return QuestionAnsweringPipeline(qa_model, tokenizer, device=device)
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(model, revision=revision, **kwargs)
    if task == "summarization":
        return SummarizationPipeline(seq2seq, tokenizer, device=device)
    return TranslationPipeline(seq2seq, tokenizer, task=task, device=device)
