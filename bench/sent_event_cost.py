"""What a job's Flower row from submit costs a producer: Client.submit with and without
Celery's task-sent event, side by side in one run.

  none     no task-sent event (pipeq before: Flower learnt of a job when a worker took it)
  pipeq    the event travels with the enqueue script, which publishes it (today's pipeq)
  celery   Celery's own `task_send_sent_event=True` (a second command and kombu's publish)

One real redis-server, one tiny sentiment worker that does not consume (so jobs only
queue), and a pattern subscriber on Celery's event channel standing in for Flower.
Each round submits --jobs jobs per contender, one contender at a time, in turn; printed:
median µs per submit (wall) and producer CPU µs per submit, and Redis' CPU per job.

    .venv/bin/python bench/sent_event_cost.py --jobs 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import redis

from pipeq import Client, _app
from pipeq._stack import Stack, free_port_from, start_redis, stop_process
from pipeq.worker.demo import demo_config, write_config

DEPLOYMENT = "sentiment-analysis"


def _redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def submit_burst(contender: str, url: str, jobs: int, r: redis.Redis) -> tuple[float, float, float]:
    """(µs per submit, producer CPU µs per submit, Redis CPU µs per job)."""
    client = Client(url)
    own = _app._Channel.__dict__["_sent_event"]  # the staticmethod itself
    if contender != "pipeq":
        _app._Channel._sent_event = staticmethod(lambda queue, headers: "")  # type: ignore[method-assign]
    client.app.conf.task_send_sent_event = contender == "celery"
    try:
        client.submit(DEPLOYMENT, "warm up")
        redis0, cpu0, wall0 = _redis_cpu_s(r), time.process_time(), time.perf_counter()
        for i in range(jobs):
            client.submit(DEPLOYMENT, f"text number {i}")
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return wall / jobs * 1e6, cpu / jobs * 1e6, (_redis_cpu_s(r) - redis0) / jobs * 1e6
    finally:
        _app._Channel._sent_event = own  # type: ignore[method-assign]
        client.close()


def flower_stand_in(port: int, stop: Any, seen: Any) -> None:
    """Flower's subscription to Celery's events, in a process of its own."""
    sub = redis.Redis(port=port).pubsub()
    sub.psubscribe("/0.celeryev/*")
    while not stop.is_set():
        if sub.get_message(timeout=0.2):
            with seen.get_lock():
                seen.value += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sent-event-"))
    port = free_port_from(16400)
    redis_proc = start_redis(port, work)
    url = f"redis://127.0.0.1:{port}/0"
    deployments = {DEPLOYMENT: demo_config(Path(".cache/pipeq-models"))[DEPLOYMENT]}
    config = write_config(deployments, work / "bench.toml")
    stack = Stack(deployments, str(config), redis_url=url, flower_port=None, exporter_port=None)
    r = redis.Redis(port=port)
    stop = multiprocessing.Event()
    seen = multiprocessing.Value("i", 0)
    flower = multiprocessing.Process(target=flower_stand_in, args=(port, stop, seen))
    flower.start()
    try:
        stack.start()
        assert stack.wait_ready(240) == {DEPLOYMENT: "ready"}
        with Client(url) as client:  # the worker stops consuming: jobs only queue
            workers = client.registry.live_workers(DEPLOYMENT)
            client.app.control.cancel_consumer(
                _app.queue_for(DEPLOYMENT), destination=workers, reply=True
            )
        results: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(args.rounds):
            for contender in ("none", "pipeq", "celery"):
                before = seen.value
                results.setdefault(contender, []).append(submit_burst(contender, url, args.jobs, r))
                time.sleep(0.5)
                print(f"  {contender:7} events seen by the subscriber: {seen.value - before}")
        print(f"{args.jobs} submits per contender and round, {args.rounds} rounds (medians):")
        print("             µs/submit   producer CPU µs/submit   Redis CPU µs/job")
        for contender, rows in results.items():
            wall, cpu, rcpu = (median(x[i] for x in rows) for i in range(3))
            print(f"  {contender:7} {wall:12.1f} {cpu:20.1f} {rcpu:20.1f}")
        for contender in ("pipeq", "celery"):
            ratio = [x[0] / y[0] for x, y in zip(results[contender], results["none"], strict=True)]
            print(f"  {contender} / none, per round: {[round(x, 2) for x in ratio]}")
    finally:
        stop.set()
        flower.join(5)
        stack.stop()
        stop_process(redis_proc)


if __name__ == "__main__":
    main()
