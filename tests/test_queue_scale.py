"""The queue at scale (docs/scale.md): what a worker costs Redis, whatever it holds.

Real redis-server and worker processes; connections counted from the worker process's
own sockets (psutil), not from what the code says it opens.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeq._ledger import meta_json

from .cluster import Cluster, renamed

pytestmark = pytest.mark.timeout(180)


def _connections_to(pid: int, port: int) -> int:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def test_a_worker_holding_a_thousand_jobs_keeps_eight_connections(
    tmp_path: Path, deployments: dict[str, Any]
) -> None:
    """max_batch_size 256 gives 1,280 job threads (four batches held, and room for one of
    high jobs); before, each thread storing a result held a connection of its own (about
    200 after a burst)."""
    # the worker's --concurrency: (HELD_BATCHES + HIGH_ROOM_BATCHES) x max_batch_size
    big = renamed(deployments["sentiment-analysis"], "big", max_batch_size=256)
    cluster = Cluster(tmp_path, {"big": big})
    try:
        first = cluster.start_worker("big")  # announces the deployment, then goes
        cluster.hostname(first, "big")
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        with cluster.client(no_worker_grace_s=600) as client:
            # queued while no worker runs: the next one takes as many as it may hold at once
            jobs = [client.submit("big", f"text number {i} " * (1 + i % 7)) for i in range(700)]
            proc = cluster.start_worker("big")
            hostname = cluster.hostname(proc, "big")
            held, peak = 0, 0
            for job in jobs:
                peak = max(peak, _connections_to(proc.pid, cluster.port))
                held = max(held, cluster.inflight(hostname))
                job.result(timeout=120)
            after = _connections_to(proc.pid, cluster.port)
        assert held > 256, f"{held} jobs held at most: the premise (more than a batch) failed"
        assert 0 < after <= 8, f"{after} connections after 700 jobs"
        assert peak <= 8, f"{peak} connections at the peak"
    finally:
        cluster.close()


def _stored_by_group(n: int, run: Any) -> tuple[list[Any], list[int]]:
    """`n` threads each store a job's SUCCESS through one `StoreGroup`; the first group
    is held in `run` until the other `n - 1` stores wait behind it. (replies, group sizes)"""
    import threading
    import time

    from pipeq._app import StoreGroup

    group = StoreGroup()
    sizes: list[int] = []
    first = threading.Event()

    def held(keys: list[str], args: list[Any]) -> Any:
        sizes.append(len(keys))
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 30
            while len(group._pending) < n - 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        return run(keys, args)

    replies: list[Any] = [None] * n

    def store(i: int) -> None:
        meta = meta_json(f"{PREFIX}{i}", "SUCCESS", [i], done=True)
        args = [meta, 600, f"{PREFIX}{i}", 1, "succeeded"]
        try:
            replies[i] = group.store(f"celery-task-meta-{PREFIX}{i}", args, held)
        except Exception as e:  # the group's error, raised in each of its threads
            replies[i] = e

    threads = [threading.Thread(target=store, args=(i,)) for i in range(n)]
    threads[0].start()
    first.wait(10)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    return replies, sizes


PREFIX = "store-group-"


def test_results_that_end_together_are_stored_in_one_script_each_with_its_own_reply(
    redis_url: str,
) -> None:
    """Group commit (`_app.StoreGroup`, `_ledger` store): 64 results stored while one is on
    its way go in one script; each is stored, published and counted once; a result stored
    again keeps the first (a duplicate delivery's); a fenced worker's group stores none."""
    import redis

    from pipeq._ledger import FENCED, Ledger

    r = redis.Redis.from_url(redis_url)
    ledger = Ledger(r)
    n, deployment = 64, "store-group"
    for i in range(n):
        r.set(f"pipeq:job:{PREFIX}{i}", deployment, ex=600)
        r.zadd(f"pipeq:running:{deployment}", {f"{PREFIX}{i}": 1.0})
    r.delete(f"pipeq:metrics:{deployment}")

    def run(keys: list[str], args: list[Any]) -> Any:
        return ledger.script("store")(keys, ["", deployment, *args])

    replies, sizes = _stored_by_group(n, run)
    assert replies == [1] * n
    assert sizes == [1, n - 1], "the stores waiting behind the first went in one script"
    for i in range(n):
        assert json.loads(r.get(f"celery-task-meta-{PREFIX}{i}"))["result"] == [i]
    assert r.zcard(f"pipeq:running:{deployment}") == 0
    assert int(r.hget(f"pipeq:metrics:{deployment}", "jobs_total:succeeded")) == n

    # stored again (a second delivery's result): each keeps its first, none counted again
    again, _ = _stored_by_group(n, run)
    assert again == [0] * n
    assert int(r.hget(f"pipeq:metrics:{deployment}", "jobs_total:succeeded")) == n

    # a fenced worker: every store of the group answers FENCED and writes nothing
    r.delete(*(f"celery-task-meta-{PREFIX}{i}" for i in range(n)))
    r.set("pipeq:fenced:w1", 1, ex=600)

    def fenced(keys: list[str], args: list[Any]) -> Any:
        return ledger.script("store")(keys, ["w1", deployment, *args])

    out, _ = _stored_by_group(n, fenced)
    assert out == [FENCED] * n
    assert not any(r.exists(f"celery-task-meta-{PREFIX}{i}") for i in range(n))


def test_an_error_reaching_redis_is_raised_in_each_thread_of_its_group_and_the_next_runs() -> None:
    calls = []

    def failing_once(keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys))
        if len(calls) == 2:
            raise ConnectionError("Redis went away")
        return [1] * len(keys)

    replies, sizes = _stored_by_group(16, failing_once)
    assert sizes == [1, 15]
    assert replies[0] == 1
    assert all(isinstance(e, ConnectionError) for e in replies[1:]), replies
    replies, _ = _stored_by_group(4, lambda keys, args: [1] * len(keys))
    assert replies == [1] * 4, "a failed group leaves no store waiting behind it"


#: the take script's loop as it was, moving one message a command (LMOVE): the reference
#: the batched moves (LRANGE, LTRIM, LPUSH) must match, message for message
_ONE_BY_ONE = """
for i, queue in ipairs({KEYS[4], KEYS[1], KEYS[5]}) do
  while #taken < n and (i == 1 or rest > 0) do
    local raw = redis.call('LMOVE', queue, KEYS[2], 'RIGHT', 'LEFT')
    if not raw then break end
    if raw == 'pipeq:doorbell' then
      redis.call('LPOP', KEYS[2])
    else
      taken[#taken + 1] = raw
      if i > 1 then rest = rest - 1 end
    end
  end
end
"""


def _take_one_by_one() -> str:
    """The take script with its loop replaced by the one-by-one reference."""
    from pipeq._ledger import _TAKE

    head, found, rest = _TAKE.partition("-- a run of messages moves")
    loop_end = rest.index("-- high or low ones left behind")
    assert found and loop_end > 0, "the take script's loop is not where the test expects it"
    return head + _ONE_BY_ONE + rest[loop_end:]


_messages = st.lists(
    st.one_of(st.sampled_from(["pipeq:doorbell"]), st.text("abc", min_size=1, max_size=3)),
    max_size=12,
)


@given(
    lists=st.tuples(_messages, _messages, _messages, _messages),
    n=st.integers(0, 15),
    rest=st.integers(0, 15),
    first=st.sampled_from(["bell", "main", "high"]),
    fenced=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_a_take_moves_what_one_message_at_a_time_would(
    redis_url: str, lists: tuple[list[str], ...], n: int, rest: int, first: str, fenced: bool
) -> None:
    """The take script (`_ledger` take) against the one-by-one reference, on the same
    queue, high, low and in-flight lists (doorbells among them): the same reply, the same
    lists after."""
    import redis

    from pipeq._ledger import Ledger

    queue, inflight, high, low = lists
    # what BLMOVE took is at the head of the worker's list: a doorbell, or a message
    lists = (queue, ["pipeq:doorbell" if first == "bell" else "blmoved", *inflight], high, low)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    reference = r.register_script(_take_one_by_one())
    results = []
    for name, script in (("batched", Ledger(r).script("take")), ("one-by-one", reference)):
        keys = [f"take-{name}:{k}" for k in ("queue", "inflight", "fence", "high", "low")]
        r.delete(*keys)
        for key, items in zip((keys[0], keys[1], keys[3], keys[4]), lists, strict=True):
            if items:
                r.rpush(key, *items)
        if fenced:
            r.set(keys[2], 1)
        reply = script(keys, [n, first, rest])
        results.append((reply, [r.lrange(k, 0, -1) for k in keys if k != keys[2]]))
    assert results[0] == results[1]


def test_a_send_tried_again_after_its_reply_was_lost_pushes_one_message(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enqueue runs in Redis and its reply is lost with the connection: Celery sends
    again (`task_publish_retry_policy`). The job is in the queue once, not twice (two
    workers would each have run a copy: a breaking session saw ~1 job in 1,200 computed
    twice while connections were being killed)."""
    import redis

    from pipeq._ledger import Ledger, queue_for

    from .conftest import is_sentiment, paused

    real = Ledger.enqueue
    lost: list[str] = []

    def enqueue(self: Ledger, *args: Any, **kwargs: Any) -> int:
        out = real(self, *args, **kwargs)
        if not lost:
            lost.append(args[1])
            raise redis.ConnectionError("the enqueue's reply was lost (injected)")
        return out

    with paused(client, "sentiment-analysis"):
        monkeypatch.setattr(Ledger, "enqueue", enqueue)
        job = client.submit("sentiment-analysis", "sent twice")
        monkeypatch.undo()
        assert lost == [job.id], "the fault did not happen"
        waiting = client.redis.lrange(queue_for("sentiment-analysis"), 0, -1)
        assert sum(job.id.encode() in m for m in waiting) == 1
    assert is_sentiment(job.result(timeout=60))
