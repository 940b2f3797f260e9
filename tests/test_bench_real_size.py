"""`pipeq bench --real-size`: the course's nine models at their real size (docs/batching.md).
CI runs its `--small` mode (tiny layers, the real vocabularies) on two tasks, so the code
that makes the table cannot rot; no figure is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeq._config import DEFAULT_MODELS
from pipeq.worker import real_size


def test_each_course_task_has_the_config_of_its_course_model() -> None:
    for task, name in real_size.REAL_SIZE.items():
        config = json.loads(real_size.config_path(name).read_text())
        assert config["_hub_id"] == DEFAULT_MODELS[task], task
        assert config["architectures"] and config["vocab_size"] > 28000, task


def test_the_small_real_size_bench_makes_a_row_per_task(models_dir: Path, tmp_path: Path) -> None:
    """A native pipeline (sentiment-analysis) and one of pipeq's own (translation, whose
    Marian tokenizer is padded to the real 59,514 pieces): both contenders ran every item."""
    out = tmp_path / "real-size.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pipeq", "bench", "--real-size", "--small", "--rounds", "1"),
            *("--tasks", "sentiment-analysis,translation"),
            *("--models-dir", str(models_dir), "--json", str(out)),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["small"] is True
    assert [r["task"] for r in report["rows"]] == ["sentiment-analysis", "translation"]
    for row in report["rows"]:
        assert row["items"] > 0 and row["best_b"] in (1, 4)
        assert row["pipeq_items_per_s"] > 0 and row["in_process_items_per_s"] > 0
        assert row["ratio"] > 0 and row["pipeq_p95_ms"] >= row["pipeq_p50_ms"]
    marian = models_dir / real_size.checkpoint("translation", small=True)
    vocab = json.loads((marian / "vocab.json").read_text())
    assert len(vocab) == json.loads((marian / "config.json").read_text())["vocab_size"] == 59514
    assert vocab["<pad>"] == 59513
    assert "| translation |" in done.stdout
