"""`make gpu-check` in its CPU mode: the script a GPU will run, kept from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeq.worker.demo import DEMO_DEPLOYMENTS


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_report(
    models_dir: Path, tmp_path: Path
) -> None:
    """Every section passes on the CPU; the JSON and the Markdown say so, with a row for
    each course task in float32 and bfloat16 and both sharing workers answering."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pipeq.worker.gpu_check", "--cpu", "--models-dir", str(models_dir)],
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] is True and report["mode"] == "cpu"
    rows = report["sections"]["tasks"]["result"]
    assert {r["deployment"] for r in rows} == set(DEMO_DEPLOYMENTS)
    assert all(r["float32_items_per_s"] > 0 and r["bfloat16_items_per_s"] > 0 for r in rows)
    features = next(r for r in rows if r["task"] == "feature-extraction")
    assert features["bf16_min_cosine"] > 0.999  # the real MiniLM, tests/test_model_settings.py
    sharing = report["sections"]["sharing"]["result"]
    assert set(sharing["ready"].values()) == {"ready"}
    assert {a["loaded_dtype"] for a in sharing["announced"].values()} == {"bfloat16"}
    assert sharing["generation_jobs"] > 0 and sharing["classifier_answer"][0]["label"]
    piped = report["sections"]["pipelining"]["result"]["all-MiniLM-L6-v2"]
    assert piped["off"] > 0 and piped["on"] > 0 and len(piped["ratios"]) == 1
    md = (out / "gpu-check.md").read_text()
    assert "Every section passed: **True**" in md
    assert all(f"| {name} |" in md for name in DEMO_DEPLOYMENTS)
