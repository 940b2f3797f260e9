"""Load a deployment's model once and run lists of items through it.

A handler wraps a `transformers.pipeline` (or, for the tasks transformers 5 removed,
pipeq's own `legacy` pipelines) behind one contract: `run(items, params)` takes a list
of items and returns, for each, exactly what `pipe(item, **params)` would return, as
plain JSON-able lists, dicts, strings and numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeq._config import Deployment
from pipeq.errors import JobTimeout, ModelLoadError
from pipeq.worker.batcher import BatchError, length_in_chars

__all__ = ["GENERATING", "Handler", "TimeLimitExceeded", "load_handler", "to_jsonable"]

#: tasks whose forward pass is `generate`, which stops at `max_time`
GENERATING = frozenset({"text-generation", "summarization", "translation"})


class TimeLimitExceeded(BatchError, JobTimeout):
    """A batch's generation reached the time limit: its output may be cut short."""


def to_jsonable(value: Any) -> Any:
    """numpy/torch scalars and arrays -> Python numbers and lists, recursively."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class Handler:
    """One model on one device, called with lists of items."""

    def __init__(self, deployment: Deployment, pipe: Callable[..., Any], native: bool) -> None:
        self.deployment = deployment
        self.task = deployment.canonical_task
        self.pipe = pipe
        self.native = native  # a transformers pipeline (takes batch_size)
        self._counter = _token_counter(pipe)

    def info(self) -> dict[str, Any]:
        """What producers need to know beyond the config (announced in Redis)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        info = self.deployment.to_dict()
        info["mask_token"] = getattr(tokenizer, "mask_token", None)
        return info

    def size(self, item: Any) -> int:
        """The item's length in tokens, which the batcher groups by (padding is per token);
        the batcher's length in characters when the model has no fast tokenizer."""
        if self._counter is None or not isinstance(item, str | dict):
            return length_in_chars(item)
        text = item if isinstance(item, str) else " ".join(str(v) for v in item.values())
        return len(self._counter.encode(text).ids)

    def run(
        self, items: list[Any], params: dict[str, Any], *, time_limit_s: float | None = None
    ) -> list[Any]:
        """What `pipe(item, **params)` returns for each item. Generation stops at
        `time_limit_s` (transformers' `max_time`) and then raises TimeLimitExceeded rather
        than return text cut short."""
        if time_limit_s is None or self.task not in GENERATING or "max_time" in params:
            return self._run(items, params)
        started = time.monotonic()
        outs = self._run(items, {**params, "max_time": time_limit_s})
        if time.monotonic() - started >= time_limit_s:
            raise TimeLimitExceeded(
                f"generation stopped at job_timeout_s={time_limit_s} of its forward pass"
            )
        return outs

    def _run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        if len(items) == 1:
            return [to_jsonable(self.pipe(items[0], **params))]
        extra = {"batch_size": len(items)} if self.native else {}
        outs = self.pipe(items, **extra, **params)
        if self.task == "text-classification" and "top_k" not in params:
            outs = [[o] for o in outs]  # what pipe(one string) returns
        if len(outs) != len(items):
            raise RuntimeError(f"pipeline returned {len(outs)} results for {len(items)} items")
        if self.task == "feature-extraction":
            outs = self._unpad(items, outs, params)
        return [to_jsonable(o) for o in outs]

    def _unpad(self, items: list[Any], outs: list[Any], params: dict[str, Any]) -> list[Any]:
        """A batched feature-extraction pads every item to the longest; cut that padding
        off so a result does not depend on its batch-mates."""
        tok = self.pipe.tokenizer  # type: ignore[attr-defined]
        kwargs = dict(params.get("tokenize_kwargs") or {})
        if "truncation" in params:
            kwargs["truncation"] = params["truncation"]
        lengths = [len(ids) for ids in tok(items, **kwargs)["input_ids"]]
        left = tok.padding_side == "left"
        return [[o[0][-n:] if left else o[0][:n]] for o, n in zip(outs, lengths, strict=True)]


def _token_counter(pipe: Any) -> Any:
    """A copy of the pipeline's fast tokenizer, to count tokens in any thread without
    touching the pipeline's own (each call of which resets its truncation and padding)."""
    backend = getattr(getattr(pipe, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter


def _device_for_torch(device: str) -> str:
    # `pipeq worker` narrows CUDA_VISIBLE_DEVICES to the one GPU, which is then cuda:0
    return "cuda:0" if device.startswith("cuda") else "cpu"


def load_handler(deployment: Deployment) -> Handler:
    """Load the model; ModelLoadError says why it could not be loaded."""
    task = deployment.canonical_task
    device = _device_for_torch(deployment.device)
    try:
        if task in ("question-answering", "summarization", "translation"):
            from pipeq.worker.legacy import load_legacy_pipeline

            pipe = load_legacy_pipeline(
                deployment.task, deployment.model, revision=deployment.revision, device=device
            )
            return Handler(deployment, pipe, native=False)
        from transformers import pipeline

        pipe = pipeline(
            task,  # type: ignore[call-overload]
            model=deployment.model,
            revision=deployment.revision,
            device=device,
        )
    except Exception as e:  # any failure to load is reported the same way
        raise ModelLoadError(
            f"could not load {deployment.model!r} for {deployment.task}: {type(e).__name__}: {e}",
            deployment=deployment.name,
        ) from e
    tok = pipe.tokenizer
    if task == "text-generation" and tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; decoder-only pads left
        tok.padding_side = "left"
    return Handler(deployment, pipe, native=True)
