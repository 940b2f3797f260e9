"""A job's result never depends on what shares its forward pass (property, nine tasks).

For each of the course's nine tasks, random mixes of jobs (single inputs, lists of one,
longer lists, mixed lengths, different parameters) are sent twice through real worker
processes: one at a time on an idle worker, then all at once, so that they share
forward passes with each other. Every job must get the same result both times. The
mixes are drawn from seeded generators, so a failure names a reproducible seed.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pipeq import Client

from .conftest import assert_close

WORDS = (
    "the course model queue worker batch great terrible movie story happy sad river city "
    "computer science attention layer paper result question answer Sylvain Hugging Face "
    "Brooklyn Paris"
).split()
FRENCH = "le chat est sur la table je suis ici ce cours est très bien merci oui".split()
CONTEXT = "My name is Sylvain and I work at Hugging Face in Brooklyn. The river is long."


def _text(rng: random.Random, words: list[str] = WORDS, lo: int = 1, hi: int = 25) -> str:
    return " ".join(rng.choices(words, k=rng.randint(lo, hi))) + "."


def _item(task: str, rng: random.Random, mask: str | None) -> Any:
    if task == "fill-mask":
        words = _text(rng, hi=12).split()
        words.insert(rng.randrange(len(words) + 1), mask or "<mask>")
        return " ".join(words)
    if task == "question-answering":
        return {"question": _text(rng, hi=6) + "?", "context": CONTEXT + " " + _text(rng)}
    if task == "translation":
        return _text(rng, FRENCH, hi=12)
    return _text(rng)


PARAMS: dict[str, list[dict[str, Any]]] = {
    "sentiment-analysis": [{}, {"top_k": 2}, {"top_k": None}],
    "zero-shot-classification": [
        {"candidate_labels": ["science", "movies"]},
        {"candidate_labels": ["a", "b", "c"], "multi_label": True},
    ],
    "text-generation": [
        {"max_new_tokens": 3, "do_sample": False},
        {"max_new_tokens": 5, "do_sample": False, "return_full_text": False},
    ],
    "fill-mask": [{}, {"top_k": 1}, {"top_k": 3}],
    "ner": [{}, {"aggregation_strategy": "simple"}],
    "question-answering": [{}, {"top_k": 2}],
    "summarization": [{"max_length": 8, "min_length": 2}, {"max_length": 6}],
    "translation": [{"max_length": 8}, {"max_length": 5, "num_beams": 2}],
    "feature-extraction": [{}],
}


def random_jobs(task: str, seed: int, n: int, mask: str | None) -> list[tuple[Any, dict[str, Any]]]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        shape = rng.choice(["single", "list of one", "list"])
        if shape == "single":
            inputs: Any = _item(task, rng, mask)
        else:
            inputs = [
                _item(task, rng, mask)
                for _ in range(1 if shape == "list of one" else rng.randint(2, 5))
            ]
        jobs.append((inputs, dict(rng.choice(PARAMS[task]))))
    return jobs


@pytest.mark.parametrize("task", list(PARAMS))
@pytest.mark.parametrize("seed", [1, 2])
def test_a_jobs_result_is_the_same_alone_and_among_batch_mates(
    client: Client, task: str, seed: int
) -> None:
    mask = client.deployments()[task].info.get("mask_token")
    jobs = random_jobs(task, seed * 100 + len(task), 14, mask)
    alone = [client.submit(task, inputs, **params).result(timeout=60) for inputs, params in jobs]
    sent = [client.submit(task, inputs, **params) for inputs, params in jobs]
    together = [job.result(timeout=120) for job in sent]
    for k, ((inputs, params), a, t) in enumerate(zip(jobs, alone, together, strict=True)):
        assert_close(t, a, tol=1e-4, path=f"{task} seed {seed} job {k} {params} {inputs!r:.80}")
