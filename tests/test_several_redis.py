"""Deployments on several Redis servers (docs/redis.md, "Several Redis servers"): three
local redis-servers (the default one, A, and B with a password), real workers of
`alpha` (sentiment) and `gamma` (embeddings) on A and of `beta` (sentiment) on B; jobs
land on their deployment's Redis only, `pipeq status`, the exporter and the HTTP
gateway read all three, and B going down fails only what touches beta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.core import Metric

from pipeq import BrokerUnavailable, Client, JobState
from pipeq._config import Deployment, load_deployments
from pipeq._redis import masked
from pipeq._stack import start_redis, stop_process
from pipeq._status import Collector
from pipeq.errors import InvalidRequest
from pipeq.serve._webhooks import new_secret

from .cluster import Cluster, renamed, wait_until
from .conftest import free_port, is_sentiment, start_gateway
from .test_webhooks import Receiver, receiver  # noqa: F401  (a fixture)

# one test process runs the module: its tests share the servers and workers, in order
pytestmark = pytest.mark.xdist_group("several-redis")

PASSWORD = "b-s3cret:pw"  # percent-encoded in B's URL


@dataclass
class Servers:
    default: str
    a: str
    b: str
    b_proc: subprocess.Popen[bytes]
    cluster: Cluster
    a_proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [self.default, self.a, self.b]

    def client(self, **kwargs: Any) -> Client:
        return Client(self.default, config=self.cluster.config, **kwargs)


@pytest.fixture(scope="module")
def servers(
    deployments: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("several-redis")
    port_a, port_b = free_port(), free_port()
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a_proc = start_redis(port_a, tmp / "a")
    b_proc = start_redis(
        port_b,
        tmp / "b",
        extra=("--requirepass", PASSWORD),
        client=redis.Redis(port=port_b, password=PASSWORD),
    )
    a = f"redis://127.0.0.1:{port_a}/0"
    b = f"redis://:{PASSWORD.replace(':', '%3A')}@127.0.0.1:{port_b}/0"
    sentiment, embeddings = deployments["sentiment-analysis"], deployments["feature-extraction"]
    # the cluster's own redis-server is the default one (its workers' --redis-url)
    cluster = Cluster(
        tmp,
        {
            "alpha": renamed(sentiment, "alpha", redis_url=a),
            "beta": renamed(sentiment, "beta", redis_url=b),
            "gamma": renamed(embeddings, "gamma", redis_url=a),
        },
    )
    try:
        procs = {name: cluster.start_worker(name) for name in ("alpha", "beta", "gamma")}
        for name, url in (("alpha", a), ("beta", b), ("gamma", a)):
            proc, r = procs[name], redis.Redis.from_url(url)

            def beats(proc: Any = proc, r: redis.Redis = r, name: str = name) -> bool:
                assert proc.poll() is None, f"worker exited: {cluster.logs()}"
                return bool(r.zcard(f"pipeq:workers:{name}"))

            wait_until(beats, 120, f"the worker of {name} beats on its own Redis")
        yield Servers(cluster.url, a, b, b_proc, cluster, a_proc)
    finally:
        cluster.close()
        stop_process(a_proc)
        stop_process(b_proc)


def on(url: str, job_id: str) -> bool:
    """Redis at `url` holds the job's stored result."""
    return bool(redis.Redis.from_url(url).exists(f"celery-task-meta-{job_id}"))


def pipeq(servers: Servers, *args: str) -> tuple[int, str, str]:
    """`pipeq <args>` on the default Redis, the config in $PIPEQ_CONFIG."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeq", *args, "--redis-url", servers.default],
        capture_output=True,
        text=True,
        env={**os.environ, "PIPEQ_CONFIG": str(servers.cluster.config)},
        timeout=60,
    )
    return out.returncode, out.stdout, out.stderr


def scrape(servers: Servers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collector = Collector({masked(u): redis.Redis.from_url(u) for u in servers.urls})
    families: list[Metric] = list(collector.collect())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_a_deployments_redis_url_is_read_like_any_redis_url_and_never_shown(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[deployments.x]\ntask = "ner"\nmodel = "m"\nredis_url = "redis://:p%40ss@h:6379/0"\n'
        '[deployments.y]\ntask = "ner"\nmodel = "m"\n'
        'redis_url = "sentinel://:pw@s1:26379;sentinel://:pw@s2:26379/0?master_name=m"\n'
    )
    x = load_deployments(config)["x"]
    assert x.redis_url == "redis://:p%40ss@h:6379/0"
    assert "redis_url" not in x.to_dict() and "p%40ss" not in repr(x)  # never announced
    for bad, said in (
        ("redis://:pa#ss@h:6379/0", "no '#' part"),
        ("http://h:6379/0", "starts with redis://"),
        ("redis://:pw@h:6379/0?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
    ):
        with pytest.raises(InvalidRequest) as e:
            Deployment(name="x", task="ner", model="m", redis_url=bad)
        assert said in str(e.value) and "deployment 'x': redis_url" in str(e.value)
        assert "pa#ss" not in str(e.value) and ":pw@" not in str(e.value)
    # `pipeq up` runs one Redis: it says so, before it starts anything
    up = subprocess.run(
        [sys.executable, "-m", "pipeq", "up", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 2 and "x, y name their own redis_url" in up.stderr
    assert "p%40ss" not in up.stderr


def test_each_deployments_jobs_go_to_its_own_redis_only(servers: Servers) -> None:
    with servers.client() as client:
        assert client.redis_urls == servers.urls
        alpha = client.submit("alpha", "I love this")
        beta = client.submit("beta", "I hate this")
        assert is_sentiment(alpha.result(timeout=60)) and is_sentiment(beta.result(timeout=60))
        for job, home in ((alpha, servers.a), (beta, servers.b)):
            assert [on(url, job.id) for url in servers.urls] == [u == home for u in servers.urls]
        # each worker announced on its own Redis, and never its URL
        announced = redis.Redis.from_url(servers.b).hgetall("pipeq:deployments")
        assert set(announced) == {b"beta"} and PASSWORD.encode() not in announced[b"beta"]
        assert set(client.deployments()) == {"alpha", "beta", "gamma"}
        # by task: a deployment of that task on any Redis (alpha: first by name)
        by_task = client.submit("sentiment-analysis", "Fine.")
        assert by_task.deployment == "alpha" and is_sentiment(by_task.result(timeout=60))
        assert client.depth("beta").waiting == 0
        # a bare id (a CLI, the gateway) finds the Redis that holds it
        bare = client.job(beta.id)
        assert bare.status() is JobState.SUCCEEDED and bare.deployment == "beta"
        assert bare.result(timeout=5) == beta.result(timeout=5)
        assert client.job("no-such-job").status() is JobState.UNKNOWN
        assert bare.forget() and not on(servers.b, beta.id)


def test_status_and_the_exporter_read_every_redis(servers: Servers) -> None:
    code, out, err = pipeq(servers, "status", "--json")
    assert code == 0, (out, err)
    report = json.loads(out)
    assert [d["name"] for d in report["deployments"]] == ["alpha", "beta", "gamma"]
    assert all(d["workers"] == 1 for d in report["deployments"]) and report["redis_down"] == []
    code, out, _ = pipeq(servers, "deployments")
    assert code == 0 and [line.split("\t")[:4:3] for line in out.splitlines()] == [
        ["alpha", "1 live worker(s)"],
        ["beta", "1 live worker(s)"],
        ["gamma", "1 live worker(s)"],
    ]
    s = scrape(servers)
    for url in servers.urls:
        assert s[("pipeq_redis_up", (("redis", masked(url)),))] == 1
    assert s[("pipeq_workers", (("deployment", "alpha"),))] == 1
    assert s[("pipeq_workers", (("deployment", "beta"),))] == 1
    assert PASSWORD not in json.dumps([list(k) for k in s])


@pytest.fixture(scope="module")
def gateway(
    servers: Servers,
    receiver: Receiver,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`pipeq serve` on the default Redis with the servers' config (no keys: loopback),
    webhooks allowed to this host; its fallback re-read of pending webhooks is 30 s, so a
    delivery sooner came from the result subscription of the job's own Redis."""
    tmp = tmp_path_factory.mktemp("several-redis-gateway")
    hooks = tmp / "webhooks.toml"
    hooks.write_text(
        f'[webhooks]\nsecrets = ["{new_secret()}"]\nallow = ["127.0.0.1"]\nrecheck_s = 30\n'
    )
    config = str(servers.cluster.config)
    url, proc, log = start_gateway(
        servers.default, tmp, None, "--config", config, "--webhooks", str(hooks)
    )
    try:
        yield url
    finally:
        stop_process(proc)
        assert PASSWORD not in log.read_text()


def keys_of(url: str, job_id: str) -> set[str]:
    """The keys about one job on the Redis at `url`."""
    return {k.decode() for k in redis.Redis.from_url(url).keys(f"*{job_id}*")}


def test_the_gateway_serves_every_redis_and_keeps_each_job_on_its_own(
    servers: Servers,
    gateway: str,
    receiver: Receiver,  # noqa: F811
) -> None:
    with httpx.Client(base_url=gateway, timeout=60) as http:
        models = http.get("/v1/models")
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == ["alpha", "beta", "gamma"]
        assert http.get("/ready").json() == {"status": "ready"}
        assert http.get("/ready/beta").json()["live_workers"] == 1
        jobs = {}
        for name in ("alpha", "beta"):
            hook = f"{receiver.url}/ok/{name}"
            body = {"deployment": name, "inputs": "I love this", "webhook": hook}
            r = http.post("/v1/jobs", json=body, headers={"Prefer": "wait=30"})
            assert r.status_code == 200 and is_sentiment(r.json()["result"]), r.text
            jobs[name] = r.json()["id"]
        # a job's own keys on its deployment's Redis only; its webhook on the gateway's
        for name, home in (("alpha", servers.a), ("beta", servers.b)):
            job_id = jobs[name]
            assert {f"pipeq:submitted:{job_id}", f"celery-task-meta-{job_id}"} <= keys_of(
                home, job_id
            )
            others = [u for u in servers.urls if u != home]
            assert [keys_of(u, job_id) for u in others if u != servers.default] == [set()]
            assert keys_of(servers.default, job_id) == {f"pipeq:webhook:{job_id}"}
        # its webhook is delivered (woken by the result stored on A, and on B)
        for name in ("alpha", "beta"):
            (got,) = receiver.wait(f"/ok/{name}", 1, timeout_s=20)
            assert got.json["type"] == "job.completed" and got.json["data"]["id"] == jobs[name]
        # by id alone: found on whichever Redis holds it
        beta = http.get(f"/v1/jobs/{jobs['beta']}").json()
        assert beta["status"] == "succeeded" and beta["deployment"] == "beta"
        assert beta["webhook"]["status"] == "delivered"
        assert http.get(f"/v1/jobs/{jobs['beta']}/result").json() == beta["result"]
        with http.stream("GET", f"/v1/jobs/{jobs['beta']}/events") as events:
            assert "event: completed" in events.read().decode()
        assert http.get("/v1/jobs/no-such-job").status_code == 404
        # an own id: idempotent on its deployment's Redis, refused on another's
        put = {"deployment": "beta", "inputs": "Mine."}
        first = http.put("/v1/jobs/my-beta-job", json=put, headers={"Prefer": "wait=30"})
        again = http.put("/v1/jobs/my-beta-job", json=put)
        assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
        assert again.json()["result"] == first.json()["result"]
        taken = http.put("/v1/jobs/my-beta-job", json={**put, "deployment": "alpha"})
        assert taken.status_code == 409, taken.text
        assert keys_of(servers.a, "my-beta-job") == set()
        # Hugging Face's and OpenAI's routes
        hf = http.post("/models/beta", json={"inputs": "I hate this"})
        assert hf.status_code == 200, hf.text
        assert hf.json()[0][0]["label"] in ("POSITIVE", "NEGATIVE"), hf.text  # TGI's shape
        emb = http.post(
            "/v1/embeddings", json={"model": "gamma", "input": "hi", "encoding_format": "float"}
        )
        assert emb.status_code == 200, emb.text
        vector = emb.json()["data"][0]["embedding"]
        assert len(vector) > 8 and all(isinstance(x, float) for x in vector)
        # a batch: its state on the gateway's Redis, its jobs on gamma's (A)
        line = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "gamma"}}
        data = "\n".join(
            json.dumps({"custom_id": f"r{i}", **line, "body": {**line["body"], "input": f"t{i}"}})
            for i in range(3)
        )
        up = http.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
        assert up.status_code == 200, up.text
        made = http.post(
            "/v1/batches",
            json={
                "input_file_id": up.json()["id"],
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        )
        assert made.status_code == 200, made.text
        deadline = time.monotonic() + 60
        while (batch := http.get(f"/v1/batches/{made.json()['id']}").json())["status"] not in (
            "completed",
            "failed",
            "expired",
        ):
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3, batch
        out = http.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
        assert [json.loads(o)["response"]["status_code"] for o in out] == [200] * 3
        assert redis.Redis.from_url(servers.default).exists(f"pipeq:oai:batch:{batch['id']}")


def test_a_redis_going_down_fails_only_its_deployments_and_status_names_it(
    servers: Servers,
) -> None:
    with servers.client(broker_timeout_s=1) as client:
        before = client.submit("beta", "Before.")
        assert is_sentiment(before.result(timeout=60))
        servers.b_proc.kill()
        servers.b_proc.wait()
        servers.cluster.kill(servers.cluster.workers[1])  # beta's, which would wait for B
        # alpha keeps serving, by name and by task
        assert is_sentiment(client.submit("alpha", "Still here.").result(timeout=60))
        assert client.submit("sentiment-analysis", "And by task.").deployment == "alpha"
        # what touches beta says which Redis, its password masked
        for call in (
            lambda: client.submit("beta", "Gone?"),
            before.cancel,
            client.job(before.id).status,  # a bare id: asked of B when no other has it
            lambda: client.depth("beta"),
        ):
            with pytest.raises(BrokerUnavailable) as e:
                call()
            assert masked(servers.b) in str(e.value) and PASSWORD not in str(e.value)
    code, out, err = pipeq(servers, "status")
    assert code == 2, (out, err)
    assert "alpha" in out and f"Redis at {masked(servers.b)} does not answer" in out
    assert "its deployments: beta" in out and PASSWORD not in out + err
    s = scrape(servers)
    assert s[("pipeq_redis_up", (("redis", masked(servers.b)),))] == 0
    assert s[("pipeq_redis_up", (("redis", masked(servers.a)),))] == 1
    assert s[("pipeq_workers", (("deployment", "alpha"),))] == 1
    assert ("pipeq_workers", (("deployment", "beta"),)) not in s


def test_the_gateway_with_a_redis_down_fails_only_its_deployments(
    servers: Servers, gateway: str
) -> None:
    """After the test above killed B (and beta's worker): what touches beta is 503
    BrokerUnavailable within the gateway's broker timeout (2 s), naming B masked; alpha
    and gamma, on A, are served as before."""
    assert servers.b_proc.poll() is not None, "B runs: the test above did not kill it"
    with httpx.Client(base_url=gateway, timeout=60) as http:
        alpha = http.post(
            "/v1/jobs",
            json={"deployment": "alpha", "inputs": "Still here."},
            headers={"Prefer": "wait=30"},
        )
        assert alpha.status_code == 200 and is_sentiment(alpha.json()["result"]), alpha.text
        # a job on A, by id alone, while B does not answer
        assert http.get(f"/v1/jobs/{alpha.json()['id']}").json()["status"] == "succeeded"
        assert http.post("/models/alpha", json={"inputs": "Fine."}).status_code == 200
        models = http.get("/v1/models")
        assert [m["id"] for m in models.json()["data"]] == ["alpha", "gamma"], models.text
        assert http.get("/ready").json() == {"status": "ready", "unavailable": ["beta"]}
        for method, path, body in (
            ("POST", "/v1/jobs", {"deployment": "beta", "inputs": "Gone?"}),
            ("PUT", "/v1/jobs/my-gone-job", {"deployment": "beta", "inputs": "Gone?"}),
            ("GET", "/v1/jobs/my-beta-job", None),  # on B: no other Redis knows it
            ("POST", "/v1/jobs/my-beta-job/cancel", None),
            ("POST", "/models/beta", {"inputs": "Gone?"}),
            ("GET", "/ready/beta", None),
        ):
            began = time.monotonic()
            r = http.request(method, path, json=body)
            took = time.monotonic() - began
            assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
            error = r.json()
            if isinstance(error["error"], dict):  # pipeq's body; TGI's is flat
                error = {**error["error"], "error": error["error"]["message"]}
            assert error["type"] == "BrokerUnavailable", (path, error)
            assert masked(servers.b) in error["error"], (path, error)
            assert PASSWORD not in r.text and took < 10, (path, took)


def test_a_flood_of_requests_for_a_redis_that_is_down_holds_up_no_other_deployment(
    servers: Servers, gateway: str
) -> None:
    """64 requests for beta (B is down) at once with 8 for alpha (A): each Redis has its
    own submit threads, and B's calls fail at once for a second after one did not answer,
    so alpha's jobs are answered as if B's flood were not there (before: the 8 shared
    threads each waited 2 s a beta request, 64 / 8 x 2 s = 16 s before alpha's turn), and
    every beta request is a 503 in bounded time (queued ones too: they fail at once
    when their thread finds B marked down)."""
    from concurrent.futures import ThreadPoolExecutor

    assert servers.b_proc.poll() is not None, "B runs: an earlier test did not kill it"

    def post(deployment: str) -> tuple[str, int, float]:
        began = time.monotonic()
        with httpx.Client(base_url=gateway, timeout=120) as http:
            r = http.post(
                "/v1/jobs",
                json={"deployment": deployment, "inputs": "Is it still there?"},
                headers={"Prefer": "wait=60"},
            )
        return deployment, r.status_code, time.monotonic() - began

    with ThreadPoolExecutor(72) as pool:
        answers = list(pool.map(post, ["beta"] * 64 + ["alpha"] * 8))
    alpha = [a for a in answers if a[0] == "alpha"]
    beta = [a for a in answers if a[0] == "beta"]
    slowest = max(a[2] for a in alpha), max(b[2] for b in beta)
    print(f"\nthe slowest answer: alpha's {slowest[0]:.1f} s, beta's {slowest[1]:.1f} s")
    assert {code for _, code, _ in alpha} == {200}, alpha
    assert {code for _, code, _ in beta} == {503}, beta
    # measured: alpha 1.1-1.5 s, beta 3.0 s at most; before: alpha 7.9-12.4 s, beta 14 s
    assert slowest[0] < 6 and slowest[1] < 10, (alpha, beta)


def test_a_frozen_redis_holds_up_no_route_and_an_accepted_job_keeps_its_id(
    servers: Servers, gateway: str
) -> None:
    """A (alpha's Redis) frozen (SIGSTOP: it neither answers nor refuses) while a
    `Prefer: wait` request for an accepted alpha job waits: the request answers 202 with
    the job's id once its wait ends (a 503 there made clients send the job again), and
    `/health` (which reads no Redis, but the body limit read every Redis) answers at once
    throughout. Thawed, the job runs."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    assert servers.a_proc is not None
    alpha_worker = servers.cluster.workers[0]
    alpha_worker.send_signal(signal.SIGSTOP)  # the job stays queued
    try:
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=gateway, timeout=60) as http:
            waiting = pool.submit(
                http.post,
                "/v1/jobs",
                json={"deployment": "alpha", "inputs": "Frozen, then thawed."},
                headers={"Prefer": "wait=12"},
            )
            time.sleep(1.5)  # accepted, waiting
            servers.a_proc.send_signal(signal.SIGSTOP)
            try:
                health = []
                for _ in range(12):
                    began = time.monotonic()
                    assert http.get("/health").status_code == 200
                    health.append(time.monotonic() - began)
                    time.sleep(0.5)
                r = waiting.result(timeout=60)
            finally:
                servers.a_proc.send_signal(signal.SIGCONT)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            assert max(health) < 1.0, health
            alpha_worker.send_signal(signal.SIGCONT)
            done = http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60})
            assert done.status_code == 200 and is_sentiment(done.json()), done.text
    finally:
        alpha_worker.send_signal(signal.SIGCONT)
