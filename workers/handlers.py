"""Load a deployment's model once and run lists of items through it.

A handler wraps a `transformers.pipeline` (or, for the tasks transformers 5 removed,
pipeq's own `legacy` pipelines) behind one contract: `run(items, params)` takes a list
of items and returns, for each, exactly what `pipe(item, **params)` would return, as
plain JSON-able lists, dicts, strings and numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

from pipeq import _floats, _tasks
from pipeq._config import Deployment
from pipeq._tasks import DEFAULT_LIMITS
from pipeq.errors import InvalidRequest, JobTimeout, ModelLoadError
from pipeq.worker.batcher import BatchError, length_in_chars

__all__ = ["GENERATING", "Handler", "TimeLimitExceeded", "load_handler", "to_jsonable"]

#: tasks whose forward pass is `generate`, which stops at `max_time`
GENERATING = frozenset({"text-generation", "summarization", "translation"})
#: tasks whose batches can be pipelined (`Handler.stage`): transformers' own pipelines with
#: one forward pass, where tokenizing and post-processing cost as much as a GPU's forward
STAGED = frozenset(
    {
        "text-classification",
        "zero-shot-classification",
        "fill-mask",
        "token-classification",
        "feature-extraction",
    }
)


class TimeLimitExceeded(BatchError, JobTimeout):
    """A batch's generation reached the time limit: its output may be cut short."""


def to_jsonable(value: Any) -> Any:
    """numpy/torch scalars and arrays -> Python numbers and lists, recursively."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class Handler:
    """One model on one device, called with lists of items."""

    def __init__(self, deployment: Deployment, pipe: Callable[..., Any], native: bool) -> None:
        self.deployment = deployment
        self.task = deployment.canonical_task
        self.pipe = pipe
        self.native = native  # a transformers pipeline (takes batch_size)
        self._counter = _token_counter(pipe)
        #: feature-extraction: the width of each token's vector (set by `load_handler`)
        self.feature_width: int | None = None
        #: this process's GPU memory cap in bytes, None without (set by `placement.load`)
        self.gpu_memory_cap_bytes: int | None = None
        #: seconds the compiled model's warm-up took, None when not compiled (`placement`)
        self.warm_up_s: float | None = None
        #: summarization, translation: where their text streams (`Seq2SeqStreams`)
        self.streams: Any = None
        self._offset = 0  # the first item's place in the batch (`_seeded` runs one a time)

    def info(self) -> dict[str, Any]:
        """What producers need to know beyond the config (announced in Redis)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        info = self.deployment.to_dict()
        info["mask_token"] = getattr(tokenizer, "mask_token", None)
        if self.feature_width is not None:
            # producers size Client.map's messages by these, and ask for packed floats
            info["feature_width"] = self.feature_width
            info["max_tokens"] = self.max_tokens
            info["packs_floats"] = True
            # the OpenAI embeddings route pools token vectors the way the model was trained
            info["pooling"] = sentence_pooling(self.deployment.model, self.deployment.revision)
        # producers refuse a length no prompt can fit at submit (generating tasks)
        info["max_positions"] = self.max_positions
        return info

    def size(self, item: Any) -> int:
        """The item's length in tokens, which the batcher groups by (padding is per token);
        the batcher's length in characters when the model has no fast tokenizer."""
        if self._counter is None or not isinstance(item, str | dict):
            return length_in_chars(item)
        text = item if isinstance(item, str) else " ".join(str(v) for v in item.values())
        return len(self._counter.encode(text).ids)

    def run(
        self, items: list[Any], params: dict[str, Any], *, time_limit_s: float | None = None
    ) -> list[Any]:
        """What `pipe(item, **params)` returns for each item. Generation stops at
        `time_limit_s` (transformers' `max_time`) and then raises TimeLimitExceeded rather
        than return text cut short."""
        seed = params.get("seed")
        if "seed" in params:  # pipeq's: each item draws as if alone after set_seed(seed)
            params = {k: v for k, v in params.items() if k != "seed"}
        if self.task == "text-generation" and "stop_strings" in params:
            # generate() needs the tokenizer to find stop strings; transformers' pipeline
            # does not pass it (the call fails there), a producer cannot send one
            params = {**params, "tokenizer": self.pipe.tokenizer}  # type: ignore[attr-defined]
        if time_limit_s is None or self.task not in GENERATING:
            return self._seeded(items, params, seed)
        started = time.monotonic()
        max_time = min(time_limit_s, float(params.get("max_time") or time_limit_s))
        outs = self._seeded(items, {**params, "max_time": max_time}, seed)
        if max_time == time_limit_s and time.monotonic() - started >= time_limit_s:
            raise TimeLimitExceeded(
                f"generation stopped at job_timeout_s={time_limit_s} of its forward pass"
            )
        return outs

    def _seeded(self, items: list[Any], params: dict[str, Any], seed: int | None) -> list[Any]:
        """`_run`, or for a seeded job each item alone after `torch.manual_seed(seed)`:
        what `set_seed(seed); pipe(item, **params)` gives, and what continuous batching's
        per-request generator draws."""
        if seed is None:
            return self._run(items, params)
        import torch

        outs = []
        try:
            for n, item in enumerate(items):
                torch.manual_seed(seed)
                self._offset = n
                outs.extend(self._run([item], params))
        finally:
            self._offset = 0
        return outs

    def _run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        if self.task == "feature-extraction" and self.native:
            return self._features(items, params)
        if self.streams is not None and hasattr(self.pipe, "streamer_for"):
            return [self._streamed(k, item, params) for k, item in enumerate(items)]
        if self.task == "zero-shot-classification" and self.native:
            # a chunk pipeline: its batch_size counts (text, label) pairs, not texts; left
            # at 1 (a lone job: the pipeline's default), each label was a forward pass
            pairs = len(items) * _label_count(params.get("candidate_labels"))
            params = {**params, "batch_size": pairs}
        if len(items) == 1 or not self.native or _stops_per_row(self.task, params):
            # pipeq's own pipelines run items one at a time anyway, and a call with a list
            # reshapes the results of a list (4.57 flattens one-result lists): each item
            # gets exactly what `pipe(item)` gives, whatever shares its batch
            return [to_jsonable(self.pipe(item, **params)) for item in items]
        outs = self.pipe(items, **{"batch_size": len(items), **params})
        return self._shaped(items, params, outs)

    def _shaped(self, items: list[Any], params: dict[str, Any], outs: list[Any]) -> list[Any]:
        """A native pipeline's results of a list of `items`, each as `pipe(item)` gives it."""
        if self.task == "text-classification" and "top_k" not in params:
            # what pipe(one string) returns: its dict in a list (a text pair: the dict)
            outs = [[o] if isinstance(i, str) else o for i, o in zip(items, outs, strict=True)]
        if len(outs) != len(items):
            raise RuntimeError(f"pipeline returned {len(outs)} results for {len(items)} items")
        return [to_jsonable(o) for o in outs]

    def stage(self, items: list[Any], params: dict[str, Any]) -> Staged | None:
        """`run(items, params)` in three steps that may run on three threads (the
        batcher's pipelining): tokenized and padded now, `Staged.forward()` (the model, on
        the batcher thread), `Staged.finish()` (post-processing, on another thread): the
        same results. None where `run` takes another path: fewer than 2 items, a seed, a
        stream, generating tasks, pipeq's own pipelines."""
        if (
            len(items) < 2
            or not self.native
            or self.task not in STAGED
            or "seed" in params
            or self.streams is not None
        ):
            return None
        return Staged(self, items, params)

    @cached_property
    def finisher(self) -> Any:
        """A copy of the pipeline with a tokenizer of its own, for `Staged.finish` on a
        thread of its own (a tokenizer call resets its truncation and padding: two threads
        at once can fail with tokenizers' "Already borrowed")."""
        import copy

        pipe: Any = copy.copy(self.pipe)
        pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
        return pipe

    def _streamed(self, k: int, item: Any, params: dict[str, Any]) -> Any:
        """`pipe(item, **params)` of pipeq's seq2seq handlers, its text streamed a token
        at a time into the job's stream where generate() takes a streamer."""
        pipe: Any = self.pipe
        place = self._offset + k
        pipe.streamer_for = lambda decode: self.streams.streamer(place, pipe.tokenizer, decode)
        try:
            return to_jsonable(pipe(item, **params))
        finally:
            pipe.streamer_for = None

    def _features(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        """feature-extraction's hidden states, each item's in the packed wire form
        (`pipeq._floats`: 5.3 bytes a value where Python lists take 32 and JSON 21), so
        that a job's results wait for its last batch, and are encoded, in little memory;
        `unpack` gives exactly the lists `pipe(item)` returns."""
        outs = self.pipe(items, batch_size=len(items), **{**params, "return_tensors": True})
        return self._packed(items, params, outs, self.pipe.tokenizer)  # type: ignore[attr-defined]

    def _packed(
        self, items: list[Any], params: dict[str, Any], outs: list[Any], tokenizer: Any
    ) -> list[Any]:
        """`_features`' results from the pipeline's tensors `outs` (`tokenizer` measures
        each item, so that its padding is cut off)."""
        import torch

        if len(outs) != len(items):
            raise RuntimeError(f"pipeline returned {len(outs)} results for {len(items)} items")
        lengths = self._lengths(items, params, tokenizer) if len(items) > 1 else [None]
        left = getattr(tokenizer, "padding_side", "right") == "left"
        packed = []
        for out, n in zip(outs, lengths, strict=True):
            # a batch pads every item to the longest: cut that padding off, so a result
            # does not depend on its batch-mates
            if n is not None:
                out = out[:, -n:] if left else out[:, :n]
            if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                packed.append(to_jsonable(out))  # float64 is not float32: plain lists
                continue
            data = out.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
            packed.append(_floats.pack_float32(data.tobytes(), list(out.shape)))
        return packed

    def _lengths(self, items: list[Any], params: dict[str, Any], tok: Any) -> list[int]:
        """Each item's length in tokens as the pipeline tokenizes it (its truncation too)."""
        kwargs = dict(params.get("tokenize_kwargs") or {})
        if "truncation" in params:
            kwargs["truncation"] = params["truncation"]
        return [len(ids) for ids in tok(items, **kwargs)["input_ids"]]

    def result_bytes(self, items: list[Any], params: dict[str, Any], packed: bool) -> int:
        """The size of the stored result of `items` (bytes of JSON), estimated before the
        forward pass from what the model will make (`_made`)."""
        return self._made(items, params, packed)[0]

    def _made(self, items: list[Any], params: dict[str, Any], packed: bool) -> tuple[int, str]:
        """(bytes, what makes them) of the result of `items`, for the tasks whose result
        grows with more than the request: feature-extraction (tokens x `feature_width`
        floats, 5.3 bytes each packed, 25 as JSON lists), fill-mask (masks x top_k
        records, each repeating its text), token-classification (a record a token at
        most) and question-answering (top_k answers); (0, "") for the others, whose
        results the request's other limits bound."""
        n = len(items)
        if self.feature_width is not None:
            tokens = sum(self._tokens_made(item, params) for item in items)
            per_value = _floats.PACKED_BYTES if packed else _floats.JSON_BYTES
            size = int(tokens * self.feature_width * per_value) + n * _floats.ITEM_BYTES
            form = "packed float32" if packed else "JSON"
            return (
                size,
                f"{n} items, {tokens:,} tokens x {self.feature_width} values each, as {form}",
            )
        if self.task == "fill-mask":
            mask = getattr(getattr(self.pipe, "tokenizer", None), "mask_token", None) or "\0"
            targets = params.get("targets")
            k = len([targets] if isinstance(targets, str) else targets) if targets else None
            k = k or int(params.get("top_k") or 5)
            tokenizer = getattr(self.pipe, "tokenizer", None)
            k = min(k, len(tokenizer)) if tokenizer is not None else k  # no more than its words
            records = [max(1, str(i).count(mask)) * k for i in items]
            size = sum(
                r * (len(str(i)) + _RECORD_BYTES) for r, i in zip(records, items, strict=True)
            )
            return size, f"{sum(records):,} records (top_k={k} a mask), each with its text"
        if self.task == "token-classification":
            strided = params.get("stride") is not None
            tokens = sum(
                self._tokens_made(i, {} if strided else {"truncation": True}) for i in items
            )
            return tokens * _RECORD_BYTES, f"{tokens:,} tokens, up to a record each"
        if self.task == "question-answering":
            k = int(params.get("top_k") or 1)
            longest = int(params.get("max_answer_len") or 15) * 8
            return n * k * (_RECORD_BYTES + longest), f"{n} items x top_k={k} answers"
        return 0, ""

    def check_result(
        self, items: list[Any], params: dict[str, Any], packed: bool, where: str
    ) -> int:
        """The estimated size of the result of `items` (`result_bytes`); InvalidRequest,
        before any compute, where it is larger than the deployment's
        `limits.result_bytes`: it says the estimate, what makes it and the limit."""
        limit = self.deployment.limits.get("result_bytes", DEFAULT_LIMITS["result_bytes"])
        size, what = self._made(items, params, packed)
        if size <= limit:
            return size
        raise InvalidRequest(
            f"{where}: the result would be about {size:,} bytes ({what}); this deployment "
            f"stores at most {limit:,} a job (limits.result_bytes): ask for less a job "
            "(fewer or shorter inputs, a smaller top_k), or use Client.map, which sends "
            "a message for a few inputs"
        )

    def _tokens_made(self, item: Any, params: dict[str, Any]) -> int:
        """How many tokens the model sees of `item` (feature-extraction returns a vector
        each), truncated when `params` ask."""
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            text, pair = item["text"], item.get("text_pair")
        else:
            text, pair = str(item), None
        if self._counter is None:  # a token is at least a character, plus [CLS] [SEP]...
            tokens = len(text) + len(pair or "") + 4
        else:
            tokens = len(self._counter.encode(text, pair).ids)
        if _truncates(params):
            nested = params.get("tokenize_kwargs") or {}
            cap = nested.get("max_length") if isinstance(nested, dict) else None
            cap = cap if isinstance(cap, int) and cap > 0 else self.max_tokens
            tokens = min(tokens, cap) if cap else tokens
        return tokens

    def check_input(self, item: Any, params: dict[str, Any], where: str) -> None:
        """InvalidRequest for an input the model cannot take, before it reaches the batcher.

        Generating tasks: a prompt plus the tokens asked for past the model's positions
        (`max_positions`), named with the prompt's tokens, what was asked and the limit;
        for text-generation also what transformers itself refuses (a prompt not shorter
        than `max_length`). Other tasks: an input longer than the model takes, where the
        reference pipeline would fail on it with a tensor-shape error (text-classification,
        fill-mask, feature-extraction) and the call asks for no truncation. Tasks whose
        reference copes with long inputs (zero-shot truncates, ner truncates,
        question-answering windows) are left to it."""
        if self.task == "fill-mask":
            model = self.pipe.model  # type: ignore[attr-defined]
            top_k, vocab = params.get("top_k"), model.config.vocab_size
            if isinstance(top_k, int) and not params.get("targets") and top_k > vocab:
                # torch.topk's RuntimeError in the pipeline otherwise ("k out of range")
                raise InvalidRequest(
                    f"parameter 'top_k' is {top_k}; this model's vocabulary has {vocab} tokens"
                )
        if self.task == "text-generation":
            self._check_generation(item, params, where)
            return
        if self.task in ("summarization", "translation"):
            self._check_seq2seq(item, params, where)
            return
        limit = self.max_tokens
        if limit is None or self.task not in _LENGTH_CHECKED or _truncates(params):
            return
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            text, pair = item["text"], item.get("text_pair")
        else:
            return
        # a token is at least one byte: short texts cannot be over (no counting needed)
        size = len(text.encode("utf-8", "surrogatepass")) + len(str(pair or "").encode())
        if size + 4 <= limit or self._counter is None:
            return
        tokens = len(self._counter.encode(text, pair).ids)
        if tokens > limit:
            how = _TRUNCATE_HOW[self.task]
            raise InvalidRequest(
                f"{where} is {tokens} tokens long; the model takes at most {limit}: {how}"
            )

    @cached_property
    def max_positions(self) -> int | None:
        """The most tokens one generated sequence may hold, as `generate`'s max_length
        counts them: the prompt and the new tokens (decoder-only models: the smaller of
        the tokenizer's model_max_length and the model's positions), or the decoder's
        start token and the new tokens (encoder-decoder models with a table of decoder
        positions; None for T5's relative ones). None for tasks that do not generate."""
        if self.task in ("summarization", "translation"):
            return getattr(self.pipe, "max_output_tokens", None)
        if self.task != "text-generation":
            return None
        limits = [self.max_tokens]
        config = getattr(getattr(self.pipe, "model", None), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        limits.append(positions if isinstance(positions, int) and positions > 0 else None)
        known = [n for n in limits if n is not None]
        return min(known) if known else None

    def usage(self, items: list[Any], params: dict[str, Any], results: list[Any]) -> list[Any]:
        """text-generation: each item's token counts, `[prompt, [one count a sequence]]`
        (the prompt as `_prompt_tokens` counts it, None where it cannot; each sequence's
        new text re-tokenized without special tokens), for the OpenAI routes' `usage`."""
        out = []
        for item, result in zip(items, results, strict=True):
            prompt = self._prompt_tokens(item, params, None)
            full = params.get("return_full_text", True) is not False
            sequences = []
            for seq in result if isinstance(result, list) else [result]:
                text = seq.get("generated_text", "") if isinstance(seq, dict) else ""
                if isinstance(text, list):  # a chat: its new message last
                    text = text[-1].get("content", "") if text else ""
                elif full and isinstance(item, str) and text.startswith(item):
                    text = text[len(item) :]
                sequences.append(self._count(str(text), special=False))
            out.append([prompt, sequences])
        return out

    def _count(self, text: str, *, special: bool = True) -> int:
        """`text`'s tokens, counted without touching the pipeline's own tokenizer where
        it has a fast one (any thread may count)."""
        if self._counter is not None:
            return len(self._counter.encode(text, add_special_tokens=special).ids)
        tok = self.pipe.tokenizer  # type: ignore[attr-defined]
        return len(tok(text, add_special_tokens=special)["input_ids"])

    def _prompt_tokens(self, item: Any, params: dict[str, Any], new: int | None) -> int | None:
        """The tokens of a text-generation prompt as the pipeline feeds it to `generate`
        (its prefix, tokenizer arguments, truncation, chat template, `hole`); None when
        only the pipeline can tell (a chat without a template: it fails there)."""
        encode = dict(params.get("tokenizer_encode_kwargs") or {})
        tok = self.pipe.tokenizer  # type: ignore[attr-defined]
        if isinstance(item, str):
            text = str(params.get("prefix") or "") + item
            n = self._count(text, special=bool(encode.get("add_special_tokens", True)))
        elif getattr(tok, "chat_template", None):
            final = _tasks.continues_final(item, params)
            try:
                text = tok.apply_chat_template(
                    item,
                    tokenize=False,
                    add_generation_prompt=not final,
                    continue_final_message=final,
                    tools=params.get("tools"),
                    documents=params.get("documents"),
                )
            except Exception:  # the pipeline says why
                return None
            n = self._count(str(text), special=False)
        else:
            return None
        if _truncates({**params, **encode}):
            cap = encode.get("max_length") or params.get("max_length") or self.max_tokens
            n = min(n, int(cap)) if cap else n
        limit = getattr(tok, "model_max_length", None)
        if params.get("handle_long_generation") == "hole" and new is not None and limit:
            if n + new > limit:  # transformers keeps the prompt's last tokens that leave room
                if limit - new <= 0:
                    raise InvalidRequest(
                        f"inputs is {n} tokens long; handle_long_generation='hole' cannot "
                        f"leave room for max_new_tokens={new}: the model takes at most {limit}"
                    )
                n = limit - new
        return n

    def _check_generation(self, item: Any, params: dict[str, Any], where: str) -> None:
        tok = getattr(self.pipe, "tokenizer", None)
        if not isinstance(item, str) and tok is not None and not tok.chat_template:
            # transformers raises ValueError deep in the pipeline (a JobFailed, retried by
            # OpenAI's client as a 500): the model was not made for chats
            raise InvalidRequest(
                f"{where} is a chat, and this model's tokenizer has no chat template "
                "(GPT-2 and other base models ship none): send a text prompt instead"
            )
        limit = self.max_positions
        gen = {k: v for k, v in params.items() if k in _GENERATE_LENGTHS}
        try:  # the settings `pipe(...)` calls generate() with (the model's, the pipeline's)
            effective = self.pipe._get_set_generation_params(  # type: ignore[attr-defined]
                self.pipe._prepare_generate_kwargs(gen)  # type: ignore[attr-defined]
            )
        except Exception:  # the pipeline says why
            return
        new, max_length = effective.get("max_new_tokens"), effective.get("max_length")
        if not isinstance(max_length, int):
            max_length = 20  # GenerationConfig's default
        if isinstance(new, int):
            asked = f"max_new_tokens={new}"
        else:
            new = None
            origin = "" if "max_length" in params else " (the model's generation config)"
            asked = f"max_length={max_length}{origin}"
        n = self._prompt_tokens(item, params, new if new is not None else None)
        if n is None:
            return
        if new is None and n >= max_length:  # generate() raises ValueError for it
            raise InvalidRequest(
                f"{where} is {n} tokens long and {asked} leaves no room for new tokens: "
                "pass max_new_tokens"
            )
        total = n + new if new is not None else max_length
        if limit is not None and total > limit:
            raise InvalidRequest(
                f"{where} is {n} tokens long and asks for {asked}: {total} tokens; the model "
                f"takes at most {limit}: shorten the prompt or ask for fewer new tokens"
            )

    def _check_seq2seq(self, item: Any, params: dict[str, Any], where: str) -> None:
        """The input past the encoder's limit (unless truncated), the output past the
        decoder's: as the legacy pipeline refuses them in the forward pass, earlier."""
        check = getattr(self.pipe, "check_output_length", None)
        if not isinstance(item, str) or check is None:
            return
        n = self._count((getattr(self.pipe, "prefix", None) or "") + item)
        limit = getattr(self.pipe, "max_input_tokens", None)
        if isinstance(limit, int) and n > limit and not _truncates(params):
            raise InvalidRequest(
                f"{where} is {n} tokens long but the model takes at most {limit}; "
                "pass truncation=True to cut it to that length"
            )
        check(self.pipe.generation_config(params), n, where)  # type: ignore[attr-defined]

    @cached_property
    def max_tokens(self) -> int | None:
        """The most tokens the model takes: the tokenizer's model_max_length when it is
        set (not transformers' 'no limit'), else the model's position embeddings."""
        tok = getattr(self.pipe, "tokenizer", None)
        length = getattr(tok, "model_max_length", None)
        if isinstance(length, int) and 0 < length < 10**6:
            return length
        config = getattr(getattr(self.pipe, "model", None), "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


#: a record of fill-mask, ner or question-answering without its text (keys, a score)
_RECORD_BYTES = 120

_LENGTH_CHECKED = frozenset({"text-classification", "fill-mask", "feature-extraction"})
_TRUNCATE_HOW = {
    "text-classification": "shorten it, or pass truncation=True to cut it to that length",
    "feature-extraction": "shorten it, or pass truncation=True to cut it to that length",
    "fill-mask": "shorten it, or pass tokenizer_kwargs={'truncation': True} to cut it",
}
#: the generation settings that decide how long a generated sequence may grow
_GENERATE_LENGTHS = frozenset(
    {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "num_beams"}
)


class Staged:
    """A batch of a native pipeline in its three steps, as `pipe(items, batch_size=n)` runs
    them (transformers' `Pipeline.get_iterator`: `preprocess` of each item, padded into
    one batch by `pad_collate_fn`; `forward`; unbatched and `postprocess`ed), so that
    each may run on its own thread. Made by `Handler.stage`, which tokenizes and pads."""

    def __init__(self, handler: Handler, items: list[Any], params: dict[str, Any]) -> None:
        from torch.utils.data import DataLoader
        from transformers.pipelines.base import ChunkPipeline, pad_collate_fn
        from transformers.pipelines.pt_utils import PipelineChunkIterator, PipelineDataset

        pipe: Any = handler.pipe
        self.handler, self.items, self.params = handler, items, params
        call = dict(params)
        n = len(items)
        if handler.task == "zero-shot-classification":  # as `_run`: pairs, not texts
            n *= _label_count(params.get("candidate_labels"))
        if handler.task == "feature-extraction":
            call["return_tensors"] = True
        pre, self._forward_params, post = pipe._sanitize_parameters(**call)
        pre = {**pipe._preprocess_params, **pre}
        self._forward_params = {**pipe._forward_params, **self._forward_params}
        self._post_params = {**pipe._postprocess_params, **post}
        self._chunked = isinstance(pipe, ChunkPipeline)
        dataset = (PipelineChunkIterator if self._chunked else PipelineDataset)(
            items, pipe.preprocess, pre
        )
        extractor = pipe.feature_extractor or pipe.image_processor
        collate = pad_collate_fn(pipe.tokenizer, extractor)  # type: ignore[no-untyped-call]
        self._size = n
        self._batches = list(DataLoader(dataset, batch_size=n, collate_fn=collate))
        self._outputs: list[Any] = []

    def forward(self) -> None:
        """The model's forward pass(es) of the batch (the thread that owns the model)."""
        pipe: Any = self.handler.pipe
        self._outputs = [pipe.forward(b, **self._forward_params) for b in self._batches]
        self._batches = []

    def finish(self) -> list[Any]:
        """Each item's result, as `Handler.run` gives it, from the forward's outputs, by a
        copy of the pipeline with a tokenizer of its own (`Handler.finisher`): a tokenizer
        is not to be used by two threads at once."""
        from transformers.pipelines.pt_utils import PipelineIterator, PipelinePackIterator

        pipe = self.handler.finisher
        unbatch: Any = PipelinePackIterator if self._chunked else PipelineIterator
        unbatched = unbatch(self._outputs, _same, {}, loader_batch_size=self._size)
        post: Any = PipelineIterator
        outs = list(post(unbatched, pipe.postprocess, self._post_params))
        self._outputs = []
        if self.handler.task == "feature-extraction":
            return self.handler._packed(self.items, self.params, outs, pipe.tokenizer)
        return self.handler._shaped(self.items, self.params, outs)


def _same(value: Any) -> Any:
    return value


def _stops_per_row(task: str, params: dict[str, Any]) -> bool:
    """A stopping criterion that ends one row of a batch and not the others (stop
    strings): `generate()` masks a finished row with the pad token only where the model
    has an end-of-sequence token; without one the row goes on generating in a shared
    batch, and its text differs from the item run alone. Such items run alone."""
    return task in GENERATING and bool(params.get("stop_strings"))


def _label_count(labels: Any) -> int:
    """How many labels a zero-shot call's `candidate_labels` holds, as transformers parses
    them (a string: comma-separated), at least 1."""
    if isinstance(labels, str):
        labels = [x for x in labels.split(",") if x.strip()]
    return max(1, len(labels) if isinstance(labels, list | tuple) else 1)


def _truncates(params: dict[str, Any]) -> bool:
    """The call asks the tokenizer to cut long inputs itself."""
    nested = params.get("tokenize_kwargs") or params.get("tokenizer_kwargs") or {}
    flag = params.get("truncation", nested.get("truncation") if isinstance(nested, dict) else None)
    return flag not in (None, False, "do_not_truncate")


def _token_counter(pipe: Any) -> Any:
    """A copy of the pipeline's fast tokenizer, to count tokens in any thread without
    touching the pipeline's own (each call of which resets its truncation and padding)."""
    backend = getattr(getattr(pipe, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter


#: sentence-transformers' Pooling config keys -> pipeq's pooling modes (the first set wins)
_ST_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
}


def sentence_pooling(model: str, revision: str | None = None) -> dict[str, Any]:
    """How a model's sentence-transformers config pools token vectors into one:
    `{"mode": "mean" | "cls" | "max" | "lasttoken", "normalize": bool}` (its Pooling
    module's config, and whether a Normalize module follows), and `"max_seq_length"`: the
    tokens sentence-transformers keeps of an input (sentence_bert_config.json), where it
    says; mean, not normalized, for a model without one."""
    import json

    from transformers.utils.hub import cached_file

    found: dict[str, Any] = {"mode": "mean", "normalize": False}

    def read(name: str) -> Any:
        path = cached_file(
            model, name, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if not path:
            return None
        with open(path) as f:
            return json.load(f)

    try:
        modules = read("modules.json") or []
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith("Pooling"):
                config = read(f"{module.get('path', '')}/config.json".lstrip("/")) or {}
                modes = [m for key, m in _ST_POOLING.items() if config.get(key)]
                found["mode"] = modes[0] if modes else "mean"
            elif kind.endswith("Normalize"):
                found["normalize"] = True
        if modules:  # sentence-transformers cuts inputs at its own length, often the shorter
            length = (read("sentence_bert_config.json") or {}).get("max_seq_length")
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                found["max_seq_length"] = length
    except Exception:  # no config to read (or an odd one): mean pooling
        return {"mode": "mean", "normalize": False}
    return found


def _device_for_torch(device: str) -> str:
    # `pipeq worker` narrows CUDA_VISIBLE_DEVICES to the one GPU, which is then cuda:0
    return "cuda:0" if device.startswith("cuda") else "cpu"


def load_handler(deployment: Deployment) -> Handler:
    """Load the model; ModelLoadError says why it could not be loaded."""
    from pipeq.worker.placement import model_kwargs

    task = deployment.canonical_task
    device = _device_for_torch(deployment.device)
    try:
        if task in ("question-answering", "summarization", "translation"):
            from pipeq.worker.legacy import load_legacy_pipeline

            pipe = load_legacy_pipeline(
                deployment.task,
                deployment.model,
                revision=deployment.revision,
                device=device,
                **model_kwargs(deployment),
            )
            return Handler(deployment, pipe, native=False)
        from transformers import pipeline

        kwargs = model_kwargs(deployment)  # dtype, trust_remote_code, attn_implementation
        attn = kwargs.pop("attn_implementation", None)
        loading: dict[str, Any] = {"attn_implementation": attn} if attn else {}
        if deployment.tensor_parallel > 1:
            # this rank's shard (tensor_parallel.py: the process group is joined), on the
            # device transformers binds the rank to
            loading["tp_plan"] = "auto"
        else:
            kwargs["device"] = device
        pipe = pipeline(
            task,  # type: ignore[call-overload]
            model=deployment.model,
            revision=deployment.revision,
            model_kwargs=loading or None,
            **kwargs,
        )
    except Exception as e:  # any failure to load is reported the same way
        raise ModelLoadError(
            f"could not load {deployment.model!r} for {deployment.task}: {type(e).__name__}: {e}",
            deployment=deployment.name,
        ) from e
    tok = pipe.tokenizer
    if task == "text-generation" and tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; decoder-only pads left
        tok.padding_side = "left"
    handler = Handler(deployment, pipe, native=True)
    if task == "feature-extraction":
        # the width of what the pipeline returns (a model with a head returns its logits),
        # measured once: what a job's result size is estimated with
        handler.feature_width = int(pipe("a", return_tensors=True).shape[-1])
    return handler
