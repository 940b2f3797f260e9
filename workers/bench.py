"""`pipeq bench`: one deployment under load, next to the same model in-process.

In one run, on the same inputs, after one warm-up pass of each, `--rounds` times:
  1. in-process `transformers.pipeline(task, model)(texts, batch_size=B)` for each B;
  2. pipeq, one worker with the deployment's batching, N jobs submitted in one burst;
  3. pipeq, the same model in a second worker with batching off (max_batch_size = 1);
then latency: single jobs one at a time on the idle stack, against single in-process
calls. Only one contender runs at a time, so they do not compete for cores; medians of
the rounds and per-round ratios are reported, as these machines are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time
from pathlib import Path
from statistics import median_high as _median  # of an even count, the upper middle
from typing import Any

from pipeq import Client, _tasks
from pipeq._config import Deployment, load_deployments, pick
from pipeq._stack import Stack, exit_on_sigterm, free_port_from

__all__ = ["bench_inputs", "main"]

_WORDS = (
    "the a course model learn data train token text queue worker batch fast slow "
    "good bad great terrible movie film story actor plot music song happy sad love "
    "hate city river mountain computer science language transformer attention layer "
    "weight network python code library research paper result experiment question answer"
).split()


def bench_inputs(task: str, n: int, *, seed: int = 0, mask_token: str | None = None) -> list[Any]:
    """n texts of 5 to 40 words (a fixed seed: every run gets the same inputs)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(5, 40))) + "." for _ in range(n)]
    canonical = _tasks.canonical_task(task)
    if canonical == "fill-mask":
        return [f"{t[:-1]} {mask_token or '[MASK]'}." for t in texts]
    if canonical == "question-answering":
        return [{"question": "What is the result?", "context": t} for t in texts]
    return texts


def default_params(task: str) -> dict[str, Any]:
    canonical = _tasks.canonical_task(task)
    if canonical == "zero-shot-classification":
        return {"candidate_labels": ["science", "movies", "music"]}
    if canonical == "text-generation":
        return {"max_new_tokens": 8, "do_sample": False}
    return {}


#: single jobs and single in-process calls come this long after the previous one ended
IDLE_S = 0.01


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latencies_ms(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"p50": _pct(ms, 0.50), "p95": _pct(ms, 0.95), "p99": _pct(ms, 0.99)}


def in_process_rate(pipe: Any, inputs: list[Any], params: dict[str, Any], batch_size: int) -> float:
    started = time.perf_counter()
    pipe(inputs, batch_size=batch_size, **params)
    return len(inputs) / (time.perf_counter() - started)


def single_call_latency(
    pipe: Any, inputs: list[Any], params: dict[str, Any], idle_s: float = 0.0
) -> dict[str, float]:
    """One call at a time in-process; `idle_s` between calls (back to back when 0)."""
    for item in inputs[:5]:
        pipe(item, **params)
    latencies = []
    for item in inputs[:50]:
        time.sleep(idle_s)
        started = time.perf_counter()
        pipe(item, **params)
        latencies.append(time.perf_counter() - started)
    return _latencies_ms(latencies)


def burst(client: Client, name: str, inputs: list[Any], params: dict[str, Any]) -> dict[str, Any]:
    """Submit every input as its own job at once; time until the last result."""
    worker = client.registry.live_workers(name)[0]
    time.sleep(2.5)  # a fresh heartbeat: batching statistics before
    before = client.registry.stats(name)[worker]
    started = time.perf_counter()
    sent = [(client.submit(name, item, **params), time.perf_counter()) for item in inputs]
    latencies = []
    for job, t0 in sent:
        job.result(timeout=600)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    time.sleep(2.5)  # and after
    after = client.registry.stats(name)[worker]
    sizes = {
        int(k): v - before["sizes"].get(k, 0)
        for k, v in after["sizes"].items()
        if v - before["sizes"].get(k, 0)
    }
    items = after["items"] - before["items"]
    waited_ms = after["mean_wait_ms"] * after["items"] - before["mean_wait_ms"] * before["items"]
    return {
        "items_per_s": len(inputs) / elapsed,
        "latency_ms": _latencies_ms(latencies),
        "batch_sizes": dict(sorted(sizes.items())),
        "mean_batch_size": items / max(1, after["batches"] - before["batches"]),
        "mean_wait_for_batch_ms": waited_ms / max(1, items),
    }


def single_jobs(
    client: Client, name: str, inputs: list[Any], params: dict[str, Any]
) -> dict[str, float]:
    """One job at a time on an idle stack: end-to-end latency."""
    for item in inputs[:5]:
        client.submit(name, item, **params).result(timeout=120)
    latencies = []
    for item in inputs[:50]:
        time.sleep(IDLE_S)
        started = time.perf_counter()
        client.submit(name, item, **params).result(timeout=120)
        latencies.append(time.perf_counter() - started)
    return _latencies_ms(latencies)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeq bench", description=__doc__)
    p.add_argument("deployment", nargs="?", help="deployment of --config to measure")
    p.add_argument("--config", default=os.environ.get("PIPEQ_CONFIG"))
    p.add_argument(
        "--tiny", metavar="CHECKPOINT", help="measure a locally built checkpoint instead"
    )
    p.add_argument("--models-dir", default=".cache/pipeq-models")
    p.add_argument("--jobs", type=int, default=512)
    p.add_argument("--batch-sizes", default="1,8,32", help="in-process batch sizes to compare")
    p.add_argument("--max-batch-size", type=int, help="override the deployment's")
    p.add_argument("--max-batch-wait-ms", type=float, help="override the deployment's")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 run")
    p.add_argument("--rounds", type=int, default=3, help="every contender runs once a round")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.tiny:
        from pipeq.worker import tiny_models

        path = tiny_models.build(args.tiny, Path(args.models_dir).resolve())
        d = Deployment(name="bench", task=tiny_models.TINY_MODELS[args.tiny], model=str(path))
    else:
        if not args.deployment:
            p.error("name a deployment (with --config) or pass --tiny CHECKPOINT")
        d = pick(load_deployments(args.config), args.deployment)
    overrides = {
        k: v
        for k, v in (
            ("max_batch_size", args.max_batch_size),
            ("max_batch_wait_ms", args.max_batch_wait_ms),
        )
        if v is not None
    }
    d = dataclasses.replace(d, **overrides)
    unbatched = dataclasses.replace(d, name=f"{d.name}-unbatched", max_batch_size=1)

    from pipeq.worker.handlers import load_handler

    handler = load_handler(d)
    inputs = bench_inputs(d.task, args.jobs, mask_token=handler.info().get("mask_token"))
    params = default_params(d.task)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report: dict[str, Any] = {
        "deployment": dataclasses.asdict(d),
        "jobs": args.jobs,
        "cpu_threads": os.cpu_count(),
    }
    pipe = handler.pipe
    runs: dict[str, list[Any]] = {f"in_process_b{b}": [] for b in sizes}
    runs["pipeq"], runs["pipeq_unbatched"] = [], []
    with tempfile.TemporaryDirectory(prefix="pipeq-bench-") as tmp:
        from pipeq.worker.demo import write_config

        deployments = {x.name: x for x in ([d] if args.no_unbatched else [d, unbatched])}
        config = write_config(deployments, Path(tmp) / "bench.toml")
        exit_on_sigterm()
        stack = Stack(
            deployments,
            str(config),
            redis_port=free_port_from(6500),
            flower_port=None,
            exporter_port=None,
        )
        try:
            stack.start()
            status = stack.wait_ready()
            if any(v != "ready" for v in status.values()):
                raise RuntimeError(f"workers: {status}")
            with Client(stack.url) as client:
                print("warm-up: one pass in-process and through each worker ...", flush=True)
                in_process_rate(pipe, inputs, params, max(sizes))
                for x in deployments.values():
                    burst(client, x.name, inputs[: 64 if x is unbatched else None], params)
                for r in range(args.rounds):
                    print(f"round {r + 1}/{args.rounds} ...", flush=True)
                    for b in sizes:
                        runs[f"in_process_b{b}"].append(in_process_rate(pipe, inputs, params, b))
                    runs["pipeq"].append(burst(client, d.name, inputs, params))
                    if not args.no_unbatched:
                        runs["pipeq_unbatched"].append(
                            burst(client, unbatched.name, inputs, params)
                        )
                report["single_job_latency_ms"] = single_jobs(client, d.name, inputs, params)
            report["single_call_latency_ms"] = single_call_latency(pipe, inputs, params)
            report["single_call_after_idle_latency_ms"] = single_call_latency(
                pipe, inputs, params, IDLE_S
            )
        finally:
            stack.stop()
    report["runs"] = runs
    _print_report(report, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _print_report(r: dict[str, Any], sizes: list[int]) -> None:
    runs = r["runs"]
    rounds = len(runs["pipeq"])
    d = r["deployment"]
    print(f"\n{r['jobs']} jobs, {rounds} rounds; deployment {d['name']} ({d['model']})")
    print("items/s, median of the rounds (each round: every contender once, one at a time)")
    best_b = max(sizes, key=lambda b: _median(runs[f"in_process_b{b}"]))
    for b in sizes:
        rates = runs[f"in_process_b{b}"]
        print(f"  in-process pipeline(batch_size={b:<3})  {_median(rates):8.1f}   {_fmt(rates)}")
    pq = [x["items_per_s"] for x in runs["pipeq"]]
    print(
        f"  pipeq, max_batch_size={d['max_batch_size']:<3}          {_median(pq):8.1f}   {_fmt(pq)}"
    )
    # ratio per round against that round's best in-process, then the median
    best_per_round = [max(runs[f"in_process_b{b}"][i] for b in sizes) for i in range(rounds)]
    ratios = [p / b for p, b in zip(pq, best_per_round, strict=True)]
    print(
        f"  pipeq / best in-process (B={best_b} by median):  {_median(ratios):.2f}x   "
        f"per round {_fmt(ratios, 2)}"
    )
    if runs["pipeq_unbatched"]:
        un = [x["items_per_s"] for x in runs["pipeq_unbatched"]]
        print(f"  pipeq, max_batch_size=1            {_median(un):8.1f}   {_fmt(un)}")
        gains = [p / u for p, u in zip(pq, un, strict=True)]
        print(f"  pipeq batched / unbatched:  {_median(gains):.2f}x   per round {_fmt(gains, 2)}")
    last = runs["pipeq"][-1]
    lat = last["latency_ms"]
    print(
        f"  pipeq burst latency (last round): p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  "
        f"p99 {lat['p99']:.0f} ms"
    )
    print(f"  batches formed (size: count, last round): {last['batch_sizes']}")
    print(
        f"    mean batch size {last['mean_batch_size']:.1f}, "
        f"mean wait for a batch {last['mean_wait_for_batch_ms']:.1f} ms"
    )
    sj, sc = r["single_job_latency_ms"], r["single_call_latency_ms"]
    si = r["single_call_after_idle_latency_ms"]
    print(
        f"  single job, idle stack ({1000 * IDLE_S:.0f} ms apart): p50 {sj['p50']:.1f} ms  "
        f"p95 {sj['p95']:.1f} ms"
    )
    print(
        f"    in-process call p50: back to back {sc['p50']:.1f} ms (overhead "
        f"{sj['p50'] - sc['p50']:+.1f} ms); {1000 * IDLE_S:.0f} ms apart {si['p50']:.1f} ms "
        f"(overhead {sj['p50'] - si['p50']:+.1f} ms)"
    )


def _fmt(values: list[float], digits: int = 1) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"
