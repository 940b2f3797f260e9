"""Deadlines, timeouts and cancelling say what really happened, to producers and Flower."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeq import Client, JobCancelled, JobExpired, JobState, JobTimeout
from pipeq._config import Deployment

from .cluster import Cluster, renamed, wait_until
from .conftest import paused
from .test_roundtrip import flower_view


@pytest.fixture
def slow_cluster(tmp_path: Path, deployments: dict[str, Any]) -> Iterator[Cluster]:
    """A sentiment worker whose forward passes take 0.5 s, and a generator whose jobs
    time out after 1 s of forward pass."""
    sentiment = renamed(deployments["sentiment-analysis"], "slow", max_batch_size=8)
    generator: Deployment = renamed(deployments["text-generation"], "gen", job_timeout_s=1.0)
    cluster = Cluster(
        tmp_path,
        {"slow": sentiment, "gen": generator},
        worker_env={"PIPEQ_FAULTS_FORWARD_S": "0.5"},
    )
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_job_past_its_expires_in_the_queue_never_starts(client: Client) -> None:
    """Expired while queued: dropped when a worker takes it, REVOKED (expired) in Flower."""
    with flower_view(client) as (events, until):
        with paused(client, "sentiment-analysis"):
            job = client.submit("sentiment-analysis", "too late", expires=0.3)
            time.sleep(0.6)
        with pytest.raises(JobExpired):
            job.result(timeout=30)
        until(lambda: any(e.get("uuid") == job.id for e in events if e["type"] == "task-revoked"))
    shown = [e for e in events if e.get("uuid") == job.id]
    assert "task-started" not in [e["type"] for e in shown]
    assert shown[-1]["type"] == "task-revoked" and shown[-1]["expired"] is True
    assert job.status() is JobState.EXPIRED
    assert job.cancel() is False


def _skew_producer_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This process's (the producer's) clock runs `seconds` off: `time.time` and the
    `datetime.now` Celery computes a message's `expires` with. Redis and the workers (other
    processes) keep the true time."""
    import celery.app.base

    real_time = time.time

    class Skewed(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return datetime.datetime.now(tz) + datetime.timedelta(seconds=seconds)

    monkeypatch.setattr(time, "time", lambda: real_time() + seconds)
    monkeypatch.setattr(celery.app.base, "datetime", Skewed)


@pytest.mark.parametrize("skew_s", [-120.0, 120.0])
def test_expires_is_measured_on_redis_clock_whatever_the_producers_clock(
    client: Client, monkeypatch: pytest.MonkeyPatch, skew_s: float
) -> None:
    """A producer whose clock is 2 minutes behind (or ahead of) Redis': `expires=60` still
    gives the job 60 s (before: behind, JobExpired at once), and `expires=0.5` on a job
    that waits 1.5 s still expires it (before: ahead, it ran 2 minutes late)."""
    _skew_producer_clock(monkeypatch, skew_s)
    assert client.submit("sentiment-analysis", "in time", expires=60).result(timeout=30)
    with paused(client, "sentiment-analysis"):
        late = client.submit("sentiment-analysis", "too late", expires=0.5)
        time.sleep(1.5)
    with pytest.raises(JobExpired):
        late.result(timeout=30)


def test_a_job_that_expires_while_its_worker_holds_it_is_dropped_before_compute(
    slow_cluster: Cluster,
) -> None:
    """Held by the worker, waiting for a batch behind a long one: the deadline passes
    there, and the admission step drops it before its forward pass."""
    cluster = slow_cluster
    with cluster.client() as client:
        cluster.hostname(cluster.start_worker("slow"), "slow")
        long = client.submit("slow", "takes a while pipeq-fault:sleep=3")
        wait_until(  # the long one is in its forward pass
            lambda: any("takes a while" in text for _, text in cluster.forwards()),
            30,
            "the long job's forward pass",
        )
        late = client.submit("slow", "will expire in the worker", expires=1.0)
        on_time = client.submit("slow", "no deadline")
        with pytest.raises(JobExpired):
            late.result(timeout=30)
        long.result(timeout=30)
        on_time.result(timeout=30)
    ran = [text for _, text in cluster.forwards()]
    assert "will expire in the worker" not in ran
    assert "no deadline" in ran


def test_job_timeout_counts_from_the_forward_pass_not_from_waiting(
    slow_cluster: Cluster,
) -> None:
    """job_timeout_s = 1 s. 60 jobs in batches of 0.2 s wait ~1.6 s in all: none times out (a
    batch's 0.8 s of slack: with 0.3 s batches one passed 1 s on a loaded machine). A
    generation that would run for long stops at 1 s (max_time) and fails with
    JobTimeout, and the generator is free for the next job right after."""
    cluster = slow_cluster
    gen_env = {"PIPEQ_FAULTS_FORWARD_S": "0.2"}
    with cluster.client() as client:
        cluster.hostname(cluster.start_worker("gen", **gen_env), "gen")
        # max_time (never reached) sends them to the dynamic batcher, which batches them
        dyn = {"max_new_tokens": 2, "do_sample": False, "max_time": 30.0}
        jobs = [client.submit("gen", f"prompt {i}", **dyn) for i in range(60)]
        started = time.monotonic()
        for job in jobs:
            job.result(timeout=60)
        drained = time.monotonic() - started
        endless = client.submit("gen", "Once", max_new_tokens=1000, min_new_tokens=1000)
        with pytest.raises(JobTimeout, match=r"job_timeout_s=1\.0"):
            endless.result(timeout=30)
        timed_out_at = time.monotonic()
        client.submit("gen", "next", max_new_tokens=2).result(timeout=30)
        next_after = time.monotonic() - timed_out_at
    print(f"\n60 jobs drained in {drained:.1f} s with job_timeout_s=1; next job {next_after:.2f} s")
    assert drained > 1.0  # the jobs waited longer than job_timeout_s, and none timed out
    assert next_after < 1.0, "the timed-out generation kept the model busy"


def test_cancel_says_what_happened_queued_running_finished_unknown(
    client: Client, redis_url: str
) -> None:
    with paused(client, "sentiment-analysis"):
        queued = client.submit("sentiment-analysis", "cancel me")
        assert queued.cancel() is True
        assert queued.status() is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        queued.result(timeout=10)
    running = client.submit(  # max_time: the dynamic batcher, which cannot stop a job
        "text-generation",
        "Once",
        max_new_tokens=400,
        min_new_tokens=400,
        do_sample=False,
        max_time=600.0,
    )
    wait_until(lambda: running.status() is JobState.RUNNING, 30, "the generation runs")
    assert running.cancel() is False  # it cannot be stopped: it says so
    assert running.result(timeout=60)[0]["generated_text"].startswith("Once")
    assert running.cancel() is False  # finished
    unknown = client.job(f"never-{uuid.uuid4()}")
    assert unknown.status() is JobState.UNKNOWN
    assert unknown.cancel() is False

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeq", *args, "--redis-url", redis_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args, code, says in (
        (("status", unknown.id), 1, "unknown"),
        (("cancel", unknown.id), 1, "unknown job"),
        (("cancel", running.id), 1, "finished"),
        (("status", running.id), 0, "succeeded"),
    ):
        out = cli(*args)
        assert out.returncode == code, (args, out.stdout, out.stderr)
        assert says in out.stdout + out.stderr


def test_flower_shows_a_job_started_only_when_its_forward_pass_begins_and_revoked_when_cancelled(
    slow_cluster: Cluster,
) -> None:
    cluster = slow_cluster
    with cluster.client() as client:
        cluster.hostname(cluster.start_worker("slow"), "slow")
        with flower_view(client) as (events, until):
            first = client.submit("slow", "first pipeq-fault:sleep=2")
            time.sleep(0.5)
            held = client.submit("slow", "held behind it")
            doomed = client.submit("slow", "cancelled while held")
            time.sleep(0.5)  # both received by the worker, waiting for the batcher
            assert doomed.cancel() is True

            def kinds(job_id: str) -> list[str]:
                return [e["type"] for e in events if e.get("uuid") == job_id]

            until(lambda: "task-received" in kinds(held.id) and "task-started" in kinds(first.id))
            assert "task-started" not in kinds(held.id)  # received, waiting: not STARTED
            first.result(timeout=30)
            held.result(timeout=30)
            until(lambda: kinds(held.id)[-1:] == ["task-succeeded"])
            until(lambda: "task-revoked" in kinds(doomed.id))
    assert kinds(held.id) == ["task-sent", "task-received", "task-started", "task-succeeded"]
    assert "task-started" not in kinds(doomed.id)
