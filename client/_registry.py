"""Workers announce what they serve in Redis; producers look it up there.

    pipeq:deployments          hash  name -> JSON of the deployment (+ what the model told)
    pipeq:workers:<name>       zset  worker -> last heartbeat (Redis' clock; `_ledger`)
    pipeq:load-errors          hash  name -> why the last worker failed to load its model
    pipeq:stats:<name>         hash  worker -> JSON batching statistics
    pipeq:supervised           hash  name -> JSON: how `pipeq up` restarted its worker

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
from pipeq.errors import InvalidRequest, NoLiveWorker, UnknownDeployment

__all__ = [
    "DEPLOYMENTS_KEY",
    "LEGACY_HUB_IDS",
    "LIVE_FOR_S",
    "NO_WORKER_GRACE_S",
    "Announced",
    "Registry",
    "hub_id",
]

#: a worker is live while its last heartbeat is younger than this (unless its
#: deployment announced another `dead_after_s`)
LIVE_FOR_S = 10.0
#: a deployment whose last worker beat this recently still takes jobs (they wait in its
#: queue for the next worker: a restart, a rolling deploy); older, NoLiveWorker
NO_WORKER_GRACE_S = 120.0
DEPLOYMENTS_KEY = "pipeq:deployments"
_LOAD_ERRORS = "pipeq:load-errors"
_SUPERVISED = "pipeq:supervised"


def stats_key(name: str) -> str:
    return f"pipeq:stats:{name}"


#: The Hub's canonical models whose org-less names moved to an organisation (2023-24);
#: the Hub redirects the old names, and the course still uses some (`model="distilgpt2"`),
#: so each old name means exactly its new id.
LEGACY_HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "openai-gpt": "openai-community/openai-gpt",
    "distilgpt2": "distilbert/distilgpt2",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "distilbert-base-cased": "distilbert/distilbert-base-cased",
    "distilbert-base-uncased-finetuned-sst-2-english": (
        "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    ),
    "distilbert-base-cased-distilled-squad": "distilbert/distilbert-base-cased-distilled-squad",
    "distilroberta-base": "distilbert/distilroberta-base",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-large-cased": "google-bert/bert-large-cased",
    "bert-base-multilingual-cased": "google-bert/bert-base-multilingual-cased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "xlm-roberta-base": "FacebookAI/xlm-roberta-base",
    "xlm-roberta-large": "FacebookAI/xlm-roberta-large",
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "t5-large": "google-t5/t5-large",
}


def hub_id(name: str) -> str:
    """A model name as the Hub resolves it: legacy org-less names become their id."""
    name = name.strip().rstrip("/")
    return LEGACY_HUB_IDS.get(name, name)


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
        """This deployment serves exactly that model: the same Hub id (a legacy org-less
        name counts as its canonical id: 'distilgpt2' is 'distilbert/distilgpt2'), the
        same path, or the Hub id its local checkpoint declares (`hub_id`)."""
        wanted = hub_id(model)
        return wanted in {hub_id(self.model), hub_id(str(self.info.get("hub_id") or self.model))}

    def resembles(self, model: str) -> bool:
        """Only the last part of the name is the same ('gpt2' and 'my-company/gpt2')."""
        last = model.rstrip("/").rsplit("/", 1)[-1]
        names = (self.model, str(self.info.get("hub_id") or ""))
        return any(n.rstrip("/").rsplit("/", 1)[-1] == last for n in names if n)


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

    # -- a supervisor's side (`pipeq up`) ---------------------------------------------
    def supervised(self, name: str, record: dict[str, Any]) -> None:
        """Record how a supervisor restarted (or gave up on) the deployment's worker,
        stamped with Redis' clock (`at`, unix seconds)."""
        seconds, _ = self.redis.time()
        self.redis.hset(_SUPERVISED, name, json.dumps({**record, "at": int(seconds)}))

    def supervised_over(self, names: list[str]) -> None:
        """The supervisor stopped: its records of these deployments are over."""
        if names:
            self.redis.hdel(_SUPERVISED, *names)

    def supervision(self) -> dict[str, dict[str, Any]]:
        """Deployment -> the last record a supervisor made of its worker's restarts."""
        raw: dict[bytes, bytes] = self.redis.hgetall(_SUPERVISED)  # type: ignore[assignment]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    # -- producer side -------------------------------------------------------------
    def deployments(self) -> dict[str, Announced]:
        raw: dict[bytes, bytes] = self.redis.hgetall(DEPLOYMENTS_KEY)  # type: ignore[assignment]
        out = {}
        for k, v in raw.items():
            info = json.loads(v)
            out[k.decode()] = Announced(k.decode(), info["task"], info["model"], info)
        return out

    def _info(self, name: str) -> dict[str, Any]:
        """What workers announced of the deployment ({} if none did)."""
        raw = self.redis.hget(DEPLOYMENTS_KEY, name)
        return json.loads(raw) if isinstance(raw, bytes) else {}

    @staticmethod
    def _live_for(info: dict[str, Any]) -> float:
        return float(info.get("dead_after_s") or LIVE_FOR_S)

    def forget(self, name: str) -> None:
        """Retire a deployment: workers announced it, none serves it, no job waits or
        runs; it leaves `pipeq status`, the exporter and the alerts. Its counters stay.
        Raises InvalidRequest while a worker is live or a job waits or runs."""
        from pipeq._ledger import dead_after_key, workers_key

        depth = self.ledger.depth(name)
        if self.live_workers(name) or depth.waiting or depth.running:
            raise InvalidRequest(
                f"deployment {name!r} still has live workers or jobs: stop its workers and "
                "let its jobs finish (or cancel them) first"
            )
        pipe = self.redis.pipeline()
        pipe.hdel(DEPLOYMENTS_KEY, name)
        pipe.hdel(_LOAD_ERRORS, name)
        pipe.hdel(_SUPERVISED, name)
        pipe.delete(workers_key(name), dead_after_key(name), stats_key(name))
        pipe.execute()

    def live_workers(self, name: str, info: dict[str, Any] | None = None) -> list[str]:
        """Workers of the deployment whose heartbeat is recent; `info`: what workers
        announced of it, when the caller has read it already."""
        return self.ledger.live(name, self._live_for(self._info(name) if info is None else info))[0]

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
            return self._by_model(target, model, candidates, known)
        if not candidates:
            served = sorted(f"{d.name} ({d.task}: {d.model})" for d in known.values())
            raise UnknownDeployment(f"no deployment serves task {target!r}; deployments: {served}")
        # the deployment named after the task first, then live ones, then by name
        candidates.sort(
            key=lambda d: (d.name not in (target, task), not self.live_workers(d.name), d.name)
        )
        return candidates[0]

    @staticmethod
    def _by_model(
        target: str, model: str, candidates: list[Announced], known: dict[str, Announced]
    ) -> Announced:
        """The one deployment of the task serving exactly `model` (or named `model`);
        never another model whose name merely looks alike."""
        exact = [d for d in candidates if d.name == model or d.serves_model(model)]
        if len(exact) == 1:
            return exact[0]

        def listed(ds: list[Announced]) -> list[str]:
            return sorted(f"{d.name} ({d.model})" for d in ds)

        if exact:
            raise UnknownDeployment(
                f"several deployments serve {model!r} for {target}: {listed(exact)}; "
                "name the one you want (model=<deployment name>)"
            )
        near = [d for d in candidates if d.resembles(model)]
        hint = f"; only similar names: {listed(near)}" if near else ""
        raise UnknownDeployment(
            f"no deployment serves model {model!r} for task {target!r}{hint}; "
            f"deployments of the task: {listed(candidates)}"
            + ("" if candidates else f"; all deployments: {listed(list(known.values()))}")
        )

    def require_live(self, name: str) -> None:
        """NoLiveWorker unless a worker of the deployment beat within `no_worker_grace_s`."""
        info = self._info(name)
        live, last_beat_age = self.ledger.live(name, self._live_for(info))
        if live or (last_beat_age is not None and last_beat_age <= self.no_worker_grace_s):
            return
        if info.get("scale_to_zero"):  # a worker starts for the jobs that wait
            return
        why = self.load_error(name)
        detail = f"; its last worker failed to load the model: {why}" if why else ""
        raise NoLiveWorker(
            f"no worker is serving this deployment (start one: pipeq worker {name}){detail}",
            deployment=name,
        )
