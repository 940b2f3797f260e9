"""`pipeq bench`: one deployment under load, next to the same model in-process.

In one run, on the same inputs, after one warm-up pass of each, `--rounds` times:
  1. in-process `transformers.pipeline(task, model)(texts, batch_size=B)` for each B;
  2. pipeq, one worker with the deployment's batching, N jobs submitted in one burst;
  3. pipeq, the same model in a second worker with batching off (max_batch_size = 1);
then latency: single jobs one at a time on the idle stack, against single in-process
calls. Only one contender runs at a time, so they do not compete for cores; medians of
the rounds and per-round ratios are reported, as these machines are noisy.

A text-generation deployment gets the generation workload instead (`generation_main`):
N prompts of mixed lengths, each with its own `max_new_tokens`, greedy, sent as N jobs
in one burst to pipeq with continuous batching and to pipeq with the dynamic batcher,
next to in-process `pipeline(chunk, batch_size=B)` at each B: useful tokens/s, time to
the first streamed token and job latency (p50/p95), and whether both pipeq contenders
made the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median_high as _median  # of an even count, the upper middle
from typing import Any

from pipeq import Client, _tasks
from pipeq._config import Deployment, load_deployments, pick
from pipeq._stack import Stack, exit_on_sigterm, free_port_from

__all__ = [
    "bench_inputs",
    "generation_main",
    "generation_workload",
    "main",
    "real_size_inputs",
    "real_size_main",
]

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


def burst(
    client: Client,
    name: str,
    inputs: list[Any],
    params: dict[str, Any],
    settle_s: float = 2.5,
) -> dict[str, Any]:
    """Submit every input as its own job at once; time until the last result. The worker's
    batching statistics from heartbeats `settle_s` before and after (none when 0)."""
    worker = client.registry.live_workers(name)[0]
    time.sleep(settle_s)  # a fresh heartbeat: batching statistics before
    before = client.registry.stats(name)[worker] if settle_s else None
    started = time.perf_counter()
    sent = [(client.submit(name, item, **params), time.perf_counter()) for item in inputs]
    latencies = []
    for job, t0 in sent:
        job.result(timeout=600)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    figures = {"items_per_s": len(inputs) / elapsed, "latency_ms": _latencies_ms(latencies)}
    if before is None:
        return figures
    time.sleep(settle_s)  # and after
    return {**figures, **_batching(before, client.registry.stats(name)[worker])}


def _batching(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a worker's batching did between two of its heartbeats' statistics."""
    sizes = {
        int(k): v - before["sizes"].get(k, 0)
        for k, v in after["sizes"].items()
        if v - before["sizes"].get(k, 0)
    }
    items = after["items"] - before["items"]
    waited_ms = after["mean_wait_ms"] * after["items"] - before["mean_wait_ms"] * before["items"]
    return {
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


def with_overrides(d: Deployment, args: argparse.Namespace) -> Deployment:
    """`d` with the batching settings given on the command line (`--max-batch-size`,
    `--max-batch-wait-ms`), where given."""
    overrides = {
        k: v
        for k, v in (
            ("max_batch_size", args.max_batch_size),
            ("max_batch_wait_ms", args.max_batch_wait_ms),
        )
        if v is not None
    }
    return dataclasses.replace(d, **overrides)


@contextmanager
def running_stack(deployments: dict[str, Deployment]) -> Iterator[Client]:
    """A Stack of one worker per deployment on an embedded Redis, ready; its Client."""
    from pipeq.worker.demo import write_config

    with tempfile.TemporaryDirectory(prefix="pipeq-bench-") as tmp:
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
            print(f"worker logs: {stack.log_dir}", flush=True)
            status = stack.wait_ready()
            if any(v != "ready" for v in status.values()):
                raise RuntimeError(f"workers: {status}")
            with Client(stack.url) as client:
                yield client
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeq bench", description=__doc__)
    p.add_argument("deployment", nargs="?", help="deployment of --config to measure")
    p.add_argument("--config", default=os.environ.get("PIPEQ_CONFIG"))
    p.add_argument(
        "--tiny", metavar="CHECKPOINT", help="measure a locally built checkpoint instead"
    )
    p.add_argument("--models-dir", default=".cache/pipeq-models")
    p.add_argument("--jobs", type=int, default=512)
    p.add_argument(
        "--batch-sizes",
        help="in-process batch sizes to compare (default: 1,8,32; generation: 1,8,16,32)",
    )
    p.add_argument("--max-batch-size", type=int, help="override the deployment's")
    p.add_argument("--max-batch-wait-ms", type=float, help="override the deployment's")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 run")
    p.add_argument("--rounds", type=int, default=3, help="every contender runs once a round")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument(
        "--workload",
        choices=("greedy", "mixed"),
        default="greedy",
        help="generation only: greedy prompts, or the mixed workload (bench_mixed.py)",
    )
    p.add_argument(
        "--queue",
        action="store_true",
        help="the queue's own cost instead (bench_queue.py): jobs/s, Redis commands and CPU "
        "a job, connections, an idle worker; --jobs a burst (default 2000)",
    )
    p.add_argument(
        "--priority",
        action="store_true",
        help="priorities instead (bench_queue.py): a backlog of --jobs low jobs (default "
        "2000) alone and with high jobs during it: its jobs/s, the high jobs' wait",
    )
    p.add_argument("--producers", type=int, default=4, help="--queue: submitting threads")
    p.add_argument("--idle-s", type=float, default=20.0, help="--queue: idle time measured")
    p.add_argument(
        "--real-size",
        action="store_true",
        help="the course's nine tasks with their models' real sizes (random weights), "
        "in-process at each B against pipeq: a table (docs/batching.md)",
    )
    p.add_argument("--tasks", help="--real-size: these tasks only (comma-separated)")
    p.add_argument(
        "--small",
        action="store_true",
        help="--real-size with tiny layers and 4 items a row: a check that it runs",
    )
    p.add_argument(
        "--jobs-scale", type=float, default=1.0, help="--real-size: times each row's items"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.queue or args.priority:
        from pipeq.worker.bench_queue import priority_main, queue_main

        if "--jobs" not in (argv or sys.argv):
            args.jobs = 2000
        return priority_main(args) if args.priority else queue_main(args)
    if args.real_size:
        return real_size_main(
            args.tasks.split(",") if args.tasks else None,
            small=args.small,
            rounds=args.rounds,
            models_dir=Path(args.models_dir).resolve(),
            jobs_scale=args.jobs_scale,
            json_path=args.json,
        )

    if args.tiny:
        from pipeq.worker import tiny_models

        path = tiny_models.build(args.tiny, Path(args.models_dir).resolve())
        d = Deployment(name="bench", task=tiny_models.task_of(args.tiny), model=str(path))
    else:
        if not args.deployment:
            p.error("name a deployment (with --config) or pass --tiny CHECKPOINT")
        d = pick(load_deployments(args.config), args.deployment)
    d = with_overrides(d, args)
    unbatched = dataclasses.replace(d, name=f"{d.name}-unbatched", max_batch_size=1)

    from pipeq.worker.handlers import load_handler

    handler = load_handler(d)
    if d.canonical_task == "text-generation":
        sizes = [int(b) for b in (args.batch_sizes or "1,8,16,32").split(",")]
        if args.workload == "mixed":
            from pipeq.worker.bench_mixed import mixed_main

            return mixed_main(d, handler.pipe, args.jobs, args.rounds, sizes, args.json)
        return generation_main(d, handler.pipe, args.jobs, args.rounds, sizes, args.json)
    inputs = bench_inputs(d.task, args.jobs, mask_token=handler.info().get("mask_token"))
    params = default_params(d.task)
    sizes = [int(b) for b in (args.batch_sizes or "1,8,32").split(",")]
    report: dict[str, Any] = {
        "deployment": dataclasses.asdict(d),
        "jobs": args.jobs,
        "cpu_threads": os.cpu_count(),
    }
    pipe = handler.pipe
    runs: dict[str, list[Any]] = {f"in_process_b{b}": [] for b in sizes}
    runs["pipeq"], runs["pipeq_unbatched"] = [], []
    deployments = {x.name: x for x in ([d] if args.no_unbatched else [d, unbatched])}
    with running_stack(deployments) as client:
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
                runs["pipeq_unbatched"].append(burst(client, unbatched.name, inputs, params))
        report["single_job_latency_ms"] = single_jobs(client, d.name, inputs, params)
        report["single_call_latency_ms"] = single_call_latency(pipe, inputs, params)
        report["single_call_after_idle_latency_ms"] = single_call_latency(
            pipe, inputs, params, IDLE_S
        )
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


# --------------------------------------------------------------------------- generation

#: seed of the jobs' max_new_tokens (the prompts are bench_inputs', with its own seed)
GENERATION_SEED = 1
NEW_TOKENS = (8, 64)  # each job's max_new_tokens: uniform in this range, both included
#: what the continuous batching worker is compared with: the same model and sizes,
#: today's batcher (a batch holds only jobs of equal parameters)
CONTENDERS = ("continuous", "dynamic")


def generation_workload(n: int) -> tuple[list[str], list[int]]:
    """n prompts of 5 to 40 words, and each one's max_new_tokens (fixed seeds)."""
    rng = random.Random(GENERATION_SEED)
    prompts = [str(p) for p in bench_inputs("text-generation", n)]
    return prompts, [rng.randint(*NEW_TOKENS) for _ in prompts]


def generation_params(max_new_tokens: int) -> dict[str, Any]:
    """Greedy, and only the new text: with `return_full_text` (the default) a stream's
    first piece would be the prompt, written when the job is admitted, not a token."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False}


def useful_tokens(tokenizer: Any, text: str, max_new_tokens: int) -> int:
    """The tokens of a generated text, at most what its job asked for."""
    return min(max_new_tokens, len(tokenizer(text, add_special_tokens=False).input_ids))


def _generated_text(result: Any) -> str:
    record = result[0] if isinstance(result, list) else result
    record = record[0] if isinstance(record, list) else record
    return str(record["generated_text"])


def _generation_figures(
    tokenizer: Any,
    budgets: list[int],
    texts: list[str],
    firsts: list[float],
    ends: list[float],
    elapsed: float,
) -> dict[str, Any]:
    tokens = sum(useful_tokens(tokenizer, t, b) for t, b in zip(texts, budgets, strict=True))
    return {
        "tokens_per_s": tokens / elapsed,
        "useful_tokens": tokens,
        "seconds": elapsed,
        "ttft_ms": _latencies_ms(firsts),
        "latency_ms": _latencies_ms(ends),
    }


def generation_burst(
    client: Client,
    name: str,
    prompts: list[Any],
    budgets: list[int],
    tokenizer: Any,
    params: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Every prompt as its own job at once, a thread following each job's stream: from
    the burst's start, the time to its first non-empty piece and to its end. Returns the
    figures and the texts (a failed job's: ""). `params`: each job's own (default:
    `generation_params` of its budget)."""
    worker = client.registry.live_workers(name)[0]
    time.sleep(2.5)  # a fresh heartbeat: batching statistics before
    before = client.registry.stats(name)[worker]
    n = len(prompts)
    firsts: list[float | None] = [None] * n
    ends = [0.0] * n
    texts = [""] * n
    errors: dict[int, str] = {}
    mismatched: list[int] = []  # jobs whose streamed pieces do not add up to their result

    def follow(i: int, job: Any) -> None:
        try:
            pieces = []
            for piece in job.stream(timeout=600):
                if piece and firsts[i] is None:
                    firsts[i] = time.perf_counter() - started
                pieces.append(piece)
            ends[i] = time.perf_counter() - started
            texts[i] = _generated_text(job.result(timeout=60))
            if "".join(pieces) != texts[i]:
                mismatched.append(i)
        except Exception as e:
            ends[i] = time.perf_counter() - started
            errors[i] = f"{type(e).__name__}: {e}"

    threads = []
    started = time.perf_counter()
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        job = client.submit(
            name, prompt, **(generation_params(budget) if params is None else params[i])
        )
        threads.append(threading.Thread(target=follow, args=(i, job), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    time.sleep(2.5)  # and after
    after = client.registry.stats(name)[worker]
    ok = [i for i in range(n) if i not in errors]
    figures = _generation_figures(
        tokenizer,
        [budgets[i] for i in ok],
        [texts[i] for i in ok],
        [ends[i] if (f := firsts[i]) is None else f for i in ok],  # no text: its end
        [ends[i] for i in ok],
        elapsed,
    )
    figures.update(_batching(before, after))
    figures["failed"] = {str(i): errors[i] for i in sorted(errors)}
    figures["stream_differs_from_result"] = sorted(mismatched)
    return figures, texts


def in_process_generation(
    pipe: Any, prompts: list[str], budgets: list[int], batch_size: int
) -> tuple[dict[str, Any], list[str]]:
    """The prompts in order, `batch_size` a call, each call generating the most its
    chunk asks for; every prompt's first token and end: its chunk's end."""
    texts: list[str] = []
    ends: list[float] = []
    started = time.perf_counter()
    for at in range(0, len(prompts), batch_size):
        chunk = prompts[at : at + batch_size]
        out = pipe(
            chunk,
            batch_size=batch_size,
            max_new_tokens=max(budgets[at : at + batch_size]),
            do_sample=False,
            return_full_text=False,
        )
        done = time.perf_counter() - started
        texts += [_generated_text(o) for o in out]
        ends += [done] * len(chunk)
    elapsed = time.perf_counter() - started
    return _generation_figures(pipe.tokenizer, budgets, texts, ends, ends, elapsed), texts


def divergences(
    pipe: Any,
    prompts: list[str],
    budgets: list[int],
    a: list[str],
    b: list[str],
    names: tuple[str, str] = ("a", "b"),
) -> list[dict[str, Any]]:
    """For each job whose texts in `a` and `b` differ: the first new token where they
    part (following unbatched greedy `generate()`), the gap there between its two
    highest logits (a near-tie when tiny), and which of the two `generate()` made."""
    tok, model = pipe.tokenizer, pipe.model
    found = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        enc = tok(prompts[i], return_tensors="pt").to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=budgets[i],
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
        ids = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
        ref = tok.decode(ids, skip_special_tokens=True)
        where: dict[str, Any] = {"job": i, "step": None, "top2_gap": None, "top1": None}
        for k in range(len(ids)):
            text = tok.decode(ids[: k + 1], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # part of a character
                continue
            if not (x.startswith(text) and y.startswith(text)):
                top = out.logits[k][0].float().topk(2).values.tolist()
                where.update(step=k, top2_gap=top[0] - top[1], top1=top[0])
                break
        where["generate_equals"] = {x: names[0], y: names[1]}.get(ref, "neither")
        found.append(where)
    return found


def generation_main(
    d: Deployment,
    pipe: Any,
    jobs: int,
    rounds: int,
    sizes: list[int],
    json_path: str | None,
) -> int:
    """The generation workload: pipeq with continuous batching, pipeq with the dynamic
    batcher, and in-process pipeline(batch_size=B) for each B, one at a time a round."""
    # each call's max_new_tokens beside the model's max_length: a warning a call
    logging.getLogger("transformers").setLevel(logging.ERROR)
    prompts, budgets = generation_workload(jobs)
    tokenizer = pipe.tokenizer
    workers = {
        kind: dataclasses.replace(
            d, name=d.name if kind == "continuous" else f"{d.name}-{kind}", batching=kind
        )
        for kind in CONTENDERS
    }
    report: dict[str, Any] = {
        "workload": "generation",
        "deployment": dataclasses.asdict(d),
        "jobs": jobs,
        "max_new_tokens": {"range": list(NEW_TOKENS), "sum": sum(budgets)},
        "cpu_threads": os.cpu_count(),
    }
    runs: dict[str, list[Any]] = {f"in_process_b{b}": [] for b in sizes}
    runs.update({kind: [] for kind in CONTENDERS})
    texts: dict[str, list[list[str]]] = {kind: [] for kind in runs}
    warm = min(16, jobs)
    with running_stack({w.name: w for w in workers.values()}) as client:
        print("warm-up: a few prompts in-process and through each worker ...", flush=True)
        in_process_generation(pipe, prompts[:warm], budgets[:warm], max(sizes))
        for w in workers.values():
            generation_burst(client, w.name, prompts[:warm], budgets[:warm], tokenizer)
        for r in range(rounds):
            for b in sizes:
                print(f"round {r + 1}/{rounds}: in-process batch_size={b} ...", flush=True)
                figures, out = in_process_generation(pipe, prompts, budgets, b)
                runs[f"in_process_b{b}"].append(figures)
                texts[f"in_process_b{b}"].append(out)
                _progress(figures)
            for kind, w in workers.items():
                print(f"round {r + 1}/{rounds}: pipeq {kind} ...", flush=True)
                figures, out = generation_burst(client, w.name, prompts, budgets, tokenizer)
                runs[kind].append(figures)
                texts[kind].append(out)
                _progress(figures)
    cont, dyn = texts["continuous"], texts["dynamic"]
    report["identical"] = {
        "continuous_vs_dynamic": [
            sum(x == y for x, y in zip(c, t, strict=True)) for c, t in zip(cont, dyn, strict=True)
        ],
        "continuous_across_rounds": sum(x == y for x, y in zip(cont[0], cont[-1], strict=True)),
    }
    if 1 in sizes:  # unbatched generate(), each prompt with its own max_new_tokens
        report["identical"]["continuous_vs_in_process_b1"] = [
            sum(x == y for x, y in zip(c, t, strict=True))
            for c, t in zip(cont, texts["in_process_b1"], strict=True)
        ]
    report["divergences"] = divergences(pipe, prompts, budgets, cont[-1], dyn[-1], CONTENDERS)
    report["runs"] = runs
    _print_generation_report(report, sizes)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0


def _progress(x: dict[str, Any]) -> None:
    print(
        f"  {x['tokens_per_s']:.1f} tokens/s in {x['seconds']:.1f} s; first token p50/p95 "
        f"{x['ttft_ms']['p50']:.0f}/{x['ttft_ms']['p95']:.0f} ms, latency p50/p95 "
        f"{x['latency_ms']['p50']:.0f}/{x['latency_ms']['p95']:.0f} ms"
        + (f"; {len(x['failed'])} FAILED" if x.get("failed") else ""),
        flush=True,
    )


def _print_generation_report(r: dict[str, Any], sizes: list[int]) -> None:
    runs, d, n = r["runs"], r["deployment"], r["jobs"]
    rounds = len(runs["continuous"])
    lo, hi = r["max_new_tokens"]["range"]
    print(
        f"\n{n} generation jobs, {rounds} rounds; deployment {d['name']} ({d['model']}), "
        f"max_batch_size {d['max_batch_size']}, {r['cpu_threads']} CPU threads"
    )
    print(
        f"  prompts of 5-40 words, max_new_tokens uniform in {lo}-{hi} "
        f"(sum {r['max_new_tokens']['sum']}), greedy, return_full_text=False"
    )
    print("  useful tokens: of each job's new text (tokenizer), at most its max_new_tokens")
    print("useful tokens/s, median of the rounds (each round: every contender once, in turn)")
    best_b = max(
        sizes, key=lambda b: _median([x["tokens_per_s"] for x in runs[f"in_process_b{b}"]])
    )
    labels = {f"in_process_b{b}": f"in-process pipeline(batch_size={b})" for b in sizes}
    labels["continuous"] = "pipeq, batching=continuous"
    labels["dynamic"] = "pipeq, batching=dynamic"
    for key, label in labels.items():
        rates = [x["tokens_per_s"] for x in runs[key]]
        print(f"  {label:<36} {_median(rates):8.1f}   {_fmt(rates)}")
    print(
        "ms from the burst's start, median of the rounds:  first token p50 / p95    "
        "latency p50 / p95"
    )
    rows = {
        "continuous": "pipeq continuous (streamed)",
        "dynamic": "pipeq dynamic (first result)",
        f"in_process_b{best_b}": f"in-process B={best_b} (chunk's end)",
    }
    for key, label in rows.items():
        t = {q: _median([x["ttft_ms"][q] for x in runs[key]]) for q in ("p50", "p95")}
        e = {q: _median([x["latency_ms"][q] for x in runs[key]]) for q in ("p50", "p95")}
        print(
            f"  {label:<36} {t['p50']:8.0f} / {t['p95']:<8.0f}      "
            f"{e['p50']:8.0f} / {e['p95']:.0f}"
        )
    cont = runs["continuous"]
    best = [max(runs[f"in_process_b{b}"][i]["tokens_per_s"] for b in sizes) for i in range(rounds)]
    targets = (
        (
            "continuous / dynamic tokens/s",
            ">= 1.5",
            [
                c["tokens_per_s"] / x["tokens_per_s"]
                for c, x in zip(cont, runs["dynamic"], strict=True)
            ],
        ),
        (
            "continuous / best in-process tokens/s",
            ">= 0.9",
            [c["tokens_per_s"] / b for c, b in zip(cont, best, strict=True)],
        ),
        (
            "continuous first-token p95 / dynamic's",
            "<= 0.33",
            [
                c["ttft_ms"]["p95"] / x["ttft_ms"]["p95"]
                for c, x in zip(cont, runs["dynamic"], strict=True)
            ],
        ),
    )
    print("targets, median of the per-round ratios (best in-process: that round's best B)")
    for label, target, ratios in targets:
        print(f"  {label:<40} {_median(ratios):5.2f}x  (target {target})   {_fmt(ratios, 2)}")
    unit = {"continuous": "requests a decoding step", "dynamic": "jobs a generate() call"}
    for kind in CONTENDERS:
        last = runs[kind][-1]
        print(
            f"  {kind} batching (last round): mean batch size {last['mean_batch_size']:.1f} "
            f"({unit[kind]}), sizes {last['batch_sizes']}"
        )
        for x in runs[kind]:
            if x["failed"]:
                first = next(iter(x["failed"].items()))
                print(f"  {kind}: {len(x['failed'])} jobs FAILED, e.g. job {first[0]}: {first[1]}")
            if x["stream_differs_from_result"]:
                print(
                    f"  {kind}: streamed text differs from the result for jobs "
                    f"{x['stream_differs_from_result']}"
                )
    same = r["identical"]
    print(f"results: continuous vs dynamic {_fmt_counts(same['continuous_vs_dynamic'], n)}")
    if "continuous_vs_in_process_b1" in same:
        counts = _fmt_counts(same["continuous_vs_in_process_b1"], n)
        print(f"  continuous vs in-process unbatched (B=1, own max_new_tokens) {counts}")
    print(f"  continuous, first vs last round {same['continuous_across_rounds']}/{n} identical")
    for x in r["divergences"]:
        where = (
            "texts differ"
            if x["step"] is None
            else f"parts at new token {x['step']}, top-2 logit gap {x['top2_gap']:.2g} "
            f"(top logit {x['top1']:.3g})"
        )
        print(f"  job {x['job']}: {where}; unbatched generate() made {x['generate_equals']}'s")


def _fmt_counts(counts: list[int], n: int) -> str:
    return (
        ", ".join(f"{c}/{n}" for c in counts)
        + " identical"
        + (" (per round)" if len(counts) > 1 else "")
    )


# --------------------------------------------------------------------------- real size


@dataclasses.dataclass(frozen=True)
class RealSizeRow:
    """A row of the real-size table: a task, its inputs and parameters, and how many items
    each contender runs (full size; `--small` runs `SMALL_JOBS`)."""

    label: str
    task: str  # a key of real_size.REAL_SIZE: which checkpoint and deployment
    jobs: int
    batch_sizes: tuple[int, ...]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    batching: str = ""  # the deployment's `batching` ("": the task's default)

    @property
    def deployment(self) -> str:
        return self.task + (f"-{self.batching}" if self.batching else "")


#: ten labels of a zero-shot call (the first three: the three-label row's)
ZERO_SHOT_LABELS = (
    "politics",
    "sport",
    "business",
    "science",
    "music",
    "film",
    "health",
    "technology",
    "education",
    "travel",
)
#: random weights never choose end-of-sequence: each generation runs to its limit, so the
#: limits are the lengths the real models make (a sentence's translation: about as many
#: tokens as the sentence, up to 40 words here; a CNN summary: distilbart's min_length 56)
REAL_SIZE_ROWS = (
    RealSizeRow("sentiment-analysis", "sentiment-analysis", 48, (8, 32)),
    RealSizeRow(
        "zero-shot, 3 labels",
        "zero-shot-classification",
        8,
        (8, 32),
        {"candidate_labels": list(ZERO_SHOT_LABELS[:3])},
    ),
    RealSizeRow(
        "zero-shot, 10 labels",
        "zero-shot-classification",
        3,
        (8, 32),
        {"candidate_labels": list(ZERO_SHOT_LABELS)},
    ),
    RealSizeRow(
        "text-generation",
        "text-generation",
        8,
        (1, 8),
        {"max_new_tokens": 30, "do_sample": False},
    ),
    RealSizeRow(
        "text-generation, dynamic batching",
        "text-generation",
        8,
        (8,),
        {"max_new_tokens": 30, "do_sample": False},
        "dynamic",
    ),
    RealSizeRow("fill-mask", "fill-mask", 48, (8, 32)),
    RealSizeRow("ner", "ner", 16, (8, 32), {"aggregation_strategy": "simple"}),
    # pipeq's own pipelines (transformers 5 has none) run items one at a time whatever B
    RealSizeRow("question-answering", "question-answering", 8, (1,)),
    RealSizeRow("summarization", "summarization", 2, (1,), {"truncation": True, "max_length": 80}),
    RealSizeRow("translation", "translation", 8, (1,), {"max_new_tokens": 48}),
    RealSizeRow("feature-extraction", "feature-extraction", 48, (8, 32)),
)
#: `--small`: items a contender runs per row (the in-process batch sizes: the row's, at most 4)
SMALL_JOBS = 4


def real_size_inputs(row: RealSizeRow, n: int, mask_token: str | None = None) -> list[Any]:
    """The row's n inputs (fixed seeds): texts of 5-40 words (ner: 10-60), QA contexts of
    100-600 words, summarization articles of 300-900 words, French sentences to translate."""
    from pipeq.worker.real_size import WORDS_EN, WORDS_FR, sentences

    if row.task == "question-answering":
        contexts = sentences(WORDS_EN, n, 100, 600, seed=11)
        return [{"question": "What did the president say?", "context": c} for c in contexts]
    if row.task == "summarization":
        return sentences(WORDS_EN, n, 300, 900, seed=12)
    if row.task == "translation":
        return sentences(WORDS_FR, n, 5, 40, seed=13)
    if row.task == "ner":
        return sentences(WORDS_EN, n, 10, 60, seed=14)
    texts = sentences(WORDS_EN, n, 5, 40, seed=15)
    if row.task == "fill-mask":
        return [f"{t[:-1]} {mask_token or '<mask>'}." for t in texts]
    return texts


def in_process_run(
    pipe: Any, inputs: list[Any], params: dict[str, Any], batch_size: int
) -> dict[str, Any]:
    """The inputs in order, `batch_size` a call (`pipe(chunk, batch_size=B)`): items/s, and
    each item's latency from the start to the end of its call."""
    ends = []
    started = time.perf_counter()
    for at in range(0, len(inputs), batch_size):
        chunk = inputs[at : at + batch_size]
        pipe(chunk, batch_size=batch_size, **params)
        ends += [time.perf_counter() - started] * len(chunk)
    return {"items_per_s": len(inputs) / ends[-1], "latency_ms": _latencies_ms(ends)}


def real_size_main(
    tasks: list[str] | None,
    *,
    small: bool,
    rounds: int,
    models_dir: Path,
    jobs_scale: float,
    json_path: str | None,
) -> int:
    """Each selected row: its real-size checkpoint (`small`: the same architecture, tiny)
    in-process at each B and through one pipeq worker with the task's default batching,
    one contender at a time, `rounds` times; a table of items/s and latency p50/p95."""
    import gc

    from pipeq.worker import real_size
    from pipeq.worker.handlers import load_handler

    # the in-process contenders with the worker's OpenMP setting (`pipeq worker` sets it):
    # threads that spin after each parallel region made in-process runs several times
    # slower than the worker's on a shared 2-core host (docs/batching.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = [r for r in REAL_SIZE_ROWS if not tasks or r.task in tasks or r.label in tasks]
    unknown = set(tasks or ()) - {r.task for r in rows} - {r.label for r in rows}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; known: {list(real_size.REAL_SIZE)}")
    deployments = {}
    for row in rows:
        path = real_size.build(row.task, models_dir, small=small)
        deployments[row.deployment] = Deployment(
            name=row.deployment,
            task=row.task,
            model=str(path),
            hub_id=real_size.hub_id(row.task),
            batching=row.batching,
        )
    report: dict[str, Any] = {"small": small, "rounds": rounds, "rows": []}
    with running_stack(deployments) as client:
        for row in rows:
            d = deployments[row.deployment]
            handler = load_handler(d)
            n = SMALL_JOBS if small else max(1, round(row.jobs * jobs_scale))
            sizes = (
                tuple(sorted({min(b, 4) for b in row.batch_sizes})) if small else row.batch_sizes
            )
            inputs = real_size_inputs(row, n, handler.info().get("mask_token"))
            print(f"{row.label}: {n} items, {Path(d.model).name}", flush=True)
            warm = inputs[: min(4, n)]
            in_process_run(handler.pipe, warm, row.params, len(warm))
            burst(client, d.name, warm, row.params, settle_s=0)
            runs: dict[str, list[Any]] = {f"in_process_b{b}": [] for b in sizes}
            runs["pipeq"] = []
            for r in range(rounds):
                # pipeq last in odd rounds, first in even ones: a drift of the host's load
                # during a round favours neither side
                order = [*sizes, 0] if r % 2 == 0 else [0, *sizes]
                for b in order:
                    if b:
                        x = in_process_run(handler.pipe, inputs, row.params, b)
                        runs[f"in_process_b{b}"].append(x)
                        _row_progress(f"  round {r + 1}: in-process B={b}", x)
                        continue
                    x = burst(client, d.name, inputs, row.params, settle_s=0 if small else 2.5)
                    runs["pipeq"].append(x)
                    _row_progress(f"  round {r + 1}: pipeq", x)
            report["rows"].append(
                {
                    "label": row.label,
                    "task": row.task,
                    "model": real_size.hub_id(row.task),
                    "items": n,
                    "params": row.params,
                    "max_batch_size": d.max_batch_size,
                    "runs": runs,
                    **_row_summary(runs, sizes),
                }
            )
            del handler
            gc.collect()
    _print_real_size(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0


def _row_progress(label: str, x: dict[str, Any]) -> None:
    lat = x["latency_ms"]
    print(
        f"{label:<28} {x['items_per_s']:8.2f} items/s  p50 {lat['p50']:.0f} ms  "
        f"p95 {lat['p95']:.0f} ms",
        flush=True,
    )


def _row_summary(runs: dict[str, list[Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    """Medians of the rounds (of two: their mean, where the rest of the bench takes the
    upper one); the best B by median items/s; pipeq / that round's best in-process, per
    round, and their median."""
    from statistics import median as _median

    rounds = len(runs["pipeq"])

    def rate(key: str) -> float:
        return float(_median([x["items_per_s"] for x in runs[key]]))

    best_b = max(sizes, key=lambda b: rate(f"in_process_b{b}"))
    best = runs[f"in_process_b{best_b}"]
    ratios = [
        runs["pipeq"][i]["items_per_s"]
        / max(runs[f"in_process_b{b}"][i]["items_per_s"] for b in sizes)
        for i in range(rounds)
    ]
    return {
        "best_b": best_b,
        "in_process_items_per_s": rate(f"in_process_b{best_b}"),
        "in_process_p50_ms": _median([x["latency_ms"]["p50"] for x in best]),
        "in_process_p95_ms": _median([x["latency_ms"]["p95"] for x in best]),
        "pipeq_items_per_s": rate("pipeq"),
        "pipeq_p50_ms": _median([x["latency_ms"]["p50"] for x in runs["pipeq"]]),
        "pipeq_p95_ms": _median([x["latency_ms"]["p95"] for x in runs["pipeq"]]),
        "ratio": _median(ratios),
        "ratios": ratios,
        "pipeq_mean_batch_size": _median(
            [x.get("mean_batch_size", float("nan")) for x in runs["pipeq"]]
        ),
    }


def _print_real_size(r: dict[str, Any]) -> None:
    size = "small (tiny layers)" if r["small"] else "real size, random weights"
    print(f"\n{size}; {r['rounds']} round(s); medians; latency from the burst's start")
    print(
        "| task | items | in-process best B | items/s | p50 / p95 ms | pipeq items/s | "
        "p50 / p95 ms | pipeq ÷ in-process (per round) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(
            f"| {x['label']} | {x['items']} | {x['best_b']} | {x['in_process_items_per_s']:.2f} | "
            f"{x['in_process_p50_ms']:.0f} / {x['in_process_p95_ms']:.0f} | "
            f"{x['pipeq_items_per_s']:.2f} | {x['pipeq_p50_ms']:.0f} / {x['pipeq_p95_ms']:.0f} | "
            f"**{x['ratio']:.2f}x** {_fmt(x['ratios'], 2)} |"
        )
