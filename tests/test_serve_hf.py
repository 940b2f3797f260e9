"""The Hugging Face inference format (`POST /models/{m}`): the shape conversions alone,
then Hugging Face's own clients against a real stack and gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeq._registry import Announced
from pipeq.errors import InvalidRequest, JobFailed, Overloaded, UnknownDeployment
from pipeq.serve._hf import (
    HFRequest,
    find_deployment,
    split_request,
    stream_event,
    tgi_error,
    to_hf,
)

from .conftest import assert_close

TASKS = [
    "text-classification",
    "zero-shot-classification",
    "token-classification",
    "fill-mask",
    "question-answering",
    "summarization",
    "translation",
    "feature-extraction",
    "text-generation",
]


# -- the conversions, without a server ----------------------------------------------------
def _announced(name: str, task: str, model: str, hub: str | None = None) -> Announced:
    info: dict[str, Any] = {"task": task, "model": model}
    if hub:
        info["hub_id"] = hub
    return Announced(name, task, model, info)


DEPLOYED = {
    d.name: d
    for d in (
        _announced("sentiment", "sentiment-analysis", "/m/sst2", "distilbert/sst2"),
        _announced("gen", "text-generation", "/m/gpt2", "distilbert/distilgpt2"),
        _announced("gen-b", "text-generation", "/m/gpt2-b", "org/twin"),
        _announced("gen-c", "text-generation", "/m/gpt2-c", "org/twin"),
    )
}


def test_a_model_path_names_a_deployment_by_name_or_by_the_exact_model_it_serves() -> None:
    assert find_deployment(DEPLOYED, "sentiment").name == "sentiment"
    assert find_deployment(DEPLOYED, "distilbert/sst2").name == "sentiment"
    assert find_deployment(DEPLOYED, "/m/sst2").name == "sentiment"
    assert find_deployment(DEPLOYED, "distilgpt2").name == "gen"  # the legacy org-less name


def test_a_model_served_twice_or_never_is_unknown_and_says_why() -> None:
    with pytest.raises(UnknownDeployment, match="several deployments serve 'org/twin'"):
        find_deployment(DEPLOYED, "org/twin")
    with pytest.raises(UnknownDeployment, match=r"only similar names: \['sentiment"):
        find_deployment(DEPLOYED, "someone-else/sst2")


def test_summarization_flattens_generate_parameters_and_maps_the_truncation_strategy() -> None:
    body = {
        "inputs": "a text",
        "parameters": {
            "generate_parameters": {"max_new_tokens": 5, "num_beams": 2},
            "truncation": "longest_first",
            "clean_up_tokenization_spaces": True,
        },
    }
    request = split_request("summarization", body)
    assert request.params == {
        "max_new_tokens": 5,
        "num_beams": 2,
        "truncation": True,
        "clean_up_tokenization_spaces": True,
    }
    assert split_request(
        "translation", {"inputs": "x", "parameters": {"truncation": "do_not_truncate"}}
    ).params == {"truncation": False}
    with pytest.raises(InvalidRequest, match="given twice"):
        split_request(
            "translation",
            {
                "inputs": "x",
                "parameters": {"max_new_tokens": 1, "generate_parameters": {"max_new_tokens": 2}},
            },
        )
    with pytest.raises(InvalidRequest, match="truncation"):
        split_request("summarization", {"inputs": "x", "parameters": {"truncation": "only_second"}})


def test_feature_extraction_takes_its_parameters_at_the_root_and_refuses_pooling_options() -> None:
    request = split_request(
        "feature-extraction", {"inputs": "x", "truncate": True, "normalize": False}
    )
    assert request.params == {"truncation": True}
    with pytest.raises(InvalidRequest, match="normalize"):
        split_request("feature-extraction", {"inputs": "x", "normalize": True})
    with pytest.raises(InvalidRequest, match="dimensions"):
        split_request("feature-extraction", {"inputs": "x", "dimensions": 8})


def test_text_generation_maps_tgi_parameters_and_refuses_what_workers_cannot_do() -> None:
    request = split_request(
        "text-generation",
        {
            "inputs": "Hello",
            "parameters": {"max_new_tokens": 4, "stop": ["."], "details": True, "watermark": False},
            "stream": True,
        },
    )
    assert request.params == {"max_new_tokens": 4, "stop_strings": ["."], "return_full_text": False}
    assert request.stream and request.details and not request.full_text
    assert split_request("text-generation", {"inputs": "Hi"}).params == {"return_full_text": False}
    full = split_request(
        "text-generation", {"inputs": "Hi", "parameters": {"return_full_text": True}}
    )
    assert full.params == {"return_full_text": True} and full.full_text
    seeded = split_request("text-generation", {"inputs": "Hi", "parameters": {"seed": 1}})
    assert seeded.params == {"seed": 1, "return_full_text": False}
    with pytest.raises(InvalidRequest, match="top_n_tokens"):
        split_request("text-generation", {"inputs": "Hi", "parameters": {"top_n_tokens": 2}})
    with pytest.raises(InvalidRequest, match="one prompt"):
        split_request("text-generation", {"inputs": ["a", "b"], "stream": True})


def test_a_body_that_is_not_a_request_is_invalid_with_what_is_wrong() -> None:
    with pytest.raises(InvalidRequest, match='no "inputs"'):
        split_request("fill-mask", {"parameters": {}})
    with pytest.raises(InvalidRequest, match=r"unknown field\(s\) \['stream'\]"):
        split_request("fill-mask", {"inputs": "x", "stream": True})
    with pytest.raises(InvalidRequest, match="JSON object"):
        split_request("fill-mask", ["x"])
    with pytest.raises(InvalidRequest, match='"parameters" must be a JSON object'):
        split_request("fill-mask", {"inputs": "x", "parameters": [1]})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "inputs",
        "parameters",
        "stream",
        "options",
        "normalize",
        "truncate",
        "x",
        "generate_parameters",
    ]
)


@settings(max_examples=300, deadline=None)
@given(task=st.sampled_from(TASKS), body=_json | st.dictionaries(_keys, _json, max_size=4))
def test_any_json_body_is_a_request_or_an_invalid_request_never_another_error(
    task: str, body: Any
) -> None:
    try:
        split_request(task, body)
    except InvalidRequest:
        pass


def test_results_take_the_shapes_the_hugging_face_clients_parse() -> None:
    one, many = HFRequest("x"), HFRequest(["x", "y"], many=True)
    d = {"label": "POSITIVE", "score": 0.9}
    assert to_hf("sentiment-analysis", one, [d]) == [[d]]
    assert to_hf("text-classification", many, [d, d]) == [[d], [d]]
    assert to_hf("text-classification", many, [[d, d], [d, d]]) == [[d, d], [d, d]]
    zs = {"sequence": "x", "labels": ["a", "b"], "scores": [0.7, 0.3]}
    assert to_hf("zero-shot-classification", one, zs) == [
        {"label": "a", "score": 0.7},
        {"label": "b", "score": 0.3},
    ]
    assert to_hf("zero-shot-classification", many, [zs, zs])[1][0] == {"label": "a", "score": 0.7}
    ungrouped = [{"entity": "B-PER", "score": 0.5, "index": 1, "word": "a", "start": 0, "end": 1}]
    assert to_hf("ner", one, ungrouped)[0]["entity_group"] == "B-PER"
    gen = [{"generated_text": "Hello world"}]
    assert to_hf("text-generation", one, gen) == gen
    detailed = to_hf("text-generation", HFRequest("x", details=True), gen, {0: ["Hello", " w"]})
    assert detailed[0]["generated_text"] == "Hello world"
    assert set(detailed[0]["details"]) >= {"finish_reason", "generated_tokens", "tokens", "prefill"}
    # the streamed pieces, then what the result holds beyond them
    assert [t["text"] for t in detailed[0]["details"]["tokens"]] == ["Hello", " w", "orld"]
    full = HFRequest("Say", details=True, full_text=True)
    detailed = to_hf(
        "text-generation", full, [{"generated_text": "Say hi"}], {0: ["Sa", "y h", "i"]}
    )
    assert detailed[0]["generated_text"] == "Say hi"  # the prompt leads the text, not the tokens
    assert [t["text"] for t in detailed[0]["details"]["tokens"]] == [" h", "i"]
    assert to_hf("summarization", one, [{"summary_text": "s"}]) == [{"summary_text": "s"}]


def test_stream_events_end_with_the_generated_text_and_details_as_tgi() -> None:
    request = HFRequest("Hi", details=True, full_text=True, stream=True)
    first = stream_event(request, 0, " there")
    assert first["token"]["text"] == " there" and first["generated_text"] is None
    last = stream_event(request, 1, "!", final_text=" there!", prompt="Hi")
    assert last["generated_text"] == "Hi there!"
    assert set(last["details"]) == {"finish_reason", "generated_tokens", "input_length", "seed"}


def test_errors_carry_tgi_error_types_and_pipeq_s_own() -> None:
    body = tgi_error(InvalidRequest("bad", deployment="gen"))
    assert body == {
        "error": "bad",
        "error_type": "validation",
        "type": "InvalidRequest",
        "deployment": "gen",
    }
    assert tgi_error(Overloaded("full"))["error_type"] == "overloaded"
    assert tgi_error(JobFailed("boom", job_id="j"))["error_type"] == "generation"


def test_a_job_that_failed_answers_424_and_bad_input_422_with_tgi_s_body() -> None:
    from pipeq.serve.routes_hf import hf_error

    failed = hf_error(JobFailed("boom", job_id="j", deployment="gen"))
    assert failed.status_code == 424
    assert json.loads(bytes(failed.body)) == {
        "error": "boom",
        "error_type": "generation",
        "type": "JobFailed",
        "job_id": "j",
        "deployment": "gen",
    }
    assert hf_error(InvalidRequest("bad")).status_code == 422
    busy = hf_error(Overloaded("full"))
    assert busy.status_code == 429 and busy.headers["retry-after"]


# -- Hugging Face's clients against a real stack and gateway ------------------------------
TEXT = "I've been waiting for a HuggingFace course my whole life."
CONTEXT = "My name is Sylvain and I work at Hugging Face in Brooklyn"


@pytest.fixture(scope="module")
def hf(gateway: Any) -> Any:
    """huggingface_hub's InferenceClient for a deployment of the session's gateway. The
    session is offline for the Hub (HF_HUB_OFFLINE=1), which huggingface_hub applies to
    every URL, a gateway on loopback too: it is lifted for these calls only."""
    from huggingface_hub import InferenceClient, constants

    def client(deployment: str, key: str = "alice") -> InferenceClient:
        return InferenceClient(
            model=f"{gateway.url}/models/{deployment}", api_key=gateway.keys[key]
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield client


@pytest.fixture(scope="module")
def pipe(stack: Any) -> Any:
    """`pipeq.pipeline` for a deployment of the session's stack (the reference)."""
    from pipeq import Client, pipeline

    client = Client(stack.url)
    yield lambda task, deployment: pipeline(task, model=deployment, client=client, timeout=60)
    client.close()


def _plain(value: Any) -> Any:
    """huggingface_hub's output dataclasses (dicts holding None for the fields a task
    does not fill) as plain JSON values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_inference_client_classifies_text_as_the_pipeline_does(hf: Any, pipe: Any) -> None:
    got = hf("sentiment-analysis").text_classification(TEXT)
    assert_close(_plain(got), pipe("sentiment-analysis", "sentiment-analysis")(TEXT))
    got = hf("sentiment-analysis").text_classification(TEXT, top_k=2)
    assert_close(_plain(got), pipe("sentiment-analysis", "sentiment-analysis")(TEXT, top_k=2))


def test_inference_client_zero_shot_token_classification_and_fill_mask(hf: Any, pipe: Any) -> None:
    labels = ["education", "politics", "business"]
    got = hf("zero-shot-classification").zero_shot_classification(TEXT, candidate_labels=labels)
    want = pipe("zero-shot-classification", "zero-shot-classification")(
        TEXT, candidate_labels=labels
    )
    assert_close(
        _plain(got),
        [
            {"label": name, "score": s}
            for name, s in zip(want["labels"], want["scores"], strict=True)
        ],
    )
    got = hf("ner").token_classification(CONTEXT)
    want = pipe("ner", "ner")(CONTEXT, aggregation_strategy="simple")
    assert_close(_plain(got), want)
    assert all(e.entity_group for e in got)
    mask = "This course will teach you all about <mask> models."
    got = hf("fill-mask").fill_mask(mask, top_k=2)
    assert_close(_plain(got), pipe("fill-mask", "fill-mask")(mask, top_k=2))


def test_inference_client_answers_questions_summarizes_translates_and_extracts_features(
    hf: Any, pipe: Any
) -> None:
    import numpy as np

    got = hf("question-answering").question_answering(question="Where do I work?", context=CONTEXT)
    want = pipe("question-answering", "question-answering")(
        question="Where do I work?", context=CONTEXT
    )
    assert_close(_plain(got), want)
    gen = {"max_new_tokens": 6}
    got = hf("summarization").summarization(TEXT, generate_parameters=gen)
    assert _plain(got) == pipe("summarization", "summarization")(TEXT, max_new_tokens=6)[0]
    french = "Ce cours est produit par Hugging Face."
    got = hf("translation").translation(french, generate_parameters=gen)
    assert _plain(got) == pipe("translation", "translation")(french, max_new_tokens=6)[0]
    got = hf("feature-extraction").feature_extraction(TEXT)
    want = np.array(pipe("feature-extraction", "feature-extraction")(TEXT), dtype="float32")
    assert got.shape == want.shape and got.shape[0] == 1  # 1 x tokens x hidden
    assert np.allclose(got, want, atol=1e-5)


def test_inference_client_generates_text_as_from_tgi(hf: Any, pipe: Any) -> None:
    prompt = "In this course, we will teach you how to"
    reference = pipe("text-generation", "text-generation")
    # greedy: gpt2's config asks for sampling, which no two runs share
    greedy = {"max_new_tokens": 8, "do_sample": False}
    want = reference(prompt, return_full_text=False, **greedy)[0]["generated_text"]
    client = hf("text-generation")
    assert client.text_generation(prompt, **greedy) == want
    full = client.text_generation(prompt, return_full_text=True, **greedy)
    assert full == prompt + want
    detailed = client.text_generation(prompt, details=True, **greedy)
    assert detailed.generated_text == want and detailed.details is not None
    assert "".join(t.text for t in detailed.details.tokens) == want
    # TGI's stop sequences are transformers' stop_strings
    stop = want.split()[0]
    stopped = client.text_generation(prompt, stop=[stop], details=True, **greedy)
    reference_text = reference(prompt, return_full_text=False, stop_strings=[stop], **greedy)
    assert stopped.generated_text == reference_text[0]["generated_text"]
    assert len(stopped.generated_text) < len(want) and stopped.generated_text.endswith(stop)
    assert stopped.details.finish_reason == "stop_sequence"


def test_inference_client_streams_tokens_with_details_as_from_tgi(hf: Any, pipe: Any) -> None:
    prompt = "In this course, we will teach you how to"
    reference = pipe("text-generation", "text-generation")
    greedy = {"max_new_tokens": 12, "do_sample": False}
    want = reference(prompt, return_full_text=False, **greedy)[0]["generated_text"]
    client = hf("text-generation")
    events = list(client.text_generation(prompt, stream=True, details=True, **greedy))
    assert len(events) > 1  # token by token, not the text at once
    assert "".join(e.token.text for e in events) == want
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == want and events[-1].details is not None
    assert [e.index for e in events] == list(range(len(events)))
    pieces = list(client.text_generation(prompt, stream=True, **greedy))
    assert "".join(pieces) == want and all(isinstance(p, str) for p in pieces)


def test_a_bad_parameter_is_tgi_s_validation_error_and_streaming_still_works_after(
    hf: Any,
) -> None:
    from huggingface_hub.errors import ValidationError

    client = hf("text-generation")
    with pytest.raises(ValidationError, match="top_n_tokens"):
        client.text_generation("Hello", max_new_tokens=2, top_n_tokens=3)
    # a seeded sampled job: the same text again (its own generator, whatever its batch-mates)
    seeded = [client.text_generation("Hello", max_new_tokens=8, seed=3, do_sample=True)]
    seeded.append(client.text_generation("Hello", max_new_tokens=8, seed=3, do_sample=True))
    assert seeded[0] == seeded[1]
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.text_generation("Hello", max_new_tokens=0)
    # a 400 would have made the client drop these parameters and refuse to stream
    assert "".join(client.text_generation("Hello", max_new_tokens=3, stream=True))


def test_a_model_is_found_by_the_hub_id_its_deployment_serves(gateway: Any, hf: Any) -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    by_id = hf("distilbert/distilbert-base-uncased-finetuned-sst-2-english")
    assert by_id.text_classification(TEXT)[0].label
    assert hf("distilgpt2").text_generation("Hi", max_new_tokens=2)  # a deployment's name
    with pytest.raises(HfHubHTTPError, match="no deployment is named 'nobody/nothing'") as e:
        hf("nobody/nothing").text_classification(TEXT)
    assert e.value.response.status_code == 404
    # a key allowed only sentiment-analysis
    with pytest.raises(HfHubHTTPError) as e:
        hf("fill-mask", key="bob").fill_mask("a <mask> b")
    assert e.value.response.status_code == 403
    reply = httpx.post(
        f"{gateway.url}/models/feature-extraction/pipeline/feature-extraction",
        json={"inputs": "x"},
        headers=gateway.headers("alice"),
    )
    assert reply.status_code == 200 and len(reply.json()[0][0]) == 384
    reply = httpx.post(
        f"{gateway.url}/models/fill-mask",
        content=b'{"inputs": "a <mask> b", "parameters": {"top_k": NaN}}',
        headers=gateway.headers("alice"),
    )
    assert reply.status_code == 422 and reply.json()["error_type"] == "validation"


JS_DIR = Path(__file__).parent / "js"


@pytest.mark.xdist_group("stack")  # its fixtures come late (after the check for node)
def test_the_javascript_client_runs_three_tasks_as_the_pipeline_does(
    request: pytest.FixtureRequest,
) -> None:
    if not (JS_DIR / "node_modules" / "@huggingface" / "inference").is_dir():
        reason = "tests/js has no node_modules: run `npm ci` in tests/js (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    node = shutil.which("node")
    assert node, "node is not installed"
    gateway, pipe = request.getfixturevalue("gateway"), request.getfixturevalue("pipe")
    labels = ["education", "politics", "business"]
    calls = [
        {"fn": "textClassification", "deployment": "sentiment-analysis", "args": {"inputs": TEXT}},
        {
            "fn": "zeroShotClassification",
            "deployment": "zero-shot-classification",
            "args": {"inputs": TEXT, "parameters": {"candidate_labels": labels}},
        },
        {
            "fn": "questionAnswering",
            "deployment": "question-answering",
            "args": {"inputs": {"question": "Where do I work?", "context": CONTEXT}},
        },
        {"fn": "fillMask", "deployment": "nobody", "args": {"inputs": "a <mask>"}},
    ]
    for call in calls:
        call["url"] = f"{gateway.url}/models/{call.pop('deployment')}"
    ran = subprocess.run(
        [node, str(JS_DIR / "hf_client.mjs")],
        input=json.dumps(calls).encode(),
        capture_output=True,
        timeout=60,
        cwd=JS_DIR,
        env={**os.environ, "PIPEQ_KEY": gateway.keys["alice"]},
    )
    assert ran.returncode == 0, ran.stderr.decode()
    sentiment, zero_shot, qa, unknown = json.loads(ran.stdout)
    assert_close(sentiment["result"], pipe("sentiment-analysis", "sentiment-analysis")(TEXT))
    want = pipe("zero-shot-classification", "zero-shot-classification")(
        TEXT, candidate_labels=labels
    )
    pairs = zip(want["labels"], want["scores"], strict=True)
    assert_close(zero_shot["result"], [{"label": name, "score": s} for name, s in pairs])
    want = pipe("question-answering", "question-answering")(
        question="Where do I work?", context=CONTEXT
    )
    assert_close(qa["result"], want)
    assert unknown["status"] == 404 and "no deployment is named 'nobody'" in unknown["error"]


DEPLOYMENTS = [
    "sentiment-analysis",
    "zero-shot-classification",
    "ner",
    "fill-mask",
    "question-answering",
    "summarization",
    "translation",
    "feature-extraction",
    "text-generation",
]


@settings(max_examples=25, deadline=None)
@given(
    deployment=st.sampled_from(DEPLOYMENTS),
    body=_json | st.dictionaries(_keys, _json, max_size=4),
)
def test_any_body_to_a_model_route_is_answered_never_a_500_nor_a_traceback(
    gateway: Any, deployment: str, body: Any
) -> None:
    import httpx

    # encoded here: httpx's `json=` refuses infinities (the test failed, not the gateway);
    # Python's json writes them as `Infinity`, which the gateway must answer with a 422
    reply = httpx.post(
        f"{gateway.url}/models/{deployment}",
        content=json.dumps(body),
        headers={**gateway.headers("alice"), "content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200 or 400 < reply.status_code < 500, reply.text
    assert "Traceback" not in reply.text
    if reply.status_code != 200:
        assert isinstance(reply.json()["error"], str) and reply.json()["error_type"]


def test_inference_client_raises_an_http_error_naming_a_full_queue_or_no_worker(
    hf: Any, client: Any
) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    from .test_serve import ghost

    with ghost(client, "ghost-hf-full", live=True, max_queue_length=1):
        client.submit("ghost-hf-full", "x")  # the queue is full: nobody consumes it
        with pytest.raises(HfHubHTTPError, match=r"jobs wait already \(max_queue_length\)") as e:
            hf("ghost-hf-full").text_classification(TEXT)
    assert e.value.response.status_code == 429
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.json()["error_type"] == "overloaded"
    with ghost(client, "ghost-hf-gone", live=False):
        with pytest.raises(HfHubHTTPError, match="no worker is serving") as e:
            hf("ghost-hf-gone").text_classification(TEXT)
    assert e.value.response.status_code == 503 and e.value.response.headers["retry-after"]


def test_a_job_that_fails_in_its_pipeline_is_424_with_tgi_s_body(gateway: Any) -> None:
    import httpx

    # passes every check before the pipeline, whose generate() raises ValueError for it
    params = {"num_beams": 2, "num_return_sequences": 3, "max_new_tokens": 2}
    reply = httpx.post(
        f"{gateway.url}/models/text-generation",
        json={"inputs": TEXT, "parameters": params},
        headers=gateway.headers("alice"),
        timeout=60,
    )
    assert reply.status_code == 424, reply.text
    body = reply.json()
    assert body["error_type"] == "generation" and body["type"] == "JobFailed"
    assert "num_return_sequences" in body["error"]
    assert body["job_id"] and body["deployment"] == "text-generation"


def test_a_list_of_inputs_answers_a_list_in_the_task_s_shape(gateway: Any, pipe: Any) -> None:
    import httpx

    texts = [TEXT, "You monster!"]
    reply = httpx.post(
        f"{gateway.url}/models/sentiment-analysis",
        json={"inputs": texts},
        headers=gateway.headers("alice"),
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    want = pipe("sentiment-analysis", "sentiment-analysis")(texts)  # [{label, score}] x 2
    assert_close(reply.json(), [[w] for w in want])


def test_a_bad_key_and_a_key_over_its_rate_get_tgi_s_body_through_inference_client(
    gateway: Any, hf: Any
) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError, OverloadedError

    stranger = InferenceClient(model=f"{gateway.url}/models/sentiment-analysis", api_key="pq_x")
    with pytest.raises(HfHubHTTPError) as e:
        stranger.text_classification(TEXT)
    assert e.value.response.status_code == 401
    assert e.value.response.json()["error_type"] == "unauthorized"
    slow = hf("distilgpt2", key="slow")  # 1 request a second, 2 at once
    with pytest.raises(OverloadedError):
        for _ in range(4):
            slow.text_generation("Hi", max_new_tokens=1)
    time.sleep(2.5)  # the key's bucket full again for the tests after (it refills 1/s)


def test_a_stream_whose_job_is_cancelled_ends_with_tgi_s_error_event(gateway: Any) -> None:
    import httpx

    body = {
        "inputs": "In this course, we will teach you how to",
        "parameters": {"max_new_tokens": 1000, "do_sample": False},
        "stream": True,
    }
    with httpx.Client(base_url=gateway.url, headers=gateway.headers("alice"), timeout=60) as http:
        with http.stream("POST", "/models/text-generation", json=body) as reply:
            assert reply.status_code == 200
            job_id = reply.headers["x-pipeq-job-id"]
            lines = (line for line in reply.iter_lines() if line.startswith("data:"))
            first = json.loads(next(lines)[5:])
            assert first["index"] == 0 and first["generated_text"] is None
            cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            last = json.loads(list(lines)[-1][5:])
    assert last["error_type"] == "generation" and last["type"] == "JobCancelled"
    assert last["job_id"] == job_id
