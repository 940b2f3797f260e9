"""Pipelining on and off, side by side: a worker's batcher with a backlog of single-item
jobs, `pipelining = false` then `true` in each round (the same handler, inputs and batch
size), items/s and each round's ratio.

Only the batcher and the model run (no Redis, no Celery): what pipelining changes is the
batcher thread's own work, and the rest of a worker is the same either way. The models:
the packaged all-MiniLM-L6-v2 (feature-extraction, real size) and tiny ones of the other
staged tasks (`--models-dir`, built if missing):

    .venv/bin/python -m pipeq.worker.bench_pipelining --rounds 5 --jobs 512

`make gpu-check` runs `compare` on the device (its "pipelining" section).

On a GPU the forward pass is short next to tokenizing and post-processing on the CPU,
which pipelining takes off the model's thread; on a CPU the forward pass takes every
core (torch's intra-op threads), and the other two steps compete with it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median
from typing import Any

from pipeq._config import Deployment
from pipeq.worker import tiny_models
from pipeq.worker.batcher import Batcher
from pipeq.worker.bench import bench_inputs
from pipeq.worker.handlers import Handler, load_handler

CHECKPOINTS = {
    "minilm (feature-extraction, real size)": None,
    "ner (tiny)": "bert-large-cased-finetuned-conll03-english",
    "sentiment-analysis (tiny)": "distilbert-base-uncased-finetuned-sst-2-english",
    "fill-mask (tiny)": "distilroberta-base",
}


def load(checkpoint: str | None, models_dir: Path, device: str) -> Handler:
    """The handler of a tiny (or real-size) checkpoint, None: the packaged MiniLM."""
    if checkpoint is None:
        path, task = tiny_models.minilm_path(), "feature-extraction"
    else:
        path, task = tiny_models.build(checkpoint, models_dir), tiny_models.TINY_MODELS[checkpoint]
    return load_handler(Deployment(name="ab", task=task, model=str(path), device=device))


def _burst(handler: Handler, inputs: list[Any], batch: int, pipelined: bool) -> float:
    """Items/s of `inputs` as single-item jobs through a batcher, all submitted at once."""
    stage = handler.stage if pipelined else None
    batcher = Batcher(handler.run, max_batch_size=batch, max_batch_wait_ms=0, stage=stage)
    batcher.start()
    try:
        started = time.perf_counter()
        jobs = [batcher.submit(f"j{i}", [x], {}) for i, x in enumerate(inputs)]
        for job in jobs:
            job.futures[0].result(timeout=600)
        return len(inputs) / (time.perf_counter() - started)
    finally:
        batcher.stop()


def compare(handler: Handler, jobs: int, batch: int, rounds: int) -> dict[str, Any]:
    """Items/s without and with pipelining, `rounds` times side by side, after a warm-up
    of each: {"off": median, "on": median, "ratios": each round's on / off}."""
    mask = getattr(getattr(handler.pipe, "tokenizer", None), "mask_token", None)
    inputs = bench_inputs(handler.task, jobs, mask_token=mask)
    _burst(handler, inputs[: 2 * batch], batch, False)
    _burst(handler, inputs[: 2 * batch], batch, True)
    off, on = [], []
    for _ in range(rounds):
        off.append(_burst(handler, inputs, batch, False))
        on.append(_burst(handler, inputs, batch, True))
    return {
        "off": median(off),
        "on": median(on),
        "ratios": [round(b / a, 3) for a, b in zip(off, on, strict=True)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models-dir", default=".cache/pipeq-models")
    ap.add_argument("--only", help="a substring of the models' names to run")
    ap.add_argument("--json")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    for name, checkpoint in CHECKPOINTS.items():
        if args.only and args.only not in name:
            continue
        handler = load(checkpoint, Path(args.models_dir), args.device)
        report[name] = found = compare(handler, args.jobs, args.batch, args.rounds)
        print(
            f"{name:40} off {found['off']:7.1f} items/s   on {found['on']:7.1f} items/s   "
            f"on/off per round: {', '.join(f'{r:.2f}' for r in found['ratios'])}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
