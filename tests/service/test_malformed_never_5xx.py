"""Malformed input is a client's error, never the server's: ``.npy`` headers, ``.npz`` members and
``/v2`` shapes, written by hand at the known edges and fuzzed by hypothesis, are answered 2xx or 4xx.

The app runs in process, on one event loop kept for the module (hypothesis calls the tests
synchronously, many times); example counts are bounded so that the module takes seconds."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

import numpy as np
import orjson
import pytest
from helpers import App, npy, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_ELEMENTS = 100_000
NPY = {"content-type": "application/x-npy"}
NPZ = {"content-type": "application/x-npz"}
V2 = "/v2/models/piecewise_quadratic/infer"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def post():
    """``post(path, content, headers)`` -> (status, the JSON body or else the bytes) against one app for the
    whole module."""
    runner = asyncio.Runner()
    app = App(max_elements=MAX_ELEMENTS, max_body_bytes=1_000_000)
    runner.run(app.__aenter__())

    def call(path: str, content: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        r = runner.run(app.client.post(path, content=content, headers=headers))
        is_json = r.headers["content-type"].startswith("application/json")
        return r.status_code, orjson.loads(r.content) if is_json else r.content

    yield call
    runner.run(app.__aexit__(None, None, None))
    runner.close()


def npy_raw(header: bytes, version: int = 1, data: bytes = b"") -> bytes:
    """A ``.npy`` file of this header text, ended by a newline (not padded)."""
    text = header + b"\n"
    size = len(text).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + data


def npz_of(member: bytes, name: str = "x.npy", compression: int = zipfile.ZIP_STORED) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        z.writestr(name, member)
    return b.getvalue()


def body(req: dict, blobs: list[bytes] = ()) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a /v2 request (the JSON by the standard library: integers past 64 bits too)."""
    head = json.dumps(req).encode()
    blobs = [b for b in blobs if b]
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"inference-header-content-length": str(len(head))}


def a_4xx(status: int, doc: dict) -> None:
    assert 400 <= status < 500, (status, doc)


# -- the known cases ------------------------------------------------------------------------------------------------


UNBALANCED = npy_raw(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,}")


def test_an_unbalanced_parenthesis_in_a_npy_header_is_a_422_naming_x(post):
    assert len(UNBALANCED) < 128
    status, doc = post("/v1/spike", UNBALANCED, NPY)
    assert status == 422, doc
    assert doc["error"]["code"] == "invalid_binary"
    assert doc["error"]["field"] == "x"
    assert "not a valid .npy file" in doc["error"]["message"]


@pytest.mark.parametrize("name", ["x", "alpha"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_unbalanced_parenthesis_in_a_npz_member_is_a_422_naming_it(post, name, compression):
    members = {name: UNBALANCED}
    if name != "x":
        members["x"] = npy(np.zeros(3, np.float32))
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        for k, v in members.items():
            z.writestr(f"{k}.npy", v)
    status, doc = post("/v1/grad", b.getvalue(), NPZ)
    assert status == 422, doc
    assert doc["error"]["field"] == name


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
def test_a_npz_member_with_damaged_compressed_data_is_a_422(post, compression):
    # a valid header, then compressed data with bytes changed in it: zlib.error, LZMAError, OSError inside zipfile
    member = npy(np.random.default_rng(0).normal(size=3000))
    data = npz_of(member, compression=compression)
    statuses = set()
    for at in range(60, len(data) - 120, max(1, (len(data) - 180) // 100)):
        for value in (0x00, 0xFF, 0x55):
            status, doc = post("/v1/spike", data[:at] + bytes([value]) + data[at + 1:], NPZ)
            assert status in (200, 422), (at, value, status, doc)
            statuses.add(status)
    assert 422 in statuses


HUGE = 4611686018427387904  # 2**62: a zero-size shape NumPy cannot make ("array is too big")


def with_x(t: dict, blobs: list[bytes], binary: bool) -> tuple[bytes, dict[str, str]]:
    """The /v2 request of input ``t`` (its binary data in ``blobs``), with a small ``x`` beside it
    when ``t`` is another input."""
    inputs = [t]
    if t["name"] != "x":
        x, raw = tensor("x", np.zeros(3, np.float32), binary=binary)
        inputs.append(x)
        blobs = [*blobs, raw]
    return body({"inputs": inputs}, blobs)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", ["x", "alpha", "cotangent"])
def test_a_v2_zero_size_shape_with_a_huge_dimension_is_a_400_naming_the_input(post, name, binary):
    t = {"name": name, "shape": [0, HUGE], "datatype": "FP32"}
    if binary:
        t["parameters"] = {"binary_data_size": 0}
    else:
        t["data"] = []
    status, doc = post(V2, *with_x(t, [], binary))
    assert status == 400, doc
    assert f"input {name!r}" in doc["error"]
    assert "over the limit" in doc["error"]


@pytest.mark.parametrize("shape", [(0, HUGE), (HUGE, 0), (0, 2**63 - 1, 2), (0, MAX_ELEMENTS + 1)], ids=str)
def test_a_npy_zero_size_shape_over_the_limit_is_a_422(post, shape):
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    status, doc = post("/v1/spike", npy_raw(header), NPY)
    assert status == 422, doc
    assert doc["error"]["field"] == "x"


@pytest.mark.parametrize(("shape", "ok"), [((0, MAX_ELEMENTS), True), ((0, MAX_ELEMENTS + 1), False),
                                           ((MAX_ELEMENTS, 0), True), ((MAX_ELEMENTS + 1, 0), False)], ids=str)
def test_a_zero_size_dimension_counts_as_1_at_the_edge_of_the_limit(post, shape, ok):
    # exactly at the limit accepted, one past refused, in .npy and in /v2
    status, doc = post("/v1/spike", npy(np.zeros(shape, np.float32)), {**NPY, "accept": "application/x-npy"})
    assert status == (200 if ok else 422), doc
    if ok:
        assert doc == npy(np.zeros(shape, np.float32))
    content, headers = body({"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": []}],
                             "outputs": [{"name": "spike"}]})
    status, doc = post(V2, content, headers)
    assert status == (200 if ok else 400), doc
    if ok:
        assert doc["outputs"][0]["shape"] == list(shape)
        assert doc["outputs"][0]["data"] == []


# -- fuzzed .npy headers and .npz members ---------------------------------------------------------------------------


DESCRS = ["<f4", "<f8", "<f2", ">f4", "|f4", "<i4", "|O", "|V8", "<U3", "", "f4", "<f99999999999999999999", "<c8",
          "[('a', '<f4')]", "(<f4, (2,))"]
ALPHABET = "{}()[]',:0123456789-<>|fiOVU. \nTrueFalsNonedscrhpotin_x\\\"#*"


def _ints():
    return st.one_of(st.integers(0, 8), st.integers(-3, 3), st.sampled_from([HUGE, 2**63, 2**64, 10**30,
                                                                          MAX_ELEMENTS, MAX_ELEMENTS + 1]))


@st.composite
def npy_headers(draw) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:  # a dictionary of plausible parts, some of them wrong
        descr = draw(st.sampled_from(DESCRS))
        fortran = draw(st.sampled_from(["False", "True", "0", "None", "'no'"]))
        shape = draw(st.one_of(
            st.lists(_ints(), max_size=10).map(lambda s: repr(tuple(s))),
            st.sampled_from(["(True, 2)", "[3]", "3", "(3.0,)", "(,)", "(3,", "None", "(1<<70,)", "(-0,)"]),
        ))
        keys = draw(st.permutations(["descr", "fortran_order", "shape"]))
        parts = {"descr": repr(descr), "fortran_order": fortran, "shape": shape}
        text = "{" + ", ".join(f"'{k}': {parts[k]}" for k in keys[: draw(st.integers(1, 3))]) + "}"
    elif kind == 1:  # text from a header's alphabet
        text = draw(st.text(alphabet=ALPHABET, max_size=90))
    else:  # a valid header cut or with a character put in
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        valid = repr({"descr": "<f4", "fortran_order": False, "shape": shape})
        at = draw(st.integers(0, len(valid)))
        text = valid[:at] + draw(st.text(alphabet=ALPHABET, max_size=3)) + valid[at + draw(st.integers(0, 2)):]
    return text.encode()


@st.composite
def npy_bodies(draw) -> bytes:
    raw = npy_raw(draw(npy_headers()), draw(st.sampled_from([1, 2, 3])), draw(st.binary(max_size=48)))
    mutation = draw(st.integers(0, 3))
    if mutation == 1:  # cut anywhere
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutation == 2:  # one byte changed (the magic, the version, the length field, the text)
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    return raw


@FUZZ
@given(raw=npy_bodies())
def test_fuzzed_npy_bodies_are_never_a_5xx(post, raw):
    status, doc = post("/v1/spike", raw, NPY)
    assert status < 500, (status, doc, raw)
    if status >= 400:
        a_4xx(status, doc)


@FUZZ
@given(raw=npy_bodies(), name=st.sampled_from(["x.npy", "alpha.npy", "cotangent.npy"]),
       compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
       damage=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.integers(0, 255))))
def test_fuzzed_npz_members_are_never_a_5xx(post, raw, name, compression, damage):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        z.writestr(name, raw)
        if name != "x.npy":
            z.writestr("x.npy", npy(np.zeros(3, np.float32)))
    data = b.getvalue()
    if damage is not None:  # one byte of the archive changed: a local header, the compressed data, the directory
        i = int(damage[0] * (len(data) - 1))
        data = data[:i] + bytes([damage[1]]) + data[i + 1:]
    status, doc = post("/v1/grad", data, NPZ)
    assert status < 500, (status, doc)


# -- fuzzed /v2 shapes ----------------------------------------------------------------------------------------------


@FUZZ
@given(shape=st.lists(st.one_of(st.sampled_from([0, 0, 1, 3, HUGE, 2**63 - 1, 2**64 - 1, 2**64, MAX_ELEMENTS + 1, -1]),
                                _ints()), max_size=10),
       name=st.sampled_from(["x", "alpha", "cotangent"]), binary=st.booleans(),
       datatype=st.sampled_from(["FP32", "FP64", "FP16", "BF16"]),
       size=st.one_of(st.none(), st.integers(0, 64)), values=st.integers(0, 6))
def test_fuzzed_v2_shapes_are_never_a_5xx(post, shape, name, binary, datatype, size, values):
    t: dict = {"name": name, "shape": shape, "datatype": datatype}
    blobs = []
    if binary:
        nbytes = size if size is not None else 4 * values
        t["parameters"] = {"binary_data_size": nbytes}
        blobs.append(bytes(nbytes))
    else:
        t["data"] = [0.5] * values
    status, doc = post(V2, *with_x(t, blobs, binary))
    assert status < 500, (status, doc, shape)
