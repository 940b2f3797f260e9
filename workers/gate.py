"""The gate every message passes before kombu or Celery sees it.

A worker takes a message from its queue into its in-flight list, then checks here that
it is a job pipeq can run: a JSON object in kombu's envelope, Celery's task protocol 2
with the one task pipeq runs, a JSON body of `inputs` and `params`. Anything else would
reach one of Celery's many paths for bad messages, several of which stop the consumer,
leave the job QUEUED for ever, or hold it in memory (an ETA in a month). Here each is
`Malformed`, with the job id when the message has a readable one, and the worker sets
it aside in the dead-letter list and fails that job with InvalidRequest.

Only the message's form is checked here; what its inputs and parameters may be is the
task's business (`pipeq._tasks`), checked in the job's own thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from typing import Any

from pipeq._app import RUN_TASK

__all__ = ["MAX_ID_CHARS", "Malformed", "check_message"]

#: job ids longer than this are not ids (Celery's are 36-character UUIDs)
MAX_ID_CHARS = 255
# an id a message too large to parse may still show; keys only, as quotes inside JSON
# strings are escaped
_ID = re.compile(rb'(?<!\\)"id"\s*:\s*"([^"\\]{1,255})"')
_BODY_KEYS = {"inputs", "params", "per_item", "packed"}


class Malformed(ValueError):
    """A message no worker can run; `job_id` when it names one."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


def _id_of(headers: Any) -> str | None:
    job_id = headers.get("id") if isinstance(headers, dict) else None
    if isinstance(job_id, str) and 0 < len(job_id) <= MAX_ID_CHARS:
        return job_id
    return None


def check_message(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The message as kombu's envelope (a dict), if pipeq can run it; else Malformed."""
    if len(raw) > max_bytes:
        # the headers' id: kombu writes them after the body, which may be megabytes
        found = _ID.search(raw, max(0, raw.rfind(b'"headers"')))
        job_id = found.group(1).decode("utf-8", "replace") if found else None
        raise Malformed(f"message of {len(raw)} bytes is over {max_bytes}", job_id)
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Malformed(f"not JSON: {type(e).__name__}") from None
    if not isinstance(envelope, dict):
        raise Malformed(f"not a JSON object but {type(envelope).__name__}")
    headers = envelope.get("headers")
    job_id = _id_of(headers)
    if job_id is None:
        raise Malformed("no job id (headers.id: a string of 1 to 255 characters)")
    assert isinstance(headers, dict)
    try:
        _check_envelope(envelope, headers)
        _check_body(envelope["body"])
    except Malformed as e:
        raise Malformed(e.reason, job_id) from None
    return envelope


def _check_envelope(envelope: dict[str, Any], headers: dict[str, Any]) -> None:
    if headers.get("task") != RUN_TASK:
        raise Malformed(f"task {headers.get('task')!r} is not {RUN_TASK!r}")
    if envelope.get("content-type") != "application/json":
        raise Malformed(f"content type {envelope.get('content-type')!r}: pipeq accepts JSON only")
    if envelope.get("content-encoding", "utf-8") != "utf-8":
        raise Malformed(f"content encoding {envelope.get('content-encoding')!r} is not utf-8")
    props = envelope.get("properties")
    if not isinstance(props, dict):
        raise Malformed("no properties")
    if props.get("body_encoding") != "base64":
        raise Malformed(f"body encoding {props.get('body_encoding')!r} is not base64")
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        raise Malformed("no delivery tag")
    if not isinstance(props.get("delivery_info"), dict):
        raise Malformed("no delivery info")
    if headers.get("eta") is not None:
        raise Malformed("eta/countdown are not supported: submit the job when it should run")
    expires = headers.get("expires")
    if expires is not None:
        try:
            datetime.datetime.fromisoformat(expires)
        except (TypeError, ValueError):
            raise Malformed(f"expires {expires!r} is not an ISO 8601 time") from None
    if headers.get("chord") or headers.get("group"):
        raise Malformed("groups and chords are not supported")
    if headers.get("ignore_result"):
        raise Malformed("ignore_result: pipeq stores every job's result")
    _check_celery_fields(headers, props)


def _optional(value: Any, kind: type | tuple[type, ...]) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _check_celery_fields(headers: dict[str, Any], props: dict[str, Any]) -> None:
    """The other fields Celery's worker reads from a message, in the forms it can read:
    a message Celery cannot parse stops its consumer (a `timelimit` of "x" did, and took
    every worker that took the message after it)."""
    for name in ("shadow", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "lang"):
        if not _optional(headers.get(name), str):
            raise Malformed(f"header {name!r} must be a string or null")
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list)
        and len(limits) == 2
        and all(_optional(x, (int, float)) for x in limits)
    ):
        raise Malformed("header 'timelimit' must be [soft, hard], each seconds or null")
    if not _optional(headers.get("retries"), int) or (headers.get("retries") or 0) < 0:
        raise Malformed("header 'retries' must be a non-negative integer")
    for name in ("reply_to", "correlation_id"):
        if not _optional(props.get(name), str):
            raise Malformed(f"property {name!r} must be a string or null")
    if not _optional(props.get("priority"), int):
        raise Malformed("property 'priority' must be an integer or null")
    info = props["delivery_info"]
    for name in ("exchange", "routing_key"):
        if not _optional(info.get(name), str):
            raise Malformed(f"delivery_info {name!r} must be a string or null")


def _check_body(body: Any) -> None:
    if not isinstance(body, str):
        raise Malformed("body is not a base64 string")
    try:
        decoded = json.loads(base64.b64decode(body, validate=True))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Malformed(f"body is not base64 of JSON: {type(e).__name__}") from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise Malformed("body is not [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if args != [] or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise Malformed("body must be [[], {inputs, params}, {}]: pipeq takes keyword arguments")
    if "inputs" not in kwargs or not isinstance(kwargs.get("params"), dict):
        raise Malformed("body kwargs need 'inputs' and a mapping 'params'")
    unknown = set(kwargs) - _BODY_KEYS
    if unknown:
        raise Malformed(f"body kwargs have unknown keys {sorted(unknown)}")
    for flag in ("per_item", "packed"):
        if not isinstance(kwargs.get(flag, False), bool):
            raise Malformed(f"body kwarg {flag!r} must be true or false")
    if embed.get("callbacks") or embed.get("errbacks") or embed.get("chain") or embed.get("chord"):
        raise Malformed("callbacks, errbacks, chains and chords are not supported")
