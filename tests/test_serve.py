"""`pipeq serve` against a real stack (the session's workers) with httpx: the native
asynchronous job routes, errors, keys, limits."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pipeq import Client

from .conftest import Gateway, is_sentiment


@pytest.fixture
def http(gateway: Gateway) -> Any:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers("alice"), timeout=30) as c:
        yield c


def test_a_job_submitted_with_prefer_wait_answers_200_with_its_result(http: httpx.Client) -> None:
    r = http.post(
        "/v1/jobs",
        json={"deployment": "sentiment-analysis", "inputs": "I love this"},
        headers={"Prefer": "wait=30"},
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded"
    assert is_sentiment(job["result"])
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"


def test_a_job_is_accepted_polled_and_read(http: httpx.Client, client: Client) -> None:
    r = http.post("/v1/jobs", json={"task": "sentiment-analysis", "inputs": "fine"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["retry-after"] == "1"
    assert job["status"] in ("queued", "running", "succeeded")
    assert set(job["urls"]) == {"self", "result", "events", "cancel"}
    got = http.get(f"/v1/jobs/{job['id']}/result", params={"wait": 30})
    assert got.status_code == 200, got.text
    assert got.json() == client.job(job["id"]).result(timeout=5)
    status = http.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "succeeded" and status["result"] == got.json()
