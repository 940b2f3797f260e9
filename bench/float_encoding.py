"""What a feature-extraction result costs on the wire: today's JSON lists of floats
against the packed form (`pipeq._floats`: base64 of little-endian float32), side by side.

The values are a real model's hidden states (the demo's MiniLM, 384 wide) for texts of
about --tokens tokens, --items of them, as the worker would return them. For each form:
bytes stored in Redis, the worker's encode time (from the model's tensors to the stored
JSON string, as Celery's JSON serializer does it), the producer's decode time (from the
stored string to the nested lists `pipeline()` returns), and whether the lists are
identical to `tensor.tolist()`. Median of --rounds.

    .venv/bin/python bench/float_encoding.py --items 64 --tokens 128 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from statistics import median
from typing import Any

import torch
from kombu.utils.json import dumps, loads

from pipeq._floats import pack_float32, unpack


def hidden_states(items: int, tokens: int) -> list[torch.Tensor]:
    """One [1, tokens, hidden] float32 tensor per item, from the demo's real MiniLM."""
    from transformers import pipeline

    from pipeq.worker.tiny_models import minilm_path

    pipe = pipeline("feature-extraction", model=str(minilm_path()), device="cpu")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (tokens // 9 + 1))
    ids = pipe.tokenizer(text, truncation=True, max_length=tokens)["input_ids"]
    text = pipe.tokenizer.decode(ids[1:-1])
    outs = pipe([f"{i} {text}" for i in range(items)], return_tensors=True, batch_size=16)
    return [o.to(torch.float32).contiguous() for o in outs]


def as_json(outs: list[torch.Tensor]) -> str:
    return str(dumps([o.tolist() for o in outs]))


def as_packed(outs: list[torch.Tensor]) -> str:
    return str(
        dumps([pack_float32(o.numpy().astype("<f4").tobytes(), list(o.shape)) for o in outs])
    )


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    outs = hidden_states(args.items, args.tokens)
    want = [o.tolist() for o in outs]
    values = sum(o.numel() for o in outs)
    print(
        f"{args.items} items x {outs[0].shape[1]} tokens x {outs[0].shape[2]} = {values:,} values"
    )
    print(f"{'form':8} {'bytes':>13} {'B/value':>8} {'encode ms':>10} {'decode ms':>10} identical")
    for name, encode, decode in (
        ("json", as_json, loads),
        ("packed", as_packed, lambda s: unpack(loads(s))),
    ):
        enc, dec = [], []
        for _ in range(args.rounds):
            t, wire = timed(encode, outs)
            enc.append(t)
            t, got = timed(decode, wire)
            dec.append(t)
        same = got == want
        print(
            f"{name:8} {len(wire.encode()):>13,} {len(wire.encode()) / values:>8.2f} "
            f"{1000 * median(enc):>10.1f} {1000 * median(dec):>10.1f} {same}"
        )


if __name__ == "__main__":
    main()
