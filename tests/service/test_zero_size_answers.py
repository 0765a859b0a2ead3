"""Zero-size results answered as JSON: nested empty lists, exactly the text of the standard library's
``json`` for ``np.zeros(shape).tolist()``, written as a few shared blocks (a bounded amount of memory
whatever the number of empty lists), and within the estimate the request reserves for its answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import App, npy, npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.protocols.tensors.jsonout import BLOCK, array_pieces, result_pieces
from service.protocols.tensors.npy import answer_bytes

NPY = "application/x-npy"
NPZ = "application/x-npz"


def reference(shape: tuple[int, ...]) -> bytes:
    """The JSON text of an array of ``shape``, by the standard library (no spaces)."""
    return json.dumps(np.zeros(shape).tolist(), separators=(",", ":")).encode()


SHAPES = [(0,), (3, 0), (0, 5), (2, 0, 3), (3, 4, 0), (1, 1, 0), (5, 1, 0, 7), (1,) * 7 + (0,),
          # texts past one block, at every level: one long list, a long list of short ones, short lists of long ones
          (BLOCK // 3 + 1, 0), (BLOCK // 3 - 1, 0), (3, BLOCK // 3, 0), (BLOCK // 4, 3, 0), (2, 2, 2, BLOCK // 5, 0),
          (2, 3, BLOCK // 7, 0, 4), (700_001, 0)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_zero_size_pieces_are_the_json_of_the_nested_lists(shape):
    pieces = array_pieces(np.zeros(shape, np.float64 if len(shape) % 2 else np.float32))
    text = b"".join(pieces)
    assert text == reference(shape)
    assert max(len(p) for p in pieces) <= BLOCK  # every piece is bounded


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(before=st.lists(st.integers(0, 40), max_size=4), after=st.lists(st.integers(0, 5), max_size=3))
def test_any_zero_size_shape_is_the_json_of_its_nested_lists(before, after):
    shape = (*before, 0, *after)
    assert b"".join(array_pieces(np.zeros(shape, np.float32))) == reference(shape)


def text_length(shape: tuple[int, ...]) -> int:
    """The length of the JSON text of a zero-size array, counted by hand: a list of ``d`` items is its two
    brackets, its items and ``d - 1`` commas; the list at the zero dimension is ``[]``."""
    if shape[0] == 0:
        return 2
    d = shape[0]
    return 2 + d * text_length(shape[1:]) + d - 1


def unique_bytes(pieces: list[bytes]) -> int:
    """The memory the pieces hold: each distinct object counted once."""
    return sum(len(p) for p in {id(p): p for p in pieces}.values())


@pytest.mark.parametrize("shape", [(16_777_216, 0), (2, 8_388_608, 0), (4096, 4096, 0), (8, 8, 8, 8, 8, 8, 8, 0)],
                         ids=str)
def test_a_huge_zero_size_answer_holds_a_few_blocks_not_its_whole_text(shape):
    pieces = array_pieces(np.zeros(shape, np.float32))
    length = sum(len(p) for p in pieces)
    assert length == text_length(shape)
    assert unique_bytes(pieces) <= 4 * BLOCK  # the text is tens of megabytes; what is held, a few blocks
    assert len(pieces) <= 4 * length // BLOCK + 16


def test_a_huge_zero_size_text_is_right_in_every_piece():
    n = 16_777_216
    pieces = array_pieces(np.zeros((n, 0), np.float32))
    text = b"".join(pieces)
    assert len(text) == 3 * n + 1  # n times "[]", n - 1 commas, the outer brackets
    assert text == b"[" + b"[]," * (n - 1) + b"[]]"


@pytest.mark.parametrize("shape", SHAPES + [(16_777_216, 0), (2, 8_388_608, 0), (4096, 4096, 0)], ids=str)
def test_the_answer_estimate_counts_the_text_of_the_empty_lists(shape):
    fields = {"surrogate": "piecewise_quadratic", "dtype": "float64", "shape": list(shape)}
    answer = sum(len(p) for p in result_pieces(fields, "grad", np.zeros(shape)))
    estimate = answer_bytes(shape, 8, json=True)
    assert answer <= estimate <= 1.1 * answer + 512


# -- through the app --------------------------------------------------------------------------------------------------


def envelope(op: str, shape: tuple[int, ...], dtype: str = "float32", surrogate: str = "piecewise_quadratic") -> bytes:
    """The whole JSON answer of one zero-size result, by the standard library."""
    doc = {"surrogate": surrogate, "dtype": dtype, "shape": list(shape), op: np.zeros(shape).tolist()}
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.anyio
@pytest.mark.parametrize("op", ["spike", "grad"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 0, 3), (1025, 0), (3, 500, 0), (BLOCK // 3 + 1, 0)], ids=str)
async def test_npy_zero_size_requests_answered_as_json_are_the_json_of_the_nested_lists(op, shape):
    async with App() as a:
        r = await a.client.post(f"/v1/{op}", content=npy(np.zeros(shape, np.float32)),
                                headers={"content-type": NPY, "accept": "application/json"})
        assert r.status_code == 200, r.text
        assert r.content == envelope(op, shape)
        assert int(r.headers["content-length"]) == len(r.content)


@pytest.mark.anyio
async def test_zero_size_jobs_in_a_list_and_in_an_npz_are_the_json_of_the_nested_lists():
    async with App() as a:
        shapes = [(2000, 0), (3, 0), (4, 700, 0)]
        r = await a.client.post("/v1/grad", json=[{"x": np.zeros(s).tolist()} for s in shapes])
        assert r.status_code == 200, r.text
        assert r.content == b"[" + b",".join(envelope("grad", s) for s in shapes) + b"]"
        r = await a.client.post("/v1/grad?dtype=float64", content=npz(x=np.zeros((5000, 0)), alpha=np.float64(2.0)),
                                headers={"content-type": NPZ})
        assert r.status_code == 200, r.text
        assert r.content == envelope("grad", (5000, 0), "float64")


@pytest.mark.anyio
async def test_a_huge_zero_size_answer_is_right_and_reserved_by_its_estimate():
    shape = (16_777_216, 0)
    async with App() as a:
        r = await a.client.post("/v1/grad", content=npy(np.zeros(shape, np.float32)),
                                headers={"content-type": NPY, "accept": "application/json"})
        assert r.status_code == 200, r.text
        n = shape[0]
        head = b'{"surrogate":"piecewise_quadratic","dtype":"float32","shape":[16777216,0],"grad":'
        assert r.content == head + b"[" + b"[]," * (n - 1) + b"[]]}"
        assert a.budget.peak >= len(r.content)  # the request reserved at least its answer
        assert a.budget.in_use == 0
