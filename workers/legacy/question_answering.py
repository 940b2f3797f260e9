"""Extractive question answering, as transformers 4.57's ``QuestionAnsweringPipeline``."""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipeq.errors import InvalidRequest, ModelLoadError
from pipeq.worker.legacy.common import (
    check_bool,
    check_int,
    input_token_limit,
    resolve_device,
    type_name,
    unknown_params,
)

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


def decode_spans(
    start: np.ndarray,
    end: np.ndarray,
    topk: int,
    max_answer_len: int,
    undesired_tokens: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `topk` best (start, end) token pairs of one window, as 4.57's ``decode_spans``.

    `start` and `end` are probabilities of shape (1, n); a span's score is
    ``start[s] * end[e]`` for ``s <= e < s + max_answer_len``.  `undesired_tokens` (1, n) is
    non-zero for the tokens an answer may use.
    """
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = np.array([np.argmax(scores_flat)])
    elif len(scores_flat) <= topk:  # 4.57 crashed in argpartition when equal
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    # As in 4.57, the allowed positions are *all* arrays of `nonzero()` (row and column indices)
    # flattened together: the batch row index 0 makes token 0 (CLS) allowed too.
    allowed = np.concatenate(undesired_tokens.nonzero())
    desired_spans = np.isin(starts, allowed) & np.isin(ends, allowed)
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores


def select_starts_ends(
    start: np.ndarray,
    end: np.ndarray,
    p_mask: np.ndarray,
    attention_mask: np.ndarray | None,
    min_null_score: float = 1000000,
    top_k: int = 1,
    handle_impossible_answer: bool = False,
    max_answer_len: int = 15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Softmax over the answer-eligible tokens of one window, then `decode_spans` (as 4.57).

    `start`/`end` are the logits (1, n), `p_mask` is 1 for tokens that cannot be in an answer.
    Returns the spans and the smallest "no answer" score (CLS start * CLS end) seen so far.
    """
    undesired_tokens = np.abs(np.array(p_mask) - 1)
    if attention_mask is not None:
        undesired_tokens = undesired_tokens & attention_mask
    undesired_tokens_mask = undesired_tokens == 0.0

    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)

    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()

    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())

    start[0, 0] = end[0, 0] = 0.0  # CLS is never part of a span

    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


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

    # -- inputs ------------------------------------------------------------------------------

    @staticmethod
    def _check_text(field: str, value: Any) -> str:
        if value is None:
            raise InvalidRequest(f"`{field}` cannot be None")
        if not isinstance(value, str):
            raise InvalidRequest(f"`{field}` must be a string, got {type_name(value)}")
        if not value.strip():
            raise InvalidRequest(f"`{field}` cannot be empty")
        return value

    def _normalize(self, item: Any, where: str) -> tuple[str, str]:
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
                f"{where} has unknown key(s): "
                + ", ".join(f"`{k}`" for k in sorted(map(str, extra)))
            )
        prefix = "" if where == "input" else f"{where}."
        question = self._check_text(f"{prefix}question", item["question"])
        context = self._check_text(f"{prefix}context", item["context"])
        return question, context

    def _parse(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], bool]:
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
                inputs = [
                    {"question": q, "context": c} for q, c in zip(question, context, strict=True)
                ]
            elif isinstance(question, list):
                self._check_text("context", context)
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

    def _params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - _QA_PARAMS
        if unknown:
            raise unknown_params(self.task, unknown)
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
            max_seq_len = min(int(self.tokenizer.model_max_length), 384)
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

    # -- running -----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Answer the question(s); see the class docstring for the call forms."""
        raw, generator = self._parse(args, kwargs)
        params = self._params(kwargs)
        examples = []
        for i, item in enumerate(raw):
            where = "input" if len(raw) == 1 and not generator else f"inputs[{i}]"
            examples.append(self._normalize(item, where))
        if len(examples) == 1 and not generator:
            return self._answer(*examples[0], params, "input")
        return [self._answer(q, c, params, f"inputs[{i}]") for i, (q, c) in enumerate(examples)]

    def _encode(self, question: str, context: str, p: dict[str, Any], where: str) -> Any:
        tok = self.tokenizer
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

    def _answer(
        self, question: str, context: str, p: dict[str, Any], where: str
    ) -> dict[str, Any] | list[dict[str, Any]]:
        tok = self.tokenizer
        question_first = tok.padding_side == "right"
        encoded = self._encode(question, context, p, where)
        num_spans = len(encoded["input_ids"])
        limit = input_token_limit(tok, self.model.config)
        longest = max(len(ids) for ids in encoded["input_ids"])
        if limit is not None and longest > limit:
            raise InvalidRequest(
                f"`max_seq_len` ({p['max_seq_len']}) makes windows of {longest} tokens but the "
                f"model takes at most {limit}"
            )
        top_k: int = p["top_k"]
        align_to_words: bool = p["align_to_words"]
        handle_impossible: bool = p["handle_impossible_answer"]
        pre_topk = top_k * 2 + 10 if align_to_words else top_k  # alignment may drop some
        sequence_index = 1 if question_first else 0
        min_null_score: float = 1000000
        answers: list[dict[str, Any]] = []

        for span in range(num_spans):
            input_ids = encoded["input_ids"][span]
            # p_mask: 1 for tokens that cannot be in the answer (question, special tokens)
            p_mask = np.array(
                [int(seq_id != 1) if question_first else 0 for seq_id in encoded.sequence_ids(span)]
            )
            if tok.cls_token_id is not None:  # keep CLS: models use it for "no answer"
                p_mask[np.array(input_ids) == tok.cls_token_id] = 0
            attention = encoded["attention_mask"][span] if "attention_mask" in encoded else None

            model_inputs = {
                name: torch.tensor([encoded[name][span]], device=self.device)
                for name in tok.model_input_names
                if name in encoded
            }
            with torch.inference_mode():
                output = self.model(**model_inputs)
            start_logits, end_logits = output["start_logits"], output["end_logits"]
            if start_logits.dtype == torch.bfloat16:
                start_logits, end_logits = start_logits.float(), end_logits.float()
            starts, ends, scores, min_null_score = select_starts_ends(
                start_logits.cpu().numpy(),
                end_logits.cpu().numpy(),
                p_mask[None],
                None if attention is None else np.array([attention]),
                min_null_score,
                pre_topk,
                handle_impossible,
                p["max_answer_len"],
            )

            # left padding shifts every position of the (unpadded) encoding
            offset = 0
            if tok.padding_side == "left":
                offset = int(np.sum(np.array(input_ids) == tok.pad_token_id))
            enc = encoded[span]
            for s, e, score in zip(starts, ends, scores, strict=True):
                start_index, end_index = _char_span(
                    enc, int(s) - offset, int(e) - offset, sequence_index, align_to_words
                )
                text = context[start_index:end_index]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score.item()
                else:
                    answers.append(
                        {
                            "score": score.item(),
                            "start": start_index,
                            "end": end_index,
                            "answer": text,
                        }
                    )

        if handle_impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        for a in answers:
            a["score"] = float(a["score"])
        if len(answers) == 1:
            return answers[0]
        return answers


def _char_span(
    enc: Any, s: int, e: int, sequence_index: int, align_to_words: bool
) -> tuple[int, int]:
    """Token span -> character span in the context, widened to whole words (as 4.57)."""
    if align_to_words:
        try:
            start_word = enc.token_to_word(s)
            end_word = enc.token_to_word(e)
            start_index = enc.word_to_chars(start_word, sequence_index=sequence_index)[0]
            end_index = enc.word_to_chars(end_word, sequence_index=sequence_index)[1]
            return int(start_index), int(end_index)
        except Exception:  # tokens without words (CLS) or tokenizers without word ids
            pass
    return int(enc.offsets[s][0]), int(enc.offsets[e][1])
