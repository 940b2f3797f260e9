"""Priorities: high jobs are taken and batched before normal ones, normal before low, each
level oldest first; depth by level in the client, the CLI and the exporter; the levels'
typed errors at submit, in the gateway's job API and as OpenAI's `service_tier`."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeq import Client, InvalidRequest, JobCancelled, JobExpired, pipeline

from .cluster import Cluster, renamed, wait_until
from .test_metrics import Exporter, start, value

LEVELS = ("high", "normal", "low")


@given(
    jobs=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 3), st.sampled_from(["p", "q"])),
        min_size=1,
        max_size=25,
    ),
    max_batch_size=st.integers(1, 5),
)
@settings(max_examples=80, deadline=None)
def test_the_batcher_runs_the_most_urgent_level_first_and_each_level_in_order(
    jobs: list[tuple[int, int, str]], max_batch_size: int
) -> None:
    """Every item waiting when the batcher starts (rank 0 high, 1 normal, 2 low; two kinds
    of parameters; items of one size): each batch is led by the most urgent item left,
    takes its peers level by level (none more urgent of its parameters left behind), and
    each level of each kind of parameters runs in arrival order."""
    from pipeq.worker.batcher import Batcher

    ran: list[list[tuple[int, str, int]]] = []

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        ran.append(list(items))
        return items

    batcher = Batcher(run, max_batch_size=max_batch_size, max_batch_wait_ms=0, size=lambda v: 0)
    futures = []
    n = 0
    for job, (rank, items, key) in enumerate(jobs):
        values = []
        for _ in range(items):
            values.append((rank, key, n))
            n += 1
        futures += batcher.submit(f"j{job}", values, {"key": key}, rank).futures
    batcher.start()
    try:
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.stop()
    assert sorted(r[2] for r in results) == list(range(n))  # each item once
    left = sorted(r for batch in ran for r in batch)
    for batch in ran:
        assert len(batch) <= max_batch_size and len({key for _, key, _ in batch}) == 1
        assert batch[0][0] == min(rank for rank, _, _ in left)  # led by the most urgent
        left = [r for r in left if r not in batch]
        same = [rank for rank, key, _ in left if key == batch[0][1]]
        assert max(rank for rank, _, _ in batch) <= min(same, default=2)
    order = [r for batch in ran for r in batch]
    for rank in range(3):
        for key in "pq":
            mine = [i for r, k, i in order if (r, k) == (rank, key)]
            assert mine == sorted(mine)


@pytest.fixture
def cold(tmp_path: Path, deployments: dict[str, Any]) -> Any:
    """A sentiment deployment of batches of 2 that scales to zero: it takes jobs with no
    worker running, so a backlog of every level can wait before a worker starts."""
    d = renamed(deployments["sentiment-analysis"], "cold", max_batch_size=2, scale_to_zero=True)
    cluster = Cluster(tmp_path, {"cold": d}, worker_env={"PIPEQ_HEARTBEAT_S": "0.5"})
    try:
        worker = start(cluster, "cold")  # announces the deployment
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        yield cluster
    finally:
        cluster.close()


def test_a_worker_takes_high_before_normal_before_low_and_each_level_oldest_first(
    cold: Cluster,
) -> None:
    """Thirty jobs of the three levels, interleaved, wait with no worker; one high job is
    cancelled and one expires. Depth by level in `Client.depth`, `pipeq deployments` and
    the exporter. Then a worker starts: its forward passes run every high job, then every
    normal one, then every low one, each level in the order submitted; the cancelled and
    the expired one never run."""
    import subprocess
    import sys

    exporter = Exporter(cold.url)
    try:
        with cold.client(no_worker_grace_s=0) as client:
            jobs = {level: [] for level in LEVELS}
            for i in range(10):
                for level in ("low", "normal", "high"):  # the least urgent submitted first
                    text = f"{level:6} job {i:02}"
                    jobs[level].append((text, client.submit("cold", text, priority=level)))
            cancelled = jobs["high"].pop(3)[1]
            assert cancelled.cancel()
            expired = client.submit("cold", "high   late  ", priority="high", expires=0.2)
            time.sleep(0.5)
            depth = client.depth("cold")
            assert depth.levels["high"][0] == 10 and depth.levels["low"][0] == 10
            assert depth.levels["normal"][0] == 10 and depth.waiting == 30
            assert depth.levels["high"][1] > 0.3 and depth.oldest_age_s >= depth.levels["high"][1]
            # the queue holds the 10 normal jobs and one doorbell, not one a high or low job
            assert cold.redis().llen("pipeq.cold") == 11
            listed = subprocess.run(
                [sys.executable, "-m", "pipeq", "deployments", "--redis-url", cold.url],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "30 (high 10, low 10) waiting" in listed.stdout, listed
            s = exporter.scrape()
            for level in LEVELS:
                assert value(s, "pipeq_queue_depth", deployment="cold", priority=level) == 10
            start(cold, "cold")
            for level in LEVELS:
                for text, job in jobs[level]:
                    assert job.result(timeout=60)[0]["label"], text
            with pytest.raises(JobCancelled):
                cancelled.result(timeout=30)
            with pytest.raises(JobExpired):
                expired.result(timeout=30)
            assert client.depth("cold").waiting == 0
    finally:
        exporter.close()
    ran = [text for _, text in cold.forwards()]
    want = [text for level in LEVELS for text, _ in jobs[level]]
    assert sorted(ran) == sorted(want)
    # in order of level, then of submission, give or take the jobs of one take (2, the
    # batch size): their pool threads hand them to the batcher in whichever order they run
    moved = {t: ran.index(t) - i for i, t in enumerate(want)}
    assert all(abs(d) <= 2 for d in moved.values()), [t for t in want if moved[t]]


def test_a_high_job_goes_before_a_backlog_a_worker_is_taking(cold: Cluster) -> None:
    """A worker busy with 200 low jobs (batches of 2, 0.05 s each): a high job submitted
    meanwhile runs within its next batches, not after the backlog; the doorbell a high
    or low job rings wakes an idle worker at once."""
    with cold.client(no_worker_grace_s=0) as client:
        lows = [client.submit("cold", f"low {i}", priority="low") for i in range(200)]
        cold.start_worker("cold", PIPEQ_FAULTS_FORWARD_S="0.05")
        wait_until(lambda: len(cold.forwards()) >= 10, 60, "the backlog under way")
        ran_before = len(cold.forwards())
        high = client.submit("cold", "high one", priority="high")
        high.result(timeout=60)
        ran = [text for _, text in cold.forwards()]
        after = ran.index("high one") - ran_before  # low items run after its submit
        for job in lows:
            job.result(timeout=120)
        # idle now: a low job alone is taken at once (its doorbell), not after a wait
        started = time.monotonic()
        client.submit("cold", "low alone", priority="low").result(timeout=30)
        alone_s = time.monotonic() - started
    print(f"\nthe high job ran after {after} more low items; an idle worker: {alone_s:.2f} s")
    # the batch running and the one formed before it was taken: 4 items (and 2 that
    # were being logged as it was submitted); the backlog was 190 more
    assert after <= 6, ran[ran_before - 2 : ran_before + 12]
    assert alone_s < 4.0  # without its doorbell, BLMOVE waits 5 s (IDLE_WAIT_S)


def test_a_priority_not_among_the_levels_is_a_typed_error(client: Client) -> None:
    for bad in ("urgent", 0, None, "HIGH"):
        with pytest.raises(InvalidRequest, match="priority is one of 'high', 'normal', 'low'"):
            client.submit("sentiment-analysis", "hi", priority=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="priority"):
            client.map("sentiment-analysis", ["hi"], priority=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="priority"):
        pipeline("sentiment-analysis", client=client, priority="urgent")
    assert client.submit("sentiment-analysis", "hi", priority="low").result(timeout=30)
    classify = pipeline("sentiment-analysis", client=client, priority="low")
    assert classify("hi", priority="high") == classify(["hi"])[0:1] == classify("hi")
    for bad in ("", 0, False):  # a call's own priority is checked too, falsy or not
        with pytest.raises(InvalidRequest, match="priority"):
            classify("hi", priority=bad)  # type: ignore[arg-type]


def test_a_fault_in_forming_a_batch_fails_the_waiting_items_and_the_batcher_goes_on() -> None:
    """The batcher thread never dies: a hook that raises while a batch is formed (here
    `settled`, asked about a suspect) fails the items waiting then, and the next job runs."""
    from pipeq.worker.batcher import Batcher, Quarantine

    verdicts = [{"suspect": Quarantine()}]  # its first admission: run it apart

    def admit(ids: list[str], alone: bool) -> dict[str, BaseException]:
        return verdicts.pop() if verdicts else {}

    def settled(job_id: str) -> bool:
        raise RuntimeError("settled failed")

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        return [f"ran {i}" for i in items]

    batcher = Batcher(run, max_batch_size=4, max_batch_wait_ms=0, admit=admit, settled=settled)
    batcher.start()
    try:
        suspect = batcher.submit("suspect", ["x"], {})
        with pytest.raises(RuntimeError, match="settled failed"):
            suspect.futures[0].result(timeout=10)
        assert batcher.alive
        assert batcher.submit("next", ["y"], {}).futures[0].result(timeout=10) == "ran y"
    finally:
        batcher.stop()
