"""4.57's Text2TextGenerationPipeline, the base of summarization and translation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import (
    VERY_LARGE,
    input_token_limit,
    resolve_device,
    to_device,
    type_name,
)
from pipeq.worker.legacy.generation import GenerationSettings, generation_setting_names
from pipeq.worker.legacy.text2text_params import TEXT2TEXT_PARAMS, split_params


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

        # config.task_specific_params[task] (its "prefix" is the pipeline's prefix)
        task_params = dict((getattr(config, "task_specific_params", None) or {}).get(self.task, {}))
        if "prefix" in task_params:
            self.prefix = task_params.pop("prefix")
        self._generation = GenerationSettings(self.model, tokenizer, self.task, task_params)
        self.generation_settings = self._generation.settings
        self._call_params = TEXT2TEXT_PARAMS | generation_setting_names()
        vocab_size = getattr(config, "vocab_size", None)
        self._vocab_size = vocab_size if isinstance(vocab_size, int) else len(tokenizer)
        #: pipeq's worker: (decode kwargs) -> a streamer for the text generated now, or
        #: None; used where generate() takes one (one beam, one sequence)
        self.streamer_for: Any = None

    # -- limits ------------------------------------------------------------------------------

    @property
    def max_input_tokens(self) -> int | None:
        """The longest input the model takes (tokenizer.model_max_length, max positions)."""
        return input_token_limit(self.tokenizer, self.model.config)

    @property
    def max_output_tokens(self) -> int | None:
        """The most tokens the decoder takes, as `generate`'s max_length counts them (its
        start token included): its position embeddings (BART's learned ones, Marian's
        sinusoids: a position past them is an IndexError). None for a decoder without a
        table of positions (T5's are relative)."""
        if getattr(self.model.get_decoder(), "embed_positions", None) is None:
            return None
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return positions if isinstance(positions, int) and positions > 0 else None

    def generation_config(self, kwargs: Mapping[str, Any]) -> Any:
        """The GenerationConfig a call with `kwargs` generates with (its generation
        settings only; the tokenizer is not used). InvalidRequest for bad settings."""
        names = generation_setting_names()
        return self._generation.config_for({k: v for k, v in kwargs.items() if k in names})

    def check_output_length(self, config: Any, input_tokens: int, where: str) -> None:
        """InvalidRequest when `config` asks the decoder for more tokens than it takes
        (transformers warns, then fails with an IndexError once it gets there)."""
        limit = self.max_output_tokens
        if limit is None:
            return
        if config.max_new_tokens is not None:
            total = 1 + int(config.max_new_tokens)
            asked = f"max_new_tokens={config.max_new_tokens} (after the decoder's start token)"
        else:
            total, asked = int(config.max_length), f"max_length={config.max_length}"
        if total > limit:
            raise InvalidRequest(
                f"{where} is {input_tokens} tokens long and asks for {asked}: {total} decoder "
                f"tokens; the model's decoder takes at most {limit}: ask for fewer new tokens"
            )

    # -- parameters --------------------------------------------------------------------------

    def _split_params(
        self, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(preprocess, generate, postprocess) parameters, as 4.57's ``_sanitize_parameters``."""
        return split_params(
            kwargs,
            task=self.task,
            call_params=self._call_params,
            tokenizer=self.tokenizer,
            vocab_size=self._vocab_size,
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
        config = self._generation.config_for(call_settings)
        self.check_output_length(config, length, where)
        in_b = int(model_inputs["input_ids"].shape[0])
        streamer = None
        one_row = (config.num_beams or 1) == 1 and (config.num_return_sequences or 1) == 1
        if self.streamer_for is not None and one_row and not post["tensors"]:
            decode = {"clean_up_tokenization_spaces": post["clean_up_tokenization_spaces"]}
            streamer = self.streamer_for(decode)
        try:
            with torch.inference_mode():
                output_ids = self.model.generate(
                    **to_device(model_inputs, self.device),
                    generation_config=config,
                    streamer=streamer,
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
