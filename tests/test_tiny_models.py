"""Tests for pipeq.worker.tiny_models: every checkpoint loads and runs, builds are reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pipeq.worker import tiny_models  # noqa: E402

SEQ2SEQ = ("distilbart-cnn-12-6", "opus-mt-fr-en", "t5-small")
COURSE_SENTENCE = "I've been waiting for a HuggingFace course my whole life."
CONTEXT = "My name is Sylvain and I work at Hugging Face in Brooklyn."


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_models.build_all(path)
    return path


def _digests(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _pipe(root: pathlib.Path, name: str, task: str | None = None) -> Any:
    return transformers.pipeline(task or tiny_models.TINY_MODELS[name], model=str(root / name))


def test_registry_names_and_tasks() -> None:
    assert tiny_models.BENCH_SENTIMENT in tiny_models.TINY_MODELS
    assert tiny_models.TINY_MODELS["opus-mt-fr-en"] == "translation"
    assert tiny_models.TINY_MODELS["distilbert-base-cased-distilled-squad"] == "question-answering"
    assert (tiny_models.minilm_path() / "tokenizer.json").is_file()
    with pytest.raises(KeyError):
        tiny_models.build("no-such-model", "/nonexistent")


def test_builds_are_byte_identical(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # A different global RNG state must not matter: every weight is re-initialised.
    torch.manual_seed(12345)
    for name in ("t5-small", "opus-mt-fr-en", "distilroberta-base", "gpt2"):
        again = tiny_models.build(name, tmp_path)
        assert _digests(again) == _digests(root / name), name


def test_build_is_idempotent_and_atomic(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    name = "distilbert-base-cased"
    target = tiny_models.build(name, tmp_path)
    weights = target / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert tiny_models.build(name, tmp_path) == target
    assert weights.stat().st_mtime_ns == mtime
    # A temp dir left by a killed build is cleaned up once it is old.
    stale = tmp_path / f".{name}.tmp-killed"
    stale.mkdir()
    os.utime(stale, (0, 0))
    # An incomplete directory (no marker) is replaced by a complete build.
    (target / tiny_models.MARKER).unlink()
    weights.write_bytes(b"garbage")
    tiny_models.build(name, tmp_path)
    assert _digests(target) == _digests(root / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_models.main([str(tmp_path), "gpt2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"gpt2\ttext-generation\t{tmp_path / 'gpt2'}"


def test_text_classification(root: pathlib.Path) -> None:
    name = "distilbert-base-uncased-finetuned-sst-2-english"
    out = _pipe(root, name)([COURSE_SENTENCE, "I hate this so much!"])
    assert {result["label"] for result in out} <= {"NEGATIVE", "POSITIVE"}


def test_bench_sentiment_is_distilbert_base_size(root: pathlib.Path) -> None:
    pipe = _pipe(root, tiny_models.BENCH_SENTIMENT)
    assert 60e6 < pipe.model.num_parameters() < 70e6
    assert pipe(COURSE_SENTENCE)[0]["label"] in {"NEGATIVE", "POSITIVE"}


def test_zero_shot_classification(root: pathlib.Path) -> None:
    labels = ["education", "politics", "business"]
    out = _pipe(root, "bart-large-mnli")(
        "This is a course about the Transformers library", candidate_labels=labels
    )
    assert sorted(out["labels"]) == sorted(labels)
    assert sum(out["scores"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "distilgpt2", tiny_models.TP_GENERATOR])
def test_text_generation(root: pathlib.Path, name: str) -> None:
    pipe = _pipe(root, name)
    prompt = "In this course, we will teach you how to"
    assert pipe(prompt, max_new_tokens=5)[0]["generated_text"].startswith(prompt)
    sampled = pipe(prompt, max_length=30, num_return_sequences=2, do_sample=True)
    assert len(sampled) == 2


def test_fill_mask(root: pathlib.Path) -> None:
    pipe = _pipe(root, "distilroberta-base")
    out = pipe(f"This course will teach you all about {pipe.tokenizer.mask_token} models.", top_k=2)
    assert pipe.tokenizer.mask_token == "<mask>"
    assert len(out) == 2


def test_token_classification(root: pathlib.Path) -> None:
    pipe = _pipe(root, "bert-large-cased-finetuned-conll03-english")
    out = pipe(CONTEXT, aggregation_strategy="simple")
    assert pipe.tokenizer.is_fast
    assert all(entity["entity_group"] in {"MISC", "PER", "ORG", "LOC"} for entity in out)
    for entity in out:
        assert CONTEXT[entity["start"] : entity["end"]].lower() == entity["word"].lstrip("#")


def test_feature_extraction(root: pathlib.Path) -> None:
    out = _pipe(root, "distilbert-base-cased")("This is a simple test.")
    assert len(out[0][0]) == tiny_models.HIDDEN


def test_question_answering_auto_classes(root: pathlib.Path) -> None:
    path = root / "distilbert-base-cased-distilled-squad"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    assert type(model).__name__ == "DistilBertForQuestionAnswering"
    assert tokenizer.is_fast
    encoded = tokenizer("Where do I work?", CONTEXT, return_tensors="pt")
    assert "token_type_ids" not in encoded
    with torch.no_grad():
        out = model(**encoded)
    assert out.start_logits.shape == encoded["input_ids"].shape


@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_auto_classes(root: pathlib.Path, name: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / name)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(root / name)
    text = "Ce cours est produit par Hugging Face." if name == "opus-mt-fr-en" else CONTEXT
    assert model.generation_config.max_length == 32
    generated = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=8)
    assert generated.shape[1] <= 9
    assert tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def test_t5_task_specific_params(root: pathlib.Path) -> None:
    config = json.loads((root / "t5-small" / "config.json").read_text())
    params = config["task_specific_params"]
    assert params["translation_en_to_fr"]["prefix"] == "translate English to French: "
    assert params["summarization"]["prefix"] == "summarize: "
    assert (root / "t5-small" / "spiece.model").is_file()


def test_label_maps(root: pathlib.Path) -> None:
    def id2label(name: str) -> dict[str, str]:
        return dict(json.loads((root / name / "config.json").read_text())["id2label"])

    assert id2label("bart-large-mnli") == {"0": "contradiction", "1": "neutral", "2": "entailment"}
    conll = id2label("bert-large-cased-finetuned-conll03-english")
    assert conll == {str(k): v for k, v in tiny_models.CONLL_LABELS.items()}
