"""Summarization, as transformers 4.57's ``SummarizationPipeline``."""

from __future__ import annotations

from typing import Any

from pipeq.worker.legacy.text2text import Text2TextPipeline


class SummarizationPipeline(Text2TextPipeline):
    """Summarization, as transformers 4.57's ``SummarizationPipeline``.

    ``summ(text)`` gives ``[{"summary_text": ...}]``; ``summ([text, ...])`` gives one
    ``{"summary_text": ...}`` per text (one list per text when ``num_return_sequences > 1``).
    """

    task = "summarization"
    return_name = "summary"

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu") -> None:
        super().__init__(model, tokenizer, task="summarization", device=device)
