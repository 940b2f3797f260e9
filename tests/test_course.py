"""The Hugging Face course's chapter 1 calls, with their own arguments, through pipeq."""

from __future__ import annotations

from typing import Any

import pytest

from pipeq._stack import Stack
from pipeq.worker.demo import course_calls


def _check(task: str, result: Any) -> None:
    if task == "sentiment-analysis":
        assert all(len(r) == 1 and set(r[0]) == {"label", "score"} for r in result)
    elif task == "zero-shot-classification":
        for r in result:
            assert set(r) == {"sequence", "labels", "scores"}
            assert r["scores"] == sorted(r["scores"], reverse=True)
        assert len(result[1]["labels"]) == 4
    elif task == "text-generation":
        for r in result:  # num_return_sequences=2, sampling as gpt2's config asks
            assert len(r) == 2
            assert all(g["generated_text"].startswith("In this course") for g in r)
    elif task == "fill-mask":
        assert [len(r) for r in result] == [2, 10]
        assert all(set(x) == {"score", "token", "token_str", "sequence"} for x in result[0])
    elif task == "ner":
        assert all(set(e) == {"entity_group", "score", "word", "start", "end"} for e in result)
    elif task == "question-answering":
        for r in result:
            assert set(r) == {"score", "start", "end", "answer"}
        context = "My name is Sylvain and I work at Hugging Face in Brooklyn"
        assert context[result[0]["start"] : result[0]["end"]] == result[0]["answer"]
    elif task == "summarization":
        assert len(result) == 1 and set(result[0]) == {"summary_text"}
    elif task == "translation":
        assert len(result) == 1 and set(result[0]) == {"translation_text"}
    elif task == "feature-extraction":
        assert result.startswith("1 x ") and "x 384 floats" in result


@pytest.mark.parametrize(("task", "call"), course_calls(), ids=[t for t, _ in course_calls()])
def test_course_call_runs_as_written_through_the_queue(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, task: str, call: Any
) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", stack.url)  # the course's code names no client
    _check(task, call(None))
