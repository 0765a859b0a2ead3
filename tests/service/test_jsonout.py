"""JSON answers written in pieces equal orjson's text of the whole, for every shape, zero-size ones included."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.protocols.tensors.jsonout import PIECE, array_pieces, result_pieces


@pytest.mark.parametrize("shape", [(), (0,), (5,), (PIECE + 7,), (3, PIECE + 1), (PIECE // 3 + 5, 3), (2, 3, PIECE // 4),
                                   (4, 0), (3, 2, 0), (0, 5), (1, 2 * PIECE + 3), (7, 1, 1)])
def test_pieces_concatenate_to_the_json_of_the_whole(shape):
    a = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    text = b"".join(array_pieces(a))
    if a.size <= PIECE:
        whole = a[()] if a.ndim == 0 else a
        assert text == orjson.dumps(whole, option=orjson.OPT_SERIALIZE_NUMPY)  # the very same text
    assert np.array_equal(np.asarray(orjson.loads(text), np.float32).reshape(shape), a)
    if a.size > PIECE:
        assert len(array_pieces(a)) > 2  # really in pieces


def test_zero_size_answers_are_built_without_walking_elements():
    pieces = array_pieces(np.zeros((3000, 3000, 0), np.float32))
    text = b"".join(pieces)
    inner = 3000 * 2 + 2999 + 2  # [[],[],...,[]]
    assert len(text) == 3000 * inner + 2999 + 2
    assert text.startswith(b"[[[],[],") and orjson.loads(text)[2999][2999] == []


def test_result_pieces_put_the_array_last():
    a = np.arange(3, dtype=np.float64)
    doc = orjson.loads(b"".join(result_pieces({"surrogate": "s", "shape": [3]}, "grad", a)))
    assert doc == {"surrogate": "s", "shape": [3], "grad": [0.0, 1.0, 2.0]}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_no_element_is_written_longer_than_the_answer_estimate_allows(dtype):
    """The estimate's longest element (npy._MAX_JSON_ELEMENT) against the longest text the encoder
    writes: negative values with every significant digit at every decimal exponent, and the extremes."""
    from service.protocols.tensors.npy import _MAX_JSON_ELEMENT

    info = np.finfo(dtype)
    digits = {"float64": 17, "float32": 9, "float16": 5}[dtype]
    mantissa = -float("1." + "23456789012345678"[: digits - 1])
    top = int(np.log10(info.max))
    values = [mantissa * 10.0**e for e in range(int(np.log10(info.smallest_subnormal)), top)]
    values += [info.min, -info.tiny, -info.smallest_subnormal, -1 / 3, -2 / 3]
    a = np.array(values, dtype=np.float64).astype(dtype)
    as_written = a.astype(np.float32) if dtype == "float16" else a  # float16 is written through float32
    longest = max(len(orjson.dumps(np.array([v]), option=orjson.OPT_SERIALIZE_NUMPY)) - 2 for v in as_written)
    assert longest <= _MAX_JSON_ELEMENT[a.dtype.itemsize]
    assert longest >= _MAX_JSON_ELEMENT[a.dtype.itemsize] - 1  # the sweep reaches the longest texts
