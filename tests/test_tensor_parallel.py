"""tensor_parallel = 2: one text-generation worker of two gloo ranks on the CPU, on a tiny
Llama (a model with a tp plan); docs/generation.md, "One deployment across several GPUs"."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeq._config import Deployment
from pipeq.errors import InvalidRequest
from pipeq.worker import tiny_models
from pipeq.worker.demo import write_config

from .cluster import Cluster, wait_until

#: quick liveness, and decoding steps of 20 ms (a slow generator: jobs are still running
#: when a rank is killed)
QUICK = {"PIPEQ_HEARTBEAT_S": "0.5", "PIPEQ_DEAD_AFTER_S": "2.5", "PIPEQ_FAULTS_STEP_S": "0.02"}
DEAD_AFTER_S = 2.5
#: new tokens of the jobs running when a rank is killed: 3 s of 20 ms steps at least
LONG = 150
PROMPTS = [
    ("In this course", 12),
    ("Hello, I'm a language model, and I can write text.", 5),
    ("The quick brown fox jumps over the lazy dog.", 9),
    ("Paris", 1),
]


@pytest.fixture(scope="module")
def llama(models_dir: Path) -> Path:
    return tiny_models.build(tiny_models.TP_GENERATOR, models_dir)


@pytest.fixture
def cluster(tmp_path: Path, llama: Path) -> Iterator[Cluster]:
    tp = Deployment(
        name="tp", task="text-generation", model=str(llama), tensor_parallel=2, max_batch_size=4
    )
    c = Cluster(tmp_path, {"tp": tp}, worker_env=QUICK)
    # the same deployment on one rank: where the two-rank worker's jobs go when it dies
    c.one_rank = write_config(  # type: ignore[attr-defined]
        {"tp": dataclasses.replace(tp, tensor_parallel=1)}, tmp_path / "one-rank.toml"
    )
    yield c
    c.close()


def reference(path: Path) -> Any:
    """transformers' own pipeline on one process: what every result must equal."""
    import transformers

    return transformers.pipeline("text-generation", model=str(path), device="cpu")


def followers_of(pid: int) -> list[int]:
    """The tensor-parallel followers that worker `pid` started (its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid and b"pipeq.worker.tensor_parallel" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_two_rank_worker_gives_one_ranks_results_and_a_killed_follower_loses_no_job(
    cluster: Cluster, llama: Path
) -> None:
    two = cluster.start_worker("tp")
    config, cluster.config = cluster.config, cluster.one_rank  # type: ignore[attr-defined]
    one = cluster.start_worker("tp")
    cluster.config = config
    # what transformers gives in one process, made while the workers load: greedy and
    # seeded sampled jobs (continuous batching), beam search (the dynamic batcher, which
    # every rank runs), and long jobs, running when a rank is killed
    from transformers import set_seed

    pipe = reference(llama)
    calls = [({"max_new_tokens": n, "do_sample": False}, p) for p, n in PROMPTS]
    calls.append(({"max_new_tokens": 10, "do_sample": True, "top_k": 20, "seed": 7}, PROMPTS[0][0]))
    calls.append(({"max_new_tokens": 6, "num_beams": 2, "do_sample": False}, PROMPTS[1][0]))
    wants = []
    for params, prompt in calls:
        if "seed" in params:  # pipeq's seed: set_seed(seed), then the pipeline
            set_seed(params["seed"])
        wants.append(pipe(prompt, **{k: v for k, v in params.items() if k != "seed"}))
    long_wants = [pipe(p, max_new_tokens=LONG, do_sample=False) for p, _ in PROMPTS]

    two_name = cluster.hostname(two, "tp", timeout_s=180)
    one_name = cluster.hostname(one, "tp", timeout_s=180)
    client = cluster.client()
    queue = "pipeq.tp"
    # the one-rank worker takes no job until the two-rank worker's follower is killed
    wait_until(
        lambda: client.app.control.cancel_consumer(queue, destination=[one_name], reply=True),
        30,
        "the one-rank worker stops consuming",
    )
    jobs = [client.submit("tp", prompt, **params) for params, prompt in calls]
    for job, want in zip(jobs, wants, strict=True):
        assert job.result(timeout=60) == want  # token for token
        assert job.engine()["worker"] == two_name
    assert [job.engine()["engine"] for job in jobs] == ["continuous"] * 5 + ["dynamic"]
    # a wall-clock limit inside a batch would stop the ranks at different steps
    with pytest.raises(InvalidRequest, match="max_time"):
        client.submit("tp", "x", max_new_tokens=2, max_time=5.0).result(timeout=60)

    # long jobs, all held by the two-rank worker; then its follower is killed
    long_jobs = [client.submit("tp", p, max_new_tokens=LONG, do_sample=False) for p, _ in PROMPTS]
    wait_until(
        lambda: cluster.inflight(two_name) == len(long_jobs), 30, "the two ranks hold the jobs"
    )
    wait_until(
        lambda: client.app.control.add_consumer(queue, destination=[one_name], reply=True),
        30,
        "the one-rank worker consumes again",
    )
    (follower,) = followers_of(two.pid)
    killed = time.monotonic()
    os.kill(follower, 9)
    assert two.wait(timeout=30) == 70  # EXIT_UNHEALTHY: no half-alive group
    exited = time.monotonic() - killed
    wait_until(lambda: cluster.inflight(two_name) == 0, 30, "its jobs are put back")
    reclaimed = time.monotonic() - killed
    for job, want in zip(long_jobs, long_wants, strict=True):
        assert job.result(timeout=60) == want  # nothing lost, the same text
        assert job.engine()["worker"] == one_name
    done = time.monotonic() - killed
    print(
        f"rank 0 exited {exited:.2f} s after its follower was killed; jobs put back after "
        f"{reclaimed:.2f} s (dead_after_s {DEAD_AFTER_S}); all done after {done:.2f} s"
    )
    # a dead worker's jobs go back dead_after_s + heartbeat_s after its last beat at most
    # (liveness.py); 1.5 s more for a loaded machine's late beat
    assert reclaimed < DEAD_AFTER_S + 0.5 + 1.5
    assert one.poll() is None
