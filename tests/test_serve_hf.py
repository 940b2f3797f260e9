"""The Hugging Face inference format (`POST /models/{m}`): the shape conversions alone,
then Hugging Face's own clients against a real stack and gateway."""

from __future__ import annotations

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
    with pytest.raises(InvalidRequest, match="seed"):
        split_request("text-generation", {"inputs": "Hi", "parameters": {"seed": 1}})
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
    detailed = to_hf("text-generation", HFRequest("x", details=True), gen)
    assert detailed[0]["generated_text"] == "Hello world"
    assert set(detailed[0]["details"]) >= {"finish_reason", "generated_tokens", "tokens", "prefill"}
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
