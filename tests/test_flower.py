"""Flower under `pipeq up`, as its users call it: jobs through its REST API, results read
back through it, its Broker page, its auth. Real redis-server, workers and Flower."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeq import Client, Job, JobCancelled, JobState
from pipeq._app import queue_for
from pipeq._stack import is_loopback, port_free, stop_process
from pipeq.errors import InvalidRequest, UnknownDeployment
from pipeq.worker.demo import write_config

from .cluster import wait_until
from .conftest import flower_by_hand, free_port, is_sentiment, paused

AUTH = "alice:s3cret-pw"
TEXT = "I've been waiting for a HuggingFace course my whole life."
JOB = {"kwargs": {"inputs": TEXT, "params": {}}}


@dataclass
class Up:
    """A `pipeq up` process and what it printed until it was up."""

    proc: subprocess.Popen[str]
    redis_port: int
    flower_port: int
    auth: str | None = None
    lines: list[str] = field(default_factory=list)
    #: /api/queues/length as soon as Flower answered, before any worker was ready
    first_queues: Any = None
    first_broker_page: str = ""

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def call(
        self, method: str, path: str, body: Any = None, auth: str | None = "default"
    ) -> tuple[int, Any]:
        """(status, JSON or text) of a request to this stack's Flower."""
        auth = self.auth if auth == "default" else auth
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.flower_port}{path}", data=data, method=method
        )
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, raw = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read().decode(errors="replace")
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw


def _start(config: Path, *args: str, auth: str | None = None) -> Up:
    redis_port, flower_port = free_port(), free_port()
    env = {**os.environ, "PIPEQ_REDIS_URL": ""}
    env.pop("PIPEQ_FLOWER_AUTH", None)
    if auth:
        env["PIPEQ_FLOWER_AUTH"] = auth
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeq",
            "up",
            "--config",
            str(config),
            "--redis-port",
            str(redis_port),
            "--flower-port",
            str(flower_port),
            "--exporter-port",
            str(free_port()),
            "--no-gateway",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    return Up(proc, redis_port, flower_port, auth)


def _read_until(up: Up, text: str) -> None:
    assert up.proc.stdout is not None
    for line in up.proc.stdout:
        up.lines.append(line)
        if text in line:
            return
    raise AssertionError(f"`pipeq up` ended before {text!r}:\n{''.join(up.lines)}")


def _first_answers(up: Up) -> None:
    """Ask Flower for its queues as soon as it answers (its workers are still loading)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, up.first_queues = up.call("GET", "/api/queues/length")
            assert status == 200, up.first_queues
            status, up.first_broker_page = up.call("GET", "/broker")
            assert status == 200
            return
        except urllib.error.URLError:
            time.sleep(0.2)
    raise AssertionError("Flower did not answer within 30 s")


@pytest.fixture(scope="module")
def stacks(
    deployments: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Up]]:
    """Two stacks, started together: `open` (loopback, no auth, two deployments) and
    `authed` (every address, PIPEQ_FLOWER_AUTH, a classifier and a generator)."""
    tmp = tmp_path_factory.mktemp("flower")
    two = write_config(
        {k: deployments[k] for k in ("sentiment-analysis", "feature-extraction")}, tmp / "two.toml"
    )
    authed = write_config(
        {k: deployments[k] for k in ("sentiment-analysis", "distilgpt2")}, tmp / "authed.toml"
    )
    ups = {
        "open": _start(two),
        "authed": _start(authed, "--flower-address", "0.0.0.0", auth=AUTH),
    }
    try:
        for up in ups.values():
            _read_until(up, "flower:")
        for up in ups.values():
            _first_answers(up)
        for up in ups.values():
            _read_until(up, "pipeq is up")
            assert not [
                line for line in up.lines if line.startswith("worker") and "ready" not in line
            ]
        yield ups
    finally:
        for up in ups.values():  # once: a second SIGTERM may find it exiting, unguarded
            up.proc.send_signal(signal.SIGTERM)
        for up in ups.values():
            rest, _ = up.proc.communicate(timeout=60)
            assert up.proc.returncode == 0, "".join(up.lines) + rest
            assert port_free(up.flower_port) and port_free(up.redis_port)


def _result(up: Up, job_id: str) -> dict[str, Any]:
    """The job's outcome as Flower answers it, asked until it is done. (With ?timeout=
    Flower waits for the result but answers the state it read before waiting.)"""
    deadline = time.monotonic() + 30
    while True:
        status, body = up.call("GET", f"/api/task/result/{job_id}")
        assert status == 200, body
        assert isinstance(body, dict)
        if body["state"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_send_task_with_a_queue_runs_the_job_and_flower_reads_its_result(
    stacks: dict[str, Up],
) -> None:
    up = stacks["open"]
    status, sent = up.call(
        "POST", "/api/task/send-task/pipeq.run", {**JOB, "queue": "pipeq.sentiment-analysis"}
    )
    assert status == 200, sent
    body = _result(up, sent["task-id"])
    assert body["state"] == "SUCCESS", body
    assert is_sentiment(body["result"]), body
    with Client(up.redis_url) as client:  # the same job, to pipeq's own client
        assert client.job(sent["task-id"]).result(timeout=5) == body["result"]


def test_async_apply_runs_the_job(stacks: dict[str, Up]) -> None:
    up = stacks["open"]
    status, sent = up.call(
        "POST", "/api/task/async-apply/pipeq.run", {**JOB, "queue": "pipeq.feature-extraction"}
    )
    assert status == 200, sent
    body = _result(up, sent["task-id"])
    assert body["state"] == "SUCCESS", body
    with Client(up.redis_url) as client:
        assert client.job(sent["task-id"]).result(timeout=5) == body["result"]
        direct = client.submit("feature-extraction", TEXT).result(timeout=30)
    assert body["result"] == direct  # the same computation as a job sent by pipeq's client


def test_a_send_without_a_deployments_queue_fails_at_once_and_says_why(
    stacks: dict[str, Up],
) -> None:
    """Nothing is enqueued: the job fails at once, its result names what to send."""
    up = stacks["open"]
    r = redis.Redis.from_url(up.redis_url)
    # a worker announces itself before its consumer has bound its queues and its control
    # box (kombu's binding keys): wait for those, or they count as keys this test made
    served = ("sentiment-analysis", "feature-extraction")
    queues = ["celery.pidbox", *(queue_for(d) for d in served)]
    bindings = [f"_kombu.binding.{q}" for q in queues]
    wait_until(lambda: all(r.exists(b) for b in bindings), 60, "the workers' bindings")
    keys_before = set(r.keys("*"))
    cases = [
        ("send-task/pipeq.run", JOB, InvalidRequest, '"queue": "pipeq.<deployment>"'),
        ("async-apply/pipeq.run", JOB, InvalidRequest, '"queue": "pipeq.<deployment>"'),
        ("send-task/pipeq.run", {**JOB, "queue": "celery"}, UnknownDeployment, 'queue "celery"'),
        (
            "send-task/pipeq.run",
            {**JOB, "queue": "pipeq.nope"},
            UnknownDeployment,
            'queue "pipeq.nope"',
        ),
        (
            "send-task/tasks.add",
            {**JOB, "queue": "pipeq.sentiment-analysis"},
            InvalidRequest,
            "only pipeq.run",
        ),
    ]
    with Client(up.redis_url) as client:
        for endpoint, body, error, says in cases:
            status, sent = up.call("POST", f"/api/task/{endpoint}", body)
            assert status == 200, sent
            assert sent["state"] == "FAILURE", (body, sent)
            got = _result(up, sent["task-id"])
            assert got["state"] == "FAILURE" and says in got["result"], got
            assert "deployments: feature-extraction, sentiment-analysis" in got["result"]
            job = client.job(sent["task-id"])
            assert job.status() is JobState.FAILED
            with pytest.raises(error):
                job.result(timeout=1)
    # a worker's first metrics flush may come meanwhile (its number: `pipeq:flushed:`)
    new = {k.decode() for k in set(r.keys("*")) - keys_before} - {
        k.decode() for k in r.keys("pipeq:flushed:*")
    }
    # only the refused jobs' results: no queue, no waiting job anywhere
    assert all(k.startswith("celery-task-meta-") for k in new), new
    assert r.llen("celery") == 0 and r.llen("pipeq.default") == 0 and r.llen("pipeq.nope") == 0


def test_a_job_sent_through_flower_counts_in_the_depth_and_the_queue_length(
    stacks: dict[str, Up],
) -> None:
    up = stacks["open"]
    with Client(up.redis_url) as client:
        with paused(client, "sentiment-analysis"):
            status, sent = up.call(
                "POST",
                "/api/task/send-task/pipeq.run",
                {**JOB, "queue": "pipeq.sentiment-analysis"},
            )
            assert status == 200, sent
            assert client.depth("sentiment-analysis").waiting == 1
            status, lengths = up.call("GET", "/api/queues/length")
            assert {"name": "pipeq.sentiment-analysis", "messages": 1} in lengths["active_queues"]
        assert is_sentiment(client.job(sent["task-id"]).result(timeout=30))


def _with_levels(*deployments: str) -> set[str]:
    """The queues Flower lists for these deployments: each one's, and its high and low
    jobs' lists (docs/scale.md, Priorities)."""
    return {f"pipeq.{d}{level}" for d in deployments for level in ("", ":high", ":low")}


def test_the_broker_page_lists_the_deployments_queues_from_the_start(
    stacks: dict[str, Up],
) -> None:
    up = stacks["open"]
    names = {q["name"] for q in up.first_queues["active_queues"]}
    assert names == _with_levels("sentiment-analysis", "feature-extraction"), up.first_queues
    for name in names:
        assert name in up.first_broker_page


def test_the_api_asks_for_the_password_when_auth_is_configured(stacks: dict[str, Up]) -> None:
    up = stacks["authed"]
    assert "(basic auth)" in "".join(up.lines)
    assert up.call("GET", "/api/queues/length", auth=None)[0] == 401
    assert up.call("GET", "/api/queues/length", auth="alice:wrong")[0] == 401
    assert up.call("POST", "/api/task/send-task/pipeq.run", JOB, auth=None)[0] == 401
    status, lengths = up.call("GET", "/api/queues/length")
    assert status == 200, lengths
    queues = {q["name"] for q in lengths["active_queues"]}
    assert queues == _with_levels("distilgpt2", "sentiment-analysis")
    status, sent = up.call(
        "POST", "/api/task/send-task/pipeq.run", {**JOB, "queue": "pipeq.sentiment-analysis"}
    )
    assert status == 200, sent
    assert is_sentiment(_result(up, sent["task-id"])["result"])


def test_the_api_is_open_on_loopback_without_auth(stacks: dict[str, Up]) -> None:
    up = stacks["open"]
    assert "(API open to this host)" in "".join(up.lines)
    status, workers = up.call("GET", "/api/workers", auth=None)
    assert status == 200, workers


def test_flower_is_given_no_password_or_redis_url_on_its_command_line(
    stacks: dict[str, Up],
) -> None:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    for up in stacks.values():
        (line,) = [x for x in ps.splitlines() if f"flower --port={up.flower_port}" in x]
        assert "redis://" not in line and "s3cret" not in line, line


def test_pipeq_up_refuses_to_expose_flower_without_a_password(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    config = write_config(
        {"sentiment-analysis": deployments["sentiment-analysis"]}, tmp_path / "up.toml"
    )
    for address, auth, says in (
        ("0.0.0.0", None, "with no password: set PIPEQ_FLOWER_AUTH=user:password"),
        ("192.0.2.7", None, "with no password"),
        ("0.0.0.0", "no-colon", "PIPEQ_FLOWER_AUTH must be user:password"),
        ("0.0.0.0", " : ", "PIPEQ_FLOWER_AUTH must be user:password"),  # blank user, password
    ):
        up = _start(config, "--flower-address", address, auth=auth)
        out, _ = up.proc.communicate(timeout=30)
        assert up.proc.returncode == 2, out
        assert out.count("\n") == 1 and says in out, out
        assert port_free(up.redis_port) and port_free(up.flower_port)  # nothing started


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_body_a_worker_would_set_aside_fails_at_once_and_enqueues_nothing(
    stacks: dict[str, Up],
) -> None:
    """Found by a review: an exchange or routing key sent the job to another deployment
    than the one checked; a body without params, or `expires` Celery cannot read (a bare
    500), failed only later or not at all."""
    up = stacks["open"]
    r = redis.Redis.from_url(up.redis_url)
    queue = {"queue": "pipeq.sentiment-analysis"}
    good = {"inputs": "fine", "params": {}}
    cases = [
        ({"kwargs": good, **queue, "routing_key": "pipeq.feature-extraction"}, "routes by queue"),
        ({"kwargs": good, **queue, "exchange": "pipeq.feature-extraction"}, "routes by queue"),
        ({"kwargs": good, **queue, "countdown": 5}, "no delayed jobs"),
        ({"kwargs": {"inputs": "no params"}, **queue}, '"params" may be {}'),
        ({"kwargs": {"inputs": "x", "params": [1]}, **queue}, '"params" may be {}'),
        ({"args": ["x"], **queue}, 'not "args"'),
        ({"kwargs": good, **queue, "expires": "next tuesday"}, "Celery cannot send it"),
    ]
    depth_before = {q: r.llen(q) for q in ("pipeq.sentiment-analysis", "pipeq.feature-extraction")}
    for body, says in cases:
        status, sent = up.call("POST", "/api/task/send-task/pipeq.run", body)
        assert status == 200, (body, sent)
        assert sent["state"] == "FAILURE", (body, sent)
        got = _result(up, sent["task-id"])
        assert "InvalidRequest" in got["result"] and says in got["result"], (body, got)
    assert {q: r.llen(q) for q in depth_before} == depth_before
    with Client(up.redis_url) as client:
        assert client.depth("sentiment-analysis").waiting == 0
        assert client.depth("feature-extraction").waiting == 0


@pytest.mark.parametrize(
    ("argv", "env", "outcome", "api_open"),
    [
        ([], {}, "127.0.0.1", True),  # no password: this host only, whatever Flower's default
        (["--address=0.0.0.0"], {}, "refused", False),
        (["--address", "10.0.0.5"], {}, "refused", False),
        (["--address=127.0.0.1"], {}, None, True),
        (["--address=0.0.0.0"], {"FLOWER_BASIC_AUTH": "a:b"}, None, False),
        (["--address=0.0.0.0"], {"FLOWER_BASIC_AUTH": " "}, "refused", False),
        ([], {"FLOWER_ADDRESS": "0.0.0.0"}, "refused", False),
        ([], {"FLOWER_UNAUTHENTICATED_API": "false"}, "127.0.0.1", False),  # as asked
    ],
)
def test_flower_run_by_hand_never_shows_jobs_beyond_this_host_without_a_password(
    argv: list[str], env: dict[str, str], outcome: str | None, api_open: bool
) -> None:
    """`celery -A pipeq._flower flower` (the docs' command outside `pipeq up`): Flower's
    UI pages show every job's input and bound every interface by default. On this host
    alone its API is open, as under `pipeq up`."""
    from pipeq._flower import guard_exposure

    if outcome == "refused":
        with pytest.raises(SystemExit, match="no password"):
            guard_exposure(["celery", "flower", *argv], dict(env))
        return
    env = dict(env)
    guard_exposure(["celery", "flower", *argv], env)
    assert env.get("FLOWER_ADDRESS") == outcome
    assert (env.get("FLOWER_UNAUTHENTICATED_API") == "true") is api_open


def test_revoke_and_terminate_do_what_cancel_does_or_say_why_not(stacks: dict[str, Up]) -> None:
    """Flower's Revoke and Terminate (`/api/task/revoke/<id>[?terminate=true]`), its abort,
    and Celery's `revoke(terminate=True)` that `celery control revoke` sends: a job not
    started never runs, a continuous-batching generation stops at its next step, and a
    job whose forward pass cannot be stopped is refused with why. Flower answered 200
    "Revoked" to anything; the worker logged NotImplementedError (the threads pool cannot
    terminate) and the job ran on to SUCCESS."""
    up = stacks["authed"]
    gen = "distilgpt2"
    with Client(up.redis_url) as client:
        with paused(client, "sentiment-analysis"):
            queued = client.submit("sentiment-analysis", "never to run")
            status, body = up.call("POST", f"/api/task/revoke/{queued.id}")
            assert (status, body) == (200, {"message": f"Revoked '{queued.id}'"})
        with pytest.raises(JobCancelled):
            queued.result(timeout=30)

        def generating(tokens: int = 900) -> tuple[Job, Iterator[str]]:
            job = client.submit(gen, "Once upon a time", max_new_tokens=tokens, do_sample=False)
            stream = job.stream(timeout=120)
            for _ in range(3):  # the prompt and two steps: it runs
                next(stream)
            return job, stream

        for stop in (
            lambda job: up.call("POST", f"/api/task/revoke/{job.id}?terminate=true"),
            lambda job: up.call("POST", f"/api/task/abort/{job.id}"),
            lambda job: client.app.control.revoke(job.id, terminate=True, reply=True, timeout=5),
        ):
            job, stream = generating()
            said = stop(job)
            rest = list(stream)  # it ends: the generation stopped
            assert job.status() is JobState.CANCELLED, said
            assert len(rest) < 800, (said, len(rest))
            if isinstance(said, tuple):
                assert said == (200, {"message": f"Revoked '{job.id}'"})
            else:  # one reply from each worker, each saying the job is revoked
                assert said and all(
                    reply == {"ok": f"{job.id}: revoked"} for r in said for reply in r.values()
                ), said

        # max_time: the dynamic batcher's forward pass, which nothing interrupts
        beam = client.submit(
            gen, "Once", max_new_tokens=900, min_new_tokens=900, do_sample=False, max_time=600.0
        )
        wait_until(lambda: beam.status() is JobState.RUNNING, 60, "the generation runs")
        status, body = up.call("POST", f"/api/task/revoke/{beam.id}?terminate=true")
        assert status == 409 and "cannot be stopped; it will finish" in body["message"], body
        replies = client.app.control.revoke(beam.id, terminate=True, reply=True, timeout=5)
        assert replies and all("error" in reply for r in replies for reply in r.values())
        assert beam.result(timeout=120)[0]["generated_text"].startswith("Once")
        status, body = up.call("POST", f"/api/task/abort/{beam.id}")
        assert status == 409 and "finished" in body["message"], body
        status, body = up.call("POST", "/api/task/revoke/no-such-job")
        assert status == 404 and "never accepted" in body["message"], body
        assert up.call("POST", f"/api/task/revoke/{beam.id}", auth=None)[0] == 401
    logs = next(line.split()[-1] for line in up.lines if line.startswith("logs:"))
    worker_log = (Path(logs) / f"{gen}.log").read_text(errors="replace")
    assert "NotImplementedError" not in worker_log and "Traceback" not in worker_log


def test_flower_run_by_hand_answers_its_api_on_loopback(
    stacks: dict[str, Up], tmp_path: Path
) -> None:
    """The README's `celery -A pipeq._flower flower` does what `pipeq up`'s does: on this
    host its API answers without a password (it answered 401)."""
    up = stacks["open"]
    with flower_by_hand(up.redis_url, tmp_path / "flower.log") as port:
        by_hand = Up(up.proc, up.redis_port, port)
        status, lengths = by_hand.call("GET", "/api/queues/length")
        assert status == 200, lengths
        names = {q["name"] for q in lengths["active_queues"]}
        assert names == _with_levels("sentiment-analysis", "feature-extraction"), lengths
        status, sent = by_hand.call(
            "POST", "/api/task/send-task/pipeq.run", {**JOB, "queue": "pipeq.sentiment-analysis"}
        )
        assert status == 200, sent
        assert is_sentiment(_result(by_hand, sent["task-id"])["result"])


def _task_info(up: Up, job_id: str) -> dict[str, Any] | None:
    status, body = up.call("GET", f"/api/task/info/{job_id}")
    assert status in (200, 404), body
    return body if status == 200 else None


def test_a_waiting_job_has_its_flower_row_from_submit(stacks: dict[str, Up]) -> None:
    """Flower learns of a job from Celery's task-sent event, which pipeq's enqueue
    publishes: a job still in the queue is PENDING there (it was a 404 until a worker
    took it), sent by pipeq's client or through Flower itself; a high job's routing key
    is its level's list."""
    up = stacks["open"]
    with Client(up.redis_url) as client:
        with paused(client, "sentiment-analysis"):
            job = client.submit("sentiment-analysis", TEXT, top_k=2)
            high = client.submit("sentiment-analysis", TEXT, priority="high")
            status, sent = up.call(
                "POST",
                "/api/task/send-task/pipeq.run",
                {**JOB, "queue": "pipeq.sentiment-analysis"},
            )
            assert status == 200, sent
            for job_id in (job.id, sent["task-id"]):
                row = wait_until(lambda i=job_id: _task_info(up, i), 10, "the queued job's row")
                assert row["state"] == "PENDING", row
                assert row["name"] == "pipeq.run[sentiment-analysis]", row
                assert row["routing_key"] == "pipeq.sentiment-analysis", row
                assert row["client"], row  # the producer that sent it
            row = wait_until(lambda: _task_info(up, high.id), 10, "the high job's row")
            assert row["routing_key"] == "pipeq.sentiment-analysis:high", row  # its level
            assert client.job(job.id).status() is JobState.QUEUED  # no worker has it yet
            assert "'top_k': 2" in (_task_info(up, job.id) or {})["kwargs"]
        assert len(job.result(timeout=30)[0]) == 2
        done = wait_until(
            lambda: (lambda r: r if r and r["state"] == "SUCCESS" else None)(
                _task_info(up, job.id)
            ),
            30,
            "the row's outcome",
        )
        assert done["worker"].startswith("pipeq.sentiment-analysis."), done


def test_a_deployment_announced_after_flower_started_is_listed_with_its_waiting_jobs(
    stacks: dict[str, Up], deployments: dict[str, Any], tmp_path: Path
) -> None:
    """Flower listed the queues of the workers it had inspected (at its start, or at a
    refresh), and nothing else: a deployment that came later was missing from its
    Broker page and /api/queues/length, whatever waited in its queue."""
    up = stacks["open"]
    # a refresh, as Flower's UI does: Flower now lists the queues of these two workers
    wait_until(
        lambda: len(up.call("GET", "/api/workers?refresh=1")[1]) == 2,
        60,
        "Flower inspects the two workers",
    )
    config = write_config({"fill-mask": deployments["fill-mask"]}, tmp_path / "later.toml")
    env = {**os.environ, "PIPEQ_REDIS_URL": up.redis_url}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "worker", "fill-mask", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    with Client(up.redis_url) as client:
        try:
            wait_until(lambda: client.registry.live_workers("fill-mask"), 120, "a new worker")
            with paused(client, "fill-mask"):
                jobs = [client.submit("fill-mask", "Paris is the <mask> of France.") for _ in "abc"]
                status, lengths = up.call("GET", "/api/queues/length")
                assert status == 200, lengths
                assert {"name": "pipeq.fill-mask", "messages": 3} in lengths["active_queues"]
                assert "pipeq.sentiment-analysis" in str(lengths)  # the others stay listed
                status, page = up.call("GET", "/broker")
                assert status == 200 and "pipeq.fill-mask" in page
            assert all(len(job.result(timeout=30)) == 5 for job in jobs)
        finally:
            stop_process(worker, grace_s=120)  # SIGTERM; SIGKILL if it outlasts the grace
            # the module's other tests know two deployments (a killed worker counts as
            # live until its dead_after_s has passed)
            wait_until(lambda: not client.registry.live_workers("fill-mask"), 60, "no worker")
            client.registry.forget("fill-mask")
