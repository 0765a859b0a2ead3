"""JSON answers written in pieces, for large and zero-size results.

orjson holds the interpreter lock for the whole of one ``dumps``; a 16-million-element answer in one
call holds it for about 0.1 s (more on a loaded machine), and a zero-size array of shape
(3000, 3000, 0) costs it 1.8 s and about 1 GB. Here an array is written as a list of byte pieces of
at most ``PIECE`` elements each (other threads, the event loop among them, run between pieces),
never joined into one buffer (the server sends them one after the other), and the nested empty
lists of a zero-size array are made by repeating strings, not by walking elements: a few blocks of
at most ``BLOCK`` bytes, each made once and listed as often as it repeats, so that the 50 MB text of
shape (16777216, 0) costs about fifty list entries and a megabyte, made in a millisecond.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

__all__ = ["BLOCK", "PIECE", "array_pieces", "result_pieces"]

PIECE = 1 << 16
_OPT = orjson.OPT_SERIALIZE_NUMPY


#: The longest piece of a zero-size array's text (the answer is sent in pieces of at most 1 MiB).
BLOCK = 1 << 20


def _empty(shape: tuple[int, ...]) -> list[bytes]:
    """The JSON text of an array of ``shape`` with a zero in it (nested lists, empty at the zero), as
    pieces whose concatenation it is. Equal pieces are one object listed again (not copies)."""
    pieces = [b"[]"]
    for d in reversed(shape[: shape.index(0)]):
        pieces = _repeat(pieces, d)
    return pieces


def _repeat(inner: list[bytes], d: int) -> list[bytes]:
    """``[inner,inner,...,inner]`` (``d`` times) as pieces: a text of at most ``BLOCK`` bytes is made
    whole; a longer one as blocks of whole copies of ``inner`` (one block object, listed again), or,
    when ``inner`` is itself long, as ``inner``'s own pieces listed again."""
    if d == 0:
        return [b"[]"]
    if len(inner) == 1:
        one = inner[0]
        item = one + b","
        if len(item) * d + 1 <= BLOCK:
            return [b"[" + item * (d - 1) + one + b"]"]
        per = BLOCK // len(item)
        if per:  # blocks of `per` copies, each with its comma; the last copy ends the list instead
            whole, rest = divmod(d - 1, per)
            block = item * per
            return [b"[", *([block] * whole), item * rest + one + b"]"]
    out = [b"["]
    for i in range(d):
        if i:
            out.append(b",")
        out += inner
    out.append(b"]")
    return out


def array_pieces(a: np.ndarray) -> list[bytes]:
    """The JSON text of ``a`` (nested lists, ``a``'s shape) as pieces whose concatenation it is."""
    if a.ndim == 0:
        return [orjson.dumps(a[()], option=_OPT)]
    if a.size == 0:
        return _empty(a.shape)
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
