"""What one large feature-extraction request costs a worker, Redis and a producer.

One real redis-server and one feature-extraction worker serving the demo's real MiniLM
(384 values a token); texts of --chars characters (about 420 tokens at 1,900).

  job    one `submit` of --items texts: the outcome, its time, the worker's RSS before
         and at its peak (sampled every 0.1 s; the worker is killed past --rss-cap-gb,
         as the OOM killer would); Redis' memory after
  map    `Client.map` of --items texts in this process: its time, the values returned,
         this process's peak RSS (ru_maxrss) against the size of the returned lists,
         and Redis' peak memory (sampled) and what is left after it

    .venv/bin/python bench/result_memory.py job --items 300 --chars 1900
    .venv/bin/python bench/result_memory.py map --items 2000 --chars 1900
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from pipeq import Client
from pipeq._stack import Stack, free_port_from, start_redis, stop_process
from pipeq.worker.demo import demo_config, write_config

DEPLOYMENT = "feature-extraction"
WORDS = "the quick brown fox jumps over the lazy dog while a model reads every word".split()


def texts(items: int, chars: int) -> list[str]:
    out = []
    for i in range(items):
        words, n = [str(i)], len(str(i))
        while n < chars:
            w = WORDS[(i + len(words)) % len(WORDS)]
            words.append(w)
            n += len(w) + 1
        out.append(" ".join(words)[:chars])
    return out


class Sampler(threading.Thread):
    """The peak of `read()` every 0.1 s until stopped; `on_sample` may act on each."""

    def __init__(self, read: Any, on_sample: Any = None) -> None:
        super().__init__(daemon=True)
        self.read, self.on_sample = read, on_sample
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                value = float(self.read())
            except (psutil.Error, redis.RedisError):
                return
            self.peak = max(self.peak, value)
            if self.on_sample:
                self.on_sample(value)
            time.sleep(0.1)

    def stop(self) -> float:
        self.done.set()
        self.join(5)
        return self.peak


def rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return int(proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(True)))


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS since the last reset (bytes; 0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kb) * 1024


def run_job(url: str, r: redis.Redis, worker_pid: int, args: argparse.Namespace) -> None:
    inputs = texts(args.items, args.chars)
    cap = args.rss_cap_gb * 2**30

    def guard(value: float) -> None:
        if value > cap:
            psutil.Process(worker_pid).kill()

    with Client(url) as client:
        client.submit(DEPLOYMENT, "warm up").result(timeout=120)
        before = rss(worker_pid)
        Path(f"/proc/{worker_pid}/clear_refs").write_text("5")  # VmHWM := RSS now
        sampler = Sampler(lambda: rss(worker_pid), guard)
        sampler.start()
        started = time.monotonic()
        job = client.submit(DEPLOYMENT, inputs)
        try:
            result = job.result(timeout=args.timeout)
            outcome = f"{len(result)} results"
        except Exception as e:
            outcome = f"{type(e).__name__}: {str(e)[:300]}"
        took = time.monotonic() - started
        peak = sampler.stop()
        status = job.status()
        hwm = _vm_hwm(worker_pid)
    print(f"job of {args.items} texts of {args.chars} chars: {outcome}")
    print(f"  after {took:.1f} s, status {status}; worker alive: {psutil.pid_exists(worker_pid)}")
    print(
        f"  worker RSS {before / 2**20:,.0f} MB before, peak {peak / 2**20:,.0f} MB sampled, "
        f"{hwm / 2**20:,.0f} MB (VmHWM)"
    )
    print(f"  Redis used_memory after: {r.info('memory')['used_memory'] / 2**20:,.1f} MB")


def run_map(url: str, r: redis.Redis, args: argparse.Namespace) -> None:
    inputs = texts(args.items, args.chars)
    base = r.info("memory")["used_memory"]
    sampler = Sampler(lambda: r.info("memory")["used_memory"])
    with Client(url) as client:
        client.submit(DEPLOYMENT, "warm up").result(timeout=120)
        own_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler.start()
        started = time.monotonic()
        results = client.map(DEPLOYMENT, inputs, progress=False)
        took = time.monotonic() - started
        peak = sampler.stop()
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = sum(len(t) for res in results for t in res[0])
    rows = sum(len(res[0]) for res in results)
    # the returned lists themselves: a float object (24 B, in a 32 B block of Python's
    # allocator) and its list slot (8 B) each: 40 B a value, as measured in RSS
    lists = values * 40 + rows * 64
    after = r.info("memory")["used_memory"]
    print(f"map of {args.items} texts of {args.chars} chars: {took:.1f} s, {values:,} values")
    print(
        f"  producer RSS {own_before / 2**20:,.0f} MB before, peak "
        f"{own_peak / 2**20:,.0f} MB; the returned lists take ~{lists / 2**20:,.0f} MB"
    )
    print(
        f"  Redis used_memory {base / 2**20:,.1f} MB before, peak {peak / 2**20:,.1f} MB, "
        f"after {after / 2**20:,.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["job", "map"])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--chars", type=int, default=1900)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--rss-cap-gb", type=float, default=4.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="result-memory-"))
    port = free_port_from(16500)
    redis_proc = start_redis(port, work)
    url = f"redis://127.0.0.1:{port}/0"
    deployments = {DEPLOYMENT: demo_config(Path(".cache/pipeq-models"))[DEPLOYMENT]}
    config = write_config(deployments, work / "bench.toml")
    stack = Stack(deployments, str(config), redis_url=url, flower_port=None, exporter_port=None)
    r = redis.Redis(port=port)
    try:
        stack.start()
        assert stack.wait_ready(240) == {DEPLOYMENT: "ready"}
        if args.scenario == "job":
            run_job(url, r, stack.workers[DEPLOYMENT].pid, args)
        else:
            run_map(url, r, args)
    finally:
        stack.stop()
        stop_process(redis_proc)


if __name__ == "__main__":
    main()
