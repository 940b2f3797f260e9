"""pipeq's Prometheus metrics: the contract, where they live in Redis, and how they are read.

The names below are a contract (operators build alerts and autoscalers on them): keep
them stable. Every figure is kept in Redis, per deployment, so one exporter sees the
whole cluster whatever machines its workers run on, and so counters survive worker
restarts and add up across a deployment's workers (no double counting, no reset):

    pipeq:metrics:<deployment>         hash  cumulative counters and histogram buckets:
        jobs_total:<outcome>                 jobs ended with that outcome (`_ledger` scripts,
                                             counted where the outcome is first stored)
        generation_jobs_total:<engine>       generation jobs a worker routed to that engine
                                             (added with its heartbeat, as histograms)
        <histogram>:<i>                      observations in bucket i (not cumulative)
        <histogram>:sum, <histogram>:count
    pipeq:recent:<deployment>:<slot>   hash  outcome -> jobs ended in that 10 s slot of
                                             Redis' clock (`pipeq status`'s last 5 minutes);
                                             each slot expires after RECENT_KEEP_S

Outcomes are counted exactly once, inside the Lua script that stores the job's first
final state (a second delivery stores nothing, so counts nothing). Histogram
observations are made in the worker and added to Redis with its next heartbeat (every
`heartbeat_s`): a worker killed by SIGKILL loses at most one heartbeat's observations; a
worker stopping cleanly adds them as it withdraws. A Redis that restarts without
persistence starts the counters from zero again, which Prometheus' `rate()` reads as a
counter reset, as it should.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HISTOGRAMS",
    "METRICS",
    "OUTCOMES",
    "RECENT_KEEP_S",
    "RECENT_SLOT_S",
    "Observations",
    "metrics_key",
    "recent_key",
]

#: how a job ended, the `outcome` label of pipeq_jobs_total
OUTCOMES = ("succeeded", "failed", "cancelled", "expired", "lost")

#: the width of one slot of recent outcomes, and how long a slot is kept (seconds)
RECENT_SLOT_S = 10
RECENT_KEEP_S = 400


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # Prometheus' type: gauge, counter, histogram
    labels: tuple[str, ...]
    help: str


#: every metric the exporter serves, by name (the contract)
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "pipeq_queue_depth",
            "gauge",
            ("deployment", "priority"),
            "Jobs accepted and not yet running, wherever they wait (queue or a worker's hands), "
            "by priority (high, normal, low).",
        ),
        Metric(
            "pipeq_queue_oldest_age_seconds",
            "gauge",
            ("deployment", "priority"),
            "Age of the oldest job accepted and not yet running, by priority (0 when none waits).",
        ),
        Metric("pipeq_workers", "gauge", ("deployment",), "Live workers (heartbeat recent)."),
        Metric(
            "pipeq_jobs_running", "gauge", ("deployment",), "Jobs whose forward pass has begun."
        ),
        Metric(
            "pipeq_jobs_total",
            "counter",
            ("deployment", "outcome"),
            "Jobs ended, by outcome: succeeded, failed, cancelled, expired, lost.",
        ),
        Metric(
            "pipeq_generation_jobs_total",
            "counter",
            ("deployment", "engine"),
            "Generation jobs by the engine that ran them: continuous (transformers' "
            "continuous batching) or dynamic (the dynamic batcher; docs/generation.md "
            "says which jobs and why). Deployments with batching=continuous only.",
        ),
        Metric(
            "pipeq_queue_wait_seconds",
            "histogram",
            ("deployment",),
            "Time from a job's acceptance to its first forward pass (Redis' clock).",
        ),
        Metric(
            "pipeq_batch_size",
            "histogram",
            ("deployment",),
            "Items in each forward pass a worker ran.",
        ),
        Metric(
            "pipeq_forward_seconds",
            "histogram",
            ("deployment",),
            "Duration of one forward pass (one batch), pre- and post-processing included.",
        ),
        Metric(
            "pipeq_gpu_memory_used_bytes",
            "gauge",
            ("deployment", "worker"),
            "GPU memory the worker's process holds (torch.cuda.memory_reserved).",
        ),
        Metric(
            "pipeq_gpu_memory_total_bytes",
            "gauge",
            ("deployment", "worker"),
            "Total memory of the worker's GPU (torch.cuda.mem_get_info).",
        ),
        Metric(
            "pipeq_scale_to_zero",
            "gauge",
            ("deployment",),
            "1 if the deployment takes jobs with no worker running (scale_to_zero), else 0.",
        ),
        Metric(
            "pipeq_redis_writes_refused",
            "gauge",
            ("reason",),
            "1 for the reason Redis refuses writes now (full, read-only, not persisting, "
            "too few replicas), else 0: producers get BrokerRefusesWrites, workers wait.",
        ),
        Metric(
            "pipeq_redis_up",
            "gauge",
            (),
            "1 if the exporter could read the cluster's state from Redis at this scrape.",
        ),
    )
}

#: histogram name (without the pipeq_ prefix) -> bucket upper bounds (+Inf implied)
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    # Prometheus client's defaults stretched to 10 min: a backlog waits minutes
    "queue_wait_seconds": (
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        120,
        300,
        600,
    ),
    "batch_size": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    # a tiny classifier's batch takes a millisecond, a long generation a minute
    "forward_seconds": (
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        120,
    ),
}


def metrics_key(deployment: str) -> str:
    return f"pipeq:metrics:{deployment}"


def recent_key(deployment: str, slot: int) -> str:
    """The hash of outcomes in slot `slot` (Redis' unix time // RECENT_SLOT_S)."""
    return f"pipeq:recent:{deployment}:{slot}"


def bucket_of(name: str, value: float) -> int:
    """Index of the first bucket of histogram `name` whose bound is >= value
    (len(bounds) for +Inf)."""
    for i, bound in enumerate(HISTOGRAMS[name]):
        if value <= bound:
            return i
    return len(HISTOGRAMS[name])


class Observations:
    """A worker's histogram observations since its last heartbeat, as increments of the
    deployment's hash. Thread-safe: the batcher and the job threads observe, the
    heartbeat takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}

    def observe(self, name: str, value: float) -> None:
        """One observation of histogram `name` (a key of HISTOGRAMS); NaN is ignored."""
        if math.isnan(value):
            return
        with self._lock:
            for field, inc in (
                (f"{name}:{bucket_of(name, value)}", 1.0),
                (f"{name}:sum", value),
                (f"{name}:count", 1.0),
            ):
                self._pending[field] = self._pending.get(field, 0.0) + inc

    def count(self, name: str, label: str) -> None:
        """One more of counter `name` with label value `label` (field `name:label`)."""
        with self._lock:
            field = f"{name}:{label}"
            self._pending[field] = self._pending.get(field, 0.0) + 1.0

    def take(self) -> dict[str, float]:
        """The increments since the last take, and start again from none."""
        with self._lock:
            out, self._pending = self._pending, {}
        return out


def increment_args(flush: int, ttl_s: int, increments: dict[str, float]) -> list[Any]:
    """The `_ledger` increments script's arguments for flush number `flush`: counts as
    integers, sums (fields ending in ':sum') as floats."""
    args: list[Any] = [flush, ttl_s]
    for field, inc in increments.items():
        args += [field, repr(float(inc)) if field.endswith(":sum") else int(inc)]
    return args


def histogram_buckets(name: str, raw: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs as Prometheus wants them, +Inf last, and the sum, from
    a deployment's hash fields (decoded)."""
    bounds = HISTOGRAMS[name]
    out: list[tuple[str, float]] = []
    total = 0.0
    for i, bound in enumerate((*bounds, math.inf)):
        total += float(raw.get(f"{name}:{i}", 0))
        out.append(("+Inf" if math.isinf(bound) else repr(float(bound)), total))
    return out, float(raw.get(f"{name}:sum", 0.0))


def engine_counts(raw: dict[str, str]) -> dict[str, int]:
    """Generation jobs by engine (continuous, dynamic), as counted so far."""
    prefix = "generation_jobs_total:"
    return {k[len(prefix) :]: int(v) for k, v in raw.items() if k.startswith(prefix)}


def outcome_counts(raw: dict[str, str]) -> dict[str, int]:
    """Every outcome's cumulative count (0 when none yet)."""
    return {o: int(raw.get(f"jobs_total:{o}", 0)) for o in OUTCOMES}


def sum_recent(slots: Iterable[dict[str, str]]) -> dict[str, int]:
    out = dict.fromkeys(OUTCOMES, 0)
    for slot in slots:
        for outcome, n in slot.items():
            if outcome in out:
                out[outcome] += int(n)
    return out
