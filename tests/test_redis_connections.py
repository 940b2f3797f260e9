"""Every Redis connection form end to end (docs/redis.md): a password and an ACL user,
TLS with a throwaway CA and client certificate, Sentinel with a failover mid-burst.

Real redis-server processes (and sentinels) on free ports in tmp dirs, one real worker
per scenario, producers, `pipeq status`, the exporter and Flower over the same URL; no
password on any command line, in any log or page.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from subprocess import PIPE
from typing import Any
from urllib.parse import quote

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeq import BrokerUnavailable, Client, Job, JobState, PipeqError, pipeline
from pipeq._config import Deployment
from pipeq._redis import masked, parse
from pipeq._stack import find_redis_server, start_redis, stop_process
from pipeq.worker.demo import write_config

from .cluster import FAULTS, renamed, wait_until
from .conftest import free_port

pytestmark = pytest.mark.timeout(120)

PW = "Pw-0f-redis-7c1e"  # distinctive: grepped for in logs, pages and command lines
SENTINEL_PW = "Sentinel-pw-93ab"
#: every character a URL reserves, between pieces none of which may show anywhere
ACL_PW = "Acl-pw;5d2f#Qz7k@Vk3q/xJ9w?zW8j&Kq5x:Wj4z%"
#: what the ACL test grants pipeq's user (docs/redis.md): everything but the dangerous
#: commands, save INFO, which the heartbeat's script reads Redis' uptime with
ACL_RULE = ("pipeq", "on", f">{ACL_PW}", "~*", "&*", "+@all", "-@dangerous", "+info")
#: a port nothing listens on
CLOSED_PORT = free_port()


@pytest.fixture
def sentiment(deployments: dict[str, Any]) -> Deployment:
    return renamed(deployments["sentiment-analysis"], "sentiment", max_batch_size=4)


def _cmdlines() -> str:
    """Every process's command line on this machine, NUL-joined."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(out)


def _secrets_nowhere(*texts: str) -> None:
    pieces = [p for p in re.split(r"[@:/;?&#%]", ACL_PW) if len(p) >= 4]
    for secret in (PW, SENTINEL_PW, ACL_PW, quote(ACL_PW, safe=""), *pieces):
        for text in texts:
            assert secret not in text, f"a password shows: ...{text[:300]}"


class Worker:
    """`pipeq worker sentiment` told the URL through its environment, as `pipeq up` does."""

    def __init__(self, tmp: Path, deployment: Deployment, url: str, **env: str) -> None:
        config = write_config({deployment.name: deployment}, tmp / "pipeq.toml")
        self.log = tmp / "worker.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "worker", deployment.name, "--config", str(config)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PIPEQ_REDIS_URL": url,
                "PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
                "PIPEQ_HEARTBEAT_S": "0.5",
                "PIPEQ_DEAD_AFTER_S": "5",
                **env,
            },
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, client: Client, timeout_s: float = 90) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited: {self.text()[-3000:]}"
            try:
                return bool(client.registry.live_workers("sentiment"))
            except redis.RedisError:
                return False

        wait_until(ready, timeout_s, "the worker beats")

    def stop(self) -> None:
        stop_process(self.proc, grace_s=15)  # type: ignore[arg-type]


def _cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PIPEQ_REDIS_URL": url},
    )


def _get(url: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode(errors="replace"))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def check_everything_else(url: str, tmp: Path, worker: Worker) -> None:
    """`pipeq status`, the exporter and Flower's Broker page over `url`; no password on
    a command line, in the worker's log, the outputs or the pages."""
    status = _cli(url, "status")
    assert status.returncode == 0, status.stderr
    assert "sentiment" in status.stdout
    exporter_port, flower_port = free_port(), free_port()
    env = {**os.environ, "PIPEQ_REDIS_URL": url, "FLOWER_UNAUTHENTICATED_API": "true"}
    exporter = subprocess.Popen(
        [sys.executable, "-m", "pipeq", "exporter", "--port", str(exporter_port)],
        stdout=(tmp / "exporter.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    flower_args = (f"--port={flower_port}", "--address=127.0.0.1")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pipeq._flower", "flower", *flower_args],
        stdout=(tmp / "flower.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        metrics = _get(f"http://127.0.0.1:{exporter_port}/metrics")
        assert 'pipeq_jobs_total{deployment="sentiment",outcome="succeeded"}' in metrics, metrics
        broker = _get(f"http://127.0.0.1:{flower_port}/broker")
        assert "pipeq.sentiment" in broker, broker[-2000:]
        cmdlines = _cmdlines()
    finally:
        stop_process(exporter)
        stop_process(flower)
    logs = (tmp / "flower.log").read_text(errors="replace")
    logs += (tmp / "exporter.log").read_text(errors="replace")
    _secrets_nowhere(status.stdout, status.stderr, metrics, broker, cmdlines, worker.text(), logs)


# -- passwords and ACL users ---------------------------------------------------------------
def test_password_and_acl_user_everywhere(tmp_path: Path, sentiment: Deployment) -> None:
    """`--requirepass` and an ACL user (`ACL_RULE`): a worker over the ACL user's URL,
    producers over both, `pipeq status`, the exporter and Flower; a wrong password is a
    BrokerUnavailable with the URL masked, a worker's a one-line error and exit 1."""
    port = free_port()
    proc = start_redis(
        port,
        tmp_path,
        extra=("--requirepass", PW, "--user", *ACL_RULE),
        client=redis.Redis(port=port, password=PW, socket_connect_timeout=0.2),
    )
    acl_url = f"redis://pipeq:{quote(ACL_PW, safe='')}@127.0.0.1:{port}/0"
    pw_url = f"redis://:{PW}@127.0.0.1:{port}/0"
    worker = Worker(tmp_path, sentiment, acl_url)
    try:
        with Client(acl_url) as acl, Client(pw_url) as default:
            worker.wait_ready(acl)
            time.sleep(1)  # a heartbeat or two: a command the ACL refuses stops the worker
            assert worker.proc.poll() is None, worker.text()[-2000:]
            assert pipeline("sentiment-analysis", client=acl)("good")[0]["label"]
            jobs = [c.submit("sentiment", f"text {i}") for i, c in enumerate((acl, default) * 5)]
            assert all(j.result(timeout=60) for j in jobs)
        check_everything_else(acl_url, tmp_path, worker)
        wrong = f"redis://pipeq:{PW}-wrong@127.0.0.1:{port}/0"
        with Client(wrong, broker_timeout_s=1) as client, pytest.raises(BrokerUnavailable) as e:
            client.submit("sentiment", "x")
        assert f"redis://pipeq:***@127.0.0.1:{port}/0" in str(e.value)
        _secrets_nowhere(str(e.value))
    finally:
        worker.stop()
        stop_process(proc)
    assert worker.proc.returncode == 0, worker.text()[-2000:]


# -- TLS -----------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):  # other-ca: a CA that signed nothing the server shows
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{ca}-key.pem", "-out", f"{ca}.pem", "-subj", f"/CN=pipeq test {ca}",
            cwd=where,
        )  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
            "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=where,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
            cwd=where,
        )  # fmt: skip
    return where


def test_tls_with_a_client_certificate_everywhere_and_clear_errors_without_the_ca(
    tmp_path: Path, certs: Path, sentiment: Deployment
) -> None:
    """A TLS-only Redis that asks for client certificates (`--tls-auth-clients yes`):
    rediss://...?ssl_ca_certs=&ssl_certfile=&ssl_keyfile= works for a worker, producers,
    `pipeq status`, the exporter and Flower; `ssl_cert_reqs` spelt CERT_REQUIRED or
    required both work. Bare rediss:// verifies against the system's CAs, so here it
    fails, as does a wrong CA: BrokerUnavailable naming the masked URL and the TLS error
    for a producer, a one-line error and exit 1 for a worker."""
    port = free_port()
    tls = {
        "ssl_ca_certs": str(certs / "ca.pem"),
        "ssl_certfile": str(certs / "client.pem"),
        "ssl_keyfile": str(certs / "client-key.pem"),
    }
    proc = start_redis(
        port,
        tmp_path,
        extra=(
            "--port", "0", "--tls-port", str(port), "--requirepass", PW,
            "--tls-cert-file", str(certs / "server.pem"),
            "--tls-key-file", str(certs / "server-key.pem"),
            "--tls-ca-cert-file", str(certs / "ca.pem"),
            "--tls-auth-clients", "yes",
        ),
        client=redis.Redis(port=port, password=PW, ssl=True, socket_connect_timeout=0.5, **tls),
    )  # fmt: skip
    base = f"rediss://:{PW}@127.0.0.1:{port}/0"
    query = "&".join(f"{k}={v}" for k, v in tls.items())
    url = f"{base}?{query}"
    worker = Worker(tmp_path, sentiment, url)
    try:
        for spelling in ("CERT_REQUIRED", "required"):
            with Client(f"{url}&ssl_cert_reqs={spelling}") as client:
                assert client.depth("sentiment").waiting >= 0
        with Client(url) as client:
            worker.wait_ready(client)
            jobs = [client.submit("sentiment", f"tls {i}") for i in range(10)]
            assert all(j.result(timeout=60) for j in jobs)
        check_everything_else(url, tmp_path, worker)
        bad = {
            "no CA (system CAs)": base,
            "a wrong CA": f"{base}?ssl_ca_certs={certs / 'other-ca.pem'}",
            "no client certificate": f"{base}?ssl_ca_certs={certs / 'ca.pem'}",
        }
        for what, bad_url in bad.items():
            with Client(bad_url, broker_timeout_s=0.5) as client:
                with pytest.raises(BrokerUnavailable) as e:
                    client.submit("sentiment", "x")
            message = str(e.value)
            assert masked(bad_url) in message, (what, message)
            # the TLS failure, in whichever words OpenSSL and the kernel chose this time
            # ("[SSL: ...]", "_ssl.c: EOF occurred in violation of protocol", a reset)
            said = message.lower()
            assert any(w in said for w in ("ssl", "connection reset", "closed")), (what, message)
            _secrets_nowhere(message)
        # a worker with no CA stops at once with one line, never exit 0
        started = time.monotonic()
        cli = _cli(base, "worker", "sentiment", "--config", str(tmp_path / "pipeq.toml"))
        print(f"\nworker on bare rediss:// exits {cli.returncode} in "
              f"{time.monotonic() - started:.1f} s: {cli.stderr.strip()}")  # fmt: skip
        assert cli.returncode == 1, cli.stderr
        assert cli.stderr.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in cli.stderr
        _secrets_nowhere(cli.stderr, cli.stdout)
    finally:
        worker.stop()
        stop_process(proc)
    assert worker.proc.returncode == 0, worker.text()[-2000:]


# -- Sentinel ------------------------------------------------------------------------------
class SentinelSet:
    """A primary, a replica and three sentinels (quorum 2) on loopback, all with passwords."""

    def __init__(self, tmp: Path, primary_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        auth = ("--requirepass", PW, "--masterauth", PW)
        self.primary_port, self.replica_port = free_port(), free_port()
        for name, port, extra in (
            ("primary", self.primary_port, primary_args),
            ("replica", self.replica_port, ("--replicaof", "127.0.0.1", str(self.primary_port))),
        ):
            workdir = tmp / name
            workdir.mkdir()
            self.procs[name] = start_redis(
                port,
                workdir,
                extra=(*auth, *extra),
                client=redis.Redis(port=port, password=PW, socket_connect_timeout=0.2),
            )
        replica = redis.Redis(port=self.replica_port, password=PW)
        wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up",
            10,
            "the replica is in sync",
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        for port in self.sentinel_ports:
            conf = tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp}\nlogfile {tmp}/sentinel-{port}.log\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.primary_port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 3000\n"
                f"sentinel auth-pass mymaster {PW}\n"
                f"requirepass {SENTINEL_PW}\n"
            )
            self.procs[f"sentinel-{port}"] = proc = subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            client = redis.Redis(port=port, password=SENTINEL_PW, socket_connect_timeout=0.2)
            wait_until(lambda c=client, p=proc: _pings(c, p), 10, f"sentinel {port} answers")
        self.url = (
            ";".join(f"sentinel://:{PW}@127.0.0.1:{p}" for p in self.sentinel_ports)
            + f"/0?master_name=mymaster&sentinel_password={SENTINEL_PW}"
        )

    def master_port(self) -> int:
        s = redis.Redis(port=self.sentinel_ports[0], password=SENTINEL_PW)
        return int(s.sentinel_get_master_addr_by_name("mymaster")[1])

    def close(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, grace_s=5)


def _replication_gap(cluster: SentinelSet) -> int:
    primary = redis.Redis(port=cluster.primary_port, password=PW)
    replica = redis.Redis(port=cluster.replica_port, password=PW)
    sent = int(primary.info("replication")["master_repl_offset"])
    return sent - int(replica.info("replication")["slave_repl_offset"])


def _pings(client: redis.Redis, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "a sentinel exited"
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.timeout(90)
def test_sentinel_failover_mid_burst(tmp_path: Path, sentiment: Deployment) -> None:
    """A worker and a producer over a sentinel:// URL with three sentinels and passwords
    for Redis and for the sentinels. A burst of 30 jobs; the primary SIGKILLed mid-burst;
    10 more submitted while the sentinels elect the replica. Prints jobs accepted,
    answered, lost and the time to recover. Then `min-replicas-to-write 1` on the new
    primary, which has no replica left: a submit is refused, not accepted and lost."""
    cluster = SentinelSet(tmp_path)
    worker = Worker(tmp_path, sentiment, cluster.url, PIPEQ_FAULTS="1",
                    PIPEQ_FAULTS_FORWARD_S="0.3")  # fmt: skip
    try:
        with Client(cluster.url, broker_timeout_s=20) as client:
            worker.wait_ready(client)
            jobs = [client.submit("sentiment", f"burst {i}") for i in range(30)]
            wait_until(lambda: sum(j.status().done for j in jobs) >= 8, 30, "8 jobs done")
            before = cluster.master_port()
            primary = cluster.procs["primary"]
            # WAIT-less writes: what the primary acknowledged and the replica had not
            # received when it died is gone (bytes of the replication stream)
            gap = _replication_gap(cluster)
            primary.send_signal(signal.SIGKILL)
            primary.wait()
            killed_at = time.monotonic()
            during = [client.submit("sentiment", f"during {i}") for i in range(10)]
            first_accepted = time.monotonic() - killed_at
            answered, lost = 0, []
            for job in jobs + during:
                try:
                    job.result(timeout=45)
                    answered += 1
                except Exception as e:
                    lost.append((job.id, type(e).__name__, job.status()))
            recovered = time.monotonic() - killed_at
            after = cluster.master_port()
            print(
                f"\nsentinel failover: accepted {len(jobs) + len(during)} "
                f"({len(during)} during the failover, the first {first_accepted:.1f} s after "
                f"the kill), answered {answered}, lost {len(lost)}; every job answered "
                f"{recovered:.1f} s after the kill; master {before} -> {after}; replication "
                f"stream not yet on the replica at the kill: {gap} bytes"
            )
            assert after == cluster.replica_port
            assert not lost, lost
            assert client.job(jobs[0].id).status() is JobState.SUCCEEDED
        # asynchronous replication: the new primary has no replica left; with
        # min-replicas-to-write 1 it refuses writes, so a submit fails where it would
        # otherwise be accepted on a primary whose loss would lose it
        new = redis.Redis(port=after, password=PW)
        new.config_set("min-replicas-to-write", 1)
        with Client(cluster.url, broker_timeout_s=1) as client:
            with pytest.raises(BrokerUnavailable) as refused:
                client.submit("sentiment", "refused")
        print(f"min-replicas-to-write 1, no replica: {refused.value}")
        assert "NOREPLICAS" in str(refused.value)
        _secrets_nowhere(str(refused.value))
        new.config_set("min-replicas-to-write", 0)
        # the worker's heartbeats were refused too (it paused: issue 24, point 5); it is
        # live again at its next beat (`pipeq status` said "no live worker" when asked at
        # once, on a loaded machine)
        with Client(cluster.url) as client:
            wait_until(lambda: client.registry.live_workers("sentiment"), 30, "a live worker")
        check_everything_else(cluster.url, tmp_path, worker)
    finally:
        worker.stop()
        cluster.close()


def test_masked_hides_every_password() -> None:
    url = (
        f"sentinel://:{PW}@h1:26379;sentinel://user:{PW}@h2:26380;sentinel://h3:26381/0"
        f"?master_name=m&sentinel_password={SENTINEL_PW}"
    )
    shown = masked(url)
    assert shown == (
        "sentinel://:***@h1:26379;sentinel://user:***@h2:26380;sentinel://h3:26381/0"
        "?master_name=m&sentinel_password=***"
    )
    assert masked(f"rediss://u:{PW}@h:1/0?ssl_ca_certs=/a/ca.pem") == (
        "rediss://u:***@h:1/0?ssl_ca_certs=/a/ca.pem"
    )
    assert masked("redis://h:1/0") == "redis://h:1/0"
    target = parse(url)
    assert target.hosts == (("h1", 26379), ("h2", 26380), ("h3", 26381))
    assert (target.password, target.master_name, target.sentinel_password) == (
        PW,
        "m",
        SENTINEL_PW,
    )
    with pytest.raises(ValueError, match="master_name"):
        parse("sentinel://h:1/0")
    with pytest.raises(ValueError, match="rediss"):
        parse("redis://h:1/0?ssl_ca_certs=/x")
    with pytest.raises(ValueError, match="required, optional or none"):
        parse("rediss://h:1/0?ssl_cert_reqs=maybe")


# -- no part of a password in any message ----------------------------------------------
#: distinctive pieces of generated passwords: none of them is found in pipeq's or
#: redis-py's own words, so finding one in a message is finding the password
TOKENS = ("Qz7k", "xJ9w", "Vk3q", "zW8j", "Kq5x", "jX2v")
#: every character a URL reserves, and a few it merely dislikes
SPECIALS = tuple("@:/;?&#%+=[] !$'()*,")
passwords = st.lists(
    st.sampled_from(TOKENS) | st.sampled_from(SPECIALS), min_size=1, max_size=8
).filter(lambda parts: any(p in TOKENS for p in parts))


def _urls(password: str, port: int, user: str = "", host: str = "127.0.0.1") -> list[str]:
    """The URL forms a password goes into, as a user writes it (unencoded) and as the
    docs ask (percent-encoded)."""
    out = []
    for pw in (password, quote(password, safe="")):
        out += [
            f"redis://{user}:{pw}@{host}:{port}/0",
            f"rediss://{user}:{pw}@{host}:{port}/0?ssl_cert_reqs=none",
            f"sentinel://{user}:{pw}@{host}:{port};sentinel://{user}:{pw}@{host}:{port}"
            f";sentinel://{host}:{port}/0?master_name=m&sentinel_password={pw}",
            f"sentinel://:{pw}@{host}:{port};sentinel://{host}:{port}/0"
            f"?sentinel_password={pw}&master_name=m",
            f"unix://{user}:{pw}@/nonexistent/redis.sock?db=0",
            f"unix:///nonexistent/redis.sock?db=0&password={pw}",
        ]
    return out


def _shown(password: str, message: str) -> list[str]:
    return [t for t in TOKENS if t in password and t in message]


@settings(max_examples=500, deadline=None)
@given(
    parts=passwords,
    user=st.sampled_from(["", "pipeq"]),
    host=st.sampled_from(["127.0.0.1", "redis.example", "[::1]"]),
)
def test_no_part_of_a_password_shows_in_a_masked_url_or_a_url_error(
    parts: list[str], user: str, host: str
) -> None:
    """`masked()` and `parse()`'s errors, over many passwords: a bracket, a ';' or a '/'
    in a password made urllib or parse quote a piece of it."""
    password = "".join(parts)
    for url in _urls(password, 6379, user, host):
        said = [masked(url)]
        try:
            parse(url)
        except ValueError as e:
            said.append(str(e))
        for message in said:
            assert not _shown(password, message), f"{url!r} -> {message!r}"


def _messages(url: str) -> list[str]:
    """Every message pipeq makes of this URL: masked, a parse error, a Client's errors
    (InvalidRequest at once; BrokerUnavailable for an unreachable Redis), a worker's
    one-line exit (`_redis_failed`, `run_worker`'s first ping)."""
    from pipeq import _app
    from pipeq.worker.main import _redis_failed

    said = [masked(url)]
    try:
        parse(url)
    except ValueError as e:
        said.append(str(e))
    try:
        # (a unix:// URL is not one Celery's Redis backend reads: not through a Client)
        with Client(url if not url.startswith("unix") else "x", broker_timeout_s=0.01) as c:
            c.deployments()
    except PipeqError as e:
        said.append(str(e))
    try:
        _app.redis_client(url, socket_timeout=0.5).ping()
    except ValueError:
        pass  # the worker says so with `masked` and parse's message, both above
    except redis.RedisError as e:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            _redis_failed("w", url, e)
        said.append(err.getvalue())
    return said


@settings(max_examples=40, deadline=None)
@given(parts=passwords)
def test_no_part_of_a_password_shows_in_any_message(parts: list[str]) -> None:
    """Found by a review: a password with an unencoded ';' or '#' came out in part
    (`redis://***;cd@host`, `Port could not be cast to integer value as 'ab'`). Random
    passwords of URL-special characters, unencoded and encoded, in every URL form;
    nothing listens on the port (BrokerUnavailable, a worker's exit line)."""
    password = "".join(parts)
    for url in _urls(password, CLOSED_PORT, "pipeq"):
        for message in _messages(url):
            assert not _shown(password, message), f"{url!r} -> {message!r}"


# -- every entry point meets an unusable Redis with a typed error ------------------------
class _Answering:
    """A TCP server on a free port that answers every connection with `reply` (then
    closes it): a port that is not Redis'."""

    def __init__(self, reply: bytes) -> None:
        import socketserver
        import threading

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(4096)
                self.request.sendall(reply)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _entry_points(client: Client) -> dict[str, Any]:
    """Every public call of Client, Job, TextStream and pipeline that reads Redis."""
    job = client.job("a-job-id")
    named = Job(client, "a-job-id", "ner")
    return {
        "Client.deployments": client.deployments,
        "Client.depth": lambda: client.depth("ner"),
        "Client.resolve": lambda: client.resolve("ner"),
        "Client.submit": lambda: client.submit("ner", "text"),
        "Client.map": lambda: client.map("ner", ["a", "b"]),
        "Client.imap": lambda: next(client.imap("ner", iter(["a"]))),
        "Job.status": job.status,
        "Job.result": lambda: job.result(timeout=60),
        "Job.cancel": job.cancel,
        "Job.forget": job.forget,
        "Job.stream": lambda: next(job.stream(timeout=60)),
        "Job.stream (a submitted job)": named.stream,
        "pipeline": lambda: pipeline("ner", client=client),
    }


def test_every_producer_entry_point_gives_broker_unavailable_naming_the_url(
    tmp_path: Path,
) -> None:
    """Redis down: `BrokerUnavailable` after `broker_timeout_s`, from every entry point
    (`Job.stream()` raised redis' own ConnectionError at once). A port that answers
    something else than Redis (an HTTP server, garbage): `BrokerUnavailable` at once,
    naming the URL and what the server said (redis-py's InvalidResponse, raw, before);
    the CLI says it in one line, exit 2. Never the password."""
    http = _Answering(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    garbage = _Answering(b"\x16\x03\x01 not redis at all\r\n")
    try:
        for port, waits, says in (
            (free_port(), True, "did not answer for 0.3 s"),
            (http.port, False, "does not speak Redis (InvalidResponse: Protocol Error: b'HTTP/1.1"),
            (garbage.port, False, "does not speak Redis (InvalidResponse"),
        ):
            url = f"redis://:{PW}@127.0.0.1:{port}/0"
            with Client(url, broker_timeout_s=0.3 if waits else 60) as client:
                for name, call in _entry_points(client).items():
                    started = time.monotonic()
                    with pytest.raises(BrokerUnavailable) as e:
                        call()
                    message = str(e.value)
                    assert masked(url) in message and says in message, (name, message)
                    _secrets_nowhere(message)
                    if not waits:  # nothing to wait for: a server that is not Redis
                        assert time.monotonic() - started < 30, (name, message)
        url = f"redis://:{PW}@127.0.0.1:{http.port}/0"
        commands = [
            ["status"],
            ["status", "a-job-id"],
            ["run", "ner", "text"],
            ["submit", "ner", "text"],
            ["result", "a-job-id"],
            ["cancel", "a-job-id"],
            ["deployments"],
        ]
        env = {**os.environ, "PIPEQ_REDIS_URL": url}
        clis = [
            subprocess.Popen(
                [sys.executable, "-m", "pipeq", *c], env=env, stdout=PIPE, stderr=PIPE, text=True
            )
            for c in commands
        ]
        for command, cli in zip(commands, clis, strict=True):
            out, err = cli.communicate(timeout=120)
            assert cli.returncode == 2, (command, out, err)
            assert err.count("\n") == 1 and "BrokerUnavailable" in err, (command, err)
            assert masked(url) in err and "Traceback" not in err, (command, err)
            _secrets_nowhere(out, err)
    finally:
        http.close()
        garbage.close()
