"""A compact wire form for arrays of floats (feature-extraction's hidden states).

A token-level result is `items x tokens x hidden size` numbers. As JSON each float32
value takes about 21 bytes (its shortest repr as a double, and `, `); packed it takes
4 bytes, 5.3 in base64. A worker packs such an array into

    {"pipeq.float32": "<base64 of the values, little-endian float32>", "shape": [1, 7, 384]}

when the producer asked for it (pipeq's Client does, `packed=True` in the message), and
the Client unpacks it into the nested lists `pipeline()` returns. Every float32 value
(float16 and bfloat16 ones too) is a double exactly, and `array('f')` gives exactly that
double back: the lists are identical to the reference's, not close
(`bench/float_encoding.py` measures size and time against JSON; `tests/test_memory.py`
checks identity).

Light on purpose (no numpy): producers decode with the standard library's `array`.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

__all__ = [
    "ITEM_BYTES",
    "JSON_BYTES",
    "PACKED_BYTES",
    "PACKED_KEY",
    "is_packed",
    "pack_float32",
    "unpack",
]

PACKED_KEY = "pipeq.float32"
#: bytes a float takes in a stored result, for the producer's and the worker's estimates
#: of a result's size: packed (base64 of float32), and as JSON at most (its shortest
#: repr as a double, "-1.2345678901234567e-05", and ", "; 21.5 on average for MiniLM's
#: hidden states, bench/float_encoding.py), so that an estimate is never short of what
#: is stored; and a packed item's own keys and shape
PACKED_BYTES = 16 / 3
JSON_BYTES = 25.0
ITEM_BYTES = 64


def pack_float32(data: bytes, shape: list[int]) -> dict[str, Any]:
    """Little-endian float32 `data` of `shape` in its wire form."""
    return {PACKED_KEY: base64.b64encode(data).decode("ascii"), "shape": list(shape)}


def is_packed(value: Any) -> bool:
    return isinstance(value, dict) and PACKED_KEY in value and "shape" in value


def _nest(flat: list[float], shape: list[int]) -> Any:
    """A flat list in row-major order as nested lists of `shape`."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    rows: list[Any] = flat
    for size in reversed(shape[1:]):
        rows = [rows[i : i + size] for i in range(0, len(rows), size)]
    return rows


def _unpack_one(value: dict[str, Any]) -> Any:
    values = array("f")
    values.frombytes(base64.b64decode(value[PACKED_KEY]))
    if sys.byteorder == "big":
        values.byteswap()
    shape = [int(n) for n in value["shape"]]
    count = 1
    for n in shape:
        count *= n
    if count != len(values):
        raise ValueError(f"a packed array of shape {shape} holds {len(values)} values")
    return _nest(values.tolist(), shape)


def unpack(value: Any) -> Any:
    """`value` with every packed array in it replaced by its nested lists of floats, in
    place (a result is walked, not copied: a large result of records costs no second
    copy)."""
    if is_packed(value):
        return _unpack_one(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                value[key] = unpack(item)
    elif isinstance(value, list):
        if value and isinstance(value[0], int | float):
            return value  # numbers (an unpacked array): nothing packed inside
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                value[i] = unpack(item)
    return value
