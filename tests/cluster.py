"""A cluster for fault tests: a redis-server of its own (killed and restarted at will) and
real worker processes, started, stopped and killed as a supervisor or a deploy would."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from pipeq import Client
from pipeq._config import Deployment
from pipeq._ledger import inflight_key
from pipeq._stack import start_redis, stop_process
from pipeq.worker.demo import write_config

from .conftest import ROOT, free_port
from .zygote import Zygote

FAULTS = ROOT / "tests" / "faults"


def wait_until(done: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `done()` until it is truthy; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = done()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


class Cluster:
    """Redis on a free port in `tmp`, and workers of `deployments` on it."""

    def __init__(
        self,
        tmp: Path,
        deployments: dict[str, Deployment],
        *,
        appendonly: bool = False,
        redis_args: tuple[str, ...] = (),
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.deployments = deployments
        self.appendonly = appendonly
        self.redis_args = redis_args
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.config = write_config(deployments, tmp / "cluster.toml")
        self.worker_env = {
            "PIPEQ_FAULTS": "1",
            "PIPEQ_FAULTS_LOG": str(tmp / "forwards.log"),
            **(worker_env or {}),
        }
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.start_redis()

    # -- redis -------------------------------------------------------------------------
    def start_redis(self) -> None:
        self.redis_proc = start_redis(
            self.port, self.tmp, appendonly=self.appendonly, extra=self.redis_args
        )

    def kill_redis(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL (a crash) or SIGTERM (a clean shutdown: the AOF is flushed)."""
        assert self.redis_proc is not None
        self.redis_proc.send_signal(sig)
        self.redis_proc.wait()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    # -- workers -----------------------------------------------------------------------
    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """A worker of deployment `name`, forked from this test process's fork server
        (tests/zygote.py: torch and transformers imported once), or spawned afresh with
        PIPEQ_TEST_FORK=0; `env` adds to its environment."""
        log = self.tmp / f"worker-{len(self.workers)}.log"
        argv = [sys.executable, "-m", "pipeq", "worker", name, "--config", str(self.config)]
        argv += ["--redis-url", self.url]
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
            **self.worker_env,
            **env,
        }
        proc: Any
        if os.environ.get("PIPEQ_TEST_FORK", "1") != "0":
            proc = Zygote.spawn(argv, full_env, log)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
                )
        self.workers.append(proc)
        return proc  # type: ignore[no-any-return]

    def hostname(self, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 120) -> str:
        """The worker's name in Redis, once its first heartbeat is in (it owns its list)."""
        r = self.redis()
        marker = f"pipeq.{name}.{proc.pid}-"

        def find() -> str | None:
            assert proc.poll() is None, f"worker exited ({proc.returncode}): {self.logs()}"
            for member in r.zrange(f"pipeq:workers:{name}", 0, -1):
                if member.decode().startswith(marker):
                    return str(member.decode())
            return None

        return str(wait_until(find, timeout_s, f"worker {proc.pid} of {name} beats"))

    def inflight(self, hostname: str) -> int:
        return int(self.redis().llen(inflight_key(hostname)))

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.tmp.glob("worker-*.log"))
        )

    def forwards(self) -> list[tuple[int, str]]:
        """(pid, input) of every input of every forward pass so far."""
        path = self.tmp / "forwards.log"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [(int(pid), text) for pid, _, text in (line.partition("\t") for line in lines)]

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, **kwargs)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            stop_process(proc, grace_s=15)
        if self.redis_proc is not None:
            stop_process(self.redis_proc)


def renamed(d: Deployment, name: str, **changes: Any) -> Deployment:
    return dataclasses.replace(d, name=name, **changes)
