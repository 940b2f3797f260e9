"""A worker declared dead that comes back, and a Redis that refuses writes.

A frozen process (SIGSTOP, a paused VM) or a stalled Redis makes a live worker look
dead: its peers put its jobs back in the queue. When it comes back it must learn that it
was reclaimed and drop what it no longer owns, never store, acknowledge, set aside or
stream for it, and never move a job out of reach (`docs/guarantees.md`, "A worker that
comes back"). A Redis refusing writes (full under `maxmemory`, a read-only replica) is a
pause: workers wait, producers get `BrokerRefusesWrites` at once, and everything resumes
by itself. Each test prints its counts: accepted, answered once, answered twice, lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pipeq import Client, JobState
from pipeq._config import Deployment
from pipeq._ledger import stream_key

from .cluster import Cluster, wait_until
from .conftest import assert_close
from .test_faults import QUICK, _local, cluster_of, sentiment, texts  # noqa: F401

pytestmark = pytest.mark.timeout(480)

GEN = "distilgpt2"
FINAL = ("task-succeeded", "task-failed", "task-revoked")


class FinalEvents:
    """Celery's final task events per job, as Flower receives them."""

    def __init__(self, client: Client) -> None:
        self.counts: Counter[str] = Counter()
        self._conn = client.app.connection_for_read()
        self._receiver = client.app.events.Receiver(self._conn, handlers={"*": self._on})
        self._thread = threading.Thread(target=self._receiver.capture, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # subscribed before the first job is sent

    def _on(self, event: dict[str, Any]) -> None:
        if event.get("type") in FINAL:
            self.counts[event["uuid"]] += 1

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=5)
        self._conn.release()


@pytest.fixture
def final_events() -> Iterator[Any]:
    made: list[FinalEvents] = []

    def make(client: Client) -> FinalEvents:
        made.append(FinalEvents(client))
        return made[-1]

    yield make
    for f in made:
        f.close()


def settle(jobs: list[Any], quiet_s: float, limit_s: float = 150) -> None:
    """Wait until every job is done, or none finished for `quiet_s` (the rest are lost)."""
    deadline = time.monotonic() + limit_s
    done, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_done = sum(j.status().done for j in jobs)
        if now_done == len(jobs):
            return
        if now_done != done:
            done, since = now_done, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.25)


def counts(jobs: list[Any], events: FinalEvents) -> dict[str, int]:
    time.sleep(1.0)  # the last events are flushed (EVENT_FLUSH_S) and received
    finals = [events.counts[j.id] for j in jobs]
    answered = [j.status().done for j in jobs]
    return {
        "accepted": len(jobs),
        "answered once": sum(a and f <= 1 for a, f in zip(answered, finals, strict=True)),
        "answered twice": sum(f >= 2 for f in finals),
        "lost": sum(not a for a in answered),
    }


def stop(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGSTOP)


def cont(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("kill_after_s", [0.2, 1.5])
def test_a_frozen_worker_that_comes_back_after_its_jobs_were_reclaimed_loses_none(
    cluster_of: Any,  # noqa: F811
    sentiment: Deployment,  # noqa: F811
    final_events: Any,
    kill_after_s: float,
) -> None:
    """Two workers, 300 jobs. A is SIGSTOPped until B has put A's in-flight jobs back in
    the queue, then SIGCONTed, then SIGKILLed `kill_after_s` later. Every accepted job is
    answered, once (one final event for Flower), with its correct result; A learns it was
    reclaimed and exits 70 without storing, acknowledging or setting aside anything."""
    cluster = cluster_of([sentiment], worker_env={**QUICK, "PIPEQ_FAULTS_FORWARD_S": "0.3"})
    inputs = texts(300, "stall ")
    with cluster.client() as client:
        a, b = cluster.start_worker("sentiment"), cluster.start_worker("sentiment")
        ha, _ = cluster.hostname(a, "sentiment"), cluster.hostname(b, "sentiment")
        events = final_events(client)
        jobs = [client.submit("sentiment", t) for t in inputs]
        wait_until(lambda: cluster.inflight(ha) >= 16, 60, "A holds jobs")
        stop(a)
        wait_until(lambda: cluster.inflight(ha) == 0, 30, "B put A's jobs back")
        cont(a)
        time.sleep(kill_after_s)
        a_exit = a.poll()
        cluster.kill(a)
        settle(jobs, quiet_s=20)
        got = counts(jobs, events)
        print(f"\nfrozen worker, killed {kill_after_s} s after SIGCONT: {got}; A exit {a_exit}")
        dead_letter = cluster.redis().lrange("pipeq:dead-letter", 0, -1)
        assert got == {"accepted": 300, "answered once": 300, "answered twice": 0, "lost": 0}
        assert not dead_letter, dead_letter[:3]
        want = _local(sentiment.model)(inputs)  # one call: its batch of 300
        for job, top in zip(jobs, want, strict=True):
            assert_close(job.result(timeout=5), [top])
    assert b.poll() is None, "the survivor runs on"


def test_a_redis_stall_longer_than_dead_after_s_fences_no_live_worker(
    cluster_of: Any,  # noqa: F811
    sentiment: Deployment,  # noqa: F811
    final_events: Any,
) -> None:
    """Redis frozen (SIGSTOP) for longer than dead_after_s while two workers hold jobs:
    every worker was silent, so none judges another dead when Redis is back; both run
    on, and every job is answered once. Then a worker SIGKILLed: nothing lost."""
    cluster = cluster_of([sentiment], worker_env={**QUICK, "PIPEQ_FAULTS_FORWARD_S": "0.3"})
    inputs = texts(300, "redis stall ")
    with cluster.client() as client:
        a, b = cluster.start_worker("sentiment"), cluster.start_worker("sentiment")
        ha, hb = cluster.hostname(a, "sentiment"), cluster.hostname(b, "sentiment")
        events = final_events(client)
        jobs = [client.submit("sentiment", t) for t in inputs]
        wait_until(lambda: cluster.inflight(ha) >= 16 and cluster.inflight(hb) >= 16, 60, "held")
        assert cluster.redis_proc is not None
        stop(cluster.redis_proc)
        time.sleep(4.0)  # dead_after_s is 2.5
        cont(cluster.redis_proc)
        time.sleep(1.5)
        alive = (a.poll(), b.poll())
        cluster.kill(a)
        settle(jobs, quiet_s=20)
        got = counts(jobs, events)
        print(f"\nRedis stalled 4 s, then a worker SIGKILLed: {got}; exits before kill {alive}")
        assert got == {"accepted": 300, "answered once": 300, "answered twice": 0, "lost": 0}
        assert alive == (None, None), "a stall of Redis fenced a live worker"
    assert b.poll() is None


def stream_entries(r: redis.Redis, job_id: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(stream_key(job_id))
    ]


def test_a_frozen_generation_worker_that_comes_back_writes_nothing_into_its_old_streams(
    cluster_of: Any,  # noqa: F811
    deployments: dict[str, Any],
    final_events: Any,
) -> None:
    """Continuous batching: A is frozen mid-generation until B has reclaimed and restarted
    its jobs, then resumed, then SIGKILLed. Each stream holds whole attempts only: after
    its last `start`, exactly the result's text, then one `end`, the last entry; a reader
    gets the text without StreamRestarted; each job answered once."""
    d = deployments[GEN]
    cluster = cluster_of([d], worker_env={**QUICK, "PIPEQ_FAULTS_STEP_S": "0.05"})
    prompts = [(f"story {i}: the model and the queue", 120 if i >= 4 else 200) for i in range(8)]
    with cluster.client() as client:
        r = cluster.redis()

        def streams_of(host: str, jobs: list[Any]) -> bool:  # a stream of `host` under way
            for j in jobs:
                entries = stream_entries(r, j.id)
                if sum("t" in e for e in entries) > 5 and entries[0].get("start") == host:
                    return True
            return False

        # A streams its jobs and is frozen; B, started then, runs jobs of its own while it
        # takes A's back
        a = cluster.start_worker(GEN)
        ha = cluster.hostname(a, GEN)
        events = final_events(client)
        jobs = [client.submit(GEN, p, max_new_tokens=n, do_sample=False) for p, n in prompts[:4]]
        wait_until(lambda: streams_of(ha, jobs), 90, "A streams")
        stop(a)
        jobs += [client.submit(GEN, p, max_new_tokens=n, do_sample=False) for p, n in prompts[4:]]
        b = cluster.start_worker(GEN)
        cluster.hostname(b, GEN)
        wait_until(lambda: cluster.inflight(ha) == 0, 60, "B put A's jobs back")
        time.sleep(1.5)  # B restarts them
        cont(a)
        time.sleep(1.0)
        cluster.kill(a)
        settle(jobs, quiet_s=60)  # suspects run one at a time, after B's own jobs
        got = counts(jobs, events)
        mixed, restarted = 0, 0
        for job, (prompt, n) in zip(jobs, prompts, strict=True):
            entries = stream_entries(r, job.id)
            last = max(n for n, e in enumerate(entries) if "start" in e)
            text = "".join(e["t"] for e in entries[last:] if "t" in e)
            ends = [n for n, e in enumerate(entries) if "end" in e]
            result = job.result(timeout=5)[0]["generated_text"]
            # a suspect (its worker died while it ran) runs on the dynamic batcher: no pieces
            if text not in ("", result) or ends != [len(entries) - 1]:
                mixed += 1
            try:
                assert "".join(job.stream(timeout=10)) == result
            except Exception:
                restarted += 1
            want = expected_generation(d.model, prompt, n)
            assert result == want
        print(
            f"\nfrozen generation worker: {got}; streams mixed {mixed}, readers failed {restarted}"
        )
        assert got == {"accepted": 8, "answered once": 8, "answered twice": 0, "lost": 0}
        assert (mixed, restarted) == (0, 0)


def expected_generation(model: str, prompt: str, max_new_tokens: int) -> str:
    from .test_generation import _local

    out = _local(model)(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return str(out[0]["generated_text"])


def _fill(r: redis.Redis) -> int:
    """Write 1 MB values until Redis refuses (maxmemory, noeviction); the number written."""
    n = 0
    while True:
        try:
            r.set(f"filler:{n}", b"x" * 2**20)
        except redis.exceptions.OutOfMemoryError:
            return n
        n += 1


def test_a_full_redis_is_a_pause_and_every_accepted_job_is_answered_once(
    tmp_path: Any,
    sentiment: Deployment,  # noqa: F811
    final_events: Any,
) -> None:
    """maxmemory 20 MB, noeviction: Redis fills while two workers hold 40 jobs. Workers
    stay up, fail nothing; a producer gets BrokerRefusesWrites ("full") at once; `pipeq
    status` says Redis refuses writes; once memory is freed every accepted job is answered
    once, and new jobs run."""
    import pipeq
    from pipeq import _status

    refusal_type = getattr(pipeq, "BrokerRefusesWrites", pipeq.BrokerUnavailable)

    cluster = Cluster(
        tmp_path,
        {"sentiment": sentiment},
        redis_args=("--maxmemory", "20mb", "--maxmemory-policy", "noeviction"),
        worker_env={**QUICK, "PIPEQ_FAULTS_FORWARD_S": "0.3"},
    )
    try:
        with cluster.client(broker_timeout_s=10) as client:
            a, b = cluster.start_worker("sentiment"), cluster.start_worker("sentiment")
            cluster.hostname(a, "sentiment"), cluster.hostname(b, "sentiment")
            events = final_events(client)
            jobs = [client.submit("sentiment", t) for t in texts(40, "full ")]
            r = cluster.redis()
            filled = _fill(r)
            # full for good (a job's acknowledgement frees a little: not enough to matter)
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 2**21)
            t0 = time.monotonic()
            with pytest.raises(refusal_type) as refused:
                client.submit("sentiment", "one more")
            refused_after_s = time.monotonic() - t0
            said = getattr(_status, "write_refusal_of", lambda r: None)(r)
            time.sleep(6.0)  # longer than dead_after_s (2.5)
            alive = (a.poll(), b.poll())
            r.delete(*[f"filler:{n}" for n in range(filled)])
            r.config_set("maxmemory", "20mb")
            settle(jobs, quiet_s=30)
            got = counts(jobs, events)
            failed = sum(
                j.status() not in (JobState.SUCCEEDED, JobState.QUEUED, JobState.RUNNING)
                for j in jobs
            )
            print(
                f"\nfull Redis ({filled} MB filled): {got}; failed {failed}; producer refused "
                f"after {refused_after_s:.2f} s; worker exits while full {alive}"
            )
            assert alive == (None, None), cluster.logs()
            assert refused.type.__name__ == "BrokerRefusesWrites"
            assert refused.value.reason == "full"  # type: ignore[attr-defined]
            assert "full" in str(refused.value)
            assert said == "full"
            assert got == {"accepted": 40, "answered once": 40, "answered twice": 0, "lost": 0}
            assert failed == 0
            assert refused_after_s < 1.0
            assert _status.write_refusal_of(r) is None
            assert client.submit("sentiment", "after").result(timeout=30)
    finally:
        cluster.close()


def test_a_worker_that_starts_while_redis_is_full_waits_and_then_serves(
    tmp_path: Any,
    sentiment: Deployment,  # noqa: F811
) -> None:
    """A worker whose consumer starts after Redis filled (its queue declared: LLENs in a
    MULTI, which a full Redis refuses; here 3 s after its first heartbeat) waits for room
    instead of stopping ("Unrecoverable error", seen under load), and serves once memory
    is freed."""
    cluster = Cluster(
        tmp_path,
        {"sentiment": sentiment},
        redis_args=("--maxmemory", "20mb", "--maxmemory-policy", "noeviction"),
        worker_env={**QUICK, "PIPEQ_FAULTS_DECLARE_S": "3"},
    )
    try:
        r = cluster.redis()
        worker = cluster.start_worker("sentiment")
        cluster.hostname(worker, "sentiment")
        filled = _fill(r)
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 2**21)  # over it
        time.sleep(6.0)  # its consumer declares its queue meanwhile: refused
        alive = worker.poll()
        r.delete(*[f"filler:{n}" for n in range(filled)])
        r.config_set("maxmemory", "20mb")
        with cluster.client() as client:
            assert client.submit("sentiment", "room again").result(timeout=60)
        assert alive is None, cluster.logs()
        assert worker.poll() is None, cluster.logs()
    finally:
        cluster.close()


def test_a_primary_turned_replica_is_a_pause_and_every_accepted_job_is_answered_once(
    cluster_of: Any,  # noqa: F811
    sentiment: Deployment,  # noqa: F811
) -> None:
    """Redis becomes a replica (of a primary that is not there: a failover seen from the
    old primary) while a worker holds jobs: it answers READONLY to every write. The worker
    stays up and fails nothing; a producer gets BrokerRefusesWrites ("read-only") at once;
    once Redis is a primary again every job is answered."""
    import pipeq
    from pipeq import _status

    # (as the full-Redis test: so that it measures the code before BrokerRefusesWrites too)
    refusal_type = getattr(pipeq, "BrokerRefusesWrites", pipeq.BrokerUnavailable)
    cluster = cluster_of([sentiment], worker_env={**QUICK, "PIPEQ_FAULTS_FORWARD_S": "0.3"})
    with cluster.client() as client:
        worker = cluster.start_worker("sentiment")
        cluster.hostname(worker, "sentiment")
        jobs = [client.submit("sentiment", t) for t in texts(40, "replica ")]
        r = cluster.redis()
        r.execute_command("REPLICAOF", "127.0.0.1", "1")
        t0 = time.monotonic()
        with pytest.raises(refusal_type) as refused:
            client.submit("sentiment", "one more")
        refused_after_s = time.monotonic() - t0
        said = getattr(_status, "write_refusal_of", lambda r: None)(r)
        time.sleep(5.0)  # longer than dead_after_s (2.5)
        alive = worker.poll()
        r.execute_command("REPLICAOF", "NO", "ONE")
        settle(jobs, quiet_s=30)
        states = Counter(j.status().value for j in jobs)
        print(
            f"\nRedis a replica for 5 s: {dict(states)}; producer refused after "
            f"{refused_after_s:.2f} s ({type(refused.value).__name__}); worker exit {alive}"
        )
        assert alive is None, cluster.logs()
        assert states == {"succeeded": 40}
        assert refused.type.__name__ == "BrokerRefusesWrites"
        assert refused.value.reason == "read-only"  # type: ignore[attr-defined]
        assert refused_after_s < 1.0
        assert said == "read-only"
        assert _status.write_refusal_of(r) is None
        assert client.submit("sentiment", "after").result(timeout=30)


def test_a_redis_that_cannot_save_refuses_writes_and_says_why(tmp_path: Any) -> None:
    """MISCONF: a failed save (its directory gone) with stop-writes-on-bgsave-error makes
    Redis refuse every write; a producer's call raises BrokerRefusesWrites ("not
    persisting") at once, the status probe says so, and both clear once Redis takes writes."""
    import shutil

    from pipeq import BrokerRefusesWrites
    from pipeq._stack import start_redis, stop_process
    from pipeq._status import write_refusal_of

    from .conftest import free_port

    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    proc = start_redis(port, data)
    try:
        r = redis.Redis(port=port)
        r.config_set("stop-writes-on-bgsave-error", "yes")
        r.config_set("save", "3600 1")  # it stops writes only where saves are configured
        shutil.rmtree(data)
        r.bgsave()
        wait_until(
            lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err", 10, "save fails"
        )
        with Client(f"redis://127.0.0.1:{port}/0") as client:
            t0 = time.monotonic()
            with pytest.raises(BrokerRefusesWrites, match="not persisting") as refused:
                client.call(client.ledger.redis.set, "k", "v")
            assert time.monotonic() - t0 < 1.0
            assert refused.value.reason == "not persisting"
            assert write_refusal_of(r) == "not persisting"
            # the operator's remedy (its directory cannot come back: Redis runs in the old one)
            r.config_set("stop-writes-on-bgsave-error", "no")
            assert write_refusal_of(r) is None
            client.call(client.ledger.redis.set, "k", "v")
    finally:
        stop_process(proc)
