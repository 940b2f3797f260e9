"""Generation deployments: continuous batching, streamed text, cancelling a generation.

The session stack's `distilgpt2` deployment (a tiny random-weight GPT-2) runs with
continuous batching, text-generation's default."""

from __future__ import annotations

import random
import threading
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeq import Client, InvalidRequest, JobCancelled, JobState, JobTimeout
from pipeq._ledger import stream_key

from .cluster import renamed, wait_until
from .test_faults import QUICK, cluster_of  # noqa: F401  (a fixture)

GEN = "distilgpt2"


@cache
def _local(model: str) -> Any:
    from transformers import pipeline

    return pipeline("text-generation", model=model)


def expected(deployments: dict[str, Any], prompt: str, **params: Any) -> Any:
    return _local(deployments[GEN].model)(prompt, **params)


def prompts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n prompts of 2 to 30 words and max_new_tokens of 1 to 40."""
    rng = random.Random(seed)
    words = "the a course model learn data token queue worker batch fast good movie".split()
    return [
        (" ".join(rng.choices(words, k=rng.randint(2, 30))), rng.randint(1, 40)) for _ in range(n)
    ]


def entries(client: Client, job_id: str) -> list[dict[str, str]]:
    raw = client.ledger.redis.xrange(stream_key(job_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


def test_continuous_greedy_results_equal_in_process_and_stream_a_piece_a_step(
    client: Client, deployments: dict[str, Any]
) -> None:
    """Separate jobs of mixed lengths and max_new_tokens in one burst: each result equals
    `transformers.pipeline` on the same model; each job streamed several pieces (the
    dynamic batcher would stream one), and the pieces make the result's text."""
    cases = prompts(24)
    jobs = [
        client.submit(GEN, p, max_new_tokens=n, do_sample=False, return_full_text=i % 2 == 0)
        for i, (p, n) in enumerate(cases)
    ]
    for i, (job, (prompt, n)) in enumerate(zip(jobs, cases, strict=True)):
        got = job.result(timeout=60)
        want = expected(deployments, prompt, max_new_tokens=n, do_sample=False)
        text = want[0]["generated_text"]
        assert got == [{"generated_text": text if i % 2 == 0 else text[len(prompt) :]}]
        pieces = list(job.stream(timeout=10))
        assert "".join(pieces) == got[0]["generated_text"]
        steps = [e for e in entries(client, job.id) if "t" in e]
        assert len(steps) >= min(n, 2), steps  # about one a token (and the prompt)


def test_a_late_reader_and_a_second_reader_get_every_piece(client: Client) -> None:
    job = client.submit(GEN, "In this course", max_new_tokens=30, do_sample=False)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.extend(job.stream(timeout=30)))
    reader.start()
    text = job.result(timeout=30)[0]["generated_text"]
    reader.join(30)
    late = list(job.stream(timeout=10))  # after the job ended
    assert "".join(first) == "".join(late) == text
    assert late[0] == "In this course"  # the prompt first: the result holds it
    assert len(late) > 2


def test_a_job_the_dynamic_batcher_runs_streams_its_text_at_once(
    client: Client, deployments: dict[str, Any]
) -> None:
    """Beam search is not served by continuous batching: the job goes to the dynamic
    batcher, its result is transformers', and the stream gives it in one piece."""
    job = client.submit(GEN, "Hello there", max_new_tokens=6, num_beams=2, do_sample=False)
    want = expected(deployments, "Hello there", max_new_tokens=6, num_beams=2, do_sample=False)
    assert job.result(timeout=30) == want
    assert list(job.stream(timeout=10)) == [want[0]["generated_text"]]
    assert [e for e in entries(client, job.id) if "t" in e] == []


def test_a_failed_job_raises_from_its_stream_and_other_tasks_do_not_stream(
    client: Client,
) -> None:
    bad = client.submit(GEN, "x " * 2000, max_new_tokens=4, do_sample=False)
    with pytest.raises(InvalidRequest, match="tokens long"):
        list(bad.stream(timeout=30))
    other = client.submit("sentiment-analysis", "fine")
    with pytest.raises(InvalidRequest, match="only text-generation streams"):
        other.stream()


def test_cancel_stops_a_running_generation_within_a_step_and_the_next_job_runs(
    client: Client,
) -> None:
    """A generation of 900 tokens, cancelled once it has streamed a few: cancel() says
    True, the job ends CANCELLED with the text made so far in its stream, and at most one
    more step was made after the cancel reached Redis (one may be running then); a job
    submitted next runs to the end."""
    job = client.submit(GEN, "Once upon a time", max_new_tokens=900, do_sample=False)
    stream = job.stream(timeout=60)
    so_far = [next(stream) for _ in range(4)]  # the prompt and three steps
    assert job.status() == JobState.RUNNING
    assert job.cancel() is True
    seconds, micros = client.ledger.redis.time()  # Redis' clock, as stream ids count
    cancelled_ms = seconds * 1000 + micros // 1000
    at_cancel = len([e for e in entries(client, job.id) if "t" in e])
    so_far += list(stream)
    assert job.status() == JobState.CANCELLED
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    pieces = [e for e in entries(client, job.id) if "t" in e]
    assert pieces[-1:] and entries(client, job.id)[-1] == {"end": "cancelled"}
    assert "".join(so_far) == "".join(e["t"] for e in pieces)
    # the worker reads the mark at its driver's next round trip, which follows each step
    # unless the driver fell behind the manager's thread (steps of ~1 ms on this tiny
    # model, a loaded machine: 23 steps once in a full run); then within a second
    last_ms = int(client.ledger.redis.xrange(stream_key(job.id))[-1][0].split(b"-")[0])
    late = len(pieces) - at_cancel
    assert late <= 2 or last_ms - cancelled_ms <= 1000, (late, last_ms - cancelled_ms)
    assert len(pieces) < 900  # it stopped (at most a step after the cancel, above)
    after = client.submit(GEN, "And then", max_new_tokens=5, do_sample=False)
    assert after.result(timeout=30)[0]["generated_text"].startswith("And then")


def test_a_worker_killed_mid_stream_loses_no_job_and_the_stream_says_it_restarted(
    cluster_of: Any,  # noqa: F811
    deployments: dict[str, Any],
) -> None:
    """Two workers; the one running a long greedy generation is killed mid-stream. The
    job runs again on the other (after dead_after_s), its stream records a second start,
    the reader counts one restart, and what it read is the whole text, once."""
    d = deployments[GEN]
    cluster = cluster_of([d], worker_env={**QUICK, "PIPEQ_FAULTS_STEP_S": "0.02"})
    with cluster.client() as client:
        a, b = cluster.start_worker(GEN), cluster.start_worker(GEN)
        hosts = {cluster.hostname(a, GEN): a, cluster.hostname(b, GEN): b}
        job = client.submit(GEN, "A long story", max_new_tokens=300, do_sample=False)
        stream = job.stream(timeout=120)
        read = [next(stream) for _ in range(3)]
        holder = wait_until(
            lambda: next((h for h in hosts if cluster.inflight(h)), None), 30, "a holder"
        )
        cluster.kill(hosts[holder])
        read += list(stream)
        text = job.result(timeout=60)[0]["generated_text"]
        starts = [e["start"] for e in entries(client, job.id) if "start" in e]
    assert "".join(read) == text
    assert stream.restarts == 1
    assert len(starts) == 2 and starts[0] == holder and starts[1] != holder
    want = _local(d.model)("A long story", max_new_tokens=300, do_sample=False)
    assert text == want[0]["generated_text"]


def test_pipeline_takes_transformers_streamers_and_the_cli_prints_the_stream(
    client: Client, deployments: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import TextIteratorStreamer

    from pipeq import pipeline
    from pipeq._cli import main

    generator = pipeline("text-generation", model=GEN, client=client)
    streamer = TextIteratorStreamer(_local(deployments[GEN].model).tokenizer, skip_prompt=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(streamer))
    reader.start()
    result = generator("My favourite", max_new_tokens=12, do_sample=False, streamer=streamer)
    reader.join(30)
    assert result == expected(deployments, "My favourite", max_new_tokens=12, do_sample=False)
    assert "My favourite" + "".join(got) == result[0]["generated_text"]
    assert len([p for p in got if p]) > 1
    with pytest.raises(InvalidRequest, match="one text-generation prompt"):
        generator(["a", "b"], streamer=streamer)

    argv = ["run", GEN, "My favourite", "--stream", "--redis-url", client.redis_url]
    assert main([*argv, "--param", "max_new_tokens=12", "--param", "do_sample=false"]) == 0
    assert capsys.readouterr().out == result[0]["generated_text"] + "\n"


def test_batching_is_continuous_for_text_generation_by_default_and_checked() -> None:
    from pipeq._config import Deployment

    assert Deployment("g", "text-generation", "m").batching == "continuous"
    assert Deployment("s", "sentiment-analysis", "m").batching == "dynamic"
    assert Deployment("g", "text-generation", "m", batching="dynamic").batching == "dynamic"
    with pytest.raises(InvalidRequest, match="text-generation only"):
        Deployment("s", "sentiment-analysis", "m", batching="continuous")
    with pytest.raises(InvalidRequest, match="'continuous' or 'dynamic'"):
        Deployment("g", "text-generation", "m", batching="static")


def test_a_job_of_several_prompts_streams_each_and_a_wrong_index_is_refused(
    client: Client,
) -> None:
    job = client.submit(GEN, ["First one", "Second"], max_new_tokens=5, do_sample=False)
    result = job.result(timeout=30)
    for i in range(2):
        assert "".join(job.stream(item=i, timeout=10)) == result[i][0]["generated_text"]
    with pytest.raises(InvalidRequest, match="no prompt 2"):
        list(job.stream(item=2, timeout=10))
    with pytest.raises(InvalidRequest, match="index"):
        job.stream(item=-1)


def test_a_generation_past_job_timeout_s_leaves_the_batch_and_fails_with_jobtimeout(
    cluster_of: Any,  # noqa: F811
    deployments: dict[str, Any],
) -> None:
    """300 steps of 20 ms, job_timeout_s=1: the job fails with JobTimeout near 1 s of
    generation (not after all 300 steps), its stream stops there, the worker serves on."""
    d = renamed(deployments[GEN], "gen-timeout", job_timeout_s=1.0)
    cluster = cluster_of([d], worker_env={**QUICK, "PIPEQ_FAULTS_STEP_S": "0.02"})
    with cluster.client() as client:
        cluster.hostname(cluster.start_worker(d.name), d.name)
        job = client.submit(d.name, "Too long", max_new_tokens=300, do_sample=False)
        with pytest.raises(JobTimeout, match=r"job_timeout_s=1\.0"):
            job.result(timeout=60)
        steps = len([e for e in entries(client, job.id) if "t" in e])
        assert entries(client, job.id)[-1] == {"end": "failed"}
        after = client.submit(d.name, "Short", max_new_tokens=3, do_sample=False)
        assert after.result(timeout=30)[0]["generated_text"].startswith("Short")
    assert 5 < steps < 150, steps  # ~50 steps of 20 ms in 1 s; 300 had it not stopped


def test_one_client_follows_150_streams_at_once(client: Client) -> None:
    """One reader thread per stream on one Client, more than redis-py's default pool of
    100 connections (with it, 28 of 128 readers failed with MaxConnectionsError), and
    each result is read even when its message was missed."""
    jobs = [
        client.submit(GEN, f"Reader {i} says", max_new_tokens=4, do_sample=False)
        for i in range(150)
    ]
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def follow(i: int) -> None:
        try:
            texts[i] = "".join(jobs[i].stream(timeout=120))
            assert texts[i] == jobs[i].result(timeout=30)[0]["generated_text"]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[:3]
    assert len(texts) == 150 and all(texts[i].startswith(f"Reader {i} says") for i in texts)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_every_streamed_piece_is_final_text_whatever_the_tokens(ids: list[int]) -> None:
    """Any token sequence of a byte-level tokenizer (tokens ending inside a character
    included): what the worker streams after each token is a prefix of the final text,
    so the pieces concatenate to it."""
    from pipeq.worker.generation import settled_text

    tok = _tiny_tokenizer()
    final = tok.decode(ids, skip_special_tokens=True)
    for n in range(1, len(ids)):
        assert final.startswith(settled_text(tok.decode(ids[:n], skip_special_tokens=True)))


@cache
def _tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pipeq.worker import tiny_models

    from .conftest import MODELS_DIR

    return AutoTokenizer.from_pretrained(str(tiny_models.build(GEN, MODELS_DIR)))
