"""Metrics and `pipeq status`: every name and value checked against what the test did,
across two workers of a deployment and a worker restart; a real Prometheus scrapes them.

Real redis-server, real worker processes, the real `pipeq exporter` and `pipeq status`
commands. The histograms reach Redis with each worker's heartbeat (0.5 s here), so the
checks wait for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeq import InvalidRequest, JobCancelled, JobExpired
from pipeq._config import Deployment
from pipeq._metrics import HISTOGRAMS, METRICS, OUTCOMES

from .cluster import Cluster, renamed, wait_until
from .conftest import free_port, paused, send_raw

pytestmark = pytest.mark.timeout(300)

LOOPBACK = ("--address", "127.0.0.1")
QUICK = {"PIPEQ_HEARTBEAT_S": "0.5", "PIPEQ_DEAD_AFTER_S": "2.5"}


@pytest.fixture
def cluster(tmp_path: Path, deployments: dict[str, Any]) -> Iterator[Cluster]:
    sentiment: Deployment = renamed(
        deployments["sentiment-analysis"], "sentiment", max_batch_size=8
    )
    ner = renamed(deployments["ner"], "tagger")
    c = Cluster(tmp_path, {"sentiment": sentiment, "tagger": ner}, worker_env=QUICK)
    yield c
    c.close()


def start(cluster: Cluster, name: str) -> subprocess.Popen[bytes]:
    proc = cluster.start_worker(name)
    cluster.hostname(proc, name)
    return proc


class Exporter:
    """`pipeq exporter` as a process of its own, scraped over HTTP."""

    def __init__(self, url: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "exporter", "--port", str(self.port), *LOOPBACK],
            env={**os.environ, "PIPEQ_REDIS_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith(f"metrics: http://127.0.0.1:{self.port}/metrics"), line

    def text(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """sample name and sorted labels -> value"""
        out = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0


@pytest.fixture
def exporter(cluster: Cluster) -> Iterator[Exporter]:
    e = Exporter(cluster.url)
    yield e
    e.close()


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def status(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "pipeq", "status", "--redis-url", cluster.url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, out.stdout, out.stderr


def test_every_metric_is_right_across_two_workers_a_restart_and_every_outcome(
    cluster: Cluster, exporter: Exporter
) -> None:
    first, second = start(cluster, "sentiment"), start(cluster, "sentiment")
    tagger = start(cluster, "tagger")
    with cluster.client() as client:
        # every outcome but lost (tests/test_faults.py counts that one), each a known number
        ok = [client.submit("sentiment", f"review {i}: good plot") for i in range(40)]
        assert all(j.result(timeout=60) for j in ok)
        bad = send_raw(client, "sentiment", inputs=12, params={})  # fails in the worker
        with pytest.raises(InvalidRequest):
            bad.result(timeout=30)
        with paused(client, "sentiment"):
            late = client.submit("sentiment", "too late", expires=0.2)
            gone = client.submit("sentiment", "never run")
            assert gone.cancel()
            time.sleep(0.5)
        with pytest.raises(JobExpired):
            late.result(timeout=30)
        with pytest.raises(JobCancelled):
            gone.result(timeout=5)
        tags = client.submit("tagger", ["Ada lives in Paris", "Bob in Rome"])
        tags.result(timeout=30)

        # forward passes and waits: one wait per job that ran, one item per job
        def settled() -> dict[Any, float] | None:
            s = exporter.scrape()
            done = (value(s, "pipeq_batch_size_sum", deployment="sentiment") == 40) and (
                value(s, "pipeq_batch_size_sum", deployment="tagger") == 2  # a list of two
            )
            return s if done else None

        s = wait_until(settled, 20, "the workers' observations reach Redis")
        print("\nscrape after the burst:\n" + exporter.text())
        want = {"succeeded": 40, "failed": 1, "cancelled": 1, "expired": 1, "lost": 0}
        for outcome in OUTCOMES:
            got = value(s, "pipeq_jobs_total", deployment="sentiment", outcome=outcome)
            assert got == want[outcome], outcome
        assert value(s, "pipeq_jobs_total", deployment="tagger", outcome="succeeded") == 1
        assert value(s, "pipeq_queue_wait_seconds_count", deployment="sentiment") == 40
        batches = value(s, "pipeq_batch_size_count", deployment="sentiment")
        assert 5 <= batches <= 40  # batches of up to 8
        assert value(s, "pipeq_forward_seconds_count", deployment="sentiment") == batches
        assert value(s, "pipeq_batch_size_bucket", deployment="sentiment", le="+Inf") == batches
        assert value(s, "pipeq_batch_size_bucket", deployment="sentiment", le="8.0") == batches
        assert value(s, "pipeq_queue_wait_seconds_sum", deployment="sentiment") > 0
        assert value(s, "pipeq_forward_seconds_sum", deployment="sentiment") > 0
        assert value(s, "pipeq_workers", deployment="sentiment") == 2
        assert value(s, "pipeq_workers", deployment="tagger") == 1
        for d in ("sentiment", "tagger"):
            assert value(s, "pipeq_queue_depth", deployment=d, priority="normal") == 0
            assert value(s, "pipeq_queue_oldest_age_seconds", deployment=d, priority="normal") == 0
            assert value(s, "pipeq_jobs_running", deployment=d) == 0
        assert value(s, "pipeq_redis_up") == 1
        # every metric of the contract is served (GPU memory only where a worker has a GPU,
        # generation engines only where one batches continuously: test_generation's)
        served = {name for name, _ in s}
        for name, m in METRICS.items():
            if name.startswith("pipeq_gpu_") or name == "pipeq_generation_jobs_total":
                assert name not in served  # CPU workers report none; no generation here
                continue
            if m.type == "histogram":
                assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= served, name
            else:
                assert name in served, name
        # Prometheus' exposition: the counter is typed as one, the histogram buckets ascend
        text = exporter.text()
        assert "# TYPE pipeq_jobs_total counter" in text
        for h in HISTOGRAMS:
            assert f"# TYPE pipeq_{h} histogram" in text

        # a restart loses nothing and counts nothing twice; a backlog shows in the depth
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        assert wait_until(
            lambda: value(exporter.scrape(), "pipeq_workers", deployment="sentiment") == 0,
            5,
            "no live worker",
        )
        waiting = [client.submit("sentiment", f"queued {i}") for i in range(5)]
        time.sleep(1.0)
        s = exporter.scrape()
        assert value(s, "pipeq_queue_depth", deployment="sentiment", priority="normal") == 5
        assert (
            value(s, "pipeq_queue_oldest_age_seconds", deployment="sentiment", priority="normal")
            >= 1.0
        )
        assert value(s, "pipeq_jobs_total", deployment="sentiment", outcome="succeeded") == 40
        code, out, err = status(cluster)
        assert code == 1, out
        assert "no live worker: sentiment" in err
        start(cluster, "sentiment")
        assert all(j.result(timeout=60) for j in waiting)
        s = wait_until(
            lambda: (
                (s := exporter.scrape())
                and value(s, "pipeq_batch_size_sum", deployment="sentiment") == 45
                and s
            ),
            20,
            "the new worker's observations",
        )
        assert value(s, "pipeq_jobs_total", deployment="sentiment", outcome="succeeded") == 45
        assert value(s, "pipeq_queue_wait_seconds_count", deployment="sentiment") == 45
        assert value(s, "pipeq_queue_depth", deployment="sentiment", priority="normal") == 0
        assert value(s, "pipeq_workers", deployment="sentiment") == 1
    tagger.send_signal(signal.SIGTERM)
    tagger.wait(30)


def test_status_lists_each_deployment_and_fails_when_one_has_no_live_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    start(cluster, "sentiment")
    code, out, err = status(cluster)
    assert code == 0, err  # tagger never ran: nobody announced it, no config declares it
    assert "sentiment" in out and "tagger" not in out
    with cluster.client() as client:
        for j in [client.submit("sentiment", f"review {i}") for i in range(7)]:
            j.result(timeout=60)
        with pytest.raises(InvalidRequest):
            send_raw(client, "sentiment", inputs=12, params={}).result(timeout=30)
    code, out, err = status(cluster, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["healthy"] is True
    [row] = report["deployments"]
    assert row["name"] == "sentiment" and row["workers"] == 1
    assert row["recent"]["succeeded"] == 7 and row["recent"]["failed"] == 1
    assert row["totals"]["succeeded"] == 7
    assert (row["waiting"], row["running"]) == (0, 0)
    # the table: a header, then the deployment with its counts
    code, out, _ = status(cluster)
    header, line = out.strip().splitlines()
    assert header.split()[:2] == ["DEPLOYMENT", "WORKERS"]
    assert line.split() == ["sentiment", "1", "0", "0.0s", "0", "7", "1"]
    # a deployment the config declares and no worker serves: exit 1, named
    code, out, err = status(cluster, "--config", str(cluster.config))
    assert code == 1
    assert "no live worker: tagger" in err and "never started" in out
    # a health check for one deployment looks at that one only
    assert status(cluster, "--config", str(cluster.config), "--deployment", "sentiment")[0] == 0
    assert status(cluster, "--deployment", "nope")[0] == 1
    # Redis gone: one line, exit 2
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeq",
            "status",
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
    )
    assert bad.returncode == 2 and "BrokerUnavailable" in bad.stderr


def test_a_scrape_when_redis_is_gone_says_so(cluster: Cluster, exporter: Exporter) -> None:
    cluster.kill_redis()
    s = exporter.scrape()
    assert value(s, "pipeq_redis_up") == 0
    assert len(s) == 1


def _prometheus() -> str | None:
    found = shutil.which("prometheus")
    if found is None and os.environ.get("CI"):
        pytest.fail("prometheus is not installed: .ci/run installs Debian's package")
    return found


def test_a_real_prometheus_scrapes_the_exporter_and_answers_promql(
    cluster: Cluster, exporter: Exporter, tmp_path: Path
) -> None:
    binary = _prometheus()
    if binary is None:
        pytest.skip("no prometheus binary (apt-get install prometheus); CI installs it")
    start(cluster, "sentiment")
    with cluster.client() as client:
        client.submit("sentiment", "warm").result(timeout=60)  # its consumer listens
    with cluster.client() as client, paused(client, "sentiment"):
        jobs = [client.submit("sentiment", f"held {i}") for i in range(3)]
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: pipeq\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]\n"
        )
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"),
        )
        try:
            query = urllib.parse.urlencode(
                {"query": 'sum(pipeq_queue_depth{deployment="sentiment"})'}
            )

            def answer() -> float | None:
                try:
                    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
                    with urllib.request.urlopen(url, timeout=5) as r:
                        body = json.loads(r.read())
                except OSError:
                    return None
                result = body["data"]["result"]
                return float(result[0]["value"][1]) if result else None

            try:
                got = wait_until(answer, 60, "Prometheus answers the depth query")
            except AssertionError:
                print((tmp_path / "prometheus.log").read_text()[-3000:])
                raise
            print(f"PromQL sum(pipeq_queue_depth{{deployment='sentiment'}}) = {got}")
            assert got == 3
        finally:
            proc.terminate()
            proc.wait(30)
    for j in jobs:
        j.result(timeout=60)


def test_gpu_memory_is_served_per_live_worker_that_reports_it(redis_url: str) -> None:
    """No GPU here: the state a GPU worker's heartbeat writes (its announcement, its beat,
    its statistics with `_gpu_memory()`'s fields) is written by hand, and the exporter's
    collector reads it. A CPU worker reports no GPU fields."""
    import redis

    from pipeq._status import Collector
    from pipeq.worker.main import _gpu_memory

    assert _gpu_memory() == {}  # this host has no CUDA
    r = redis.Redis.from_url(redis_url)
    info = {"task": "text-generation", "model": "m", "dead_after_s": 10}
    r.hset("pipeq:deployments", "gpu-gen", json.dumps(info))
    now = float(r.time()[0])
    r.zadd("pipeq:workers:gpu-gen", {"w-live": now, "w-dead": now - 60})
    gpu = {"gpu_memory_used_bytes": 3 * 2**30, "gpu_memory_total_bytes": 80 * 2**30}
    r.hset("pipeq:stats:gpu-gen", mapping={"w-live": json.dumps(gpu), "w-dead": json.dumps(gpu)})
    try:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in Collector(r).collect()
            for s in family.samples
        }
    finally:
        r.delete("pipeq:workers:gpu-gen", "pipeq:stats:gpu-gen")
        r.hdel("pipeq:deployments", "gpu-gen")
    labels = (("deployment", "gpu-gen"), ("worker", "w-live"))
    assert samples[("pipeq_gpu_memory_used_bytes", labels)] == 3 * 2**30
    assert samples[("pipeq_gpu_memory_total_bytes", labels)] == 80 * 2**30
    assert not [k for k in samples if ("worker", "w-dead") in k[1]]  # only live workers
    assert samples[("pipeq_workers", (("deployment", "gpu-gen"),))] == 1


def test_a_deployment_that_scales_to_zero_takes_jobs_with_no_worker_and_shows_its_backlog(
    tmp_path: Path, deployments: dict[str, Any]
) -> None:
    """KEDA scales it on pipeq_queue_depth: with no worker, jobs must wait (not be
    refused with NoLiveWorker), show in the depth, and be answered once a worker starts.
    Idle at zero it is healthy; with jobs waiting and no worker it is not."""
    gen = renamed(deployments["sentiment-analysis"], "cold", scale_to_zero=True)
    cluster = Cluster(tmp_path, {"cold": gen}, worker_env=QUICK)
    try:
        worker = start(cluster, "cold")
        worker.send_signal(signal.SIGTERM)  # KEDA scaled it to zero
        assert worker.wait(30) == 0
        exporter = Exporter(cluster.url)
        try:
            code, out, _ = status(cluster)
            assert code == 0 and "0 (scaled to zero)" in out, out
            with cluster.client(no_worker_grace_s=0) as client:
                job = client.submit("cold", "queued while no worker runs")
                s = exporter.scrape()
                assert value(s, "pipeq_scale_to_zero", deployment="cold") == 1
                assert value(s, "pipeq_workers", deployment="cold") == 0
                assert value(s, "pipeq_queue_depth", deployment="cold", priority="normal") == 1
                code, _, err = status(cluster, "--json")
                assert code == 1 and "no live worker: cold" in err
                start(cluster, "cold")
                assert job.result(timeout=60)
        finally:
            exporter.close()
    finally:
        cluster.close()


def test_without_scale_to_zero_a_deployment_with_no_worker_refuses_jobs(
    cluster: Cluster,
) -> None:
    from pipeq import NoLiveWorker

    worker = start(cluster, "tagger")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    with cluster.client(no_worker_grace_s=0) as client, pytest.raises(NoLiveWorker):
        client.submit("tagger", "Ada lives in Paris")


FORGET = ("--forget", "tagger")


def test_a_retired_deployment_can_be_forgotten_once_nothing_needs_it(cluster: Cluster) -> None:
    """A deployment stays announced (and `pipeq status` fails, the alert fires) until it is
    forgotten; forgetting is refused while a worker serves it."""

    def forget() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeq", "deployments", "--redis-url", cluster.url, *FORGET],
            capture_output=True,
            text=True,
            timeout=60,
        )

    worker = start(cluster, "tagger")
    refused = forget()
    assert refused.returncode == 2 and "still has live workers" in refused.stderr
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert status(cluster)[0] == 1  # announced, no worker
    done = forget()
    assert done.returncode == 0, done.stderr
    code, out, err = status(cluster)
    assert code == 1 and "tagger" not in out and "none announced" in err
    assert forget().returncode == 1  # nothing left to forget
