"""Answer spans: from a window's start and end logits to answers in the context (4.57)."""

from __future__ import annotations

from typing import Any

import numpy as np


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


class SpanAnswers:
    """The answers of one example, gathered window by window and ranked, as 4.57's postprocess.

    `p` holds the call's parameters (see ``qa_inputs.parse_params``); `context` is the text the
    character offsets of the answers point into.
    """

    def __init__(self, tokenizer: Any, context: str, p: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.context = context
        self.question_first = tokenizer.padding_side == "right"
        self.top_k: int = p["top_k"]
        self.align_to_words: bool = p["align_to_words"]
        self.handle_impossible: bool = p["handle_impossible_answer"]
        self.max_answer_len: int = p["max_answer_len"]
        # alignment may drop some
        self.pre_topk = self.top_k * 2 + 10 if self.align_to_words else self.top_k
        self.sequence_index = 1 if self.question_first else 0
        self.min_null_score: float = 1000000
        self.answers: list[dict[str, Any]] = []

    def add_window(
        self, encoded: Any, span: int, start_logits: np.ndarray, end_logits: np.ndarray
    ) -> None:
        """Add the best spans of window `span` of `encoded` (the tokenizer's output)."""
        tok = self.tokenizer
        input_ids = encoded["input_ids"][span]
        # p_mask: 1 for tokens that cannot be in the answer (question, special tokens)
        p_mask = np.array(
            [
                int(seq_id != 1) if self.question_first else 0
                for seq_id in encoded.sequence_ids(span)
            ]
        )
        if tok.cls_token_id is not None:  # keep CLS: models use it for "no answer"
            p_mask[np.array(input_ids) == tok.cls_token_id] = 0
        attention = encoded["attention_mask"][span] if "attention_mask" in encoded else None

        starts, ends, scores, self.min_null_score = select_starts_ends(
            start_logits,
            end_logits,
            p_mask[None],
            None if attention is None else np.array([attention]),
            self.min_null_score,
            self.pre_topk,
            self.handle_impossible,
            self.max_answer_len,
        )

        # left padding shifts every position of the (unpadded) encoding
        offset = 0
        if tok.padding_side == "left":
            offset = int(np.sum(np.array(input_ids) == tok.pad_token_id))
        enc = encoded[span]
        for s, e, score in zip(starts, ends, scores, strict=True):
            start_index, end_index = _char_span(
                enc, int(s) - offset, int(e) - offset, self.sequence_index, self.align_to_words
            )
            text = self.context[start_index:end_index]
            same = next((a for a in self.answers if a["answer"].lower() == text.lower()), None)
            if same is not None:
                same["score"] += score.item()
            else:
                self.answers.append(
                    {
                        "score": score.item(),
                        "start": start_index,
                        "end": end_index,
                        "answer": text,
                    }
                )

    def best(self) -> dict[str, Any] | list[dict[str, Any]]:
        """The `top_k` best answers: one dict, or a list of them when there are several."""
        answers = list(self.answers)
        if self.handle_impossible:
            answers.append({"score": self.min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: self.top_k]
        for a in answers:
            a["score"] = float(a["score"])
        if len(answers) == 1:
            return answers[0]
        return answers
