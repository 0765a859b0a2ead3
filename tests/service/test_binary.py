"""The binary transport: .npy / .npz bodies, .npy answers, and every malformed binary input."""

from __future__ import annotations

import io
import zipfile

import ml_dtypes
import numpy as np
import orjson
import pytest

import surrogate_core as sc

import reference as ref

pytestmark = pytest.mark.anyio

NPY = "application/x-npy"
NPZ = "application/x-npz"


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def load(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


async def call(client, path, body, ctype, params=None, accept=NPY):
    return await client.post(path, content=body, params=params or {}, headers={"content-type": ctype, "accept": accept})


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
async def test_npy_round_trip_equals_json_bit_for_bit(client, dtype):
    rng = np.random.default_rng(7)
    x64 = rng.uniform(-1.5, 1.5, (40, 25))
    wire = np.float32 if dtype == "bfloat16" else sc.DTYPES[dtype]
    x = x64.astype(sc.DTYPES[dtype]).astype(wire)  # values exact in the dtype
    for path, key in (("/v1/grad", "grad"), ("/v1/spike", "spike"), ("/v1/fun", "fun")):
        r = await call(client, path, npy(x), NPY, {"alpha": "1.7", "dtype": dtype})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == NPY
        assert r.headers["x-surrogate-dtype"] == dtype and r.headers["x-surrogate-name"] == "piecewise_quadratic"
        got = load(r.content)
        assert got.shape == (40, 25) and got.dtype == wire
        j = await client.post(path, content=orjson.dumps({"x": x.tolist(), "alpha": 1.7, "dtype": dtype}),
                              headers={"content-type": "application/json"})
        via_json = np.array(j.json()[key], np.float64).astype(sc.DTYPES[dtype]).astype(wire)
        np.testing.assert_array_equal(got.view(np.uint8), via_json.view(np.uint8))
    if dtype == "float64":
        np.testing.assert_allclose(load((await call(client, "/v1/grad", npy(x), NPY, {"alpha": "1.7"})).content),
                                   ref.pq_grad(x, 1.7), rtol=1e-12, atol=1e-12)


async def test_npz_with_parameter_arrays_and_cotangent(client):
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    alpha = np.array([[0.5], [1], [2], [4]], np.float32)
    r = await call(client, "/v1/grad", npz(x=x, alpha=alpha), NPZ)
    got = load(r.content)
    assert got.shape == (4, 1000) and got.dtype == np.float32
    for row, a in zip(got, alpha[:, 0]):
        np.testing.assert_allclose(row, ref.pq_grad(x, a), rtol=2e-6, atol=1e-6)
    c = np.linspace(-1, 1, 1000, dtype=np.float32)
    r = await call(client, "/v1/grad", npz(compressed=True, x=x, cotangent=c), NPZ, {"alpha": "2"})
    np.testing.assert_allclose(load(r.content), c * ref.pq_grad(x, 2.0), rtol=2e-6, atol=1e-6)
    # JSON answer to a binary request
    r = await call(client, "/v1/spike", npz(x=np.float64([-1, 0, 1])), NPZ, accept="application/json")
    assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float64", "shape": [3], "spike": [0, 1, 1]}


async def test_json_request_can_ask_for_npy(client):
    r = await client.post("/v1/grad", content=b'{"x": [[0.5, 0.0]], "dtype": "float64"}',
                          headers={"content-type": "application/json", "accept": NPY})
    got = load(r.content)
    assert got.dtype == np.float64 and got.tolist() == [[0.5, 1.0]]


async def test_ieee_special_values_follow_braintools(client):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    spikes = load((await call(client, "/v1/spike", npy(x), NPY)).content)
    assert spikes.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    g = load((await call(client, "/v1/grad", npy(x), NPY)).content)
    assert np.isnan(g[0]) and g[1:].tolist() == [0.0, 0.0, 1.0, 1.0]
    # NaN cannot travel in JSON
    r = await call(client, "/v1/grad", npy(x), NPY, accept="application/json")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_representable"


async def test_fortran_order_and_big_endian_arrays(client):
    x = np.asfortranarray(np.arange(-6, 6, dtype=np.float64).reshape(3, 4) / 4)
    got = load((await call(client, "/v1/grad", npy(x), NPY)).content)
    np.testing.assert_allclose(got, ref.pq_grad(x, 1.0))
    xb = np.array([0.5, -0.25], dtype=">f4")
    got = load((await call(client, "/v1/grad", npy(xb), NPY)).content)
    assert got.tolist() == [0.5, 0.75] and got.dtype == np.float32


def _member_bomb() -> bytes:
    """An .npz whose x.npy header declares 10 float64s but whose data inflates to 50 MB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w") as f:
            f.write(header.getvalue())
            chunk = b"\0" * (1 << 20)
            for _ in range(50):
                f.write(chunk)
    return buf.getvalue()


def _declared_bomb() -> bytes:
    """A compressed .npz of 200M zeros: tiny on the wire, 1.6 GB if inflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (200_000_000,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            f.write(b"\0" * (1 << 20))  # only the start: the header is what is checked
    return buf.getvalue()


good = npy(np.zeros(4, np.float32))
obj = io.BytesIO()
np.save(obj, np.array([1, "a", None], dtype=object), allow_pickle=True)
structured = npy(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]))

BAD = [
    # (body, ctype, params, status, code, field, fragment)
    (obj.getvalue(), NPY, {}, 422, "invalid_type", "x", "object"),
    (structured, NPY, {}, 422, "invalid_type", "x", "structured"),
    (npy(np.arange(4)), NPY, {}, 422, "invalid_type", "x", "int64"),
    (npy(np.zeros(3, np.complex64)), NPY, {}, 422, "invalid_type", "x", "complex64"),
    (npy(np.zeros(2, ml_dtypes.bfloat16)), NPY, {}, 422, "invalid_type", "x", "bfloat16"),
    (good[:-3], NPY, {}, 422, "invalid_binary", "x", "truncated"),
    (good + b"\0\0\0\0", NPY, {}, 422, "invalid_binary", "x", "truncated or padded"),
    (good[:20], NPY, {}, 422, "invalid_binary", "x", "not a valid .npy"),
    (b"hello world", NPY, {}, 422, "invalid_binary", "x", "not a valid .npy"),
    (b"", NPY, {}, 422, "invalid_binary", "x", "not a valid .npy"),
    (npy(np.zeros(100_001, np.float16)), NPY, {}, 422, "too_large", "x", "100000"),
    (npy(np.zeros((1,) * 9, np.float32)), NPY, {}, 422, "too_large", "x", "rank 9"),
    (b"PK\x03\x04garbage", NPZ, {}, 422, "invalid_binary", None, "not a valid .npz"),
    (good, NPZ, {}, 422, "invalid_binary", None, "not a valid .npz"),
    (npz(alpha=np.ones(2)), NPZ, {}, 422, "missing_field", "x", "no member named x"),
    (npz(x=np.zeros(2), alpah=np.ones(2)), NPZ, {}, 422, "unknown_field", "alpah", "did you mean 'alpha'"),
    (npz(x=np.zeros(2), surrogate=np.ones(1)), NPZ, {}, 422, "unknown_field", "surrogate", "query string"),
    (npz(x=np.zeros(2), alpha=np.ones(2)), NPZ, {"alpha": "2"}, 422, "invalid_value", "alpha", "both"),
    (npz(x=np.zeros(2), alpha=-np.ones(2)), NPZ, {}, 422, "invalid_value", "alpha", "> 0"),
    (npz(x=np.zeros(2), alpha=np.ones(3)), NPZ, {}, 422, "shape_mismatch", "alpha", "broadcast"),
    (npz(x=np.zeros(60_000), cotangent=np.zeros(50_000)), NPZ, {}, 422, "too_large", "cotangent", "over the limit"),
    (npz(x=np.zeros(2, np.float16)), NPZ, {"dtype": "float8"}, 422, "unknown_dtype", "dtype", "bfloat16"),
    (_member_bomb(), NPZ, {}, 422, "invalid_binary", "x", "more"),
    (_declared_bomb(), NPZ, {}, 422, "too_large", "x", "200000000"),
    (good, NPY, {"alpha": "abc"}, 422, "invalid_type", "alpha", "not a number"),
    (good, NPY, {"alpha": "nan"}, 422, "invalid_value", "alpha", "> 0"),
    (good, NPY, {"beta": "1"}, 422, "unknown_field", "beta", "query string"),
    (good, NPY, {"surrogate": "nope"}, 422, "unknown_surrogate", "surrogate", "piecewise_quadratic"),
    (good, NPY, [("alpha", "1"), ("alpha", "2")], 422, "invalid_value", "alpha", "more than once"),
    (npy(np.float32([1e5])), NPY, {"dtype": "float16"}, 422, "not_representable", "x", "float16"),
]


@pytest.mark.parametrize(("body", "ctype", "params", "status", "code", "field", "fragment"), BAD,
                         ids=[str(i) for i in range(len(BAD))])
async def test_bad_binary_input_is_a_clear_4xx(client, body, ctype, params, status, code, field, fragment):
    r = await call(client, "/v1/grad", body, ctype, params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == (code, field), err
    assert fragment in err["message"]
    ok = await call(client, "/v1/grad", npy(np.float32([0.5, 0.0])), NPY)
    assert load(ok.content).tolist() == [0.5, 1.0]


async def test_binary_body_over_the_byte_limit_is_413(client):
    r = await call(client, "/v1/grad", npy(np.zeros(300_000, np.float64)), NPY)  # 2.4 MB > 2 MB
    assert r.status_code == 413


async def test_cotangent_in_the_query_only_on_grad(client):
    r = await call(client, "/v1/grad", good, NPY, {"cotangent": "3"})
    assert load(r.content).tolist() == [3.0] * 4
    r = await call(client, "/v1/spike", good, NPY, {"cotangent": "3"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "cotangent"


async def test_json_body_refuses_a_query_string_and_npy_for_lists(client):
    r = await client.post("/v1/grad?alpha=2", content=b'{"x": [1]}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "alpha"
    r = await client.post("/v1/grad", content=b'[{"x": [1]}]', headers={"content-type": "application/json", "accept": NPY})
    assert r.status_code == 406 and r.json()["error"]["code"] == "not_acceptable"


async def test_overflow_with_finite_binary_input_is_refused(client):
    r = await call(client, "/v1/grad", npy(np.float16([0.0])), NPY, {"alpha": "2", "cotangent": "60000"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_representable"


async def test_scalar_results_keep_their_shape_as_npy(client):
    r = await call(client, "/v1/grad", npy(np.float32(0.25)), NPY, {"alpha": "2.0"})
    got = load(r.content)
    assert got.shape == () and got == np.float32(1.0)


@pytest.mark.parametrize(
    ("accept", "npy_answer"),
    [("application/x-npy", True), ("application/json;q=1, application/x-npy;q=0.1", False),
     ("application/x-npy, application/json;q=0.5", True), ("*/*", False), ("application/x-npy;q=0", False)],
)
async def test_accept_q_values_are_honoured(client, accept, npy_answer):
    r = await call(client, "/v1/spike", good, NPY, accept=accept)
    assert (r.headers["content-type"] == NPY) is npy_answer


async def test_query_numbers_are_plain_numbers(client):
    r = await call(client, "/v1/grad", good, NPY, {"alpha": "1_0"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "alpha"
