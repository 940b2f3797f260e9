"""What `pipeq serve` costs and holds, measured on one machine (issue 19's targets).

1. Overhead: one tiny-model job (sentiment-analysis) through `POST /v1/jobs` with
   `Prefer: wait`, against the same job through `Client.submit().result()`, taken in
   turn (side by side) --jobs times a round: p50 and p90 of each, and the difference.
2. Submit throughput: wrk (Debian's `wrk`) posting jobs for --seconds over
   --connections connections, to a deployment that a heartbeat says is served but that
   no worker consumes (its jobs only queue: the gateway is measured, not the model);
   every accepted job is then counted in its queue.
3. Held open: --streams event streams (jobs of a text-generation deployment nobody
   consumes: each holds a blocking XREAD) and --waits `?wait=60` result requests, all
   open at once on one gateway process; its peak memory (RSS) and open streams/waits as
   its /metrics says; then every job is cancelled and each request must end with it
   (streams: a `completed` event; waits: 409 JobCancelled).

One redis-server, one real sentiment worker and one gateway process (no keys:
loopback), all started here:

    .venv/bin/python bench/gateway.py --rounds 3 --jobs 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from statistics import median, quantiles

import httpx
import psutil
import redis

from pipeq import Client
from pipeq._ledger import workers_key
from pipeq._registry import DEPLOYMENTS_KEY
from pipeq._stack import Stack, free_port_from
from pipeq.worker.demo import demo_config, write_config

DEPLOYMENT = "sentiment-analysis"
SINK = "bench-sink"  # sentiment-analysis, announced live, never consumed
SINK_GEN = "bench-sink-gen"  # text-generation, the same


def p(values: list[float], q: int) -> float:
    return quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def announce_sinks(r: redis.Redis) -> None:
    """Deployments a heartbeat says are served, whose queues nobody consumes."""
    for name, task in ((SINK, "sentiment-analysis"), (SINK_GEN, "text-generation")):
        r.hset(DEPLOYMENTS_KEY, name, json.dumps({"task": task, "model": "sink"}))
        seconds, micros = r.time()
        r.zadd(workers_key(name), {"bench-heartbeat": seconds + micros / 1e6 + 3600})


# -- 1. overhead ------------------------------------------------------------------------
def overhead(url: str, client: Client, jobs: int, rounds: int) -> None:
    body = {"deployment": DEPLOYMENT, "inputs": "I've been waiting for this all my life."}
    print(f"\n1. one job, p50 / p90 in ms ({jobs} jobs per round, taken in turn)")
    print(
        f"{'round':>5}  {'Client.submit().result()':>26}  {'POST /v1/jobs, Prefer: wait':>28}  "
        f"{'p50 difference':>15}  {'load':>5}"
    )
    all_direct: list[float] = []
    all_http: list[float] = []
    with httpx.Client(base_url=url, timeout=30, headers={"Prefer": "wait=30"}) as http:
        for _ in range(20):  # warm both paths (connections, caches)
            client.submit(DEPLOYMENT, body["inputs"]).result(timeout=30)
            http.post("/v1/jobs", json=body)
        for n in range(1, rounds + 1):
            direct, via = [], []
            for i in range(jobs):
                for path in (0, 1) if i % 2 else (1, 0):
                    t = time.perf_counter()
                    if path == 0:
                        client.submit(DEPLOYMENT, body["inputs"]).result(timeout=30)
                        direct.append((time.perf_counter() - t) * 1000)
                    else:
                        r = http.post("/v1/jobs", json=body)
                        via.append((time.perf_counter() - t) * 1000)
                        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            all_direct += direct
            all_http += via
            print(
                f"{n:>5}  {median(direct):>12.2f} / {p(direct, 90):>11.2f}  "
                f"{median(via):>13.2f} / {p(via, 90):>12.2f}  "
                f"{median(via) - median(direct):>+15.2f}  {os.getloadavg()[0]:>5.1f}"
            )
    print(
        f"{'all':>5}  {median(all_direct):>12.2f} / {p(all_direct, 90):>11.2f}  "
        f"{median(all_http):>13.2f} / {p(all_http, 90):>12.2f}  "
        f"{median(all_http) - median(all_direct):>+15.2f}"
    )


# -- 2. submit throughput --------------------------------------------------------------
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"deployment": "%s", "inputs": "I love this"}'
wrk.headers["Content-Type"] = "application/json"
"""


def throughput(
    url: str, r: redis.Redis, proc: psutil.Process, seconds: int, connections: int, tmp: Path
) -> None:
    print(f"\n2. submit throughput: wrk, {connections} connections, {seconds} s")
    wrk = shutil.which("wrk")
    if wrk is None:
        print("   wrk is not installed (apt-get install wrk): skipped")
        return
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT % SINK)
    queue = f"pipeq.{SINK}"
    before = r.llen(queue)
    cpu = proc.cpu_times()
    out = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v1/jobs",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = re.search(r"50%\s+(\S+).*?99%\s+(\S+)", out, re.S)
    queued = r.llen(queue) - before
    after = proc.cpu_times()
    cpu_us = (after.user + after.system - cpu.user - cpu.system) / max(1, queued) * 1e6
    print(
        f"   {rate:,.0f} submits/s; {total} requests, {int(bad.group(1)) if bad else 0} not 2xx; "
        f"{queued} jobs in the queue; latency p50 {latency.group(1) if latency else '?'}, "
        f"p99 {latency.group(2) if latency else '?'}; gateway CPU {cpu_us:.0f} us a submit"
    )
    r.delete(queue, f"pipeq:waiting:{SINK}")


# -- 3. held open ------------------------------------------------------------------------
async def _stream(host: str, port: int, job_id: str, opened: list[int]) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        writer.close()
        return f"status {status!r}"
    opened[0] += 1
    seen = b""
    while b"event: completed" not in seen:
        chunk = await reader.read(65536)
        if not chunk:
            writer.close()
            return "closed before completed"
        seen = seen[-200:] + chunk
    writer.close()
    return "completed" if b"cancelled" in seen else f"completed? {seen[-200:]!r}"


async def _wait(host: str, port: int, job_id: str, opened: list[int]) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"GET /v1/jobs/{job_id}/result?wait=60 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    opened[0] += 1
    answer = await reader.read()
    writer.close()
    return (
        "409"
        if answer.startswith(b"HTTP/1.1 409") and b"JobCancelled" in answer
        else repr(answer[:80])
    )


def held(url: str, client: Client, gateway_pid: int, streams: int, waits: int) -> None:
    print(f"\n3. {streams} event streams and {waits} waiting requests on one gateway process")
    gen_jobs = [client.submit(SINK_GEN, "Hello", max_new_tokens=4).id for _ in range(streams)]
    wait_jobs = [client.submit(SINK, "Hello").id for _ in range(waits)]
    proc = psutil.Process(gateway_pid)
    rss0 = proc.memory_info().rss
    peak = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])

    async def run() -> tuple[list[str], list[str], dict[str, float], float]:
        opened_s, opened_w = [0], [0]
        tasks_s, tasks_w = [], []
        # the streams first, then the waits (each waits at most 60 s: opened last)
        for jobs, opened, tasks, ask in (
            (gen_jobs, opened_s, tasks_s, _stream),
            (wait_jobs, opened_w, tasks_w, _wait),
        ):
            for i, job_id in enumerate(jobs):  # a few hundred connections at a time
                tasks.append(asyncio.create_task(ask(host, port, job_id, opened)))
                if i % 200 == 199:
                    await asyncio.sleep(0.2)
            deadline = time.monotonic() + 120
            while opened[0] < len(jobs) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        while time.monotonic() < deadline:  # every wait has reached the gateway
            gauges = await asyncio.to_thread(_gauges, url)
            if gauges.get("waiting", 0) >= waits:
                break
            await asyncio.sleep(0.5)
        gauges = await asyncio.to_thread(_gauges, url)
        t = time.monotonic()
        await asyncio.to_thread(_cancel_all, client, wait_jobs + gen_jobs)
        outcomes_s = await asyncio.gather(*tasks_s, return_exceptions=True)
        outcomes_w = await asyncio.gather(*tasks_w, return_exceptions=True)
        return (
            [str(o) for o in outcomes_s],
            [str(o) for o in outcomes_w],
            gauges,
            time.monotonic() - t,
        )

    outcomes_s, outcomes_w, gauges, drain_s = asyncio.run(run())
    stop.set()
    sampler.join()
    bad_s = [o for o in outcomes_s if o != "completed"]
    bad_w = [o for o in outcomes_w if o != "409"]
    print(
        f"   open at once (the gateway's /metrics): {gauges.get('streams', 0):.0f} streams, "
        f"{gauges.get('waiting', 0):.0f} waiting requests"
    )
    print(f"   gateway RSS: {rss0 / 2**20:.0f} MiB before, {peak[0] / 2**20:.0f} MiB at peak")
    print(
        f"   after cancelling all {streams + waits} jobs: {len(outcomes_s) - len(bad_s)} streams "
        f"ended with `completed`, {len(outcomes_w) - len(bad_w)} waits answered 409, "
        f"in {drain_s:.1f} s; errors: {len(bad_s) + len(bad_w)}"
        + (f" (first: {(bad_s + bad_w)[0]})" if bad_s or bad_w else "")
    )


def _gauges(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=120) as r:
        text = r.read().decode()
    out = {}
    for name, key in (
        ("pipeq_gateway_open_event_streams", "streams"),
        ("pipeq_gateway_waiting_requests", "waiting"),
    ):
        found = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
        if found:
            out[key] = float(found.group(1))
    return out


def _cancel_all(client: Client, ids: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda job_id: client.job(job_id).cancel(), ids))


@contextlib.contextmanager
def gateway_stack(
    models_dir: str, name: str, redis_from: int, gateway_from: int
) -> Iterator[tuple[Stack, str, Path]]:
    """A started stack of one redis-server, one tiny sentiment worker and one gateway,
    ready: (the stack, the gateway's URL, its log folder); stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=f"pipeq-bench-{name}-"))
    deployments = {DEPLOYMENT: demo_config(Path(models_dir))[DEPLOYMENT]}
    stack = Stack(
        deployments,
        str(write_config(deployments, tmp / "bench.toml")),
        redis_port=free_port_from(redis_from),
        flower_port=None,
        exporter_port=None,
        gateway_port=free_port_from(gateway_from),
        log_dir=tmp,
    )
    stack.start()
    try:
        status = stack.wait_ready(240)
        assert all(s == "ready" for s in status.values()), status
        url = stack.gateway_url
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/ready", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp / "gateway.log").read_text()
                time.sleep(0.2)
        yield stack, url, tmp
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--waits", type=int, default=2000)
    ap.add_argument("--models-dir", default=".cache/pipeq-models")
    ap.add_argument("--parts", default="123", help="which parts to run (default all: 123)")
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client's sockets

    with gateway_stack(args.models_dir, "gateway", 17000, 18100) as (stack, url, tmp):
        assert stack.gateway_proc is not None
        print(
            f"machine: {psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
            "(other work on it too); gateway: 1 process (uvicorn), no keys"
        )
        with Client(stack.url) as client:
            announce_sinks(client.redis)
            if "1" in args.parts:
                overhead(url, client, args.jobs, args.rounds)
            if "2" in args.parts:
                gateway = psutil.Process(stack.gateway_proc.pid)
                throughput(url, client.redis, gateway, args.seconds, args.connections, tmp)
            if "3" in args.parts:
                announce_sinks(client.redis)
                held(url, client, stack.gateway_proc.pid, args.streams, args.waits)


if __name__ == "__main__":
    main()
