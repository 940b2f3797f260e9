"""Deployments on several Redis servers (docs/redis.md, "Several Redis servers"): three
local redis-servers (the default one, A, and B with a password), a real worker of
`alpha` on A and of `beta` on B; jobs land on their deployment's Redis only, `pipeq
status` and the exporter read all three, and B going down fails only what touches beta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.core import Metric

from pipeq import BrokerUnavailable, Client, JobState
from pipeq._config import Deployment, load_deployments
from pipeq._redis import masked
from pipeq._stack import start_redis, stop_process
from pipeq._status import Collector
from pipeq.errors import InvalidRequest

from .cluster import Cluster, renamed, wait_until
from .conftest import free_port, is_sentiment

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
    sentiment = deployments["sentiment-analysis"]
    # the cluster's own redis-server is the default one (its workers' --redis-url)
    cluster = Cluster(
        tmp,
        {
            "alpha": renamed(sentiment, "alpha", redis_url=a),
            "beta": renamed(sentiment, "beta", redis_url=b),
        },
    )
    try:
        procs = {name: cluster.start_worker(name) for name in ("alpha", "beta")}  # at once
        for name, url in (("alpha", a), ("beta", b)):
            proc, r = procs[name], redis.Redis.from_url(url)

            def beats(proc: Any = proc, r: redis.Redis = r, name: str = name) -> bool:
                assert proc.poll() is None, f"worker exited: {cluster.logs()}"
                return bool(r.zcard(f"pipeq:workers:{name}"))

            wait_until(beats, 120, f"the worker of {name} beats on its own Redis")
        yield Servers(cluster.url, a, b, b_proc, cluster)
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
        assert set(client.deployments()) == {"alpha", "beta"}
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
    assert [d["name"] for d in report["deployments"]] == ["alpha", "beta"]
    assert all(d["workers"] == 1 for d in report["deployments"]) and report["redis_down"] == []
    code, out, _ = pipeq(servers, "deployments")
    assert code == 0 and [line.split("\t")[:4:3] for line in out.splitlines()] == [
        ["alpha", "1 live worker(s)"],
        ["beta", "1 live worker(s)"],
    ]
    s = scrape(servers)
    for url in servers.urls:
        assert s[("pipeq_redis_up", (("redis", masked(url)),))] == 1
    assert s[("pipeq_workers", (("deployment", "alpha"),))] == 1
    assert s[("pipeq_workers", (("deployment", "beta"),))] == 1
    assert PASSWORD not in json.dumps([list(k) for k in s])


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
