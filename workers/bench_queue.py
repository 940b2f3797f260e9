"""`pipeq bench --queue`: what the queue itself costs, from Redis' own counters.

A tiny classifier (the course's sentiment-analysis checkpoint at its tiny size, so the
forward pass costs little next to the queue) on a Redis of the benchmark's own, in one
run, `--rounds` times each:

  1. a burst of `--jobs` single-item jobs (`Client.submit`, one job a call, from
     `--producers` threads) through 1 worker, then through 2 workers of the same
     deployment: jobs/s end to end (first submit to last result), and Redis' own cost a
     job: commands (`INFO commandstats`: every command, those run inside Lua scripts
     included) and Redis CPU µs (`INFO cpu`, user + system);
  2. connections: each worker's TCP connections to Redis (psutil), after the burst;
  3. an idle worker (nothing queued, nothing held) over `--idle-s`: what it sends Redis
     a second (MONITOR: round trips), the commands Redis runs for it a second (its
     scripts' inner ones included), and its CPU share of one core.

Medians of the rounds are printed; `--json` writes every figure. Redis' counters count
every client: the producer's commands are in the per-job figures (they are the queue's
cost too), and the benchmark's own reads of `INFO` are taken out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from statistics import median_high as _median
from typing import Any

import redis

from pipeq import Client
from pipeq._config import Deployment
from pipeq._ledger import META_PREFIX
from pipeq.worker.bench import bench_inputs, with_overrides

__all__ = ["priority_main", "queue_main"]

CHECKPOINT = "distilbert-base-uncased-finetuned-sst-2-english"


def _stats(r: redis.Redis) -> dict[str, float]:
    """Redis' counters now: commands (script-internal ones included), round trips, CPU s."""
    info = r.info("all")
    calls = {k[8:]: v["calls"] for k, v in info.items() if k.startswith("cmdstat_")}
    return {
        "commands": sum(calls.values()),
        "cpu_s": info["used_cpu_user"] + info["used_cpu_sys"],
        **{f"cmd:{k}": v for k, v in calls.items()},
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    # the INFO that read `after` is one command of the benchmark's own
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    out["commands"] -= 1
    out["cmd:info"] = out.get("cmd:info", 1) - 1
    return out


def _connections(pids: list[int], port: int) -> list[int]:
    """Each process's TCP connections to Redis' port."""
    import psutil

    counts = []
    for pid in pids:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        counts.append(sum(1 for c in conns if c.raddr and c.raddr.port == port))
    return counts


def _cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _burst(
    client: Client, name: str, inputs: list[Any], producers: int, workers: list[int]
) -> dict[str, Any]:
    """Submit every input as its own job, from `producers` threads; wait for each result.
    `workers`: the worker processes' pids, whose CPU time is counted."""
    r = client.redis
    jobs: list[Any] = [None] * len(inputs)

    def send(start: int) -> None:
        for i in range(start, len(inputs), producers):
            jobs[i] = client.submit(name, inputs[i])

    before = _stats(r)
    cpu0, me0 = _cpu_s(workers), time.process_time()
    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        job.result(timeout=600)
    elapsed = time.perf_counter() - started
    cpu1, me1 = _cpu_s(workers), time.process_time()
    cost = _delta(before, _stats(r))
    for job in jobs:
        job.forget()
    n = len(inputs)
    return {
        "jobs": n,
        "seconds": elapsed,
        "jobs_per_s": n / elapsed,
        "commands_per_job": cost["commands"] / n,
        "redis_cpu_us_per_job": 1e6 * cost["cpu_s"] / n,
        "worker_cpu_us_per_job": 1e6 * (cpu1 - cpu0) / n,
        "producer_cpu_us_per_job": 1e6 * (me1 - me0) / n,
        "commands_per_job_by_name": {
            k[4:]: round(v / n, 2)
            for k, v in sorted(cost.items(), key=lambda kv: -kv[1])
            if k.startswith("cmd:") and v
        },
    }


def _round_trips(r: redis.Redis, seconds: float) -> dict[str, float]:
    """What clients sent Redis over `seconds` (MONITOR, which lists a script's own
    commands apart): commands a second by name, scripts' inner ones left out."""
    sent: dict[str, int] = {}
    done = threading.Event()
    with r.monitor() as m:  # type: ignore[no-untyped-call]
        threading.Timer(seconds, done.set).start()
        while not done.is_set():
            entry = m.next_command()  # an idle worker sends something every second or so
            if entry.get("client_type") != "lua":
                name = entry["command"].split()[0].lower().strip('"')
                sent[name] = sent.get(name, 0) + 1
    return {k: v / seconds for k, v in sorted(sent.items())}


def _idle(client: Client, pid: int, seconds: float) -> dict[str, Any]:
    """One worker with nothing to do: what it sends Redis a second (round trips), the
    commands Redis runs for it (its scripts' included), its CPU share of a core."""
    import psutil

    r = client.redis
    proc = psutil.Process(pid)
    time.sleep(3)  # whatever the last burst left settles
    before, cpu0, t0 = _stats(r), proc.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, cpu1, t1 = _stats(r), proc.cpu_times(), time.monotonic()
    cost = _delta(before, after)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    sent = _round_trips(r, seconds)
    return {
        "commands_per_s": cost["commands"] / (t1 - t0),
        "commands_per_s_by_name": {
            k[4:]: round(v / (t1 - t0), 2) for k, v in cost.items() if k.startswith("cmd:") and v
        },
        "round_trips_per_s": sum(sent.values()),
        "round_trips_per_s_by_name": {k: round(v, 2) for k, v in sent.items()},
        "worker_cpu_percent": 100 * cpu / (t1 - t0),
    }


def _start_second_worker(stack: Any, config: Path, name: str) -> subprocess.Popen[bytes]:
    with (stack.log_dir / "second-worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeq", "worker", name, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PIPEQ_REDIS_URL": stack.url},
            start_new_session=True,
        )


def _wait_workers(client: Client, name: str, n: int) -> None:
    """Until exactly `n` workers of the deployment beat (a stopped one withdraws at once)."""
    deadline = time.monotonic() + 120
    while len(client.registry.live_workers(name)) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: not {n} live workers after 120 s")
        time.sleep(0.2)


def _tiny_deployment(args: argparse.Namespace) -> Deployment:
    """The tiny classifier's deployment, with the run's overrides (`with_overrides`)."""
    from pipeq.worker import tiny_models

    path = tiny_models.build(CHECKPOINT, Path(args.models_dir).resolve())
    d = Deployment(name="queue", task=tiny_models.TINY_MODELS[CHECKPOINT], model=str(path))
    return with_overrides(d, args)


@contextlib.contextmanager
def _one_worker(d: Deployment, prefix: str) -> Iterator[tuple[Any, Path]]:
    """A Redis of its own and one worker of `d` on it, ready: (the stack, its config)."""
    from pipeq._stack import Stack, exit_on_sigterm, free_port_from
    from pipeq.worker.demo import write_config

    exit_on_sigterm()
    port = free_port_from(6500)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        config = write_config({d.name: d}, Path(tmp) / "bench.toml")
        stack = Stack(
            {d.name: d}, str(config), redis_port=port, flower_port=None, exporter_port=None
        )
        try:
            stack.start()
            print(f"worker logs: {stack.log_dir}", flush=True)
            if any(v != "ready" for v in stack.wait_ready().values()):
                raise RuntimeError(f"the worker did not start: see {stack.log_dir}")
            yield stack, config
        finally:
            stack.stop()


def queue_main(args: argparse.Namespace) -> int:
    d = _tiny_deployment(args)
    inputs = bench_inputs(d.task, args.jobs)
    runs: dict[str, list[Any]] = {"one_worker": [], "two_workers": []}
    report: dict[str, Any] = {
        "deployment": dataclasses.asdict(d),
        "jobs": args.jobs,
        "producers": args.producers,
        "cpu_threads": os.cpu_count(),
    }
    with _one_worker(d, "pipeq-bench-queue-") as (stack, config):
        port = stack.redis_port
        second = None
        try:
            first = stack.workers[d.name].pid
            with Client(stack.url) as client:
                print("warm-up ...", flush=True)
                _burst(client, d.name, inputs[:200], args.producers, [first])
                for r in range(args.rounds):
                    print(f"round {r + 1}/{args.rounds}: one worker ...", flush=True)
                    if second is not None:
                        second.terminate()
                        second.wait(30)
                        second = None
                        _wait_workers(client, d.name, 1)
                    runs["one_worker"].append(
                        _burst(client, d.name, inputs, args.producers, [first])
                    )
                    if r == 0:
                        report["connections_per_worker"] = _connections([first], port)
                        report["idle"] = _idle(client, first, args.idle_s)
                    print(f"round {r + 1}/{args.rounds}: two workers ...", flush=True)
                    second = _start_second_worker(stack, config, d.name)
                    _wait_workers(client, d.name, 2)
                    _burst(
                        client, d.name, inputs[:50], args.producers, [first]
                    )  # the second one warm
                    pids = [first, second.pid]
                    runs["two_workers"].append(_burst(client, d.name, inputs, args.producers, pids))
                    if r == 0:
                        report["connections_per_worker_two"] = _connections(
                            [first, second.pid], port
                        )
        finally:
            if second is not None:
                second.terminate()
                second.wait(30)
    report["runs"] = runs
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _print(r: dict[str, Any]) -> None:
    print(
        f"\nqueue benchmark: {r['jobs']} single-item jobs a burst, {r['producers']} producer "
        f"threads, {len(r['runs']['one_worker'])} rounds (medians), {r['cpu_threads']} CPUs"
    )
    cols = (
        "jobs_per_s",
        "commands_per_job",
        "redis_cpu_us_per_job",
        "worker_cpu_us_per_job",
        "producer_cpu_us_per_job",
    )
    print(f"{'':14}" + "".join(f"{c:>{len(c) + 2}}" for c in cols))
    for name, rounds in r["runs"].items():
        print(
            f"{name:14}"
            + "".join(f"{_median([x[c] for x in rounds]):>{len(c) + 2}.1f}" for c in cols)
        )
    by_name = r["runs"]["one_worker"][-1]["commands_per_job_by_name"]
    print(
        "commands a job, one worker, by name: " + ", ".join(f"{k} {v}" for k, v in by_name.items())
    )
    print(
        f"connections to Redis per worker: {r['connections_per_worker']} (one worker), "
        f"{r['connections_per_worker_two']} (two)"
    )
    idle = r["idle"]
    print(
        f"idle worker: sends {idle['round_trips_per_s']:.2f} commands/s "
        f"{idle['round_trips_per_s_by_name']}; Redis runs {idle['commands_per_s']:.2f}/s "
        f"for it {idle['commands_per_s_by_name']}; "
        f"{idle['worker_cpu_percent']:.2f}% of a core"
    )


def _backlog(
    client: Client, name: str, inputs: list[Any], producers: int, high_every_s: float | None
) -> dict[str, Any]:
    """`inputs` as low jobs from `producers` threads, until each is answered; with
    `high_every_s`, one high job after another meanwhile (each submitted `high_every_s`
    after the last one's result), each one's wait (submit to result) recorded."""
    lows: list[Any] = [None] * len(inputs)
    waits: list[float] = []  # the high jobs': submit to forward pass
    answers: list[float] = []  # and submit to result
    done = threading.Event()

    def send(start: int) -> None:
        for i in range(start, len(inputs), producers):
            lows[i] = client.submit(name, inputs[i], priority="low")

    def highs() -> None:
        """One high job at a time: its queue wait (submit to the STARTED its admission
        publishes, as the job's forward pass begins) and its answer's."""
        n = 0
        while not done.wait(high_every_s):
            prepared = client.prepare(name, f"urgent {n}", priority="high")
            job_id = str(uuid.uuid4())
            with client.redis.pubsub() as states:
                states.subscribe(META_PREFIX + job_id)
                states.get_message(timeout=5)  # the subscription's confirmation
                t0 = time.perf_counter()
                job = client.send(prepared, job_id)
                while True:
                    state = states.get_message(timeout=60)
                    if state is None or b"STARTED" in state["data"]:
                        break
                started = time.perf_counter()
            job.result(timeout=600)
            waits.append(started - t0)
            answers.append(time.perf_counter() - t0)
            n += 1

    stats0 = _batch_stats(client, name, settle_s=3.0)
    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(k,)) for k in range(producers)]
    if high_every_s is not None:
        threads.append(threading.Thread(target=highs))
    for t in threads:
        t.start()
    for t in threads[:producers]:
        t.join()
    for job in lows:
        job.result(timeout=600)
    elapsed = time.perf_counter() - started
    done.set()
    for t in threads[producers:]:
        t.join()
    stats1 = _batch_stats(client, name, settle_s=3.0)
    batches = stats1["batches"] - stats0["batches"]
    for job in lows:
        job.forget()
    waits.sort()
    answers.sort()

    def p(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "low_jobs": len(inputs),
        "seconds": elapsed,
        "low_jobs_per_s": len(inputs) / elapsed,
        "batches": batches,
        "batch_cycle_s": elapsed / batches if batches else None,
        "forward_s_per_batch": (stats1["forward_s"] - stats0["forward_s"]) / batches
        if batches
        else None,
        "high_jobs": len(waits),
        "high_wait_s": waits,
        "high_wait_p50_s": p(waits, 0.5),
        "high_wait_p95_s": p(waits, 0.95),
        "high_answer_p50_s": p(answers, 0.5),
        "high_answer_p95_s": p(answers, 0.95),
    }


def _batch_stats(client: Client, name: str, settle_s: float = 0.0) -> dict[str, float]:
    """The deployment's batches and forward seconds so far, as its workers' heartbeats
    report them, after `settle_s` (a heartbeat every 2 s reports what ran before it)."""
    time.sleep(settle_s)
    stats = client.registry.stats(name).values()
    return {
        "batches": float(sum(s.get("batches", 0) for s in stats)),
        "forward_s": float(sum(s.get("forward_s", 0.0) for s in stats)),
    }


def priority_main(args: argparse.Namespace) -> int:
    """`pipeq bench --priority`: a backlog of `--jobs` low jobs through one worker, alone
    and with high jobs submitted one after another during it, `--rounds` times each,
    alternately: the backlog's jobs/s both ways, and each high job's wait (submit to
    result) against the batch cycle (the backlog's seconds per batch)."""
    d = _tiny_deployment(args)
    inputs = bench_inputs(d.task, args.jobs)
    runs: dict[str, list[Any]] = {"backlog_alone": [], "backlog_and_high_jobs": []}
    with _one_worker(d, "pipeq-bench-priority-") as (stack, _), Client(stack.url) as client:
        print("warm-up ...", flush=True)
        _backlog(client, d.name, inputs[:200], args.producers, None)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", flush=True)
            runs["backlog_alone"].append(_backlog(client, d.name, inputs, args.producers, None))
            runs["backlog_and_high_jobs"].append(
                _backlog(client, d.name, inputs, args.producers, 0.05)
            )
    report = {"deployment": dataclasses.asdict(d), "jobs": args.jobs, "runs": runs}
    print(
        f"\npriority benchmark: a backlog of {args.jobs} low jobs, one worker, "
        f"max_batch_size {d.max_batch_size}, {args.rounds} rounds"
    )
    for alone, mixed in zip(runs["backlog_alone"], runs["backlog_and_high_jobs"], strict=True):
        cycle = mixed["batch_cycle_s"] or float("nan")
        print(
            f"backlog alone {alone['low_jobs_per_s']:.0f} jobs/s; with high jobs "
            f"{mixed['low_jobs_per_s']:.0f} jobs/s "
            f"({100 * (mixed['low_jobs_per_s'] / alone['low_jobs_per_s'] - 1):+.1f}%); "
            f"{mixed['high_jobs']} high jobs waited for their forward pass p50 "
            f"{mixed['high_wait_p50_s'] * 1000:.0f} ms, p95 {mixed['high_wait_p95_s'] * 1000:.0f}"
            f" ms = {mixed['high_wait_p95_s'] / cycle:.2f} batch cycles of {cycle * 1000:.0f} ms "
            f"(forward {mixed['forward_s_per_batch'] * 1000:.0f} ms a batch); their answers "
            f"p50 {mixed['high_answer_p50_s'] * 1000:.0f} ms, "
            f"p95 {mixed['high_answer_p95_s'] * 1000:.0f} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
