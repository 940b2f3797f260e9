"""One job, from the moment a worker thread takes it to its stored result.

Celery's threads pool runs each job's task in a thread of its own. The task checks the
request, hands its items to the batcher and waits. Before the items' forward pass, the
batcher asks `Admission` (one Redis round trip a batch, `_ledger` admit) which jobs may
run; only then is a job STARTED, for its producer and for Flower. The outcomes:

    succeeded / failed        stored as the job's result (Celery), the message acknowledged
    cancelled, expired        REVOKED (Flower too); acknowledged, nothing computed
    finished already          a second delivery of a job that has a result: acknowledged only
    handed back               the worker is stopping and the job had not started: the
                              message goes back to the front of its queue (`Reject(requeue)`)

`job_timeout_s` counts from the job's first forward pass: time spent waiting in Redis
or in the worker never counts, and generation stops at the limit (`max_time`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from celery import Celery, signals
from celery.exceptions import Ignore, Reject
from celery.worker.request import Request as CeleryRequest

from pipeq import _app, _floats, _tasks
from pipeq._ledger import PRIORITIES, PRIORITY_HEADER, Ledger, running_key, waiting_key
from pipeq.errors import (
    InvalidRequest,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobTimeout,
    PipeqError,
)
from pipeq.worker.batcher import Batcher, HandBack, Quarantine, Submission, contained
from pipeq.worker.generation import ContinuousBatcher, append, write_end
from pipeq.worker.liveness import Lease
from pipeq.worker.transport import retrying

__all__ = ["AlreadyDone", "Admission", "Events", "Request", "register_task"]

log = logging.getLogger("pipeq.worker")


class AlreadyDone(Exception):
    """The job has a stored result: this delivery is a duplicate, dropped before compute."""


class Events:
    """Task events for Flower, sent through the worker consumer's own dispatcher (which
    Celery's Consumer step makes, and remakes on reconnection)."""

    consumer: Any = None

    def send(self, kind: str, job_id: str, **fields: Any) -> None:
        """Send an event (the dispatcher adds hostname, pid, clock); never fails a job."""
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return
        try:
            dispatcher.send(kind, uuid=job_id, **fields)
        except Exception:
            log.exception("could not send %s for %s", kind, job_id)


class Request(CeleryRequest):  # type: ignore[misc]
    """Celery's request, without the task-started event it sends when a pool thread takes
    the job: pipeq's threads wait for the batcher, and a job starts with its forward pass
    (`Admission` sends the event then)."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type != "task-started":
            super().send_event(type, **fields)


class Admission:
    """The batcher's `admit` hook: which jobs of a batch may run now, in one round trip.
    It waits for Redis when Redis is away, rather than failing jobs that never ran."""

    def __init__(
        self,
        ledger: Ledger,
        deployment: str,
        worker: str,
        events: Events,
        observe: Callable[[str, float], None] = lambda name, value: None,
        lease: Lease | None = None,
    ) -> None:
        self.ledger = ledger
        self.observe = observe
        #: the worker's claim on what it holds: a fenced worker admits nothing
        self.lease = lease or Lease(worker)
        self.keys = [waiting_key(deployment), running_key(deployment)]
        self.worker = worker
        self.events = events
        #: job id -> its `expires` deadline (unix s), for jobs this worker holds
        self.expires: dict[str, float] = {}
        #: jobs whose forward pass began and whose result is not stored yet
        self.started: set[str] = set()
        self._lock = threading.Lock()

    def forget(self, job_id: str) -> None:
        """The job's thread has stored its outcome (Celery's task_postrun)."""
        self.expires.pop(job_id, None)
        with self._lock:
            self.started.discard(job_id)

    def settled(self, job_id: str) -> bool:
        """No job but this one is between its forward pass and its stored result: a
        suspect may run (were it to kill the worker, no batch-mate of an earlier batch
        would still be marked STARTED, and count an attempt it did not cause)."""
        with self._lock:
            return not (self.started - {job_id})

    def __call__(
        self, job_ids: list[str], alone: bool, stoppable: bool = False
    ) -> dict[str, BaseException]:
        """Verdicts for the jobs that may not run now (cancelled, expired, done, suspect);
        the others are STARTED. `stoppable`: `Job.cancel()` may stop them while they run
        (continuous batching checks for it at every step)."""
        deadlines = [self.expires.get(j) for j in job_ids]
        args = [
            _app.RESULT_TTL_S,
            self.worker,
            os.getpid(),
            int(alone),
            len(job_ids),
            *job_ids,
            *("" if d is None else repr(d) for d in deadlines),
            int(stoppable),
        ]
        reply = retrying(self.ledger.script("admit"), self.keys, args)
        verdicts, waited = self.lease.check(reply, f"admitting jobs {', '.join(job_ids)}")
        for seconds in waited:
            if seconds:  # the job left `waiting` now: accepted to its first forward pass
                self.observe("queue_wait_seconds", max(0.0, float(seconds)))
        refused: dict[str, BaseException] = {}
        for job_id, raw in zip(job_ids, verdicts, strict=True):
            verdict = raw.decode() if isinstance(raw, bytes) else str(raw)
            if verdict == "run":
                with self._lock:
                    first = job_id not in self.started
                    self.started.add(job_id)
                if first:
                    self.events.send("task-started", job_id)
            elif verdict == "cancelled":
                refused[job_id] = JobCancelled("the job was cancelled")
            elif verdict == "expired":
                refused[job_id] = JobExpired("not started before its expires deadline")
            elif verdict == "done":
                refused[job_id] = AlreadyDone()
            else:
                refused[job_id] = Quarantine()
        return refused


def _deadline(expires: Any) -> float | None:
    """Celery's `expires` header (an ISO 8601 time) as unix seconds."""
    if not expires:
        return None
    when = expires
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromisoformat(expires)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _as_job_error(e: BaseException) -> PipeqError:
    if isinstance(e, PipeqError):
        return e
    return JobFailed(f"{type(e).__name__}: {e}")


def _outcome(value: Any, to_jsonable: Any) -> dict[str, Any]:
    """One item of a per-item job: {"result": ...} or {"error": [type, message]}."""
    if isinstance(value, BaseException):
        e = _as_job_error(value)
        return {"error": [type(e).__name__, e.message]}
    return {"result": to_jsonable(value)}


def wait_for(job: Submission, timeout_s: float) -> list[Any]:
    """Each item's result or error. Waits as long as the job waits for a batch; once its
    first forward pass began, `timeout_s` more at most (JobTimeout for what is not done)."""
    futures = job.futures
    while True:
        started = job.started_at
        deadline = None if started is None else started + timeout_s + job.grace_s
        left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = wait(futures, timeout=left)
        if not pending:
            break
        if deadline is not None and deadline <= time.monotonic():
            for f in pending:
                f.cancel()
            break
    late = JobTimeout(f"not done within job_timeout_s={timeout_s} of its forward pass")
    return [_result_or_error(f, late) for f in futures]


def _result_or_error(f: Future[Any], late: BaseException) -> Any:
    if f.cancelled() or not f.done():
        return late
    return f.exception() or f.result()


_STOPS = (HandBack, AlreadyDone, JobCancelled, JobExpired)


def register_task(
    app: Celery,
    deployment: Any,
    batcher: Batcher | ContinuousBatcher,
    admission: Admission,
    events: Events,
    check_input: Callable[[Any, dict[str, Any], str], None] = lambda item, params, where: None,
    check_result: Callable[[list[Any], dict[str, Any], bool, str], int] = (
        lambda items, params, packed, where: 0
    ),
    count_usage: Callable[[list[Any], dict[str, Any], list[Any]], list[Any]] | None = None,
) -> None:
    """The one task this worker runs: hand the job's items to the batcher, wait.
    `check_input(item, params, where)` raises InvalidRequest for an item the model
    cannot take (the handler's length check); `check_result(items, params, packed,
    where)` for items whose result would be larger than the deployment stores
    (`limits.result_bytes`), before any compute; it returns their estimated size.
    `count_usage(items, params, results)`: text-generation's token counts of a job that
    succeeded, written as `usage` (JSON) in its stream's `end` entry (the OpenAI routes'
    `usage`); a count that fails costs only the counts."""
    task = deployment.task
    streams = _tasks.canonical_task(task) in _tasks.STREAMING  # `Job.stream()` reads

    def check(item: Any, params: dict[str, Any], where: str) -> None:
        _tasks.check_item(task, item, where)
        check_input(item, params, where)

    @app.task(name=_app.RUN_TASK, bind=True, Request=f"{__name__}:Request")  # type: ignore[untyped-decorator]
    def run(
        self: Any,
        inputs: Any,
        params: dict[str, Any],
        per_item: bool = False,
        packed: bool = False,
    ) -> Any:
        """One job. `per_item`: items fail alone, the result is one outcome per item.
        `packed`: the producer reads arrays of floats in their packed form (`_floats`)."""
        job_id = self.request.id
        rank = _rank(getattr(self.request, PRIORITY_HEADER, None))
        deadline = _deadline(self.request.expires)
        if deadline is not None:
            admission.expires[job_id] = deadline
        outcome = "failed"
        usage: list[Any] = []
        try:
            result = run_job(job_id, inputs, params, per_item, packed, usage, rank)
            outcome = "succeeded"
            return result
        except HandBack:
            outcome = ""  # back to the queue: its stream goes on with the next attempt
            raise Reject("handed back: the worker is stopping", requeue=True) from None
        except AlreadyDone:
            outcome = ""
            raise Ignore() from None
        except JobCancelled:
            outcome = "cancelled"
            events.send("task-revoked", job_id, terminated=False, signum=None, expired=False)
            raise Ignore() from None
        except JobExpired:
            outcome = "expired"
            app.backend.mark_as_revoked(job_id, "expired")
            events.send("task-revoked", job_id, terminated=False, signum=None, expired=True)
            raise Ignore() from None
        except BaseException as e:  # Celery's tracer lets a non-Exception escape unanswered
            if isinstance(e, Exception) or not contained(e):
                raise
            raise _as_job_error(e) from e  # a Rust panic while checking the input, say
        finally:
            if outcome and streams:
                try:  # a reader not told stops at the stored result anyway
                    if usage:
                        end = {"end": outcome, "usage": json.dumps(usage)}
                        append(app.backend.ledger, admission.lease, [(job_id, end)])
                    else:
                        write_end(app.backend.ledger, job_id, outcome, admission.lease)
                except Exception:
                    log.warning("could not end the stream of %s", job_id, exc_info=True)

    @signals.task_postrun.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stored(task_id: str, **_: Any) -> None:  # after Celery stored the outcome
        admission.forget(task_id)

    def run_job(
        job_id: str,
        inputs: Any,
        params: dict[str, Any],
        per_item: bool,
        packed: bool,
        usage: list[Any],
        rank: int,
    ) -> Any:
        from pipeq.worker.handlers import to_jsonable

        # results of the batcher hold arrays packed (a fraction of lists' memory), unpacked
        # for a producer that reads lists, once every item is done
        shown: Callable[[Any], Any] = _as_sent if packed else _floats.unpack
        params = _tasks.validate_params(task, params)
        _tasks.check_limits(task, deployment.limits, inputs, params)
        if not per_item:
            items, many = _tasks.split_items(task, inputs)
            for i, item in enumerate(items):
                check_input(item, params, f"inputs[{i}]" if many else "inputs")
            check_result(items, params, packed, "inputs")
            submitted = batcher.submit(job_id, items, params, rank)
            results = wait_for(submitted, deployment.job_timeout_s)
            for r in results:
                if isinstance(r, _STOPS):
                    raise r
            for r in results:
                if isinstance(r, BaseException):
                    raise _as_job_error(r)
            results = [shown(r) for r in results]
            if streams and count_usage is not None:
                try:
                    usage.extend(count_usage(items, params, results))
                except Exception:
                    log.warning("could not count the tokens of %s", job_id, exc_info=True)
            return to_jsonable(_tasks.combine(task, params, results) if many else results[0])
        items, _ = _tasks.items_of(task, inputs)
        outcomes, good = _tasks.sort_out(items, lambda item, where: check(item, params, where))
        limit = deployment.limits.get("result_bytes") or _tasks.DEFAULT_LIMITS["result_bytes"]
        good = _fitting(
            items,
            outcomes,
            good,
            lambda part, where: check_result(part, params, packed, where),
            limit,
        )
        results = wait_for(
            batcher.submit(job_id, [items[i] for i in good], params, rank),
            deployment.job_timeout_s,
        )
        for r in results:
            if isinstance(r, _STOPS):
                raise r
        for i, r in zip(good, results, strict=True):
            outcomes[i] = r
        return [_outcome(shown(o), to_jsonable) for o in outcomes]


def _rank(priority: Any) -> int:
    """A job's priority header as the batcher's rank: 0 high, 1 normal (also for anything
    else: a producer's own header is no reason to fail a job), 2 low."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else 1


def _as_sent(value: Any) -> Any:
    return value


def _fitting(
    items: list[Any],
    outcomes: list[Any],
    good: list[int],
    check: Callable[[list[Any], str], int],
    limit: int,
) -> list[int]:
    """The good items of a per-item message whose results fit its stored result
    (`limit` bytes), in order; each item that does not gets its InvalidRequest among
    `outcomes`: too large for any job (`check` says why), or for this message."""
    fit: list[int] = []
    used = 0
    for i in good:
        try:
            size = check([items[i]], f"inputs[{i}]")
            if used + size > limit:
                raise InvalidRequest(
                    f"inputs[{i}]: its result (about {size:,} bytes) does not fit in this "
                    f"message after the {used:,} bytes of the items before it; this "
                    f"deployment stores at most {limit:,} a job (limits.result_bytes): "
                    "send fewer items a message"
                )
        except InvalidRequest as e:
            outcomes[i] = e
            continue
        fit.append(i)
        used += size
    return fit
