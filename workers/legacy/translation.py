"""Translation, as transformers 4.57's ``TranslationPipeline``."""

from __future__ import annotations

import re
from typing import Any

from pipeq.errors import InvalidRequest
from pipeq.worker.legacy.common import type_name
from pipeq.worker.legacy.text2text import Text2TextPipeline

#: A task name that picks the languages, as 4.57's ``pipeline()`` accepted it.
TRANSLATION_TASK = re.compile(r"translation_[^_]+_to_[^_]+")


class TranslationPipeline(Text2TextPipeline):
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
        if task != "translation" and not TRANSLATION_TASK.fullmatch(task):
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
                raise InvalidRequest(f"`{name}` must be a string, got {type_name(value)}")
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
