"""Extractive question answering, as transformers 4.57's ``QuestionAnsweringPipeline``.

The call forms and parameters are read in ``qa_inputs``, the spans of the answers are found in
``qa_spans``; this module cuts the context into windows and runs the model on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeq.errors import InvalidRequest, ModelLoadError
from pipeq.worker.legacy.common import input_token_limit, resolve_device
from pipeq.worker.legacy.qa_inputs import normalize_example, parse_inputs, parse_params
from pipeq.worker.legacy.qa_spans import SpanAnswers


def encode_windows(tok: Any, question: str, context: str, p: dict[str, Any], where: str) -> Any:
    """The question and context as overlapping windows of `max_seq_len` tokens (4.57).

    `tok` is the (fast) tokenizer; its output keeps the offsets and sequence ids of every
    window, which the answer spans are mapped back to the context with.
    """
    question_first = tok.padding_side == "right"
    max_seq_len, doc_stride = p["max_seq_len"], p["doc_stride"]
    n_question = len(tok(question, add_special_tokens=False)["input_ids"])
    n_special = tok.num_special_tokens_to_add(pair=True)
    room = max_seq_len - n_question - n_special
    if room <= 0:
        raise InvalidRequest(
            f"{where}: `question` is {n_question} tokens long, which with the "
            f"{n_special} special tokens leaves no room for the context within "
            f"max_seq_len={max_seq_len}; shorten the question or raise max_seq_len"
        )
    first, second = (question, context) if question_first else (context, question)
    if doc_stride >= room:
        # tokenizers panics (an uncatchable-by-`except Exception` PanicException) when a
        # window must be cut with a stride that does not fit in it
        total = len(tok(first, second, truncation=False)["input_ids"])
        if total > max_seq_len:
            raise InvalidRequest(
                f"{where}: `doc_stride` ({doc_stride}) must be smaller than the room left "
                f"for the context in each window ({room} tokens: max_seq_len={max_seq_len} "
                f"minus a question of {n_question} tokens and {n_special} special tokens)"
            )
    try:
        return tok(
            text=first,
            text_pair=second,
            padding=p["padding"],
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_token_type_ids=True,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers' errors, PanicException included
        raise InvalidRequest(
            f"{where}: cannot split the context into windows of max_seq_len={max_seq_len} "
            f"with doc_stride={doc_stride} after a question of {n_question} tokens: {e}"
        ) from e


class QuestionAnsweringPipeline:
    """Extractive question answering, as transformers 4.57's ``QuestionAnsweringPipeline``.

    Call forms: ``qa(question=..., context=...)`` (each a string, or `question` a list with one
    context or with a list of as many contexts), ``qa({"question": ..., "context": ...})``,
    ``qa([dict, ...])``, ``qa(dict, dict, ...)`` and ``qa(question, context)``.  One example
    gives ``{"score", "start", "end", "answer"}`` (a list of them when ``top_k > 1`` finds
    several), several examples give a list with one such result each.
    """

    task = "question-answering"

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(
                "question-answering needs a fast (tokenizers-backed) tokenizer for its offsets; "
                f"{type(tokenizer).__name__} is not one"
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Answer the question(s); see the class docstring for the call forms."""
        raw, generator = parse_inputs(args, kwargs)
        params = parse_params(kwargs, task=self.task, tokenizer=self.tokenizer)
        examples = []
        for i, item in enumerate(raw):
            where = "input" if len(raw) == 1 and not generator else f"inputs[{i}]"
            examples.append(normalize_example(item, where))
        if len(examples) == 1 and not generator:
            return self._answer(*examples[0], params, "input")
        return [self._answer(q, c, params, f"inputs[{i}]") for i, (q, c) in enumerate(examples)]

    def _answer(
        self, question: str, context: str, p: dict[str, Any], where: str
    ) -> dict[str, Any] | list[dict[str, Any]]:
        tok = self.tokenizer
        encoded = encode_windows(tok, question, context, p, where)
        num_spans = len(encoded["input_ids"])
        limit = input_token_limit(tok, self.model.config)
        longest = max(len(ids) for ids in encoded["input_ids"])
        if limit is not None and longest > limit:
            raise InvalidRequest(
                f"`max_seq_len` ({p['max_seq_len']}) makes windows of {longest} tokens but the "
                f"model takes at most {limit}"
            )
        answers = SpanAnswers(tok, context, p)
        for span in range(num_spans):
            start_logits, end_logits = self._logits(encoded, span)
            answers.add_window(encoded, span, start_logits, end_logits)
        return answers.best()

    def _logits(self, encoded: Any, span: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's start and end logits, shape (1, n), for window `span` of `encoded`."""
        model_inputs = {
            name: torch.tensor([encoded[name][span]], device=self.device)
            for name in self.tokenizer.model_input_names
            if name in encoded
        }
        with torch.inference_mode():
            output = self.model(**model_inputs)
        start_logits, end_logits = output["start_logits"], output["end_logits"]
        if start_logits.dtype == torch.bfloat16:
            start_logits, end_logits = start_logits.float(), end_logits.float()
        return start_logits.cpu().numpy(), end_logits.cpu().numpy()
