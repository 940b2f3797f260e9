"""Dynamic batching gives the results of unbatched runs; bad items fail alone; map keeps order."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from pipeq import Client, InvalidRequest, ItemsFailed, JobCancelled
from pipeq.worker.batcher import HandBack
from pipeq.worker.bench import bench_inputs

from .conftest import assert_close, send_raw


def _batch_sizes(client: Client, deployment: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = client.registry.stats(deployment)
        if stats:
            sizes: dict[str, int] = {}
            for s in stats.values():
                for k, v in s["sizes"].items():
                    sizes[k] = sizes.get(k, 0) + v
            return sizes
        time.sleep(0.2)
    return {}


@pytest.mark.parametrize(
    ("deployment", "params"),
    [
        ("sentiment-analysis", {}),
        ("ner", {"aggregation_strategy": "simple"}),
        ("feature-extraction", {}),
        ("fill-mask", {"top_k": 3}),
    ],
)
def test_batched_results_equal_one_job_at_a_time(
    client: Client, deployment: str, params: dict[str, Any]
) -> None:
    mask = client.deployments()[deployment].info.get("mask_token")
    inputs = bench_inputs(deployment, 48, seed=3, mask_token=mask)
    one_by_one = [client.submit(deployment, x, **params).result(timeout=60) for x in inputs]
    # a burst of separate jobs: the worker gathers them into batches of mixed lengths
    jobs = [client.submit(deployment, x, **params) for x in inputs]
    burst = [j.result(timeout=60) for j in jobs]
    mapped = client.map(deployment, inputs, **params)
    assert_close(burst, one_by_one, tol=1e-5)
    assert_close(mapped, one_by_one, tol=1e-5)
    time.sleep(2.5)  # the next heartbeat carries the batch statistics
    sizes = _batch_sizes(client, deployment)
    assert any(int(k) > 1 for k in sizes), f"no batch of more than one item formed: {sizes}"


def test_jobs_with_different_parameters_do_not_change_each_others_results(client: Client) -> None:
    text = "This course will teach you all about <mask> models."
    alone2 = client.submit("fill-mask", text, top_k=2).result(timeout=30)
    alone5 = client.submit("fill-mask", text, top_k=5).result(timeout=30)
    jobs = [client.submit("fill-mask", text, top_k=k) for k in (2, 5) * 10]
    results = [j.result(timeout=30) for j in jobs]
    assert all(r == alone2 for r in results[0::2])
    assert all(r == alone5 for r in results[1::2])


def test_an_item_the_model_cannot_take_fails_alone_and_its_batch_mates_succeed(
    client: Client,
) -> None:
    # 600 words is past MiniLM's 512 positions: refused by name, no silent truncation
    too_long = " ".join(["word"] * 600)
    inputs = ["first sentence.", too_long, "third sentence here.", "fourth."]
    outcomes = client.map("feature-extraction", inputs, return_exceptions=True)
    assert isinstance(outcomes[1], InvalidRequest) and "tokens long" in str(outcomes[1])
    for i in (0, 2, 3):
        assert not isinstance(outcomes[i], Exception)
        want = client.submit("feature-extraction", inputs[i]).result(timeout=30)
        assert_close(outcomes[i], want, tol=1e-5)
    with pytest.raises(ItemsFailed) as info:
        client.map("feature-extraction", inputs)
    assert set(info.value.errors) == {1}
    assert info.value.results[0] == outcomes[0]
    # a producer that skips the client's checks: the worker refuses that item alone
    raw = send_raw(client, "feature-extraction", inputs=inputs, params={}, per_item=True)
    got = raw.result(timeout=30)
    assert got[1]["error"][0] == "InvalidRequest" and "tokens long" in got[1]["error"][1]
    assert_close([got[i]["result"] for i in (0, 2, 3)], [outcomes[i] for i in (0, 2, 3)], 1e-5)


def test_when_a_batch_raises_its_items_run_one_by_one_and_only_the_bad_one_fails() -> None:
    from pipeq.worker.batcher import Batcher

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        if "bad" in items:
            raise ValueError("the model broke on 'bad'")
        return [f"ran {i}" for i in items]

    batcher = Batcher(run, max_batch_size=8, max_batch_wait_ms=50).start()
    try:
        job = batcher.submit("j", ["a", "bad", "c"], {})
        outcomes = [f.exception() or f.result() for f in job.futures]
    finally:
        batcher.stop()
    assert outcomes[0] == "ran a" and outcomes[2] == "ran c"
    assert isinstance(outcomes[1], ValueError)


def test_a_malformed_item_in_a_raw_message_fails_alone(client: Client) -> None:
    job = send_raw(
        client, "sentiment-analysis", inputs=["good", None, "also good"], params={}, per_item=True
    )
    outcomes = job.result(timeout=30)
    assert outcomes[1]["error"][0] == "InvalidRequest"
    assert "inputs[1]" in outcomes[1]["error"][1]
    assert outcomes[0]["result"][0]["label"] in ("POSITIVE", "NEGATIVE")
    assert outcomes[2]["result"][0]["label"] in ("POSITIVE", "NEGATIVE")


def test_map_refuses_bad_items_at_submit_and_runs_the_others(client: Client) -> None:
    outcomes = client.map("sentiment-analysis", ["good", None, 5, "fine"], return_exceptions=True)
    assert isinstance(outcomes[1], InvalidRequest) and "inputs[1]" in str(outcomes[1])
    assert isinstance(outcomes[2], InvalidRequest) and "inputs[2]" in str(outcomes[2])
    assert outcomes[0][0]["label"] and outcomes[3][0]["label"]


def test_map_returns_a_thousand_results_in_input_order(client: Client) -> None:
    rng = random.Random(7)
    prompts = [
        f"item {i} says " + " ".join(rng.choices(["a", "b", "c"], k=rng.randint(1, 9)))
        for i in range(1000)
    ]
    results = client.map("text-generation", prompts, max_new_tokens=1, do_sample=False)
    assert len(results) == 1000
    for prompt, result in zip(prompts, results, strict=True):
        assert result[0]["generated_text"].startswith(prompt)


def test_batcher_groups_waiting_items_by_the_size_it_is_given() -> None:
    """Batches take near-equal sizes by the size function (tokens in a worker), not by
    characters: here the two orders disagree."""
    import threading

    from pipeq.worker.batcher import Batcher

    texts = ["x" * n for n in range(1, 9)]  # by characters: 1..8
    tokens = dict(zip(texts, [8, 1, 7, 2, 6, 3, 5, 4], strict=True)) | {"first": 0}
    release, batches = threading.Event(), []

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        release.wait(10)  # the first batch holds the model while the others queue
        batches.append([tokens[i] for i in items])
        return items

    batcher = Batcher(run, max_batch_size=4, max_batch_wait_ms=0, size=tokens.__getitem__)
    batcher.start()
    try:
        first = batcher.submit("j0", ["first"], {})
        deadline = time.monotonic() + 5
        while batcher._pending and time.monotonic() < deadline:  # the batcher took it
            time.sleep(0.01)
        futures = batcher.submit("j1", texts, {})
        release.set()
        assert [f.result(timeout=10) for f in first.futures + futures.futures] == ["first", *texts]
    finally:
        batcher.stop()
    assert [sorted(b) for b in batches] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]


def test_worker_sizes_items_in_tokens_safely_from_many_threads(
    deployments: dict[str, Any],
) -> None:
    """The batcher's sizes are token counts, taken from the jobs' threads while the batcher
    thread runs the pipeline (whose own tokenizer is not thread-safe)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeq.worker.handlers import load_handler

    handler = load_handler(deployments["sentiment-analysis"])
    tokenizer = handler.pipe.tokenizer
    # 80 texts, sized 3 times over: 72 s of a loaded CI run with 200 x 5
    texts = bench_inputs("sentiment-analysis", 80, seed=3)
    expected = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert expected != [len(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        sized = pool.map(handler.size, texts * 3)
        for k in range(0, 80, 20):  # the pipeline tokenizes (with truncation) meanwhile
            handler.run(texts[k : k + 20], {"truncation": True})
        assert list(sized) == expected * 3
    qa = {"question": "What is it?", "context": "A queue of jobs."}
    assert handler.size(qa) == len(tokenizer("What is it? A queue of jobs.")["input_ids"])


def test_batcher_measures_items_only_when_more_wait_than_one_batch_takes() -> None:
    """Sizes only choose among waiting items: a single job (or any batch that takes every
    waiting item) is never measured, and an input that cannot be measured still runs."""
    import threading

    from pipeq.worker.batcher import Batcher

    measured: list[Any] = []
    release = threading.Event()

    def size(value: Any) -> int:
        measured.append(value)
        if value == "unmeasurable":
            raise ValueError(value)
        return len(value)

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        release.wait(10)
        return [f"ran {i}" for i in items]

    batcher = Batcher(run, max_batch_size=2, max_batch_wait_ms=0, size=size).start()
    try:
        first = batcher.submit("j0", ["alone"], {})
        deadline = time.monotonic() + 5
        while batcher._pending and time.monotonic() < deadline:  # the batcher took it
            time.sleep(0.01)
        rest = batcher.submit("j1", ["bb", "unmeasurable", "a"], {})
        release.set()
        results = [f.result(timeout=10) for f in first.futures + rest.futures]
    finally:
        batcher.stop()
    assert results == ["ran alone", "ran bb", "ran unmeasurable", "ran a"]
    assert sorted(measured) == ["a", "bb", "unmeasurable"]


def test_a_job_that_gave_up_does_not_stop_the_batcher() -> None:
    """A job past job_timeout_s cancels its pending futures; the batcher skips them and
    serves the next job (it used to die on InvalidStateError, leaving a live-looking
    worker that answered nothing and ignored SIGTERM)."""
    import threading

    from pipeq.worker.batcher import Batcher

    release = threading.Event()

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        release.wait(5)
        return [f"ran {i}" for i in items]

    def admit(ids: list[str], alone: bool) -> dict[str, BaseException]:
        return {j: JobCancelled("cancelled") for j in ids if j == "refused"}

    batcher = Batcher(run, max_batch_size=1, max_batch_wait_ms=0, admit=admit).start()
    try:
        gave_up = batcher.submit("gave-up", ["a", "b", "c"], {})
        refused = batcher.submit("refused", ["x"], {})
        for f in gave_up.futures[1:] + refused.futures:  # their jobs timed out meanwhile
            f.cancel()
        release.set()
        later = batcher.submit("later", ["d"], {})
        assert later.futures[0].result(timeout=10) == "ran d"
        assert batcher.alive
        stopping = batcher.submit("waiting", ["e", "f"], {})
        stopping.futures[0].cancel()
        batcher.hand_back()  # used to raise at the first cancelled future
        assert isinstance(stopping.futures[1].exception(timeout=5), HandBack)
    finally:
        batcher.stop()


def test_a_suspect_waits_in_the_schedule_not_in_the_batcher_thread() -> None:
    """A suspect runs alone once the jobs already begun have run their remaining items
    and settled; it never blocks the thread those items need (it used to, for
    job_timeout_s)."""
    import threading

    from pipeq.worker.batcher import Batcher, Quarantine

    order: list[list[Any]] = []
    settled = threading.Event()

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        order.append(list(items))
        return items

    def admit(ids: list[str], alone: bool) -> dict[str, BaseException]:
        return {} if alone or "suspect" not in ids else {"suspect": Quarantine()}

    batcher = Batcher(
        run,
        max_batch_size=2,
        max_batch_wait_ms=20,
        admit=admit,
        settled=lambda job_id: settled.is_set(),
    )
    long = batcher.submit("long", [f"l{i}" for i in range(6)], {})
    suspect = batcher.submit("suspect", ["s"], {})
    batcher.start()
    try:
        for f in long.futures:  # all of the begun job runs, with the suspect waiting
            f.result(timeout=10)
        assert not suspect.futures[0].done()
        settled.set()  # its results are stored: now the suspect runs, alone
        assert suspect.futures[0].result(timeout=10) == "s"
    finally:
        batcher.stop()
    assert order[-1] == ["s"]


def test_a_stopping_worker_finishes_the_jobs_it_began_and_hands_back_the_others() -> None:
    import threading

    from pipeq.worker.batcher import Batcher

    release = threading.Event()

    def run(items: list[Any], params: dict[str, Any]) -> list[Any]:
        release.wait(5)
        return items

    batcher = Batcher(run, max_batch_size=2, max_batch_wait_ms=0).start()
    try:
        begun = batcher.submit("begun", ["a", "b", "c", "d", "e"], {})
        deadline = time.monotonic() + 5
        while begun.started_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = batcher.submit("waiting", ["x"], {})
        assert batcher.hand_back() == 1
        release.set()
        assert [f.result(timeout=10) for f in begun.futures] == ["a", "b", "c", "d", "e"]
        assert isinstance(waiting.futures[0].exception(timeout=5), HandBack)
    finally:
        batcher.stop()


def test_a_zero_shot_job_runs_its_labels_in_one_forward_pass(models_dir: Path) -> None:
    """zero-shot's pipeline is a chunk pipeline: its batch_size counts (text, label) pairs.
    Left at its default, a lone job with 3 labels made 3 forward passes of one pair, and a
    batch of 2 texts passes of 2 pairs (half of in-process B=8's rate at bart-large-mnli's
    real size, docs/batching.md); now every pair of a batch shares one pass, with the
    results of the pipeline's own pair-at-a-time calls."""
    from pipeq._config import Deployment
    from pipeq.worker import tiny_models
    from pipeq.worker.handlers import load_handler

    path = tiny_models.build("bart-large-mnli", models_dir)
    handler = load_handler(Deployment(name="z", task="zero-shot-classification", model=str(path)))
    passes: list[int] = []
    handler.pipe.model.register_forward_hook(lambda *_: passes.append(1))
    texts = ["The team won the game on Monday.", "The minister said prices will fall."]
    for labels in (["politics", "sport", "music"], "politics, sport, music"):
        params = {"candidate_labels": labels}
        passes.clear()
        alone = handler.run(texts[:1], params)
        assert len(passes) == 1
        passes.clear()
        both = handler.run(texts, params)
        assert len(passes) == 1
        reference = [handler.pipe(t, **params) for t in texts]  # a pair a forward pass
        assert len(passes) == 1 + 2 * 3
        assert_close([*alone, *both], [reference[0], *reference], tol=1e-5)


def test_question_answering_jobs_each_get_their_own_forward_pass(client: Client) -> None:
    """pipeq's own pipelines (question-answering, summarization, translation) run a batch's
    items one at a time, so their batcher takes one item a batch: a burst's results come
    back as each is done, not together at the end of a batch (at real size a batch of 8
    contexts held pipeq's p50 at 2.5x in-process's), and each job's job_timeout_s counts
    its own forward pass, not the batch's (8 real-size summaries on a CPU take longer
    than the default 300 s, and the whole batch failed with JobTimeout)."""
    context = "My name is Sylvain and I work at Hugging Face in Brooklyn. " * 5
    jobs = [
        client.submit(
            "question-answering", {"question": f"Where do I work, {i}?", "context": context}
        )
        for i in range(12)
    ]
    for job in jobs:
        job.result(timeout=60)
    time.sleep(2.5)  # the next heartbeat carries the batch statistics
    sizes = _batch_sizes(client, "question-answering")
    assert sizes and set(sizes) == {"1"}, sizes
