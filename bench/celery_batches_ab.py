"""pipeq's worker against a prefork worker with `celery-batches`, side by side in one run.

Measures throughput (items/s, first submit to last result) of N single-text jobs sent in
one burst, on the same model and inputs, over one Redis (a real redis-server):

  pipeq          pipeq's worker, started as `pipeq bench` starts it (threads pool, batcher
                 thread, items sorted by token length among 8 x max_batch_size jobs);
  batches        `celery -A ... worker --pool=prefork --concurrency=1`, a `Batches` task
                 with flush_every=32, flush_interval=--flush-interval (0.05 s by default),
                 one `pipeline(texts, batch_size=len(batch))` per flush, unsorted;
  batches_sorted the same worker's second `Batches` task, flush_every=--sort-pool (256,
                 pipeq's pool), texts sorted by token length, then run in batches of 32.
                 (Sorting a flush of 32 run as one batch of 32 changes nothing: the
                 whole batch pads to its longest text either way.)

The celery-batches child loads `transformers.pipeline("text-classification", device="cpu")`
in `worker_process_init` (never in the parent) and stores each request's result itself
(`backend.mark_as_done`); its prefetch is 2 x the largest flush_every, acks late as pipeq.
Both producers send the same way (pipeq's `Client.submit` / `Job.result`; here
`apply_async`, then a fresh `AsyncResult(id).get()`, the pattern pipeq's client uses).
Each round runs every contender once, one at a time, in alternating order; per-round
items/s, per-round ratios pipeq / other and their medians are printed. Results of both
workers are checked against in-process `pipe(text)` for the first texts.

Run (from the repository root; `pip install --no-deps celery-batches==0.11` first:
it declares celery<5.7 and would otherwise downgrade pipeq's pinned celery 5.7.0):

    .venv/bin/python bench/celery_batches_ab.py --jobs 512 --rounds 3
    # smoke test: a tiny model
    .venv/bin/python bench/celery_batches_ab.py \\
        --model distilbert-base-uncased-finetuned-sst-2-english --jobs 64 --rounds 1
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median_high
from typing import Any

from celery import Celery, signals
from celery_batches import Batches

from pipeq import Client, _app
from pipeq._client import drop_result_channels
from pipeq._config import Deployment
from pipeq._stack import Stack, exit_on_sigterm, free_port_from, start_redis, stop_process
from pipeq.worker import tiny_models
from pipeq.worker.bench import bench_inputs, burst
from pipeq.worker.demo import write_config

QUEUE = "ab.batches"
BATCH = 32  # flush_every of `batches`, pipeq's max_batch_size, batch size of `batches_sorted`
CHECK = 16  # results compared with in-process pipe(text): same label, score within 1e-4
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",  # pipeq's worker sets it itself
    "CUDA_VISIBLE_DEVICES": "",  # as pipeq's worker for a CPU deployment
}
CONTENDERS = ("pipeq", "batches", "batches_sorted")

_pipe: Any = None  # the celery-batches child's pipeline


def sizes_key(task_name: str) -> str:
    return f"ab:sizes:{task_name}"  # batch size -> count, written by the child


def make_batches_app(url: str, flush_interval: float, sort_pool: int) -> tuple[Celery, dict]:
    """pipeq's Celery settings (JSON, Redis broker and backend, acks late), its own queue,
    and prefetch enough for two flushes of the largest flush_every."""
    app = _app.make_app(
        url, task_default_queue=QUEUE, worker_prefetch_multiplier=2 * max(BATCH, sort_pool)
    )

    def serve(name: str, requests: list[Any], *, sort: bool) -> None:
        texts = [r.args[0] for r in requests]
        order = list(range(len(texts)))
        if sort:
            lengths = [len(ids) for ids in _pipe.tokenizer(texts)["input_ids"]]
            order.sort(key=lengths.__getitem__)
        app.backend.client.hincrby(sizes_key(name), len(requests), 1)
        outs = _pipe([texts[i] for i in order], batch_size=BATCH if sort else len(texts))
        for i, out in zip(order, outs, strict=True):  # [out]: what pipe(one text) returns
            app.backend.mark_as_done(requests[i].id, [out], request=requests[i])

    @app.task(base=Batches, name="batches", flush_every=BATCH, flush_interval=flush_interval)
    def batches(requests: list[Any]) -> None:
        serve("batches", requests, sort=False)

    @app.task(
        base=Batches, name="batches_sorted", flush_every=sort_pool, flush_interval=flush_interval
    )
    def batches_sorted(requests: list[Any]) -> None:
        serve("batches_sorted", requests, sort=True)

    return app, {"batches": batches, "batches_sorted": batches_sorted}


def run_batches_worker(url: str, model: str, flush_interval: str, sort_pool: str) -> None:
    """The celery-batches worker process (this script, run with `_worker`)."""
    logging.basicConfig(level=logging.WARNING)
    app, _ = make_batches_app(url, float(flush_interval), int(sort_pool))

    @signals.worker_process_init.connect(weak=False)
    def load(**_: Any) -> None:  # in the child: nothing of torch exists in the parent
        global _pipe
        from transformers import pipeline

        _pipe = pipeline("text-classification", model=model, device="cpu")

    assert "torch" not in sys.modules, "torch imported in the prefork parent"
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={QUEUE}",
            f"--hostname=ab-batches.{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )


def batches_burst(app: Celery, task: Any, inputs: list[str]) -> dict[str, Any]:
    """Every text its own job at once; time until the last result, batch sizes formed."""
    app.backend.client.delete(sizes_key(task.name))
    started = time.perf_counter()
    ids = [task.apply_async((text,), task_id=str(uuid.uuid4())).id for text in inputs]
    results = [app.AsyncResult(i).get(timeout=600, interval=0.05) for i in ids]
    elapsed = time.perf_counter() - started
    sizes = app.backend.client.hgetall(sizes_key(task.name))
    return {
        "items_per_s": len(inputs) / elapsed,
        "batch_sizes": dict(sorted((int(k), int(v)) for k, v in sizes.items())),
        "results": results,
    }


def wait_for_worker(task: Any, text: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """One job through the celery-batches worker: its child has loaded the model."""
    job = task.apply_async((text,))
    deadline = time.monotonic() + 300
    while not job.ready():
        if worker.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"celery-batches worker not serving:\n{tail}")
        time.sleep(0.2)


def check(label: str, results: list[Any], expected: list[Any]) -> None:
    pairs = list(zip(results, expected, strict=True))
    same = all(r[0]["label"] == e[0]["label"] for r, e in pairs)
    diff = max(abs(r[0]["score"] - e[0]["score"]) for r, e in pairs)
    print(
        f"  {label}: first {len(pairs)} results against in-process pipe(text): labels "
        f"{'equal' if same else 'DIFFER'}, max |score difference| {diff:.1e}"
    )
    if not same or diff > 1e-4:  # random weights: scores differ text to text, by > 1e-3
        raise SystemExit(f"{label}: {results} != {expected}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=tiny_models.BENCH_SENTIMENT, help="a tiny_models name")
    p.add_argument("--models-dir", default=".cache/pipeq-models")
    p.add_argument("--jobs", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--flush-interval", type=float, default=0.05, help="seconds")
    p.add_argument("--sort-pool", type=int, default=8 * BATCH, help="flush_every, sorted")
    args = p.parse_args()
    os.environ.update(ENV)
    model = str(tiny_models.build(args.model, Path(args.models_dir).resolve()))
    inputs = bench_inputs("text-classification", args.jobs)
    from transformers import pipeline  # the reference, in this process only

    reference = pipeline("text-classification", model=model, device="cpu")
    expected = [reference(t) for t in inputs[:CHECK]]
    del reference
    d = Deployment(name="ab-pipeq", task="text-classification", model=model)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="pipeq-ab-") as tmp:
        port = free_port_from(6500)
        url = f"redis://127.0.0.1:{port}/0"
        config = write_config({d.name: d}, Path(tmp) / "ab.toml")
        stack = Stack({d.name: d}, str(config), redis_url=url, log_dir=Path(tmp), flower_port=None)
        log = Path(tmp) / "batches.log"
        app, tasks = make_batches_app(url, args.flush_interval, args.sort_pool)
        redis_proc = start_redis(port, Path(tmp))
        worker = None
        try:
            with open(log, "wb") as out:
                cmd = [sys.executable, __file__, "_worker", url, model]
                cmd += [str(args.flush_interval), str(args.sort_pool)]
                worker = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            stack.start()
            status = stack.wait_ready()
            if status[d.name] != "ready":
                raise RuntimeError(f"pipeq worker: {status}")
            wait_for_worker(tasks["batches"], inputs[0], worker, log)
            with Client(url) as client:
                print(f"warm-up: {args.jobs} jobs through each; results:", flush=True)
                burst(client, d.name, inputs, {})
                results = [client.submit(d.name, t).result(timeout=60) for t in inputs[:CHECK]]
                check("pipeq", results, expected)
                for name, task in tasks.items():
                    check(name, batches_burst(app, task, inputs)["results"][:CHECK], expected)
                for r in range(args.rounds):
                    order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
                    for c in order:
                        if c == "pipeq":
                            runs[c].append(burst(client, d.name, inputs, {}))
                        else:
                            runs[c].append(batches_burst(app, tasks[c], inputs))
                    rates = ", ".join(f"{c} {runs[c][-1]['items_per_s']:.1f}" for c in order)
                    print(f"round {r + 1}/{args.rounds}: {rates} items/s", flush=True)
        finally:
            drop_result_channels(app)  # as Client.close: no reconnects later
            app.close()
            if worker is not None:
                stop_process(worker)
            stack.stop()
            stop_process(redis_proc)
    report(args, runs)
    return 0


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    def fmt(values: list[float], digits: int = 1) -> str:
        return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"

    rates = {c: [x["items_per_s"] for x in runs[c]] for c in CONTENDERS}
    print(
        f"\n{args.jobs} jobs, {args.rounds} rounds, model {args.model}; "
        f"flush_interval {args.flush_interval} s, sort pool {args.sort_pool}"
    )
    print("items/s: median   per round")
    for c in CONTENDERS:
        print(f"  {c:<15} {median_high(rates[c]):7.1f}   {fmt(rates[c])}")
    for c in CONTENDERS[1:]:
        ratios = [a / b for a, b in zip(rates["pipeq"], rates[c], strict=True)]
        print(f"  pipeq / {c:<15} {median_high(ratios):.2f}x   per round {fmt(ratios, 2)}")
    print("batch sizes formed, last round (size: count):")
    for c in CONTENDERS:
        print(f"  {c:<15} {runs[c][-1]['batch_sizes']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        run_batches_worker(*sys.argv[2:])
    else:
        sys.exit(main())
