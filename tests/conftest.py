"""Fixtures: a real redis-server on a free port, tiny real checkpoints, real workers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread in this process and in every worker it starts (they inherit it): the
# suite runs 4 test processes and dozens of workers on 2 cores, and tiny models gain
# nothing from intra-op threads (a full run: 655 s against 745 s with torch's default)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeq import Client, Job
from pipeq._stack import Stack, start_redis, stop_process

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("PIPEQ_TEST_MODELS", ROOT / ".cache" / "pipeq-models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the test session's own, on a free port."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    return MODELS_DIR


@pytest.fixture(scope="session")
def deployments(models_dir: Path) -> dict[str, Any]:
    from pipeq.worker.demo import demo_config

    found = demo_config(models_dir)
    # ner pipelines its batches (tests/test_pipelining.py): every test of its runs that
    # path, the others the plain one (feature-extraction's memory test measures the plain
    # path's peak; pipelining adds a constant to it, docs/batching.md)
    found["ner"] = dataclasses.replace(found["ner"], pipelining=True)
    return found


@pytest.fixture(scope="session")
def config_file(
    deployments: dict[str, Any], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from pipeq.worker.demo import write_config

    return write_config(deployments, tmp_path_factory.mktemp("config") / "pipeq.toml")


@pytest.fixture(scope="session")
def stack(redis_url: str, deployments: dict[str, Any], config_file: Path) -> Iterator[Stack]:
    """One real worker process per deployment (the course's nine tasks + distilgpt2)."""
    stack = Stack(
        deployments, str(config_file), redis_url=redis_url, flower_port=None, exporter_port=None
    )
    stack.start()
    try:
        status = stack.wait_ready(timeout_s=240)
        assert all(s == "ready" for s in status.values()), status
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.url) as c:
        yield c


@dataclasses.dataclass
class Gateway:
    """A `pipeq serve` process on the session's stack: its base URL and API keys by name
    (alice: every deployment; bob: sentiment-analysis only; slow: 1 request/s, burst 2)."""

    url: str
    keys: dict[str, str]
    keys_file: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


GATEWAY_KEYS = {
    "alice": {"deployments": ["*"]},
    "bob": {"deployments": ["sentiment-analysis"]},
    "slow": {"deployments": ["*"], "rate_per_s": 1, "burst": 2},
}


def start_gateway(
    redis_url: str, tmp: Path, keys_file: Path | None, *extra: str
) -> tuple[str, subprocess.Popen[bytes], Path]:
    """`pipeq serve` on a free loopback port of `redis_url`; (base URL, process, log)
    once /health answers."""
    port = free_port()
    log = tmp / f"gateway-{port}.log"
    env = {**os.environ, "PIPEQ_REDIS_URL": redis_url}
    env.pop("PIPEQ_API_KEYS_FILE", None)
    env.pop("PIPEQ_API_KEYS", None)
    cmd = [sys.executable, "-m", "pipeq", "serve", "--port", str(port), *extra]
    if keys_file is not None:
        cmd += ["--keys", str(keys_file)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the gateway did not answer within 60 s"
            time.sleep(0.1)
    return url, proc, log


@pytest.fixture(scope="session")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One `pipeq serve` process with API keys (GATEWAY_KEYS) on the session's stack."""
    from pipeq.serve import hash_key, new_key

    tmp = tmp_path_factory.mktemp("gateway")
    keys = {name: new_key() for name in GATEWAY_KEYS}
    lines = []
    for name, entry in GATEWAY_KEYS.items():
        lines.append(f"[keys.{name}]")
        lines.append(f'sha256 = "{hash_key(keys[name])}"')
        for field, value in entry.items():
            lines.append(f"{field} = {json.dumps(value)}")
    keys_file = tmp / "keys.toml"
    keys_file.write_text("\n".join(lines) + "\n")
    url, proc, log = start_gateway(stack.url, tmp, keys_file)
    try:
        yield Gateway(url, keys, keys_file, log, proc)
    finally:
        stop_process(proc)


def assert_close(got: Any, want: Any, tol: float = 1e-5, path: str = "result") -> None:
    """Equal structure and text; floats within `tol`."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and math.isclose(got, want, abs_tol=tol), (
            f"{path}: {got!r} != {want!r}"
        )
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (
            f"{path}: {got!r:.200} != {want!r:.200}"
        )
        for k in want:
            assert_close(got[k], want[k], tol, f"{path}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want), (
            f"{path}: {got!r:.200} != {want!r:.200}"
        )
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, tol, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r:.200} != {want!r:.200}"


def send_raw(client: Client, deployment: str, **kwargs: Any) -> Job:
    """Send a job as a producer that skips pipeq's checks would: a bare Celery message."""
    from pipeq._app import RUN_TASK, queue_for

    sent = client.app.send_task(RUN_TASK, kwargs=kwargs, queue=queue_for(deployment))
    return client.job(sent.id)


@contextlib.contextmanager
def paused(client: Client, deployment: str) -> Iterator[None]:
    """Stop the deployment's own workers from taking jobs (only theirs: a broadcast
    add_consumer would make every worker consume the queue)."""
    from pipeq._app import queue_for

    workers = client.registry.live_workers(deployment)
    assert workers, f"no live worker of {deployment} to pause"
    queue = queue_for(deployment)

    def until_each_answers(command: Any, what: str) -> None:
        """`command` again until every worker answers it: one that has just announced
        itself may not answer control commands yet, and a reply can be lost."""
        deadline = time.monotonic() + 30
        while True:
            replies = command(queue, destination=workers, reply=True)
            if {name for reply in replies or [] for name in reply} >= set(workers):
                return
            assert time.monotonic() < deadline, f"{deployment}: {workers} did not {what}: {replies}"

    until_each_answers(client.app.control.cancel_consumer, "pause")
    try:
        yield
    finally:
        until_each_answers(client.app.control.add_consumer, "resume")


def is_sentiment(result: Any) -> bool:
    """A sentiment-analysis result for one text: `[{"label", "score"}]`."""
    return (
        isinstance(result, list)
        and len(result) == 1
        and set(result[0]) == {"label", "score"}
        and result[0]["label"] in ("POSITIVE", "NEGATIVE")
    )


@contextlib.contextmanager
def flower_by_hand(redis_url: str, log: Path) -> Iterator[int]:
    """`celery -A pipeq._flower flower` as the README runs it outside `pipeq up`, on
    `redis_url` with no password of Flower's own; its port once it answers. Stopped after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "PIPEQ_FLOWER"))}
    env["PIPEQ_REDIS_URL"] = redis_url
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pipeq._flower", "flower", f"--port={port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "Flower did not answer within 60 s"
                time.sleep(0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), every test on the session's shared stack
    runs in one test process, so the ten-worker stack starts once per run (about 30 s
    of both cores, 2 to 3 GB) rather than once per process; the tests that start a
    cluster of their own spread over the other processes."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("stack"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With $PIPEQ_TEST_TIMELINE set to a file, each test's test process, start, end (unix
    s, setup and teardown included) and node id, one line each: which process ran what
    when, to see what holds the suite's wall time up."""
    started = time.time()
    yield
    path = os.environ.get("PIPEQ_TEST_TIMELINE")
    if path:
        who = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as f:
            f.write(f"{who}\t{started:.2f}\t{time.time():.2f}\t{item.nodeid}\n")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The grouping above failed silently twice (every process then starts a stack of
    its own: a third more time and memory, 22 GB at the peak): when this hook ran after
    xdist's, and with pytest 9.2, whose node ids xdist 3.8 no longer suffixes
    (pytest-dev/pytest-xdist#1386). A test on the stack that xdist did not group fails."""
    if getattr(item.config.option, "loadgroup", False) and "stack" in item.fixturenames:
        assert "@stack" in item.nodeid, (
            f"{item.nodeid} is not in xdist's 'stack' group: each test process would start "
            "a ten-worker stack of its own (see pytest_collection_modifyitems)"
        )
