"""OpenAI's Files and Batch API, served online from the queue: the state in Redis and the
runner that turns a batch's lines into pipeq jobs. `routes_batches` does the requests.

    pipeq:oai:file:<id>            hash  owner, filename, purpose, bytes, created_at, lines
    pipeq:oai:file:<id>:content    string: the JSONL itself
    pipeq:oai:batch:<id>           hash  doc (the batch object as JSON, the runner's),
                                         owner, deployments (the key's, JSON), cancel (set
                                         by POST .../cancel: Redis' time)
    pipeq:oai:batch:<id>:out       hash  line number -> its output line (JSON)
    pipeq:oai:batch:<id>:err       hash  line number -> its error line (JSON)
    pipeq:oai:batch:<id>:lease     string: the process running it, "host:pid:nonce"
                                         (expires)
    pipeq:oai:batches              set   batches not finished yet
    pipeq:oai:batches:<owner>      zset  the owner's batches by creation time (GET list)
    pipeq:oai:files:<owner>        zset  the owner's files by creation time (GET list)

Every gateway process runs a `Runner`. It runs the batches it creates (leased to it in
the creating transaction), and once a second it takes the lease of each
unfinished batch nobody holds (SET NX, `LEASE_S`), renewing it while it runs the batch,
so a gateway killed mid-batch (SIGKILL included) hands its batches to the next runner
within `LEASE_S`. A line's job id is `<batch id>-<line number>`, submitted idempotently
(the batch id as its digest): a runner that takes over resubmits the lines in flight
and gets the same jobs back, and lines already in `:out`/`:err` are not run again.

Lines yield to interactive requests: a runner keeps at most `IN_FLIGHT_PER_DEPLOYMENT`
lines of all its batches queued or running on one deployment, so an interactive job
finds at most that many batch jobs ahead of it in the deployment's queue (about one
batch of the worker's dynamic batcher), however large the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis

from pipeq._ledger import stream_key
from pipeq.errors import BrokerUnavailable, NoLiveWorker, Overloaded, PipeqError
from pipeq.serve._auth import Caller
from pipeq.serve._errors import ApiError
from pipeq.serve._jobs import Gateway, JobView
from pipeq.serve._openai import error_envelope

__all__ = [
    "ENDPOINTS",
    "FILE_MAX_LINES",
    "IN_FLIGHT_PER_DEPLOYMENT",
    "LEASE_S",
    "BatchStore",
    "Runner",
    "cursor_page",
    "parse_window",
]

log = logging.getLogger("pipeq.serve.batches")

#: the routes a batch's lines may call
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
#: lines of an input file at most (OpenAI's cap); its bytes are capped by the gateway's
#: body limit (`Settings.max_body_bytes`: by default the largest `limits.request_bytes`
#: of the deployments, 2 MB, plus 64 KiB)
FILE_MAX_LINES = 50_000
#: how long files and finished batches are kept (s)
KEEP_S = 7 * 24 * 3600
#: a runner's hold on a batch; a dead runner's batches go to another after this (s)
LEASE_S = 5.0
#: how often a runner looks for batches nobody runs (s)
SCAN_S = 1.0
#: lines of one gateway process's batches queued or running on one deployment at most
IN_FLIGHT_PER_DEPLOYMENT = 8
#: a line refused for a reason that passes (no worker yet, a full queue, Redis away)
#: is tried again after this long, until the batch's deadline (s)
RETRY_S = 1.0
#: the longest `completion_window` ("24h", OpenAI's only value; pipeq also takes a
#: shorter "<N>s", "<N>m" or "<N>h")
MAX_WINDOW_S = 24 * 3600
_TRANSIENT = (NoLiveWorker, Overloaded, BrokerUnavailable)
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_WINDOW = re.compile(r"(\d+)([smh])")


def parse_window(window: str) -> float:
    """A `completion_window` ("24h", "90m", "30s") in seconds; ApiError 400 otherwise."""
    found = _WINDOW.fullmatch(window.strip())
    seconds = int(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2)] if found else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ApiError(400, "InvalidRequest", "completion_window: '24h', or a shorter '<N>h|m|s'")
    return float(seconds)


def _key(kind: str, ident: str, part: str = "") -> str:
    return f"pipeq:oai:{kind}:{ident}" + (f":{part}" if part else "")


ACTIVE_KEY = "pipeq:oai:batches"


def _files_key(owner: str) -> str:
    return f"pipeq:oai:files:{owner}"


def _owner_key(owner: str) -> str:
    return f"pipeq:oai:batches:{owner}"


class BatchStore:
    """Files and batches in Redis (async), owned by an API key's name."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.redis = gw.aredis

    # -- files ---------------------------------------------------------------------------
    async def put_file(
        self, owner: str, filename: str, purpose: str, content: bytes, lines: int
    ) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex
        record = {
            "owner": owner,
            "filename": filename,
            "purpose": purpose,
            "bytes": len(content),
            "created_at": int(time.time()),
            "lines": lines,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(_files_key(owner), {file_id: record["created_at"]})
            pipe.expire(_files_key(owner), int(KEEP_S))
            pipe.hset(_key("file", file_id), mapping=record)
            pipe.expire(_key("file", file_id), int(KEEP_S))
            pipe.set(_key("file", file_id, "content"), content, ex=int(KEEP_S))
            await pipe.execute()
        return file_object(file_id, {k.encode(): str(v).encode() for k, v in record.items()})

    async def file(self, owner: str, file_id: str) -> dict[bytes, bytes]:
        """A file's record; ApiError 404 unless `owner`'s."""
        record: dict[bytes, bytes] = await self.redis.hgetall(_key("file", file_id))
        if not record or record.get(b"owner", b"").decode() != owner:
            raise ApiError(404, "NotFound", f"no such file: {file_id}")
        return record

    async def content(self, owner: str, file_id: str) -> bytes:
        await self.file(owner, file_id)
        data: bytes | None = await self.redis.get(_key("file", file_id, "content"))
        if data is None:
            raise ApiError(404, "NotFound", f"no such file: {file_id}")
        return data

    async def delete_file(self, owner: str, file_id: str) -> None:
        await self.file(owner, file_id)
        await self.redis.delete(_key("file", file_id), _key("file", file_id, "content"))
        await self.redis.zrem(_files_key(owner), file_id)

    async def files(
        self, owner: str, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[dict[str, Any]]:
        """The owner's files by creation time after file `after` (`cursor_page`; those
        expired meanwhile left out)."""

        async def load(file_id: str) -> dict[str, Any] | None:
            record = await self.redis.hgetall(_key("file", file_id))
            if not record:
                await self.redis.zrem(_files_key(owner), file_id)
                return None
            if purpose is not None and record[b"purpose"].decode() != purpose:
                return None
            return file_object(file_id, record)

        ids = await self._ids(_files_key(owner), newest_first)
        return await cursor_page(ids, after, limit, load)

    async def _ids(self, key: str, newest_first: bool) -> list[str]:
        found = await (self.redis.zrevrange if newest_first else self.redis.zrange)(key, 0, -1)
        return [raw.decode() for raw in found]

    # -- batches -------------------------------------------------------------------------
    async def create(self, who: Caller, doc: dict[str, Any], runner: str) -> dict[str, Any]:
        """Store a new batch, leased to `runner` (the creating process's) from the start."""
        deployments = sorted(who.deployments) if who.deployments is not None else None
        key = _key("batch", doc["id"])
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_key("batch", doc["id"], "lease"), runner, px=int(LEASE_S * 1000))
            pipe.hset(
                key,
                mapping={
                    "doc": json.dumps(doc),
                    "owner": who.name,
                    "deployments": json.dumps(deployments),
                },
            )
            pipe.zadd(_owner_key(who.name), {doc["id"]: doc["created_at"]})
            pipe.sadd(ACTIVE_KEY, doc["id"])
            await pipe.execute()
        return doc

    async def batch(self, owner: str | None, batch_id: str) -> dict[str, Any]:
        """The batch object as a client reads it ("cancelling" once asked, until its
        runner is done); ApiError 404 unless `owner`'s (None: anyone's)."""
        raw = await self.redis.hmget(_key("batch", batch_id), "doc", "owner", "cancel")
        doc_raw, who, cancel = raw
        if doc_raw is None or (owner is not None and who.decode() != owner):
            raise ApiError(404, "NotFound", f"no such batch: {batch_id}")
        doc: dict[str, Any] = json.loads(doc_raw)
        if cancel is not None and doc["status"] not in _TERMINAL:
            doc["status"] = "cancelling"
            doc["cancelling_at"] = int(float(cancel))
        return doc

    async def batches(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """The owner's batches, newest first, after batch `after` (`cursor_page`)."""

        async def load(batch_id: str) -> dict[str, Any] | None:
            with contextlib.suppress(ApiError):  # expired meanwhile
                return await self.batch(owner, batch_id)
            return None

        ids = await self._ids(_owner_key(owner), newest_first=True)
        return await cursor_page(ids, after, limit, load)

    async def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        doc = await self.batch(owner, batch_id)
        if doc["status"] in _TERMINAL:
            raise ApiError(409, "Conflict", f"the batch is {doc['status']}: it cannot be cancelled")
        seconds, _ = await self.redis.time()
        await self.redis.hsetnx(_key("batch", batch_id), "cancel", str(seconds))
        return await self.batch(owner, batch_id)


async def cursor_page(
    ids: list[str],
    after: str | None,
    limit: int,
    load: Callable[[str], Awaitable[dict[str, Any] | None]],
) -> list[dict[str, Any]]:
    """OpenAI's cursor pagination: up to `limit` objects of `ids` (in the list's order)
    after the id `after`, each made by `load` (None: left out, e.g. expired meanwhile).
    ApiError 400 for an `after` not in the list: answering its first page instead would
    make a client's auto-pagination go round again or stop short."""
    if after is not None:
        if after not in ids:
            raise ApiError(400, "InvalidRequest", f"after: {after!r} is not in this list")
        ids = ids[ids.index(after) + 1 :]
    out = []
    for ident in ids:
        found = await load(ident)
        if found is not None:
            out.append(found)
            if len(out) >= limit:
                break
    return out


def file_object(file_id: str, record: dict[bytes, bytes]) -> dict[str, Any]:
    """OpenAI's file object for a stored file's record."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": int(record[b"bytes"]),
        "created_at": int(record[b"created_at"]),
        "filename": record[b"filename"].decode(),
        "purpose": record[b"purpose"].decode(),
        "status": "processed",
        "expires_at": int(record[b"created_at"]) + int(KEEP_S),
    }


#: whitespace around a JSON text (RFC 8259); a line of nothing else is blank
_JSON_SPACE = " \t\r"


def parse_lines(content: bytes) -> list[str]:
    r"""A JSONL file's non-blank lines; ApiError 400 for one not UTF-8 or over the cap.

    Lines end at "\n" (or "\r\n") only: `str.splitlines()` also splits at U+2028,
    U+2029, U+0085, \x0b, \x0c and \x1c-\x1e, which JSON strings may hold raw
    (`json.dumps(..., ensure_ascii=False)` and JavaScript's `JSON.stringify` write them)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "InvalidRequest", "a batch file is UTF-8 JSONL") from None
    lines = [line.removesuffix("\r") for line in text.split("\n") if line.strip(_JSON_SPACE)]
    if not lines:
        raise ApiError(400, "InvalidRequest", "the file has no lines")
    if len(lines) > FILE_MAX_LINES:
        raise ApiError(400, "InvalidRequest", f"a batch file has at most {FILE_MAX_LINES} lines")
    return lines


# -- running batches -------------------------------------------------------------------------
#: runs one line: (gateway, caller, endpoint, body, job id, expires in s, digest) ->
#: (HTTP status, response body); routes_batches provides it (the routes' own code)
LineRunner = Callable[
    [Gateway, Caller, str, dict[str, Any], str, float, str],
    Coroutine[Any, Any, tuple[int, Any, JobView | None]],
]


@dataclass
class _Line:
    number: int
    custom_id: str | None
    body: dict[str, Any] | None
    problem: str | None = None


def _line(number: int, text: str, endpoint: str) -> _Line:
    """One input line checked against OpenAI's line format."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return _Line(number, None, None, f"line {number + 1} is not JSON: {e}")
    if not isinstance(data, dict):
        return _Line(number, None, None, f"line {number + 1} is not a JSON object")
    custom_id = data.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else None
    if custom_id is None:
        return _Line(number, None, None, f"line {number + 1} has no custom_id string")
    if data.get("method", "POST") != "POST" or data.get("url") != endpoint:
        return _Line(number, custom_id, None, f"method must be POST and url {endpoint}")
    if not isinstance(data.get("body"), dict):
        return _Line(number, custom_id, None, "body must be a JSON object")
    return _Line(number, custom_id, data["body"])


def stopped_error(cancelled: bool, started: bool | None) -> dict[str, str]:
    """The error entry of a line the batch's cancel or deadline ended before it finished:
    a line not sent or still queued never runs; a running continuous-batching generation
    is stopped at its next step (OpenAI's: unfinished requests are cancelled). `started`:
    whether its job had started (None: not known, e.g. after another runner took over)."""
    why = "was cancelled" if cancelled else "reached its deadline (completion_window)"
    when = {
        None: "before this line finished",
        False: "before this line started",
        True: "while this line ran: it was stopped before it finished",
    }[started]
    code = "batch_cancelled" if cancelled else "batch_expired"
    return {"code": code, "message": f"the batch {why} {when}"}


def _releasing(slot: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
    return lambda _: slot.release()


class Runner:
    """A gateway process's batch runner (see the module's docstring)."""

    def __init__(self, gw: Gateway, run_line: LineRunner) -> None:
        self.gw = gw
        self.redis = gw.aredis
        self.run_line = run_line
        #: the lease's value: which process runs a batch
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.slots: dict[str, asyncio.Semaphore] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._scan(), name="pipeq-batch-runner")

    async def close(self) -> None:
        self._closed = True  # redis-py may turn the cancel into a ConnectionError
        tasks = [t for t in (self._task, *self.running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def adopt(self, batch_id: str) -> None:
        """Run a batch this process created (`BatchStore.create` leased it to us)."""
        if batch_id not in self.running:
            task = asyncio.create_task(self._hold(batch_id), name=batch_id)
            self.running[batch_id] = task
            task.add_done_callback(lambda _: self.running.pop(batch_id, None))

    async def _scan(self) -> None:
        while not self._closed:
            try:
                for raw in await self.redis.smembers(ACTIVE_KEY):
                    batch_id = raw.decode()
                    if batch_id in self.running:
                        continue
                    lease = _key("batch", batch_id, "lease")
                    if await self.redis.set(lease, self.me, nx=True, px=int(LEASE_S * 1000)):
                        self.adopt(batch_id)
            except (redis.RedisError, OSError) as e:
                if self._closed:  # a cancel made into a ConnectionError while connecting
                    return
                log.warning("batch runner: Redis did not answer (%s)", e)
            await asyncio.sleep(SCAN_S)

    async def _hold(self, batch_id: str) -> None:
        """Run the batch while renewing its lease; stop if the lease is lost."""
        work = asyncio.create_task(self._run(batch_id))
        lease = _key("batch", batch_id, "lease")
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=LEASE_S / 3)
                if work.done():
                    break
                held = await self.redis.get(lease)
                if held is None or held.decode() != self.me:
                    log.warning("lost the lease of %s: another runner has it", batch_id)
                    work.cancel()
                    break
                await self.redis.pexpire(lease, int(LEASE_S * 1000))
            if work.done() and not work.cancelled() and work.exception():
                log.error("batch %s failed", batch_id, exc_info=work.exception())
        except (redis.RedisError, OSError) as e:
            log.warning("batch %s: Redis did not answer (%s); leaving it", batch_id, e)
            work.cancel()
        finally:
            if not work.done():
                work.cancel()
            with contextlib.suppress(Exception):
                if (await self.redis.get(lease) or b"").decode() == self.me:
                    await self.redis.delete(lease)

    # -- one batch ------------------------------------------------------------------------
    async def _save(self, doc: dict[str, Any]) -> None:
        await self.redis.hset(_key("batch", doc["id"]), "doc", json.dumps(doc))

    async def _counts(self, doc: dict[str, Any]) -> None:
        key = _key("batch", doc["id"])
        done, failed = await self.redis.hlen(key + ":out"), await self.redis.hlen(key + ":err")
        doc["request_counts"] = {
            "total": doc["request_counts"]["total"],
            "completed": done,
            "failed": failed,
        }

    async def _run(self, batch_id: str) -> None:
        key = _key("batch", batch_id)
        doc_raw, owner, deployments = await self.redis.hmget(key, "doc", "owner", "deployments")
        if doc_raw is None:
            await self.redis.srem(ACTIVE_KEY, batch_id)
            return
        doc = json.loads(doc_raw)
        if doc["status"] in _TERMINAL:
            await self.redis.srem(ACTIVE_KEY, batch_id)
            return
        allowed = json.loads(deployments) if deployments else None
        who = Caller(owner.decode(), frozenset(allowed) if allowed is not None else None)
        now = time.time()
        content = await self.redis.get(_key("file", doc["input_file_id"], "content"))
        if content is None:
            return await self._end(doc, "failed", [("file_not_found", "the input file is gone")])
        try:
            texts = parse_lines(content)
        except ApiError as e:
            return await self._end(doc, "failed", [("invalid_file", e.message)])
        lines = [_line(n, t, doc["endpoint"]) for n, t in enumerate(texts)]
        ids = [x.custom_id for x in lines if x.custom_id is not None]
        if len(set(ids)) != len(ids):
            return await self._end(doc, "failed", [("duplicate_custom_id", "custom_id repeats")])
        fresh = doc["status"] == "validating"
        if fresh:
            doc.update(status="in_progress", in_progress_at=int(now))
            doc["request_counts"]["total"] = len(lines)
            await self._save(doc)
        seen = set()
        for part in ("out", "err"):
            seen |= {int(n) for n in await self.redis.hkeys(f"{key}:{part}")}
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(doc, stop))
        sent: set[asyncio.Task[None]] = set()
        # line number -> whether its job had started when the batch's stop ended it; a
        # first runner knows a line it never sent never started (a runner that took over
        # does not: the one before may have sent it)
        started: dict[int, bool] = {}
        try:
            for x in lines:  # in order; a line waits for a free slot of its deployment
                if stop.is_set():
                    if fresh:
                        started.update((y.number, False) for y in lines[x.number :])
                    break
                if x.number in seen:
                    continue
                model = str((x.body or {}).get("model", ""))
                slot = self._slot(model)
                await slot.acquire()
                task = asyncio.create_task(self._one(doc, who, x, stop, started))
                task.add_done_callback(_releasing(slot))
                task.add_done_callback(sent.discard)
                sent.add(task)
            await asyncio.gather(*sent)
        finally:
            watcher.cancel()
            for task in sent:
                task.cancel()
        await self._finish(doc, who.name, lines, started)

    async def _watch(self, doc: dict[str, Any], stop: asyncio.Event) -> None:
        """Sets `stop` when the batch is cancelled or reaches its deadline."""
        key = _key("batch", doc["id"])
        while not stop.is_set():
            if time.time() >= doc["expires_at"] or await self.redis.hexists(key, "cancel"):
                stop.set()
                return
            await self._counts(doc)
            await self._save(doc)
            await asyncio.sleep(0.5)

    def _slot(self, deployment: str) -> asyncio.Semaphore:
        return self.slots.setdefault(deployment, asyncio.Semaphore(IN_FLIGHT_PER_DEPLOYMENT))

    async def _one(
        self,
        doc: dict[str, Any],
        who: Caller,
        line: _Line,
        stop: asyncio.Event,
        started: dict[int, bool],
    ) -> None:
        key = _key("batch", doc["id"])
        if line.problem is not None or line.body is None:
            return await self._record(key, "err", line, 400, None, line.problem or "bad line")
        job_id = f"{doc['id']}-{line.number}"
        while True:
            if stop.is_set():
                return  # never submitted: `_finish` records why
            left = doc["expires_at"] - time.time()
            status: int | None
            try:
                status, body, _ = await self._running(doc, who, line, job_id, left, stop, started)
            except (*_TRANSIENT, ApiError) as e:  # raised only before its job was sent
                if not isinstance(e, ApiError) or e.status in (429, 503):
                    await asyncio.sleep(RETRY_S)
                    continue
                status, body = e.status, error_envelope(e.status, e.message, e.type)
            except Exception:  # a fault of the gateway's own costs this line, not the batch
                log.exception("batch %s: line %d failed", doc["id"], line.number)
                status = 500
                body = error_envelope(500, "the gateway failed to run this line", "InternalError")
            break
        if status is None:
            return  # stopped before it ran: `_finish` records why
        part = "out" if status == 200 else "err"
        await self._record(key, part, line, status, body, None, job_id)

    async def _running(
        self,
        doc: dict[str, Any],
        who: Caller,
        line: _Line,
        job_id: str,
        left: float,
        stop: asyncio.Event,
        started: dict[int, bool],
    ) -> tuple[int | None, Any, JobView | None]:
        """Run the line, cancelling its job when the batch stops (a queued job never
        runs, a continuous-batching generation stops at its next step); (None, ...) when
        the job was cancelled that way, or expired, before it finished, with whether it
        had started in `started`."""
        assert line.body is not None
        run = asyncio.create_task(
            self.run_line(self.gw, who, doc["endpoint"], line.body, job_id, left, doc["id"])
        )
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                with contextlib.suppress(PipeqError, ApiError):
                    before = await self.gw.read(job_id)
                    await self.gw.cancel(before)
                    if before.status.value in ("queued", "running"):  # a generation that
                        # began meanwhile has its stream's `start` entry
                        began = await self.gw.job_redis(before).exists(stream_key(job_id))
                        started[line.number] = before.status.value == "running" or bool(began)
            status, body, view = await run
        finally:
            stopped.cancel()
        if stop.is_set() and view is not None and view.status.value in ("cancelled", "expired"):
            return None, None, view  # the batch's stop did it: `_finish` records why
        return status, body, view

    async def _record(
        self,
        key: str,
        part: str,
        line: _Line,
        status: int,
        body: Any,
        problem: str | None,
        job_id: str | None = None,
    ) -> None:
        out = {
            "id": f"batch_req_{job_id or uuid.uuid4().hex}",
            "custom_id": line.custom_id,
            "response": None
            if problem
            else {"status_code": status, "request_id": job_id, "body": body},
            "error": {"code": "invalid_line", "message": problem} if problem else None,
        }
        await self.redis.hset(f"{key}:{part}", str(line.number), json.dumps(out))

    async def _finish(
        self, doc: dict[str, Any], owner: str, lines: list[_Line], started: dict[int, bool]
    ) -> None:
        key = _key("batch", doc["id"])
        cancelled = await self.redis.hexists(key, "cancel")
        seen = set()
        for part in ("out", "err"):
            seen |= {int(n) for n in await self.redis.hkeys(f"{key}:{part}")}
        for x in lines:
            if x.number not in seen:
                out = {
                    "id": f"batch_req_{doc['id']}-{x.number}",
                    "custom_id": x.custom_id,
                    "response": None,
                    "error": stopped_error(bool(cancelled), started.get(x.number)),
                }
                await self.redis.hset(f"{key}:err", str(x.number), json.dumps(out))
        doc.update(status="finalizing", finalizing_at=int(time.time()))
        await self._counts(doc)
        await self._save(doc)
        for part, field in (("out", "output_file_id"), ("err", "error_file_id")):
            found = await self.redis.hgetall(f"{key}:{part}")
            if not found:
                continue
            ordered = [found[n] for n in sorted(found, key=int)]
            content = b"\n".join(ordered) + b"\n"
            file = await BatchStore(self.gw).put_file(
                owner, f"{doc['id']}_{part}.jsonl", "batch_output", content, len(ordered)
            )
            doc[field] = file["id"]
        status = "cancelled" if cancelled else "completed"
        if not cancelled and any(x.number not in seen for x in lines):
            status = "expired"
        await self._end(doc, status)

    async def _end(
        self, doc: dict[str, Any], status: str, errors: list[tuple[str, str]] | None = None
    ) -> None:
        now = int(time.time())
        doc["status"] = status
        doc[f"{status}_at"] = now
        if errors:
            doc["errors"] = {
                "object": "list",
                "data": [{"code": c, "message": m, "param": None, "line": None} for c, m in errors],
            }
        # the webhook (webhooks.batch_url), queued in Redis for any gateway's dispatcher
        # before the batch leaves the active set: a runner that dies in between leaves the
        # batch to another, which queues the same event (the same id) again
        await self.gw.batch_event(doc, f"batch.{status}")
        key = _key("batch", doc["id"])
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "doc", json.dumps(doc))
            pipe.srem(ACTIVE_KEY, doc["id"])
            for k in (key, f"{key}:out", f"{key}:err"):
                pipe.expire(k, int(KEEP_S))
            await pipe.execute()
