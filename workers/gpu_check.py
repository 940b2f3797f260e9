"""`make gpu-check`: what a GPU shows pipeq, in one command, written down as a report.

    python -m pipeq.worker.gpu_check [--cpu] [--out DIR] [--models-dir DIR]

Made for the few minutes a GPU is at hand: no network (every model is built from a
config, `tiny_models`), nothing installed, each section timed and recorded even when
another fails. Writes `gpu-check.json` and `gpu-check.md` under `--out` (default
`$OUT`, else `build/gpu-check`). Exit status 0 when every section passed, 1 otherwise.

Sections:
  environment  torch, transformers, the device and its memory, flash-attn
  tasks        the course's nine tasks (tiny checkpoints) and, on a GPU, the two
               real-size random-weight ones (distilbert-base, distilgpt2 shapes), each
               loaded in float32 and in bfloat16 on the device: items/s of one batch,
               and bfloat16 against float32 (labels equal, largest score difference)
  sharing      a classifier and a generator on the same device, each capped at
               `SHARE` of it (`gpu_memory_fraction`), as two real workers on one Redis:
               both start, both answer, what each announced and holds; the generator's
               burst of greedy jobs through continuous batching (tokens/s)
  pipelining   a backlog of single-item jobs through a worker's batcher without and
               with `pipelining` (`bench_pipelining.compare`): the packaged MiniLM and,
               on a GPU, the real-size classifier; items/s and each round's ratio

`--cpu` runs the same on the CPU with the tiny checkpoints and small sizes: CI runs it
(tests/test_gpu_check.py) so that the script cannot rot while no GPU is at hand. Not in
it yet: the course's models at their real sizes (issue 23, point 4) and tensor
parallelism (point 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeq._config import Deployment

__all__ = ["SHARE", "main", "run_check"]

#: each of the two sharing workers' gpu_memory_fraction
SHARE = 0.3
#: items a task's batch holds: (CPU, GPU)
BATCH = (4, 32)
#: generation jobs in the sharing burst, and the new tokens of each: (CPU, GPU)
GENERATION_JOBS = (4, 64)
NEW_TOKENS = (8, 64)


def _environment(device: str) -> dict[str, Any]:
    import importlib.util

    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
    }
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(0)
        env |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpu_memory_total_bytes": int(total),
            "gpu_memory_free_bytes": int(free),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return env


def _labels(task: str, result: Any) -> list[str]:
    """The labels an item's result ranks first (for the bf16-fp32 agreement)."""
    if isinstance(result, dict) and "labels" in result:
        return [str(result["labels"][0])]
    if isinstance(result, dict) and "answer" in result:
        return [str(result["answer"])]
    if isinstance(result, list) and result and isinstance(result[0], list):
        result = result[0]
    if isinstance(result, list) and result and isinstance(result[0], dict):
        first = result[0]
        for key in ("label", "entity_group", "token_str", "generated_text", "summary_text"):
            if key in first:
                return [str(first[key])]
        if "translation_text" in first:
            return [str(first["translation_text"])]
    return []


def _scores(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [v for k, v in value.items() if k in ("score", "scores") for v in _flat(v)]
    if isinstance(value, list):
        return [s for v in value for s in _scores(v)]
    return []


def _flat(v: Any) -> list[float]:
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


def _task_rows(
    deployments: dict[str, Deployment], device: str, batch: int, real_size: dict[str, Deployment]
) -> list[dict[str, Any]]:
    from pipeq.worker.bench import bench_inputs, default_params
    from pipeq.worker.handlers import load_handler

    rows = []
    for name, base in {**deployments, **real_size}.items():
        row: dict[str, Any] = {"deployment": name, "task": base.canonical_task}
        try:
            outs: dict[str, Any] = {}
            for dtype in ("float32", "bfloat16"):
                handler = load_handler(dataclasses.replace(base, device=device, dtype=dtype))
                mask = getattr(getattr(handler.pipe, "tokenizer", None), "mask_token", None)
                items = bench_inputs(base.task, batch, mask_token=mask)
                params = default_params(base.task)
                if handler.task in ("summarization", "translation", "text-generation"):
                    params = {"max_new_tokens": 8, "do_sample": False}
                handler.run(items[:2], params)  # warm-up
                started = time.perf_counter()
                outs[dtype] = handler.run(items, params)
                _sync(device)
                row[f"{dtype}_items_per_s"] = round(batch / (time.perf_counter() - started), 1)
                del handler
            a, b = outs["float32"], outs["bfloat16"]
            same = [
                _labels(base.task, x) == _labels(base.task, y) for x, y in zip(a, b, strict=True)
            ]
            diffs = [abs(x - y) for x, y in zip(_scores(a), _scores(b), strict=False)]
            row["bf16_same_first_label"] = f"{sum(same)}/{len(same)}"
            row["bf16_max_score_diff"] = max(diffs) if diffs else None
            if base.canonical_task == "feature-extraction":
                row["bf16_same_first_label"] = "-"
                row["bf16_min_cosine"] = _min_cosine(a, b)
            row["ok"] = True
        except Exception as e:
            row |= {"ok": False, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(f"gpu-check: tasks: {row}", flush=True)
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the sharing workers count on the GPU's free memory
    return rows


def _min_cosine(a: list[Any], b: list[Any]) -> float:
    """The least cosine similarity of two runs' feature vectors, item by item."""
    import numpy as np

    from pipeq._floats import unpack

    def vector(x: Any) -> Any:
        return np.asarray(unpack(x) if isinstance(x, dict) else x, dtype=np.float64).ravel()

    cosines = []
    for x, y in zip(a, b, strict=True):
        u, v = vector(x), vector(y)
        cosines.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
    return min(cosines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _sharing(
    classifier: Deployment, generator: Deployment, device: str, jobs: int, new_tokens: int
) -> dict[str, Any]:
    """Two real workers on one device, each capped at SHARE; both must answer."""
    from pipeq import Client
    from pipeq._stack import Stack, free_port_from
    from pipeq.worker.demo import write_config

    shared = {
        d.name: dataclasses.replace(d, device=device, gpu_memory_fraction=SHARE, dtype="bfloat16")
        for d in (classifier, generator)
    }
    out: dict[str, Any] = {"share": SHARE, "deployments": sorted(shared)}
    with tempfile.TemporaryDirectory(prefix="pipeq-gpu-check-") as tmp:
        config = write_config(shared, Path(tmp) / "gpu-check.toml")
        stack = Stack(
            shared,
            str(config),
            redis_port=free_port_from(6600),
            flower_port=None,
            exporter_port=None,
        )
        try:
            started = time.monotonic()
            stack.start()
            status = stack.wait_ready(timeout_s=300)
            out["ready"] = status
            out["start_s"] = round(time.monotonic() - started, 1)
            if any(v != "ready" for v in status.values()):
                raise RuntimeError(f"workers did not start: {status}")
            with Client(stack.url) as client:
                announced = client.deployments()
                keys = ("loaded_dtype", "gpu_memory_cap_bytes", "loaded_attn_implementation")
                out["announced"] = {n: {k: announced[n].info.get(k) for k in keys} for n in shared}
                uncapped = [n for n, a in out["announced"].items() if not a["gpu_memory_cap_bytes"]]
                if device.startswith("cuda") and uncapped:
                    raise RuntimeError(f"workers without a GPU memory cap: {uncapped}")
                label = client.submit(classifier.name, "a good movie").result(timeout=120)
                prompts = [f"prompt {i}: the course is about" for i in range(jobs)]
                t0 = time.perf_counter()
                sent = [
                    client.submit(generator.name, p, max_new_tokens=new_tokens, do_sample=False)
                    for p in prompts
                ]
                texts = [j.result(timeout=300) for j in sent]
                elapsed = time.perf_counter() - t0
                out["classifier_answer"] = label
                out["generation_jobs"] = len(texts)
                out["generation_tokens_per_s"] = round(jobs * new_tokens / elapsed, 1)
                time.sleep(2.5)  # a heartbeat: each worker's memory as it holds it now
                out["stats"] = {
                    n: {
                        k: v
                        for s in client.registry.stats(n).values()
                        for k, v in s.items()
                        if k.startswith("gpu_memory") or k in ("batches", "items")
                    }
                    for n in shared
                }
            out["ok"] = True
        finally:
            stack.stop()
    return out


def run_check(cpu: bool, models_dir: Path) -> dict[str, Any]:
    """Every section, each caught and recorded; the report as a dict."""
    from pipeq.worker import tiny_models
    from pipeq.worker.demo import demo_config

    device = "cpu" if cpu else "cuda:0"
    size = 0 if cpu else 1
    report: dict[str, Any] = {"mode": "cpu" if cpu else "gpu", "sections": {}}

    def section(name: str, body: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            report["sections"][name] = {"ok": True, "result": body()}
        except Exception as e:
            report["sections"][name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=5),
            }
        report["sections"][name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"gpu-check: {name}: {report['sections'][name]['seconds']} s", flush=True)

    section("environment", lambda: _environment(device))
    deployments = demo_config(models_dir)
    real_size: dict[str, Deployment] = {}
    if not cpu:
        for name in (tiny_models.BENCH_SENTIMENT, tiny_models.BENCH_GENERATOR):
            task = tiny_models.TINY_MODELS[name]
            path = tiny_models.build(name, models_dir)
            real_size[name] = Deployment(name=name, task=task, model=str(path), batching="dynamic")

    def tasks() -> list[dict[str, Any]]:
        rows = _task_rows(deployments, device, BATCH[size], real_size)
        if not all(r["ok"] for r in rows):
            raise RuntimeError(f"tasks failed: {[r['deployment'] for r in rows if not r['ok']]}")
        return rows

    section("tasks", tasks)
    generator = deployments["distilgpt2"]
    if not cpu:
        generator = Deployment(
            name="distilgpt2",
            task="text-generation",
            model=str(tiny_models.build(tiny_models.BENCH_GENERATOR, models_dir)),
        )
    section(
        "sharing",
        lambda: _sharing(
            deployments["sentiment-analysis"],
            generator,
            device,
            GENERATION_JOBS[size],
            NEW_TOKENS[size],
        ),
    )
    section("pipelining", lambda: _pipelining(cpu, device, models_dir))
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    return report


def _pipelining(cpu: bool, device: str, models_dir: Path) -> dict[str, Any]:
    """`bench_pipelining.compare` on the device: {checkpoint: {off, on, ratios}}."""
    from pipeq.worker import bench_pipelining, tiny_models

    names = [None] if cpu else [None, tiny_models.BENCH_SENTIMENT]
    jobs, batch, rounds = (24, 4, 1) if cpu else (1024, 32, 3)
    out = {}
    for name in names:
        handler = bench_pipelining.load(name, models_dir, device)
        out[name or "all-MiniLM-L6-v2"] = bench_pipelining.compare(handler, jobs, batch, rounds)
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the environment, the task table, the sharing run."""
    s = report["sections"]
    lines = [f"# pipeq gpu-check ({report['mode']} mode)", ""]
    lines.append(f"Every section passed: **{report['ok']}**.")
    lines.append("")
    env = s["environment"].get("result") or {}
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Tasks, float32 and bfloat16", ""]
    rows = s["tasks"].get("result") or []
    lines += [
        "| deployment | task | float32 items/s | bfloat16 items/s | bf16 first label = fp32 "
        "| bf16 max score diff | bf16 min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff, cosine = r.get("bf16_max_score_diff"), r.get("bf16_min_cosine")
        lines.append(
            f"| {r['deployment']} | {r['task']} | {r.get('float32_items_per_s', '-')} "
            f"| {r.get('bfloat16_items_per_s', '-')} | {r.get('bf16_same_first_label', '-')} "
            f"| {'-' if diff is None else f'{diff:.2e}'} "
            f"| {'-' if cosine is None else f'{cosine:.6f}'} |"
        )
    if not s["tasks"]["ok"]:
        lines += ["", f"Failed: `{s['tasks']['error']}`"]
    lines += ["", "## A classifier and a generator sharing the device", ""]
    share = s["sharing"]
    if share["ok"]:
        lines.append("```json")
        lines.append(json.dumps(share["result"], indent=2, default=str))
        lines.append("```")
    else:
        lines.append(f"Failed: `{share['error']}`")
    lines += ["", "## Pipelining off and on (items/s of a backlog, the batcher alone)", ""]
    piped = s["pipelining"]
    if piped["ok"]:
        lines += ["| model | off | on | on/off per round |", "|---|---|---|---|"]
        for name, r in piped["result"].items():
            ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
            lines.append(f"| {name} | {r['off']:.1f} | {r['on']:.1f} | {ratios} |")
    else:
        lines.append(f"Failed: `{piped['error']}`")
    lines += ["", "Section times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in s.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeq.worker.gpu_check", description=__doc__)
    p.add_argument("--cpu", action="store_true", help="the CPU and small sizes (CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or "build/gpu-check")
    p.add_argument("--models-dir", default=".cache/pipeq-models")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_check(args.cpu, Path(args.models_dir))
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))
    print(f"gpu-check: report in {out}/gpu-check.md; every section passed: {report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
