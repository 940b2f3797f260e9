"""One Redis a producer talks to: its redis-py client, Celery app, registry and ledger,
and the one way a call on it waits out an outage (`Broker.call`).

A `Client` holds one per distinct Redis URL: the default one, and each one a
deployment of its config names (`redis_url`; docs/redis.md, "Several Redis servers"),
so that a Redis that is down fails only the calls that touch it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from kombu.exceptions import OperationalError

from pipeq import _app
from pipeq._ledger import META_PREFIX, Ledger, job_key
from pipeq._redis import WRITE_REFUSALS, masked, scrub, write_refusal
from pipeq._registry import Registry
from pipeq.errors import BrokerRefusesWrites, BrokerUnavailable, InvalidRequest

__all__ = ["BROKER_ERRORS", "MAX_CONNECTIONS", "Broker", "drop_result_channels"]

T = TypeVar("T")
#: a Client's Redis connections: each `Job.stream()` reader holds one while it waits for
#: a piece (redis-py's default pool of 100 failed the 101st of many readers at once)
MAX_CONNECTIONS = 10_000
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError, OSError)


def _cause(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`e`, or the exception it was raised from (kombu and Celery wrap redis-py's), if
    it is a `kind`."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, kind):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _said(e: BaseException, url: str) -> str:
    """An error's type and message on one line, without any password of `url` (a
    server may echo what it was sent)."""
    return scrub(" ".join(f"{type(e).__name__}: {e}".split()), url)


def drop_result_channels(app: Any) -> None:
    """Celery's AsyncResult unsubscribes from its result channel when it is garbage
    collected, reconnecting (for many seconds) if Redis is gone. Jobs that outlive their
    client, or the interpreter's exit, must not do that: drop the subscription connection."""
    consumer = app.backend.result_consumer
    consumer.stop()
    consumer._pubsub = None


class Broker:
    """One Redis: `redis` (redis-py), `app` (Celery: broker and result backend),
    `registry`, `ledger`. InvalidRequest for a URL `_redis` cannot read (masked)."""

    def __init__(self, url: str, *, broker_timeout_s: float, no_worker_grace_s: float) -> None:
        self.url = url
        self.broker_timeout_s = broker_timeout_s
        try:
            self.redis = _app.redis_client(
                url, socket_timeout=broker_timeout_s, max_connections=MAX_CONNECTIONS
            )
            self.app = _app.make_app(url)
        except ValueError as e:  # not a URL of `_redis`'s forms, or a bad port
            raise InvalidRequest(f"invalid Redis URL {masked(url)}: {e}") from None
        self.registry = Registry(self.redis, no_worker_grace_s=no_worker_grace_s)
        self.ledger = Ledger(self.redis)
        # a client never closed (`pipeline()` makes one) still exits at once without Redis
        weakref.finalize(self, drop_result_channels, self.app)

    def close(self) -> None:
        drop_result_channels(self.app)
        self.app.close()
        self.redis.close()

    def holds(self, job_id: str) -> tuple[bool, str | None]:
        """Whether this Redis knows the job (its record or its stored result), and its
        deployment when the record says; one round trip, not retried (redis-py's errors)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(job_key(job_id))
        pipe.exists(META_PREFIX + job_id)
        deployment, stored = pipe.execute()
        if isinstance(deployment, bytes):
            return True, deployment.decode()
        return bool(stored), None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, tried again while Redis is unreachable, for up to
        `broker_timeout_s`; then BrokerUnavailable naming the URL (password masked)."""
        deadline: float | None = None
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                reason = write_refusal(e)
                if reason is not None:  # Redis answers: waiting would not help, say why now
                    raise BrokerRefusesWrites(
                        f"Redis at {masked(self.url)} refuses writes: {reason}; accepted "
                        f"jobs are kept, and it takes new ones once {WRITE_REFUSALS[reason]} "
                        f"({_said(e, self.url)})",
                        reason=reason,
                    ) from None
                if not isinstance(
                    e, (*BROKER_ERRORS, RuntimeError, redis.exceptions.InvalidResponse)
                ):
                    raise
                garbled = _cause(e, redis.exceptions.InvalidResponse)
                if garbled is not None:  # no Redis there: waiting will not make one
                    raise BrokerUnavailable(
                        f"the server at {masked(self.url)} does not speak Redis "
                        f"({_said(garbled, self.url)}): is it Redis' host and port?"
                    ) from None
                # Celery's result consumer wraps a lost connection in a RuntimeError
                if isinstance(e, RuntimeError) and not isinstance(e.__cause__, BROKER_ERRORS):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.broker_timeout_s
                if now >= deadline:
                    raise BrokerUnavailable(
                        f"Redis at {masked(self.url)} did not answer for "
                        f"{self.broker_timeout_s:g} s ({_said(e, self.url)})"
                    ) from None
                time.sleep(min(0.25, deadline - now))
