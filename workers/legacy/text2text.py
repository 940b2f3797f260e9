"""4.57's Text2TextGenerationPipeline, the base of summarization and translation."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import (
    VERY_LARGE,
    check_bool,
    check_int,
    input_token_limit,
    resolve_device,
    to_device,
    type_name,
    unknown_params,
)

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


class Text2TextPipeline:
    """4.57's Text2TextGenerationPipeline, the base of summarization and translation."""

    task = "text2text-generation"
    return_name = "generated"

    def __init__(
        self, model: Any, tokenizer: Any, *, task: str | None = None, device: str = "cpu"
    ) -> None:
        self.device = resolve_device(device)
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
        return input_token_limit(self.tokenizer, self.model.config)

    # -- parameters --------------------------------------------------------------------------

    def _split_params(
        self, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(preprocess, generate, postprocess) parameters, as 4.57's ``_sanitize_parameters``."""
        unknown = set(kwargs) - self._call_params
        if unknown:
            raise unknown_params(self.task, unknown)
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
            post["tensors"] = check_bool("return_tensors", kwargs["return_tensors"])
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
            ids = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
            if not ids:
                raise InvalidRequest("`stop_sequence` encodes to no token")
            gen["eos_token_id"] = ids[0]  # 4.57 stops on the first token only
        for name in ("batch_size", "num_workers"):
            if kwargs.get(name) is not None:
                check_int(name, kwargs[name], 0 if name == "num_workers" else 1)
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
                check_int(name, value, 0)
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
                f"{self.task} input must be a string or a list of strings, got {type_name(inputs)}"
            )
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidRequest(f"inputs[{i}] must be a string, got {type_name(text)}")
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
            if limit < getattr(self.tokenizer, "model_max_length", VERY_LARGE):
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
                    **to_device(model_inputs, self.device), generation_config=config
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
