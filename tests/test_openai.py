"""OpenAI's routes and Batch API: the shape conversions alone, then OpenAI's own Python
client (pinned in constraints.txt) against a real stack and gateway."""

from __future__ import annotations

import base64
import json
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeq._stack import stop_process
from pipeq.errors import InvalidRequest
from pipeq.serve import _batches, _openai
from pipeq.serve._errors import ApiError

from .conftest import paused, start_gateway

PROMPT = "In this course, we will teach you how to"
TEXTS = ["This course is produced by Hugging Face.", "You clever monster!"]


# -- the conversions, without a server ----------------------------------------------------
def test_temperature_zero_is_greedy_and_anything_else_samples() -> None:
    greedy = _openai.CompletionRequest(model="m", prompt="a", temperature=0, max_tokens=5)
    assert _openai.generation_params(greedy) == {
        "max_new_tokens": 5,
        "do_sample": False,
        "return_full_text": False,
    }
    sampled = _openai.ChatRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], n=2, top_p=0.5, stop="x"
    )
    params = _openai.generation_params(sampled, 7)
    assert params == {
        "max_new_tokens": 7,
        "do_sample": True,
        "return_full_text": False,
        "temperature": 1.0,
        "top_p": 0.5,
        "num_return_sequences": 2,
        "stop_strings": ["x"],
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0, "n": 2},  # greedy text is one
        {"presence_penalty": 0.5},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"logprobs": 2},
    ],
)
def test_what_workers_cannot_honour_is_refused_by_name(fields: dict[str, Any]) -> None:
    request = _openai.CompletionRequest(model="m", prompt="a", **fields)
    with pytest.raises(InvalidRequest, match=next(iter(fields))):
        _openai.generation_params(request)


def test_null_n_and_stream_are_their_defaults_and_stream_options_needs_a_stream() -> None:
    request = _openai.ChatRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], n=None, stream=None
    )
    assert (request.n, request.stream) == (1, False)
    alone = _openai.CompletionRequest(model="m", prompt="a", stream_options={})
    with pytest.raises(InvalidRequest, match="stream_options: only allowed when stream is true"):
        _openai.generation_params(alone)


def test_text_is_cut_before_its_first_stop_string_and_pooling_follows_the_deployment() -> None:
    assert _openai.cut_at_stop("one two. three.", [".", "two"]) == ("one ", True)
    assert _openai.cut_at_stop("one", ["x"]) == ("one", False)
    hidden = [[[1.0, 0.0], [3.0, 4.0]]]
    assert _openai.pool(hidden, {}) == [2.0, 2.0]
    assert _openai.pool(hidden, {"mode": "cls"}) == [1.0, 0.0]
    assert _openai.pool(hidden, {"mode": "max", "normalize": True}) == [0.6, 0.8]
    (data,) = _openai.embedding_data([[0.5, -1.0]], "base64")
    assert struct.unpack("<2f", base64.b64decode(data["embedding"])) == (0.5, -1.0)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    st.lists(
        st.dictionaries(st.text(), _json_values, min_size=1, max_size=4), min_size=1, max_size=8
    ),
    st.sampled_from(["\n", "\r\n"]),
)
def test_a_jsonl_file_parses_back_to_its_objects_whatever_unicode_their_text_holds(
    objects: list[dict[str, Any]], newline: str
) -> None:
    # U+2028, U+0085, \x0c... are legal raw in JSON strings: they do not end a line
    content = newline.join(json.dumps(o, ensure_ascii=False) for o in objects).encode()
    lines = _batches.parse_lines(content + newline.encode())
    assert [json.loads(line) for line in lines] == objects


def test_the_line_cap_counts_jsonl_lines_not_unicode_line_breaks() -> None:
    line = json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False).encode()
    assert len(_batches.parse_lines(b"\n".join([line] * _batches.FILE_MAX_LINES))) == 50_000
    with pytest.raises(ApiError, match="at most 50000 lines"):
        _batches.parse_lines(b"\n".join([line] * (_batches.FILE_MAX_LINES + 1)))


# -- OpenAI's client against the gateway --------------------------------------------------
@pytest.fixture(scope="module")
def oai(gateway: Any) -> Any:
    from openai import OpenAI

    with OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.keys["alice"], max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def generator(deployments: dict[str, Any]) -> Any:
    """transformers' own pipeline on the text-generation deployment's checkpoint."""
    from transformers import pipeline

    return pipeline("text-generation", model=deployments["text-generation"].model, device="cpu")


def _job(gateway: Any, job_id: str, until_done_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + until_done_s
    while True:
        job: dict[str, Any] = httpx.get(
            f"{gateway.url}/v1/jobs/{job_id}", headers=gateway.headers("alice")
        ).json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_models_lists_each_deployment_with_its_hub_id(oai: Any, gateway: Any) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert {"text-generation", "feature-extraction", "sentiment-analysis"} <= set(models)
    assert models["distilgpt2"].model_dump()["hub_id"] == "distilbert/distilgpt2"
    assert oai.models.retrieve("distilgpt2").id == "distilgpt2"
    from openai import OpenAI

    bob = OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.keys["bob"], max_retries=0)
    assert [m.id for m in bob.models.list()] == ["sentiment-analysis"]


def test_a_greedy_completion_is_the_pipeline_s_greedy_text_with_usage(
    oai: Any, generator: Any
) -> None:
    want = generator(PROMPT, max_new_tokens=8, do_sample=False, return_full_text=False)
    got = oai.completions.create(
        model="text-generation", prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert got.choices[0].text == want[0]["generated_text"] != ""
    assert got.id.startswith("cmpl-")
    prompt_tokens = len(generator.tokenizer(PROMPT)["input_ids"])
    assert got.usage.prompt_tokens == prompt_tokens
    assert 0 < got.usage.completion_tokens <= 8
    assert got.usage.total_tokens == prompt_tokens + got.usage.completion_tokens
    # a stop string ends the text before it, as OpenAI's does
    stop = want[0]["generated_text"].split()[1]
    cut = oai.completions.create(
        model="text-generation", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert want[0]["generated_text"].startswith(cut.choices[0].text + stop)


def test_a_seeded_sampled_completion_is_the_same_text_as_set_seed_in_process(
    oai: Any, generator: Any
) -> None:
    """`seed` with sampling: the job draws from its own generator, so the same request
    gives the same text, and it is what `torch.manual_seed(seed); pipe(...)` gives."""
    import torch

    sampled = {"max_tokens": 12, "temperature": 0.8, "top_p": 0.95, "seed": 5}
    got = [
        oai.completions.create(model="text-generation", prompt=PROMPT, **sampled).choices[0].text
        for _ in range(2)
    ]
    torch.manual_seed(5)
    want = generator(
        PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95,
        return_full_text=False,
    )[0]["generated_text"]  # fmt: skip
    assert got == [want, want]


def test_service_tier_picks_the_job_s_priority_and_batch_lines_are_low(
    oai: Any, gateway: Any
) -> None:
    """OpenAI's `service_tier`: "priority" is a high job, "flex" a low one, "default" and
    none normal (the job, read back through `/v1/jobs`, says its level); a batch's lines
    are low; a tier OpenAI does not have is refused by name."""
    from openai import BadRequestError

    levels = {}
    for tier in ("priority", "flex", "default", None):
        # chat.completions.create takes service_tier; completions, OpenAI's legacy
        # route, has no such argument: the field goes as extra_body
        extra = {} if tier is None else {"extra_body": {"service_tier": tier}}
        raw = oai.completions.with_raw_response.create(
            model="text-generation", prompt=PROMPT, max_tokens=2, temperature=0, **extra
        )
        levels[tier] = _job(gateway, raw.headers["x-pipeq-job-id"])["priority"]
    assert levels == {"priority": "high", "flex": "low", "default": "normal", None: "normal"}
    with pytest.raises(BadRequestError, match="service_tier"):
        oai.completions.create(
            model="text-generation",
            prompt=PROMPT,
            max_tokens=2,
            extra_body={"service_tier": "urgent"},
        )
    batch = _batch(oai, _lines("text-generation", 2))
    done = _until(oai, batch.id, {"completed", "failed", "expired"})
    out = _by_custom_id(oai, done.output_file_id)
    assert _job(gateway, out["req-0"]["response"]["request_id"])["priority"] == "low"


def test_a_chat_streams_to_done_through_the_chat_template(oai: Any, generator: Any) -> None:
    messages = [{"role": "user", "content": "What will this course teach me?"}]
    want = generator(messages, max_new_tokens=10, do_sample=False, return_full_text=False)
    stream = oai.chat.completions.create(
        model="text-generation",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want[0]["generated_text"] and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    whole = oai.chat.completions.create(
        model="text-generation", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.content == text
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_a_stream_closed_early_cancels_its_job(oai: Any, gateway: Any, client: Any) -> None:
    # a generation under way (continuous batching): stopped at its next step
    stream = oai.completions.create(
        model="text-generation", prompt=PROMPT, max_tokens=900, temperature=0, stream=True
    )
    first = next(iter(stream))
    stream.close()
    assert _job(gateway, first.id.removeprefix("cmpl-"))["status"] == "cancelled"
    # a chat still queued: it never runs
    with paused(client, "distilgpt2"):
        chat = oai.chat.completions.create(
            model="distilgpt2",
            messages=[{"role": "user", "content": "Hello"}],
            temperature=0,
            stream=True,
        )
        first = next(iter(chat))
        assert first.choices[0].delta.role == "assistant"
        chat.close()
        assert _job(gateway, first.id.removeprefix("chatcmpl-"))["status"] == "cancelled"


def test_embeddings_are_the_pooled_pipeline_output_as_base64_and_floats(
    oai: Any, deployments: Any
) -> None:
    import numpy as np
    from transformers import pipeline

    reference = pipeline("feature-extraction", model=deployments["feature-extraction"].model)
    want = []
    for text in TEXTS:
        tokens = np.array(reference(text)[0])
        mean = tokens.mean(axis=0)  # all-MiniLM-L6-v2's config: mean pooling, normalized
        want.append(mean / np.linalg.norm(mean))
    packed = oai.embeddings.create(model="feature-extraction", input=TEXTS)  # base64
    floats = oai.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input=TEXTS, encoding_format="float"
    )
    for got in (packed, floats):
        assert [d.index for d in got.data] == [0, 1]
        for d, w in zip(got.data, want, strict=True):
            assert np.allclose(d.embedding, w, atol=1e-5)
    assert floats.usage.prompt_tokens == sum(
        len(reference.tokenizer(t)["input_ids"]) for t in TEXTS
    )


def test_a_long_input_is_cut_where_sentence_transformers_cuts_it(
    oai: Any, deployments: Any
) -> None:
    """all-MiniLM-L6-v2's sentence_bert_config.json keeps 256 tokens of an input (its
    model takes 512): the embedding of a ~330-token text pools its first 256, as
    sentence-transformers' `encode` does, and `usage` counts those."""
    import random

    import numpy as np
    from transformers import pipeline

    words = "the course teaches models data tokens queues workers batches fast good".split()
    text = " ".join(random.Random(3).choices(words, k=320))
    reference = pipeline("feature-extraction", model=deployments["feature-extraction"].model)
    assert len(reference.tokenizer(text)["input_ids"]) > 300

    def pooled(**tokenize: Any) -> Any:
        mean = np.array(reference(text, tokenize_kwargs=tokenize)[0]).mean(axis=0)
        return mean / np.linalg.norm(mean)

    want, whole = pooled(truncation=True, max_length=256), pooled()
    assert not np.allclose(want, whole, atol=1e-3)  # the cut matters for this text
    got = oai.embeddings.create(model="feature-extraction", input=text, encoding_format="float")
    assert np.allclose(got.data[0].embedding, want, atol=1e-5)
    assert got.usage.prompt_tokens == 256


def test_errors_are_openai_s_envelope_and_raise_the_client_s_errors(oai: Any, gateway: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="a")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="text-generation", input="a")
    assert "feature-extraction" in e.value.message and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="text-generation", prompt="a", max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="nope").models.list()
    slow = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.keys["slow"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(5):
            slow.models.list()
    assert e.value.response.headers["retry-after"] and e.value.type == "rate_limit_error"


def test_errors_a_retry_cannot_fix_tell_openai_s_clients_not_to_retry() -> None:
    from pipeq.errors import JobCancelled, JobFailed, Overloaded
    from pipeq.serve.routes_openai import openai_error

    for final in (JobCancelled("x"), JobFailed("x"), InvalidRequest("x"), ApiError(409, "C", "x")):
        assert openai_error(final).headers["x-should-retry"] == "false"
    for passing in (Overloaded("x"), ApiError(503, "NoLiveWorker", "x")):
        assert "x-should-retry" not in openai_error(passing).headers
        assert openai_error(passing).headers["retry-after"]


def test_token_arrays_are_refused_by_name(oai: Any) -> None:
    import openai

    for call in (
        lambda: oai.embeddings.create(model="feature-extraction", input=[[101, 2023]]),
        lambda: oai.completions.create(model="text-generation", prompt=[101, 2023]),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["message"].endswith(": token arrays are not supported; send text")
        assert e.value.param in ("input", "prompt")


def test_an_unknown_route_or_method_under_openai_s_paths_answers_openai_s_envelope(
    oai: Any, gateway: Any
) -> None:
    import openai

    with httpx.Client(base_url=gateway.url, headers=gateway.headers("alice")) as h:
        for method, path, status in (
            ("GET", "/v1/completions", 405),
            ("GET", "/v1/files/file-x/nothing", 404),
        ):
            r = h.request(method, path)
            assert r.status_code == status and r.headers["x-should-retry"] == "false"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="an empty string cannot be embedded"):
        oai.embeddings.create(model="feature-extraction", input=["a", ""])


def test_a_file_over_the_body_limit_is_refused_saying_which_limit(oai: Any) -> None:
    import openai

    with pytest.raises(openai.APIStatusError) as e:  # the default limit: 2 MB + 64 KiB
        oai.files.create(file=("big.jsonl", b"x" * 2_200_000), purpose="batch")
    assert e.value.status_code == 413 and e.value.code == "PayloadTooLarge"
    message = e.value.body["message"]
    assert message.startswith("the file is over the gateway's body limit (2065536 bytes")
    assert "limits.request_bytes" in message and "--max-body-bytes" in message


def test_the_openai_client_does_not_resubmit_a_job_cancelled_while_it_waits(
    gateway: Any, client: Any
) -> None:
    import openai

    from pipeq._ledger import waiting_key

    sent: list[httpx.Request] = []
    with (
        httpx.Client(event_hooks={"request": [sent.append]}) as http,
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=gateway.keys["alice"], http_client=http
        ) as oai,
    ):
        assert oai.max_retries == 2  # the client's default
        waiting = waiting_key("distilgpt2")
        before = set(client.redis.zrange(waiting, 0, -1))
        jobs: set[bytes] = set()
        with paused(client, "distilgpt2"), ThreadPoolExecutor(1) as pool:
            call = pool.submit(oai.completions.create, model="distilgpt2", prompt="a", max_tokens=4)
            deadline = time.monotonic() + 60
            while not call.done():  # cancel each job the client submits, as it waits
                assert time.monotonic() < deadline
                for job in set(client.redis.zrange(waiting, 0, -1)) - before - jobs:
                    jobs.add(job)
                    cancel = f"{gateway.url}/v1/jobs/{job.decode()}/cancel"
                    httpx.post(cancel, headers=gateway.headers("alice")).raise_for_status()
                time.sleep(0.05)
            with pytest.raises(openai.ConflictError) as e:
                call.result()
    assert e.value.code == "JobCancelled"
    assert len(sent) == 1 and len(jobs) == 1


def test_langchain_s_openai_chat_and_embeddings_run_on_the_gateway(
    gateway: Any, oai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LangChain's OpenAI integration (langchain-openai, pinned), as applications call it."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    monkeypatch.delenv("LANGSMITH_TRACING", raising=False)
    base, key = f"{gateway.url}/v1", gateway.keys["alice"]
    chat = ChatOpenAI(model="text-generation", base_url=base, api_key=key, temperature=0)
    answer = chat.invoke("What will this course teach me?", max_completion_tokens=6)
    want = oai.chat.completions.create(
        model="text-generation",
        messages=[{"role": "user", "content": "What will this course teach me?"}],
        max_completion_tokens=6,
        temperature=0,
    )
    assert answer.content == want.choices[0].message.content
    assert answer.usage_metadata["output_tokens"] == want.usage.completion_tokens
    # tiktoken's context-length check fetches its vocabulary from the network: off
    embed = OpenAIEmbeddings(
        model="feature-extraction", base_url=base, api_key=key, check_embedding_ctx_length=False
    )
    (vector,) = embed.embed_documents([TEXTS[0]])
    reference = oai.embeddings.create(model="feature-extraction", input=[TEXTS[0]])
    assert vector == pytest.approx(reference.data[0].embedding, abs=1e-6)


# -- the Batch API ---------------------------------------------------------------------------
def _lines(model: str, n: int, max_tokens: int = 4, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": model,
                "prompt": f"{PROMPT} {i}",
                "max_tokens": max_tokens,
                "temperature": 0,
                **extra,
            },
        }
        for i in range(n)
    ]


def _batch(oai: Any, lines: list[Any], window: str = "24h") -> Any:
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = oai.files.create(file=("in.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    return oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window=window
    )


def _until(oai: Any, batch_id: str, statuses: set[str], timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"{batch_id} still {batch.status}"
        time.sleep(0.2)


def _by_custom_id(oai: Any, file_id: str | None) -> dict[str, Any]:
    if file_id is None:
        return {}
    text = oai.files.content(file_id).text
    out = {}
    for line in text.splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in out, f"{record['custom_id']} twice"
        out[record["custom_id"]] = record
    return out


def test_a_batch_of_50_lines_completes_with_an_output_line_each(oai: Any) -> None:
    batch = _batch(oai, _lines("text-generation", 50))
    assert batch.status == "validating" and batch.request_counts.total == 50
    done = _until(oai, batch.id, {"completed", "failed", "expired"})
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (50, 0)
    out = _by_custom_id(oai, done.output_file_id)
    assert set(out) == {f"req-{i}" for i in range(50)} and done.error_file_id is None
    one = oai.completions.create(
        model="text-generation", prompt=f"{PROMPT} 7", max_tokens=4, temperature=0
    )
    assert out["req-7"]["response"]["status_code"] == 200
    assert out["req-7"]["response"]["body"]["choices"][0]["text"] == one.choices[0].text
    assert oai.batches.list(limit=1).data[0].id == batch.id
    files = {f.id: f for f in oai.files.list()}
    assert {batch.input_file_id, done.output_file_id} <= set(files)
    assert files[done.output_file_id].purpose == "batch_output"
    oai.files.delete(batch.input_file_id)
    assert batch.input_file_id not in {f.id for f in oai.files.list(purpose="batch")}


def test_the_client_pages_through_all_files_in_either_order(gateway: Any) -> None:
    import openai

    # bob's own files: no other test makes any
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.keys["bob"]) as bob:
        made = [
            bob.files.create(file=(f"{i}.jsonl", b'{"a": 1}\n'), purpose="batch").id
            for i in range(7)
        ]
        newest_first = [f.id for f in bob.files.list(limit=3)]  # three pages
        oldest_first = [f.id for f in bob.files.list(limit=3, order="asc")]
        assert sorted(newest_first) == sorted(made) and oldest_first == newest_first[::-1]
        page = bob.files.list(limit=3, order="asc", after=oldest_first[2])
        assert (page.first_id, page.last_id, page.has_more) == (*oldest_first[3:6:2], True)
        for listing in (bob.files.list, bob.batches.list):
            with pytest.raises(openai.BadRequestError, match="after"):
                listing(after="file-nope")


def test_a_bad_line_goes_to_the_error_file_and_the_others_complete(oai: Any) -> None:
    lines = _lines("text-generation", 3)
    lines[1]["body"]["bogus"] = 1
    lines.append({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}})
    done = _until(oai, _batch(oai, lines).id, {"completed", "failed", "expired"})
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)
    assert set(_by_custom_id(oai, done.output_file_id)) == {"req-0", "req-2"}
    errors = _by_custom_id(oai, done.error_file_id)
    assert errors["req-1"]["response"]["status_code"] == 400
    assert errors["req-1"]["response"]["body"]["error"]["param"] == "bogus"
    assert errors["wrong-url"]["error"]["code"] == "invalid_line"


def test_a_cancelled_batch_goes_through_cancelling_to_cancelled(
    oai: Any, gateway: Any, client: Any
) -> None:
    with paused(client, "distilgpt2"):  # its lines wait in the queue
        batch = _batch(oai, _lines("distilgpt2", 5))
        _until(oai, batch.id, {"in_progress"})
        assert oai.batches.cancel(batch.id).status == "cancelling"
        done = _until(oai, batch.id, {"cancelled", "completed"}, timeout_s=30)
    assert done.status == "cancelled" and done.cancelled_at
    errors = _by_custom_id(oai, done.error_file_id)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    assert {e["error"]["message"] for e in errors.values()} == {
        "the batch was cancelled before this line started"
    }
    assert len(errors) == 5
    assert _job(gateway, f"{batch.id}-0")["status"] == "cancelled"


def test_a_line_running_when_its_batch_is_cancelled_is_stopped_and_says_so(
    oai: Any, gateway: Any
) -> None:
    # a continuous-batching generation: the cancel stops it at its next step
    batch = _batch(oai, _lines("text-generation", 1, max_tokens=900))
    job_id, deadline = f"{batch.id}-0", time.monotonic() + 30
    url, alice = f"{gateway.url}/v1/jobs/{job_id}", gateway.headers("alice")
    # a 404 until the batch's runner has sent the line (a loaded machine: seconds)
    while httpx.get(url, headers=alice).json().get("status") != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    oai.batches.cancel(batch.id)
    done = _until(oai, batch.id, {"cancelled", "completed"}, timeout_s=30)
    assert done.status == "cancelled" and done.output_file_id is None
    error = _by_custom_id(oai, done.error_file_id)["req-0"]["error"]
    assert error == {
        "code": "batch_cancelled",
        "message": "the batch was cancelled while this line ran: it was stopped before it finished",
    }
    assert _job(gateway, job_id)["status"] == "cancelled"


def test_a_batch_past_its_window_expires_with_its_lines_in_the_error_file(
    oai: Any, client: Any
) -> None:
    with paused(client, "distilgpt2"):  # no worker takes its lines
        batch = _batch(oai, _lines("distilgpt2", 3), window="3s")
        done = _until(oai, batch.id, {"expired", "completed", "failed"}, timeout_s=30)
    assert done.status == "expired" and done.expired_at
    errors = _by_custom_id(oai, done.error_file_id)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert all(
        e["error"]["message"].startswith("the batch reached its deadline (completion_window)")
        and "ran" not in e["error"]["message"]
        for e in errors.values()
    )
    assert done.request_counts.failed == 3 and done.output_file_id is None


def test_a_batch_survives_the_kill_of_the_gateway_running_it(
    gateway: Any, client: Any, tmp_path: Path
) -> None:
    from openai import OpenAI

    url, proc, _ = start_gateway(client.redis_url, tmp_path, gateway.keys_file)
    first = OpenAI(base_url=f"{url}/v1", api_key=gateway.keys["alice"], max_retries=0)
    try:
        with paused(client, "distilgpt2"):  # its lines stay in flight
            batch = _batch(first, _lines("distilgpt2", 50))
            _until(first, batch.id, {"in_progress"})
            time.sleep(1.0)  # its first lines are sent
            lease = client.redis.get(f"pipeq:oai:batch:{batch.id}:lease").decode()
            assert lease.split(":")[1] == str(proc.pid)  # the gateway that made it runs it
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        url, proc, _ = start_gateway(client.redis_url, tmp_path, gateway.keys_file)
        again = OpenAI(base_url=f"{url}/v1", api_key=gateway.keys["alice"], max_retries=0)
        done = _until(again, batch.id, {"completed", "failed", "expired"})
        assert done.status == "completed", done
        assert set(_by_custom_id(again, done.output_file_id)) == {f"req-{i}" for i in range(50)}
    finally:
        stop_process(proc)


def test_a_request_waiting_on_a_deployment_whose_last_worker_died_gets_503_not_a_hang(
    tmp_path: Path, deployments: dict[str, Any]
) -> None:
    """A completion waits for its job; the deployment's only worker is SIGKILLed and its
    last heartbeat ages past the registry's grace (written into Redis: 1,000 s old, as if
    that long had passed). The request ends with 503 NoLiveWorker within a re-check (about
    5 s) instead of waiting out its 300 s for a 504, and the job stays queued."""
    import openai
    import redis

    from pipeq._ledger import workers_key

    from .cluster import Cluster, renamed

    cluster = Cluster(tmp_path, {"gen": renamed(deployments["text-generation"], "gen")})
    proc = None
    try:
        worker = cluster.start_worker("gen")
        cluster.hostname(worker, "gen")
        cluster.kill(worker)
        url, proc, _ = start_gateway(cluster.url, tmp_path, None)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(
                oai.completions.create, model="gen", prompt="hi", max_tokens=3, temperature=0
            )
            r = redis.Redis.from_url(cluster.url)
            while not r.llen("pipeq.gen"):  # the job is queued: the request waits on it
                assert not call.done(), call.result()
                time.sleep(0.05)
            key = workers_key("gen")
            r.zadd(key, {m: time.time() - 1000 for m in r.zrange(key, 0, -1)})
            aged = time.monotonic()
            with pytest.raises(openai.APIStatusError) as refused:
                call.result(timeout=60)
        assert time.monotonic() - aged < 30
        assert refused.value.status_code == 503, refused.value
        assert refused.value.response.headers.get("retry-after")
        assert refused.value.code == "NoLiveWorker" and "waits in the queue" in str(refused.value)
        assert r.llen("pipeq.gen") == 1  # still there for the next worker
    finally:
        if proc is not None:
            stop_process(proc)
        cluster.close()
