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
  the others: its jobs run elsewhere. If it comes back (SIGCONT, a resumed VM, a
  healed partition) it was *fenced* when its jobs were put back: the first of its writes
  that relies on what it held (a heartbeat, an admission, a stored result, an
  acknowledgement, a hand-back, a set-aside, a stream piece) is refused in the same Redis
  step, and `Lease.lost` makes it exit at once, having stored and written nothing for
  them; the others run them, once. A judge that was itself silent for `dead_after_s`
  judges no one on that beat, so a stalled Redis, after which every worker looks silent,
  fences no one.
- Redis refusing writes (full under maxmemory, a read-only replica, MISCONF) is a pause:
  the heartbeat says so and tries again; the worker keeps its jobs and its health file
  fresh (restarting it would not help).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import redis

from pipeq._ledger import (
    FENCED,
    Ledger,
    dead_after_key,
    fence_key,
    inflight_key,
    queue_for,
    running_key,
    waiting_key,
    workers_key,
)
from pipeq._metrics import Observations, increment_args, metrics_key
from pipeq._redis import write_refusal
from pipeq._registry import DEPLOYMENTS_KEY, stats_key

__all__ = ["EXIT_UNHEALTHY", "Heartbeat", "Lease", "LivenessSettings"]

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


class Lease:
    """A worker's claim on the jobs it holds. A peer that puts them back (the worker was
    silent for `dead_after_s`) fences the worker (`_ledger.fence_key`); each ledger script
    a worker runs for what it holds checks the fence in the same step and answers FENCED
    without writing. Whoever gets FENCED calls `lost()`."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        #: the fence's key, `pipeq:fenced:<worker>`
        self.key = fence_key(worker)
        #: marks the worker gone (set by its Heartbeat), so that whatever it took since it
        #: came back is put back by its peers too
        self.withdraw: Callable[[], None] = lambda: None

    def check(self, reply: Any, where: str) -> Any:
        """`reply` of a ledger script, unless it is FENCED (then `lost(where)`)."""
        if isinstance(reply, int) and reply == FENCED:
            self.lost(where)
        return reply

    def lost(self, where: str) -> NoReturn:
        """The worker was declared dead and its jobs run elsewhere: it owns nothing it
        holds. Store, acknowledge and write nothing more: exit now (EXIT_UNHEALTHY; a
        supervisor starts a fresh worker, with a name of its own)."""
        log.critical(
            "this worker was declared dead (silent for dead_after_s: frozen, paused or cut "
            "off) and its jobs were put back for the others; found on %s. Exiting without "
            "storing or writing anything for them",
            where,
        )
        try:
            self.withdraw()
        except Exception as e:  # best effort: its peers reclaim it anyway
            log.warning("could not withdraw: %s", e)
        logging.shutdown()
        os._exit(EXIT_UNHEALTHY)


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
        lease: Lease | None = None,
    ) -> None:
        self.ledger = Ledger(client)
        self.lease = lease or Lease(worker)
        self.lease.withdraw = self._withdraw
        #: why Redis refuses writes now ('full', 'read-only', ...), None while it takes them
        self.refusal: str | None = None
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
        #: the statistics the last beat stored, and when (time.monotonic())
        self._stats_sent = ""
        self._stats_sent_at = -math.inf
        #: the increments not yet known to be in Redis, each with its flush number: sent
        #: again as they were until a reply says so (`_ledger` increments applies each once)
        self._unsent: list[tuple[int, dict[str, float]]] = []
        self._flushes = 0

    def beat(self) -> int:
        """One heartbeat; the number of jobs put back (raises if Redis is unreachable).
        An idle worker's beat is one EVALSHA: its statistics go with it when they changed
        (or every `forget_after_s` / 4, lest they expire), metrics' increments when any."""
        stats = json.dumps(self.stats(), sort_keys=True)
        now = time.monotonic()
        fresh = now - self._stats_sent_at < self.settings.forget_after_s / 4
        send_stats = "" if stats == self._stats_sent and fresh else stats
        keys = [
            workers_key(self.deployment),
            DEPLOYMENTS_KEY,
            queue_for(self.deployment),
            waiting_key(self.deployment),
            running_key(self.deployment),
            dead_after_key(self.deployment),
            stats_key(self.deployment),
        ]
        args = [
            self.worker,
            self.deployment,
            self.info,
            self.settings.dead_after_s,
            self.settings.forget_after_s,
            send_stats,
            self.settings.max_attempts,
            self.result_ttl_s,
            datetime.datetime.now(datetime.UTC).isoformat(),
        ]
        if self._flush_queued():
            pipe = self.ledger.redis.pipeline(transaction=False)
            self.ledger.script("beat")(keys, args, client=pipe)
            self._send_increments(pipe)
            reply, *_ = pipe.execute()
            self._unsent.clear()
        else:
            reply = self.ledger.script("beat")(keys, args)
        if send_stats:
            self._stats_sent, self._stats_sent_at = stats, now
        self.lease.check(reply, "its heartbeat")
        moved, lost = reply
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
                if self.refusal is not None:
                    log.warning("Redis takes writes again (it refused them: %s)", self.refusal)
                    self.refusal = None
            except redis.RedisError as e:  # Redis away for a while: try again next beat
                reason = write_refusal(e)
                if reason is not None:  # a pause: the worker is fine, and keeps its jobs
                    if self.refusal is None:
                        log.warning("Redis refuses writes (%s): waiting for it: %s", reason, e)
                    self.refusal = reason
                    if self.settings.health_file:
                        Path(self.settings.health_file).touch()
                    continue
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
            self._withdraw()
        except redis.RedisError as e:
            log.warning("could not withdraw from %s: %s", self.deployment, e)

    def _flush_queued(self) -> bool:
        """Whether increments wait to be sent: those of a flush whose reply was lost (as
        they were, under their number) and those observed since, under the next."""
        taken = self.observations.take()
        if taken:
            self._flushes += 1
            self._unsent.append((self._flushes, taken))
        return bool(self._unsent)

    def _send_increments(self, pipe: Any) -> None:
        keys = [metrics_key(self.deployment), f"pipeq:flushed:{self.worker}"]
        ttl = int(self.settings.forget_after_s)
        for flush, increments in self._unsent:
            self.ledger.script("increments")(
                keys, increment_args(flush, ttl, increments), client=pipe
            )

    def _withdraw(self) -> None:
        pipe = self.ledger.redis.pipeline(transaction=False)
        if self._flush_queued():
            self._send_increments(pipe)
        keys, args = [workers_key(self.deployment)], [self.worker, self.settings.dead_after_s]
        self.ledger.script("withdraw")(keys, args, client=pipe)
        pipe.execute()
