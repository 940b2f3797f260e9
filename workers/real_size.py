"""The course's nine models at their real size, with random weights (`pipeq bench --real-size`).

Each architecture's ``config.json`` is copied from its Hugging Face Hub model into
``real_size/<name>.json`` next to this module (``_hub_id`` says which); no weights are
downloaded. A checkpoint ``<name>-real`` is that config with weights drawn as
``tiny_models.reinit_weights`` draws them, so its compute is the real model's; ``<name>-real-small``
is the same architecture, vocabulary and tokenizer with the layers of a tiny model (hidden size 32,
two layers), for a test that the real-size path keeps working.

Tokenizers, all with the real model's vocabulary size (so every id the model can produce decodes):

* BERT family (DistilBERT, BERT): bert-base-uncased's WordPiece (from the packaged MiniLM), the real
  tokenizer of the uncased models. The cased models (bert-large-cased, distilbert-base-cased) have a
  28,996-token cased vocabulary; they get this 30,522-token one, so their embedding tables are
  1,526 rows longer than the real ones, which costs no compute (a row lookup).
* RoBERTa, BART, GPT-2: byte-level BPE trained here on :data:`WORDS_EN` sentences and the tiny
  models' corpus, so that the benchmark's words are one token each as common English words are in
  the real vocabularies, then filler tokens up to the real size, special tokens at the real ids
  (RoBERTa/BART ``<s>=0 <pad>=1 </s>=2 <unk>=3``, ``<mask>`` last; GPT-2 ``<|endoftext|>`` last).
* Marian: a sentencepiece model trained on :data:`WORDS_FR` and :data:`WORDS_EN` sentences, with
  filler pieces up to 59,514 entries, ``<pad>`` last (59,513) as in opus-mt-fr-en.

Random weights never choose end-of-sequence, so generation runs to its length limit: the benchmark
sets output lengths a real model would produce (docs/batching.md, "Every task at its real size").
"""

from __future__ import annotations

import functools
import json
import pathlib
import random
from collections.abc import Sequence
from typing import Any

from pipeq.worker import tiny_models
from pipeq.worker.tiny_models import Spec

__all__ = ["REAL_SIZE", "SPECS", "WORDS_EN", "WORDS_FR", "checkpoint", "sentences"]

#: task -> the course's checkpoint (the file name of its config under real_size/)
REAL_SIZE: dict[str, str] = {
    "sentiment-analysis": "distilbert-base-uncased-finetuned-sst-2-english",
    "zero-shot-classification": "bart-large-mnli",
    "text-generation": "gpt2",
    "fill-mask": "distilroberta-base",
    "ner": "bert-large-cased-finetuned-conll03-english",
    "question-answering": "distilbert-base-cased-distilled-squad",
    "summarization": "distilbart-cnn-12-6",
    "translation": "opus-mt-fr-en",
    "feature-extraction": "distilbert-base-cased",
}
CANONICAL = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
}

#: English words of the benchmark's texts (news-like, with names for ner)
WORDS_EN = (
    "the a of to and in is was for on that with as by at from it his her their this "
    "said year new people government city company president report police market week "
    "first last two three million percent time world country minister state official "
    "court school health water energy price money team game season player club film music "
    "course model learn data train token text queue worker batch fast slow good bad great "
    "terrible movie story actor plot song happy sad love hate river mountain computer "
    "science language transformer attention layer network python code library research "
    "paper result experiment question answer according expected announced increase decline "
    "between during after before while under over against without however because although "
    "London Paris Berlin Washington Brooklyn California Europe China India Sarah John Maria "
    "Steve Jobs Apple Google Microsoft United Nations Hugging Face Reuters BBC Monday Friday"
).split()

#: French words of the translation texts
WORDS_FR = (
    "le la les un une des de du et à en dans pour sur avec par est sont était ont a "
    "nous vous ils elle il ce cette ces qui que pas plus très aussi mais comme tout "
    "année nouveau gouvernement ville entreprise président rapport police marché semaine "
    "premier dernier deux trois million pour cent temps monde pays ministre état cour école "
    "santé eau énergie prix argent équipe jeu saison joueur film musique cours modèle "
    "apprendre données texte rapide lent bon mauvais grand histoire acteur chanson heureux "
    "triste amour rivière montagne ordinateur science langue réseau recherche résultat "
    "question réponse selon annoncé hausse baisse entre pendant après avant sous contre "
    "Paris Londres Berlin France Europe Chine Inde Sarah Jean Marie lundi vendredi"
).split()

#: tiny sizes of `<name>-real-small`, per model type (the vocabulary stays the real one)
SMALL: dict[str, dict[str, Any]] = {
    "distilbert": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2},
    "bert": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "bart": {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "num_hidden_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64},
}
SMALL["roberta"] = SMALL["bert"]
SMALL["marian"] = SMALL["bart"]

#: generation settings of a config.json that go to generation_config.json (transformers 5
#: refuses them in the model's config)
_GENERATION_ONLY = (
    "bad_words_ids",
    "early_stopping",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beams",
)
#: the architectures that generate (their settings: generation_config.json)
_GENERATORS = ("ForConditionalGeneration", "LMHeadModel", "MTModel")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def sentences(words: Sequence[str], n: int, lo: int, hi: int, seed: int) -> list[str]:
    """n texts of `lo` to `hi` words drawn from `words`, each ending with a full stop (fixed
    seed: every run gets the same texts)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(lo, hi))) + "." for _ in range(n)]


def _training_text(words: Sequence[str]) -> list[str]:
    return [*tiny_models.CORPUS, *sentences(words, 400, 5, 30, seed=99)]


def config_path(name: str) -> pathlib.Path:
    return pathlib.Path(__file__).with_name("real_size") / f"{name}.json"


def _build(out: pathlib.Path, seed: int, name: str, small: bool) -> None:
    import transformers

    raw = json.loads(config_path(name).read_text("utf-8"))
    raw.pop("_hub_id")
    model_type = raw.pop("model_type")
    size = int(raw["vocab_size"])
    if model_type in ("distilbert", "bert"):
        kind = "DistilBertTokenizer" if model_type == "distilbert" else "BertTokenizer"
        raw["vocab_size"] = tiny_models._copy_minilm_tokenizer(out, kind)
    elif model_type in ("roberta", "bart"):
        kind = "RobertaTokenizer" if model_type == "roberta" else "BartTokenizer"
        positions = int(raw["max_position_embeddings"])
        tiny_models._roberta_tokenizer(
            out,
            kind,
            max_length=positions - 2 if model_type == "roberta" else positions,
            corpus=_training_text(WORDS_EN),
            trained=4000,
            size=size,
        )
    elif model_type == "gpt2":
        vocab = tiny_models._gpt2_tokenizer(
            out,
            max_length=int(raw["n_positions"]),
            corpus=_training_text(WORDS_EN),
            trained=4000,
            size=size,
        )
        assert vocab[tiny_models.GPT2_EOS] == raw["eos_token_id"], "GPT-2's <|endoftext|> id"
    elif model_type == "marian":
        vocab = tiny_models._marian_tokenizer(
            out,
            max_length=int(raw["max_position_embeddings"]),
            corpus=[
                *tiny_models.FRENCH,
                *tiny_models.ENGLISH,
                *sentences(WORDS_FR, 400, 5, 30, 98),
            ],
            trained=3000,
            size=size,
        )
        assert vocab["<pad>"] == raw["pad_token_id"], "Marian's <pad> id"
    else:
        raise ValueError(f"no tokenizer for model type {model_type!r}")
    if small:
        raw.update(SMALL[model_type])
    architecture = raw["architectures"][0]
    generation = None
    if architecture.endswith(_GENERATORS):
        generation = {k: raw[k] for k in (*_GENERATION_ONLY, *_TOKEN_IDS) if k in raw}
        for key, value in (raw.get("task_specific_params") or {}).get("summarization", {}).items():
            generation[key] = value
    for key in _GENERATION_ONLY:
        raw.pop(key, None)
    config = transformers.AutoConfig.for_model(model_type, **raw)
    model = getattr(transformers, architecture)(config)
    tiny_models._save_model(model, out, seed, generation)


def _specs() -> dict[str, Spec]:
    specs = {}
    for n, (task, name) in enumerate(REAL_SIZE.items()):
        canonical = CANONICAL.get(task, task)
        for suffix, small in (("-real", False), ("-real-small", True)):
            builder = functools.partial(_build, name=name, small=small)
            specs[f"{name}{suffix}"] = Spec(canonical, 2001 + n, builder)
    return specs


#: `<name>-real` and `<name>-real-small` for each of the course's checkpoints
SPECS: dict[str, Spec] = _specs()


def checkpoint(task: str, small: bool = False) -> str:
    """The name of the real-size (or small) checkpoint of `task`."""
    return REAL_SIZE[task] + ("-real-small" if small else "-real")


def build(task: str, root: str | pathlib.Path, small: bool = False) -> pathlib.Path:
    """Build (once) the checkpoint of `task` under `root`; its directory."""
    return tiny_models.build(checkpoint(task, small), root)


def hub_id(task: str) -> str:
    """The Hub model whose config a task's checkpoint copies."""
    data: dict[str, Any] = json.loads(config_path(REAL_SIZE[task]).read_text("utf-8"))
    return str(data["_hub_id"])
