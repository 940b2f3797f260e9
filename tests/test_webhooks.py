"""Webhooks (docs/http.md, "Webhooks"): a gateway with webhooks configured, on the
session's stack, POSTs to a real receiver in this process, which verifies what came with
the receivers' own libraries: `standardwebhooks` for jobs, `openai`'s `webhooks.unwrap`
for the Batch API's events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio
import standardwebhooks

from pipeq import Client
from pipeq._stack import Stack, stop_process
from pipeq.errors import InvalidRequest
from pipeq.serve._webhooks import (
    _CLAIM,
    DUE_KEY,
    LEASED_KEY,
    WebhookConfig,
    enqueue_batch_event,
    new_secret,
    parse_webhooks,
    sign,
)

from .conftest import paused, start_gateway

BATCHES = "/ok/batches"  # the hooked gateway's batch_url, on the receiver
OLD, NEW = new_secret(), new_secret()  # a rotation: both sign every delivery


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server in this process. Its paths answer: /ok/* 200; /flaky/* 500 twice,
    then 200; /down/* 500; /gone/* 410."""

    url: str
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]

    def wait(self, path: str, n: int, timeout_s: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.at(path)) < n:
            assert time.monotonic() < deadline, f"{len(self.at(path))} of {n} came to {path}"
            time.sleep(0.05)
        return self.at(path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            with hub.lock:
                hub.got.append(got)
                tries = len([r for r in hub.got if r.path == self.path])
            kind = self.path.split("/")[1]
            status = {"ok": 200, "down": 500, "gone": 410}.get(kind, 200 if tries > 2 else 500)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield hub
    server.shutdown()


@pytest.fixture(scope="module")
def hooked(
    stack: Stack, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway (no keys: loopback) whose webhooks may call 127.0.0.1 (and localhost, a
    name that resolves to a private address), with short retries (3 attempts, 0.1 to 0.5 s
    apart). Its fallback re-read of pending jobs is 30 s: a delivery sooner than that came
    from the result bus's wake."""
    tmp = tmp_path_factory.mktemp("webhooks")
    config = tmp / "webhooks.toml"
    config.write_text(
        "[webhooks]\n"
        f'secrets = ["{OLD}", "{NEW}"]\n'
        'allow = ["127.0.0.1", "localhost"]\n'
        "timeout_s = 2\nmax_attempts = 3\nbackoff_s = 0.2\nmax_backoff_s = 0.5\nrecheck_s = 30\n"
        f'batch_url = "{receiver.url}{BATCHES}"\n'
    )
    url, proc, _ = start_gateway(stack.url, tmp, None, "--webhooks", str(config))
    try:
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def http(hooked: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hooked, timeout=30) as c:
        yield c


def submit(http: httpx.Client, webhook: str, **extra: Any) -> dict[str, Any]:
    body = {"deployment": "sentiment-analysis", "inputs": "I love this", "webhook": webhook}
    r = http.post("/v1/jobs", json={**body, **extra})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def settled(http: httpx.Client, job_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The job once its webhook is no longer pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["webhook"]["status"] != "pending":
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


# -- with a receiver ----------------------------------------------------------------------
def test_a_finished_job_is_posted_signed_by_every_secret_and_a_tampered_byte_fails(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = f"/ok/{uuid.uuid4().hex}"
    job = submit(http, receiver.url + path)
    assert job["webhook"] == {"status": "pending", "attempts": 0, "last_status_code": None}
    (got,) = receiver.wait(path, 1, timeout_s=15)  # under recheck_s: woken by the result
    for secret in (OLD, NEW):  # during a rotation, either secret verifies
        event = standardwebhooks.Webhook(secret).verify(got.body, got.headers)
        assert event["type"] == "job.completed" and event["data"]["id"] == job["id"]
    tampered = bytearray(got.body)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(NEW).verify(bytes(tampered), got.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(got.body, got.headers)
    after = settled(http, job["id"])
    assert after.pop("webhook") == {"status": "delivered", "attempts": 1, "last_status_code": 200}
    assert got.json["data"] == after  # the job as GET /v1/jobs/{id} shows it
    assert after["status"] == "succeeded" and after["result"][0]["label"] in (
        "POSITIVE",
        "NEGATIVE",
    )


def test_a_receiver_that_answers_500_twice_gets_the_same_webhook_id_then_it_is_delivered(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = f"/flaky/{uuid.uuid4().hex}"
    job = submit(http, receiver.url + path)
    tries = receiver.wait(path, 3)
    assert len({t.headers["webhook-id"] for t in tries}) == 1
    assert len({t.body for t in tries}) == 1  # the same event, each time signed anew
    for t in tries:
        standardwebhooks.Webhook(OLD).verify(t.body, t.headers)
    assert settled(http, job["id"])["webhook"] == {
        "status": "delivered",
        "attempts": 3,
        "last_status_code": 200,
    }


def test_the_result_stays_readable_when_every_delivery_fails(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = f"/down/{uuid.uuid4().hex}"
    job = submit(http, receiver.url + path)
    after = settled(http, job["id"])
    assert after["webhook"] == {"status": "failed", "attempts": 3, "last_status_code": 500}
    assert len(receiver.at(path)) == 3  # max_attempts, no more
    r = http.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 200 and r.json() == after["result"]


def test_an_allowlisted_name_that_resolves_to_a_private_address_is_not_called(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = f"/ok/{uuid.uuid4().hex}"
    port = receiver.url.rsplit(":", 1)[1]
    job = submit(http, f"http://localhost:{port}{path}")  # allowlisted by name
    after = settled(http, job["id"])
    assert after["webhook"]["status"] == "failed" and after["webhook"]["attempts"] == 3
    assert "not a public address" in after["webhook"]["last_error"]
    assert receiver.at(path) == []


def test_410_gone_disables_the_url(http: httpx.Client, receiver: Receiver, client: Client) -> None:
    url = receiver.url + f"/gone/{uuid.uuid4().hex}"
    with paused(client, "ner"):  # a job to the same URL, waiting while the URL goes
        waiting = submit(http, url, deployment="ner", inputs="My name is Sylvain.")
        job = submit(http, url)
        after = settled(http, job["id"])
        assert after["webhook"] == {"status": "disabled", "attempts": 1, "last_status_code": 410}
    assert http.get(f"/v1/jobs/{waiting['id']}/result?wait=30").status_code == 200
    later = settled(http, waiting["id"])  # disabled once it started: nothing goes to the URL
    assert later["webhook"] == {
        "status": "disabled",
        "attempts": 0,
        "last_status_code": None,
        "last_error": "the URL answered 410 Gone",
    }
    r = http.post(
        "/v1/jobs", json={"deployment": "sentiment-analysis", "inputs": "x", "webhook": url}
    )
    assert r.status_code == 422 and "410" in r.json()["error"]["message"]
    time.sleep(0.5)  # a few of the dispatcher's rounds
    assert len(receiver.at(url.removeprefix(receiver.url))) == 1


@pytest.mark.parametrize(
    "webhook",
    [
        "http://10.0.0.1/hook",  # a private address, not allowlisted
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://127.0.0.2:9/hook",  # loopback too, but 127.0.0.1 is allowlisted, not this
        "https://hooks.example.com/x",
        "http://user:secret@127.0.0.1:9/hook",  # credentials in the URL
        "file:///etc/passwd",
        "127.0.0.1/hook",
    ],
)
def test_a_webhook_to_an_address_not_allowlisted_is_refused_at_submit(
    http: httpx.Client, webhook: str
) -> None:
    r = http.post(
        "/v1/jobs", json={"deployment": "sentiment-analysis", "inputs": "x", "webhook": webhook}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "InvalidRequest"
    assert r.json()["error"]["message"].startswith("webhook:")


def test_a_gateway_without_webhooks_refuses_a_webhook_and_a_filter_needs_one(
    http: httpx.Client, stack: Stack
) -> None:
    from starlette.testclient import TestClient

    from pipeq.serve import Settings, create_app

    # the in-process app (no extra gateway process): the same code, no webhooks configured
    with TestClient(create_app(Settings(redis_url=stack.url)), client=("127.0.0.1", 5)) as c:
        r = c.post(
            "/v1/jobs",
            json={
                "deployment": "sentiment-analysis",
                "inputs": "x",
                "webhook": "http://127.0.0.1:9/",
            },
        )
        assert r.status_code == 422 and "no webhooks configured" in r.json()["error"]["message"]
        gw = c.app.state.gateway  # type: ignore[attr-defined]
        assert c.portal.call(gw.batch_event, {"id": "batch_1"}, "batch.completed") is None
    r = http.post(
        "/v1/jobs",
        json={
            "deployment": "sentiment-analysis",
            "inputs": "x",
            "webhook_events_filter": ["start"],
        },
    )
    assert r.status_code == 422
    r = http.post(
        "/v1/jobs",
        json={
            "deployment": "sentiment-analysis",
            "inputs": "x",
            "webhook": "http://127.0.0.1:9/",
            "webhook_events_filter": ["finished"],
        },
    )
    assert r.status_code == 422


def test_start_output_and_completed_events_come_in_order(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = f"/ok/{uuid.uuid4().hex}"
    job = submit(
        http,
        receiver.url + path,
        deployment="text-generation",
        inputs="Hello",
        params={"max_new_tokens": 16, "do_sample": False},
        webhook_events_filter=["start", "output", "completed"],
    )
    deadline = time.monotonic() + 30
    while not any(r.json["type"] == "job.completed" for r in receiver.at(path)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    got = [standardwebhooks.Webhook(NEW).verify(r.body, r.headers) for r in receiver.at(path)]
    kinds = [e["type"] for e in got]
    assert kinds[0] == "job.start" and kinds[-1] == "job.completed", kinds
    assert set(kinds[1:-1]) == {"job.output"}
    text = "".join(p["text"] for e in got[1:-1] for p in e["data"]["output"])
    assert text == got[-1]["data"]["result"][0]["generated_text"]
    assert len({r.headers["webhook-id"] for r in receiver.at(path)}) == len(got)
    assert got[-1]["data"]["id"] == job["id"]


def test_batch_events_verify_with_openais_unwrap(
    hooked: str, stack: Stack, receiver: Receiver
) -> None:
    path = f"/ok/batch-{uuid.uuid4().hex}"

    async def enqueue() -> str:
        aredis = redis.asyncio.from_url(stack.url)
        try:
            return await enqueue_batch_event(
                aredis, {"id": "batch_123"}, "batch.completed", receiver.url + path
            )
        finally:
            await aredis.aclose()

    event_id = asyncio.run(enqueue())  # from outside the gateway: it lives in Redis
    (got,) = receiver.wait(path, 1)
    for secret in (OLD, NEW):
        event = openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(
            got.body, got.headers
        )
        assert event.type == "batch.completed" and event.id == event_id
        assert event.data.id == "batch_123" and event.object == "event"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused", webhook_secret=NEW).webhooks.unwrap(
            got.body.replace(b"123", b"124"), got.headers
        )
    with pytest.raises(ValueError):
        asyncio.run(enqueue_batch_event(None, {"id": "b"}, "batch.finished", receiver.url))


def test_a_batch_that_ends_posts_its_event_to_batch_url(hooked: str, receiver: Receiver) -> None:
    """The Batch API's runner queues `batch.completed` when a batch ends: the receiver
    verifies it with OpenAI's client, and its data names the batch."""
    oai = openai.OpenAI(base_url=f"{hooked}/v1", api_key="unused", max_retries=0)
    line = {"model": "sentiment-analysis", "input": "x"}  # not an embeddings deployment
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": line}
        for i in range(2)
    ]
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    uploaded = oai.files.create(file=("in.jsonl", content), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    got = None
    deadline = time.monotonic() + 60
    while got is None:
        assert time.monotonic() < deadline, oai.batches.retrieve(batch.id)
        for r in receiver.at(BATCHES):
            event = openai.OpenAI(api_key="unused", webhook_secret=NEW).webhooks.unwrap(
                r.body, r.headers
            )
            if event.data.id == batch.id:
                got = event
        time.sleep(0.05)
    done = oai.batches.retrieve(batch.id)
    assert got.type == f"batch.{done.status}" and done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 2)


# -- without a stack ----------------------------------------------------------------------
def test_an_attempt_that_gets_no_answer_ends_at_timeout_s() -> None:
    import socket

    from pipeq.serve._webhooks import Dispatcher

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"

        async def attempt() -> tuple[int | None, str | None]:
            config = WebhookConfig((NEW,), ("127.0.0.1",), timeout_s=0.3)
            dispatcher = Dispatcher(redis.asyncio.Redis(), config, read=None)  # type: ignore[arg-type]
            try:
                return await dispatcher._post(url, "msg_1", b"{}")
            finally:
                await dispatcher.http.aclose()

        started = time.monotonic()
        assert asyncio.run(attempt()) == (None, "no answer within 0.3 s")
        assert time.monotonic() - started < 2


def test_a_delivery_claimed_by_a_gateway_that_died_comes_due_again(redis_url: str) -> None:
    db = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/1")  # not the gateway's
    db.flushdb()
    claim = db.register_script(_CLAIM)
    db.zadd(DUE_KEY, {"pipeq:webhook:a": 100})
    keys = [DUE_KEY, LEASED_KEY]
    # the entries pending in all (due or leased), then the ones claimed
    assert claim(keys=keys, args=[99, 45, 10]) == [1]  # not due yet
    assert claim(keys=keys, args=[100, 45, 10]) == [1, b"pipeq:webhook:a"]
    assert claim(keys=keys, args=[140, 45, 10]) == [1]  # leased: no other gateway takes it
    assert claim(keys=keys, args=[146, 45, 10]) == [1, b"pipeq:webhook:a"]  # its lease ended
    db.delete(LEASED_KEY)
    assert claim(keys=keys, args=[200, 45, 10]) == [0]
    db.flushdb()


def test_the_signature_is_standard_webhooks_own() -> None:
    body = b'{"type":"job.completed"}'
    header = sign(WebhookConfig((OLD, NEW)).keys, "msg_1", int(time.time()), body)
    assert len(header.split(" ")) == 2
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": header,
    }
    assert standardwebhooks.Webhook(OLD).verify(body, headers) == {"type": "job.completed"}


@pytest.mark.parametrize(
    ("allow", "url", "ok"),
    [
        (["hooks.example.com"], "https://hooks.example.com/a", True),
        (["hooks.example.com"], "https://hooks.example.com.evil.net/a", False),
        (["hooks.example.com:8443"], "https://hooks.example.com/a", False),
        (["hooks.example.com:8443"], "https://hooks.example.com:8443/a", True),
        (["*.example.com"], "https://a.example.com/", True),
        (["*.example.com"], "https://example.com.evil.net/", False),
        (["https://ci.example.org/pipeq"], "https://ci.example.org/pipeq/7", True),
        (["https://ci.example.org/pipeq"], "https://ci.example.org/pipeqx", False),
        (["https://ci.example.org/pipeq"], "http://ci.example.org/pipeq/7", False),
        (["[::1]:8080"], "http://[::1]:8080/x", True),
        ([], "https://hooks.example.com/a", False),
    ],
)
def test_the_allowlist_takes_hosts_and_url_prefixes(allow: list[str], url: str, ok: bool) -> None:
    config = WebhookConfig((NEW,), tuple(allow))
    if ok:
        assert config.check_url(url) == url
    else:
        with pytest.raises(InvalidRequest):
            config.check_url(url)


def test_the_config_names_what_is_wrong_and_never_a_secret() -> None:
    config = parse_webhooks(f'[webhooks]\nsecrets = ["{NEW}"]\nbackoff_s = 1\n', "w.toml")
    assert config.backoff_s == 1 and config.max_attempts == 10 and config.allow == ()
    delays = [config.backoff(n) for n in range(1, 8)]
    assert all(2 ** (n - 1) / 2 <= d <= 2 ** (n - 1) for n, d in enumerate(delays, 1))
    for text, says in [
        ("", "no [webhooks]"),
        ('[webhooks]\nsecrets = ["whsec_x"]', "base64"),
        ('[webhooks]\nsecrets = ["abc"]', "whsec_"),
        (f'[webhooks]\nsecrets = ["{NEW}"]\nretries = 3', "webhooks.retries"),
        (f'[webhooks]\nsecrets = ["{NEW}"]\ntimeout_s = 0', "timeout_s"),
        (f'[webhooks]\nsecrets = ["{NEW}"]\nbatch_url = "http://10.0.0.1/"', "batch_url"),
    ]:
        with pytest.raises(ValueError, match=r"w\.toml") as e:
            parse_webhooks(text, "w.toml")
        assert says in str(e.value) and NEW not in str(e.value)
