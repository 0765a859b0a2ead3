"""Declared .npy shapes that no array can have, clean parse errors, and the answer-size estimate."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from service.dataplane.limits import Limits
from service.errors import ApiError
from service.protocols.tensors.npy import answer_bytes, decode_npy, decode_npz, npy_parts

LIMITS = Limits(max_rank=8, max_elements=1000, max_cost=1e18)

NPY = "application/x-npy"
NPZ = "application/x-npz"


def npy_with_header(text: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file whose header dictionary is ``text``, written by hand (NumPy's own
    writer refuses these shapes)."""
    raw = text.encode("latin1")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + data


def header(shape: str, descr: str = "<f8") -> str:
    return f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"


def npz_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name + ".npy", body)
    return buf.getvalue()


IMPOSSIBLE = ["(-1, -4)", "(-2, -2)", "(-1,)", "(True, 2)", "(2, False)", "(9223372036854775808, 0)",
              "(4611686018427387904, 4, 0)", "(1099511627776, 1073741824, 0)"]


@pytest.mark.parametrize("shape", IMPOSSIBLE)
def test_decode_refuses_impossible_shapes(shape):
    with pytest.raises(ApiError) as info:
        decode_npy(npy_with_header(header(shape)), limits=LIMITS)
    assert info.value.status == 422
    assert info.value.code == "invalid_binary"
    assert "shape" in str(info.value)


@pytest.mark.parametrize("shape", ["(0,)", "(3, 0)", "(1000, 0)", "()"])
def test_zero_size_and_scalar_shapes_still_decode(shape):
    expected = eval(shape)  # the literal tuple written in the header
    n = int(np.prod(expected))
    a = decode_npy(npy_with_header(header(shape), np.arange(n, dtype="<f8").tobytes()), limits=LIMITS)
    assert a.shape == expected
    assert a.dtype == np.float64
    assert np.array_equal(a, np.arange(n, dtype=np.float64).reshape(expected))


@pytest.mark.parametrize("garbage", [header("foo"), header("(2**63, 0)"), "garbage", "{'descr': f(), }", header("(1,)", "zz")])
def test_garbage_header_messages_hold_no_object_reprs(garbage):
    with pytest.raises(ApiError) as info:
        decode_npy(npy_with_header(garbage), limits=LIMITS)
    assert info.value.code == "invalid_binary"
    message = str(info.value)
    assert "not a valid .npy file" in message
    assert " at 0x" not in message
    assert "<ast." not in message


def test_an_npz_member_with_an_impossible_shape_is_refused():
    good = npy_with_header(header("(2,)"), np.float64([0.5, -0.5]).tobytes())
    with pytest.raises(ApiError) as info:
        decode_npz(npz_of({"x": good, "alpha": npy_with_header(header("(True, 2)"))}), limits=LIMITS)
    assert (info.value.code, info.value.field) == ("invalid_binary", "alpha")
    assert decode_npz(npz_of({"x": good}), limits=LIMITS)["x"].tolist() == [0.5, -0.5]



@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["(-1, -4)", "(-2, -2)", "(True, 2)", "(9223372036854775808, 0)"])
async def test_the_service_answers_422_not_500(client, shape):
    for body, ctype in ((npy_with_header(header(shape)), NPY), (npz_of({"x": npy_with_header(header(shape))}), NPZ)):
        r = await client.post("/v1/grad", content=body, headers={"content-type": ctype, "accept": NPY})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert (err["status"], err["code"], err["field"]) == (422, "invalid_binary", "x")
    ok = await client.post("/v1/grad", content=npy_with_header(header("(2,)"), np.float64([0.5, 0.0]).tobytes()),
                           headers={"content-type": NPY, "accept": "application/json"})
    assert ok.status_code == 200
    assert ok.json()["grad"] == [0.5, 1.0]


@pytest.mark.anyio
async def test_the_service_message_for_a_garbage_header_is_clean(client):
    r = await client.post("/v1/grad", content=npy_with_header(header("foo")), headers={"content-type": NPY})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_binary"
    assert " at 0x" not in r.json()["error"]["message"]


# -- answer_bytes ------------------------------------------------------------------------------


SHAPES = [(), (1,), (5,), (3, 0), (0,), (2, 3, 4), (7, 0, 3), (1,) * 8, (100_000, 0), (4, 1000, 0), (12, 7)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_npy_answer_bytes_is_the_exact_size_of_the_answer(shape, dtype):
    header, data = npy_parts(np.zeros(shape, dtype))
    assert answer_bytes(shape, np.dtype(dtype).itemsize, json=False) == len(header) + len(data)


def test_zero_size_dimensions_count_in_the_json_estimate():
    # [[],[],...]: at least two brackets per empty innermost list
    assert answer_bytes((100_000_000, 0), 4, json=True) >= 200_000_000
    assert answer_bytes((1000, 1000, 0), 8, json=True) >= 2_000_000
    assert answer_bytes((0, 100_000_000), 4, json=True) < 1000  # nothing inside an empty outer list
    assert answer_bytes((100_000_000, 0), 4, json=False) < 1000  # .npy: a header and no data


@pytest.mark.anyio
@pytest.mark.parametrize("shape", [(2000, 0), (50, 40, 0), (3, 0, 5), (0,), (), (1, 1, 1, 1)], ids=str)
async def test_json_estimate_bounds_real_zero_size_answers_tightly(client, shape):
    x = np.zeros(shape).tolist()
    r = await client.post("/v1/grad", json={"x": x, "surrogate": "squarewave_fourier_series"})
    assert r.status_code == 200, r.text
    estimate = answer_bytes(shape, 4, json=True)
    assert len(r.content) <= estimate <= 1.1 * len(r.content) + 400


@pytest.mark.anyio
@pytest.mark.parametrize(("dtype", "scale"), [("float64", 1e-300), ("float32", 1e-30), ("float16", 1e-3),
                                              ("bfloat16", 1e-30)])
async def test_json_estimate_bounds_answers_with_the_longest_numbers(client, dtype, scale):
    # with a cotangent, the gradient at x = 0 is the cotangent itself: negative numbers with an exponent and every digit the
    # dtype can hold, the longest text JSON writes for an element
    rng = np.random.default_rng(3)
    c = -(rng.uniform(1, 2, (30, 40)) * scale)
    r = await client.post("/v1/grad", json={"x": 0.0, "cotangent": c.tolist(), "dtype": dtype})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["grad"])
    assert got.shape == (30, 40)
    assert (got < 0).all()
    itemsize = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 4}[dtype]
    assert len(r.content) <= answer_bytes((30, 40), itemsize, json=True)
