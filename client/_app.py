"""The wire contract shared by producers, workers and Flower.

One Celery task name (`RUN_TASK`) serves every deployment; the queue says which
deployment runs it. Producers send by name and never import worker code. Every
setting that must agree on both sides (serializer, acks, result TTL) is here.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from typing import Any

import redis
import redis.sentinel
from celery import Celery, states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.events.event import EVENT_EXCHANGE_NAME
from celery.exceptions import BackendStoreError, TaskRevokedError
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from pipeq._ledger import FENCED, PRIORITY_HEADER, Ledger, level_queue, meta_json, queue_for
from pipeq._redis import RedisTarget, parse, write_refusal
from pipeq.errors import Overloaded

__all__ = [
    "DEFAULT_REDIS_URL",
    "RESULT_TTL_S",
    "RUN_TASK",
    "cancel_job",
    "make_app",
    "queue_for",
    "redis_client",
    "redis_target",
    "redis_url",
    "transport_for",
]

#: where `pipeq up` puts its embedded Redis, and where clients look when told nothing
DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
#: the one task every worker registers
RUN_TASK = "pipeq.run"
QUEUE_PREFIX = queue_for("")
#: results (and errors) stay readable this long
RESULT_TTL_S = 24 * 3600
#: a connection to Redis not made in this long counts as a failed attempt
CONNECT_TIMEOUT_S = 2.0


def redis_url(url: str | None = None) -> str:
    """The explicit URL, else $PIPEQ_REDIS_URL, else the local default."""
    return url or os.environ.get("PIPEQ_REDIS_URL") or DEFAULT_REDIS_URL


def redis_target(url: str | None = None) -> RedisTarget:
    """`redis_url(url)` taken apart (`_redis.parse`); ValueError if it cannot be used."""
    return parse(redis_url(url))


def redis_client(url: str | None = None, **kwargs: Any) -> Any:
    """A redis-py client of `redis_url(url)`: the one way pipeq makes one (Sentinel's
    master, TLS verified); `kwargs` are redis-py's (socket_timeout=...)."""
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    return redis_target(url).client(**kwargs)


def transport_for(url: str | None, module: str = __name__) -> str:
    """The kombu transport class (module:name) pipeq uses for this URL: `Transport`, or
    `SentinelTransport` for a sentinel:// URL."""
    return f"{module}:{'Sentinel' if redis_target(url).sentinel else ''}Transport"


def outcome_of(state: str, result: Any) -> str:
    """The `outcome` label of pipeq_jobs_total for a state being stored ('' if not final):
    a REVOKED job was cancelled unless its reason is 'expired' (the worker revokes an
    expired job so); JobLost is counted by the heartbeat that declares it."""
    if state == states.SUCCESS:
        return "succeeded"
    if state == states.REVOKED:
        return "expired" if "expired" in str(result) else "cancelled"
    if state == states.FAILURE:
        # Celery passes the exception as its backend encodes it: a dict with exc_type
        kind = result.get("exc_type") if isinstance(result, dict) else type(result).__name__
        return {"JobLost": "lost", "JobExpired": "expired"}.get(str(kind), "failed")
    return ""


def cancel_job(app: Celery, job_id: str, why: str, ledger: Ledger | None = None) -> str:
    """Cancel a job the one way pipeq does (`_ledger` cancel), for `Job.cancel()`, a
    Celery revoke a worker receives and Flower's revoke: a job not started never runs,
    a continuous-batching generation stops at its next step; stored REVOKED with `why`.
    Returns 'cancelled', 'running' (its forward pass cannot be stopped), 'finished' or
    'unknown'. `ledger`: on the caller's own client (default: the result backend's)."""
    revoked = meta_json(
        job_id,
        states.REVOKED,
        app.backend.prepare_exception(TaskRevokedError(why)),
        done=True,
    )
    return (ledger or app.backend.ledger).cancel(job_id, revoked, RESULT_TTL_S)


class _ResultConsumer(RedisBackend.ResultConsumer):  # type: ignore[misc]
    def drain_events_until(
        self, p: Any, timeout: float | None = None, on_interval: Any = None
    ) -> Any:
        # Celery waits for a result in steps of 1 s and checks the timeout between steps, so
        # `result(timeout=0.1)` took a second; steps of a tenth of the timeout overshoot less
        step = 1.0 if timeout is None else min(1.0, max(0.01, timeout / 10))
        return self.drainer.drain_events_until(
            p, timeout=timeout, interval=step, on_interval=on_interval
        )


_SHARED_CLIENT_LOCK = threading.Lock()


#: at most this many results in one store script (one Redis step: it blocks Redis while it
#: runs, ~10 µs a result)
STORE_GROUP_MAX = 256


class _Store:
    __slots__ = ("args", "error", "key", "lead", "reply", "woken")

    def __init__(self, key: str, args: list[Any]) -> None:
        self.key, self.args = key, args
        self.woken = threading.Event()
        self.lead = False
        self.reply: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class StoreGroup:
    """Group commit of results (as databases commit transactions): the results job threads
    store while another store is on its way to Redis go together in the next one, one
    `_ledger` store script (a batch's jobs end together: a script a batch instead of one a
    job, with its fence check, clock read and metric counts). A store that finds none on
    its way goes at once: nothing waits for company. Each `store` returns its own job's
    reply (1 stored, 0 kept a finished job's, or FENCED for all); an error reaching Redis
    is raised in each thread of the group."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Store] = []
        self._busy = False

    def store(self, key: str, args: list[Any], run: Any) -> Any:
        """Store one job's result (`args`: its five values of the store script) with
        whatever else is pending; `run(keys, args)` runs the script (the leader's own)."""
        me = _Store(key, args)
        with self._lock:
            self._pending.append(me)
            lead, self._busy = not self._busy, True
        if not lead:
            me.woken.wait()
            if not me.lead:
                return me.outcome()
        with self._lock:  # a leader is the first pending: `me` is in its group
            group = self._pending[:STORE_GROUP_MAX]
            del self._pending[:STORE_GROUP_MAX]
        try:
            reply = run([s.key for s in group], [a for s in group for a in s.args])
            replies = [reply] * len(group) if reply == FENCED else list(reply)
            for s, r in zip(group, replies, strict=True):
                s.reply = r
        except BaseException as e:
            for s in group:
                s.error = e
        finally:
            with self._lock:  # the next group's first store leads it
                if self._pending:
                    self._pending[0].lead = True
                    self._pending[0].woken.set()
                else:
                    self._busy = False
            for s in group:
                if s is not me:
                    s.woken.set()
        return me.outcome()


class Backend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, honouring result timeouts under a second,
    subscribing to a job's result channel only when someone waits for it, and storing a
    result in one round trip that never overwrites a finished job's (`_ledger` store)."""

    ResultConsumer = _ResultConsumer

    def on_task_call(self, producer: Any, task_id: str) -> None:
        # Celery subscribes as each job is sent: a third of the producer's CPU per send
        # (docs/batching.md). `Job.result` subscribes when it waits, then reads the stored
        # result, so a result stored before that is not missed.
        pass

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(result, state, traceback, request)
        meta["task_id"] = task_id
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis", state=state, task_id=task_id)
        ttl = self.failure_expires if state == states.FAILURE else self.expires
        is_ready = int(state in states.READY_STATES)
        lease = self.app.conf.get("pipeq_lease")  # a worker's (`pipeq.worker.liveness.Lease`)
        head = [
            lease.worker if lease is not None else "",
            self.app.conf.get("pipeq_deployment") or "",
        ]
        job = [value, int(ttl or 0), task_id, is_ready, outcome_of(state, result)]
        script = self.ledger.script("store")
        stored = self._store_group.store(
            self.get_key_for_task(task_id),
            job,
            lambda keys, args: self.ensure(script, (keys, head + args)),
        )
        if lease is not None and stored == FENCED:
            lease.lost(f"storing the result of job {task_id}")
        return result

    @property
    def _store_group(self) -> StoreGroup:
        """The app's one `StoreGroup` (this backend is one thread's)."""
        group = getattr(self.app, "_pipeq_store_group", None)
        if group is None:
            with _SHARED_CLIENT_LOCK:
                group = getattr(self.app, "_pipeq_store_group", None)
                if group is None:
                    group = self.app._pipeq_store_group = StoreGroup()
        return group

    @property
    def ConnectionPool(self) -> Any:
        """redis-py's pool; with `redis_max_connections` set (workers: `BACKEND_CONNECTIONS`),
        a `BlockingConnectionPool`: a thread past the bound waits for a free connection
        instead of opening one more (Celery's plain pool raises past it)."""
        if self._ConnectionPool is None:  # type: ignore[has-type]
            bounded = self.max_connections is not None
            self._ConnectionPool = redis.BlockingConnectionPool if bounded else redis.ConnectionPool
        return self._ConnectionPool

    @cached_property
    def client(self) -> Any:
        """The Redis client. Celery makes a backend for each thread (`app.backend` is
        thread-local), each with its own pool: a worker's job threads held one connection
        each. With `redis_max_connections` set, every backend of the app shares one client,
        so that bound is the app's."""
        if self.max_connections is None:
            return self._create_client(**self.connparams)
        with _SHARED_CLIENT_LOCK:
            shared = getattr(self.app, "_pipeq_backend_client", None)
            if shared is None:
                shared = self._create_client(**self.connparams)
                self.app._pipeq_backend_client = shared
        return shared

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        """Celery's `result_backend_always_retry` (workers) retries a result's store
        while Redis is unreachable, and while it refuses writes (full, read-only, not
        persisting): a refusal is a pause, and the job's result is kept until it ends."""
        return bool(super().exception_safe_to_retry(exc)) or write_refusal(exc) is not None

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.client)


class _BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """The master's pool, bounded as `BlockingConnectionPool` bounds its pool."""


class SentinelResultBackend(Backend, SentinelBackend):  # type: ignore[misc]
    """pipeq's result backend on sentinel://: Celery's Sentinel backend (which asks the
    sentinels for the master) with `Backend`'s behaviour; the ledger's scripts run on
    that master too."""

    def _get_pool(self, **params: Any) -> Any:
        if self.max_connections is None:
            return super()._get_pool(**params)
        sentinel = self._get_sentinel_instance(**params)
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return sentinel.master_for(
            service_name=self._transport_options.get("master_name", None),
            redis_class=self._get_client(),
            connection_pool_class=_BlockingSentinelPool,
            **credentials,
        ).connection_pool


#: message headers with a job's deadline, which the enqueue step puts in Redis (`_ledger`):
#: seconds from the moment Redis accepts it (on Redis' clock, not the producer's), or a
#: time (unix s). pipeq's Client sends these instead of Celery's `expires`, which Celery
#: computes on the producer's clock and its worker judges on its own.
EXPIRES_IN_HEADER = "pipeq_expires_in_s"
EXPIRES_AT_HEADER = "pipeq_expires_at"

#: the `max_queue_length` the current thread's send is held to (0: none); set by
#: `Client` around `send_task`, read by the channel that pushes the message
enqueue_limit: ContextVar[int] = ContextVar("pipeq_enqueue_limit", default=0)
#: `pipeq serve`'s record of the job the current thread sends, (owner, digest): written
#: by the same enqueue step, which refuses an id already taken (JobIdTaken)
enqueue_submitted: ContextVar[tuple[str, str] | None] = ContextVar(
    "pipeq_enqueue_submitted", default=None
)


class JobIdTaken(Exception):
    """The enqueue found the job id taken (`enqueue_submitted`): nothing was sent."""


class _Channel(kombu_redis.Channel):
    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis-py client for every command it sends (a fifth of a
        # producer's send, docs/batching.md); one client over the same pool does the job
        yield client or self._commands_client

    @cached_property
    def _commands_client(self) -> Any:
        return self._create_client()  # type: ignore[no-untyped-call]

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self._commands_client)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """A job for a deployment is pushed, counted as waiting and checked against the
        deployment's limit in one step (`_ledger` enqueue); anything else as kombu does.
        Its level is pipeq's header (`PRIORITY_HEADER`), not Celery's `priority` (kombu's
        emulation: one list per step, which a worker's prefetch defeats)."""
        headers = message.get("headers") or {}
        job_id = headers.get("id")
        batched = kwargs.get("_publish_batch") is not None  # kombu's producer batching
        if not queue.startswith(QUEUE_PREFIX) or not isinstance(job_id, str) or batched:
            return super()._put(queue, message, **kwargs)  # type: ignore[no-untyped-call,no-any-return]
        deployment = queue.removeprefix(QUEUE_PREFIX)
        limit = enqueue_limit.get()
        outcome = self.ledger.enqueue(
            deployment,
            job_id,
            dumps(message),  # type: ignore[no-untyped-call]
            limit=limit,
            ttl_s=RESULT_TTL_S,
            event=self._sent_event(queue, headers),
            event_channel=self._get_publish_topic(EVENT_EXCHANGE_NAME, "task.sent"),  # type: ignore[no-untyped-call]
            expires_in_s=headers.get(EXPIRES_IN_HEADER),
            expires_at=headers.get(EXPIRES_AT_HEADER),
            submitted=enqueue_submitted.get(),
            priority=headers.get(PRIORITY_HEADER) or "normal",
        )
        if outcome == 2:
            raise JobIdTaken(job_id)
        if not outcome:
            raise Overloaded(
                f"{limit} jobs wait already (max_queue_length); retry later",
                deployment=deployment,
            )

    @staticmethod
    def _sent_event(queue: str, headers: dict[str, Any]) -> str:
        """Celery's `task-sent` event of a job, as kombu publishes a fanout message (the
        body is JSON, not base64: kombu reads either): Flower shows the job from the
        moment it is accepted. It travels with the enqueue script, which publishes it once
        the job is accepted: a submit took 511 µs instead of 422 (+21%), where Celery's
        own event (`task_send_sent_event`, a second command) took 677 µs (+60%)
        (bench/sent_event_cost.py, 2,000 submits x 5 rounds, a 2-core host)."""
        pid = os.getpid()
        event = {
            "type": "task-sent",
            "uuid": headers["id"],
            "name": headers.get("shadow") or headers.get("task"),  # Flower's row name
            "args": headers.get("argsrepr"),
            "kwargs": headers.get("kwargsrepr"),
            "retries": headers.get("retries") or 0,
            "eta": headers.get("eta"),
            "expires": _expires_shown(headers),
            "root_id": headers.get("root_id"),
            "parent_id": headers.get("parent_id"),
            "queue": queue,
            # Flower's task page shows it: the level's list (`_ledger` Priorities)
            "routing_key": level_queue(queue, headers.get(PRIORITY_HEADER) or "normal"),
            "hostname": _producer_name(pid),
            "pid": pid,
            "utcoffset": utcoffset(),
            "timestamp": time.time(),
        }
        message = {
            "body": json.dumps(event, default=str),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {"delivery_tag": headers["id"], "delivery_info": _SENT_DELIVERY},
        }
        return json.dumps(message)


def _expires_shown(headers: dict[str, Any]) -> str | None:
    """The deadline Flower shows: Celery's header, or pipeq's (`EXPIRES_IN_HEADER` by this
    machine's clock: for the eye only, Redis' clock judges)."""
    at = headers.get(EXPIRES_AT_HEADER)
    if at is None and headers.get(EXPIRES_IN_HEADER) is not None:
        at = time.time() + float(headers[EXPIRES_IN_HEADER])
    if at is None:
        return headers.get("expires")
    return datetime.datetime.fromtimestamp(float(at), datetime.UTC).isoformat()


#: where a task-sent event goes: Celery's event exchange, as kombu routes it on Redis
_SENT_DELIVERY = {"exchange": EVENT_EXCHANGE_NAME, "routing_key": "task.sent"}


@functools.cache
def _producer_name(pid: int) -> str:
    """Process `pid` (this one) as Celery names a producer: `gen<pid>@<host>`."""
    return str(anon_nodename())


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, sending its commands through one client per channel, and
    pushing jobs with the ledger's atomic enqueue."""

    Channel = _Channel


class _SentinelChannel(_Channel, kombu_redis.SentinelChannel):
    """`_Channel` over the master kombu's Sentinel channel finds."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options


class SentinelTransport(kombu_redis.SentinelTransport):
    """`Transport` for sentinel:// URLs."""

    Channel = _SentinelChannel


def make_app(url: str | None = None, *, cls: type[Celery] = Celery, **overrides: Any) -> Celery:
    """A Celery app (of class `cls`) with pipeq's settings, on Redis as broker and result
    backend."""
    target = redis_target(url)
    broker = target.celery_url
    # "<class>+<url>" picks the backend class (celery.app.backends.by_url)
    kind = "SentinelResultBackend" if target.sentinel else "Backend"
    backend = f"{__name__}:{kind}+{broker.removeprefix('redis+')}"
    app = cls("pipeq", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        broker_transport=transport_for(url),
        # TLS as pipeq reads it (`_redis`): verified unless the URL says otherwise
        broker_use_ssl=target.ssl,
        redis_backend_use_ssl=target.ssl,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=RESULT_TTL_S,
        task_track_started=False,  # workers mark a job STARTED when its forward pass begins
        # a message is acknowledged after its result is stored; until then it sits in its
        # worker's in-flight list, whence the ledger puts it back if that worker dies
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_transport_options={"socket_connect_timeout": CONNECT_TIMEOUT_S},
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        # Celery retries a lost result connection 20 times a second apart, then raises a
        # bare RuntimeError; pipeq's callers retry for their own bounded time instead
        # (Client.call for producers; for workers, result_backend_always_retry)
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        # a send retried across a lost connection stays within a producer's broker_timeout_s
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        task_default_queue="pipeq.default",
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower's rows
        # Celery's task-sent event costs producers 60% more per submit: pipeq's enqueue
        # publishes it itself, for 21% (_Channel._sent_event), so Flower shows each job
        # from the moment it is accepted
        task_send_sent_event=False,
        broker_pool_limit=10,
    )
    app.conf.update(overrides)
    # the sentinels' options join whatever transport options the caller set
    for setting in ("broker_transport_options", "result_backend_transport_options"):
        app.conf[setting] = {**app.conf[setting], **target.transport_options()}
    return app
