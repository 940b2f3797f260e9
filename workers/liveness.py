"""A worker's heartbeat: it keeps the worker's jobs its own, and takes back a dead peer's.

Every `heartbeat_s` the worker, in one Redis round trip (`_ledger` beat), re-announces
its deployment (so producers find it again after Redis lost its data), records that it
is alive, and puts back at the front of the queue every job held by a worker of the same
deployment whose last heartbeat is older than `dead_after_s`. So:

- a live worker's job is never given to another, however long it runs;
- a dead worker's jobs run again on a live worker within `dead_after_s + heartbeat_s`
  of its last heartbeat (12 s with the defaults), whether or not it restarts;
- nothing is reclaimed until Redis has been up for `dead_after_s`: after a Redis restart
  every live worker has beaten again by then, so a restart makes no live worker look
  dead. A worker cut off from Redis (a network partition) for `dead_after_s` is dead to
  the others: its jobs run elsewhere, and it may finish one of them a second time.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from pipeq._ledger import (
    Ledger,
    dead_after_key,
    inflight_key,
    queue_for,
    running_key,
    waiting_key,
    workers_key,
)
from pipeq._metrics import Observations, add_increments
from pipeq._registry import DEPLOYMENTS_KEY, stats_key

__all__ = ["EXIT_UNHEALTHY", "Heartbeat", "LivenessSettings"]

#: exit status of a worker that found it can no longer run jobs
EXIT_UNHEALTHY = 70

log = logging.getLogger("pipeq.worker")


@dataclass(frozen=True)
class LivenessSettings:
    """How often a worker beats, when a silent one counts as dead, and how many deaths
    a job may cause. Read at worker start (`pipeq worker --heartbeat-s ...`)."""

    #: seconds between heartbeats
    heartbeat_s: float = 2.0
    #: a worker silent this long is dead: its jobs go back to the queue
    dead_after_s: float = 10.0
    #: a job whose worker died while running it this many times fails with JobLost
    max_attempts: int = 3
    #: a dead worker is forgotten (after its jobs went back) this long after its last beat
    forget_after_s: float = 600.0
    #: touched after each heartbeat that reached Redis (the first once the model has
    #: loaded), removed when the worker stops: a probe reads the worker's health from its
    #: age (`find FILE -newermt '-10 seconds'`), without Python or Redis
    health_file: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dead_after_s) and math.isfinite(self.forget_after_s)):
            raise ValueError("dead_after_s and forget_after_s must be finite")
        if not 0 < self.heartbeat_s < self.dead_after_s / 2:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be positive and below half of "
                f"dead_after_s ({self.dead_after_s}), or a live worker could look dead"
            )
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


class Heartbeat:
    """Beats for one worker of one deployment, in a thread of its own or by `beat()`."""

    def __init__(
        self,
        client: redis.Redis,
        deployment: str,
        worker: str,
        info: dict[str, Any],
        settings: LivenessSettings,
        *,
        stats: Callable[[], dict[str, Any]] = dict,
        observations: Observations | None = None,
        healthy: Callable[[], bool] = lambda: True,
        on_lost: Callable[[list[str]], None] = lambda ids: None,
        result_ttl_s: int,
    ) -> None:
        self.ledger = Ledger(client)
        self.deployment = deployment
        self.worker = worker
        self.info = json.dumps(info, sort_keys=True)
        self.settings = settings
        self.stats = stats
        self.observations = observations or Observations()
        self.healthy = healthy
        self.on_lost = on_lost
        self.result_ttl_s = result_ttl_s
        self.inflight = inflight_key(worker)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> int:
        """One heartbeat; the number of jobs put back (raises if Redis is unreachable)."""
        pipe = self.ledger.redis.pipeline(transaction=False)
        self.ledger.script("beat")(
            [
                workers_key(self.deployment),
                DEPLOYMENTS_KEY,
                queue_for(self.deployment),
                waiting_key(self.deployment),
                running_key(self.deployment),
                dead_after_key(self.deployment),
                stats_key(self.deployment),
            ],
            [
                self.worker,
                self.deployment,
                self.info,
                self.settings.dead_after_s,
                self.settings.forget_after_s,
                "",
                self.settings.max_attempts,
                self.result_ttl_s,
                datetime.datetime.now(datetime.UTC).isoformat(),
            ],
            client=pipe,
        )
        key = stats_key(self.deployment)
        pipe.hset(key, self.worker, json.dumps(self.stats()))
        pipe.expire(key, int(self.settings.forget_after_s))
        increments = self.observations.take()
        add_increments(pipe, self.deployment, increments)
        try:
            (moved, lost), *_ = pipe.execute()
        except Exception:
            self.observations.give_back(increments)  # the next beat adds them
            raise
        lost_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in lost]
        if moved or lost_ids:
            log.warning(
                "put back %d job(s) of dead workers of %s; %d failed with JobLost",
                moved,
                self.deployment,
                len(lost_ids),
            )
        if lost_ids:
            self.on_lost(lost_ids)
        if self.settings.health_file:
            Path(self.settings.health_file).touch()
        return int(moved)

    def start(self) -> Heartbeat:
        """Beat once now (the worker owns its in-flight list from here), then in a thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="pipeq-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            if not self.healthy():
                # a worker that can no longer run jobs must not go on beating for the jobs
                # it holds: exit, and the others take them back after dead_after_s
                log.critical("no more jobs can run here (the batcher stopped or hangs); exiting")
                logging.shutdown()
                os._exit(EXIT_UNHEALTHY)
            try:
                self.beat()
            except redis.RedisError as e:  # Redis away for a while: try again next beat
                log.warning("heartbeat failed: %s", e)
            except Exception:  # never let the heartbeat die: the worker's jobs need it
                log.exception("heartbeat failed")

    def stop(self) -> None:
        """Stop beating and mark this worker gone (not live, its list reclaimable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.settings.health_file:
            Path(self.settings.health_file).unlink(missing_ok=True)
        try:
            pipe = self.ledger.redis.pipeline(transaction=False)
            add_increments(pipe, self.deployment, self.observations.take())
            keys, args = [workers_key(self.deployment)], [self.worker, self.settings.dead_after_s]
            self.ledger.script("withdraw")(keys, args, client=pipe)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("could not withdraw from %s: %s", self.deployment, e)
