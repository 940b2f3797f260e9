"""A message no worker can run is set aside; its job fails typed; the worker goes on.

Messages are pushed straight onto a deployment's queue, as a buggy or hostile producer
would (no pipeq client, no Celery): each must end in the dead-letter list with a reason,
fail its job with InvalidRequest where it names one, and leave the worker serving.
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeq import Client, InvalidRequest, JobState
from pipeq._app import RUN_TASK
from pipeq._ledger import DEAD_LETTER, queue_for
from pipeq._stack import Stack
from pipeq.worker.gate import Malformed, check_message

from .conftest import paused

DEPLOYMENT = "sentiment-analysis"
Mutation = Callable[[dict[str, Any], str], Any]


def body(args: Any = (), kwargs: Any = None, embed: Any = None) -> str:
    kwargs = {"inputs": "fine", "params": {}} if kwargs is None else kwargs
    embed = (
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        if embed is None
        else embed
    )
    return base64.b64encode(json.dumps([list(args), kwargs, embed]).encode()).decode()


def envelope(job_id: str) -> dict[str, Any]:
    """A well-formed message, as kombu's Redis transport stores one Celery sends."""
    return {
        "body": body(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": RUN_TASK,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": "{}",
            "origin": "test",
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": "x",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue_for(DEPLOYMENT)},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def edit(**changes: Any) -> Mutation:
    """Set (or, with None for a key prefixed '-', delete) dotted keys of the envelope."""

    def mutate(m: dict[str, Any], job_id: str) -> Any:
        for path, value in changes.items():
            *parents, last = path.lstrip("-").split("__")
            target = m
            for p in parents:
                target = target[p]
            if path.startswith("-"):
                del target[last]
            else:
                target[last] = value
        return m

    return mutate


def raw(data: bytes) -> Mutation:
    return lambda m, job_id: data


BIG = "x" * (7 * 2**20)
# (name, mutation, whether the job id stays readable)
KINDS: list[tuple[str, Mutation, bool]] = [
    ("not-json", raw(b"this is not json"), False),
    ("binary", raw(b"\xff\xfe\x00\x01 binary"), False),
    ("empty", raw(b""), False),
    ("json-list", raw(b"[1, 2, 3]"), False),
    ("json-string", raw(b'"a string"'), False),
    ("json-number", raw(b"42"), False),
    ("json-null", raw(b"null"), False),
    ("empty-object", raw(b"{}"), False),
    ("truncated", lambda m, j: json.dumps(m).encode()[:-40], False),
    ("deep-nesting", raw(b"[" * 100_000 + b"]" * 100_000), False),
    ("no-headers", edit(**{"-headers": None}), False),
    ("headers-list", edit(headers=[1, 2]), False),
    ("no-id", edit(**{"-headers__id": None}), False),
    ("id-number", edit(headers__id=123), False),
    ("id-empty", edit(headers__id=""), False),
    ("id-too-long", edit(headers__id="i" * 300), False),
    ("wrong-task", edit(headers__task="other.task"), True),
    ("no-task", edit(**{"-headers__task": None}), True),
    (
        "pickle",
        edit(
            **{
                "content-type": "application/x-python-serialize",
                "content-encoding": "binary",
                "body": base64.b64encode(pickle.dumps(((), {"inputs": "x"}, {}))).decode(),
            }
        ),
        True,
    ),
    ("yaml", edit(**{"content-type": "application/x-yaml", "body": "aW5wdXRzOiB4"}), True),
    ("no-content-type", edit(**{"-content-type": None}), True),
    ("latin1-encoding", edit(**{"content-encoding": "latin-1"}), True),
    ("body-not-base64-encoding", edit(properties__body_encoding="utf-8"), True),
    ("body-bad-base64", edit(body="!!!not base64!!!"), True),
    ("body-base64-not-json", edit(body=base64.b64encode(b"{nope").decode()), True),
    ("body-dict", edit(body=base64.b64encode(b'{"inputs": "x"}').decode()), True),
    ("body-positional-args", edit(body=body(args=["x"])), True),
    ("body-no-inputs", edit(body=body(kwargs={"params": {}})), True),
    ("body-no-params", edit(body=body(kwargs={"inputs": "x"})), True),
    ("body-params-list", edit(body=body(kwargs={"inputs": "x", "params": [1]})), True),
    ("body-unknown-kwarg", edit(body=body(kwargs={"inputs": "x", "params": {}, "y": 1})), True),
    (
        "body-per-item-string",
        edit(body=body(kwargs={"inputs": ["x"], "params": {}, "per_item": "yes"})),
        True,
    ),
    ("body-callbacks", edit(body=body(embed={"callbacks": [{"task": "evil"}]})), True),
    ("eta-far-future", edit(headers__eta="2126-01-01T00:00:00+00:00"), True),
    ("expires-garbage", edit(headers__expires="next tuesday"), True),
    ("group", edit(headers__group="g-1"), True),
    ("no-properties", edit(**{"-properties": None}), True),
    ("no-delivery-tag", edit(**{"-properties__delivery_tag": None}), True),
    ("oversized", edit(headers__kwargsrepr=BIG), True),
    # the body comes before the headers, as kombu writes it: the id is past the first MBs
    ("oversized-body", edit(body=base64.b64encode(b"x" * 7_000_000).decode()), True),
    # forms Celery's worker cannot read: one of these took down every worker in turn
    ("timelimit-string", edit(headers__timelimit="x"), True),
    ("timelimit-number", edit(headers__timelimit=5), True),
    ("timelimit-one", edit(headers__timelimit=[1]), True),
    ("timelimit-three", edit(headers__timelimit=[1, 2, 3]), True),
    ("retries-string", edit(headers__retries="x"), True),
    ("shadow-number", edit(headers__shadow=5), True),
    ("priority-string", edit(properties__priority="high"), True),
    (
        "routing-key-number",
        edit(properties__delivery_info={"exchange": "", "routing_key": 7}),
        True,
    ),
    ("ignore-result", edit(headers__ignore_result=True), True),
]


def push(client: Client, data: Any) -> None:
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    client.redis.lpush(queue_for(DEPLOYMENT), payload)


def dead_letters(client: Client) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.redis.lrange(DEAD_LETTER, 0, -1)]


def test_there_are_at_least_thirty_kinds() -> None:
    assert len(KINDS) >= 30
    assert len({name for name, _, _ in KINDS}) == len(KINDS)


@pytest.mark.parametrize(("name", "mutate", "has_id"), KINDS, ids=[k[0] for k in KINDS])
def test_a_malformed_message_is_set_aside_and_the_worker_serves_the_next_job(
    client: Client, stack: Stack, name: str, mutate: Mutation, has_id: bool
) -> None:
    job_id = f"malformed-{name}-{uuid.uuid4()}"
    message = mutate(envelope(job_id), job_id)
    before = len(dead_letters(client))
    push(client, message)
    good = client.submit(DEPLOYMENT, "right after a bad one")
    assert good.result(timeout=30)[0]["label"] in ("POSITIVE", "NEGATIVE")
    deadline = time.monotonic() + 10
    while len(dead_letters(client)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    entry = dead_letters(client)[0]
    assert entry["queue"] == queue_for(DEPLOYMENT) and entry["reason"]
    assert entry["job_id"] == (job_id if has_id else None)
    assert DEPLOYMENT not in stack.failed(), "the worker died"
    if has_id:
        job = client.job(job_id)
        assert job.status() is JobState.FAILED
        with pytest.raises(InvalidRequest, match="malformed message"):
            job.result(timeout=5)


def test_a_well_formed_raw_message_runs_and_leaves_no_trace(client: Client) -> None:
    """The template the malformed kinds are cut from is itself a job a worker runs; sent
    twice as the same bytes (the same delivery tag), it is answered once, and nothing of
    either copy stays in the worker's list or in the depth counts."""
    job_id = f"well-formed-{uuid.uuid4()}"
    data = json.dumps(envelope(job_id)).encode()
    push(client, data)
    push(client, data)
    assert client.job(job_id).result(timeout=30)[0]["label"] in ("POSITIVE", "NEGATIVE")

    def traces() -> tuple[int, int, int]:
        inflight = sum(client.redis.llen(k) for k in client.redis.keys("pipeq:inflight:*"))
        depth = client.depth(DEPLOYMENT)
        return inflight, depth.waiting, depth.running

    deadline = time.monotonic() + 10
    while traces() != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert traces() == (0, 0, 0)


def test_a_message_celery_itself_sent_passes_the_gate(client: Client) -> None:
    """What Celery puts on the queue (not our hand-made template) is what the gate sees."""
    with paused(client, DEPLOYMENT):
        job = client.submit(DEPLOYMENT, "captured")
        deadline = time.monotonic() + 5  # a take already under way hands it back
        while not client.redis.llen(queue_for(DEPLOYMENT)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (data,) = client.redis.lrange(queue_for(DEPLOYMENT), 0, 0)
        assert check_message(data, max_bytes=2**20)["headers"]["id"] == job.id
    job.result(timeout=30)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        [
            ["headers"],
            ["headers", "id"],
            ["headers", "task"],
            ["headers", "eta"],
            ["headers", "expires"],
            ["properties"],
            ["properties", "delivery_tag"],
            ["properties", "body_encoding"],
            ["properties", "delivery_info"],
            ["body"],
            ["content-type"],
            ["content-encoding"],
        ]
    ),
    value=json_values,
    body_value=json_values,
)
def test_the_gate_accepts_or_refuses_any_message_and_never_raises_anything_else(
    path: list[str], value: Any, body_value: Any
) -> None:
    """Whatever a field holds, the gate returns the envelope or raises Malformed."""
    m = envelope("prop")
    target = m
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    for data in (
        json.dumps(m).encode(),
        json.dumps(
            {**envelope("prop"), "body": base64.b64encode(json.dumps(body_value).encode()).decode()}
        ).encode(),
    ):
        try:
            check_message(data, max_bytes=2**20)
        except Malformed:
            pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_the_gate_refuses_arbitrary_bytes_with_malformed(data: bytes) -> None:
    try:
        check_message(data, max_bytes=2**20)
    except Malformed:
        return
    raise AssertionError(f"accepted {data!r}")
