"""The producer side installs without torch or transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_pipeq_pulls_neither_torch_nor_transformers(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT)],
        check=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    installed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "pipeq==" in installed
    for heavy in ("torch==", "transformers==", "tokenizers==", "numpy=="):
        assert heavy not in installed
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "from pipeq import Client, pipeline; import sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "[]"


@pytest.mark.parametrize("gpu", [False, True])
def test_make_install_picks_the_cpu_build_of_torch_without_a_gpu(gpu: bool, tmp_path: Path) -> None:
    """PyPI's torch==2.13.0 is the CUDA 13 build (gigabytes of nvidia-* packages): a
    machine without a GPU gets the CPU build from PyTorch's CPU index, one with a GPU
    (nvidia-smi on PATH) PyPI's CUDA build."""
    path = os.environ["PATH"]
    if gpu:
        fake = tmp_path / "nvidia-smi"  # stands for the driver's tool, which make looks for
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        path = f"{tmp_path}{os.pathsep}{path}"
    elif any(Path(d, "nvidia-smi").exists() for d in path.split(os.pathsep)):
        pytest.skip("this machine has nvidia-smi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    planned = subprocess.run(
        ["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**env, "PATH": path},
    ).stdout
    torch_lines = [line for line in planned.splitlines() if '"torch==' in line]
    assert torch_lines, planned
    if gpu:
        assert all('"torch==2.13.0"' in line and "whl/cpu" not in line for line in torch_lines)
    else:
        assert all('"torch==2.13.0+cpu"' in line for line in torch_lines), torch_lines
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in planned


def test_the_environment_this_suite_runs_in_has_no_cuda_packages_without_a_gpu() -> None:
    import importlib.metadata

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    names = [d.metadata["Name"].lower() for d in importlib.metadata.distributions()]
    assert not [n for n in names if n.startswith("nvidia-")], names
    assert torch.__version__.endswith("+cpu"), torch.__version__
