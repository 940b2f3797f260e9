"""Each task through Redis and a worker gives what transformers gives in-process."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from celery.worker.consumer.connection import Connection as CeleryConnection

from pipeq import Client, InvalidRequest, JobFailed, JobState, pipeline
from pipeq._app import RUN_TASK
from pipeq._stack import Stack
from pipeq.worker.demo import write_config
from pipeq.worker.handlers import to_jsonable

from .conftest import assert_close, paused, send_raw

# (deployment, transformers task, inputs, params)
NATIVE_CASES = [
    (
        "sentiment-analysis",
        "sentiment-analysis",
        "I've been waiting for a HuggingFace course my whole life.",
        {},
    ),
    ("sentiment-analysis", "sentiment-analysis", ["You monster!", "You clever monster!"], {}),
    ("sentiment-analysis", "sentiment-analysis", "You clever monster!", {"top_k": 2}),
    ("sentiment-analysis", "sentiment-analysis", ["You monster!", "Hi"], {"top_k": None}),
    (
        "zero-shot-classification",
        "zero-shot-classification",
        "This is a course about the Transformers library",
        {"candidate_labels": ["education", "politics", "business"]},
    ),
    (
        "zero-shot-classification",
        "zero-shot-classification",
        ["Byte-Pair Encoding: Subword-based tokenization algorithm", "Elections are coming"],
        {"candidate_labels": ["computer science", "politics"], "multi_label": True},
    ),
    (
        "text-generation",
        "text-generation",
        "In this course, we will teach you how to",
        {"max_new_tokens": 8, "do_sample": False},
    ),
    (
        "distilgpt2",
        "text-generation",
        ["In this course", "Hello there, my friend"],
        {"max_new_tokens": 5, "do_sample": False},
    ),
    ("fill-mask", "fill-mask", "This course will teach you all about <mask> models.", {"top_k": 2}),
    ("fill-mask", "fill-mask", ["She is crying. I should <mask> her.", "A <mask> day."], {}),
    (
        "ner",
        "ner",
        "My name is Sylvain and I work at Hugging Face in Brooklyn.",
        {"aggregation_strategy": "simple"},
    ),
    ("ner", "ner", ["My name is Sylvain.", "I work at Hugging Face in Brooklyn."], {}),
    (
        "feature-extraction",
        "feature-extraction",
        "This is a course about the Transformers library",
        {},
    ),
    (
        "feature-extraction",
        "feature-extraction",
        ["Short one.", "A rather longer second sentence."],
        {},
    ),
]


@cache
def local_pipeline(task: str, model: str) -> Any:
    from transformers import pipeline as hf_pipeline

    return hf_pipeline(task, model=model)


@pytest.mark.parametrize(("deployment", "task", "inputs", "params"), NATIVE_CASES)
def test_result_through_the_queue_equals_transformers_in_process(
    client: Client,
    deployments: dict[str, Any],
    deployment: str,
    task: str,
    inputs: Any,
    params: dict[str, Any],
) -> None:
    got = client.submit(deployment, inputs, **params).result(timeout=60)
    want = to_jsonable(local_pipeline(task, deployments[deployment].model)(inputs, **params))
    assert_close(got, want, tol=1e-5)


def test_course_spelling_grouped_entities_equals_aggregation_strategy_simple(
    client: Client,
) -> None:
    text = "My name is Sylvain and I work at Hugging Face in Brooklyn."
    course = pipeline("ner", grouped_entities=True, client=client)(text)
    per_call = pipeline("ner", client=client)(text, grouped_entities=True)
    simple = client.submit("ner", text, aggregation_strategy="simple").result(timeout=60)
    assert course == per_call == simple
    assert all(set(e) == {"entity_group", "score", "word", "start", "end"} for e in simple)


def test_job_status_moves_from_queued_to_running_to_succeeded(client: Client) -> None:
    with paused(client, "text-generation"):
        job = client.submit(
            "text-generation",
            "Once upon a time",
            max_new_tokens=300,
            min_new_tokens=300,
            do_sample=False,
        )
        assert job.status() is JobState.QUEUED
    seen = [JobState.QUEUED]
    while not (state := job.status()).done:
        if state is not seen[-1]:
            seen.append(state)
    seen.append(state)
    assert seen == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert job.result(timeout=30)[0]["generated_text"].startswith("Once upon a time")


def test_sending_subscribes_to_nothing_and_a_result_stored_before_the_wait_is_read(
    client: Client, deployments: dict[str, Any]
) -> None:
    """Celery subscribes to a job's result channel as it is sent; pipeq's Job subscribes
    only when it waits, reading the stored result first, so nothing is missed."""

    def subscribes() -> int:
        return int(client.redis.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))

    before = subscribes()
    job = client.submit("sentiment-analysis", "You clever monster!")
    assert subscribes() == before
    while not job.status().done:  # finished before anyone waits for it
        time.sleep(0.01)
    local = local_pipeline("sentiment-analysis", deployments["sentiment-analysis"].model)
    assert_close(job.result(timeout=1), to_jsonable(local("You clever monster!")), tol=1e-5)


Events = list[dict[str, Any]]


@contextmanager
def flower_view(client: Client) -> Iterator[tuple[Events, Callable[[Callable[[], bool]], None]]]:
    """The task events Flower would receive while the block runs, and `until(done)`,
    which takes in events until `done()` is true (30 s at most)."""
    events: Events = []
    with client.app.connection_for_read() as conn:
        receiver = client.app.events.Receiver(conn, handlers={"*": events.append})
        capture = receiver.itercapture(timeout=30, wakeup=False)
        next(capture)  # subscribed: an event (a worker's heartbeat) came through

        def until(done: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 30
            while not done():
                assert time.monotonic() < deadline, events[-10:]
                next(capture)

        yield events, until


def test_every_job_reaches_flower_as_received_started_then_succeeded_or_failed(
    client: Client,
) -> None:
    """Workers publish task events a moment after they happen, many jobs to a message;
    each job still gets its own row, in order, with the time each step happened, from
    the task-sent event its enqueue published (Flower shows a queued job)."""
    with flower_view(client) as (events, until):
        good = client.submit("sentiment-analysis", "You clever monster!")
        many = client.submit("sentiment-analysis", ["You clever monster!"] * 60)
        bad = send_raw(  # fails in the pipeline: generate() refuses 3 sequences of 2 beams
            client,
            "text-generation",
            inputs="hi",
            params={"num_beams": 2, "num_return_sequences": 3, "max_new_tokens": 2},
        )
        # set aside by the worker's gate (no params): Celery never sees it, Flower must
        malformed = send_raw(client, "sentiment-analysis", inputs="hi")
        good.result(timeout=30)
        many.result(timeout=30)
        with pytest.raises(JobFailed):
            bad.result(timeout=30)
        with pytest.raises(InvalidRequest, match="malformed message"):
            malformed.result(timeout=30)
        want = {
            good.id: ["task-sent", "task-received", "task-started", "task-succeeded"],
            many.id: ["task-sent", "task-received", "task-started", "task-succeeded"],
            bad.id: ["task-sent", "task-received", "task-started", "task-failed"],
            malformed.id: ["task-sent", "task-received", "task-failed"],
        }

        def seen(job_id: str) -> Events:
            return [e for e in events if e.get("uuid") == job_id]

        until(lambda: all([e["type"] for e in seen(j)] == steps for j, steps in want.items()))
    for job_id in want:
        stamps = [e["timestamp"] for e in seen(job_id)]
        assert stamps == sorted(stamps)
    assert seen(malformed.id)[1]["name"] == f"{RUN_TASK}[sentiment-analysis]"
    sent, received = seen(good.id)[:2]
    for event in (sent, received):  # the same row, before and after a worker took it
        assert event["name"] == f"{RUN_TASK}[sentiment-analysis]"
        assert event["args"] == "()"
        assert event["kwargs"] == repr({"inputs": "You clever monster!", "params": {}})
    assert sent["routing_key"] == "pipeq.sentiment-analysis"
    shown = seen(many.id)[1]["kwargs"]  # cut to 1 kB, as Celery cuts them
    assert len(shown) == 1024 and shown.endswith("...")
    assert shown.startswith(repr({"inputs": ["You clever monster!"] * 60})[:1021])


@contextmanager
def own_sentiment_stack(
    name: str, redis_url: str, deployments: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[Any, Stack]]:
    """A stack (started) of one worker of its own, the sentiment model under `name`;
    afterwards stopped, and the deployment forgotten: left announced on the session's
    Redis, it made the Hub id it serves ambiguous for the gateway's tests (404)."""
    d = dataclasses.replace(deployments["sentiment-analysis"], name=name)
    stack = Stack(
        {d.name: d},
        str(write_config({d.name: d}, tmp_path / f"{name}.toml")),
        redis_url=redis_url,
        flower_port=None,
        exporter_port=None,
    )
    stack.start()
    try:
        yield d, stack
    finally:
        stack.stop()
        with Client(redis_url) as client:
            client.registry.forget(name)


def test_a_stopping_worker_sends_the_flower_events_it_still_holds(
    redis_url: str, deployments: dict[str, Any], tmp_path: Path
) -> None:
    """Events wait a moment in the worker before they go out; stopped at once after its
    last job, a worker still sends them all."""
    with own_sentiment_stack("sentiment-stopping", redis_url, deployments, tmp_path) as (
        d,
        stack,
    ):
        assert stack.wait_ready(timeout_s=120) == {d.name: "ready"}
        with Client(redis_url) as client, flower_view(client) as (events, until):
            jobs = [client.submit(d.name, f"text {i}") for i in range(3)]
            for job in jobs:
                job.result(timeout=30)
            stack.stop()  # at once: the jobs' events are still held in the worker
            ids = {job.id for job in jobs}
            until(lambda: ids <= {e["uuid"] for e in events if e["type"] == "task-succeeded"})


def test_a_worker_answers_flowers_stats_inspection_without_its_transport_options(
    redis_url: str, deployments: dict[str, Any], tmp_path: Path
) -> None:
    """Flower's worker page asks `inspect stats`; the reply failed (a hook in the
    transport options is not JSON), and would carry a Sentinel password once it did not.
    A worker of its own (`test_the_worker_consumer_runs_celerys_connection_step_once`
    has why the reply failed in one worker in three or four)."""
    with own_sentiment_stack("sentiment-inspected", redis_url, deployments, tmp_path) as (
        d,
        stack,
    ):
        assert stack.wait_ready(timeout_s=120) == {d.name: "ready"}
        with Client(redis_url) as client:
            client.submit(d.name, "counted in its stats").result(timeout=30)
            # a broadcast reaches only the workers subscribed when it is sent (Redis
            # pub/sub): a new worker is live a moment before it listens, as Flower, which
            # asks again every few seconds, finds too
            deadline = time.monotonic() + 60
            while True:
                workers = client.registry.live_workers(d.name)
                replies = client.app.control.inspect(destination=workers, timeout=2).stats()
                if replies or time.monotonic() > deadline:
                    break
    assert replies and set(replies) == set(workers), (replies, workers)
    [stats] = replies.values()
    assert stats["broker"]["transport"]  # the broker part is there,
    assert "transport_options" not in stats["broker"]  # without hooks or secrets
    assert "pool" in stats and "total" in stats


def test_the_worker_consumer_runs_celerys_connection_step_once() -> None:
    """pipeq's subclass of the Connection step ran beside Celery's own (other steps
    require it by name), in an order that varied per process: when Celery's came last,
    `inspect stats` carried the worker's hooks and the reply failed."""
    from pipeq.worker.main import Consumer

    blueprint = Consumer.Blueprint()
    steps = blueprint.steps = blueprint.claim_steps()
    order = blueprint._finalize_steps(steps)
    assert [s for s in order if issubclass(s, CeleryConnection)] == [CeleryConnection]
