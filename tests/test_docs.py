"""Every code block of README.md and docs/*.md runs as written, or is marked illustrative
and at least parses. The mark is an HTML comment on the line before the block (GitHub
does not show it):

    <!-- runs -->                 the block runs: Python (`python -`) and shell (`bash -e`),
                                  from the repository's root, against the course's tasks
                                  on tiny models (the test session's stack: the deployments
                                  `pipeq up --tiny` serves), with $PIPEQ_REDIS_URL naming it
                                  and its Flower (`celery -A pipeq._flower flower`) where
                                  the block says 127.0.0.1:5555
    <!-- illustrative: why -->    it cannot run here (a GPU, a cluster, minutes of
                                  benchmark, sample output...), and says why; it must parse
                                  as its info string says (`PARSERS`); a block without one
                                  (or `text`) is text

A block with neither mark fails `test_every_code_block_is_marked`: a new block either runs
or says why not.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from pipeq._config import load_deployments
from pipeq._stack import Stack, stop_process

from .conftest import ROOT, flower_by_hand, start_gateway

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*(runs|illustrative:\s*(?P<why>\S.*?))\s*-->\s*$")
#: the documented default address of Flower, replaced by the test's own
FLOWER_DEFAULT = "127.0.0.1:5555"
#: the documented default address of `pipeq serve`, replaced by the test's own (no keys)
GATEWAY_DEFAULT = "127.0.0.1:8000"
RUN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str  # the info string's first word ("" for none)
    code: str
    mark: str | None  # "runs", "illustrative", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    found = []
    for before, token in zip([None, *tokens], tokens, strict=False):
        if token.type not in ("fence", "code_block"):
            continue
        mark = None
        if before is not None and before.type == "html_block":
            matched = MARK.match(before.content.strip())
            mark = matched.group(1).split(":")[0] if matched else None
        lang = token.info.split()[0] if token.info.strip() else ""
        assert token.map is not None
        found.append(Block(path, token.map[0] + 1, lang, token.content, mark))
    return found


BLOCKS = [b for path in DOCS for b in blocks_of(path)]


def _params(mark: str) -> list[object]:
    return [pytest.param(b, id=f"{b.where}-{b.lang or 'text'}") for b in BLOCKS if b.mark == mark]


def test_every_code_block_is_marked() -> None:
    unmarked = [f"{b.where} ({b.lang or 'no info string'})" for b in BLOCKS if b.mark is None]
    assert not unmarked, (
        "code blocks with neither `<!-- runs -->` nor `<!-- illustrative: why -->` on the "
        f"line before them (tests/test_docs.py): {unmarked}"
    )
    assert len(BLOCKS) > 20  # the collection found the docs' blocks


# --- illustrative: parse ----------------------------------------------------------------


def _python(code: str, tmp: Path) -> None:
    ast.parse(code)


def _toml(code: str, tmp: Path) -> None:
    """A TOML block is a pipeq config, read as `pipeq worker --config` reads it, or, with
    a [webhooks] table, a gateway's webhooks file, read as `pipeq serve --webhooks` does."""
    if "webhooks" in tomllib.loads(code):
        from pipeq.serve._webhooks import parse_webhooks

        parse_webhooks(code, "doc.toml")
        return
    path = tmp / "doc.toml"
    path.write_text(code)
    assert load_deployments(path)


def _yaml(code: str, tmp: Path) -> None:
    list(yaml.safe_load_all(code))


def _shell(code: str, tmp: Path) -> None:
    out = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _promql(code: str, tmp: Path) -> None:
    """Each line is one query, checked by promtool as a recording rule's expression."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: .ci/run installs Debian's prometheus")
        pytest.skip("no promtool (apt-get install prometheus) to parse PromQL")
    queries = [line for line in code.splitlines() if line.strip()]
    rules = {
        "groups": [
            {
                "name": "doc",
                "rules": [{"record": f"doc:q{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _js(code: str, tmp: Path) -> None:
    """JavaScript, an ES module, as node parses it (`node --check`)."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed: .ci/run installs Debian's nodejs")
        pytest.skip("no node to parse JavaScript")
    path = tmp / "doc.mjs"
    path.write_text(code)
    out = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _text(code: str, tmp: Path) -> None:
    """A diagram, a synopsis, sample output: nothing to parse."""


PARSERS: dict[str, Callable[[str, Path], object]] = {
    "python": _python,
    "toml": _toml,
    "yaml": _yaml,
    "sh": _shell,
    "bash": _shell,
    "json": lambda code, tmp: json.loads(code),
    "promql": _promql,
    "js": _js,
    "": _text,
    "text": _text,
}


@pytest.mark.parametrize("block", _params("illustrative"))
def test_an_illustrative_block_parses(block: Block, tmp_path: Path) -> None:
    parse = PARSERS.get(block.lang)
    assert parse is not None, (
        f"{block.where}: no parser for {block.lang!r}; known: {sorted(PARSERS)} "
        "(`text` for anything else)"
    )
    parse(block.code, tmp_path)


# --- runs: against the session's stack -------------------------------------------------


@pytest.fixture(scope="module")
def doc_flower(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Flower as the README starts it by hand, on the stack's Redis; its port."""
    with flower_by_hand(stack.url, tmp_path_factory.mktemp("doc-flower") / "flower.log") as port:
        yield port


@pytest.fixture(scope="module")
def doc_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`pipeq serve` as the docs start it (no keys: loopback), on the stack's Redis."""
    url, proc, _ = start_gateway(stack.url, tmp_path_factory.mktemp("doc-gateway"), None)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        stop_process(proc)


RUNNERS = {
    "python": [sys.executable, "-"],
    "sh": ["bash", "-eo", "pipefail"],
    "bash": ["bash", "-eo", "pipefail"],
}


@pytest.mark.parametrize("block", _params("runs"))
def test_a_runnable_block_runs_as_written(
    block: Block, stack: Stack, request: pytest.FixtureRequest
) -> None:
    runner = RUNNERS.get(block.lang)
    assert runner is not None, f"{block.where}: cannot run {block.lang!r}; {sorted(RUNNERS)} run"
    code = block.code
    if FLOWER_DEFAULT in code:
        port = request.getfixturevalue("doc_flower")
        code = code.replace(FLOWER_DEFAULT, f"127.0.0.1:{port}")
    if GATEWAY_DEFAULT in code:
        port = request.getfixturevalue("doc_gateway")
        code = code.replace(GATEWAY_DEFAULT, f"127.0.0.1:{port}")
    env = {
        **os.environ,
        "PIPEQ_REDIS_URL": stack.url,
        # `pipeq` as a user's shell finds it: the environment this suite runs in
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = subprocess.run(
        runner,
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=RUN_TIMEOUT_S,
    )
    assert out.returncode == 0, f"{block.where}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"


def test_a_mark_is_the_comment_right_before_a_block_and_illustrative_says_why(
    tmp_path: Path,
) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- runs -->\n```python\nprint(1)\n```\n\n"
        "<!-- illustrative: needs a GPU -->\n```sh\nnvidia-smi\n```\n\n"
        "<!-- illustrative -->\n```sh\nno reason given\n```\n\n"
        "<!-- runs -->\n\nA paragraph between.\n\n```sh\nunmarked\n```\n\n"
        "- in a list:\n\n  <!-- runs -->\n  ```sh\n  pipeq status\n  ```\n"
    )
    assert [(b.line, b.lang, b.mark) for b in blocks_of(page)] == [
        (4, "python", "runs"),
        (9, "sh", "illustrative"),
        (14, "sh", None),
        (22, "sh", None),
        (29, "sh", "runs"),
    ]
