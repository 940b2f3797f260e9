"""transformers 4.57's generation settings on transformers 5.

Its defaults, how its pipelines merged them with the model's ``generation_config`` and
``config.task_specific_params``, and the GenerationConfig its ``generate`` used for a call.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import check_int

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


def generation_setting_names() -> frozenset[str]:
    """The generation settings a request may pass (GenerationConfig's attributes)."""
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


class GenerationSettings:
    """The generation settings of one 4.57 text2text pipeline, and each call's GenerationConfig.

    At creation, as 4.57's ``Pipeline.__init__``: the pipeline defaults, then the model's
    non-default settings, then `task_params` (``config.task_specific_params[task]`` without its
    "prefix"), then the tokenizer's pad token.  `settings` is the result.
    """

    def __init__(
        self, model: Any, tokenizer: Any, task: str, task_params: Mapping[str, Any]
    ) -> None:
        self.model = model
        self.task = task
        # 4.57 Pipeline.__init__: pipeline defaults, then the model's non-default settings
        self.model_settings = _as_457(model.generation_config)
        settings = dict(_GENERATION_DEFAULTS_457, **_PIPELINE_GENERATION_DEFAULTS)
        _fill_from_model(settings, self.model_settings)
        if settings.get("max_length") not in (None, 20):  # the model's length beats 256 new
            settings["max_new_tokens"] = None
        # then config.task_specific_params[task]
        known = generation_setting_names() | set(settings)
        settings.update({k: v for k, v in task_params.items() if k in known})
        if settings.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
            settings["pad_token_id"] = tokenizer.pad_token_id
        self.settings = settings
        self.model_is_recent = _version_at_least_450(
            getattr(model.generation_config, "transformers_version", None)
        )

    def config_for(self, call_settings: dict[str, Any]) -> Any:
        """The settings 4.57's ``generate`` would use, as a transformers 5 GenerationConfig."""
        from transformers import GenerationConfig
        from transformers.generation.utils import GENERATION_MODES_MAPPING

        settings = copy.deepcopy(self.settings)
        if self.model_is_recent:
            _fill_from_model(settings, self.model_settings)
        else:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                if settings.get(key) is None:
                    settings[key] = self.model_settings.get(key)
        settings.update(call_settings)

        # Lengths as 4.57 counted them.  The decoder starts from one token (decoder_start).
        user_lengths = {"min_length", "max_length", "min_new_tokens", "max_new_tokens"}
        if user_lengths & set(call_settings):
            self.check_lengths(settings)
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
    def check_lengths(settings: Mapping[str, Any]) -> None:
        """InvalidRequest when a length is not an integer >= 0. A maximum below its minimum
        is not refused: 4.57 (and transformers 5) warn and stop at the maximum, and the
        common `max_length=45` call on distilbart-cnn (whose min_length is 56) relies on it."""
        for name in ("min_length", "max_length", "min_new_tokens", "max_new_tokens"):
            value = settings.get(name)
            if value is not None:
                check_int(name, value, 0)
