"""The parameters of a summarization or translation call, checked as 4.57 would use them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import check_bool, check_int, type_name, unknown_params

#: The parameters of a call that are not generation settings.
TEXT2TEXT_PARAMS = frozenset(
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
        raise InvalidRequest(f"`{name}` must hold token ids (integers), got {type_name(value)}")
    if not 0 <= value < vocab_size:
        raise InvalidRequest(
            f"`{name}`: token id {value} is outside the vocabulary (0..{vocab_size - 1})"
        )


def _check_setting(name: str, value: Any, vocab_size: int) -> None:
    """InvalidRequest naming `name` when a generation setting has the wrong type or range."""
    if value is None:
        return
    if name in _INT_SETTINGS:
        check_int(name, value, _INT_SETTINGS[name])
    elif name in _FLOAT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidRequest(f"`{name}` must be a number, got {type_name(value)}")
        low, high = _FLOAT_SETTINGS[name]
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InvalidRequest(f"`{name}` must be {bounds} (got {value})")
    elif name in _BOOL_SETTINGS:
        check_bool(name, value)
    elif name == "early_stopping":
        if value != "never":
            check_bool(name, value)
    elif name in _TOKEN_SETTINGS:
        for token in value if isinstance(value, list) else [value]:
            _check_token(name, token, vocab_size)
    elif name in _TOKEN_LIST_SETTINGS:
        if not isinstance(value, list):
            raise InvalidRequest(f"`{name}` must be a list of token ids, got {type_name(value)}")
        for token in value:
            _check_token(name, token, vocab_size)
    elif name == "bad_words_ids":
        if not isinstance(value, list) or not all(isinstance(seq, list) and seq for seq in value):
            raise InvalidRequest("`bad_words_ids` must be a list of non-empty lists of token ids")
        for seq in value:
            for token in seq:
                _check_token(name, token, vocab_size)


def split_params(
    kwargs: dict[str, Any],
    *,
    task: str,
    call_params: frozenset[str],
    tokenizer: Any,
    vocab_size: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(preprocess, generate, postprocess) parameters, as 4.57's ``_sanitize_parameters``.

    `call_params` are the parameters the pipeline knows: TEXT2TEXT_PARAMS and the
    generation settings (and translation's languages); `vocab_size` bounds token ids.
    """
    unknown = set(kwargs) - call_params
    if unknown:
        raise unknown_params(task, unknown)
    pre: dict[str, Any] = {}
    post: dict[str, Any] = {"tensors": False, "clean_up_tokenization_spaces": False}
    gen = {k: v for k, v in kwargs.items() if k not in TEXT2TEXT_PARAMS}

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
        post["tensors"] = check_bool("return_tensors", kwargs["return_tensors"])
    elif return_type is not None:
        if return_type in (0, "tensors", "TENSORS"):
            post["tensors"] = True
        elif return_type in (1, "text", "TEXT"):
            post["tensors"] = False
        else:
            raise InvalidRequest(f"`return_type` must be 'text' or 'tensors', got {return_type!r}")
    if kwargs.get("return_text") is not None:  # accepted and, as in 4.57, without effect
        check_bool("return_text", kwargs["return_text"])
    if kwargs.get("clean_up_tokenization_spaces") is not None:
        post["clean_up_tokenization_spaces"] = check_bool(
            "clean_up_tokenization_spaces", kwargs["clean_up_tokenization_spaces"]
        )

    stop_sequence = kwargs.get("stop_sequence")
    if stop_sequence is not None:
        if not isinstance(stop_sequence, str):
            raise InvalidRequest(
                f"`stop_sequence` must be a string, got {type_name(stop_sequence)}"
            )
        ids = tokenizer.encode(stop_sequence, add_special_tokens=False)
        if not ids:
            raise InvalidRequest("`stop_sequence` encodes to no token")
        gen["eos_token_id"] = ids[0]  # 4.57 stops on the first token only
    for name in ("batch_size", "num_workers"):
        if kwargs.get(name) is not None:
            check_int(name, kwargs[name], 0 if name == "num_workers" else 1)
    for name, value in gen.items():
        _check_setting(name, value, vocab_size)
    return pre, gen, post
