"""Workers announce what they serve in Redis; producers look it up there.

    pipeq:deployments          hash  name -> JSON of the deployment (+ what the model told)
    pipeq:workers:<name>       zset  worker -> last heartbeat (Redis' clock; `_ledger`)
    pipeq:load-errors          hash  name -> why the last worker failed to load its model
    pipeq:stats:<name>         hash  worker -> JSON batching statistics

A worker is live while its heartbeat is younger than its deployment's `dead_after_s`
(announced; 10 s by default). Producers never need the TOML file: the deployments that
have ever run on this Redis are listed here, re-announced with every heartbeat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from pipeq import _tasks
from pipeq._ledger import Ledger
from pipeq.errors import NoLiveWorker, UnknownDeployment

__all__ = ["DEPLOYMENTS_KEY", "LIVE_FOR_S", "NO_WORKER_GRACE_S", "Announced", "Registry"]

#: a worker is live while its last heartbeat is younger than this (unless its
#: deployment announced another `dead_after_s`)
LIVE_FOR_S = 10.0
#: a deployment whose last worker beat this recently still takes jobs (they wait in its
#: queue for the next worker: a restart, a rolling deploy); older, NoLiveWorker
NO_WORKER_GRACE_S = 120.0
DEPLOYMENTS_KEY = "pipeq:deployments"
_LOAD_ERRORS = "pipeq:load-errors"


def stats_key(name: str) -> str:
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
    def __init__(
        self, client: redis.Redis, *, no_worker_grace_s: float = NO_WORKER_GRACE_S
    ) -> None:
        self.redis = client
        self.ledger = Ledger(client)
        self.no_worker_grace_s = no_worker_grace_s

    # -- worker side (the heartbeat itself is pipeq.worker.liveness) ------------------
    def load_failed(self, name: str, info: dict[str, Any], why: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hsetnx(DEPLOYMENTS_KEY, name, json.dumps(info, sort_keys=True))
        pipe.hset(_LOAD_ERRORS, name, why)
        pipe.execute()

    def loaded(self, name: str) -> None:
        self.redis.hdel(_LOAD_ERRORS, name)

    # -- producer side -------------------------------------------------------------
    def deployments(self) -> dict[str, Announced]:
        raw: dict[bytes, bytes] = self.redis.hgetall(DEPLOYMENTS_KEY)  # type: ignore[assignment]
        out = {}
        for k, v in raw.items():
            info = json.loads(v)
            out[k.decode()] = Announced(k.decode(), info["task"], info["model"], info)
        return out

    def _live_for(self, name: str) -> float:
        raw = self.redis.hget(DEPLOYMENTS_KEY, name)
        info = json.loads(raw) if isinstance(raw, bytes) else {}
        return float(info.get("dead_after_s") or LIVE_FOR_S)

    def live_workers(self, name: str) -> list[str]:
        """Workers of the deployment whose heartbeat is recent."""
        return self.ledger.live(name, self._live_for(name))[0]

    def stats(self, name: str) -> dict[str, dict[str, Any]]:
        """Batching statistics per worker of a deployment, as of its last heartbeat."""
        raw: dict[bytes, bytes] = self.redis.hgetall(stats_key(name))  # type: ignore[assignment]
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
        """NoLiveWorker unless a worker of the deployment beat within `no_worker_grace_s`."""
        live, last_beat_age = self.ledger.live(name, self._live_for(name))
        if live or (last_beat_age is not None and last_beat_age <= self.no_worker_grace_s):
            return
        why = self.load_error(name)
        detail = f"; its last worker failed to load the model: {why}" if why else ""
        raise NoLiveWorker(
            f"no worker is serving this deployment (start one: pipeq worker {name}){detail}",
            deployment=name,
        )
