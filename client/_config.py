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
dtype = "auto"               # optional; "auto" (the checkpoint's), "float32", "bfloat16", "float16"
attn_implementation = "sdpa" # optional; "sdpa", "eager", "flash_attention_2" (default: the model's)
compile = false              # optional; torch.compile the forward (warmed up before it serves)
pipelining = false           # optional; tokenize the next batch and post-process the last one
                             # while the model runs (encoder tasks; docs/batching.md)
trust_remote_code = false    # optional; run the model repository's own Python code
gpu_memory_fraction = 0.5    # optional; this worker's share of its GPU (or gpu_memory_bytes)
redis_url = "redis://:PW@redis-b:6379/0"  # optional; its own Redis (docs/redis.md, "Several
                             # Redis servers"); default: the worker's --redis-url

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
from pipeq._redis import masked, parse
from pipeq._tasks import DEFAULT_LIMITS
from pipeq.errors import InvalidRequest, UnknownDeployment

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MODELS",
    "Deployment",
    "default_deployments",
    "load_deployments",
    "redis_routes",
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
#: torch dtypes a deployment's weights may load in ("auto": the checkpoint's own, as saved)
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: transformers' attention implementations a deployment may ask for ("": the model's default)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


#: the most ranks `tensor_parallel` may ask for (one host's GPUs)
MAX_TENSOR_PARALLEL = 16


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
    #: the torch dtype the weights load in (`from_pretrained(dtype=)`): "auto" keeps the
    #: checkpoint's own (transformers 5's default, so float32 for a float32 checkpoint)
    dtype: str = "auto"
    #: `from_pretrained(attn_implementation=)`; "" leaves transformers' choice for the model.
    #: "flash_attention_2" needs the flash-attn package and a GPU where the worker runs (its
    #: load fails there, naming this key, when they are missing) and a 16-bit dtype
    attn_implementation: str = ""
    #: torch.compile the model's forward; the worker compiles and warms it up before it
    #: announces itself (docs/operations.md). Dynamic batching only for now
    compile: bool = False
    #: pipelining (docs/batching.md): while a batch's forward pass runs, the next one is
    #: formed and tokenized and the last one post-processed, each on a thread of its own.
    #: The encoder tasks of transformers' own pipelines (sentiment-analysis, ner,
    #: fill-mask, zero-shot-classification, feature-extraction); others ignore it
    pipelining: bool = False
    #: `from_pretrained(trust_remote_code=)`: run Python code from the model's repository
    trust_remote_code: bool = False
    #: on a GPU: the share of its memory this worker may take (0 < x <= 1; 0: no cap), so
    #: that deployments share a GPU (`torch.cuda.set_per_process_memory_fraction`; the
    #: continuous-batching cache is sized inside it); ignored on the CPU
    gpu_memory_fraction: float = 0.0
    #: the same cap in bytes (0: none); at most one of the two
    gpu_memory_bytes: int = 0
    #: the Redis its queue, results and workers live on, in any form `_redis.parse` reads
    #: (password, TLS, Sentinel); None: the default one (--redis-url, $PIPEQ_REDIS_URL).
    #: Never announced (`to_dict`) nor shown (repr): it may hold a password
    redis_url: str | None = field(default=None, repr=False)
    #: ranks of one worker (torch.distributed tensor parallelism: `from_pretrained(
    #: tp_plan="auto")`, a model with a tp plan such as Llama's): `pipeq worker` starts
    #: N - 1 follower processes beside itself, gloo on the CPU, NCCL on `device = "cuda"`
    #: (rank r on cuda:r); text-generation only (docs/generation.md). 1: one process
    tensor_parallel: int = 1

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
        self._check_model_settings()
        self._check_redis_url()
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

    def _check_model_settings(self) -> None:
        """InvalidRequest, naming the key, for a model setting out of its domain: `dtype`,
        `attn_implementation`, `compile`, `trust_remote_code`, the GPU memory share."""
        where = f"deployment {self.name!r}"
        if self.dtype not in DTYPES:
            raise InvalidRequest(f"{where}: dtype {self.dtype!r} must be one of {list(DTYPES)}")
        if self.attn_implementation and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InvalidRequest(
                f"{where}: attn_implementation {self.attn_implementation!r} must be one of "
                f"{list(ATTN_IMPLEMENTATIONS)}"
            )
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            raise InvalidRequest(
                f"{where}: attn_implementation 'flash_attention_2' runs in float16 or bfloat16 "
                "only: set dtype"
            )
        if self.batching == "continuous" and self.attn_implementation == "eager":
            raise InvalidRequest(
                f"{where}: attn_implementation 'eager' with continuous batching: transformers' "
                "paged cache runs on 'sdpa' or 'flash_attention_2' (or set batching = 'dynamic')"
            )
        for key in ("compile", "trust_remote_code", "pipelining"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidRequest(f"{where}: {key} must be true or false")
        if self.compile and self.batching == "continuous":
            raise InvalidRequest(
                f"{where}: compile with continuous batching is not supported yet "
                "(set batching = 'dynamic')"
            )
        fraction, size = self.gpu_memory_fraction, self.gpu_memory_bytes
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise InvalidRequest(f"{where}: gpu_memory_fraction must be a number")
        if not 0 <= fraction <= 1:
            raise InvalidRequest(
                f"{where}: gpu_memory_fraction must be in (0, 1] (0: no cap), not {fraction}"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"{where}: gpu_memory_bytes must be an integer >= 0 (0: no cap)")
        if fraction and size:
            raise InvalidRequest(f"{where}: set gpu_memory_fraction or gpu_memory_bytes, not both")
        object.__setattr__(self, "gpu_memory_fraction", float(fraction))
        self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        """InvalidRequest, naming `tensor_parallel`, for a rank count the worker cannot run."""
        where = f"deployment {self.name!r}: tensor_parallel"
        n = self.tensor_parallel
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TENSOR_PARALLEL:
            raise InvalidRequest(f"{where} must be an integer from 1 to {MAX_TENSOR_PARALLEL}")
        if n == 1:
            return
        if self.canonical_task != "text-generation":
            raise InvalidRequest(f"{where} serves text-generation only (its models have tp plans)")
        if self.device not in ("cpu", "cuda"):
            raise InvalidRequest(
                f"{where} needs device 'cpu' (gloo) or 'cuda' (NCCL, rank r on cuda:r), "
                f"not {self.device!r}"
            )
        if self.compile:
            raise InvalidRequest(f"{where} with compile is not supported")
        if self.gpu_memory_fraction or self.gpu_memory_bytes:
            raise InvalidRequest(f"{where} with a GPU memory cap is not supported")

    def _check_redis_url(self) -> None:
        """InvalidRequest, the URL masked, for a `redis_url` that `_redis.parse` refuses."""
        if self.redis_url is None:
            return
        if not isinstance(self.redis_url, str):
            raise InvalidRequest(f"deployment {self.name!r}: redis_url must be a string")
        try:
            parse(self.redis_url)
        except ValueError as e:
            raise InvalidRequest(
                f"deployment {self.name!r}: redis_url {masked(self.redis_url)}: {e}"
            ) from None

    @property
    def canonical_task(self) -> str:
        return _tasks.canonical_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        """The deployment as its workers announce it in Redis: without `redis_url`."""
        out = asdict(self)
        out["limits"] = dict(self.limits)
        del out["redis_url"]
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


def redis_routes(deployments: Mapping[str, Deployment]) -> dict[str, str]:
    """Deployment -> its own Redis URL, for the deployments that name one (`redis_url`);
    the others live on the default Redis."""
    return {n: d.redis_url for n, d in deployments.items() if d.redis_url is not None}


def pick(deployments: Mapping[str, Deployment], name: str) -> Deployment:
    """The deployment called `name`, else the one serving task `name`."""
    if name in deployments:
        return deployments[name]
    for d in deployments.values():
        if _tasks.is_task(name) and d.canonical_task == _tasks.canonical_task(name):
            return d
    raise UnknownDeployment(f"no deployment {name!r} in the config; known: {sorted(deployments)}")
