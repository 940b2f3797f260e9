"""The producer side: submit jobs by deployment or task name, read their results later."""

from __future__ import annotations

import enum
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import redis
from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from tqdm import tqdm

from pipeq import _app, _tasks
from pipeq._registry import Announced, Registry
from pipeq.errors import (
    InvalidRequest,
    ItemsFailed,
    JobCancelled,
    JobTimeout,
    Overloaded,
    PipeqError,
    from_wire,
)

__all__ = ["Client", "Job", "JobState", "cancel_key", "drop_result_channels"]

_LOOKUP_CACHE_S = 2.0


def cancel_key(job_id: str) -> str:
    return f"pipeq:cancel:{job_id}"


def drop_result_channels(app: Any) -> None:
    """Celery's AsyncResult unsubscribes from its result channel when it is garbage
    collected, reconnecting (for many seconds) if Redis is gone. Jobs that outlive their
    client, or the interpreter's exit, must not do that: drop the subscription connection."""
    consumer = app.backend.result_consumer
    consumer.stop()
    consumer._pubsub = None


def _short_repr(value: Any, limit: int = 1024) -> str:
    """repr cut to `limit` characters, as Celery cuts the arguments Flower shows."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _about(target: Announced, check: Any, *args: Any) -> Any:
    """Run a check; an InvalidRequest it raises names the deployment."""
    try:
        return check(*args)
    except InvalidRequest as e:
        e.deployment = target.name
        raise


class JobState(enum.StrEnum):
    """Where a job is: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_STATES = {
    states.PENDING: JobState.QUEUED,
    states.RECEIVED: JobState.QUEUED,
    states.RETRY: JobState.QUEUED,
    states.STARTED: JobState.RUNNING,
    states.SUCCESS: JobState.SUCCEEDED,
    states.FAILURE: JobState.FAILED,
    states.REVOKED: JobState.CANCELLED,
}


def to_pipeq_error(exc: BaseException, job_id: str, deployment: str | None) -> PipeqError:
    """The error a worker stored for a job, as one of pipeq's error classes."""
    if isinstance(exc, TaskRevokedError):
        return JobCancelled("the job was cancelled", job_id=job_id, deployment=deployment)
    message = str(exc.args[0]) if exc.args else str(exc)
    return from_wire(type(exc).__name__, message, job_id=job_id, deployment=deployment)


class Job:
    """A submitted job: its id now, its result later."""

    def __init__(self, client: Client, job_id: str, deployment: str | None = None) -> None:
        self.id = job_id
        self.deployment = deployment
        self._client = client
        self._async: AsyncResult = client.app.AsyncResult(job_id)

    def __repr__(self) -> str:
        return f"<Job {self.id} deployment={self.deployment}>"

    def status(self) -> JobState:
        return _STATES.get(self._async.state, JobState.QUEUED)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result; raise the job's error, or JobTimeout after `timeout` s."""
        try:
            self._async.get(timeout=timeout, propagate=False, interval=0.05)
        except CeleryTimeout:
            raise JobTimeout(
                f"no result within {timeout} s (the job goes on; ask again later)",
                job_id=self.id,
                deployment=self.deployment,
            ) from None
        if self._async.state == states.SUCCESS:
            return self._async.result
        raise to_pipeq_error(self._async.result, self.id, self.deployment)

    def cancel(self) -> bool:
        """Drop the job if it has not run yet. False when it had already finished.

        A job still queued, or waiting for a batch, is dropped and ends CANCELLED; a
        job whose forward pass has started finishes normally.
        """
        if self._async.state in states.READY_STATES:
            return False
        self._client.redis.set(cancel_key(self.id), 1, ex=_app.RESULT_TTL_S)
        self._client.app.control.revoke(self.id)
        if self._async.state != states.STARTED:
            self._client.app.backend.mark_as_revoked(self.id, "cancelled by the producer")
        return True

    def forget(self) -> None:
        """Delete the stored result now rather than when it expires."""
        self._async.forget()


class Client:
    """Submits pipeline requests to the deployments workers announce in Redis.

    `Client(redis_url=None)` uses the URL given, else $PIPEQ_REDIS_URL, else
    redis://127.0.0.1:6399/0 (where `pipeq up` starts its embedded Redis).
    """

    def __init__(self, redis_url: str | None = None) -> None:
        self.redis_url = _app.redis_url(redis_url)
        self.app = _app.make_app(self.redis_url)
        self.redis = redis.Redis.from_url(self.redis_url)
        self.registry = Registry(self.redis)
        self._lookups: dict[tuple[str, str | None], tuple[float, Announced]] = {}
        # a client never closed (`pipeline()` makes one) still exits at once without Redis
        weakref.finalize(self, drop_result_channels, self.app)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        drop_result_channels(self.app)
        self.app.close()
        self.redis.close()

    def deployments(self) -> dict[str, Announced]:
        """The deployments workers have announced on this Redis."""
        return self.registry.deployments()

    def resolve(self, deployment_or_task: str, model: str | None = None) -> Announced:
        """The deployment a request for this name (and model) goes to; checks it is live."""
        key = (deployment_or_task, model)
        hit = self._lookups.get(key)
        if hit and time.monotonic() - hit[0] < _LOOKUP_CACHE_S:
            return hit[1]
        found = self.registry.resolve(deployment_or_task, model)
        self.registry.require_live(found.name)
        self._lookups[key] = (time.monotonic(), found)
        return found

    def submit(
        self, deployment_or_task: str, inputs: Any, *, model: str | None = None, **params: Any
    ) -> Job:
        """Validate and enqueue one request; returns at once with its Job."""
        target = self.resolve(deployment_or_task, model)
        inputs, params = self.check(target, inputs, params)
        limit = int(target.info.get("max_queue_length") or 0)
        if limit and self.redis.llen(_app.queue_for(target.name)) >= limit:
            raise Overloaded(
                f"the queue holds {limit} jobs or more; retry later", deployment=target.name
            )
        return self._send(target, inputs, params)

    def _send(
        self, target: Announced, inputs: Any, params: dict[str, Any], *, per_item: bool = False
    ) -> Job:
        job_id = str(uuid.uuid4())
        kwargs = {"inputs": inputs, "params": params}
        if per_item:
            kwargs["per_item"] = True
        # sending subscribes to nothing (_app.Backend.on_task_call): the Job's handle reads
        # the stored result first and subscribes only while it waits. With 512 jobs
        # subscribed at once, Celery's result drainer fell behind (p95 of a 512-job burst:
        # 57 s instead of 10 s).
        self.app.send_task(
            _app.RUN_TASK,
            kwargs=kwargs,
            queue=_app.queue_for(target.name),
            task_id=job_id,
            shadow=f"{_app.RUN_TASK}[{target.name}]",
            # Flower's view of the arguments: Celery's pure-Python saferepr, and declaring
            # the queue at every send (Redis needs none: the default exchange routes by
            # queue name, and the worker declares its own), were a quarter of a send
            argsrepr="()",
            kwargsrepr=_short_repr(kwargs),
            declare=[],
        )
        return Job(self, job_id, target.name)

    def check(
        self, target: Announced, inputs: Any, params: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """Validate a request for a deployment; InvalidRequest names what is wrong."""
        params = self.check_params(target, params)
        items, many = _about(target, _tasks.items_of, target.task, inputs)
        for i, item in enumerate(items):
            self.check_item(target, item, f"inputs[{i}]" if many else "inputs")
        return (items if many else items[0]), params

    def check_params(self, target: Announced, params: dict[str, Any]) -> dict[str, Any]:
        return _about(target, _tasks.validate_params, target.task, params)  # type: ignore[no-any-return]

    def check_item(self, target: Announced, item: Any, where: str = "inputs") -> None:
        _about(target, _tasks.check_item, target.task, item, where)
        mask = target.info.get("mask_token")
        if mask and target.canonical_task == "fill-mask" and mask not in item:
            raise InvalidRequest(
                f"{where} {item!r:.60} has no mask token {mask!r} "
                "(the mask token belongs to the model)",
                deployment=target.name,
            )

    def map(
        self,
        deployment_or_task: str,
        inputs: Iterable[Any],
        *,
        model: str | None = None,
        chunk_size: int | None = None,
        timeout: float | None = None,
        progress: bool | None = None,
        return_exceptions: bool = False,
        **params: Any,
    ) -> list[Any]:
        """Run many inputs; results in input order, each what `pipe(item)` returns.

        Inputs travel `chunk_size` to a message (default: half the deployment's batch
        size) and fail one by one: a bad item does not fail its neighbours. With
        `return_exceptions`, failed items hold their error in the list; otherwise
        ItemsFailed is raised once all are done, carrying every result and error. A
        progress bar shows on a terminal for 64 inputs or more (`progress` forces it).
        """
        items = list(inputs)
        target = self.resolve(deployment_or_task, model)
        params = self.check_params(target, params)
        outcomes, todo = _tasks.sort_out(
            items, lambda item, where: self.check_item(target, item, where)
        )
        size = chunk_size or max(1, int(target.info.get("max_batch_size") or 16) // 2)
        chunks = [todo[k : k + size] for k in range(0, len(todo), size)]
        jobs = [
            self._send(target, [items[i] for i in chunk], params, per_item=True) for chunk in chunks
        ]
        bar = tqdm(
            total=len(items),
            disable=(not progress) if progress is not None else (len(items) < 64 or None),
            desc=target.name,
            unit="item",
        )
        with bar:
            bar.update(len(items) - len(todo))
            for chunk, job in zip(chunks, jobs, strict=True):
                try:
                    got = job.result(timeout=timeout)
                    for i, out in zip(chunk, got, strict=True):
                        outcomes[i] = (
                            out["result"]
                            if "result" in out
                            else from_wire(*out["error"], job_id=job.id, deployment=target.name)
                        )
                except PipeqError as e:  # the whole chunk failed (timeout, lost, ...)
                    for i in chunk:
                        outcomes[i] = e
                bar.update(len(chunk))
        errors = {i: o for i, o in enumerate(outcomes) if isinstance(o, PipeqError)}
        if errors and not return_exceptions:
            first = next(iter(errors.values()))
            raise ItemsFailed(
                f"{len(errors)} of {len(items)} items failed; first: {first}",
                results=outcomes,
                errors=errors,
            )
        return outcomes

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted earlier (by any producer)."""
        return Job(self, job_id)
