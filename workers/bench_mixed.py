"""`pipeq bench --tiny distilgpt2-random --workload mixed`: generation as it is used.

N jobs in one burst: half sampled (temperature uniform in 0.6-1.2, top_p in 0.8-1.0, a
seed each), a quarter chats (greedy), a quarter greedy prompts with stop strings; each
job's `max_new_tokens` uniform in 8-64, `return_full_text=False`. Contenders, one at a
time a round:

- pipeq, batching=continuous: every job of the mix runs in transformers' continuous batch;
- pipeq, batching=dynamic: what the mix got before (its routing sent all of it, sampled,
  chats and stop strings, to the dynamic batcher), so "today's routing";
- pipeq, batching=continuous on the greedy workload of `pipeq bench` with the same
  prompts and budgets (the mix's target is 0.9x of it);
- in-process `pipeline(chunk, batch_size=B)` at each B, a chunk of one kind at a time
  (sampled chunks with their first job's temperature, top_p and seed: one call takes one).

Useful tokens/s, first streamed token and latency p50/p95, as `pipeq bench`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from statistics import median_high as _median
from typing import Any

from pipeq._config import Deployment
from pipeq.worker.bench import (
    NEW_TOKENS,
    _fmt,
    _generated_text,
    _generation_figures,
    _progress,
    bench_inputs,
    generation_burst,
    generation_params,
    running_stack,
)

__all__ = ["mixed_main", "mixed_workload"]

MIXED_SEED = 21
STOP_STRINGS = [".", "!", "?"]


def mixed_workload(n: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """n jobs (kind, input, params): sampled, chat, stop, interleaved (fixed seeds)."""
    rng = random.Random(MIXED_SEED)
    texts = [str(t) for t in bench_inputs("text-generation", n)]
    jobs: list[tuple[str, Any, dict[str, Any]]] = []
    for i, text in enumerate(texts):
        new = rng.randint(*NEW_TOKENS)
        base: dict[str, Any] = {"max_new_tokens": new, "return_full_text": False}
        kind = ("sampled", "chat", "sampled", "stop")[i % 4]
        if kind == "sampled":
            params = {
                **base,
                "do_sample": True,
                "temperature": round(rng.uniform(0.6, 1.2), 2),
                "top_p": round(rng.uniform(0.8, 1.0), 2),
                "seed": rng.randrange(2**31),
            }
            jobs.append((kind, text, params))
        elif kind == "chat":
            chat = [{"role": "user", "content": text}]
            jobs.append((kind, chat, {**base, "do_sample": False}))
        else:
            jobs.append((kind, text, {**base, "do_sample": False, "stop_strings": STOP_STRINGS}))
    return jobs


def in_process_mixed(
    pipe: Any, jobs: list[tuple[str, Any, dict[str, Any]]], batch_size: int
) -> dict[str, Any]:
    """Each kind's jobs in order, `batch_size` a call (the chunk's largest budget, its
    first job's sampling parameters); a job's end: its chunk's end."""
    import torch

    ends = [0.0] * len(jobs)
    texts = [""] * len(jobs)
    started = time.perf_counter()
    for kind in ("sampled", "chat", "stop"):
        mine = [i for i, j in enumerate(jobs) if j[0] == kind]
        for at in range(0, len(mine), batch_size):
            chunk = mine[at : at + batch_size]
            params = dict(jobs[chunk[0]][2])
            params["max_new_tokens"] = max(jobs[i][2]["max_new_tokens"] for i in chunk)
            if "seed" in params:
                torch.manual_seed(params.pop("seed"))
            if "stop_strings" in params:
                params["tokenizer"] = pipe.tokenizer
            out = pipe([jobs[i][1] for i in chunk], batch_size=batch_size, **params)
            done = time.perf_counter() - started
            for i, o in zip(chunk, out, strict=True):
                texts[i], ends[i] = _generated_text(o), done
    elapsed = time.perf_counter() - started
    budgets = [j[2]["max_new_tokens"] for j in jobs]
    return _generation_figures(pipe.tokenizer, budgets, texts, ends, ends, elapsed)


def mixed_main(
    d: Deployment,
    pipe: Any,
    n: int,
    rounds: int,
    sizes: list[int],
    json_path: str | None,
) -> int:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    jobs = mixed_workload(n)
    inputs = [j[1] for j in jobs]
    params = [j[2] for j in jobs]
    budgets = [p["max_new_tokens"] for p in params]
    prompts = [str(t) for t in bench_inputs("text-generation", n)]
    greedy = [generation_params(b) for b in budgets]
    workers = {
        "continuous": dataclasses.replace(d, batching="continuous"),
        "dynamic": dataclasses.replace(d, name=f"{d.name}-dynamic", batching="dynamic"),
    }
    runs: dict[str, list[Any]] = {f"in_process_b{b}": [] for b in sizes}
    runs.update({"continuous": [], "dynamic": [], "continuous_greedy": []})
    same_seeded: list[int] = []  # sampled jobs with the same text on both engines
    tok = pipe.tokenizer
    with running_stack({w.name: w for w in workers.values()}) as client:
        print("warm-up: a few jobs in-process and through each worker ...", flush=True)
        in_process_mixed(pipe, jobs[:16], max(sizes))
        for w in workers.values():
            generation_burst(client, w.name, inputs[:16], budgets[:16], tok, params[:16])
        for r in range(rounds):
            for b in sizes:
                print(f"round {r + 1}/{rounds}: in-process batch_size={b} ...", flush=True)
                runs[f"in_process_b{b}"].append(in_process_mixed(pipe, jobs, b))
                _progress(runs[f"in_process_b{b}"][-1])
            texts = {}
            for kind, w in workers.items():
                print(f"round {r + 1}/{rounds}: pipeq {kind}, mixed ...", flush=True)
                figures, texts[kind] = generation_burst(
                    client, w.name, inputs, budgets, tok, params
                )
                runs[kind].append(figures)
                _progress(figures)
            sampled = [i for i, j in enumerate(jobs) if j[0] == "sampled"]
            same_seeded.append(sum(texts["continuous"][i] == texts["dynamic"][i] for i in sampled))
            print(f"round {r + 1}/{rounds}: pipeq continuous, greedy only ...", flush=True)
            figures, _ = generation_burst(client, d.name, prompts, budgets, tok, greedy)
            runs["continuous_greedy"].append(figures)
            _progress(figures)
    report = {
        "workload": "mixed",
        "deployment": dataclasses.asdict(d),
        "jobs": n,
        "cpu_threads": os.cpu_count(),
        "runs": runs,
        "sampled_identical_on_both_engines": same_seeded,
    }
    _print(report, sizes)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0


def _print(r: dict[str, Any], sizes: list[int]) -> None:
    runs, n = r["runs"], r["jobs"]
    print(
        f"\n{n} jobs a burst, {len(runs['continuous'])} rounds, {r['cpu_threads']} CPU threads: "
        "1/2 sampled (seeded), 1/4 chats, 1/4 greedy with stop strings; max_new_tokens 8-64"
    )
    labels = {f"in_process_b{b}": f"in-process pipeline(batch_size={b})" for b in sizes}
    labels.update(
        continuous="pipeq continuous, mixed",
        dynamic="pipeq dynamic, mixed (today's routing)",
        continuous_greedy="pipeq continuous, greedy only",
    )
    print("useful tokens/s, median of the rounds            first token p50/p95   latency p50/p95")
    for key, label in labels.items():
        xs = runs[key]
        rate = _median([x["tokens_per_s"] for x in xs])
        t = [_median([x["ttft_ms"][q] for x in xs]) for q in ("p50", "p95")]
        e = [_median([x["latency_ms"][q] for x in xs]) for q in ("p50", "p95")]
        print(
            f"  {label:<40} {rate:7.1f} {_fmt([x['tokens_per_s'] for x in xs])}"
            f"  {t[0]:6.0f}/{t[1]:<6.0f}  {e[0]:6.0f}/{e[1]:.0f} ms"
        )
    cont, dyn, greedy = runs["continuous"], runs["dynamic"], runs["continuous_greedy"]
    targets = (
        ("continuous / today's routing tokens/s", ">= 2.5", cont, dyn, "tokens_per_s", False),
        ("continuous mixed / greedy-only tokens/s", ">= 0.9", cont, greedy, "tokens_per_s", False),
        ("continuous first-token p95 / today's", "<= 0.33", cont, dyn, "ttft_ms", True),
    )
    print("targets, median of the per-round ratios")
    for label, target, a, b, key, p95 in targets:
        ratios = [
            (x[key]["p95"] / y[key]["p95"]) if p95 else x[key] / y[key]
            for x, y in zip(a, b, strict=True)
        ]
        print(f"  {label:<42} {_median(ratios):5.2f}x (target {target})  {_fmt(ratios, 2)}")
    for key in ("continuous", "dynamic", "continuous_greedy"):
        last = runs[key][-1]
        failed = f", {len(last['failed'])} FAILED" if last.get("failed") else ""
        print(f"  {key}: mean batch size {last['mean_batch_size']:.1f}{failed}")
    print(
        "sampled jobs with the same text on both engines (per round): "
        f"{r['sampled_identical_on_both_engines']} of {n // 2}"
    )
