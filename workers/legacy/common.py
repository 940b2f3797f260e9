"""The small helpers the legacy pipelines share: argument checks, device, input limit."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipeq.errors import InvalidRequest

#: tokenizer.model_max_length at or above this means "no limit" (transformers' VERY_LARGE_INTEGER)
VERY_LARGE = int(1e20)


def resolve_device(device: str) -> torch.device:
    if device == "cpu" or device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        return torch.device(device)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"`{name}` must be an integer, got {type_name(value)}")
    if value < minimum:
        raise InvalidRequest(f"`{name}` must be >= {minimum} (got {value})")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidRequest(f"`{name}` must be true or false, got {type_name(value)}")
    return bool(value)


def unknown_params(task: str, names: Iterable[str]) -> InvalidRequest:
    listed = ", ".join(f"`{n}`" for n in sorted(names))
    return InvalidRequest(f"unknown parameter(s) for {task}: {listed}")


def input_token_limit(tokenizer: Any, config: Any) -> int | None:
    """The smaller of tokenizer.model_max_length and config.max_position_embeddings, if set."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < VERY_LARGE:
        limits.append(tok_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
