"""Pipelining (`pipelining = true`): the next batch is formed and tokenized, and the last
one post-processed, while the model runs; results as without it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeq._config import Deployment
from pipeq.worker import tiny_models
from pipeq.worker.batcher import Batcher, HandBack
from pipeq.worker.handlers import STAGED, Handler, load_handler

from .conftest import assert_close

#: (checkpoint, items, the parameters each call takes): the staged tasks, chunked
#: (zero-shot) and packed (feature-extraction) ones included
CASES: list[tuple[str, list[Any], list[dict[str, Any]]]] = [
    (
        "distilbert-base-uncased-finetuned-sst-2-english",
        [
            "good movie",
            "awful, truly awful film from start to end",
            "meh",
            {"text": "a", "text_pair": "b"},
        ],
        [{}, {"top_k": None}, {"top_k": 2}],
    ),
    (
        "bart-large-mnli",
        ["I love this", "the stock fell sharply today, analysts said"],
        [
            {"candidate_labels": ["politics", "finance", "sport"]},
            {"candidate_labels": "a,b", "multi_label": True},
        ],
    ),
    (
        "distilroberta-base",
        ["Paris is the <mask> of France.", "a <mask> day <mask> and a longer tail of words"],
        [{}, {"top_k": 2}],
    ),
    (
        "bert-large-cased-finetuned-conll03-english",
        ["My name is Wolfgang and I live in Berlin", "Hugging Face Inc. is in New York City"],
        [{}, {"aggregation_strategy": "simple"}],
    ),
    (
        "distilbert-base-cased",
        ["short", "a much longer sentence with a good many words in it", "mid length one"],
        [{}, {"truncation": True}],
    ),
]


def _handler(checkpoint: str, models_dir: Path) -> Handler:
    path = tiny_models.build(checkpoint, models_dir)
    task = tiny_models.TINY_MODELS[checkpoint]
    return load_handler(Deployment(name="p", task=task, model=str(path), pipelining=True))


@pytest.mark.parametrize("checkpoint,items,calls", CASES, ids=[c[0] for c in CASES])
def test_a_staged_batch_gives_what_run_gives(
    checkpoint: str, items: list[Any], calls: list[dict[str, Any]], models_dir: Path
) -> None:
    """`stage` -> `forward` -> `finish` (three threads' steps) is `run`, value for value."""
    handler = _handler(checkpoint, models_dir)
    assert handler.task in STAGED
    for params in calls:
        want = handler.run(items, params)
        staged = handler.stage(items, params)
        assert staged is not None
        staged.forward()
        assert staged.finish() == want, params
    assert handler.stage(items[:1], calls[0]) is None  # one item: `run`'s pipe(item) path
    assert handler.stage(items, {**calls[0], "seed": 1}) is None


def test_the_next_batch_is_tokenized_while_the_model_runs_and_results_do_not_change(
    models_dir: Path,
) -> None:
    """A backlog of full batches through a pipelined batcher: the tokenizing of one batch
    overlaps the forward pass of another (timed from the calls themselves), and every
    result equals the unpipelined batcher's."""
    handler = _handler("bert-large-cased-finetuned-conll03-english", models_dir)
    spans: dict[str, list[tuple[float, float]]] = {"stage": [], "forward": []}

    def stage(items: list[Any], params: dict[str, Any]) -> Any:
        t0 = time.monotonic()
        staged = handler.stage(items, params)
        time.sleep(0.02)  # tokenizing a real batch takes a while; the tiny model's does not
        spans["stage"].append((t0, time.monotonic()))
        forward = staged.forward

        def timed() -> None:
            t1 = time.monotonic()
            forward()
            time.sleep(0.05)  # so does a real forward pass
            spans["forward"].append((t1, time.monotonic()))

        staged.forward = timed
        return staged

    texts = [f"Sarah met John {i} times in Paris and {'London ' * (i % 5)}" for i in range(64)]
    results = {}
    for name, kwargs in (("plain", {}), ("pipelined", {"stage": stage})):
        batcher = Batcher(handler.run, max_batch_size=8, max_batch_wait_ms=0, **kwargs).start()
        try:
            jobs = [batcher.submit(f"j{i}", [t], {}) for i, t in enumerate(texts)]
            results[name] = [j.futures[0].result(timeout=60) for j in jobs]
        finally:
            batcher.stop()
    assert results["pipelined"] == results["plain"]
    overlapping = [
        s for s in spans["stage"] if any(f0 < s[1] and s[0] < f1 for f0, f1 in spans["forward"])
    ]
    assert len(spans["forward"]) >= 4 and len(overlapping) >= 2, spans


class _Staged:
    """A staged batch of a fake model: `forward` waits for `gate`, `finish` fails on 'bad'."""

    def __init__(self, items: list[Any], log: list[list[Any]], gate: threading.Event) -> None:
        self.items, self.log, self.gate = items, log, gate

    def forward(self) -> None:
        self.log.append(list(self.items))
        self.gate.wait(10)
        if "oom" in self.items:
            raise RuntimeError("the forward pass failed")

    def finish(self) -> list[Any]:
        if "bad" in self.items:
            time.sleep(0.3)  # long enough for a `stop()` to come meanwhile
            raise ValueError("post-processing failed on 'bad'")
        return [f"staged {i}" for i in self.items]


def _fake(gate: threading.Event) -> tuple[Any, Any, list[list[Any]]]:
    log: list[list[Any]] = []

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        if "bad" in items or "oom" in items:
            raise ValueError(f"run failed on {items}")
        return [f"ran {i}" for i in items]

    return run, (lambda items, params: _Staged(items, log, gate)), log


def test_a_failed_post_processing_or_forward_runs_the_batch_again_and_a_bad_item_fails_alone() -> (
    None
):
    gate = threading.Event()
    gate.set()
    run, stage, _ = _fake(gate)
    batcher = Batcher(run, max_batch_size=4, max_batch_wait_ms=50, stage=stage).start()
    try:
        job = batcher.submit("j", ["a", "bad", "c"], {})
        other = batcher.submit("k", ["oom", "d"], {})
        outcomes = [f.exception(timeout=10) or f.result() for f in job.futures + other.futures]
    finally:
        batcher.stop()
    assert outcomes[0] == "ran a" and outcomes[2] == "ran c" and outcomes[4] == "ran d"
    assert isinstance(outcomes[1], ValueError) and isinstance(outcomes[3], ValueError)


def test_a_high_job_that_comes_while_a_batch_is_formed_ahead_goes_first() -> None:
    """The batch formed ahead (low jobs) goes back when a high one comes meanwhile: the
    high job runs in the batch right after the one running, as without pipelining."""
    gate = threading.Event()
    run, stage, log = _fake(gate)
    batcher = Batcher(run, max_batch_size=2, max_batch_wait_ms=0, stage=stage).start()
    try:
        low = [batcher.submit(f"l{i}", [f"low{i}"], {}, rank=2) for i in range(6)]
        deadline = time.monotonic() + 5
        while not log and time.monotonic() < deadline:  # the first batch's forward runs
            time.sleep(0.01)
        time.sleep(0.1)  # the next one is formed ahead meanwhile
        high = batcher.submit("h", ["high"], {}, rank=0)
        gate.set()
        assert high.futures[0].result(timeout=10) == "staged high"
        for job in low:
            job.futures[0].result(timeout=10)
    finally:
        batcher.stop()
    assert log[0] == ["low0", "low1"]
    assert "high" in log[1], log


def test_a_stopping_worker_hands_back_a_batch_formed_ahead() -> None:
    gate = threading.Event()
    run, stage, log = _fake(gate)
    batcher = Batcher(run, max_batch_size=2, max_batch_wait_ms=0, stage=stage).start()
    try:
        jobs = [batcher.submit(f"j{i}", [f"x{i}"], {}) for i in range(4)]
        deadline = time.monotonic() + 5
        while not log and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # x2, x3 formed ahead: not in the waiting items any more
        batcher.hand_back()
        gate.set()
        assert [j.futures[0].result(timeout=10) for j in jobs[:2]] == ["staged x0", "staged x1"]
        for job in jobs[2:]:
            assert isinstance(job.futures[0].exception(timeout=10), HandBack)
    finally:
        batcher.stop()


def test_the_staged_results_through_a_worker_equal_in_process(
    client: Any, models_dir: Path
) -> None:
    """The test stack's ner deployment pipelines (tests/conftest.py): a burst of jobs
    gives what the model gives in-process."""
    from transformers import pipeline

    assert client.deployments()["ner"].info["pipelining"] is True
    path = tiny_models.build("bert-large-cased-finetuned-conll03-english", models_dir)
    pipe = pipeline("ner", model=str(path))
    texts = [
        f"Anna Smith flew from Rome to Oslo on day {i} with {'Bob ' * (i % 4)}" for i in range(40)
    ]
    jobs = [client.submit("ner", t) for t in texts]
    got = [j.result(timeout=120) for j in jobs]
    assert_close(got, [pipe(t) for t in texts], tol=1e-4)


def test_a_hung_tokenizing_or_post_processing_is_a_hang_and_stop_ends_every_thread() -> None:
    """The worker's liveness asks `stuck()`: a batch's tokenizing (on its own thread) that
    hangs counts as a forward pass that hangs, so the worker stops beating and its jobs
    run elsewhere (it was healthy for ever, holding them). A batch whose post-processing
    fails after `stop()` still runs again and answers; the batcher's threads end."""
    gate, hang = threading.Event(), threading.Event()
    gate.set()
    run, fake_stage, log = _fake(gate)

    def stage(items: list[Any], params: dict[str, Any]) -> Any:
        if "hang" in items:
            hang.wait(10)
        return fake_stage(items, params)

    before = threading.active_count()
    batcher = Batcher(run, max_batch_size=2, max_batch_wait_ms=0, stage=stage).start()
    try:
        jobs = [batcher.submit(f"j{i}", [x], {}) for i, x in enumerate(["a", "b", "hang", "c"])]
        assert jobs[0].futures[0].result(timeout=10) == "staged a"
        deadline = time.monotonic() + 5
        while not batcher.stuck(0.5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.stuck(0.5)
        hang.set()
        assert [j.futures[0].result(timeout=10) for j in jobs[2:]] == ["staged hang", "staged c"]
        assert not batcher.stuck(0.5)
        bad = batcher.submit("bad", ["x", "bad"], {})
        while ["x", "bad"] not in log and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        batcher.stop()  # while its post-processing runs, to fail
        assert bad.futures[0].result(timeout=1) == "ran x"
        assert isinstance(bad.futures[1].exception(timeout=1), ValueError)
    finally:
        batcher.stop()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
