"""The producer side: submit jobs by deployment or task name, read their results later."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from tqdm import tqdm

from pipeq import _app, _floats, _tasks
from pipeq._broker import BROKER_ERRORS, Broker, drop_result_channels
from pipeq._config import Deployment, load_deployments, redis_routes
from pipeq._ledger import PRIORITIES, PRIORITY_HEADER, Depth, stream_key
from pipeq._redis import masked
from pipeq._registry import NO_WORKER_GRACE_S, Announced
from pipeq.errors import (
    BrokerUnavailable,
    InvalidRequest,
    ItemsFailed,
    JobCancelled,
    JobExpired,
    JobLost,
    JobTimeout,
    Overloaded,
    PipeqError,
    StreamRestarted,
    UnknownDeployment,
    UnknownJob,
    from_wire,
)

__all__ = [
    "BROKER_TIMEOUT_S",
    "Client",
    "Job",
    "JobState",
    "Prepared",
    "TextStream",
    "drop_result_channels",
    "masked",
]

T = TypeVar("T")
_LOOKUP_CACHE_S = 2.0
#: a call finding Redis unreachable tries again for this long, then BrokerUnavailable
BROKER_TIMEOUT_S = 10.0
#: `Job.result` reads the stored result at least this often while it waits
RESULT_RECHECK_S = 1.0


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


#: `Client.map`'s messages waiting for their results at once (each holds `chunk_size`
#: inputs): Redis holds this many messages' results of a map at most
MAP_WINDOW = 64
#: and the results of `Client.map`'s and `imap`'s messages in flight may take at most
#: this many times the deployment's `limits.result_bytes` (their upper bound)
RESULTS_IN_FLIGHT = 4


def _result_bound(info: dict[str, Any], item: Any, params: dict[str, Any]) -> int:
    """The most bytes `item`'s stored result can take, for a deployment that announces
    what it makes per token (feature-extraction's `feature_width`), else 0: a token is
    at least one byte of UTF-8 (plus the tokenizer's few special tokens), and no more
    than `max_tokens` of them pass the worker's length check. The worker's own estimate
    (its tokenizer's count) is never larger, so a message sized by this fits."""
    width = info.get("feature_width")
    if not width or not isinstance(item, str):
        return 0
    tokens = len(item.encode("utf-8", "surrogatepass")) + 4
    cap = info.get("max_tokens")
    if isinstance(cap, int) and cap > 0:
        tokens = min(tokens, cap)
    per_value = _floats.PACKED_BYTES if info.get("packs_floats") else _floats.JSON_BYTES
    return int(tokens * int(width) * per_value) + _floats.ITEM_BYTES


#: the furthest `expires` may be: past it, a deadline means nothing (and overflows dates)
MAX_EXPIRES_S = 10 * 365 * 24 * 3600.0


def _priority(priority: Any) -> str:
    """A job's level, one of `PRIORITIES` (docs/scale.md "Priorities"); InvalidRequest
    names the levels otherwise."""
    if isinstance(priority, str) and priority in PRIORITIES:
        return priority
    raise InvalidRequest(f"priority is one of {', '.join(map(repr, PRIORITIES))}, got {priority!r}")


def _expires(expires: float | datetime.datetime | None) -> float | datetime.datetime | None:
    """Celery's `expires`: seconds from now (> 0, at most ten years), or a datetime; a
    naive datetime is this machine's local time, as `datetime.now()` gives it."""
    if expires is None:
        return None
    if isinstance(expires, datetime.datetime):
        return expires if expires.tzinfo is not None else expires.astimezone()
    if (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not 0 < expires <= MAX_EXPIRES_S
    ):
        raise InvalidRequest(
            f"expires must be seconds from now (0 to {MAX_EXPIRES_S:.0f}) or a datetime, "
            f"got {expires!r}"
        )
    return float(expires)


class JobState(enum.StrEnum):
    """Where a job is: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | EXPIRED;
    UNKNOWN for an id pipeq never accepted, whose record expired with its result (after
    `RESULT_TTL_S`), or that was forgotten (`Job.forget()`)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNKNOWN = "unknown"

    @property
    def done(self) -> bool:
        return self in (
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.EXPIRED,
        )


_STATES = {
    states.PENDING: JobState.QUEUED,
    states.RECEIVED: JobState.QUEUED,
    states.RETRY: JobState.QUEUED,
    states.STARTED: JobState.RUNNING,
    states.SUCCESS: JobState.SUCCEEDED,
    states.FAILURE: JobState.FAILED,
    states.REVOKED: JobState.CANCELLED,
}


def _is_expiry(exc: Any) -> bool:
    return isinstance(exc, TaskRevokedError) and "expired" in str(exc)


def to_pipeq_error(exc: BaseException, job_id: str, deployment: str | None) -> PipeqError:
    """The error a worker stored for a job, as one of pipeq's error classes."""
    if _is_expiry(exc):
        return JobExpired(
            "not started before its expires deadline", job_id=job_id, deployment=deployment
        )
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
        #: the Redis of its deployment; for a bare id on a Client of several, found at the
        #: first call that needs it (`Client.locate`)
        self._at: Broker | None = (
            client.broker(deployment) if deployment or len(client.redis_urls) == 1 else None
        )
        self._result: AsyncResult | None = None
        #: None: not known yet. A handle from `Client.job` (no deployment) asks Redis at
        #: its first `result()`, since the Client's Celery may still hold the result of a
        #: job another handle forgot (a result message that came after its wait ended is
        #: kept for the next waiter on that id); `submit`'s handle saw the job begin.
        self._forgotten: bool | None = None if deployment is None else False
        #: the seed its draws come from (sent, or chosen at submit for a job that may
        #: sample); None when not known here (`engine()` tells what the worker used)
        self.seed: int | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id} deployment={self.deployment}>"

    @property
    def _broker(self) -> Broker:
        """The Redis this job lives on."""
        if self._at is None:
            self._at, deployment = self._client.locate(self.id)
            self.deployment = self.deployment or deployment
        return self._at

    @property
    def _async(self) -> AsyncResult:
        if self._result is None:
            self._result = self._broker.app.AsyncResult(self.id)
        return self._result

    def status(self) -> JobState:
        """Where the job is now (one Redis read; two while it waits)."""
        return self._broker.call(self._status)

    def _status(self) -> JobState:
        state = self._async.state
        if state == states.PENDING and not self._broker.ledger.is_known(self.id):
            return JobState.UNKNOWN
        if state == states.REVOKED and _is_expiry(self._async.result):
            return JobState.EXPIRED
        return _STATES.get(state, JobState.QUEUED)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result; raise the job's error, or JobTimeout after `timeout` s.

        Celery's wait listens on the job's result channel; with many threads waiting on
        one Client its shared subscription now and then misses a result stored as it
        subscribes (1 to 3 jobs in 128 streamed at once, `pipeq bench` on text-generation),
        so the wait goes in slices of at most `RESULT_RECHECK_S` and reads the stored
        result between them."""
        self._check_forgotten(ask=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = RESULT_RECHECK_S if left is None else max(0.001, min(RESULT_RECHECK_S, left))
            try:
                self._broker.call(self._async.get, timeout=step, propagate=False, interval=0.05)
                break
            except CeleryTimeout:
                state = self._broker.call(lambda: self._async.state)
                if state in states.READY_STATES:
                    break  # stored, its message missed
                if state == states.PENDING:
                    self._check_forgotten()
                if left is not None and left <= step:
                    raise JobTimeout(
                        f"no result within {timeout} s (the job goes on; ask again later)",
                        job_id=self.id,
                        deployment=self.deployment,
                    ) from None
        if self._async.state == states.SUCCESS:
            return _floats.unpack(self._async.result)
        raise to_pipeq_error(self._async.result, self.id, self.deployment)

    def stream(self, *, item: int = 0, timeout: float | None = None) -> TextStream:
        """The text of a text-generation job as its worker makes it: an iterator of
        strings whose concatenation is the result's `generated_text` (the prompt first
        when the result holds it, `return_full_text`); it ends when the job does.

        Pieces are kept in Redis (a stream per job, expiring with the result), so a reader
        that starts late, or a second one, gets every piece from the start. Continuous
        batching streams a piece a decoding step (a chat: its reply's content; with
        several sequences: the first); a job the dynamic batcher runs (beam search, ...:
        `engine()` says which and why) comes as one piece when it is done, as do
        summarization and translation jobs. `item`: which prompt of a
        job of several. Raises the job's error if it failed (JobFailed, JobLost, ...), or
        JobTimeout after `timeout` s; a cancelled job's stream ends with the text made
        before it stopped. If the job's worker died, the job runs again and the stream
        goes on where it was (`.restarts` counts it); StreamRestarted if the new attempt
        makes different text (a sampled job sent without a seed: pipeq's producers give
        each one). InvalidRequest for a deployment that does not generate."""
        if self.deployment is None:
            self._broker  # noqa: B018 (a bare id's record names its deployment)
        announced = (
            self._broker.call(self._broker.registry.deployments).get(self.deployment)
            if self.deployment
            else None
        )
        if announced is not None and _tasks.canonical_task(announced.task) not in _tasks.STREAMING:
            raise InvalidRequest(
                f"{announced.name} serves {announced.task}: only text-generation, "
                "summarization and translation stream",
                job_id=self.id,
                deployment=self.deployment,
            )
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise InvalidRequest(f"stream(item=) takes a prompt's index, got {item!r}")
        self._check_forgotten(ask=False)
        return TextStream(self, item, timeout)

    def engine(self) -> dict[str, str] | None:
        """How a text-generation job's last attempt runs, from its stream's `start`
        entry: `{"worker", "engine"}` with engine "continuous" or "dynamic", "reason" (why
        the dynamic batcher: what continuous batching does not serve), "seed" (where it
        draws). None before a worker took it, or for a deployment that batches
        dynamically only."""
        raw: Any = self._broker.call(self._broker.ledger.redis.xrange, stream_key(self.id))
        starts = [f for _, f in raw or [] if b"start" in f]
        if not starts:
            return None
        fields = {k.decode(): v.decode() for k, v in starts[-1].items()}
        fields["worker"] = fields.pop("start")
        return fields

    def cancel(self) -> bool:
        """True if the job ends CANCELLED: it was queued, or waiting in a worker for a
        batch (it never runs), or it is a generation that continuous batching runs (it
        stops at its next decoding step; `stream()` has the text made until then). False
        if it could not be cancelled: another kind of job whose forward pass has begun
        (it will finish), a finished job, or one pipeq never accepted (`status()` tells
        which)."""
        outcome = self._broker.call(
            _app.cancel_job,
            self._broker.app,
            self.id,
            "cancelled by the producer",
            self._broker.ledger,
        )
        return outcome == "cancelled"

    def forget(self) -> bool:
        """Delete a finished job's result, record and stream now rather than when they
        expire (`RESULT_TTL_S`). Afterwards, from any handle, `status()` is UNKNOWN and
        `result()` and `stream()` raise UnknownJob at once; a copy of its message still in
        Redis (a retried send) is dropped before compute. True if it was forgotten; False
        for a job not finished (nothing is done: it would store its result later; cancel
        it first, or forget it once it is done) or unknown."""
        outcome = self._broker.call(self._broker.ledger.forget, self.id, _app.RESULT_TTL_S)
        if outcome == "forgotten":
            self._forgotten = True
            self._result = self._broker.app.AsyncResult(self.id)  # Celery's cached result
        return outcome == "forgotten"

    def _check_forgotten(self, *, ask: bool = True) -> None:
        """UnknownJob if the job was forgotten: by this handle, or (`ask`, one Redis round
        trip) by any."""
        if self._forgotten is None or (ask and not self._forgotten):
            self._forgotten = self._broker.call(self._broker.ledger.forgotten, self.id)
        if self._forgotten:
            raise UnknownJob(
                "the job was forgotten (Job.forget()): its result is gone",
                job_id=self.id,
                deployment=self.deployment,
            )


_TEXT_KEYS = ("generated_text", "summary_text", "translation_text")


def _text_of(result: Any, item: int) -> str:
    """The generated text of one prompt of a text-generation, summarization or
    translation result (the last two: a record an input, in one flat list)."""
    several = isinstance(result, list) and bool(result) and isinstance(result[0], list)
    flat = (
        isinstance(result, list)
        and bool(result)
        and isinstance(result[0], dict)
        and "generated_text" not in result[0]
    )
    if flat and item < len(result):
        result = result[item : item + 1]
        item = 0
    if item >= (len(result) if several else 1):
        raise InvalidRequest(f"stream(item={item}): the job has no prompt {item}")
    if several:
        result = result[item]
    record = result[0] if isinstance(result, list) else result
    text = ""
    if isinstance(record, dict):  # text-generation's, summarization's, translation's
        text = next((record[k] for k in _TEXT_KEYS if k in record), "")
    if isinstance(text, list):  # a chat: the reply
        text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else ""
    return str(text)


class TextStream(Iterator[str]):
    """`Job.stream()`'s iterator. `restarts`: how often the job began again on another
    worker (its worker died) while this reader followed it."""

    #: a read waits this long for a piece (holding one of the Client's connections;
    #: `MAX_CONNECTIONS`) before it looks at the job's state
    BLOCK_MS = 200

    def __init__(self, job: Job, item: int, timeout: float | None) -> None:
        self.job = job
        self.item = item
        self.restarts = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._pieces = self._read()

    def __next__(self) -> str:
        return next(self._pieces)

    def _entries(self, last: str | None) -> list[tuple[str, dict[bytes, bytes]]]:
        broker = self.job._broker
        redis_ = broker.ledger.redis
        key = stream_key(self.job.id)
        got: list[Any]
        if last is None:  # the first read: everything so far, from the last attempt on
            everything: Any = broker.call(redis_.xrange, key)
            got = list(everything or [])
            starts = [n for n, (_, f) in enumerate(got) if b"start" in f]
            got = got[starts[-1] if starts else 0 :]
        else:
            reply: Any = broker.call(redis_.xread, {key: last}, None, self.BLOCK_MS)
            got = reply[0][1] if reply else []
        return [(i.decode(), f) for i, f in got]

    def _read(self) -> Iterator[str]:
        last: str | None = None
        yielded = ""  # the text given to the caller
        attempt = ""  # the text of the attempt running now
        attempts = 0
        ended = draining = False
        while not ended:
            entries = self._entries(last)
            for entry_id, fields in entries:
                last = entry_id
                if b"start" in fields:
                    attempts += 1
                    self.restarts = max(0, attempts - 1)
                    attempt = ""
                elif b"end" in fields:
                    ended = True
                    break
                elif int(fields[b"i"]) == self.item:
                    attempt += fields[b"t"].decode()
                    piece = self._beyond(yielded, attempt, final=False)
                    if piece:
                        yielded += piece
                        yield piece
            if last is None:
                last = "0-0"
            if ended or entries:
                continue
            if draining:  # the job was done before the last read: nothing more comes
                break
            state = self.job.status()
            if state is JobState.UNKNOWN:
                self.job._check_forgotten()
            draining = state.done  # over, with no end sent (never ran here)?
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise JobTimeout(
                    "the stream did not end within the timeout (the job goes on)",
                    job_id=self.job.id,
                    deployment=self.job.deployment,
                )
        if self.job.status() == JobState.CANCELLED:
            return
        left = None if self._deadline is None else max(0.1, self._deadline - time.monotonic())
        text = _text_of(self.job.result(timeout=left), self.item)  # raises the job's error
        # the dynamic batcher ran it (or ran it again, a suspect, after its worker died):
        # the rest comes at once
        piece = self._beyond(yielded, text, final=True)
        if piece:
            yield piece

    def _beyond(self, yielded: str, text: str, *, final: bool) -> str:
        """What `text` (the attempt so far, or the final text) adds to what was yielded;
        StreamRestarted if it does not go on from it (an attempt so far may still be
        shorter than what an earlier attempt streamed)."""
        if not (text.startswith(yielded) or (not final and yielded.startswith(text))):
            raise StreamRestarted(
                "the job restarted on another worker and made other text; "
                "job.stream() again reads the new attempt",
                job_id=self.job.id,
                deployment=self.job.deployment,
            )
        return text[len(yielded) :]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request checked for its deployment and ready to send (`Client.prepare`)."""

    target: Announced
    inputs: Any
    params: dict[str, Any]
    expires: float | datetime.datetime | None
    priority: str = "normal"


class Client:
    """Submits pipeline requests to the deployments workers announce in Redis.

    `Client(redis_url=None)` uses the URL given, else $PIPEQ_REDIS_URL, else
    redis://127.0.0.1:6399/0 (where `pipeq up` starts its embedded Redis).
    `config`: a deployments TOML (a path, or its deployments), else $PIPEQ_CONFIG if set;
    the deployments in it that name their own `redis_url` live on that Redis, every other
    one on the default (docs/redis.md, "Several Redis servers").
    `broker_timeout_s`: a call that finds Redis unreachable tries again for this long,
    then raises BrokerUnavailable. `no_worker_grace_s`: a deployment whose last worker
    beat this recently still accepts jobs (they wait for its next worker).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        config: str | Path | Mapping[str, Deployment] | None = None,
        broker_timeout_s: float = BROKER_TIMEOUT_S,
        no_worker_grace_s: float = NO_WORKER_GRACE_S,
    ) -> None:
        self.redis_url = _app.redis_url(redis_url)
        self.broker_timeout_s = broker_timeout_s
        self.no_worker_grace_s = no_worker_grace_s
        if config is None:
            config = os.environ.get("PIPEQ_CONFIG") or {}
        #: the deployments the config declares, and those of them on a Redis of their own
        self.config = config if isinstance(config, Mapping) else load_deployments(config)
        self.routes = redis_routes(self.config)
        self._brokers: dict[str, Broker] = {}
        default = self.broker_at(self.redis_url)
        for url in self.routes.values():
            self.broker_at(url)  # a URL it cannot read is refused now, not at a submit
        #: the default Redis' clients (the only ones, unless the config names others)
        self.redis, self.app = default.redis, default.app
        self.registry, self.ledger = default.registry, default.ledger
        self._lookups: dict[tuple[str, str | None], tuple[float, Announced]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for broker in self._brokers.values():
            broker.close()

    @property
    def redis_urls(self) -> list[str]:
        """Every Redis this client talks to, the default first."""
        return list(self._brokers)

    def broker_at(self, url: str) -> Broker:
        """The Broker of one of `redis_urls` (made at its first use)."""
        if url not in self._brokers:
            self._brokers[url] = Broker(
                url,
                broker_timeout_s=self.broker_timeout_s,
                no_worker_grace_s=self.no_worker_grace_s,
            )
        return self._brokers[url]

    def broker(self, deployment: str | None) -> Broker:
        """The Redis a deployment lives on: its config's `redis_url`, else the default."""
        return self._brokers[self.routes.get(deployment or "", self.redis_url)]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the default Redis, tried again while it is unreachable,
        for up to `broker_timeout_s`; then BrokerUnavailable naming the URL (password
        masked). `broker(deployment).call` does the same on a deployment's Redis."""
        return self._brokers[self.redis_url].call(fn, *args, **kwargs)

    def locate(self, job_id: str) -> tuple[Broker, str | None]:
        """The Redis holding a job known by its id alone, and its deployment if its record
        says: each Redis is asked once; those that did not answer are asked again (for
        `broker_timeout_s`) only when no other knows the job. The default Redis when
        none does (the job is then UNKNOWN there); BrokerUnavailable if one stays down."""
        unreachable = []
        for broker in self._brokers.values():
            try:
                known, deployment = broker.holds(job_id)
            except BROKER_ERRORS:
                unreachable.append(broker)
                continue
            if known:
                return broker, deployment
        for broker in unreachable:
            known, deployment = broker.call(broker.holds, job_id)
            if known:
                return broker, deployment
        return self._brokers[self.redis_url], None

    def deployments(self) -> dict[str, Announced]:
        """The deployments workers have announced, on every Redis (each one on the Redis
        it lives on); BrokerUnavailable if one of them does not answer."""
        out: dict[str, Announced] = {}
        for url, broker in self._brokers.items():
            announced = broker.call(broker.registry.deployments)
            out.update({n: d for n, d in announced.items() if self.broker(n).url == url})
        return out

    def depth(self, deployment: str) -> Depth:
        """The deployment's jobs accepted and not yet running, wherever they wait, the age
        of the oldest (s), and the jobs running now."""
        broker = self.broker(deployment)
        return broker.call(broker.ledger.depth, deployment)

    def resolve(self, deployment_or_task: str, model: str | None = None) -> Announced:
        """The deployment a request for this name (and model) goes to; checks it is live."""
        key = (deployment_or_task, model)
        hit = self._lookups.get(key)
        if hit and time.monotonic() - hit[0] < _LOOKUP_CACHE_S:
            return hit[1]
        found = self._find(deployment_or_task, model)
        broker = self.broker(found.name)
        broker.call(broker.registry.require_live, found.name)
        self._lookups[key] = (time.monotonic(), found)
        return found

    def _find(self, target: str, model: str | None) -> Announced:
        """`Registry.resolve` on each Redis that may hold the deployment: the one its name
        is routed to, or for a task the default and those of the config's deployments of
        that task. A deployment counts only on the Redis it is routed to; of several found,
        the one named after the task, then a live one, then by name."""
        urls = [self.redis_url]
        task = _tasks.canonical_task(target) if _tasks.is_task(target) else target
        if model is None and target in self.config:
            urls = [self.broker(target).url]
        elif _tasks.is_task(target):
            urls += [
                self.broker(d.name).url for d in self.config.values() if d.canonical_task == task
            ]
        urls = list(dict.fromkeys(urls))
        if len(urls) == 1:
            broker = self._brokers[urls[0]]
            return broker.call(broker.registry.resolve, target, model)
        found: list[tuple[tuple[bool, bool, str], Announced]] = []
        errors: list[PipeqError] = []
        for url in urls:
            broker = self._brokers[url]
            try:
                d = broker.call(broker.registry.resolve, target, model)
                if self.broker(d.name) is not broker:
                    continue  # announced here, but the config puts it elsewhere
                live = bool(broker.call(broker.registry.live_workers, d.name))
            except (UnknownDeployment, BrokerUnavailable) as e:
                errors.append(e)
                continue
            found.append(((d.name not in (target, task), not live, d.name), d))
        if found:
            return min(found, key=lambda f: f[0])[1]
        down = [e for e in errors if isinstance(e, BrokerUnavailable)]
        raise (down or errors or [UnknownDeployment(f"no deployment or task named {target!r}")])[0]

    def submit(
        self,
        deployment_or_task: str,
        inputs: Any,
        *,
        model: str | None = None,
        expires: float | datetime.datetime | None = None,
        priority: str = "normal",
        **params: Any,
    ) -> Job:
        """Validate and enqueue one request; returns at once with its Job.

        `expires`: seconds from now, or a datetime, by which the job must have started;
        past it the job is dropped before any compute and ends with JobExpired. Both are
        judged on Redis' clock (seconds count from when Redis accepts the job), never on
        this machine's.
        `priority`: "high", "normal" (the default) or "low". Workers take a deployment's
        waiting jobs high first, then normal, then low (each level oldest first), and form
        batches the same way: a high job waits for the batch running and at most one more
        (docs/scale.md "Priorities"). No level ages into another: low jobs wait while
        higher ones keep coming.
        Raises InvalidRequest, UnknownDeployment, NoLiveWorker, Overloaded (when
        `max_queue_length` jobs of the deployment wait already), BrokerUnavailable.
        """
        prepared = self.prepare(deployment_or_task, inputs, model, expires, params, priority)
        return self.send(prepared)

    def prepare(
        self,
        deployment_or_task: str,
        inputs: Any,
        model: str | None = None,
        expires: float | datetime.datetime | None = None,
        params: dict[str, Any] | None = None,
        priority: str = "normal",
    ) -> Prepared:
        """`submit`'s first half, for producers that enqueue in steps (`pipeq serve`):
        the deployment found (live) and the request validated; raises what `submit` does
        before anything is sent."""
        level = _priority(priority)
        target = self.resolve(deployment_or_task, model)
        inputs, params = self.check(target, inputs, params or {})
        return Prepared(target, inputs, params, _expires(expires), level)

    def send(self, prepared: Prepared, job_id: str | None = None) -> Job:
        """`submit`'s second half: enqueue a prepared request as job `job_id` (a new
        UUID4 by default). Raises Overloaded, BrokerUnavailable."""
        return self._send(
            prepared.target,
            prepared.inputs,
            prepared.params,
            expires=prepared.expires,
            job_id=job_id,
            priority=prepared.priority,
        )

    def _send(
        self,
        target: Announced,
        inputs: Any,
        params: dict[str, Any],
        *,
        per_item: bool = False,
        expires: float | datetime.datetime | None = None,
        job_id: str | None = None,
        priority: str = "normal",
    ) -> Job:
        job_id = job_id or str(uuid.uuid4())
        kwargs = {"inputs": inputs, "params": params}
        if per_item:
            kwargs["per_item"] = True
        if target.info.get("packs_floats"):
            kwargs["packed"] = True  # arrays of floats as float32 (`_floats`), not lists
        limit = _app.enqueue_limit.set(int(target.info.get("max_queue_length") or 0))
        # the deadline goes in pipeq's headers, not Celery's `expires`: Redis counts it on
        # its own clock (`_ledger` enqueue), so a producer's skewed clock cannot move it
        headers: dict[str, Any] = {}
        if isinstance(expires, datetime.datetime):
            headers[_app.EXPIRES_AT_HEADER] = expires.timestamp()
        elif expires is not None:
            headers[_app.EXPIRES_IN_HEADER] = float(expires)
        if priority != "normal":
            headers[PRIORITY_HEADER] = priority
        broker = self.broker(target.name)
        try:
            # sending subscribes to nothing (_app.Backend.on_task_call): the Job's handle
            # reads the stored result first and subscribes only while it waits. With 512
            # jobs subscribed at once, Celery's result drainer fell behind (p95 of a
            # 512-job burst: 57 s instead of 10 s).
            broker.call(
                broker.app.send_task,
                _app.RUN_TASK,
                kwargs=kwargs,
                queue=_app.queue_for(target.name),
                task_id=job_id,
                shadow=f"{_app.RUN_TASK}[{target.name}]",
                headers=headers,
                # Flower's view of the arguments: Celery's pure-Python saferepr, and
                # declaring the queue at every send (Redis needs none: the default exchange
                # routes by queue name, and the worker declares its own), were a quarter
                # of a send
                argsrepr="()",
                kwargsrepr=_short_repr(kwargs),
                declare=[],
            )
        finally:
            _app.enqueue_limit.reset(limit)
        job = Job(self, job_id, target.name)
        job.seed = params.get("seed")
        return job

    def check(
        self, target: Announced, inputs: Any, params: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """Validate a request for a deployment; InvalidRequest names what is wrong."""
        params = self.check_params(target, params)
        _about(target, _tasks.check_limits, target.task, target.info.get("limits"), inputs, params)
        items, many = _about(target, _tasks.items_of, target.task, inputs)
        for i, item in enumerate(items):
            self.check_item(target, item, f"inputs[{i}]" if many else "inputs")
        return (items if many else items[0]), params

    def check_params(self, target: Announced, params: dict[str, Any]) -> dict[str, Any]:
        """The validated parameters; a job that may sample gets a `seed` now
        (`_tasks.with_seed`), recorded with it, so that it can be replayed."""
        params = _about(target, _tasks.validate_params, target.task, params)
        _about(target, _tasks.check_param_limits, target.info.get("limits"), params)
        _about(target, _tasks.check_positions, target.info.get("max_positions"), params)
        return _tasks.with_seed(target.task, params)

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
        expires: float | datetime.datetime | None = None,
        priority: str = "normal",
        **params: Any,
    ) -> list[Any]:
        """Run many inputs; results in input order, each what `pipe(item)` returns.

        Inputs travel `chunk_size` to a message (default: half the deployment's batch
        size; fewer when the deployment's `limits.request_bytes` or, for
        feature-extraction, `limits.result_bytes` asks) and fail one by one: a bad item
        does not fail its neighbours. At most `MAP_WINDOW` messages wait for their results
        at once, and each message's stored result is deleted once read, so Redis holds a
        window of a large map, not all of it. The deployment's `max_queue_length`
        holds: when its queue is full, `map` waits for its own earliest message to
        finish, or for room (at most `timeout`; past it the items not sent fail with
        Overloaded), before sending the next. With `return_exceptions`, failed items hold
        their error in the list; otherwise ItemsFailed is raised once all are done,
        carrying every result and error. A progress bar shows on a terminal for 64 inputs
        or more. `priority` as in `submit`, and "normal" here too: a map is as often a
        request's own items as a bulk run; pass "low" for bulk work.
        """
        level = _priority(priority)
        items = list(inputs)
        target = self.resolve(deployment_or_task, model)
        params = self.check_params(target, params)
        bar = tqdm(
            total=len(items),
            disable=(not progress) if progress is not None else (len(items) < 64 or None),
            desc=target.name,
            unit="item",
        )
        outcomes: list[Any] = []
        with bar:
            for outcome in self._outcomes(
                target,
                items,
                params,
                chunk_size,
                timeout,
                _expires(expires),
                window=MAP_WINDOW,
                priority=level,
            ):
                outcomes.append(outcome)
                bar.update(1)
        errors = {i: o for i, o in enumerate(outcomes) if isinstance(o, PipeqError)}
        if errors and not return_exceptions:
            first = next(iter(errors.values()))
            raise ItemsFailed(
                f"{len(errors)} of {len(items)} items failed; first: {first}",
                results=outcomes,
                errors=errors,
            )
        return outcomes

    def imap(
        self,
        deployment_or_task: str,
        inputs: Iterable[Any],
        *,
        model: str | None = None,
        chunk_size: int | None = None,
        window: int = 16,
        timeout: float | None = None,
        expires: float | datetime.datetime | None = None,
        priority: str = "normal",
        **params: Any,
    ) -> Iterator[Any]:
        """Results of any iterable of inputs (a generator, a dataset), in input order, as
        they come: inputs are read and sent while earlier results arrive, at most
        `window` messages in flight, so an endless or very large input never sits in
        memory. A failed item raises its error when its turn comes, as a transformers
        pipeline's iterator does. Messages, limits and `priority` as in `map`."""
        level = _priority(priority)
        target = self.resolve(deployment_or_task, model)
        params = self.check_params(target, params)
        for outcome in self._outcomes(
            target,
            inputs,
            params,
            chunk_size,
            timeout,
            _expires(expires),
            window=window,
            priority=level,
        ):
            if isinstance(outcome, PipeqError):
                raise outcome
            yield outcome

    def _outcomes(
        self,
        target: Announced,
        inputs: Iterable[Any],
        params: dict[str, Any],
        chunk_size: int | None,
        timeout: float | None,
        expires: float | datetime.datetime | None,
        *,
        window: int | None,
        priority: str = "normal",
    ) -> Iterator[Any]:
        """Each input's result or PipeqError, in input order. Inputs go `chunk_size` to a
        message within the deployment's request_bytes and result_bytes; at most `window`
        messages wait for their results at once (None: no bound). A message's stored
        result is deleted once read (no one else holds its id)."""
        size = chunk_size or max(1, int(target.info.get("max_batch_size") or 16) // 2)
        limits = {**_tasks.DEFAULT_LIMITS, **(target.info.get("limits") or {})}
        limit = limits["request_bytes"]
        room = limit - _tasks.request_bytes([], params) - 16
        result_room = limits["result_bytes"]
        made = 0  # the most the segment's results can take (`_result_bound`)
        bounds: deque[int] = deque()  # the same, of each message in flight
        in_flight: deque[tuple[list[tuple[Any, PipeqError | None]], Job | None]] = deque()
        segment: list[tuple[Any, PipeqError | None]] = []
        used = 0

        def results_of(
            segment: list[tuple[Any, PipeqError | None]], job: Job | None
        ) -> Iterator[Any]:
            outs: Iterator[Any] = iter(())
            failed: PipeqError | None = None
            if job is not None:
                try:
                    outs = iter(job.result(timeout=timeout))
                except BrokerUnavailable:
                    raise  # Redis is gone: every later result would wait as long
                except JobLost as e:
                    good = [item for item, error in segment if error is None]
                    if len(good) == 1:
                        failed = e
                    else:  # one of them kills its worker: find it, each item alone
                        outs = iter(alone(good))
                except PipeqError as e:  # the whole message failed (timeout, ...)
                    failed = e
                if failed is None or not isinstance(failed, JobTimeout):
                    try:  # its result is in hand now: Redis need not keep it
                        job.forget()
                    except PipeqError:
                        pass
            for _, error in segment:
                if error is not None or failed is not None:
                    yield error or failed
                    continue
                out = next(outs)
                yield (
                    out["result"]
                    if "result" in out
                    else from_wire(
                        *out["error"], job_id=job.id if job else None, deployment=target.name
                    )
                )

        def alone(good: list[Any]) -> list[dict[str, Any]]:
            """Each item as a job of its own: only the one that kills fails (JobLost)."""
            outs = []
            for item in good:
                job = self._send(
                    target, [item], params, per_item=True, expires=expires, priority=priority
                )
                try:
                    outs.extend(job.result(timeout=timeout))
                except BrokerUnavailable:
                    raise
                except PipeqError as e:
                    outs.append({"error": [type(e).__name__, e.message]})
            return outs

        def send(segment: list[tuple[Any, PipeqError | None]]) -> Iterator[Any]:
            """Send the segment's good items as one message (waiting for room: yields the
            outcomes of earlier messages meanwhile), then queue its outcomes."""
            good = [item for item, error in segment if error is None]
            # at most `window` messages, and results of at most RESULTS_IN_FLIGHT x the
            # deployment's result_bytes (their bound), wait in Redis: first read the
            # earliest ones (a message alone always goes)
            while (
                window is not None
                and in_flight
                and (
                    len(in_flight) >= window or sum(bounds) + made > RESULTS_IN_FLIGHT * result_room
                )
            ):
                bounds.popleft()
                yield from results_of(*in_flight.popleft())
            job, pause = None, 0.01
            give_up = None if timeout is None else time.monotonic() + timeout
            while good:
                try:
                    job = self._send(
                        target, good, params, per_item=True, expires=expires, priority=priority
                    )
                    break
                except Overloaded as e:
                    if in_flight:  # the queue is full: wait for one of ours to finish
                        bounds.popleft()
                        yield from results_of(*in_flight.popleft())
                    elif give_up is None or time.monotonic() < give_up:
                        time.sleep(pause)  # full of other producers' jobs: wait for room
                        pause = min(0.5, pause * 2)
                    else:
                        segment = [(item, error or e) for item, error in segment]
                        break
            in_flight.append((segment, job))
            bounds.append(made)

        for i, item in enumerate(inputs):
            error: PipeqError | None = None
            need = makes = 0
            try:
                self.check_item(target, item, f"inputs[{i}]")
                need = _tasks.request_bytes(item, {}) + 1
                if need > room:
                    raise InvalidRequest(
                        f"inputs[{i}] is {need} bytes of JSON; this deployment takes at most "
                        f"{limit} a request (limits.request_bytes)",
                        deployment=target.name,
                    )
                makes = _result_bound(target.info, item, params)
            except InvalidRequest as e:
                error, need = e, 0
            full = used + need > room or made + makes > result_room
            if segment and (len(segment) >= size or full):
                yield from send(segment)
                segment, used, made = [], 0, 0
            segment.append((item, error))
            used += need
            made += makes
        if segment:
            yield from send(segment)
        while in_flight:
            yield from results_of(*in_flight.popleft())

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted earlier (by any producer)."""
        if not isinstance(job_id, str) or not job_id:
            raise InvalidRequest(f"a job id is a non-empty string, got {job_id!r}")
        return Job(self, job_id)
