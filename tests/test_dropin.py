"""`pipeq.pipeline` is a drop-in for `transformers.pipeline`: the call forms users write
give what the reference gives (transformers 5; pipeq's own 4.57 pipelines for the three
tasks transformers 5 removed, themselves checked against 4.57's recorded outputs)."""

from __future__ import annotations

import threading
import types
from functools import cache
from typing import Any

import pytest

from pipeq import Client, InvalidRequest, UnknownDeployment, pipeline
from pipeq.worker.handlers import to_jsonable

from .conftest import assert_close


@cache
def reference(deployment: str, model: str) -> Any:
    """The deployment's model in-process: transformers' pipeline, or pipeq's 4.57 one."""
    from transformers import pipeline as hf_pipeline

    from pipeq._tasks import canonical_task
    from pipeq.worker.legacy import LEGACY_TASKS, load_legacy_pipeline

    task = {"distilgpt2": "text-generation"}.get(deployment, deployment)
    if canonical_task(task) in LEGACY_TASKS:
        return load_legacy_pipeline(task, model)
    return hf_pipeline(task, model=model)


def ref(deployments: dict[str, Any], name: str, *args: Any, **kwargs: Any) -> Any:
    return to_jsonable(reference(name, deployments[name].model)(*args, **kwargs))


def test_concurrent_single_translations_each_get_transformers_shape(
    client: Client, deployments: dict[str, Any]
) -> None:
    """Eight threads at once: each call's shape is what it sent, not its batch-mates'."""
    for task in ("translation", "summarization"):
        p = pipeline(task, client=client)
        texts = [f"Oui {i}." for i in range(8)]
        got: dict[int, Any] = {}

        def call(i: int, p: Any = p, texts: list[str] = texts, got: dict[int, Any] = got) -> None:
            got[i] = p(texts[i], max_length=6)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, text in enumerate(texts):
            assert_close(got[i], ref(deployments, task, text, max_length=6), tol=1e-5)
            assert isinstance(got[i], list) and len(got[i]) == 1


@pytest.mark.parametrize(
    ("task", "inputs", "params"),
    [
        ("translation", ["Oui."], {}),
        ("translation", ["Oui.", "Non, merci."], {}),
        ("summarization", ["A long text about a river."], {"max_length": 8}),
        ("fill-mask", ["It is <mask>."], {"top_k": 1}),
        ("fill-mask", ["It is <mask>.", "A <mask> day."], {"top_k": 2}),
        ("sentiment-analysis", ["a list of one"], {}),
        ("sentiment-analysis", ["a list of one"], {"top_k": 2}),
        ("zero-shot-classification", ["one"], {"candidate_labels": ["a", "b"]}),
        ("ner", ["My name is Sylvain."], {}),
        ("text-generation", ["Hello"], {"max_new_tokens": 2, "do_sample": False}),
        ("feature-extraction", ["Hi there."], {}),
        ("question-answering", [{"question": "Who?", "context": "Sylvain works here."}], {}),
    ],
)
def test_a_list_input_has_the_references_shape(
    client: Client, deployments: dict[str, Any], task: str, inputs: Any, params: dict[str, Any]
) -> None:
    want = ref(deployments, task, inputs, **params)
    assert_close(pipeline(task, client=client)(inputs, **params), want, tol=1e-5)
    assert_close(client.submit(task, inputs, **params).result(timeout=60), want, tol=1e-5)


def test_question_and_context_positionally(client: Client, deployments: dict[str, Any]) -> None:
    qa = pipeline("question-answering", client=client)
    want = ref(deployments, "question-answering", "Where do I work?", "I work in Brooklyn")
    assert_close(qa("Where do I work?", "I work in Brooklyn"), want, tol=1e-5)
    assert set(want) == {"score", "start", "end", "answer"}


def test_a_text_pair(client: Client, deployments: dict[str, Any]) -> None:
    classifier = pipeline("sentiment-analysis", client=client)
    pair = {"text": "a b", "text_pair": "c d"}
    assert_close(classifier(pair), ref(deployments, "sentiment-analysis", pair), tol=1e-5)
    assert_close(
        classifier([pair, "alone"]),
        ref(deployments, "sentiment-analysis", [pair, "alone"]),
        tol=1e-5,
    )


def test_batch_size_and_device_are_accepted_and_the_deployment_decides(
    client: Client, deployments: dict[str, Any]
) -> None:
    texts = ["one text", "another, longer text", "third"]
    want = ref(deployments, "sentiment-analysis", texts)
    p = pipeline("sentiment-analysis", device=0, client=client)
    assert_close(p(texts, batch_size=8), want, tol=1e-5)
    assert_close(pipeline("sentiment-analysis", batch_size=4, client=client)(texts), want, 1e-5)


def test_a_generator_gives_an_iterator_of_results_read_as_it_goes(
    client: Client, deployments: dict[str, Any]
) -> None:
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(600)]
    read = []

    def gen() -> Any:
        for t in texts:
            read.append(t)
            yield t

    out = pipeline("sentiment-analysis", client=client)(gen())
    assert isinstance(out, types.GeneratorType)
    first = next(out)
    assert len(read) < len(texts), "the whole generator was read before the first result"
    results = [first, *out]
    want = list(
        reference("sentiment-analysis", deployments["sentiment-analysis"].model)(t for t in texts)
    )
    assert_close(results, to_jsonable(want), tol=1e-5)


def test_model_tokenizer_and_task_on_the_producer(client: Client) -> None:
    p = pipeline("text-generation", model="distilgpt2", client=client)
    assert p.task == "text-generation"
    assert p.model == "distilbert/distilgpt2"  # what the local checkpoint stands in for
    assert p.deployment.name == "distilgpt2"
    q = pipeline("sentiment-analysis", client=client)
    from transformers import AutoTokenizer

    # the producer has transformers here: p.tokenizer is the model's own tokenizer
    local = pipeline("feature-extraction", client=client)
    assert (
        local.tokenizer("hello world")["input_ids"]
        == AutoTokenizer.from_pretrained(local.deployment.model)("hello world")["input_ids"]
    )
    assert q.model


@pytest.mark.parametrize(
    ("task", "params"),
    [
        ("text-generation", {"pad_token_id": 0, "eos_token_id": 647, "max_new_tokens": 3}),
        ("text-generation", {"bad_words_ids": [[5], [7, 8]], "max_new_tokens": 3}),
        ("text-generation", {"stop_strings": ["e"], "max_new_tokens": 6}),
        ("translation", {"return_tensors": True, "max_length": 6}),
        ("summarization", {"return_tensors": True, "max_length": 6}),
        ("summarization", {"stop_sequence": "the", "max_length": 8}),
        ("feature-extraction", {"return_tensors": True}),
    ],
)
def test_parameters_transformers_passes_through_are_accepted(
    client: Client, deployments: dict[str, Any], task: str, params: dict[str, Any]
) -> None:
    text = "Oui, merci." if task == "translation" else "Hello there friends"
    params = {**params, "do_sample": False} if task == "text-generation" else params
    got = pipeline(task, client=client)(text, **params)
    if "stop_strings" in params:  # transformers' own pipeline fails here (no tokenizer)
        assert got[0]["generated_text"].startswith(text)
        return
    assert_close(got, ref(deployments, task, text, **params), tol=1e-4)


def test_model_selection_is_exact(client: Client) -> None:
    with pytest.raises(UnknownDeployment, match="my-company/gpt2") as info:
        pipeline("text-generation", model="my-company/gpt2", client=client)
    assert "similar" in str(info.value)  # it lists the look-alikes, and serves none
    assert pipeline("text-generation", model="distilgpt2", client=client).deployment.name == (
        "distilgpt2"
    )
    assert (
        pipeline("text-generation", model="openai-community/gpt2", client=client).deployment.name
        == "text-generation"
    )
    assert (
        pipeline("translation", model="Helsinki-NLP/opus-mt-fr-en", client=client).deployment.name
        == "translation"
    )


def test_an_input_longer_than_the_model_is_a_clear_invalid_request(client: Client) -> None:
    classifier = pipeline("sentiment-analysis", client=client)
    with pytest.raises(InvalidRequest, match=r"1202 tokens long; the model takes at most 512"):
        classifier("This is an example " * 300)
    assert classifier("This is an example " * 300, truncation=True)[0]["label"]
    with pytest.raises(InvalidRequest, match="truncation=True"):
        pipeline("feature-extraction", client=client)("word " * 2000)
    with pytest.raises(InvalidRequest, match="tokenizer_kwargs"):
        pipeline("fill-mask", client=client)("word " * 2000 + "<mask>.")
    # zero-shot and ner cope with long inputs themselves (truncating): so does pipeq
    assert pipeline("ner", client=client)("This is an example " * 300) is not None


def test_summarization_with_max_length_below_the_models_min_length_proceeds(
    client: Client, deployments: dict[str, Any]
) -> None:
    """4.57 warned and generated (with distilbart-cnn, min_length 56, max_length=45 is
    the common call); so does pipeq."""
    text = "America has changed dramatically during recent years."
    got = pipeline("summarization", client=client)(text, max_length=5, min_length=10)
    assert_close(got, ref(deployments, "summarization", text, max_length=5, min_length=10))


def test_empty_translation_input_is_translated(client: Client, deployments: dict[str, Any]) -> None:
    t = pipeline("translation", client=client)
    assert_close(t(""), ref(deployments, "translation", ""))
    assert_close(t(["", "Oui."]), ref(deployments, "translation", ["", "Oui."]))
