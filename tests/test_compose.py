"""docker-compose.yml, the Dockerfile and .dockerignore, read for the faults a GPU node hit
(there is no Docker engine here to run them): a GPU worker must see its GPU, the model
cache must be writable by the image's user, every service must have a health check, and
nothing may listen beyond the host unless asked. `docker-compose config` validates the
file where docker-compose is installed (always in CI: .ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from .conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
TINY = ROOT / "deploy" / "compose.tiny.yml"


def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def workers() -> dict[str, Any]:
    return {n: s for n, s in services().items() if (s.get("command") or [None])[0] == "worker"}


def test_docker_compose_validates_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed: .ci/run installs Debian's package")
        pytest.skip("no docker-compose (apt-get install docker-compose); CI installs it")
    env = {**os.environ, "PIPEQ_FLOWER_AUTH": "user:password"}
    out = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    # without a Flower password the workers still start (a second node runs only them);
    # Flower itself then refuses to listen (tests/test_flower.py, guard_exposure)
    env.pop("PIPEQ_FLOWER_AUTH")
    out = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    # and with the no-GPU, no-Hub override, as the README runs it
    out = subprocess.run(
        [binary, "-f", str(COMPOSE), "-f", str(TINY), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


def test_each_gpu_worker_uses_the_one_gpu_its_container_sees() -> None:
    """Docker's NVIDIA runtime renumbers a container's GPU as 0: `--gpu 1` hid it."""
    gpu_workers = 0
    for name, service in workers().items():
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        command = service["command"]
        if not devices:
            assert "--gpu" not in command, name
            continue
        gpu_workers += 1
        [device] = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device.get("device_ids", [])) == 1 or device.get("count") == 1, name
        if "--gpu" in command:
            assert command[command.index("--gpu") + 1] == "0", name
    assert gpu_workers >= 2  # the file shows a generator and a summarizer on their own GPUs


def test_every_worker_serves_a_deployment_of_the_config_it_mounts() -> None:
    declared = tomllib.loads((ROOT / "deploy" / "pipeq.toml").read_text())["deployments"]
    for name, service in workers().items():
        assert service["command"][1] in declared, name
        assert "./deploy/pipeq.toml:/etc/pipeq/pipeq.toml:ro" in service["volumes"], name
        assert "models:/models" in service["volumes"], name  # one cache, shared
        assert service["environment"]["PIPEQ_HEALTH_FILE"] == "/tmp/pipeq-health", name


def test_every_service_has_a_health_check_and_listens_on_this_host_only() -> None:
    for name, service in services().items():
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no health check"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host"
    worker_check = " ".join(next(iter(workers().values()))["healthcheck"]["test"])
    assert "/tmp/pipeq-health" in worker_check and "-newermt" in worker_check
    redis_command = services()["redis"]["command"]
    assert "--appendonly" in redis_command and "noeviction" in redis_command
    flower = services()["flower"]
    assert "pipeq._flower" in flower["entrypoint"]
    assert "PIPEQ_FLOWER_AUTH" in flower["environment"]["FLOWER_BASIC_AUTH"]
    assert "--address=0.0.0.0" in flower["entrypoint"]  # refused by _flower without auth
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    assert services()["exporter"]["command"][0] == "exporter"


def test_the_image_runs_as_a_user_that_owns_the_model_cache() -> None:
    """The named volume mounted at /models starts as a copy of the image's /models,
    owner included: the image must create it and give it to the user it runs as."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "HF_HOME=/models" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), users
    user = users[-1]
    before_user = dockerfile[: dockerfile.rindex(f"USER {user}")]
    assert re.search(r"mkdir -p /models", before_user)
    assert re.search(rf"chown (-R )?{user}(:\S+)? /models", before_user)


def test_the_build_context_leaves_out_the_venv_and_the_model_cache() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".cache", ".git", "build"):
        assert path in ignored, path
    # and keeps what the Dockerfile copies
    for copied in ("client", "workers", "pyproject.toml", "constraints.txt", "README.md"):
        assert copied not in ignored, copied


def test_a_host_without_a_gpu_starts_the_cpu_services_and_gpu_ones_are_asked_for() -> None:
    """The GPU workers are in the `gpu` profile: `docker compose up` on a host without
    GPUs starts Redis, Flower, the exporter and the CPU workers (they failed to start)."""
    for name, service in services().items():
        reserves_gpu = "devices" in str(service.get("deploy", {}))
        assert (service.get("profiles") == ["gpu"]) is reserves_gpu, name


def test_every_published_port_can_be_moved_by_the_environment() -> None:
    """Two stacks on one host (or CI beside a local Redis on 6379) choose host ports."""
    published = {name: port for name, s in services().items() for port in s.get("ports", [])}
    assert published == {
        "redis": "127.0.0.1:${PIPEQ_REDIS_PORT:-6379}:6379",
        "flower": "127.0.0.1:${PIPEQ_FLOWER_PORT:-5555}:5555",
        "exporter": "127.0.0.1:${PIPEQ_EXPORTER_PORT:-9808}:9808",
        "gateway": "127.0.0.1:${PIPEQ_GATEWAY_PORT:-8000}:8000",
    }


def test_the_tiny_override_serves_its_config_from_models_it_builds() -> None:
    """deploy/compose.tiny.yml: the sentiment worker reads deploy/pipeq.tiny.toml, whose
    models the tiny-models service builds into the shared cache before it starts."""
    from pipeq._config import load_deployments

    tiny = yaml.safe_load(TINY.read_text())["services"]
    built = tiny["tiny-models"]["entrypoint"]
    assert built[:4] == ["python", "-m", "pipeq.worker.tiny_models", "/models/tiny"]
    sentiment = tiny["sentiment"]
    assert sentiment["depends_on"]["tiny-models"]["condition"] == "service_completed_successfully"
    assert "./deploy/pipeq.tiny.toml:/etc/pipeq/pipeq.toml:ro" in sentiment["volumes"]
    [deployment] = load_deployments(ROOT / "deploy" / "pipeq.tiny.toml").values()
    assert deployment.name == services()["sentiment"]["command"][1]
    assert deployment.model == f"/models/tiny/{built[4]}"
    for name, service in tiny.items():  # one image, built alike by every service
        assert service["build"]["args"] == {"TINY_MODELS": "1"}, name
