"""Webhooks: a job's events, and the Batch API's, POSTed to a URL and signed the Standard
Webhooks way (docs/http.md, "Webhooks").

Configured in TOML (`pipeq serve --webhooks FILE`, $PIPEQ_WEBHOOKS_FILE, or the TOML
itself in $PIPEQ_WEBHOOKS); without it, a job that names a webhook is refused (422):

    [webhooks]
    secrets = ["whsec_..."]       # each signs every delivery: several during a rotation
    allow = ["hooks.example.com", "https://ci.example.org/pipeq/"]  # hosts or URL prefixes
    allow_private = false         # names that resolve to private addresses (default refused)
    timeout_s = 10                # one attempt, connect to status line (s)
    max_attempts = 10             # of the final event; then "failed"
    backoff_s = 10                # before the first retry (s); doubles each time, with jitter
    max_backoff_s = 3600          # the longest wait between two attempts (s)
    recheck_s = 10                # a pending job's state is read again at least this often (s)
    batch_url = "https://..."     # where the Batch API's events go (none: not sent)

A job's delivery lives in Redis, so any gateway process delivers it and a restarted one
resumes it; the job's result is never touched by it:

    pipeq:webhook:<job id>        hash  url, events, msg (the final event's webhook-id),
                                        status, attempts, last_status_code, last_error,
                                        started, cursor (stream), at (event time)
    pipeq:webhook-event:<evt id>  hash  url, msg, body, status, attempts, ...: a batch event
    pipeq:webhooks                zset  the hashes above still to deliver -> when a
                                        dispatcher looks at them next (unix s)
    pipeq:webhooks:leased         zset  the hashes a dispatcher is delivering -> when its
                                        lease ends (then they are due again)
    pipeq:webhooks:gone           set   URLs that answered 410 Gone: never sent to again

Each gateway process runs one `Dispatcher`: it claims the due entries (a Lua script moves
them to the leased set, so two gateways never deliver one at once and a dead gateway's
claims come due again), reads the job as `GET /v1/jobs/{id}` does, and sends what is due.
It learns a job changed from the gateway's result bus (`_jobs.ResultBus`: the one pattern
subscription to the result channels that `Prefer: wait` uses; each stored state is
published there, STARTED too): each change makes the job's entry due at once (ZADD XX, a
no-op for a job without a webhook), and `recheck_s` is only the fallback for a missed
message. Output pieces are not published: a job that asked for `output` events is read
every OUTPUT_EVERY_S while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import secrets as _secrets
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import redis

from pipeq._app import RESULT_TTL_S
from pipeq._client import JobState
from pipeq._ledger import stream_key
from pipeq.errors import InvalidRequest

if TYPE_CHECKING:
    from pipeq.serve._jobs import JobView

__all__ = [
    "BATCH_EVENTS",
    "EVENTS",
    "WEBHOOKS_ENV",
    "WEBHOOKS_FILE_ENV",
    "Dispatcher",
    "WebhookConfig",
    "enqueue_batch_event",
    "load_webhooks",
    "new_secret",
    "parse_webhooks",
    "sign",
    "webhook_key",
]

log = logging.getLogger("pipeq.serve.webhooks")

WEBHOOKS_FILE_ENV = "PIPEQ_WEBHOOKS_FILE"
WEBHOOKS_ENV = "PIPEQ_WEBHOOKS"
#: the events a job's `webhook_events_filter` may name
EVENTS = ("start", "output", "completed")
#: the Batch API's events (OpenAI's names)
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
DUE_KEY = "pipeq:webhooks"
LEASED_KEY = "pipeq:webhooks:leased"
GONE_KEY = "pipeq:webhooks:gone"
#: deliveries one gateway process runs at once
MAX_IN_FLIGHT = 64
#: a job whose record is not in Redis this long after its webhook was registered is gone
#: (its submit failed after the registration, or it was forgotten) (s)
GONE_AFTER_S = 60.0
#: a job that asked for `output` events is read this often while it is not done (s); the
#: pieces that came meanwhile go in one event (Replicate's throttle is the same 0.5 s)
OUTPUT_EVERY_S = 0.5
USER_AGENT = "pipeq-webhooks"


def webhook_key(job_id: str) -> str:
    return f"pipeq:webhook:{job_id}"


def event_key(event_id: str) -> str:
    return f"pipeq:webhook-event:{event_id}"


# -- configuration ------------------------------------------------------------------------
def new_secret() -> str:
    """A fresh signing secret: 'whsec_' + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(_secrets.token_bytes(32)).decode()


def _secret_bytes(secret: str, where: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError(
            f"{where}: a secret is 'whsec_' + base64 (pipeq serve --new-webhook-secret)"
        )
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except ValueError:
        raise ValueError(f"{where}: a secret's part after 'whsec_' is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"{where}: a secret holds 24 to 64 bytes (Standard Webhooks)")
    return key


@dataclass(frozen=True)
class WebhookConfig:
    """The gateway's webhook settings (the TOML's `[webhooks]` table; the module's
    docstring gives each key and its default)."""

    secrets: tuple[str, ...]
    allow: tuple[str, ...] = ()
    allow_private: bool = False
    timeout_s: float = 10.0
    max_attempts: int = 10
    backoff_s: float = 10.0
    max_backoff_s: float = 3600.0
    recheck_s: float = 10.0
    batch_url: str | None = None

    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(_secret_bytes(s, "webhooks.secrets") for s in self.secrets)

    def backoff(self, attempts: int) -> float:
        """Seconds before the attempt after `attempts` failed ones: backoff_s doubled each
        time, at most max_backoff_s, times a random 0.5 to 1 (so receivers that failed
        together are not all retried at once)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0 ** max(0, attempts - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def check_url(self, url: str) -> str:
        """`url` if the allowlist takes it; InvalidRequest (422) naming why not. An entry
        with '://' is a URL prefix (it ends at '/', '?' or '#', or the URL's end); any
        other is a host, or host:port ('*.example.com': its subdomains)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"webhook: {url!r} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest("webhook: a URL with credentials in it is refused")
        try:
            port = parts.port
        except ValueError:
            raise InvalidRequest(f"webhook: {url!r} has no valid port") from None
        host = parts.hostname.lower()
        for entry in self.allow:
            if "://" in entry:
                rest = url[len(entry) :]
                if url.startswith(entry) and (
                    entry.endswith("/") or rest[:1] in ("", "/", "?", "#")
                ):
                    return url
            elif _host_matches(entry.lower(), host, port):
                return url
        raise InvalidRequest(
            f"webhook: {parts.hostname} is not in the gateway's allowlist (webhooks.allow)"
        )


def _host_matches(entry: str, host: str, port: int | None) -> bool:
    allowed = urlsplit("//" + entry)
    try:
        want_port = allowed.port
    except ValueError:
        return False
    if want_port is not None and port != want_port:
        return False
    name = allowed.hostname or ""
    if name.startswith("*."):
        return host.endswith(name[1:])
    return host == name


def parse_webhooks(text: str, where: str) -> WebhookConfig:
    """The `[webhooks]` table of TOML text; ValueError naming what is wrong (never a
    secret)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not TOML: {e}") from None
    table = doc.get("webhooks")
    if not isinstance(table, dict):
        raise ValueError(f"{where}: no [webhooks] table")
    known = set(WebhookConfig.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where}: webhooks.{unknown[0]} is not a setting")
    found = table.get("secrets")
    if not isinstance(found, list) or not found or not all(isinstance(s, str) for s in found):
        raise ValueError(f"{where}: webhooks.secrets must list at least one 'whsec_...'")
    for secret in found:
        _secret_bytes(secret, f"{where}: webhooks.secrets")
    allow = table.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
        raise ValueError(f"{where}: webhooks.allow must list hosts or URL prefixes")
    numbers: dict[str, Any] = {}
    for name in ("timeout_s", "backoff_s", "max_backoff_s", "recheck_s", "max_attempts"):
        if name in table:
            value = table[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{where}: webhooks.{name} must be a number > 0")
            numbers[name] = value
    if "max_attempts" in numbers and not isinstance(numbers["max_attempts"], int):
        raise ValueError(f"{where}: webhooks.max_attempts must be a whole number")
    private = table.get("allow_private", False)
    if not isinstance(private, bool):
        raise ValueError(f"{where}: webhooks.allow_private must be true or false")
    config = WebhookConfig(
        secrets=tuple(found), allow=tuple(allow), allow_private=private, **numbers
    )
    batch_url = table.get("batch_url")
    if batch_url is not None:
        try:
            config.check_url(str(batch_url))
        except InvalidRequest as e:
            raise ValueError(f"{where}: webhooks.batch_url: {e.message}") from None
        config = WebhookConfig(**{**config.__dict__, "batch_url": str(batch_url)})
    return config


def load_webhooks(
    path: str | None = None, env: Mapping[str, str] = os.environ
) -> WebhookConfig | None:
    """The webhooks of `path`, else $PIPEQ_WEBHOOKS_FILE's, else $PIPEQ_WEBHOOKS' TOML;
    None when none is configured. ValueError for a file that cannot be used."""
    from pipeq.serve._auth import load_toml

    return load_toml(parse_webhooks, "webhooks", path, WEBHOOKS_FILE_ENV, WEBHOOKS_ENV, env)


# -- signing ------------------------------------------------------------------------------
def sign(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: 'v1,<base64 HMAC-SHA256 of "id.timestamp.body">'
    for each key, space-separated (a receiver accepts any one that matches)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
        for k in keys
    )


# -- Redis: registering deliveries ----------------------------------------------------------
_REGISTER = """
-- KEYS: delivery hash, due zset, gone set ; ARGV: url, due at, ttl, then field, value...
-- 1: registered; 0: one is there already (an idempotent repeat); -1: the URL is gone
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {'HSET', KEYS[1], 'url', ARGV[1], 'status', 'pending', 'attempts', 0}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call(unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
return 1
"""

_CLAIM = """
-- KEYS: due, leased ; ARGV: now, lease (s), at most. Ended leases are due again; then
-- the due entries (at most ARGV[3]) move to the leased set. Returns the entries pending
-- in all (due or leased), then the ones claimed.
local now = tonumber(ARGV[1])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZADD', KEYS[1], now, m)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), m)
end
table.insert(due, 1, redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]))
return due
"""


async def _register(aredis: Any, key: str, url: str, due_at: float, **fields: str) -> int:
    flat = [v for pair in fields.items() for v in pair]
    script = aredis.register_script(_REGISTER)
    return int(await script(keys=[key, DUE_KEY, GONE_KEY], args=[url, due_at, RESULT_TTL_S, *flat]))


async def enqueue_batch_event(
    aredis: Any, batch: Mapping[str, Any], event_type: str, url: str
) -> str:
    """Queue one Batch API event for delivery to `url`, in OpenAI's shape (what
    `OpenAI(webhook_secret=...).webhooks.unwrap` parses):
    `{"object": "event", "id": "evt_...", "type": event_type, "created_at": unix s,
    "data": {"id": batch["id"]}}`. `aredis`: an async Redis client of the cluster; any
    gateway's dispatcher delivers it, signed with that gateway's secrets, and retries it as
    a final event. Returns the event's id (its `webhook-id` too), the same for the same
    batch and event type. ValueError for an
    `event_type` not in BATCH_EVENTS or a batch without an id; a URL that answered 410
    before is not sent to (the event is recorded `disabled`)."""
    if event_type not in BATCH_EVENTS:
        raise ValueError(f"event_type must be one of {', '.join(BATCH_EVENTS)}")
    batch_id = batch.get("id")
    if not isinstance(batch_id, str) or not batch_id:
        raise ValueError("the batch has no id")
    # one id per batch and event type: a runner that died between queuing the event and
    # storing the batch's end queues it again when the batch is finished anew, and the
    # receiver sees the same `webhook-id` (Standard Webhooks' idempotency key) both times
    digest = hashlib.sha256(f"{batch_id}\0{event_type}".encode()).hexdigest()[:32]
    event_id = "evt_" + digest
    body = {
        "object": "event",
        "id": event_id,
        "type": event_type,
        "created_at": int(time.time()),
        "data": {"id": batch_id},
    }
    key = event_key(event_id)
    text = json.dumps(body, separators=(",", ":"))
    if await _register(aredis, key, url, time.time(), msg=event_id, body=text) < 0:
        await aredis.hset(key, mapping={"url": url, "status": "disabled", "attempts": 0})
        await aredis.expire(key, RESULT_TTL_S)
    return event_id


def delivery_state(raw: Mapping[bytes, bytes] | None) -> dict[str, Any] | None:
    """A job's `webhook` object from its delivery hash: {"status": "pending" | "delivered"
    | "failed" | "disabled", "attempts": n (of the final event), "last_status_code": HTTP
    status or null, "last_error"?: why the last attempt got no status}. None: no webhook."""
    if not raw:
        return None
    code = raw.get(b"last_status_code")
    out: dict[str, Any] = {
        "status": raw.get(b"status", b"pending").decode(),
        "attempts": int(raw.get(b"attempts", b"0")),
        "last_status_code": int(code) if code else None,
    }
    if raw.get(b"last_error"):
        out["last_error"] = raw[b"last_error"].decode()
    return out


# -- the dispatcher -----------------------------------------------------------------------
def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def _body(event: str, at: float, data: Any) -> bytes:
    return json.dumps(
        {"type": f"job.{event}", "timestamp": _iso(at), "data": data}, separators=(",", ":")
    ).encode()


class Dispatcher:
    """Delivers the webhooks due in Redis, in one gateway process (see the module's
    docstring). `read(job_id)` is the gateway's reading of a job (`Gateway.read`)."""

    def __init__(
        self,
        aredis: Any,
        config: WebhookConfig,
        read: Callable[[str], Awaitable[JobView]],
        job_redis: Callable[[JobView], Any] | None = None,
    ) -> None:
        self.aredis = aredis
        self.config = config
        self._keys = config.keys
        self._read = read
        #: the async client of a job's own Redis (its stream); default `aredis`
        self._job_redis = job_redis or (lambda view: aredis)
        self._claim = aredis.register_script(_CLAIM)
        # follow_redirects off: a redirect could name any address; trust_env off: no
        # proxy from the environment between the allowlist and the receiver
        self.http = httpx.AsyncClient(
            timeout=config.timeout_s, follow_redirects=False, trust_env=False
        )
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False
        #: jobs whose state was stored since the last round (`changed`)
        self._changed: set[str] = set()
        #: the entries this process delivers now, and those of them that changed meanwhile
        self._busy: set[str] = set()
        self._dirty: set[str] = set()
        #: some delivery was pending at the last claim, or was registered here since
        self._any = True
        self._registered = 0  # registrations by this process

    # -- lifecycle --
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pipeq-webhooks")

    async def close(self) -> None:
        """Stops delivering; what this process had claimed comes due again after its
        lease, for any gateway."""
        self._closed = True
        self._wake.set()
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
        pending = {t for t in [self._task, *self._running] if t is not None}
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(Exception):
            await self.http.aclose()

    def changed(self, job_id: str) -> None:
        """A job's state was stored (the result bus calls this for every job): its entry,
        if it has one, is due now."""
        self._changed.add(job_id)
        key = webhook_key(job_id)
        if key in self._busy:  # being looked at here: look again once that is done
            self._dirty.add(key)
        self._wake.set()

    # -- submit side --
    async def register(self, job_id: str, url: str, events: tuple[str, ...]) -> bool:
        """Record a job's webhook before it is sent (so no outcome is missed): True if
        this call recorded it, False if one was there (an idempotent repeat). InvalidRequest
        (422) for a URL the allowlist refuses or that answered 410 Gone before."""
        self.config.check_url(url)
        got = await _register(
            self.aredis,
            webhook_key(job_id),
            url,
            time.time() + self.config.recheck_s,
            events=",".join(events),
            msg="msg_" + uuid.uuid4().hex,
            created=f"{time.time():.3f}",
        )
        if got < 0:
            raise InvalidRequest(f"webhook: {url} answered 410 Gone before: it is disabled")
        self._registered += 1
        self._any = True
        self._wake.set()
        return got == 1

    async def unregister(self, job_id: str) -> None:
        """Forget a webhook whose job was not sent."""
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.delete(webhook_key(job_id))
            pipe.zrem(DUE_KEY, webhook_key(job_id))
            pipe.zrem(LEASED_KEY, webhook_key(job_id))
            await pipe.execute()

    # -- the loop --
    async def _run(self) -> None:
        poll_s = min(OUTPUT_EVERY_S, self.config.recheck_s)
        lease_s = 4 * self.config.timeout_s + 5  # a start, an output and a final attempt
        while not self._closed:
            room = MAX_IN_FLIGHT - len(self._running)
            if not room:
                await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                await self._touch_changed()
                registered = self._registered
                pending, *due = await self._claim(
                    keys=[DUE_KEY, LEASED_KEY], args=[time.time(), lease_s, room]
                )
                self._any = pending > 0 or self._registered != registered
            except (redis.RedisError, OSError) as e:
                log.warning("reading due webhooks failed (%s); trying again", e)
                due = []
                await asyncio.sleep(1.0)
            for raw in due:
                key = raw.decode()
                self._busy.add(key)
                task = asyncio.create_task(self._deliver(key))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if len(due) < room and not self._changed:  # nothing more due now
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll_s)

    async def _touch_changed(self) -> None:
        """The entries of the jobs that changed are due now (a job without a webhook has
        none: ZADD XX adds nothing). One pipelined command a change, none while no delivery
        is pending (a webhook registered by another gateway since the last claim is woken
        by that gateway's dispatcher, which sees the same changes)."""
        if not self._changed:
            return
        ids, self._changed = self._changed, set()
        if not self._any:
            return
        now = time.time()
        async with self.aredis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.zadd(DUE_KEY, {webhook_key(job_id): now}, xx=True)
            await pipe.execute()

    async def _deliver(self, key: str) -> None:
        try:
            hook = await self.aredis.hgetall(key)
            if not hook or hook.get(b"status", b"pending") != b"pending":
                await self._finish(key)
            elif await self.aredis.sismember(GONE_KEY, hook[b"url"]):  # since registered
                await self._set(key, status="disabled", last_error="the URL answered 410 Gone")
                await self._finish(key)
            elif b"body" in hook:
                await self._final(key, hook, hook[b"body"])
            else:
                await self._job(key, hook)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one delivery's fault; it comes due again after its lease
            log.warning("webhook %s: %s: %s", key, type(e).__name__, e)
        finally:
            self._busy.discard(key)
            self._dirty.discard(key)

    async def _job(self, key: str, hook: dict[bytes, bytes]) -> None:
        job_id = key[len(webhook_key("")) :]
        events = hook.get(b"events", b"completed").decode().split(",")
        url = hook[b"url"].decode()
        view = await self._read(job_id)
        if view.status is JobState.UNKNOWN:
            if time.time() - float(hook.get(b"created", b"0")) < GONE_AFTER_S:
                await self._later(key, self.config.recheck_s)
            else:  # never sent, or forgotten: nothing will come
                await self._set(key, status="failed", last_error="the job is not known")
                await self._finish(key)
            return
        data = view.as_json()
        data.pop("webhook", None)
        started = view.status in (JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED)
        if "start" in events and started and not hook.get(b"started"):
            await self._set(key, started="1")  # once, whatever its outcome: not retried
            if await self._once(key, url, "start", data) == "disabled":
                return
        if "output" in events:
            cursor = hook.get(b"cursor", b"0-0").decode()
            entries = await self._job_redis(view).xrange(stream_key(job_id), f"({cursor}", "+")
            pieces = [
                {"item": int(f.get(b"i", b"0")), "text": f[b"t"].decode()}
                for _, f in entries
                if b"t" in f
            ]
            if entries:
                last = entries[-1][0]
                await self._set(key, cursor=last.decode() if isinstance(last, bytes) else last)
            if (
                pieces
                and await self._once(key, url, "output", {**data, "output": pieces}) == "disabled"
            ):
                return
        if not view.status.done:
            every = OUTPUT_EVERY_S if "output" in events else self.config.recheck_s
            await self._later(key, min(every, self.config.recheck_s))
        elif "completed" in events:
            at = float(hook.get(b"at") or 0) or time.time()
            if not hook.get(b"at"):
                await self._set(key, at=f"{at:.6f}")  # every retry: the same body
            await self._final(key, hook, _body("completed", at, data))
        else:
            await self._set(key, status="delivered")
            await self._finish(key)

    async def _once(self, key: str, url: str, event: str, data: Any) -> str:
        """A start or output event: one attempt, never retried. 'sent', 'failed' or
        'disabled' (410)."""
        code, error = await self._post(
            url, "msg_" + uuid.uuid4().hex, _body(event, time.time(), data)
        )
        if code == 410:
            await self._gone(key, url, code)
            return "disabled"
        await self._set(key, last_status_code=code, last_error=error)
        return "sent" if code is not None and 200 <= code < 300 else "failed"

    async def _final(self, key: str, hook: dict[bytes, bytes], body: bytes) -> None:
        """The final event (a job's completed, a batch's event): retried with backoff,
        the same webhook-id each time, until a 2xx, a 410 or max_attempts."""
        url = hook[b"url"].decode()
        code, error = await self._post(url, hook[b"msg"].decode(), body)
        attempts = int(hook.get(b"attempts", b"0")) + 1
        if code == 410:
            await self._gone(key, url, code, attempts)
        elif code is not None and 200 <= code < 300:
            await self._set(
                key, status="delivered", attempts=attempts, last_status_code=code, last_error=None
            )
            await self._finish(key)
        elif attempts >= self.config.max_attempts:
            await self._set(
                key, status="failed", attempts=attempts, last_status_code=code, last_error=error
            )
            await self._finish(key)
        else:
            await self._set(key, attempts=attempts, last_status_code=code, last_error=error)
            await self._later(key, self.config.backoff(attempts))

    async def _gone(self, key: str, url: str, code: int, attempts: int | None = None) -> None:
        await self.aredis.sadd(GONE_KEY, url)
        fields: dict[str, Any] = {
            "status": "disabled",
            "last_status_code": code,
            "last_error": None,
        }
        if attempts is not None:
            fields["attempts"] = attempts
        await self._set(key, **fields)
        await self._finish(key)

    async def _later(self, key: str, delay_s: float) -> None:
        """Out of the leased set, due again in `delay_s` (at once if the job changed
        while it was looked at)."""
        if key in self._dirty:
            self._dirty.discard(key)
            delay_s = 0.0
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.zrem(LEASED_KEY, key)
            pipe.zadd(DUE_KEY, {key: time.time() + delay_s})
            await pipe.execute()

    async def _finish(self, key: str) -> None:
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.zrem(LEASED_KEY, key)
            pipe.zrem(DUE_KEY, key)
            await pipe.execute()

    async def _set(self, key: str, **fields: Any) -> None:
        """Update a delivery's hash (a None value deletes the field); it lives on
        RESULT_TTL_S from now."""
        gone = [k for k, v in fields.items() if v is None]
        kept = {k: str(v) for k, v in fields.items() if v is not None}
        async with self.aredis.pipeline(transaction=True) as pipe:
            if kept:
                pipe.hset(key, mapping=kept)
            if gone:
                pipe.hdel(key, *gone)
            pipe.expire(key, RESULT_TTL_S)
            await pipe.execute()

    async def _post(self, url: str, msg_id: str, body: bytes) -> tuple[int | None, str | None]:
        """One signed POST: (its status, None), or (None, why no status came). The
        response's body is never read."""
        refused = await self._refused(url)
        if refused:
            return None, refused
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._keys, msg_id, timestamp, body),
        }
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self.http.stream("POST", url, content=body, headers=headers) as r:
                    return r.status_code, None
        except TimeoutError:
            return None, f"no answer within {self.config.timeout_s:g} s"
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"[:200]

    async def _refused(self, url: str) -> str | None:
        """Why `url` may not be sent to now (None: it may): no longer allowlisted, or
        a name resolving to a private, loopback or link-local address (SSRF) unless
        `allow_private`. An address written as such in the allowlist is always allowed."""
        try:
            self.config.check_url(url)
        except InvalidRequest as e:
            return e.message
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            ipaddress.ip_address(host.strip("[]"))
            return None  # a literal address: the allowlist named it
        except ValueError:
            pass
        if self.config.allow_private:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443)
        except OSError as e:
            return f"cannot resolve {host}: {e}"
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                return (
                    f"{host} resolves to {address}, not a public address (webhooks.allow_private)"
                )
        return None
