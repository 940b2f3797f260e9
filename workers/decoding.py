"""Each request's own decoding inside transformers' continuous batch: a per-request draw step.

transformers' `ContinuousBatchingManager` decodes every request of a manager alike: one
`do_sample`, one list of logits processors, and draws from the process's global random
generator. pipeq's manager is greedy and holds one processor of its own, `DrawStep` (a
`ContinuousBatchingLogitsProcessor`, the manager's extension point), which runs after the
forward pass on each row that made a new token:

- a row of a plain greedy job is left as it is: the manager's argmax picks its token, as
  before (token for token what `generate()` gives);
- any other row goes through its job's own `LogitsProcessorList`, the one `generate()`
  builds from the job's generation config (`model._get_logits_processor`: repetition
  penalty, min_new_tokens, temperature, top-k, top-p, typical-p, min-p, ...), applied to
  that row with its own token history, as `generate()` applies it to a batch of one;
- a sampled row then draws its token from its own `torch.Generator` (seeded per request)
  and leaves only that token finite, so the manager's argmax takes the drawn token.

So a sampled request's text depends on its prompt, parameters and seed only, never on its
batch-mates; and since the draw is `torch.multinomial(softmax(scores), 1, generator=g)`
with `g` seeded with `seed`, it is what `transformers.set_seed(seed); pipe(prompt,
do_sample=True, ...)` gives in-process (checked in the tests on the tiny GPT-2).

`plan` decides per job whether the manager can serve it that way, on what changes
decoding (the generation mode, the logits processors `generate()` would build, its
stopping criteria, the prompt's form), never on which keys a generation config happens to
carry: `output_attentions: false` or `transformers_version` change nothing and are ignored.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)

from pipeq import _tasks

__all__ = ["Decoding", "DrawStep", "JobPlan", "install", "plan", "seed_of"]

#: parameters the continuous batch serves besides the generation config's
_SERVED = frozenset(
    {
        "return_full_text",
        "seed",
        "stop_strings",
        "num_return_sequences",
        "skip_special_tokens",
        "clean_up_tokenization_spaces",
        "continue_final_message",
    }
)
#: parameters that change how the pipeline builds the prompt or its result, which the
#: continuous batch does not reproduce (why, for the engine's record)
_ROUTED = {
    "prefix": "prefix",
    "handle_long_generation": "handle_long_generation",
    "truncation": "truncation",
    "tokenizer_encode_kwargs": "tokenizer_encode_kwargs",
    "return_tensors": "return_tensors",
    "return_text": "return_text",
    "stop_sequence": "stop_sequence",
    "documents": "documents (chat)",
    "tools": "tools (chat)",
    "max_time": "max_time (a wall-clock limit of one generate() call)",
}
#: logits processors that need more than one row's tokens and scores (the model, a batch,
#: the encoder's input, beams): a job that would use one goes to the dynamic batcher
_ROW_UNSAFE = (
    "ClassifierFreeGuidance",
    "HammingDiversity",
    "PrefixConstrained",
    "EncoderRepetitionPenalty",
    "EncoderNoRepeatNGram",
    "Watermark",
)


def seed_of(seed: int, sequence: int) -> int:
    """The seed of sequence `sequence` of a job seeded with `seed` (sequence 0: `seed`
    itself, so a job's first sequence is the one-sequence job's text)."""
    return (seed + sequence) % 2**64


@dataclass
class Decoding:
    """One request's decoding: its processors (empty: none), its generator (None:
    greedy), and the error a row raised (the driver fails the request with it)."""

    processors: LogitsProcessorList
    generator: torch.Generator | None = None
    error: BaseException | None = None

    @property
    def plain(self) -> bool:
        """Greedy with no processor: the manager's own argmax is the whole step."""
        return self.generator is None and not self.processors


@dataclass
class JobPlan:
    """How the manager serves a job: each item's prompt tokens, and what decodes them."""

    config: Any  # the job's GenerationConfig, as generate() would resolve it
    sample: bool
    seed: int | None
    sequences: int
    max_new_tokens: list[int]  # per item
    input_ids: list[list[int]]  # per item
    prompts: list[Any]  # per item: the string, or the chat (a list of messages)
    stop_strings: list[str] | None
    eos_token_id: Any
    full_text: bool
    continue_final: list[bool] = field(default_factory=list)  # per item (chats)
    decode_kwargs: dict[str, Any] = field(default_factory=dict)

    def decoding(self, model: Any, item: int, sequence: int) -> Decoding:
        """A new `Decoding` for sequence `sequence` of item `item` (its own processors:
        some hold per-request state; its own generator)."""
        # generate() sets the total length from the prompt's (processors such as forced
        # EOS read it)
        config = copy.copy(self.config)
        config.max_length = len(self.input_ids[item]) + self.max_new_tokens[item]
        processors = model._get_logits_processor(
            config,
            input_ids_seq_length=len(self.input_ids[item]),
            device=str(model.device),
        )
        generator = None
        if self.sample:
            assert self.seed is not None
            generator = torch.Generator(device=model.device)
            generator.manual_seed(seed_of(self.seed, sequence))
        return Decoding(processors, generator)


def plan(pipe: Any, items: list[Any], params: dict[str, Any]) -> JobPlan | str:
    """How the continuous batch serves `pipe(item, **params)` for each item, or why it
    cannot (a short reason: the job goes to the dynamic batcher)."""
    for key in params:
        if key in _ROUTED:
            return _ROUTED[key]
    tokenizer = pipe.tokenizer
    if not items:
        return "no input"
    chats = [isinstance(i, list) for i in items]
    if any(chats) and (
        not getattr(tokenizer, "chat_template", None)
        or getattr(tokenizer, "response_template", None) is not None
    ):
        return "a chat on a model without a plain chat template"
    if not all(isinstance(i, list) or (isinstance(i, str) and i) for i in items):
        return "an empty prompt"
    gen = {k: v for k, v in params.items() if k not in _SERVED}
    sequences = int(params.get("num_return_sequences") or 1)
    if sequences > 1:
        gen["num_return_sequences"] = sequences
    try:  # the settings `pipe(...)` would call generate() with
        prepared = pipe._prepare_generate_kwargs(gen)
        config, unused = pipe.model._prepare_generation_config(None, **prepared)
        # the special tokens' tensors some processors read, as generate() prepares them
        pipe.model._prepare_special_tokens(config, True, device=pipe.model.device, batch_size=1)
    except Exception as e:  # the reference says what is wrong with them
        return f"generation settings the reference refuses ({type(e).__name__})"
    if unused:
        return f"parameters generate() passes to the model: {sorted(unused)}"
    mode = str(getattr(config.get_generation_mode(), "value", ""))
    if mode not in ("greedy_search", "sample"):
        return f"{mode.replace('_', ' ')} (one row at a time only)"
    sample = mode == "sample"
    if sequences > 1 and not sample:
        return "several sequences without sampling (the reference refuses it)"
    if config.max_time is not None:
        return _ROUTED["max_time"]
    processors = pipe.model._get_logits_processor(config, input_ids_seq_length=1)
    unsafe = [
        type(p).__name__ for p in processors if any(u in type(p).__name__ for u in _ROW_UNSAFE)
    ]
    if unsafe:
        return f"logits processors that need more than a row: {unsafe}"
    input_ids, finals = [], []
    for item in items:
        if isinstance(item, list):
            final = _tasks.continues_final(item, params)
            ids = _tasks.chat_ids(tokenizer, item, final)
        else:
            final = False
            ids = tokenizer(item)["input_ids"]
        input_ids.append(list(ids))
        finals.append(bool(final))
    news = []
    for ids in input_ids:
        new = config.max_new_tokens
        if new is None:  # a total length, as generate() counts it
            new = int(config.max_length) - len(ids)
        if not ids or new < 1:  # generate() has its own ways with these
            return "no room for new tokens"
        news.append(int(new))
    seed = params.get("seed")
    if sample and seed is None:  # a producer that chose none: one now, recorded with the job
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    stops = params.get("stop_strings")
    decode: dict[str, Any] = {
        k: params[k] for k in ("skip_special_tokens", "clean_up_tokenization_spaces") if k in params
    }
    decode.setdefault("skip_special_tokens", True)
    return JobPlan(
        config=config,
        sample=sample,
        seed=int(seed) if seed is not None else None,
        sequences=sequences,
        max_new_tokens=news,
        input_ids=input_ids,
        prompts=list(items),
        stop_strings=[stops] if isinstance(stops, str) else stops,
        eos_token_id=config.eos_token_id,
        full_text=params.get("return_full_text") is not False,
        continue_final=finals,
        decode_kwargs=decode,
    )


class DrawStep(ContinuousBatchingLogitsProcessor):
    """The manager's one logits processor: each row's own processors and draw (module
    docstring). `rows` maps a request id to its `Decoding`; a row not in it is plain
    greedy. Runs in the manager's thread, between a batch's preparation and its argmax
    (the manager runs synchronously: `install` turns its asynchronous mode off)."""

    # none: rows are told apart by their request's id
    supported_kwargs: dict[str, type] = {}  # noqa: RUF012 (declared so by transformers)
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.rows: dict[str, Decoding] = {}
        self._step: list[tuple[Decoding | None, Any]] = []
        #: tensor parallel: the ranks' group and its rank 0 (the driver, whose rows these
        #: are), whose processed scores every rank takes, so that all pick the same token
        self.tp_group: Any = None
        self.tp_root = 0

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        """Called as the batch is prepared, rows in the order of the batch's logits."""
        self._step = [(self.rows.get(r.state.request_id), r.state) for r in requests_with_new_token]
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """scores: [rows, vocab] float32 logits; returns them with each non-plain row
        processed (and, sampled, reduced to its drawn token)."""
        for i, (decoding, state) in enumerate(self._step[: scores.size(0)]):
            if decoding is None or decoding.plain or decoding.error is not None:
                continue
            try:
                history = state.initial_tokens + state.generated_tokens
                ids = torch.tensor([history], dtype=torch.long, device=scores.device)
                row = decoding.processors(ids, scores[i : i + 1])  # type: ignore[arg-type]
                if decoding.generator is not None:
                    probs = torch.nn.functional.softmax(row, dim=-1)
                    token = torch.multinomial(probs, 1, generator=decoding.generator)
                    row = torch.full_like(row, -math.inf)
                    row[0, token[0, 0]] = 0.0
                scores[i] = row[0]
            except Exception as e:  # this request fails alone (the driver sees it)
                decoding.error = e
        if self.tp_group is not None:
            import torch.distributed as dist

            shared = scores.contiguous()
            dist.broadcast(shared, src=self.tp_root, group=self.tp_group)
            if shared.data_ptr() != scores.data_ptr():
                scores.copy_(shared)
        return scores


def install(manager: Any) -> DrawStep:
    """Put a `DrawStep` in a manager not started yet, as its only logits processor (a
    greedy manager has none of its own). Returns it."""
    draw = DrawStep()
    helper = getattr(manager, "distributed_helper", None)
    if helper is not None and helper.tp_size > 1:
        draw.tp_group, draw.tp_root = helper.tp_group, helper.tp_root_global_rank
    processors = manager.logit_processor
    processors.logits_processor = LogitsProcessorList([draw])
    processors.tensors_required = 1  # one row of the batch's argument tensor
    processors._retrieve_processors_kwargs()
    processors.do_processing = True
    return draw
