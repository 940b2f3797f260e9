"""A fork server for the workers the fault tests start: one process per test process that
has imported torch, transformers and Celery once, and forks a worker from that state.

Why: the suite starts about 170 workers on 2 cores, and a worker spends ~2.5 s of CPU
before its first heartbeat, most of it importing torch and transformers (measured:
`import torch, transformers.pipelines` alone is ~2 s). A forked worker skips that.

What stays real: each worker is its own process (its own pid, session, Redis connections,
model load, Celery consumer), started with the argv and environment the test gives, and
it is killed, stopped and reaped like any other. pipeq itself is not imported before the
fork (its modules read their settings at run time in the child, with the child's
environment), and neither is tests/faults/sitecustomize.py, which the child runs itself
when its PYTHONPATH names that folder, as Python's start-up would.

Protocol, one JSON line each way on the server's stdin/stdout: {"argv", "env", "log"} →
{"pid"}. When a child ends, the server writes its exit status (Popen's returncode:
negative for a signal) into `<status_dir>/<pid>`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# what a worker imports that costs: torch, transformers' pipelines and the models the tests
# serve, Celery's worker (imported here, in the server, before any fork)
PRELOAD = (
    "torch",
    "transformers",
    "transformers.pipelines",
    "celery.apps.worker",
    "celery.worker.consumer",
    "kombu.transport.redis",
    "redis",
)


def _serve(status_dir: Path | str) -> None:
    import importlib

    status_dir = Path(status_dir)

    for name in PRELOAD:
        importlib.import_module(name)

    def reap(_signum: int, _frame: Any) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            tmp = status_dir / f".{pid}"
            tmp.write_text(str(code))
            tmp.rename(status_dir / str(pid))

    signal.signal(signal.SIGCHLD, reap)
    out = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)  # never returns
        print(json.dumps({"pid": pid}), file=out, flush=True)


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the worker the request describes, then exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    import random

    random.seed()  # the server's state is every child's: draw afresh, as a new process does
    paths = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = paths
    code = 1
    try:
        for p in paths:
            site = Path(p) / "sitecustomize.py"
            if site.is_file():
                import runpy

                runpy.run_path(str(site), run_name="sitecustomize")
        sys.argv = list(request["argv"])
        from pipeq._cli import main

        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Forked:
    """A forked worker, with the part of `subprocess.Popen` the tests use."""

    def __init__(self, pid: int, status_dir: Path, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._status = status_dir / str(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The fork server of this test process, started on first use."""

    _lock = threading.Lock()
    _proc: subprocess.Popen[str] | None = None
    _status_dir: Path | None = None

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], log: Path) -> Forked:
        """Fork a process running `python -m pipeq argv[3:]`-style `argv` (its argv[0..2]
        are sys.executable, "-m", "pipeq") with `env`, its output appended to `log`."""
        assert argv[1:3] == ["-m", "pipeq"], argv
        with cls._lock:
            proc = cls._server()
            assert proc.stdin is not None and proc.stdout is not None and cls._status_dir
            proc.stdin.write(json.dumps({"argv": argv[2:], "env": env, "log": str(log)}) + "\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"the worker fork server exited ({proc.poll()})")
            return Forked(int(json.loads(reply)["pid"]), cls._status_dir, argv)

    @classmethod
    def _server(cls) -> subprocess.Popen[str]:
        if cls._proc is not None and cls._proc.poll() is None:
            return cls._proc
        import tempfile

        cls._status_dir = Path(tempfile.mkdtemp(prefix="pipeq-zygote-"))
        cls._proc = subprocess.Popen(
            [sys.executable, "-c", f"import tests.zygote as z; z._serve({str(cls._status_dir)!r})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ},
        )
        assert cls._proc.stdout is not None
        ready = cls._proc.stdout.readline()
        if not ready:
            raise RuntimeError("the worker fork server did not start")
        return cls._proc

    @classmethod
    def stop(cls) -> None:
        with cls._lock:
            if cls._proc is not None:
                cls._proc.stdin.close()  # type: ignore[union-attr]
                cls._proc.wait(timeout=10)
                cls._proc = None
