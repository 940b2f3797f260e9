"""Deployments: what a worker serves, read from a TOML file.

```toml
[deployments.sentiment-analysis]
task = "sentiment-analysis"
model = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
revision = "main"            # optional
hub_id = "..."               # optional, for a local path: the Hub id it is a copy of
device = "cuda:0"            # "cpu", "cuda" or "cuda:N"; `pipeq worker --gpu N` overrides
max_batch_size = 32          # optional, per-task default
max_batch_wait_ms = 5        # optional
job_timeout_s = 300          # optional; counted from the job's first forward pass
max_queue_length = 10000     # optional; submit raises Overloaded past it (0 = no limit)
batching = "dynamic"         # optional; "continuous" (text-generation's default) or "dynamic"

[deployments.sentiment-analysis.limits]   # optional; each bounds what one request may ask
request_bytes = 2000000      # the JSON of inputs and parameters (TEI's payload limit)
result_bytes = 64000000      # a job's stored result (at most 500000000): a job whose result
                             # the worker estimates past it is refused before any compute
items_per_job = 1024         # inputs in one job (Client.map sends many jobs)
max_new_tokens = 1024        # also bounds max_length
num_return_sequences = 16
num_beams = 8
```
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeq import _tasks
from pipeq._tasks import DEFAULT_LIMITS
from pipeq.errors import InvalidRequest, UnknownDeployment

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MODELS",
    "Deployment",
    "default_deployments",
    "load_deployments",
]


#: The course's (Hugging Face course, chapter 1) default model for each task.
DEFAULT_MODELS: dict[str, str] = {
    "sentiment-analysis": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    "zero-shot-classification": "facebook/bart-large-mnli",
    "text-generation": "openai-community/gpt2",
    "fill-mask": "distilbert/distilroberta-base",
    "ner": "dbmdz/bert-large-cased-finetuned-conll03-english",
    "question-answering": "distilbert/distilbert-base-cased-distilled-squad",
    "summarization": "sshleifer/distilbart-cnn-12-6",
    "translation": "Helsinki-NLP/opus-mt-fr-en",
    "feature-extraction": "distilbert/distilbert-base-cased",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # fullmatch: `$` lets "x\n" through
_DEVICE = re.compile(r"cpu|cuda|cuda:\d+")


@dataclass(frozen=True)
class Deployment:
    """One (task, model, device) a worker serves; one queue each."""

    name: str
    task: str
    model: str
    revision: str | None = None
    #: for a local path: the Hub id of the model it is a copy of, so that a request for
    #: that model (`pipeline(task, model=...)`) selects this deployment
    hub_id: str | None = None
    device: str = "cpu"
    max_batch_size: int = 0  # 0: the task's default
    max_batch_wait_ms: float = -1.0  # negative: the task's default
    job_timeout_s: float = 300.0  # from the job's first forward pass
    max_queue_length: int = 0  # 0: no limit
    #: producers queue its jobs even while no worker runs (an autoscaler that scales it to
    #: zero starts one for them); otherwise, NoLiveWorker after `no_worker_grace_s`
    scale_to_zero: bool = False
    limits: Mapping[str, int] = field(default_factory=dict)  # over DEFAULT_LIMITS
    #: "continuous" (text-generation's default: a job joins the running generation at its
    #: next step, docs/batching.md) or "dynamic" (batches of jobs with equal parameters)
    batching: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InvalidRequest(f"deployment name {self.name!r} must match {_NAME.pattern}")
        _tasks.canonical_task(self.task)  # raises on an unknown task
        if not self.model:
            raise InvalidRequest(f"deployment {self.name!r} needs a model")
        if not _DEVICE.fullmatch(self.device):
            raise InvalidRequest(
                f"deployment {self.name!r}: device {self.device!r} must be cpu, cuda or cuda:N"
            )
        if self.max_batch_size <= 0:
            object.__setattr__(self, "max_batch_size", _tasks.spec(self.task).max_batch_size)
        if self.max_batch_wait_ms < 0:
            object.__setattr__(self, "max_batch_wait_ms", _tasks.spec(self.task).max_batch_wait_ms)
        if not self.batching:
            default = "continuous" if self.canonical_task == "text-generation" else "dynamic"
            object.__setattr__(self, "batching", default)
        if self.batching not in ("continuous", "dynamic"):
            raise InvalidRequest(
                f"deployment {self.name!r}: batching must be 'continuous' or 'dynamic'"
            )
        if self.batching == "continuous" and self.canonical_task != "text-generation":
            raise InvalidRequest(
                f"deployment {self.name!r}: continuous batching serves text-generation only"
            )
        if not isinstance(self.scale_to_zero, bool):
            raise InvalidRequest(f"deployment {self.name!r}: scale_to_zero must be true or false")
        if self.job_timeout_s <= 0:
            raise InvalidRequest(f"deployment {self.name!r}: job_timeout_s must be positive")
        unknown = set(self.limits) - set(DEFAULT_LIMITS)
        if unknown:
            raise InvalidRequest(
                f"deployment {self.name!r}: unknown limits {sorted(unknown)}; "
                f"known: {sorted(DEFAULT_LIMITS)}"
            )
        for key, value in self.limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(
                    f"deployment {self.name!r}: limits.{key} must be a positive integer"
                )
        if self.limits.get("result_bytes", 0) > _tasks.RESULT_BYTES_MAX:
            raise InvalidRequest(
                f"deployment {self.name!r}: limits.result_bytes must be at most "
                f"{_tasks.RESULT_BYTES_MAX} (the largest result Celery's Redis backend stores)"
            )
        object.__setattr__(self, "limits", {**DEFAULT_LIMITS, **self.limits})

    @property
    def canonical_task(self) -> str:
        return _tasks.canonical_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["limits"] = dict(self.limits)
        return out

    @classmethod
    def from_dict(cls, name: str, raw: Mapping[str, Any]) -> Deployment:
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = set(raw) - known - {"name"}
        if unknown:
            raise InvalidRequest(
                f"deployment {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        if "task" not in raw or "model" not in raw:
            raise InvalidRequest(f"deployment {name!r} needs both 'task' and 'model'")
        return cls(name=name, **{k: v for k, v in raw.items() if k != "name"})


def default_deployments() -> dict[str, Deployment]:
    """The course's nine tasks with the course's default models, on the CPU."""
    return {
        task: Deployment(name=task, task=task, model=model)
        for task, model in DEFAULT_MODELS.items()
    }


def load_deployments(path: str | Path | None) -> dict[str, Deployment]:
    """Read `[deployments.<name>]` tables from a TOML file; None gives the defaults."""
    if path is None:
        return default_deployments()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as e:
        raise InvalidRequest(f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequest(f"config file {path} is not valid TOML: {e}") from e
    tables = doc.get("deployments")
    if not isinstance(tables, dict) or not tables:
        raise InvalidRequest(f"config file {path} declares no [deployments.<name>] table")
    return {name: Deployment.from_dict(name, raw) for name, raw in tables.items()}


def pick(deployments: Mapping[str, Deployment], name: str) -> Deployment:
    """The deployment called `name`, else the one serving task `name`."""
    if name in deployments:
        return deployments[name]
    for d in deployments.values():
        if _tasks.is_task(name) and d.canonical_task == _tasks.canonical_task(name):
            return d
    raise UnknownDeployment(f"no deployment {name!r} in the config; known: {sorted(deployments)}")
