"""Workers announce what they serve in Redis; producers look it up there.

    pipeq:deployments          hash  name -> JSON of the deployment (+ what the model told)
    pipeq:workers:<name>       zset  worker hostname -> last heartbeat (unix seconds)
    pipeq:load-errors          hash  name -> why the last worker failed to load its model
    pipeq:stats:<name>         hash  worker hostname -> JSON batching statistics

A worker is live while its heartbeat is younger than `LIVE_FOR_S`. Producers never need
the TOML file: the deployments that have ever run on this Redis are listed here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeq import _tasks
from pipeq.errors import NoLiveWorker, UnknownDeployment

__all__ = ["HEARTBEAT_S", "LIVE_FOR_S", "Announced", "Registry"]

HEARTBEAT_S = 2.0
LIVE_FOR_S = 10.0
_DEPLOYMENTS = "pipeq:deployments"
_LOAD_ERRORS = "pipeq:load-errors"


def _workers_key(name: str) -> str:
    return f"pipeq:workers:{name}"


def _stats_key(name: str) -> str:
    return f"pipeq:stats:{name}"


@dataclass(frozen=True)
class Announced:
    """A deployment as its workers described it."""

    name: str
    task: str
    model: str
    info: dict[str, Any]

    @property
    def canonical_task(self) -> str:
        return _tasks.canonical_task(self.task)

    def serves_model(self, model: str) -> bool:
        """The same hub id or path, or the same last part: 'distilgpt2' matches
        'distilbert/distilgpt2', 'Helsinki-NLP/opus-mt-fr-en' a local '/models/opus-mt-fr-en'."""
        mine, theirs = self.model.rstrip("/"), model.rstrip("/")
        return mine == theirs or mine.rsplit("/", 1)[-1] == theirs.rsplit("/", 1)[-1]


class Registry:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # -- worker side ---------------------------------------------------------------
    def announce(self, name: str, info: dict[str, Any], hostname: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(_DEPLOYMENTS, name, json.dumps(info, sort_keys=True))
        pipe.hdel(_LOAD_ERRORS, name)
        pipe.zadd(_workers_key(name), {hostname: time.time()})
        pipe.execute()

    def heartbeat(self, name: str, hostname: str, stats: dict[str, Any]) -> None:
        key = _workers_key(name)
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zadd(key, {hostname: now})
        pipe.zremrangebyscore(key, 0, now - 10 * LIVE_FOR_S)
        pipe.hset(_stats_key(name), hostname, json.dumps(stats))
        pipe.expire(_stats_key(name), int(10 * LIVE_FOR_S))
        pipe.execute()

    def withdraw(self, name: str, hostname: str) -> None:
        self.redis.zrem(_workers_key(name), hostname)

    def load_failed(self, name: str, info: dict[str, Any], why: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hsetnx(_DEPLOYMENTS, name, json.dumps(info, sort_keys=True))
        pipe.hset(_LOAD_ERRORS, name, why)
        pipe.execute()

    # -- producer side -------------------------------------------------------------
    def deployments(self) -> dict[str, Announced]:
        raw: dict[bytes, bytes] = self.redis.hgetall(_DEPLOYMENTS)  # type: ignore[assignment]
        out = {}
        for k, v in raw.items():
            info = json.loads(v)
            out[k.decode()] = Announced(k.decode(), info["task"], info["model"], info)
        return out

    def live_workers(self, name: str) -> list[str]:
        since = time.time() - LIVE_FOR_S
        members = self.redis.zrangebyscore(_workers_key(name), since, "+inf")
        return [m.decode() for m in members]  # type: ignore[union-attr]

    def stats(self, name: str) -> dict[str, dict[str, Any]]:
        """Batching statistics per worker of a deployment, as of its last heartbeat."""
        raw: dict[bytes, bytes] = self.redis.hgetall(_stats_key(name))  # type: ignore[assignment]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def load_error(self, name: str) -> str | None:
        why = self.redis.hget(_LOAD_ERRORS, name)
        return why.decode() if isinstance(why, bytes) else None

    def resolve(self, target: str, model: str | None = None) -> Announced:
        """A deployment by name, else by task (and model): the one a request goes to."""
        known = self.deployments()
        if model is None and target in known:
            return known[target]
        if not _tasks.is_task(target):
            raise UnknownDeployment(
                f"no deployment or task named {target!r}; deployments: {sorted(known)}"
            )
        task = _tasks.canonical_task(target)
        candidates = [d for d in known.values() if d.canonical_task == task]
        if model is not None:
            candidates = [d for d in candidates if d.name == model or d.serves_model(model)]
        if not candidates:
            served = sorted(f"{d.name} ({d.task}: {d.model})" for d in known.values())
            want = f"task {target!r}" + (f" with model {model!r}" if model else "")
            raise UnknownDeployment(f"no deployment serves {want}; deployments: {served}")
        # the deployment named after the task first, then live ones, then by name
        candidates.sort(
            key=lambda d: (d.name not in (target, task), not self.live_workers(d.name), d.name)
        )
        return candidates[0]

    def require_live(self, name: str) -> None:
        if self.live_workers(name):
            return
        why = self.load_error(name)
        detail = f"; its last worker failed to load the model: {why}" if why else ""
        raise NoLiveWorker(
            f"no worker is serving this deployment (start one: pipeq worker {name}){detail}",
            deployment=name,
        )
