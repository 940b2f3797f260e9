"""question-answering, summarization and translation pipelines for transformers 5.

transformers 5 removed these pipelines (and text2text-generation) but still loads their models
with ``AutoModelForQuestionAnswering`` and ``AutoModelForSeq2SeqLM``.  The classes here re-create
the transformers 4.57 pipelines on top of those models: the same call forms, the same parameters,
the same result shapes and the same semantics (answer-span search, overlapping windows over long
contexts, merge of the generation settings from the pipeline defaults, the model's
``generation_config``, ``config.task_specific_params`` and the call).  The logic is a rewrite of
transformers 4.57.6's ``pipelines/question_answering.py``, ``pipelines/text2text_generation.py``
and ``pipelines/base.py`` (Apache-2.0); ``tests/test_legacy_pipelines.py`` checks it against
outputs recorded from 4.57.6 itself.

What differs from 4.57, on purpose: two things.

* Summarization and translation inputs longer than the model accepts (the smaller of
  ``tokenizer.model_max_length`` and ``config.max_position_embeddings``) raise
  :class:`~pipeq.errors.InvalidRequest` naming the length and the limit unless the caller passes
  ``truncation=True`` (4.57 only logged a warning, then the model failed or misbehaved).
* A call whose ``max_new_tokens`` (plus the decoder's start token) or ``max_length`` is past the
  decoder's position embeddings (BART's, Marian's) raises InvalidRequest naming both (4.57
  warned, then failed with an IndexError once the decoder got there).

Everything 4.57 answered is answered the same way.  What 4.57 did not answer sensibly (a crash, an
obscure error from deep inside, or a result after a mere log warning) is refused up front with
:class:`~pipeq.errors.InvalidRequest` naming the field, so that no bad request can take a worker
down: a missing, ``None`` or non-string question or context (an empty one 4.57 refused too, and
a blank one it answered: so does pipeq), a question that leaves no room for the context in
``max_seq_len``, a ``doc_stride`` that does not fit in a window (a panic in ``tokenizers``),
windows longer than the model's positions, parameters of the wrong type or range,
parameters the task does not know (4.57 ignored them for question answering and failed inside
``generate`` otherwise), and generation modes transformers 5 moved to the Hub (group beam search,
contrastive search, DoLa, constrained beam search). A maximum length below the minimum is
not refused: 4.57 warned and stopped at the maximum, and so does pipeq.

Also worth knowing: results are plain JSON-able Python, so ``return_tensors=True`` gives the token
ids as a list of ints where 4.57 gave a tensor; question answering needs a fast
(``tokenizers``-backed) tokenizer, as it needs the offsets; ``batch_size`` and ``num_workers`` are
accepted but items run one at a time, as with 4.57's default ``batch_size=1`` (padding inputs into
batches would move the numbers slightly); generator inputs to question answering give a list.

Where things are: ``question_answering`` (with ``qa_inputs`` for its call forms and parameters and
``qa_spans`` for finding the answers in the context), ``summarization`` and ``translation`` (both
on ``text2text``, with ``text2text_params`` for a call's parameters and ``generation`` for 4.57's
generation settings), ``common`` for the small checks they share and ``loading`` for
:func:`load_legacy_pipeline`.
"""

from __future__ import annotations

from pipeq.worker.legacy.loading import LEGACY_TASKS, load_legacy_pipeline
from pipeq.worker.legacy.question_answering import QuestionAnsweringPipeline
from pipeq.worker.legacy.summarization import SummarizationPipeline
from pipeq.worker.legacy.translation import TranslationPipeline

__all__ = [
    "LEGACY_TASKS",
    "QuestionAnsweringPipeline",
    "SummarizationPipeline",
    "TranslationPipeline",
    "load_legacy_pipeline",
]
