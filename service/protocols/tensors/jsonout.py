"""JSON answers written in pieces, for large and zero-size results.

orjson holds the interpreter lock for the whole of one ``dumps``; a 16-million-element answer in one
call holds it for about 0.1 s (more on a loaded machine), and a zero-size array of shape
(3000, 3000, 0) costs it 1.8 s and about 1 GB. Here an array is written as a list of byte pieces of
at most ``PIECE`` elements each (other threads, the event loop among them, run between pieces),
never joined into one buffer (the server sends them one after the other), and the nested empty
lists of a zero-size array are made by repeating strings, not by walking elements.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

__all__ = ["PIECE", "array_pieces", "result_pieces"]

PIECE = 1 << 16
_OPT = orjson.OPT_SERIALIZE_NUMPY


def _empty(shape: tuple[int, ...]) -> bytes:
    """The JSON text of an array of ``shape`` with a zero in it: nested lists, empty at the zero."""
    text = b"[]"
    for d in reversed(shape[: shape.index(0)]):
        text = b"[" + b",".join([text] * d) + b"]"
    return text


def array_pieces(a: np.ndarray) -> list[bytes]:
    """The JSON text of ``a`` (nested lists, ``a``'s shape) as pieces whose concatenation it is."""
    if a.ndim == 0:
        return [orjson.dumps(a[()], option=_OPT)]
    if a.size == 0:
        return [_empty(a.shape)]
    if a.size <= PIECE:
        return [orjson.dumps(np.ascontiguousarray(a), option=_OPT)]
    rows = a.shape[0]
    row = math.prod(a.shape[1:])
    out: list[bytes] = [b"["]
    if row > PIECE:  # one row is itself large: write each row in pieces
        for i in range(rows):
            if i:
                out.append(b",")
            out += array_pieces(a[i])
    else:
        step = max(1, PIECE // row)
        for i in range(0, rows, step):
            if i:
                out.append(b",")
            out.append(orjson.dumps(np.ascontiguousarray(a[i:i + step]), option=_OPT)[1:-1])
    out.append(b"]")
    return out


def result_pieces(fields: dict[str, Any], key: str, a: np.ndarray) -> list[bytes]:
    """``{**fields, key: a}`` as JSON pieces (``a`` last)."""
    head = orjson.dumps(fields)[:-1] + b',"' + key.encode() + b'":'
    return [head, *array_pieces(a), b"}"]
