"""The cluster at a glance, read from Redis: `pipeq status` and the Prometheus exporter.

Both read the same state, so a terminal and a dashboard never disagree: the deployments
workers announced (plus any a config declares), their live workers, the depth the
ledger keeps (`_ledger`), and the outcome counters and histograms the workers and the
ledger's scripts add up in Redis (`_metrics`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from pipeq._metrics import (
    HISTOGRAMS,
    METRICS,
    RECENT_SLOT_S,
    engine_counts,
    histogram_buckets,
    metrics_key,
    outcome_counts,
    recent_key,
    sum_recent,
)
from pipeq._redis import WRITE_REFUSALS, write_refusal
from pipeq._registry import Registry

__all__ = [
    "RECENT_S",
    "Collector",
    "DeploymentStatus",
    "cluster_status",
    "serve_exporter",
    "write_refusal_of",
]

#: a key written (and expiring at once) to learn whether Redis takes writes
PROBE_KEY = "pipeq:write-probe"

#: `pipeq status`'s window for recent outcomes, in seconds (to within one 10 s slot)
RECENT_S = 300


@dataclass(frozen=True)
class DeploymentStatus:
    """One deployment now. `recent`: jobs ended in the last RECENT_S seconds, by outcome;
    `totals`: since the counters began (Redis' lifetime, with persistence)."""

    name: str
    task: str
    model: str
    workers: int
    waiting: int
    oldest_age_s: float
    running: int
    recent: dict[str, int]
    totals: dict[str, int]
    announced: bool = True
    #: takes jobs with no worker running (an autoscaler starts one for them)
    scale_to_zero: bool = False
    #: live worker -> its batching statistics and GPU memory, as of its last heartbeat
    worker_stats: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: the deployment's `pipeq:metrics:` hash (`_metrics`), decoded
    counters: dict[str, str] = field(default_factory=dict, repr=False)
    #: how `pipeq up` restarted its worker, or gave up (`Registry.supervised`, with
    #: `age_s`), if it did
    supervised: dict[str, Any] | None = None
    #: priority -> (waiting, age of its oldest in s), for each of high, normal, low
    levels: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def down(self) -> bool:
        """No live worker, where one is needed: always, unless the deployment scales to
        zero and no job waits or runs."""
        idle = self.scale_to_zero and self.waiting == 0 and self.running == 0
        return self.workers == 0 and not idle

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["down"] = self.down
        del out["worker_stats"], out["counters"]
        return out


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def write_refusal_of(client: redis.Redis) -> str | None:
    """Why Redis refuses writes now ("full", "read-only", "not persisting": a key of
    `_redis.WRITE_REFUSALS`), by trying one (a key that expires within a second); None
    when it takes them. Raises redis.RedisError when Redis cannot be reached."""
    try:
        client.set(PROBE_KEY, 1, px=1000)
    except redis.ResponseError as e:
        reason = write_refusal(e)
        if reason is None:
            raise
        return reason
    return None


def refusal_line(reason: str) -> str:
    """`pipeq status`'s line for a Redis that refuses writes."""
    return (
        f"Redis refuses writes ({reason}): producers get BrokerRefusesWrites, workers wait "
        f"and lose nothing; it resumes by itself once {WRITE_REFUSALS[reason]}"
    )


def cluster_status(
    client: redis.Redis,
    declared: dict[str, tuple[str, str]] | None = None,
    *,
    recent: bool = True,
) -> list[DeploymentStatus]:
    """Every deployment workers announced, and every one `declared` (name -> (task,
    model), from a config) whether announced or not, sorted by name. `recent=False`
    leaves `recent` at zero without reading its RECENT_S / RECENT_SLOT_S slots.
    Raises redis.RedisError when Redis cannot be read."""
    registry = Registry(client)
    announced = registry.deployments()
    names = sorted(set(announced) | set(declared or {}))
    supervised = registry.supervision()
    if supervised:
        now = _redis_now(client)
        for record in supervised.values():
            record["age_s"] = round(max(0.0, now - float(record.get("at") or now)), 1)
    slots = range(0)
    if recent:
        now = int(_redis_now(client)) // RECENT_SLOT_S
        slots = range(now - RECENT_S // RECENT_SLOT_S + 1, now + 1)
    out = []
    for name in names:
        info: dict[str, Any] = {}
        if name in announced:
            task, model, info = announced[name].task, announced[name].model, announced[name].info
        else:
            task, model = (declared or {})[name]
        depth = registry.ledger.depth(name)
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(metrics_key(name))
        for s in slots:
            pipe.hgetall(recent_key(name, s))
        counters, *recent_outcomes = (_decode(r) for r in pipe.execute())
        live = registry.live_workers(name, info)
        stats = {w: s for w, s in registry.stats(name).items() if w in live}
        out.append(
            DeploymentStatus(
                name=name,
                task=task,
                model=model,
                workers=len(live),
                waiting=depth.waiting,
                oldest_age_s=depth.oldest_age_s,
                running=depth.running,
                recent=sum_recent(recent_outcomes),
                totals=outcome_counts(counters),
                announced=name in announced,
                scale_to_zero=bool(info.get("scale_to_zero")),
                worker_stats=stats,
                counters=counters,
                supervised=supervised.get(name),
                levels=depth.levels,
            )
        )
    return out


class Collector:
    """A prometheus-client collector that reads the whole cluster from Redis at each
    scrape (the metrics and their meaning: `pipeq._metrics.METRICS`). When Redis cannot
    be read, the scrape answers `pipeq_redis_up 0` and nothing else.

    Several Redis servers (`clients`: masked URL -> client; docs/redis.md): each one's
    deployments, and `pipeq_redis_up` and `pipeq_redis_writes_refused` once per Redis
    with a `redis` label, its masked URL; one that cannot be read has only its
    `pipeq_redis_up 0`."""

    def __init__(self, client: redis.Redis | dict[str, redis.Redis]) -> None:
        self.clients = client if isinstance(client, dict) else {"": client}

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration: the names are pipeq's own

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def family(name: str) -> Any:
            m = METRICS[name]
            kind = {
                "gauge": GaugeMetricFamily,
                "counter": CounterMetricFamily,
                "histogram": HistogramMetricFamily,
            }[m.type]
            return kind(name, m.help, labels=list(m.labels))

        several = len(self.clients) > 1
        per_redis = ["redis"] if several else []
        up = GaugeMetricFamily("pipeq_redis_up", METRICS["pipeq_redis_up"].help, labels=per_redis)
        refused = GaugeMetricFamily(
            "pipeq_redis_writes_refused",
            METRICS["pipeq_redis_writes_refused"].help,
            labels=[*per_redis, "reason"],
        )
        deployments: list[DeploymentStatus] = []
        for where, client in self.clients.items():
            label = [where] if several else []
            try:
                deployments += cluster_status(client, recent=False)  # no metric of it
            except redis.RedisError:
                up.add_metric(label, 0)
                continue
            up.add_metric(label, 1)
            try:
                reason = write_refusal_of(client)
            except redis.RedisError:
                reason = None
            for r in WRITE_REFUSALS:
                refused.add_metric([*label, r], int(r == reason))
        yield up
        if not any(sample.value for sample in up.samples):
            return  # no Redis could be read: that is the only sample
        yield refused
        gauges = {
            name: family(name)
            for name in (
                "pipeq_queue_depth",
                "pipeq_queue_oldest_age_seconds",
                "pipeq_workers",
                "pipeq_jobs_running",
                "pipeq_gpu_memory_used_bytes",
                "pipeq_gpu_memory_total_bytes",
                "pipeq_scale_to_zero",
            )
        }
        # CounterMetricFamily takes the name without _total and adds it
        jobs = family("pipeq_jobs_total")
        engines = family("pipeq_generation_jobs_total")
        histograms = {h: family(f"pipeq_{h}") for h in HISTOGRAMS}
        for d in deployments:
            for level, (waiting, age) in d.levels.items():
                gauges["pipeq_queue_depth"].add_metric([d.name, level], waiting)
                gauges["pipeq_queue_oldest_age_seconds"].add_metric([d.name, level], age)
            gauges["pipeq_workers"].add_metric([d.name], d.workers)
            gauges["pipeq_jobs_running"].add_metric([d.name], d.running)
            gauges["pipeq_scale_to_zero"].add_metric([d.name], int(d.scale_to_zero))
            for outcome, n in d.totals.items():
                jobs.add_metric([d.name, outcome], n)
            for engine, n in sorted(engine_counts(d.counters).items()):
                engines.add_metric([d.name, engine], n)
            for h, fam in histograms.items():
                buckets, total = histogram_buckets(h, d.counters)
                fam.add_metric([d.name], buckets, total)
            for worker, stats in d.worker_stats.items():
                for what in ("used", "total"):
                    value = stats.get(f"gpu_memory_{what}_bytes")
                    if value is not None:
                        gauges[f"pipeq_gpu_memory_{what}_bytes"].add_metric([d.name, worker], value)
        yield from gauges.values()
        yield jobs
        yield engines
        yield from histograms.values()


def serve_exporter(url: str | list[str], port: int, address: str) -> tuple[Any, threading.Thread]:
    """Serve /metrics on address:port in a thread, of one Redis or of several (`url`: a
    list; docs/redis.md); returns prometheus-client's server and its thread
    (`server.shutdown()` stops it). Raises OSError when the port is taken, ValueError for
    a URL `_redis` cannot read."""
    from prometheus_client import CollectorRegistry, start_http_server

    from pipeq._app import redis_client
    from pipeq._redis import masked

    urls = [url] if isinstance(url, str) else url
    clients = {masked(u): redis_client(u, socket_timeout=5) for u in urls}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(clients))
    server, thread = start_http_server(port, addr=address, registry=registry)
    return server, thread


def status_lines(deployments: Iterable[DeploymentStatus]) -> list[str]:
    """`pipeq status`'s table: one line per deployment under a header."""
    deployments = list(deployments)
    rows = [("DEPLOYMENT", "WORKERS", "WAITING", "OLDEST", "RUNNING", "OK/5m", "FAILED/5m")]
    for d in deployments:
        failed = d.recent["failed"] + d.recent["lost"]
        rows.append(
            (
                d.name,
                (
                    "0 (never started)"
                    if not d.announced
                    else "0 (scaled to zero)"
                    if d.workers == 0 and not d.down
                    else str(d.workers)
                ),
                waiting_shown(d.waiting, d.levels),
                f"{d.oldest_age_s:.1f}s",
                str(d.running),
                str(d.recent["succeeded"]),
                str(failed),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return table + [supervision_line(d.name, d.supervised) for d in deployments if d.supervised]


def waiting_shown(waiting: int, levels: dict[str, tuple[int, float]]) -> str:
    """The jobs waiting, with the high and low ones among them when there are any:
    "12 (high 2, low 10)"."""
    counts = {level: n for level, (n, _) in levels.items()}
    parts = [f"{level} {counts[level]}" for level in ("high", "low") if counts.get(level)]
    return f"{waiting} ({', '.join(parts)})" if parts else str(waiting)


def supervision_line(name: str, record: dict[str, Any]) -> str:
    """What `pipeq up` did about a deployment's worker, in one line."""
    ago = f"{record.get('age_s', 0):.0f} s ago"
    if record.get("gave_up"):
        return f"{name}: {record['gave_up']} (pipeq up, {ago})"
    return (
        f"{name}: restarted {record.get('restarts', 0)} time(s) by pipeq up; last exit "
        f"{record.get('last_exit')}: {record.get('last_exit_meaning')} ({ago})"
    )


def status_json(
    deployments: list[DeploymentStatus],
    missing: list[str],
    refusal: str | None = None,
    down: list[tuple[str, list[str], str]] | None = None,
) -> str:
    """`pipeq status --json`; `healthy` is exactly when the command exits 0.
    `redis_refuses_writes`: why Redis refuses writes now (`write_refusal_of`), or null.
    `redis_down` (several Redis servers only): each one that did not answer, by its
    masked URL, with the deployments it holds and the error."""
    out: dict[str, Any] = {
        "healthy": not missing and not any(d.down for d in deployments) and not refusal,
        "missing": missing,
        "redis_refuses_writes": refusal,
        "recent_window_s": RECENT_S,
        "deployments": [d.as_dict() for d in deployments],
    }
    if down is not None:
        out["healthy"] = out["healthy"] and not down
        out["redis_down"] = [
            {"redis": where, "deployments": names, "error": why} for where, names, why in down
        ]
    return json.dumps(out, indent=2)
