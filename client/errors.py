"""Every error pipeq raises, in one tree.

    PipeqError
    ├── InvalidRequest          bad inputs or parameters (found at submit, or by the worker)
    ├── UnknownDeployment       no deployment has that name, task or model
    ├── UnknownJob              no job has that id now: forgotten (`Job.forget()`)
    ├── NoLiveWorker            the deployment exists but no worker is serving it now
    ├── Overloaded              the deployment's queue is over its limit
    ├── ModelLoadError          a worker could not load its model
    ├── BrokerUnavailable       Redis did not answer within the client's broker_timeout_s
    │   └── BrokerRefusesWrites Redis answers but refuses writes: full, read-only, not persisting
    └── JobError                a submitted job did not produce a result
        ├── JobFailed           the pipeline raised while running the job
        ├── JobTimeout          no result within the time asked for
        ├── JobCancelled        the job was cancelled before it ran
        ├── JobExpired          the job was not started before its `expires` deadline
        ├── JobLost             the job killed its worker too many times
        ├── ItemsFailed         some items of a bulk submission failed; the rest succeeded
        └── StreamRestarted     the job restarted and made text other than what was streamed

Errors raised on a worker travel back to the producer through the JSON result
backend as (type name, message); `from_wire` turns them back into these classes.
Every class takes a single message argument so that round trip is lossless.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerRefusesWrites",
    "BrokerUnavailable",
    "InvalidRequest",
    "ItemsFailed",
    "JobCancelled",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobTimeout",
    "ModelLoadError",
    "NoLiveWorker",
    "Overloaded",
    "PipeqError",
    "StreamRestarted",
    "UnknownDeployment",
    "UnknownJob",
]


class PipeqError(Exception):
    """Base class of every pipeq error."""

    #: the job this error is about, when there is one
    job_id: str | None = None
    #: the deployment this error is about, when there is one
    deployment: str | None = None

    def __init__(
        self, message: str, *, job_id: str | None = None, deployment: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if job_id is not None:
            self.job_id = job_id
        if deployment is not None:
            self.deployment = deployment

    def __str__(self) -> str:
        where = []
        if self.deployment:
            where.append(f"deployment={self.deployment}")
        if self.job_id:
            where.append(f"job={self.job_id}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class InvalidRequest(PipeqError, ValueError):
    """The inputs or parameters of a request are not acceptable for its task."""


class UnknownDeployment(PipeqError, LookupError):
    """No deployment matches the name, task or model asked for."""


class UnknownJob(PipeqError, LookupError):
    """The job's records are gone: it was forgotten (`Job.forget()`); its result will
    never come."""


class NoLiveWorker(PipeqError):
    """The deployment is known but no worker has announced itself recently."""


class Overloaded(PipeqError):
    """The deployment's queue holds more jobs than it accepts."""


class ModelLoadError(PipeqError):
    """A worker could not load its deployment's model."""


class BrokerUnavailable(PipeqError, ConnectionError):
    """Redis could not be reached within the client's `broker_timeout_s` (the URL is named,
    its password masked)."""


class BrokerRefusesWrites(BrokerUnavailable):
    """Redis answers but refuses writes, raised at once: `reason` is "full" (maxmemory
    reached under noeviction), "read-only" (a replica), "not persisting" (MISCONF) or
    "too few replicas" (NOREPLICAS, `min-replicas-to-write`).
    Accepted jobs are kept; everything resumes by itself once Redis takes writes again."""

    #: a key of `pipeq._redis.WRITE_REFUSALS` ('' when it came back over the wire)
    reason: str = ""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        job_id: str | None = None,
        deployment: str | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id, deployment=deployment)
        self.reason = reason


class JobError(PipeqError):
    """A submitted job ended without a result."""


class JobFailed(JobError):
    """The pipeline raised an error while running the job."""


class JobTimeout(JobError, TimeoutError):
    """The result did not arrive within the time allowed."""


class JobCancelled(JobError):
    """The job was cancelled before it produced a result."""


class JobExpired(JobError):
    """The job had not started by its `expires` deadline; it was dropped before any compute."""


class JobLost(JobError):
    """The job's worker died while running it `MAX_ATTEMPTS` times (it kills its worker)."""


class ItemsFailed(JobError):
    """Some items of `Client.map` failed; `.results` has every outcome, `.errors` the failures."""

    def __init__(self, message: str, *, results: list[Any], errors: dict[int, PipeqError]) -> None:
        super().__init__(message)
        self.results = results
        self.errors = errors


class StreamRestarted(JobError):
    """`Job.stream()`: the job's worker died, the job ran again elsewhere, and the new
    attempt's text differs from what was already streamed (sampling): read the stream
    again from the start (`job.stream()`) for the new attempt's text."""


_BY_NAME: dict[str, type[PipeqError]] = {
    cls.__name__: cls
    for cls in (
        PipeqError,
        InvalidRequest,
        UnknownDeployment,
        NoLiveWorker,
        Overloaded,
        ModelLoadError,
        BrokerUnavailable,
        JobError,
        JobFailed,
        JobTimeout,
        JobCancelled,
        JobExpired,
        JobLost,
    )
}


def from_wire(
    type_name: str, message: str, *, job_id: str | None, deployment: str | None
) -> PipeqError:
    """Rebuild the error a worker raised; anything not ours becomes JobFailed."""
    cls = _BY_NAME.get(type_name)
    if cls is None or cls is PipeqError:
        return JobFailed(f"{type_name}: {message}", job_id=job_id, deployment=deployment)
    return cls(message, job_id=job_id, deployment=deployment)
