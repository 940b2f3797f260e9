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
