"""`pipeline()`: the `transformers.pipeline` call signature, run on the cluster.

Every call form and parameter of transformers' pipelines for the nine tasks works the
same way here unless it cannot cross a queue; docs/dropin.md lists each decision.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from typing import Any

from pipeq import _tasks
from pipeq._client import Client, _priority
from pipeq.errors import InvalidRequest

__all__ = ["RemotePipeline", "pipeline"]

#: `transformers.pipeline()` arguments about where and how the model runs: the deployment
#: owns them (its config decides), so they are accepted and have no effect
DEPLOYMENT_OWNED = frozenset(
    {
        "device",
        "device_map",
        "dtype",
        "torch_dtype",
        "framework",
        "use_fast",
        "token",
        "use_auth_token",
        "trust_remote_code",
        "model_kwargs",
        "batch_size",
        "num_workers",
    }
)
#: objects that cannot travel to a worker: the deployment loads its own
_OBJECTS = frozenset(
    {"config", "tokenizer", "feature_extractor", "image_processor", "processor", "pipeline_class"}
)
#: call arguments about how transformers loops over inputs: pipeq batches by itself
_CALL_OWNED = frozenset({"batch_size", "num_workers"})


class RemotePipeline:
    """Called like the transformers pipeline of its task; each call is one or more jobs.

    `task` is the canonical task, `model` the model the deployment serves (a Hub id or a
    path: a string, as the weights live on the workers), `deployment` what its workers
    announced. `tokenizer` loads that model's tokenizer here, on first use (from the
    deployment's path if this machine has it, else from the Hub), when `transformers` is
    installed on the producer (it is not needed otherwise).
    """

    def __init__(
        self,
        task: str,
        model: str | None,
        client: Client,
        timeout: float | None,
        defaults: dict[str, Any],
        expires: Any = None,
        priority: str = "normal",
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.expires = expires
        self.priority = _priority(priority)
        self.deployment = client.resolve(task, model)
        self.task = self.deployment.canonical_task
        self.model = str(self.deployment.info.get("hub_id") or self.deployment.model)
        defaults = {k: v for k, v in defaults.items() if k not in _CALL_OWNED}
        _tasks.validate_params(self.deployment.task, defaults, complete=False)  # fail here
        self.defaults = defaults
        self._tokenizer: Any = None

    def __repr__(self) -> str:
        return f"<RemotePipeline {self.task} -> deployment {self.deployment.name}>"

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded here with transformers' AutoTokenizer."""
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError(
                    "pipeline(...).tokenizer loads the model's tokenizer on this machine: "
                    "pip install transformers (the workers need no such thing)"
                ) from None
            revision = self.deployment.info.get("revision")
            # the deployment's own path when this machine has it, else its Hub id
            where = self.deployment.model
            if not os.path.isdir(where):
                where = self.model
            self._tokenizer = AutoTokenizer.from_pretrained(where, revision=revision)
        return self._tokenizer

    def __call__(
        self,
        *args: Any,
        expires: Any = None,
        streamer: Any = None,
        priority: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """What the transformers pipeline returns for these arguments: a result for one
        input, a list for a list, and an iterator of results for a generator or any
        other iterable (sent as it is read, a bounded window at a time). `expires`
        (seconds from now, or a datetime): jobs not started by then end with
        JobExpired; default the pipeline's own. `priority` ("high", "normal", "low"):
        default the pipeline's own (docs/scale.md, Priorities).

        `streamer` (text-generation: a prompt, a chat, or a list of them): as
        `generate(streamer=...)` in transformers, an object whose
        `on_finalized_text(text, stream_end=False)` is called with the prompt (unless the
        streamer's `skip_prompt` is set; a chat's as its template renders it, decoded as
        the streamer decodes), then each piece of new text as the worker makes it, then
        `("", stream_end=True)`; for a list, prompt after prompt, as transformers' pipeline
        runs them. transformers' TextStreamer (prints) and TextIteratorStreamer (an
        iterator for another thread) are such objects. The call still returns the result.
        New text comes as the job decodes it (`skip_special_tokens`, default True), where
        transformers' streamer decodes it its own way."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _CALL_OWNED}
        inputs, params = self._split_call(args, {**self.defaults, **kwargs})
        name = self.deployment.name
        expires = self.expires if expires is None else expires
        level = {"expires": expires, "priority": self.priority if priority is None else priority}
        if streamer is not None:
            if self.task != "text-generation" or _streamed(inputs):
                raise InvalidRequest("streamer= takes text-generation prompts (a list at most)")
            items, _ = _tasks.items_of(self.deployment.task, inputs)
            job = self.client.submit(name, inputs, **level, **params)
            for i, item in enumerate(items):
                self._stream_into(streamer, job, i, item, params)
            return job.result(timeout=self.timeout)
        if _streamed(inputs):
            checked = self.client.check_params(self.deployment, params)
            stream = self.client.imap(name, inputs, timeout=self.timeout, **level, **params)
            if self.task == "question-answering":  # 4.57 answered a generator with a list
                return _tasks.combine(self.task, checked, list(stream))
            return (_tasks.iterated(self.task, checked, r) for r in stream)
        items, many = _tasks.items_of(self.deployment.task, inputs)
        if not many:
            job = self.client.submit(name, inputs, **level, **params)
            return job.result(timeout=self.timeout)
        # a list: items spread over messages and workers, then put back in transformers' shape
        results = self.client.map(name, items, timeout=self.timeout, **level, **params)
        return _tasks.combine(
            self.deployment.task, self.client.check_params(self.deployment, params), results
        )

    def _stream_into(
        self, streamer: Any, job: Any, index: int, item: Any, params: dict[str, Any]
    ) -> None:
        """Prompt `index` of `job` into `streamer`: its prompt (unless `skip_prompt`),
        its new text a piece at a time, then the end."""
        full = params.get("return_full_text") is not False
        final = not isinstance(item, str) and _tasks.continues_final(item, params)
        # what the job's stream gives before the new text (the result's head)
        head = item if isinstance(item, str) else (item[-1]["content"] if final else "")
        left = len(head) if full else 0
        try:
            if not getattr(streamer, "skip_prompt", False):
                streamer.on_finalized_text(self._prompt_text(streamer, item, final))
            for piece in job.stream(item=index, timeout=self.timeout):
                piece, left = piece[left:], max(0, left - len(piece))
                if piece:
                    streamer.on_finalized_text(piece)
        finally:
            streamer.on_finalized_text("", stream_end=True)

    def _prompt_text(self, streamer: Any, item: Any, final: bool) -> str:
        """The prompt as transformers' streamer prints it: a text as it is, a chat as its
        template renders it, decoded with the streamer's own arguments."""
        if isinstance(item, str):
            return item
        tokenizer = getattr(streamer, "tokenizer", None) or self.tokenizer
        ids = _tasks.chat_ids(tokenizer, item, final)
        return str(tokenizer.decode(ids, **(getattr(streamer, "decode_kwargs", None) or {})))

    def _split_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """transformers' positional and keyword forms -> (inputs, params)."""
        if self.task == "question-answering":
            return _qa_inputs(args, kwargs)
        for name in ("inputs", "text_inputs", "sequences", "args"):
            if name in kwargs and not args:
                args = (kwargs.pop(name),)
        if self.task == "zero-shot-classification" and len(args) == 2:
            kwargs = {**kwargs, "candidate_labels": args[1]}
            args = args[:1]
        if len(args) != 1:
            raise InvalidRequest(f"{self.task} takes one input (a text or a list), got {len(args)}")
        return args[0], kwargs


def _streamed(inputs: Any) -> bool:
    """A generator, or an iterable that is not a list, a text or a mapping (a dataset):
    transformers gives an iterator of results for these."""
    if isinstance(inputs, types.GeneratorType):
        return True
    return isinstance(inputs, Iterable) and not isinstance(
        inputs, str | bytes | dict | list | tuple
    )


def _qa_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """transformers 4.57's question-answering argument forms: a dict or a list of them,
    `question`/`context` (each a string or, for the question, a list), `X=` or `data=`,
    and two positional strings (question, context)."""
    if args:
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            return {"question": args[0], "context": args[1]}, kwargs
        if len(args) != 1:
            return list(args), kwargs
        return args[0], kwargs
    for name in ("X", "data"):
        if name in kwargs:
            return kwargs.pop(name), kwargs
    if "question" not in kwargs or "context" not in kwargs:
        raise InvalidRequest("question-answering needs both `question` and `context`")
    question, context = kwargs.pop("question"), kwargs.pop("context")
    if isinstance(context, list) and not isinstance(question, list):
        raise InvalidRequest("`context` is a list but `question` is not: one question per context")
    if isinstance(question, list):
        contexts = context if isinstance(context, list) else [context] * len(question)
        if len(contexts) != len(question):
            raise InvalidRequest(
                f"`question` and `context` lists differ in length ({len(question)} and "
                f"{len(contexts)})"
            )
        pairs = zip(question, contexts, strict=True)
        return [{"question": q, "context": c} for q, c in pairs], kwargs
    return {"question": question, "context": context}, kwargs


def pipeline(
    task: str,
    model: str | None = None,
    *,
    redis_url: str | None = None,
    client: Client | None = None,
    timeout: float | None = None,
    expires: Any = None,
    revision: str | None = None,
    priority: str = "normal",
    **params: Any,
) -> RemotePipeline:
    """A callable like `transformers.pipeline(task, model, **params)`, served by workers.

    The deployment is the one of that task serving exactly `model` (a Hub id, a legacy
    org-less name such as "distilgpt2", a path, or a deployment's name); none, or
    several, is UnknownDeployment. `timeout` bounds each call's wait for its result;
    `expires` (seconds, or a datetime) drops a call's jobs not started by then
    (JobExpired); `priority` ("high", "normal", "low") is its jobs' level
    (docs/scale.md, Priorities). `revision`, when given, must be the deployment's. Arguments about
    where the model runs (`device`, `dtype`, `batch_size`, ...) belong to the deployment
    and have no effect; objects (`tokenizer=`, `config=`) cannot travel to a worker and
    are refused. Other keyword arguments are defaults for every call, as in
    transformers (`pipeline("ner", grouped_entities=True)`).
    """
    objects = sorted(k for k in params if k in _OBJECTS and params[k] is not None)
    if objects:
        raise InvalidRequest(
            f"{', '.join(objects)}: objects cannot travel to the workers, which load their "
            "own; choose the deployment by its model (model=...)"
        )
    params = {k: v for k, v in params.items() if k not in DEPLOYMENT_OWNED and k not in _OBJECTS}
    remote = RemotePipeline(
        task, model, client or Client(redis_url), timeout, params, expires, priority
    )
    served = remote.deployment.info.get("revision")
    if revision is not None and revision != served:
        raise InvalidRequest(
            f"revision {revision!r} asked for, but deployment {remote.deployment.name} serves "
            f"{served or 'the default revision'}"
        )
    return remote
