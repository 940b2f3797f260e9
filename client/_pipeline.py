"""`pipeline()`: the `transformers.pipeline` call signature, run on the cluster."""

from __future__ import annotations

from typing import Any

from pipeq import _tasks
from pipeq._client import Client
from pipeq.errors import InvalidRequest

__all__ = ["RemotePipeline", "pipeline"]


class RemotePipeline:
    """Called like the transformers pipeline of its task; each call is a job."""

    def __init__(
        self,
        task: str,
        model: str | None,
        client: Client,
        timeout: float | None,
        defaults: dict[str, Any],
        expires: Any = None,
    ) -> None:
        self.task = task
        self.model = model
        self.client = client
        self.timeout = timeout
        self.expires = expires
        self.deployment = client.resolve(task, model)
        _tasks.validate_params(
            self.deployment.task, defaults, complete=False
        )  # bad defaults fail here, not later
        self.defaults = defaults

    def __repr__(self) -> str:
        return f"<RemotePipeline {self.task} -> deployment {self.deployment.name}>"

    def __call__(self, *args: Any, expires: Any = None, **kwargs: Any) -> Any:
        """`expires` (seconds from now, or a datetime): jobs not started by then end with
        JobExpired; default the pipeline's own."""
        inputs, params = self._split_call(args, {**self.defaults, **kwargs})
        name = self.deployment.name
        expires = self.expires if expires is None else expires
        items, many = _tasks.items_of(self.deployment.task, inputs)
        if not many:
            job = self.client.submit(name, inputs, expires=expires, **params)
            return job.result(timeout=self.timeout)
        # a list: items spread over messages and workers, then put back in transformers' shape
        results = self.client.map(name, items, timeout=self.timeout, expires=expires, **params)
        return _tasks.combine(
            self.deployment.task, self.client.check_params(self.deployment, params), results
        )

    def _split_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """transformers' positional and keyword forms -> (inputs, params)."""
        task = _tasks.canonical_task(self.deployment.task)
        if task == "question-answering" and ("question" in kwargs or "context" in kwargs):
            if args:
                raise InvalidRequest("pass either question=/context= or a dict, not both")
            question, context = kwargs.pop("question", None), kwargs.pop("context", None)
            if isinstance(question, list) or isinstance(context, list):  # pairs, or one broadcast
                qs = question if isinstance(question, list) else [question] * len(context)
                cs = context if isinstance(context, list) else [context] * len(qs)
                if len(qs) != len(cs):
                    raise InvalidRequest("question and context lists differ in length")
                return [{"question": q, "context": c} for q, c in zip(qs, cs, strict=True)], kwargs
            return {"question": question, "context": context}, kwargs
        for name in ("inputs", "text_inputs", "sequences", "args"):
            if name in kwargs and not args:
                args = (kwargs.pop(name),)
        if task == "zero-shot-classification" and len(args) == 2:
            kwargs = {**kwargs, "candidate_labels": args[1]}
            args = args[:1]
        if len(args) != 1:
            raise InvalidRequest(f"{self.task} takes one input (a text or a list), got {len(args)}")
        return args[0], kwargs


def pipeline(
    task: str,
    model: str | None = None,
    *,
    redis_url: str | None = None,
    client: Client | None = None,
    timeout: float | None = None,
    expires: Any = None,
    **params: Any,
) -> RemotePipeline:
    """A callable like `transformers.pipeline(task, model, **params)`, served by workers.

    The deployment is found by task (and model, matched by hub id or its last part)
    among those workers announced; `timeout` bounds each call's wait for its result;
    `expires` (seconds, or a datetime) drops a call's jobs not started by then (JobExpired).
    Other keyword arguments are defaults for every call, as in transformers
    (`pipeline("ner", grouped_entities=True)`).
    """
    return RemotePipeline(task, model, client or Client(redis_url), timeout, params, expires)
