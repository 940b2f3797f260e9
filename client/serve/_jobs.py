"""The gateway as a producer: submit through `Client`'s own code, read and wait with
async Redis. Shared by every router (native jobs, Hugging Face format).

    pipeq:submitted:<id>   hash   owner (the API key's name), deployment, created_at
                                  (Redis' clock), digest (of the request, for an
                                  idempotent PUT); written by the enqueue step itself
                                  (`_ledger`), it expires with the job's result

A submit runs `Client.prepare` and `Client.send` (the very code `Client.submit` runs:
resolve, validate, the ledger's atomic enqueue) in a worker thread; waits and event
streams are async: one pattern subscription per gateway process and Redis to the result
channels (`celery-task-meta-*`, where results are published as they are stored) wakes
every waiting request, and each wait re-reads the stored result at least once a second,
so a missed message costs time, never a result.

With several Redis (docs/redis.md, "Several Redis servers") each job's keys above are on
its deployment's Redis (`Hub`); the gateway's own state stays on the default one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
from celery import states

from pipeq import _app, _floats, _tasks
from pipeq._broker import Broker
from pipeq._client import Client, JobState, to_pipeq_error
from pipeq._config import Deployment
from pipeq._ledger import META_PREFIX, job_key, stream_key, submitted_key
from pipeq._redis import masked
from pipeq._registry import DEPLOYMENTS_KEY, Announced
from pipeq.errors import BrokerUnavailable, InvalidRequest, JobTimeout, NoLiveWorker, PipeqError
from pipeq.serve._auth import LOCAL, RATE_SCRIPT, Caller, Keys
from pipeq.serve._errors import ApiError
from pipeq.serve._metrics import Metrics
from pipeq.serve._webhooks import (
    Dispatcher,
    WebhookConfig,
    delivery_state,
    enqueue_batch_event,
    webhook_key,
)

__all__ = [
    "Gateway",
    "JobView",
    "Settings",
    "parse_json",
]

log = logging.getLogger("pipeq.serve")
T = TypeVar("T")

#: a wait re-reads the stored result about this often (a missed message costs this;
#: spread by up to half, so thousands of waits do not read at once)
RECHECK_S = 5.0
#: connections of a gateway process's async Redis pool (reads, waits' re-reads, the
#: stream reader, rate limits); a request waits for a free one
ASYNC_CONNECTIONS = 256
#: what closing waits for a background task or a connection pool at most (s)
CLOSE_TIMEOUT_S = 2.0
#: after a Redis did not answer a call (for `broker_timeout_s`), its deployments' calls
#: fail at once this long (s): a flood of them holds no thread, and asks it again soon
DOWN_FOR_S = 1.0
#: `Retry-After` of a job still queued or running
POLL_AFTER_S = 1
#: the JSON of the request around `inputs` and `params` (for the body cap)
ENVELOPE_BYTES = 64 * 1024
#: the longest `Prefer: wait` and `?wait=` (s)
MAX_WAIT_S = 60.0


@dataclass
class Settings:
    """What a gateway process is told at start (`pipeq serve` reads it from its options
    and environment)."""

    redis_url: str | None = None
    #: a deployments TOML (or its deployments): those naming their own `redis_url` are
    #: served on that Redis (docs/redis.md, "Several Redis servers"); None: the one Redis
    config: str | Path | Mapping[str, Deployment] | None = None
    keys: Keys | None = None
    #: a Redis call that fails is tried again this long, then 503
    broker_timeout_s: float = 2.0
    #: bodies over this are refused (413) before they are read whole; None: the largest
    #: `limits.request_bytes` of the announced deployments, plus ENVELOPE_BYTES
    max_body_bytes: int | None = None
    #: an event stream sends a comment this often while nothing else comes
    keepalive_s: float = 15.0
    #: submits run in at most this many threads at once
    submit_threads: int = 8
    #: webhooks' secrets, allowlist and retries (None: a job naming a webhook is 422)
    webhooks: WebhookConfig | None = None


# -- the request body ------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """A request body as strict JSON (no NaN or Infinity); ApiError 422 otherwise, and
    415 for a body that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(415, "UnsupportedMediaType", "the body must be UTF-8 JSON") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(422, "InvalidRequest", "the body nests too deep") from None
    except ValueError as e:
        raise ApiError(422, "InvalidRequest", f"the body is not JSON: {e}") from None


def digest_of(body: Any) -> str:
    """The same request, however its JSON was written (key order, spaces)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- a job as the gateway shows it ----------------------------------------------------
@dataclass
class JobView:
    """A job's state and, once done, its result or error."""

    id: str
    deployment: str | None
    status: JobState
    created_at: float | None = None
    result: Any = None
    error: PipeqError | None = None
    #: its webhook's delivery (`_webhooks.delivery_state`); None: it has none
    webhook: dict[str, Any] | None = None
    #: its level (docs/scale.md, Priorities); None: not recorded (sent around the gateway)
    priority: str | None = None
    #: the URL of the Redis it was found on (never shown); None: its deployment's
    redis_url: str | None = field(default=None, repr=False)

    def urls(self) -> dict[str, str]:
        base = f"/v1/jobs/{self.id}"
        return {
            "self": base,
            "result": f"{base}/result",
            "events": f"{base}/events",
            "cancel": f"{base}/cancel",
        }

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "deployment": self.deployment,
            "status": self.status.value,
            "created_at": _iso(self.created_at),
        }
        if self.priority is not None:
            out["priority"] = self.priority
        if self.status is JobState.SUCCEEDED:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = {"type": type(self.error).__name__, "message": self.error.message}
        if self.webhook is not None:
            out["webhook"] = self.webhook
        out["urls"] = self.urls()
        return out


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def _meta_state(meta: dict[str, Any] | None) -> str | None:
    return meta.get("status") if isinstance(meta, dict) else None


# -- waking waits: one pattern subscription per process -------------------------------
@dataclass(eq=False)
class _Watch:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    data: bytes | None = None


class ResultBus:
    """Wakes the requests waiting for jobs as their states are stored."""

    def __init__(self, aredis: Any) -> None:
        self._aredis = aredis
        self._watches: dict[str, set[_Watch]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: called with the id of every job whose state is stored (the webhooks' dispatcher)
        self.listeners: list[Callable[[str], None]] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pipeq-result-bus")

    async def close(self) -> None:
        self._closed = True  # redis-py may turn the cancel into a ConnectionError
        await _stop(self._task)

    async def _run(self) -> None:
        while not self._closed:
            pubsub = self._aredis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(META_PREFIX + "*")
                for held in self._watches.values():  # a result stored while it was down
                    for watch in held:
                        watch.event.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is None or msg.get("type") != "pmessage":
                        continue
                    job_id = msg["channel"].decode()[len(META_PREFIX) :]
                    for listen in self.listeners:
                        listen(job_id)
                    for watch in self._watches.get(job_id, ()):
                        watch.data = msg["data"]
                        watch.event.set()
            except (redis.RedisError, OSError) as e:
                if self._closed:
                    return
                log.warning("result subscription lost (%s); waits poll until it is back", e)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT_S)

    @contextlib.contextmanager
    def watch(self, job_id: str, watch: _Watch) -> Iterator[_Watch]:
        """Set `watch.event` (and `.data`) whenever the job's state is stored."""
        self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            held = self._watches.get(job_id)
            if held is not None:
                held.discard(watch)
                if not held:
                    del self._watches[job_id]


# -- following job streams: one XREAD for every open event stream -------------------------
def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Follow:
    cursor: str
    event: asyncio.Event
    entries: list[tuple[str, dict[bytes, bytes]]] = field(default_factory=list)


class StreamBus:
    """Reads every followed job stream with one blocking XREAD (all keys at once) and
    hands each follower the entries after its own cursor: 2,000 open event streams are
    one Redis connection, not 2,000."""

    #: an XREAD waits this long; a stream followed meanwhile joins the next one
    BLOCK_MS = 250

    def __init__(self, aredis: Any) -> None:
        self._aredis = aredis
        self._follows: dict[str, set[_Follow]] = {}
        self._added = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pipeq-stream-bus")

    async def close(self) -> None:
        self._closed = True  # redis-py may turn the cancel into a ConnectionError
        await _stop(self._task)

    @contextlib.contextmanager
    def follow(self, key: str, cursor: str, event: asyncio.Event) -> Iterator[_Follow]:
        """Entries of stream `key` after `cursor` land in `.entries`, and set `event`."""
        follow = _Follow(cursor, event)
        self._follows.setdefault(key, set()).add(follow)
        self._added.set()
        try:
            yield follow
        finally:
            held = self._follows.get(key)
            if held is not None:
                held.discard(follow)
                if not held:
                    del self._follows[key]

    async def _run(self) -> None:
        while not self._closed:
            self._added.clear()
            streams = {
                key: min((f.cursor for f in held), key=_stream_order)
                for key, held in self._follows.items()
                if held
            }
            if not streams:
                await self._added.wait()
                continue
            try:
                reply = await self._aredis.xread(streams, block=self.BLOCK_MS)
            except (redis.RedisError, OSError) as e:
                if self._closed:
                    return
                log.warning("reading job streams failed (%s); trying again", e)
                await asyncio.sleep(1.0)
                continue
            for raw_key, raw_entries in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                entries = [(i.decode() if isinstance(i, bytes) else i, f) for i, f in raw_entries]
                for follow in self._follows.get(key, ()):
                    after = _stream_order(follow.cursor)
                    new = [e for e in entries if _stream_order(e[0]) > after]
                    if new:
                        follow.entries.extend(new)
                        follow.cursor = new[-1][0]
                        follow.event.set()


# -- the gateway -----------------------------------------------------------------------
class StreamReader(Protocol):
    """What `Gateway.follow` needs of a route's reader of a job's stream."""

    #: the id of the last stream entry read ("0-0": none)
    cursor: str
    #: the job's view once it ended (set by `Gateway.follow`)
    view: JobView | None

    def events(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> Iterable[bytes]:
        """Server-sent events for these entries; moves `cursor` past them."""
        ...


@dataclass(eq=False)
class Hub:
    """One Redis the gateway reaches jobs on: the `Client`'s Broker of it (submits,
    cancels, liveness), an async client (reads, waits, streams) and the result and
    stream buses over that client."""

    broker: Broker
    aredis: Any
    results: ResultBus
    streams: StreamBus
    #: the threads its deployments' sync calls run in (`Gateway.in_thread`): a Redis
    #: that does not answer holds its own deployments' requests only
    threads: ThreadPoolExecutor
    #: time.monotonic() until which a call fails at once (it did not answer just now)
    down_until: float = 0.0

    @property
    def url(self) -> str:
        return self.broker.url


class Gateway:
    """What every request of one gateway process shares: a `Client` (submits), a `Hub`
    per Redis (reads, waits, streams), the settings. No state of its own outside Redis:
    any number of them behind a load balancer act as one.

    Several Redis (a config whose deployments name their own `redis_url`): what is about
    one job (its submit, record, result, waits, stream, cancel) is on its deployment's
    Redis; the gateway's own state (rate limits, webhooks, files and batches) on the
    default one (`aredis`). A job asked for by id alone is read on every Redis at once."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.client = Client(
            settings.redis_url,
            config=settings.config or {},
            broker_timeout_s=settings.broker_timeout_s,
        )
        self.hubs = {url: self._hub(url) for url in self.client.redis_urls}
        #: the default Redis: the gateway's own state, and the deployments no config routes
        self.home = self.hubs[self.client.redis_url]
        self.aredis = self.home.aredis
        self.rate = self.aredis.register_script(RATE_SCRIPT)
        self.webhooks = (
            Dispatcher(self.aredis, settings.webhooks, self.read, self.job_redis)
            if settings.webhooks
            else None
        )
        if self.webhooks is not None:
            for hub in self.hubs.values():
                hub.results.listeners.append(self.webhooks.changed)
        self.threads = self.home.threads
        self._body_limit = (0.0, 0)
        self._body_limit_read: asyncio.Future[int] | None = None

    def _hub(self, url: str) -> Hub:
        aredis = _app.redis_target(url).aclient(
            max_connections=ASYNC_CONNECTIONS,
            timeout=self.settings.broker_timeout_s * 5,
            socket_connect_timeout=_app.CONNECT_TIMEOUT_S,
        )
        # concurrent.futures' pool: its queue is a SimpleQueue, whose hand-over cost a
        # tenth of what anyio's Condition-based one did (py-spy --gil, a submit's CPU)
        threads = ThreadPoolExecutor(self.settings.submit_threads, "pipeq-submit")
        broker = self.client.broker_at(url)
        return Hub(broker, aredis, ResultBus(aredis), StreamBus(aredis), threads)

    def hub_for(self, deployment: str | None) -> Hub | None:
        """The Redis a deployment the config routes lives on; None for any other name (a
        task, a model, a deployment of the default Redis)."""
        url = self.client.routes.get(deployment or "")
        return self.hubs[url] if url is not None else None

    @property
    def keys(self) -> Keys | None:
        return self.settings.keys

    def hub_of(self, view: JobView) -> Hub:
        """The Redis a job lives on: where it was found, else its deployment's."""
        if view.redis_url is not None:
            return self.hubs[view.redis_url]
        return self.hubs[self.client.broker(view.deployment).url]

    def job_redis(self, view: JobView) -> Any:
        """The async client of the Redis a job lives on (the webhooks' stream reads)."""
        return self.hub_of(view).aredis

    @contextlib.contextmanager
    def watch(self, job_id: str, event: asyncio.Event | None = None) -> Iterator[_Watch]:
        """Set `event` (a new one by default) whenever the job's state is stored, on
        whichever Redis it is (a watch costs no Redis command)."""
        watch = _Watch(event or asyncio.Event())
        with contextlib.ExitStack() as held:
            for hub in self.hubs.values():
                held.enter_context(hub.results.watch(job_id, watch))
            yield watch

    async def start(self) -> None:
        for hub in self.hubs.values():
            await hub.results.start()
            await hub.streams.start()
        if self.webhooks is not None:
            await self.webhooks.start()

    async def in_thread(self, fn: Callable[..., T], *args: Any, hub: Hub | None = None) -> T:
        """`fn(*args)` in one of the submit threads (the sync `Client`'s calls): `hub`'s,
        when the call is about its deployments only, else the default Redis'. A `hub`
        whose call raised BrokerUnavailable less than `DOWN_FOR_S` ago fails the next at
        once (503) rather than each waiting `broker_timeout_s` in turn for a thread."""
        loop = asyncio.get_running_loop()
        if hub is None:
            return await loop.run_in_executor(self.threads, fn, *args)
        _check_up(hub)
        return await loop.run_in_executor(hub.threads, _guarded, hub, fn, args)

    async def close(self) -> None:
        for hub in self.hubs.values():
            hub.threads.shutdown(wait=False)
        if self.webhooks is not None:
            await self.webhooks.close()
        for hub in self.hubs.values():
            await hub.streams.close()
            await hub.results.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(hub.aredis.aclose(), CLOSE_TIMEOUT_S)
        self.client.close()

    # -- limits -------------------------------------------------------------------------
    async def body_limit(self) -> int:
        """Bytes a request body may have (`Settings.max_body_bytes`): the deployments'
        largest, read again every 5 s by one task while requests go on with the last one
        read (every request asks: a Redis that does not answer must hold none up)."""
        if self.settings.max_body_bytes is not None:
            return self.settings.max_body_bytes
        at, limit = self._body_limit
        reading = self._body_limit_read
        if time.monotonic() - at >= 5.0 and (reading is None or reading.done()):
            reading = self._body_limit_read = asyncio.ensure_future(self._read_body_limit())
        if limit or reading is None:
            return limit
        return await asyncio.shield(reading)  # the first: every request waits for one read

    async def _read_body_limit(self) -> int:
        largest = _tasks.DEFAULT_LIMITS["request_bytes"]
        with contextlib.suppress(Exception):  # none answers: the default, read again in 5 s
            found, _ = await self.deployments()
            for d in found.values():
                limits = d.info.get("limits") or {}
                largest = max(largest, int(limits.get("request_bytes") or 0))
        limit = largest + ENVELOPE_BYTES
        self._body_limit = (time.monotonic(), limit)
        return limit

    async def deployments(self, name: str | None = None) -> tuple[dict[str, Announced], list[Hub]]:
        """The deployments announced on every Redis, read at once (each counts only on the
        Redis its config puts it on), and the Redis that did not answer. `name`, a
        deployment of the config: only its Redis is read (one that does not answer cannot
        slow the others' requests)."""

        async def announced(hub: Hub) -> dict[bytes, bytes]:
            raw: dict[bytes, bytes] = await self.bounded(hub.aredis.hgetall(DEPLOYMENTS_KEY))
            return raw

        hubs = list(self.hubs.values())
        if name is not None and name in self.client.config:
            hubs = [self.hubs[self.client.broker(name).url]]
        replies = await asyncio.gather(*map(announced, hubs), return_exceptions=True)
        found: dict[str, Announced] = {}
        down: list[Hub] = []
        for hub, reply in zip(hubs, replies, strict=True):
            if isinstance(reply, (redis.RedisError, OSError)):
                down.append(hub)
                log.warning("Redis at %s did not answer (%s)", masked(hub.url), reply)
                continue
            if isinstance(reply, BaseException):
                raise reply
            for k, v in reply.items():
                name, info = k.decode(), json.loads(v)
                if self.client.broker(name) is hub.broker:
                    found[name] = Announced(name, info["task"], info["model"], info)
        return found, down

    # -- submit ------------------------------------------------------------------------
    async def submit(
        self,
        caller: Caller,
        target: str,
        inputs: Any,
        *,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        expires: float | None = None,
        job_id: str | None = None,
        digest: str = "",
        wait_s: float = 0.0,
        webhook: str | None = None,
        webhook_events: tuple[str, ...] = ("completed",),
        priority: str = "normal",
    ) -> tuple[JobView, bool]:
        """Validate and enqueue through `Client` (in a thread): the job (once done, if
        it is within `wait_s`), and whether this call created it (False: an idempotent
        repeat of `job_id` with the same `digest`). `webhook`: a URL the job's
        `webhook_events` are POSTed to (`_webhooks`). Raises what `Client.submit` raises,
        ApiError 403 for a deployment the caller may not use, 409 for a `job_id` taken
        by another request, InvalidRequest for a webhook this gateway may not call.
        `priority`: as `Client.submit`'s."""
        chosen, job_id = job_id is not None, job_id or _new_id()
        hooks = self.webhooks
        registered = False
        if webhook is not None:  # recorded before the send: no outcome missed
            if hooks is None:
                raise InvalidRequest("webhook: this gateway has no webhooks configured")
            registered = await hooks.register(job_id, webhook, webhook_events)
        with self.watch(job_id) as watch:  # before the send: no result missed
            try:
                view, created = await self.in_thread(
                    self._submit,
                    caller,
                    target,
                    inputs,
                    model,
                    params or {},
                    expires,
                    job_id,
                    digest,
                    priority,
                    chosen,
                    hub=self.hub_for(target),
                )
                if not created:  # the job an earlier identical request made
                    view = await self.read(job_id, where=view)
            except Exception:  # not sent (a cancelled request's send may go on: kept)
                if hooks is not None and registered:
                    await hooks.unregister(job_id)
                raise
            if hooks is not None and registered and not created:
                await hooks.unregister(job_id)  # the id was taken: not this request's job
            elif registered:
                view.webhook = {"status": "pending", "attempts": 0, "last_status_code": None}
            if wait_s > 0:
                self.metrics.waiting.inc()
                try:
                    view = await self._wait(watch, view, wait_s)
                finally:
                    self.metrics.waiting.dec()
        return view, created

    def _submit(
        self,
        caller: Caller,
        target: str,
        inputs: Any,
        model: str | None,
        params: dict[str, Any],
        expires: float | None,
        job_id: str,
        digest: str,
        priority: str,
        chosen: bool = False,
    ) -> tuple[JobView, bool]:
        """The job sent, and True; or, for an identical request's `job_id` (same key,
        same digest), a view saying where that job is, and False."""
        client = self.client
        found = client.resolve(target, model)
        caller.require(found.name)
        prepared = client.prepare(found.name, inputs, None, expires, params, priority)
        broker = client.broker(found.name)
        view = JobView(job_id, found.name, JobState.QUEUED, created_at=time.time())
        view.redis_url, view.priority = broker.url, prepared.priority
        if chosen:
            self._check_elsewhere(broker, job_id)
        # who submitted it is recorded by the enqueue step itself, which refuses an id
        # already taken: one round trip, and no record of a job that was not sent
        token = _app.enqueue_submitted.set((caller.name, digest))
        try:
            client.send(prepared, job_id)
        except _app.JobIdTaken:
            record = broker.call(broker.redis.hgetall, submitted_key(job_id))
            owner, was = record.get(b"owner"), record.get(b"digest", b"")
            # the same request again (a PUT repeated, or a send retried after a lost
            # connection): the job it made
            if owner is not None and owner.decode() == caller.name and was.decode() == digest:
                return view, False
            raise ApiError(
                409, "Conflict", "this job id is taken by another request", job_id=job_id
            ) from None
        finally:
            _app.enqueue_submitted.reset(token)
        return view, True

    def _check_elsewhere(self, broker: Broker, job_id: str) -> None:
        """ApiError 409 if a job id a caller chose is taken on a Redis other than the one
        its job goes to (the enqueue refuses one taken on its own). Best effort: a Redis
        that does not answer is not waited for, and two requests racing with one id to
        two Redis are not seen."""
        for other in self.hubs.values():
            if other.broker is broker:
                continue
            try:
                known, _ = other.broker.holds(job_id)
            except Exception:
                continue
            if known:
                raise ApiError(
                    409, "Conflict", "this job id is taken by another request", job_id=job_id
                )

    # -- reading jobs --------------------------------------------------------------------
    async def _read_at(self, hub: Hub, job_id: str) -> tuple[Hub, list[Any]]:
        """The job's record, deployment, stored result and (on the default Redis) its
        webhook's delivery, in one round trip to `hub`."""
        async with hub.aredis.pipeline(transaction=False) as pipe:
            pipe.hgetall(submitted_key(job_id))
            pipe.get(job_key(job_id))
            pipe.get(META_PREFIX + job_id)
            if hub is self.home:
                pipe.hgetall(webhook_key(job_id))
            got: list[Any] = await self.bounded(pipe.execute())
        return hub, got

    async def bounded(self, call: Awaitable[T]) -> T:
        """`call`, or TimeoutError (an OSError, as a refused connection is) after
        `broker_timeout_s`: a Redis that stopped answering without refusing (frozen,
        partitioned) costs a request that long, not the socket's own timeout."""
        return await asyncio.wait_for(call, self.settings.broker_timeout_s)

    async def read(
        self, job_id: str, caller: Caller | None = None, *, where: JobView | None = None
    ) -> JobView:
        """One read of the job (its record, deployment, result); `caller`: ApiError 404
        unless it may see the job (another key's job answers as an unknown id does).
        `where`: a view of it read before, which says which Redis it is on; without
        one, and with several Redis, each is read at once and the first that knows the
        job answers (those that do not answer: 503 only when none knows it)."""
        hubs = [self.hub_of(where)] if where is not None else list(self.hubs.values())
        hub, got = await self._first(hubs, job_id)
        record, deployment, meta = got[:3]
        if hub is self.home:
            hook = got[3]
        else:  # its webhook's delivery is the gateway's own state
            try:
                hook = await self.aredis.hgetall(webhook_key(job_id))
            except (redis.RedisError, OSError) as e:
                raise _unavailable(e, self.home) from None
        if caller is not None:
            self._check_owner(caller, job_id, record)
        view = self._view(job_id, record, deployment, meta)
        view.webhook = delivery_state(hook)
        view.redis_url = hub.url
        if caller is not None and view.status is JobState.UNKNOWN:
            raise ApiError(404, "NotFound", "no such job", job_id=job_id)
        return view

    async def _first(self, hubs: list[Hub], job_id: str) -> tuple[Hub, list[Any]]:
        """`_read_at` on each of `hubs` at once: the first reply that knows the job, else
        the default Redis' (or the only one's); ApiError 503 if one that did not answer
        might hold it."""
        if len(hubs) == 1:
            try:
                return await self._read_at(hubs[0], job_id)
            except (redis.RedisError, OSError) as e:
                raise _unavailable(e, hubs[0]) from None
        pending = {asyncio.ensure_future(self._read_at(hub, job_id)): hub for hub in hubs}
        unknown: tuple[Hub, list[Any]] | None = None
        failed: tuple[Hub, BaseException] | None = None
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    hub = pending.pop(task)
                    error = task.exception()
                    if isinstance(error, (redis.RedisError, OSError)):
                        failed = failed or (hub, error)
                        continue
                    if error is not None:
                        raise error
                    reply = task.result()
                    if any(reply[1][:3]):
                        return reply
                    if hub is self.home or unknown is None:
                        unknown = reply
        finally:
            for task in pending:
                task.cancel()
        if failed is not None:
            raise _unavailable(failed[1], failed[0])
        assert unknown is not None
        return unknown

    def _check_owner(self, caller: Caller, job_id: str, record: dict[bytes, bytes]) -> None:
        if self.keys is None and caller.name == LOCAL:
            return  # an open gateway (loopback only): every job
        owner = record.get(b"owner") if record else None
        if owner is None or owner.decode() != caller.name:
            raise ApiError(404, "NotFound", "no such job", job_id=job_id)

    def _view(self, job_id: str, record: Any, deployment: Any, meta_raw: Any) -> JobView:
        record = record or {}
        name = (deployment or record.get(b"deployment") or b"").decode() or None
        created = record.get(b"created_at")
        meta = json.loads(meta_raw) if meta_raw else None
        view = self._from_meta(job_id, name, float(created) if created else None, meta, record)
        level = record.get(b"priority")
        view.priority = level.decode() if level else None
        return view

    def _from_meta(
        self,
        job_id: str,
        deployment: str | None,
        created_at: float | None,
        meta: dict[str, Any] | None,
        record: Any = None,
    ) -> JobView:
        state = _meta_state(meta)
        view = JobView(job_id, deployment, JobState.QUEUED, created_at)
        if state is None:
            if deployment is None and not record:
                view.status = JobState.UNKNOWN
            return view
        assert meta is not None
        if state == states.SUCCESS:
            # packed float arrays (`pipeq._floats`, feature-extraction) as the lists they hold
            view.status, view.result = JobState.SUCCEEDED, _floats.unpack(meta.get("result"))
        elif state in (states.FAILURE, states.REVOKED):
            exc = self.client.app.backend.exception_to_python(meta.get("result"))
            view.error = to_pipeq_error(exc, job_id, deployment)
            view.status = {
                "JobExpired": JobState.EXPIRED,
                "JobCancelled": JobState.CANCELLED,
            }.get(type(view.error).__name__, JobState.FAILED)
        elif state == states.STARTED:
            view.status = JobState.RUNNING
        return view

    async def wait(self, view: JobView, timeout_s: float) -> JobView:
        """The job once done, or as it is after `timeout_s`. While its Redis does not
        answer, the job as last seen: it was accepted, and the caller gets its id (a 503
        would have a client send it again: a second job)."""
        if view.status.done or timeout_s <= 0:
            return view
        with self.watch(view.id) as watch:
            # read after watching: a result stored meanwhile is seen either way
            return await self._wait(watch, await self._reread(view), timeout_s)

    async def _reread(self, view: JobView) -> JobView:
        try:
            return await self.read(view.id, where=view)
        except ApiError as e:
            if e.status != 503:
                raise
            return view

    async def _wait(self, watch: _Watch, view: JobView, timeout_s: float) -> JobView:
        deadline = time.monotonic() + timeout_s
        while not view.status.done:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    watch.event.wait(), min(left, RECHECK_S * (0.5 + random.random()))
                )
            data, watch.data = watch.data, None
            watch.event.clear()
            if data is not None:  # the state just stored
                meta = json.loads(data)
                hook, level, at = view.webhook, view.priority, view.redis_url
                view = self._from_meta(view.id, view.deployment, view.created_at, meta, True)
                view.webhook, view.priority, view.redis_url = hook, level, at
            else:  # a re-read: no message (or the subscription came back)
                view = await self._reread(view)
                if not view.status.done and not await self.live(view.deployment):
                    break  # no worker will take it soon: the caller says so now
        return view

    async def outcome(self, view: JobView, waited_s: float) -> Any:
        """The result of a job a request waited `waited_s` for. Raises its error; when it
        is not done, NoLiveWorker (503 + Retry-After) if its deployment has no live worker
        (the job stays queued for the next one), else JobTimeout (the job goes on)."""
        if view.error is not None:
            raise view.error
        if view.status is JobState.SUCCEEDED:
            return view.result
        if not await self.live(view.deployment):
            raise NoLiveWorker(
                f"no worker of {view.deployment} is serving now: the job waits in the "
                f"queue for one (job {view.id})",
                job_id=view.id,
                deployment=view.deployment,
            )
        raise JobTimeout(
            f"no result within {waited_s:g} s (the job goes on)",
            job_id=view.id,
            deployment=view.deployment,
        )

    async def live(self, deployment: str | None) -> bool:
        """False when no worker of `deployment` beat within the registry's grace
        (`Registry.require_live`: what refuses a submit with NoLiveWorker); True when one
        did, or when Redis cannot tell (or the job's deployment is not known here)."""
        if deployment is None:
            return True
        try:
            require = self.client.broker(deployment).registry.require_live
            await self.in_thread(require, deployment, hub=self.hub_for(deployment))
        except NoLiveWorker:
            return False
        except Exception:  # Redis away: the wait goes on, as it did
            return True
        return True

    async def cancel(self, view: JobView) -> str:
        """'cancelled', 'running' (its forward pass cannot be stopped), 'finished' or
        'unknown' (`_app.cancel_job`)."""
        hub = self.hub_of(view)
        broker = hub.broker
        return await self.in_thread(
            broker.call,
            _app.cancel_job,
            broker.app,
            view.id,
            "cancelled by the producer",
            broker.ledger,
            hub=hub,
        )

    async def stream_entries(
        self, view: JobView, after: str, block_ms: int | None
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries of a job's stream after `after`, waiting up to `block_ms` for one
        (None: not at all)."""
        hub = self.hub_of(view)
        try:
            reply = await hub.aredis.xread({stream_key(view.id): after}, block=block_ms)
        except (redis.RedisError, OSError) as e:
            raise _unavailable(e, hub) from None
        entries = reply[0][1] if reply else []
        return [(i.decode() if isinstance(i, bytes) else i, f) for i, f in entries]

    async def follow(self, view: JobView, reader: StreamReader) -> AsyncIterator[bytes]:
        """A job's stream as server-sent events, until the job ends: `reader.events` turns
        each batch of stream entries into events (and moves `reader.cursor`); the stream
        is followed through the gateway's one XREAD (`streams`) and woken by its result
        bus; a keep-alive comment every `keepalive_s` while nothing else is sent. The
        ended job's view is left in `reader.view`. A client that goes away ends only this
        generator: the job runs on. Raises ApiError 503 when Redis does not answer."""
        keepalive = self.settings.keepalive_s
        key = stream_key(view.id)
        hub = self.hub_of(view)
        self.metrics.open_streams.inc()
        try:
            wake = asyncio.Event()
            with self.watch(view.id, wake) as watch:
                for chunk in reader.events(await self.stream_entries(view, reader.cursor, None)):
                    yield chunk  # what the stream holds already
                # after watching: an end meanwhile is seen
                view = await self.read(view.id, where=view)
                sent_at = time.monotonic()
                with hub.streams.follow(key, reader.cursor, wake) as follow:
                    while not view.status.done:
                        left = keepalive - (time.monotonic() - sent_at)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), max(0.0, left))
                        wake.clear()
                        entries, follow.entries = follow.entries, []
                        for chunk in reader.events(entries):
                            yield chunk
                            sent_at = time.monotonic()
                        ended = any(b"end" in fields for _, fields in entries)
                        if ended or watch.data is not None:
                            watch.data = None
                            view = await self.read(view.id, where=view)
                            if ended:  # the result is stored as the end is written
                                view = await self.wait(view, 5.0)
                        if not view.status.done and time.monotonic() - sent_at >= keepalive:
                            yield b": keep-alive\n\n"
                            sent_at = time.monotonic()
                # what the stream got since the last read
                for chunk in reader.events(await self.stream_entries(view, reader.cursor, None)):
                    yield chunk
            reader.view = view
        finally:
            self.metrics.open_streams.dec()

    async def attempts_before(self, view: JobView, last: str) -> int:
        """How many attempts began in a job's stream up to entry `last` (a resumed
        reader's count, so its next start is a restart)."""
        hub = self.hub_of(view)
        try:
            entries = await hub.aredis.xrange(stream_key(view.id), "-", last)
        except (redis.RedisError, OSError) as e:
            raise _unavailable(e, hub) from None
        return sum(1 for _, fields in entries if b"start" in fields)

    async def token_counts(self, view: JobView) -> list[Any] | None:
        """The worker's token counts of a done text-generation job (its stream's `end`);
        None when not there or Redis does not answer."""
        try:
            last = await self.hub_of(view).aredis.xrevrange(stream_key(view.id), count=1)
        except (redis.RedisError, OSError):
            return None
        if not last or b"usage" not in last[0][1]:
            return None
        counts: list[Any] = json.loads(last[0][1][b"usage"])
        return counts

    async def batch_event(self, batch: dict[str, Any], event_type: str) -> str | None:
        """Queue a Batch API event (`batch.completed`, `batch.failed`, `batch.expired`,
        `batch.cancelled`) for `webhooks.batch_url`, in OpenAI's event shape
        (`_webhooks.enqueue_batch_event`): its event id; None when no batch_url is
        configured (nothing is sent). ValueError for an unknown event type."""
        config = self.settings.webhooks
        if config is None or config.batch_url is None:
            return None
        return await enqueue_batch_event(self.aredis, batch, event_type, config.batch_url)

    async def check_rate(self, caller: Caller) -> None:
        from pipeq.serve._auth import check_rate

        try:
            await check_rate(self.aredis, self.rate, caller)
        except (redis.RedisError, OSError) as e:
            raise _unavailable(e, self.home) from None


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and give it CLOSE_TIMEOUT_S to end: a task cancelled
    while its Redis connection was being made once held a test's shutdown for minutes."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)


def _new_id() -> str:
    import uuid

    return str(uuid.uuid4())


def _check_up(hub: Hub) -> None:
    """BrokerUnavailable if `hub` did not answer a call less than `DOWN_FOR_S` ago."""
    if hub.down_until > time.monotonic():
        raise BrokerUnavailable(
            f"Redis at {masked(hub.url)} did not answer less than {DOWN_FOR_S:g} s ago: not "
            "asked again yet"
        )


def _guarded(hub: Hub, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """`fn(*args)` in `hub`'s thread, unless it was found down while the call waited for
    the thread (then at once); its BrokerUnavailable marks it down."""
    _check_up(hub)
    try:
        return fn(*args)
    except BrokerUnavailable:
        hub.down_until = time.monotonic() + DOWN_FOR_S
        raise


def _unavailable(e: BaseException, hub: Hub) -> ApiError:
    """503 naming the Redis (its password masked, as `Broker.call`'s BrokerUnavailable)."""
    return ApiError(
        503,
        "BrokerUnavailable",
        f"Redis at {masked(hub.url)} did not answer ({type(e).__name__})",
        retry_after_s=5,
    )


def valid_job_id(job_id: str) -> str:
    """A client-chosen job id: 1 to 128 of letters, digits, '-', '_', '.', ':', but not
    "." or "..": as a URL path segment those mean this folder and the one above (RFC 3986,
    5.2.4), and clients rewrite the job's URLs (`PUT /v1/jobs/..` was accepted).
    Raises InvalidRequest (422)."""
    ok = 0 < len(job_id) <= 128 and all(
        c.isascii() and (c.isalnum() or c in "-_.:") for c in job_id
    )
    if not ok or job_id in (".", ".."):
        raise InvalidRequest(
            "a job id is 1 to 128 letters, digits, '-', '_', '.' or ':', and not '.' or '..'"
        )
    return job_id
