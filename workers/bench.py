"""`pipeq bench`: one deployment under load, next to the same model in-process.

In one run, on the same inputs:
  1. in-process `transformers.pipeline(task, model)(texts, batch_size=B)` for each B;
  2. pipeq, one worker with the deployment's batching, N jobs submitted in one burst;
  3. pipeq, the same worker with batching off (max_batch_size = 1);
  4. latency: single jobs one at a time on the idle stack, against single in-process calls.
Only one of these runs at a time, so they do not compete for cores.
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
from typing import Any

from pipeq import Client, _tasks
from pipeq._config import Deployment, load_deployments, pick
from pipeq._stack import Stack, port_free

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


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latencies_ms(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"p50": _pct(ms, 0.50), "p95": _pct(ms, 0.95), "p99": _pct(ms, 0.99)}


def in_process(
    d: Deployment, inputs: list[Any], params: dict[str, Any], sizes: list[int]
) -> dict[str, Any]:
    from pipeq.worker.handlers import load_handler

    pipe = load_handler(d).pipe
    pipe(inputs[:4], **params)  # warm-up
    out: dict[str, Any] = {}
    for b in sizes:
        started = time.perf_counter()
        pipe(inputs, batch_size=b, **params)
        elapsed = time.perf_counter() - started
        out[str(b)] = {"items_per_s": len(inputs) / elapsed, "seconds": elapsed}
    single = []
    for item in inputs[:50]:
        started = time.perf_counter()
        pipe(item, **params)
        single.append(time.perf_counter() - started)
    out["single_call_latency_ms"] = _latencies_ms(single)
    return out


def burst(client: Client, name: str, inputs: list[Any], params: dict[str, Any]) -> dict[str, Any]:
    """Submit every input as its own job at once; time until the last result."""
    for item in inputs[:8]:  # warm-up
        client.submit(name, item, **params).result(timeout=120)
    before = _stats(client, name)
    started = time.perf_counter()
    sent = []
    for item in inputs:
        sent.append((client.submit(name, item, **params), time.perf_counter()))
    latencies = []
    for job, t0 in sent:
        job.result(timeout=600)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    time.sleep(2.5)  # one heartbeat: the worker's batching statistics
    after = _stats(client, name)
    sizes = {
        k: v - before["sizes"].get(k, 0)
        for k, v in after["sizes"].items()
        if v - before["sizes"].get(k, 0)
    }
    items = after["items"] - before["items"]
    return {
        "items_per_s": len(inputs) / elapsed,
        "seconds": elapsed,
        "latency_ms": _latencies_ms(latencies),
        "batch_sizes": sizes,
        "mean_batch_size": items / max(1, after["batches"] - before["batches"]),
        "mean_wait_for_batch_ms": 1000 * (after["waited_s"] - before["waited_s"]) / max(1, items),
    }


def _stats(client: Client, name: str) -> dict[str, Any]:
    total: dict[str, Any] = {"sizes": {}, "items": 0, "batches": 0, "waited_s": 0.0}
    for s in client.registry.stats(name).values():
        total["items"] += s["items"]
        total["batches"] += s["batches"]
        total["waited_s"] += s["mean_wait_ms"] * s["items"] / 1000
        for k, v in s["sizes"].items():
            total["sizes"][k] = total["sizes"].get(k, 0) + v
    return total


def single_jobs(
    client: Client, name: str, inputs: list[Any], params: dict[str, Any]
) -> dict[str, float]:
    """One job at a time on an idle stack: end-to-end latency."""
    for item in inputs[:5]:
        client.submit(name, item, **params).result(timeout=120)
    latencies = []
    for item in inputs[:50]:
        started = time.perf_counter()
        client.submit(name, item, **params).result(timeout=120)
        latencies.append(time.perf_counter() - started)
    return _latencies_ms(latencies)


def run_pipeq(
    d: Deployment, config: Path, inputs: list[Any], params: dict[str, Any]
) -> dict[str, Any]:
    port = 6500
    while not port_free(port):
        port += 1
    stack = Stack({d.name: d}, str(config), redis_port=port, flower_port=None)
    try:
        stack.start()
        status = stack.wait_ready()
        if status[d.name] != "ready":
            raise RuntimeError(f"worker {d.name}: {status[d.name]}")
        with Client(stack.url) as client:
            result = burst(client, d.name, inputs, params)
            result["single_job_latency_ms"] = single_jobs(client, d.name, inputs, params)
        return result
    finally:
        stack.stop()


def _config_for(deployments: list[Deployment], path: Path) -> Path:
    from pipeq.worker.demo import write_config

    return write_config({d.name: d for d in deployments}, path)


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

    mask = load_handler(d).info().get("mask_token") if d.canonical_task == "fill-mask" else None
    inputs = bench_inputs(d.task, args.jobs, mask_token=mask)
    params = default_params(d.task)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report: dict[str, Any] = {
        "deployment": dataclasses.asdict(d),
        "jobs": args.jobs,
        "cpu_threads": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="pipeq-bench-") as tmp:
        config = _config_for([d, unbatched], Path(tmp) / "bench.toml")
        print(f"in-process transformers.pipeline, batch sizes {sizes} ...", flush=True)
        report["in_process"] = in_process(d, inputs, params, sizes)
        print(f"pipeq, max_batch_size={d.max_batch_size} ...", flush=True)
        report["pipeq"] = run_pipeq(d, config, inputs, params)
        if not args.no_unbatched:
            print("pipeq, max_batch_size=1 ...", flush=True)
            report["pipeq_unbatched"] = run_pipeq(unbatched, config, inputs, params)
    _print_report(report, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _print_report(r: dict[str, Any], sizes: list[int]) -> None:
    ip, pq = r["in_process"], r["pipeq"]
    best_b = max(sizes, key=lambda b: ip[str(b)]["items_per_s"])
    best = ip[str(best_b)]["items_per_s"]
    print(f"\n{r['jobs']} jobs, deployment {r['deployment']['name']} ({r['deployment']['model']})")
    for b in sizes:
        print(f"  in-process pipeline batch_size={b:<3} {ip[str(b)]['items_per_s']:8.1f} items/s")
    lat = pq["latency_ms"]
    print(
        f"  pipeq (max_batch_size={r['deployment']['max_batch_size']})       "
        f"{pq['items_per_s']:8.1f} items/s   latency p50 {lat['p50']:.0f} ms  "
        f"p95 {lat['p95']:.0f} ms  p99 {lat['p99']:.0f} ms"
    )
    print(
        f"    batches formed (size: count) {pq['batch_sizes']}; "
        f"mean size {pq['mean_batch_size']:.1f}, "
        f"mean wait for a batch {pq['mean_wait_for_batch_ms']:.1f} ms"
    )
    print(f"  pipeq / best in-process (B={best_b}):  {pq['items_per_s'] / best:.2f}x")
    if "pipeq_unbatched" in r:
        un = r["pipeq_unbatched"]
        print(f"  pipeq unbatched (max_batch_size=1)  {un['items_per_s']:8.1f} items/s")
        print(f"  pipeq batched / unbatched:          {pq['items_per_s'] / un['items_per_s']:.2f}x")
    sj, sc = pq["single_job_latency_ms"], ip["single_call_latency_ms"]
    print(
        f"  single job on an idle stack: p50 {sj['p50']:.1f} ms (in-process call p50 "
        f"{sc['p50']:.1f} ms; overhead {sj['p50'] - sc['p50']:.1f} ms)"
    )
