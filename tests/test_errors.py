"""Bad input gets a clear, typed error, at submit when the client can tell; no worker dies."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from celery import states
from hypothesis import given
from hypothesis import strategies as st

from pipeq import (
    Client,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobState,
    JobTimeout,
    NoLiveWorker,
    UnknownDeployment,
    UnknownJob,
    pipeline,
)
from pipeq._app import RESULT_TTL_S
from pipeq._ledger import queue_for
from pipeq._registry import NO_WORKER_GRACE_S
from pipeq._stack import Stack, start_redis, stop_process

from .conftest import free_port, paused, send_raw

# empty and blank texts are answered, as transformers answers them; so is a text pair
BAD_TEXT_INPUTS = [None, 3, 2.5, {"text": 3}, {"txt": "hi"}, [], ["fine", None], [["a"]]]


@pytest.mark.parametrize("bad", BAD_TEXT_INPUTS, ids=repr)
def test_bad_text_input_is_refused_at_submit_naming_the_input(client: Client, bad: Any) -> None:
    with pytest.raises(InvalidRequest, match="inputs") as info:
        client.submit("sentiment-analysis", bad)
    assert info.value.deployment == "sentiment-analysis"


@pytest.mark.parametrize(
    ("target", "params", "names"),
    [
        ("sentiment-analysis", {"temperature": 0.5}, "temperature"),
        ("sentiment-analysis", {"top_k": 0}, "top_k"),
        ("fill-mask", {"top_k": "two"}, "top_k"),
        ("zero-shot-classification", {}, "candidate_labels"),
        ("zero-shot-classification", {"candidate_labels": []}, "candidate_labels"),
        ("zero-shot-classification", {"candidate_labels": ["a"], "top_p": 2}, "top_p"),
        ("ner", {"aggregation_strategy": "sometimes"}, "aggregation_strategy"),
        ("ner", {"ignore_subwords": True}, "aggregation_strategy='first'"),
        # what transformers raises ValueError for inside the worker (a JobFailed before)
        (
            "zero-shot-classification",
            {"candidate_labels": ["a"], "hypothesis_template": "x"},
            "hypothesis_template",
        ),
        ("text-generation", {"temperature": 0}, "temperature"),
        ("text-generation", {"temperature": 0, "do_sample": True}, "do_sample=False"),
    ],
)
def test_bad_parameters_are_refused_at_submit_naming_the_parameter(
    client: Client, target: str, params: dict[str, Any], names: str
) -> None:
    with pytest.raises(InvalidRequest, match=names):
        client.submit(target, "Some text with a <mask> token.", **params)


def test_fill_mask_input_without_the_models_mask_token_is_refused(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="<mask>"):
        client.submit("fill-mask", "This course will teach you all about [MASK] models.")


def test_a_fill_mask_top_k_past_the_vocabulary_is_an_invalid_request(client: Client) -> None:
    """torch.topk raised RuntimeError inside the pipeline for it (a JobFailed): the worker,
    which knows the vocabulary, refuses it by name, and the same text with a top_k it
    has is answered."""
    text = "This course will teach you all about <mask> models."
    with pytest.raises(InvalidRequest, match=r"top_k.*vocabulary"):
        client.submit("fill-mask", text, top_k=10**6).result(timeout=30)
    assert len(client.submit("fill-mask", text, top_k=3).result(timeout=30)) == 3


def test_unknown_task_or_deployment_is_a_typed_error(client: Client) -> None:
    with pytest.raises(UnknownDeployment, match="no-such-thing"):
        client.submit("no-such-thing", "hello")
    with pytest.raises(UnknownDeployment, match="gpt-5"):
        pipeline("text-generation", model="gpt-5", client=client)


def test_a_deployment_whose_workers_are_gone_for_good_is_refused_at_submit(
    client: Client,
) -> None:
    """Jobs wait for a deployment whose worker beat within `no_worker_grace_s` (it is
    restarting); past that, the deployment has gone and submit says so."""
    info = {"name": "ghost", "task": "text-classification", "model": "nowhere"}
    client.redis.hset("pipeq:deployments", "ghost", json.dumps(info))
    (now, _) = client.redis.time()
    client.redis.zadd("pipeq:workers:ghost", {"gone@host": now - 30})
    job = client.submit("ghost", "hello")  # its worker beat 30 s ago: restarting, maybe
    assert job.status() is JobState.QUEUED
    client.redis.zadd("pipeq:workers:ghost", {"gone@host": now - NO_WORKER_GRACE_S - 1})
    with Client(client.redis_url) as fresh, pytest.raises(NoLiveWorker, match="pipeq worker ghost"):
        fresh.submit("ghost", "hello")


@pytest.mark.parametrize(
    "inputs",
    [None, 42, {"a": 1}, {"text_pair": "x"}, ["ok", 7]],
    ids=["none", "number", "dict", "pair-without-text", "list"],
)
def test_bad_input_sent_past_the_client_fails_the_job_and_not_the_worker(
    client: Client, stack: Stack, inputs: Any
) -> None:
    """A producer that skips validation (a raw Celery message) gets a failed job."""
    job = send_raw(client, "sentiment-analysis", inputs=inputs, params={})
    with pytest.raises(InvalidRequest, match="inputs"):
        job.result(timeout=30)
    assert job.status() is JobState.FAILED
    assert "sentiment-analysis" not in stack.failed()
    assert client.submit("sentiment-analysis", "still alive?").result(timeout=30)


def test_an_error_inside_the_pipeline_is_a_failed_job_with_its_message(client: Client) -> None:
    job = send_raw(
        client,
        "text-generation",
        inputs="hello",
        params={"num_beams": 2, "num_return_sequences": 3, "max_new_tokens": 2},
    )
    with pytest.raises(JobFailed, match=r"ValueError: .*num_return_sequences"):
        job.result(timeout=30)
    assert client.submit("zero-shot-classification", "hello", candidate_labels=["a", "b"]).result(
        timeout=30
    )


def test_a_cancelled_job_never_runs_and_says_so(client: Client) -> None:
    with paused(client, "sentiment-analysis"):
        job = client.submit("sentiment-analysis", "cancel me")
        assert job.cancel() is True
        assert job.status() is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        job.result(timeout=30)
    after = client.submit("sentiment-analysis", "next one")
    after.result(timeout=30)
    assert job.status() is JobState.CANCELLED
    assert job.cancel() is False  # finished jobs cannot be cancelled


def test_a_result_timeout_under_a_second_is_honoured(client: Client) -> None:
    """Celery waits for results in 1 s steps: `result(timeout=0.2)` used to take 1 s."""
    with paused(client, "sentiment-analysis"):
        job = client.submit("sentiment-analysis", "not yet")
        started = time.monotonic()
        with pytest.raises(JobTimeout, match=r"no result within 0\.2 s"):
            job.result(timeout=0.2)
        assert time.monotonic() - started < 0.9
        assert job.status() is JobState.QUEUED
    assert job.result(timeout=30) == [{"label": ANY, "score": ANY}]


def test_a_worker_whose_model_fails_to_load_says_why_and_exits_non_zero(
    redis_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(
        '[deployments.broken]\ntask = "text-classification"\nmodel = "/nonexistent/model"\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeq",
            "worker",
            "broken",
            "--config",
            str(config),
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert "could not load '/nonexistent/model'" in proc.stderr
    with Client(redis_url) as c, pytest.raises(NoLiveWorker, match="failed to load the model"):
        c.submit("broken", "hello")


def test_a_stored_success_is_never_overwritten_and_each_store_is_published(
    redis_url: str,
) -> None:
    """Results are stored in one atomic round trip with Celery's rule: a SUCCESS stays
    (a job redelivered after it finished must not replace it), anything else is set,
    published to the job's channel, and expires."""
    with Client(redis_url) as client:
        backend = client.app.backend
        job_id = "stored-once"
        key = backend.get_key_for_task(job_id)
        channel = client.redis.pubsub()
        channel.subscribe(key)
        assert channel.get_message(timeout=1)["type"] == "subscribe"
        backend.store_result(job_id, None, states.STARTED)
        backend.store_result(job_id, [1, 2], states.SUCCESS)
        backend.mark_as_failure(job_id, JobFailed("late duplicate"))
        backend.store_result(job_id, None, states.STARTED)
        published = []
        while (message := channel.get_message(timeout=1)) is not None:
            published.append(backend.decode(message["data"])["status"])
        channel.close()
        assert published == [states.STARTED, states.SUCCESS]
        assert client.job(job_id).result(timeout=1) == [1, 2]
        assert 0 < client.redis.ttl(key) <= RESULT_TTL_S


@pytest.mark.timeout(60)
def test_jobs_outliving_their_client_and_redis_are_collected_at_once(tmp_path: Path) -> None:
    """Celery's AsyncResult.__del__ reconnects to a Redis that is gone, for minutes;
    a closed Client's jobs must not (`pipeq bench` hung at exit on this)."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    client = Client(f"redis://127.0.0.1:{port}/0")
    jobs = [client.job(f"done-{i}") for i in range(20)]
    for job in jobs:  # a result read through the job's result channel
        client.app.backend.store_result(job.id, [0, 1, 2], states.SUCCESS)
        assert job.result(timeout=10) == [0, 1, 2]
    client.close()
    stop_process(proc)
    del job
    collector = threading.Thread(target=lambda: jobs.clear() or gc.collect(), daemon=True)
    collector.start()
    collector.join(timeout=10)
    assert not collector.is_alive(), "dropping the jobs hangs, reconnecting to a Redis gone"


@pytest.mark.timeout(60)
def test_a_process_with_a_client_never_closed_exits_at_once_when_redis_is_gone(
    tmp_path: Path,
) -> None:
    """`pipeline()` makes a Client nobody closes. Once Redis was gone, such a process
    took about 18 s to exit (result handles reconnecting), then printed a traceback."""
    child_code = """
import sys, threading
from pipeq import Client, JobTimeout
client = Client(sys.argv[1])
jobs = [client.job(f"done-{i}") for i in range(5)]
for job in jobs:  # each read through its result channel
    client.app.backend.store_result(job.id, [0, 1, 2], "SUCCESS")
    job.result(timeout=10)
try:
    client.job("never-sent").result(timeout=0.1)
except JobTimeout:
    print("waited", flush=True)
sys.stdin.readline()  # Redis is gone now
del job
threading.Thread(target=jobs.clear).start()  # handles dropped in another thread
"""
    port = free_port()
    proc = start_redis(port, tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, f"redis://127.0.0.1:{port}/0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "waited\n"
    stop_process(proc)
    started = time.monotonic()
    _, stderr = child.communicate("go\n", timeout=50)
    assert child.returncode == 0, stderr
    assert time.monotonic() - started < 5, stderr
    assert "reconnect" not in stderr


@pytest.mark.parametrize(
    ("target", "inputs", "params", "names"),
    [
        ("sentiment-analysis", "x" * 10_000_000, {}, "request_bytes"),
        ("sentiment-analysis", ["a"] * 1025, {}, "items_per_job"),
        ("text-generation", "Hi", {"max_new_tokens": 10**9}, "limits.max_new_tokens"),
        ("text-generation", "Hi", {"max_length": 5000}, "limits.max_new_tokens"),
        ("text-generation", "Hi", {"num_return_sequences": 20000}, "num_return_sequences"),
        ("text-generation", "Hi", {"num_beams": 64}, "num_beams"),
        ("text-generation", "Hi", {"temperature": float("inf")}, "temperature"),
        ("text-generation", "Hi", {"temperature": float("nan")}, "temperature"),
        ("text-generation", "Hi", {"top_p": 5}, "top_p"),
        ("text-generation", "Hi", {"repetition_penalty": 0}, "repetition_penalty"),
        ("feature-extraction", "Hi", {"tokenize_kwargs": {"a": [[[[[[[[]]]]]]]] * 1}}, None),
    ],
)
def test_requests_past_a_deployments_limits_are_refused_at_submit(
    client: Client, target: str, inputs: Any, params: dict[str, Any], names: str | None
) -> None:
    """TGI and TEI bound requests the same way: one 10 MB input took a distilbert-base
    worker from 0.7 GB to 7.9 GB of memory; `max_new_tokens=10**9` held a generator."""
    if names is None:  # nested 8 deep: fine; the nesting test below goes past the bound
        client.submit(target, inputs, **params).result(timeout=30)
        return
    with pytest.raises(InvalidRequest, match=names):
        client.submit(target, inputs, **params)


def test_a_request_nested_past_the_bound_is_refused_without_recursing(client: Client) -> None:
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="nests"):
        client.submit("sentiment-analysis", deep)
    with pytest.raises(InvalidRequest, match="nests"):
        client.submit("feature-extraction", "Hi", tokenize_kwargs={"x": deep})


def test_a_worker_checks_the_limits_again_for_a_producer_that_skipped_them(
    client: Client,
) -> None:
    job = send_raw(client, "text-generation", inputs="Hi", params={"max_new_tokens": 100_000})
    with pytest.raises(InvalidRequest, match=r"limits\.max_new_tokens"):
        job.result(timeout=30)


def test_a_worker_that_cannot_reach_redis_exits_non_zero_saying_why(
    deployments: dict[str, Any], tmp_path: Path
) -> None:
    from pipeq.worker.demo import write_config

    config = write_config(
        {"sentiment-analysis": deployments["sentiment-analysis"]}, tmp_path / "c.toml"
    )
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeq",
            "worker",
            "sentiment-analysis",
            "--config",
            str(config),
            "--redis-url",
            f"redis://:hunter2@127.0.0.1:{port}/0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Redis at redis://:***@" in proc.stderr and "hunter2" not in proc.stderr


@pytest.mark.parametrize("expires", [1e12, float("inf"), 10**30, float("nan"), -1, 0, True, "30"])
def test_an_expires_that_is_no_deadline_is_refused_at_submit(client: Client, expires: Any) -> None:
    with pytest.raises(InvalidRequest, match="expires"):
        client.submit("sentiment-analysis", "hello", expires=expires)


def test_a_naive_datetime_is_this_machines_local_time(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`datetime.now() + 60 s` (naive, local) used to be read as UTC: JobExpired at once
    west of Greenwich, nine hours late in Tokyo."""
    import datetime

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        soon = datetime.datetime.now() + datetime.timedelta(seconds=60)
        assert client.submit("sentiment-analysis", "in time", expires=soon).result(timeout=30)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("bad", ["bad \ud800", ["fine", "bad \udfff"]], ids=["text", "list"])
def test_text_that_is_not_valid_unicode_is_refused_at_submit(client: Client, bad: Any) -> None:
    with pytest.raises(InvalidRequest, match="surrogate"):
        client.submit("sentiment-analysis", bad)
    outcomes = client.map("sentiment-analysis", ["fine", "bad \ud800"], return_exceptions=True)
    assert isinstance(outcomes[1], InvalidRequest) and outcomes[0][0]["label"]


@pytest.mark.parametrize(
    ("args", "env", "code", "says"),
    [
        (["deployments", "--redis-url", "http://nowhere"], {}, 2, "invalid Redis URL"),
        (["status", "x", "--redis-url", "redis://h:notaport/0"], {}, 2, "invalid Redis URL"),
        (["status", ""], {}, 2, "non-empty"),
        (["cancel", ""], {}, 2, "non-empty"),
        (["result", "never-seen-id"], {}, 1, "unknown job"),
        (["result", "x", "--timeout", "nan"], {}, 2, "finite"),
        (["worker", "x"], {"PIPEQ_HEARTBEAT_S": "abc"}, 2, "heartbeat-s"),
        (["worker", "x", "--dead-after-s", "inf"], {}, 2, "finite"),
        (["deployments"], {"PIPEQ_HEARTBEAT_S": "abc"}, 0, ""),
    ],
)
def test_the_cli_says_what_is_wrong_in_one_line(
    redis_url: str, args: list[str], env: dict[str, str], code: int, says: str
) -> None:
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "pipeq", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PIPEQ_REDIS_URL": redis_url, **env},
    )
    assert proc.returncode == code, proc.stderr
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_worker_gone_for_good_is_forgotten_with_its_statistics(redis_url: str) -> None:
    """A dead worker's jobs go back, then after forget_after_s its entries go too (its
    statistics field used to stay for ever)."""
    import redis

    from pipeq._ledger import dead_after_key, workers_key
    from pipeq._registry import stats_key
    from pipeq.worker.liveness import Heartbeat, LivenessSettings

    r = redis.Redis.from_url(redis_url)
    # nothing is reclaimed until Redis has been up for the dead worker's dead_after_s (10 s):
    # first in its test process, this test would find it younger
    deadline = time.monotonic() + 30
    while int(r.info("server")["uptime_in_seconds"]) <= 11:
        assert time.monotonic() < deadline, "the session's Redis does not age"
        time.sleep(0.2)
    name = f"forgetting-{time.time_ns()}"
    (now, _) = r.time()
    r.zadd(workers_key(name), {"gone@host": now - 30})
    r.hset(dead_after_key(name), "gone@host", 10)
    r.hset(stats_key(name), "gone@host", "{}")
    settings = LivenessSettings(heartbeat_s=0.5, dead_after_s=2.5, forget_after_s=20)
    info = {"name": name, "task": "text-classification", "model": "m"}
    beat = Heartbeat(r, name, "alive@host", info, settings, result_ttl_s=60)
    beat.beat()
    assert [m.decode() for m in r.zrange(workers_key(name), 0, -1)] == ["alive@host"]
    assert not r.hexists(stats_key(name), "gone@host")
    assert not r.hexists(dead_after_key(name), "gone@host")


@given(st.text(max_size=120))
def test_a_deployment_name_is_accepted_exactly_when_it_is_a_plain_token(name: str) -> None:
    """Names become Redis keys, queue names, Celery hostnames and Prometheus labels:
    letters, digits, `_.-`, first a letter or digit, at most 100. A trailing newline
    passed the old check (`$` matches before it)."""
    from pipeq._config import Deployment

    plain = (
        0 < len(name) <= 100
        and name[0].isascii()
        and name[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
    )
    try:
        Deployment(name=name, task="ner", model="m")
    except InvalidRequest:
        assert not plain
    else:
        assert plain


def test_a_deployment_name_with_a_trailing_newline_is_refused() -> None:
    from pipeq._config import Deployment

    with pytest.raises(InvalidRequest, match="deployment name"):
        Deployment(name="evil\n", task="ner", model="m")


@pytest.mark.parametrize(
    ("field", "value"), [("device", "cuda\n"), ("task", "translation_en_to_fr\n")]
)
def test_a_setting_with_a_trailing_newline_is_refused(field: str, value: str) -> None:
    from pipeq import UnknownDeployment
    from pipeq._config import Deployment

    settings = {"name": "d", "task": "ner", "model": "m", field: value}
    with pytest.raises((InvalidRequest, UnknownDeployment)):  # an unknown task: the latter
        Deployment(**settings)


def test_a_forgotten_job_is_unknown_at_once_and_a_copy_of_it_never_runs(client: Client) -> None:
    """`Job.forget()` of a finished job deletes its result, record and stream: `status()`
    is UNKNOWN and `result()` / `stream()` raise UnknownJob at once, from that handle or
    any other; a copy of its message left in Redis (a retried send) is dropped before
    compute. It sent the job back to QUEUED with a result() that never came, and the same
    handle then raised a raw AttributeError. A job not finished is not forgotten."""
    deployment = "sentiment-analysis"
    queue = queue_for(deployment)
    copy = None
    for _ in range(3):  # a worker just started may take a job before it pauses
        with paused(client, deployment):
            job = client.submit(deployment, "forget me once I am done")
            assert job.forget() is False  # not finished: it runs and stores its result
            deadline = time.monotonic() + 5  # a take already under way hands it back
            while not client.redis.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.05)
            copy = next(iter(client.redis.lrange(queue, 0, 0)), None)
        if copy is not None:
            break
    assert copy is not None, "the paused deployment's queue never held the job"
    assert job.result(timeout=30)[0]["label"] in ("POSITIVE", "NEGATIVE")
    late = client.app.backend.get_task_meta(job.id)  # its result message, as published
    assert job.forget() is True
    # the message again, come late to this Client's subscription: Celery keeps it for
    # the next waiter on the id (a late message made `other.result()` below return)
    client.app.backend.result_consumer.on_state_change(late, None)
    assert job.status() is JobState.UNKNOWN
    with pytest.raises(UnknownJob):
        job.result()
    other = client.job(job.id)  # a handle of another producer, waiting with no timeout
    assert other.status() is JobState.UNKNOWN
    with pytest.raises(UnknownJob):
        other.result()
    assert other.cancel() is False and other.forget() is False

    client.redis.lpush(queue, copy)  # the same message again, as a retried send leaves it

    def taken() -> bool:
        held = sum(client.redis.llen(k) for k in client.redis.keys("pipeq:inflight:*"))
        return not client.redis.llen(queue) and not held

    deadline = time.monotonic() + 30
    while not taken() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert taken(), "the worker did not take the copy"
    assert not client.redis.exists(f"celery-task-meta-{job.id}"), "the forgotten job ran again"
    assert job.status() is JobState.UNKNOWN

    generation = client.submit("distilgpt2", "Forget", max_new_tokens=3, do_sample=False)
    generation.result(timeout=30)
    assert generation.forget() is True
    for handle in (generation, client.job(generation.id)):
        with pytest.raises(UnknownJob):
            list(handle.stream())
