"""question-answering, summarization and translation pipelines for transformers 5.

transformers 5 removed these pipelines (and text2text-generation) but still loads their models
with ``AutoModelForQuestionAnswering`` and ``AutoModelForSeq2SeqLM``.  The classes here re-create
the transformers 4.57 pipelines on top of those models: the same call forms, the same parameters,
the same result shapes and the same semantics (answer-span search, overlapping windows over long
contexts, merge of the generation settings from the pipeline defaults, the model's
``generation_config``, ``config.task_specific_params`` and the call).  The logic is a rewrite of
transformers 4.57.6's ``pipelines/question_answering.py``, ``pipelines/text2text_generation.py``
and ``pipelines/base.py`` (Apache-2.0); ``tests/test_legacy_pipelines.py`` checks it against
outputs recorded from 4.57.6 itself.

What differs from 4.57, on purpose: one thing.

* Summarization and translation inputs longer than the model accepts (the smaller of
  ``tokenizer.model_max_length`` and ``config.max_position_embeddings``) raise
  :class:`~pipeq.errors.InvalidRequest` naming the length and the limit unless the caller passes
  ``truncation=True`` (4.57 only logged a warning, then the model failed or misbehaved).

Everything 4.57 answered is answered the same way.  What 4.57 did not answer sensibly (a crash, an
obscure error from deep inside, or a result after a mere log warning) is refused up front with
:class:`~pipeq.errors.InvalidRequest` naming the field, so that no bad request can take a worker
down: a missing, ``None``, non-string, empty or blank question or context (4.57 answered a blank
context with an empty answer), a question that leaves no room for the context in
``max_seq_len``, a ``doc_stride`` that does not fit in a window (a panic in ``tokenizers``),
windows longer than the model's positions, ``max_length`` below ``min_length`` when the call sets
either (4.57 warned and cut the output at ``max_length``), parameters of the wrong type or range,
parameters the task does not know (4.57 ignored them for question answering and failed inside
``generate`` otherwise), and generation modes transformers 5 moved to the Hub (group beam search,
contrastive search, DoLa, constrained beam search).

Also worth knowing: results are plain JSON-able Python, so ``return_tensors=True`` gives the token
ids as a list of ints where 4.57 gave a tensor; question answering needs a fast
(``tokenizers``-backed) tokenizer, as it needs the offsets; ``batch_size`` and ``num_workers`` are
accepted but items run one at a time, as with 4.57's default ``batch_size=1`` (padding inputs into
batches would move the numbers slightly); generator inputs to question answering give a list.
"""

from __future__ import annotations

import copy
import math
import re
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipeq.errors import InvalidRequest, ModelLoadError

__all__ = [
    "LEGACY_TASKS",
    "QuestionAnsweringPipeline",
    "SummarizationPipeline",
    "TranslationPipeline",
    "load_legacy_pipeline",
]

#: The tasks served here (``translation_xx_to_yy`` is accepted by :func:`load_legacy_pipeline`).
LEGACY_TASKS: frozenset[str] = frozenset({"question-answering", "summarization", "translation"})

_TRANSLATION_TASK = re.compile(r"translation_[^_]+_to_[^_]+")
#: tokenizer.model_max_length at or above this means "no limit" (transformers' VERY_LARGE_INTEGER)
_VERY_LARGE = int(1e20)

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "cpu" or device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        return torch.device(device)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"`{name}` must be an integer, got {_type_name(value)}")
    if value < minimum:
        raise InvalidRequest(f"`{name}` must be >= {minimum} (got {value})")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidRequest(f"`{name}` must be true or false, got {_type_name(value)}")
    return bool(value)


def _unknown(task: str, names: Iterable[str]) -> InvalidRequest:
    listed = ", ".join(f"`{n}`" for n in sorted(names))
    return InvalidRequest(f"unknown parameter(s) for {task}: {listed}")


def _max_input_tokens(tokenizer: Any, config: Any) -> int | None:
    """The smaller of tokenizer.model_max_length and config.max_position_embeddings, if set."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _VERY_LARGE:
        limits.append(tok_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# question answering
# ---------------------------------------------------------------------------------------------

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
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    # -- inputs ------------------------------------------------------------------------------

    @staticmethod
    def _check_text(field: str, value: Any) -> str:
        if value is None:
            raise InvalidRequest(f"`{field}` cannot be None")
        if not isinstance(value, str):
            raise InvalidRequest(f"`{field}` must be a string, got {_type_name(value)}")
        if not value.strip():
            raise InvalidRequest(f"`{field}` cannot be empty")
        return value

    def _normalize(self, item: Any, where: str) -> tuple[str, str]:
        if not isinstance(item, Mapping):
            raise InvalidRequest(
                f"{where} must be a dict with `question` and `context`, got {_type_name(item)}"
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
                f"list of them, got {_type_name(inputs)}"
            )
        else:
            inputs = list(inputs)
        return inputs, generator

    def _params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - _QA_PARAMS
        if unknown:
            raise _unknown(self.task, unknown)
        p: dict[str, Any] = {}
        top_k = kwargs.get("top_k")
        if top_k is None:
            top_k = kwargs.get("topk")
        p["top_k"] = 1 if top_k is None else _check_int("top_k", top_k, 1)
        mal = kwargs.get("max_answer_len")
        p["max_answer_len"] = 15 if mal is None else _check_int("max_answer_len", mal, 1)
        hia = kwargs.get("handle_impossible_answer")
        p["handle_impossible_answer"] = (
            False if hia is None else _check_bool("handle_impossible_answer", hia)
        )
        atw = kwargs.get("align_to_words")
        p["align_to_words"] = True if atw is None else _check_bool("align_to_words", atw)
        max_seq_len = kwargs.get("max_seq_len")
        if max_seq_len is None:
            max_seq_len = min(int(self.tokenizer.model_max_length), 384)
        else:
            max_seq_len = _check_int("max_seq_len", max_seq_len, 1)
        doc_stride = kwargs.get("doc_stride")
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        else:
            doc_stride = _check_int("doc_stride", doc_stride, 0)
        if doc_stride > max_seq_len:
            raise InvalidRequest(
                f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})"
            )
        p["max_seq_len"], p["doc_stride"] = max_seq_len, doc_stride
        if kwargs.get("max_question_len") is not None:  # used by 4.57's slow tokenizers only
            _check_int("max_question_len", kwargs["max_question_len"], 1)
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
                _check_int(name, kwargs[name], 0 if name == "num_workers" else 1)
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
        limit = _max_input_tokens(tok, self.model.config)
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


# ---------------------------------------------------------------------------------------------
# summarization and translation
# ---------------------------------------------------------------------------------------------

#: transformers 4.57's ``GenerationConfig()`` values that are not None; these are also the values
#: transformers 5 falls back to, but 5 leaves the attributes unset (None) in a fresh config.
_GENERATION_DEFAULTS_457: dict[str, Any] = {
    "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10,
    "disable_compile": False,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "is_assistant": False,
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "repetition_penalty": 1.0,
    "return_dict_in_generate": False,
    "target_lookbehind": 10,
    "temperature": 1.0,
    "token_healing": False,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "use_cache": True,
}
#: 4.57's Text2TextGenerationPipeline default generation config (over the global defaults).
_PIPELINE_GENERATION_DEFAULTS = {"max_new_tokens": 256, "num_beams": 4}
#: Generation settings that make no sense in a JSON request (objects, callables, outputs that
#: 4.57's postprocess would drop) and that are rejected as unknown.
_NOT_REQUEST_SETTINGS = frozenset(
    {
        "transformers_version",
        "watermarking_config",
        "compile_config",
        "cache_config",
        "continuous_batching_config",
        "return_dict_in_generate",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "is_assistant",
    }
)
_TEXT2TEXT_PARAMS = frozenset(
    {
        "return_tensors",
        "return_text",
        "return_type",
        "clean_up_tokenization_spaces",
        "truncation",
        "stop_sequence",
        "batch_size",
        "num_workers",
    }
)
_TRUNCATION_STRATEGIES = frozenset(
    {"longest_first", "only_first", "only_second", "do_not_truncate"}
)
#: Checks of the common generation settings a request may pass: transformers 5 does not check
#: all of them and fails deep inside ``generate`` (division by zero, index errors) instead.
_INT_SETTINGS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "max_length": 0,
    "min_length": 0,
    "max_new_tokens": 0,
    "min_new_tokens": 0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "top_k": 0,
}
_FLOAT_SETTINGS: dict[str, tuple[float | None, float | None]] = {  # inclusive bounds
    "temperature": (0.0, None),
    "top_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "epsilon_cutoff": (0.0, 1.0),
    "eta_cutoff": (0.0, 1.0),
    "repetition_penalty": (0.0, None),
    "encoder_repetition_penalty": (0.0, None),
    "length_penalty": (None, None),
    "diversity_penalty": (0.0, None),
    "max_time": (0.0, None),
}
_BOOL_SETTINGS = frozenset(
    {"do_sample", "use_cache", "renormalize_logits", "remove_invalid_values"}
)
_TOKEN_SETTINGS = frozenset(
    {
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "forced_bos_token_id",
        "forced_eos_token_id",
    }
)
_TOKEN_LIST_SETTINGS = frozenset({"suppress_tokens", "begin_suppress_tokens"})


def _check_token(name: str, value: Any, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"`{name}` must hold token ids (integers), got {_type_name(value)}")
    if not 0 <= value < vocab_size:
        raise InvalidRequest(
            f"`{name}`: token id {value} is outside the vocabulary (0..{vocab_size - 1})"
        )


def _check_setting(name: str, value: Any, vocab_size: int) -> None:
    """InvalidRequest naming `name` when a generation setting has the wrong type or range."""
    if value is None:
        return
    if name in _INT_SETTINGS:
        _check_int(name, value, _INT_SETTINGS[name])
    elif name in _FLOAT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidRequest(f"`{name}` must be a number, got {_type_name(value)}")
        low, high = _FLOAT_SETTINGS[name]
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InvalidRequest(f"`{name}` must be {bounds} (got {value})")
    elif name in _BOOL_SETTINGS:
        _check_bool(name, value)
    elif name == "early_stopping":
        if value != "never":
            _check_bool(name, value)
    elif name in _TOKEN_SETTINGS:
        for token in value if isinstance(value, list) else [value]:
            _check_token(name, token, vocab_size)
    elif name in _TOKEN_LIST_SETTINGS:
        if not isinstance(value, list):
            raise InvalidRequest(f"`{name}` must be a list of token ids, got {_type_name(value)}")
        for token in value:
            _check_token(name, token, vocab_size)
    elif name == "bad_words_ids":
        if not isinstance(value, list) or not all(isinstance(seq, list) and seq for seq in value):
            raise InvalidRequest("`bad_words_ids` must be a list of non-empty lists of token ids")
        for seq in value:
            for token in seq:
                _check_token(name, token, vocab_size)


def _generation_setting_names() -> frozenset[str]:
    from transformers import GenerationConfig

    config_class: Any = GenerationConfig  # untyped constructor
    names = {k for k in vars(config_class()) if not k.startswith("_")}
    names |= set(_GENERATION_DEFAULTS_457)
    return frozenset(names - _NOT_REQUEST_SETTINGS)


def _as_457(generation_config: Any) -> dict[str, Any]:
    """A transformers 5 GenerationConfig as 4.57 saw it: unset values are 4.57's defaults."""
    values = {
        k: copy.deepcopy(v)
        for k, v in vars(generation_config).items()
        if not k.startswith("_") and k != "transformers_version"
    }
    for key, default in _GENERATION_DEFAULTS_457.items():
        if values.get(key) is None:
            values[key] = default
    return values


def _version_at_least_450(version: str | None) -> bool:
    if not version:
        return True  # 4.57 stamped configs it built itself with its own version
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return True
    return (int(match.group(1)), int(match.group(2))) >= (4, 50)


def _fill_from_model(settings: dict[str, Any], model_settings: Mapping[str, Any]) -> None:
    """4.57's ``use_model_defaults``: a setting still at the global default takes the model's."""
    for key, model_value in model_settings.items():
        if key == "cache_implementation" and model_value == "hybrid":
            continue
        default = _GENERATION_DEFAULTS_457.get(key)
        if settings.get(key) == default and model_value != default:
            settings[key] = copy.deepcopy(model_value)
    if settings.get("temperature") == 0.0:
        settings["do_sample"] = False


class _Text2TextPipeline:
    """4.57's Text2TextGenerationPipeline, the base of summarization and translation."""

    task = "text2text-generation"
    return_name = "generated"

    def __init__(
        self, model: Any, tokenizer: Any, *, task: str | None = None, device: str = "cpu"
    ) -> None:
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if task is not None:
            self.task = task
        config = model.config
        prefix = getattr(config, "prefix", None)
        self.prefix: str | None = prefix if isinstance(prefix, str) else None

        # 4.57 Pipeline.__init__: pipeline defaults, then the model's non-default settings
        self._model_settings = _as_457(model.generation_config)
        settings = dict(_GENERATION_DEFAULTS_457, **_PIPELINE_GENERATION_DEFAULTS)
        _fill_from_model(settings, self._model_settings)
        if settings.get("max_length") not in (None, 20):  # the model's length beats 256 new
            settings["max_new_tokens"] = None
        # then config.task_specific_params[task] (its "prefix" is the pipeline's prefix)
        task_params = dict((getattr(config, "task_specific_params", None) or {}).get(self.task, {}))
        if "prefix" in task_params:
            self.prefix = task_params.pop("prefix")
        known = _generation_setting_names() | set(settings)
        settings.update({k: v for k, v in task_params.items() if k in known})
        if settings.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
            settings["pad_token_id"] = tokenizer.pad_token_id
        self.generation_settings = settings
        self._model_is_recent = _version_at_least_450(
            getattr(model.generation_config, "transformers_version", None)
        )
        self._call_params = _TEXT2TEXT_PARAMS | _generation_setting_names()
        vocab_size = getattr(config, "vocab_size", None)
        self._vocab_size = vocab_size if isinstance(vocab_size, int) else len(tokenizer)

    # -- limits ------------------------------------------------------------------------------

    @property
    def max_input_tokens(self) -> int | None:
        """The longest input the model takes (tokenizer.model_max_length, max positions)."""
        return _max_input_tokens(self.tokenizer, self.model.config)

    # -- parameters --------------------------------------------------------------------------

    def _split_params(
        self, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(preprocess, generate, postprocess) parameters, as 4.57's ``_sanitize_parameters``."""
        unknown = set(kwargs) - self._call_params
        if unknown:
            raise _unknown(self.task, unknown)
        pre: dict[str, Any] = {}
        post: dict[str, Any] = {"tensors": False, "clean_up_tokenization_spaces": False}
        gen = {k: v for k, v in kwargs.items() if k not in _TEXT2TEXT_PARAMS}

        truncation = kwargs.get("truncation")
        if truncation is not None:
            if not isinstance(truncation, bool) and truncation not in _TRUNCATION_STRATEGIES:
                raise InvalidRequest(
                    "`truncation` must be true, false or one of "
                    f"{', '.join(sorted(_TRUNCATION_STRATEGIES))}; got {truncation!r}"
                )
            pre["truncation"] = truncation

        return_type = kwargs.get("return_type")
        if kwargs.get("return_tensors") is not None and return_type is None:
            post["tensors"] = _check_bool("return_tensors", kwargs["return_tensors"])
        elif return_type is not None:
            if return_type in (0, "tensors", "TENSORS"):
                post["tensors"] = True
            elif return_type in (1, "text", "TEXT"):
                post["tensors"] = False
            else:
                raise InvalidRequest(
                    f"`return_type` must be 'text' or 'tensors', got {return_type!r}"
                )
        if kwargs.get("return_text") is not None:  # accepted and, as in 4.57, without effect
            _check_bool("return_text", kwargs["return_text"])
        if kwargs.get("clean_up_tokenization_spaces") is not None:
            post["clean_up_tokenization_spaces"] = _check_bool(
                "clean_up_tokenization_spaces", kwargs["clean_up_tokenization_spaces"]
            )

        stop_sequence = kwargs.get("stop_sequence")
        if stop_sequence is not None:
            if not isinstance(stop_sequence, str):
                raise InvalidRequest(
                    f"`stop_sequence` must be a string, got {_type_name(stop_sequence)}"
                )
            ids = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
            if not ids:
                raise InvalidRequest("`stop_sequence` encodes to no token")
            gen["eos_token_id"] = ids[0]  # 4.57 stops on the first token only
        for name in ("batch_size", "num_workers"):
            if kwargs.get(name) is not None:
                _check_int(name, kwargs[name], 0 if name == "num_workers" else 1)
        vocab_size = self._vocab_size
        for name, value in gen.items():
            _check_setting(name, value, vocab_size)
        return pre, gen, post

    def _generation_config(self, call_settings: dict[str, Any]) -> Any:
        """The settings 4.57's ``generate`` would use, as a transformers 5 GenerationConfig."""
        from transformers import GenerationConfig
        from transformers.generation.utils import GENERATION_MODES_MAPPING

        settings = copy.deepcopy(self.generation_settings)
        if self._model_is_recent:
            _fill_from_model(settings, self._model_settings)
        else:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                if settings.get(key) is None:
                    settings[key] = self._model_settings.get(key)
        settings.update(call_settings)

        # Lengths as 4.57 counted them.  The decoder starts from one token (decoder_start).
        user_lengths = {"min_length", "max_length", "min_new_tokens", "max_new_tokens"}
        if user_lengths & set(call_settings):
            self._check_lengths(settings)
        if (
            settings.get("max_new_tokens") is None
            and call_settings.get("max_length") is None
            and settings.get("max_length") == 20
        ):  # 4.57: a default max_length means 20 *new* tokens
            max_length = 21
            positions = getattr(self.model.config, "max_position_embeddings", None)
            if isinstance(positions, int):
                max_length = min(max_length, positions)
            settings["max_length"] = max_length
        # transformers 5 fills unset settings from the model's generation config; 4.57 did not
        # when the pipeline had cleared them.  Pin the lengths that would otherwise change.
        model_config = self.model.generation_config
        if settings.get("max_new_tokens") is None and model_config.max_new_tokens is not None:
            settings["max_new_tokens"] = int(settings["max_length"]) - 1
        if settings.get("min_new_tokens") is None and model_config.min_new_tokens is not None:
            settings["min_new_tokens"] = max(int(settings.get("min_length") or 0) - 1, 0)

        try:
            config_class: Any = GenerationConfig  # untyped constructor
            config = config_class(**settings)
            config.validate()
            mode = config.get_generation_mode()
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"invalid generation parameters for {self.task}: {e}") from e
        if "/" in GENERATION_MODES_MAPPING.get(mode, ""):
            raise InvalidRequest(
                f"{mode.name.replace('_', ' ').lower()} (asked for by the generation parameters) "
                "is not available with transformers 5"
            )
        return config

    @staticmethod
    def _check_lengths(settings: Mapping[str, Any]) -> None:
        for name in ("min_length", "max_length", "min_new_tokens", "max_new_tokens"):
            value = settings.get(name)
            if value is not None:
                _check_int(name, value, 0)
        min_new, max_new = settings.get("min_new_tokens"), settings.get("max_new_tokens")
        if min_new is not None and max_new is not None and max_new < min_new:
            raise InvalidRequest(
                f"`max_new_tokens` ({max_new}) is below `min_new_tokens` ({min_new})"
            )
        if max_new is None and min_new is None:
            min_length, max_length = settings.get("min_length"), settings.get("max_length")
            if min_length is not None and max_length is not None and max_length < min_length:
                raise InvalidRequest(
                    f"`max_length` ({max_length}) is below `min_length` ({min_length})"
                )

    # -- running -----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Generate for one text (a list of result dicts) or a list of texts (one result each)."""
        if "inputs" in kwargs and not args:
            args = (kwargs.pop("inputs"),)
        if len(args) != 1:
            raise InvalidRequest(
                f"{self.task} takes one positional input (a string or a list of strings), "
                f"got {len(args)}"
            )
        inputs = args[0]
        pre, gen, post = self._split_params(kwargs)
        if isinstance(inputs, str):
            return self._run_one(inputs, "input", pre, gen, post)
        if not isinstance(inputs, list | tuple):
            raise InvalidRequest(
                f"{self.task} input must be a string or a list of strings, got {_type_name(inputs)}"
            )
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidRequest(f"inputs[{i}] must be a string, got {_type_name(text)}")
        results = [
            self._run_one(text, f"inputs[{i}]", pre, gen, post) for i, text in enumerate(inputs)
        ]
        if all(len(r) == 1 for r in results):
            return [r[0] for r in results]
        return results

    def _tokenize(self, text: str, pre: dict[str, Any]) -> dict[str, Any]:
        prefix = self.prefix if self.prefix is not None else ""
        return dict(self._tokenize_call(prefix + text, pre))

    def _tokenize_call(self, text: str, pre: dict[str, Any]) -> Mapping[str, Any]:
        truncation = pre.get("truncation", False)
        extra: dict[str, Any] = {}
        limit = self.max_input_tokens
        if truncation not in (False, "do_not_truncate") and limit is not None:
            if limit < getattr(self.tokenizer, "model_max_length", _VERY_LARGE):
                extra["max_length"] = limit
        return self.tokenizer(  # type: ignore[no-any-return]
            text, padding=False, truncation=truncation, return_tensors="pt", **extra
        )

    def _run_one(
        self,
        text: str,
        where: str,
        pre: dict[str, Any],
        gen: dict[str, Any],
        post: dict[str, Any],
    ) -> list[dict[str, Any]]:
        model_inputs = self._tokenize(text, pre)
        model_inputs.pop("token_type_ids", None)  # made by some tokenizers, refused by generate
        call_settings = dict(gen)
        # tokenizers with _build_translation_inputs add generation settings (forced_bos_token_id)
        for key in list(model_inputs):
            if not isinstance(model_inputs[key], torch.Tensor):
                call_settings.setdefault(key, model_inputs.pop(key))
        length = int(model_inputs["input_ids"].shape[-1])
        limit = self.max_input_tokens
        if limit is not None and length > limit:
            raise InvalidRequest(
                f"{where} is {length} tokens long but the model takes at most {limit}; "
                "pass truncation=True to cut it to that length"
            )
        config = self._generation_config(call_settings)
        in_b = int(model_inputs["input_ids"].shape[0])
        try:
            with torch.inference_mode():
                output_ids = self.model.generate(
                    **_to_device(model_inputs, self.device), generation_config=config
                )
        except (ValueError, TypeError) as e:  # generate's checks of its parameters
            raise InvalidRequest(f"invalid generation parameters for {self.task}: {e}") from e
        output_ids = output_ids.cpu()
        output_ids = output_ids.reshape(in_b, output_ids.shape[0] // in_b, *output_ids.shape[1:])
        records: list[dict[str, Any]] = []
        for ids in output_ids[0]:
            if post["tensors"]:
                records.append({f"{self.return_name}_token_ids": [int(t) for t in ids.tolist()]})
            else:
                text_out = self.tokenizer.decode(
                    ids,
                    skip_special_tokens=True,
                    clean_up_tokenization_spaces=post["clean_up_tokenization_spaces"],
                )
                records.append({f"{self.return_name}_text": str(text_out)})
        return records


class SummarizationPipeline(_Text2TextPipeline):
    """Summarization, as transformers 4.57's ``SummarizationPipeline``.

    ``summ(text)`` gives ``[{"summary_text": ...}]``; ``summ([text, ...])`` gives one
    ``{"summary_text": ...}`` per text (one list per text when ``num_return_sequences > 1``).
    """

    task = "summarization"
    return_name = "summary"

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu") -> None:
        super().__init__(model, tokenizer, task="summarization", device=device)


class TranslationPipeline(_Text2TextPipeline):
    """Translation, as transformers 4.57's ``TranslationPipeline``.

    ``task`` is "translation" or "translation_xx_to_yy".  With plain "translation" and a model
    whose ``config.task_specific_params`` has ``translation_*`` entries (T5), the first one is
    used, as 4.57's ``pipeline()`` did.  ``src_lang``/``tgt_lang`` matter only for multilingual
    tokenizers (mBART, NLLB, M2M100); they default to the languages in the task name.
    """

    task = "translation"
    return_name = "translation"

    def __init__(
        self, model: Any, tokenizer: Any, *, task: str = "translation", device: str = "cpu"
    ) -> None:
        if task != "translation" and not _TRANSLATION_TASK.fullmatch(task):
            raise ValueError(f"not a translation task: {task!r}")
        if task == "translation":
            for key in getattr(model.config, "task_specific_params", None) or {}:
                if key.startswith("translation"):
                    task = key
                    break
        super().__init__(model, tokenizer, task=task, device=device)
        self._call_params = self._call_params | {"src_lang", "tgt_lang"}

    def _split_params(
        self, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        langs = {k: kwargs.pop(k) for k in ("src_lang", "tgt_lang") if k in kwargs}
        pre, gen, post = super()._split_params(kwargs)
        for name, value in langs.items():
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"`{name}` must be a string, got {_type_name(value)}")
        src_lang, tgt_lang = langs.get("src_lang"), langs.get("tgt_lang")
        if src_lang is None and tgt_lang is None:
            items = self.task.split("_")
            if len(items) == 4:  # translation, XX, to, YY
                src_lang, tgt_lang = items[1], items[3]
        pre["src_lang"], pre["tgt_lang"] = src_lang, tgt_lang
        return pre, gen, post

    def _tokenize(self, text: str, pre: dict[str, Any]) -> dict[str, Any]:
        build = getattr(self.tokenizer, "_build_translation_inputs", None)
        if build is None:
            return super()._tokenize(text, pre)
        truncation = pre.get("truncation", False)
        try:
            return dict(
                build(
                    text,
                    return_tensors="pt",
                    truncation=truncation,
                    src_lang=pre.get("src_lang"),
                    tgt_lang=pre.get("tgt_lang"),
                )
            )
        except (ValueError, KeyError) as e:
            raise InvalidRequest(f"translation needs a valid `src_lang` and `tgt_lang`: {e}") from e


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_legacy_pipeline(
    task: str, model: str, *, revision: str | None = None, device: str = "cpu"
) -> Callable[..., Any]:
    """Load `model` (hub id or directory) and its tokenizer for `task` on `device`."""
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    is_translation = task == "translation" or bool(_TRANSLATION_TASK.fullmatch(task))
    if task not in LEGACY_TASKS and not is_translation:
        raise ValueError(
            f"not a legacy task: {task!r} (expected one of {sorted(LEGACY_TASKS)} "
            "or translation_xx_to_yy)"
        )
    _resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    if task == "question-answering":
        qa_model = AutoModelForQuestionAnswering.from_pretrained(
            model, revision=revision, dtype="auto"
        )
        return QuestionAnsweringPipeline(qa_model, tokenizer, device=device)
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(model, revision=revision, dtype="auto")
    if task == "summarization":
        return SummarizationPipeline(seq2seq, tokenizer, device=device)
    return TranslationPipeline(seq2seq, tokenizer, task=task, device=device)
