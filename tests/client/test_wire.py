"""The request encodings the client chooses and the answers it decodes (no server involved)."""

from __future__ import annotations

import io
import json

import ml_dtypes
import numpy as np
import pytest

from surrogate_client import DecodingError
from surrogate_client import _wire as W


def load_npz(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_auto_uses_json_for_tiny_and_binary_for_larger_results():
    small = W.build_compute("grad", [-2.0, -0.5, 0.0, 0.5, 2.0], params={"alpha": 1.0}, transport="auto")
    assert not small.binary and small.headers["Content-Type"] == W.JSON
    assert json.loads(small.content) == {"x": [-2.0, -0.5, 0.0, 0.5, 2.0], "dtype": "float32", "alpha": 1.0}
    big = W.build_compute("grad", np.zeros(W.AUTO_BINARY_MIN_ELEMENTS), params={"alpha": 1.0}, transport="auto")
    assert big.binary and big.headers == {"Content-Type": W.NPY, "Accept": W.NPY}
    # the result's size decides: a tiny x against a long alpha is binary too
    wide = W.build_compute("grad", 0.5, params={"alpha": np.linspace(1, 2, 64)}, transport="auto")
    assert wide.binary and wide.headers["Content-Type"] == W.NPZ


def test_auto_sends_non_finite_values_binary_and_json_refuses_them():
    spec = W.build_compute("spike", [np.nan, 1.0], params={}, transport="auto")
    assert spec.binary
    with pytest.raises(ValueError, match="cannot travel in JSON"):
        W.build_compute("spike", [np.inf, 1.0], params={}, transport="json")
    with pytest.raises(ValueError, match="alpha: NaN"):
        W.build_compute("grad", [1.0], params={"alpha": np.nan}, transport="json")
    with pytest.raises(ValueError, match="job 1: x: NaN"):
        W.build_batch("spike", [{"x": 1.0}, {"x": [np.nan]}])


def test_empty_arrays_of_rank_above_one_go_binary():
    # JSON would send [] and the server would answer shape (0,)
    assert W.build_compute("spike", np.zeros((0, 3)), params={}, transport="auto").binary
    assert not W.build_compute("spike", np.zeros(0), params={}, transport="auto").binary
    with pytest.raises(ValueError, match="empty arrays"):
        W.build_compute("spike", np.zeros((2, 0)), params={}, transport="json")


def test_npy_puts_scalars_in_the_query_string_exactly():
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    spec = W.build_compute(
        "grad", x, params={"alpha": np.float32(0.1)}, cotangent=3, surrogate="piecewise_quadratic", transport="npy"
    )
    assert spec.path == "/v1/grad" and spec.headers["Content-Type"] == W.NPY
    assert spec.params == {"dtype": "float32", "surrogate": "piecewise_quadratic", "alpha": repr(float(np.float32(0.1))),
                           "cotangent": "3"}
    assert float(spec.params["alpha"]) == np.float32(0.1)  # round trips exactly
    sent = np.load(io.BytesIO(spec.content), allow_pickle=False)
    assert sent.dtype == np.float32 and np.array_equal(sent, x)


def test_npy_switches_to_npz_for_array_parameters():
    spec = W.build_compute("grad", np.zeros(5), params={"alpha": [[0.5], [2.0]]}, cotangent=np.ones(5), transport="npy")
    assert spec.headers["Content-Type"] == W.NPZ
    arrays = load_npz(spec.content)
    assert sorted(arrays) == ["alpha", "cotangent", "x"]
    assert arrays["alpha"].shape == (2, 1) and spec.params == {"dtype": "float64"}


def test_npz_carries_everything_in_the_archive():
    spec = W.build_compute("fun", np.zeros(3, np.float16), params={"alpha": 2.0}, transport="npz")
    arrays = load_npz(spec.content)
    assert arrays["alpha"].shape == () and arrays["alpha"] == 2.0 and arrays["x"].dtype == np.float16
    assert spec.params == {"dtype": "float16"}


@pytest.mark.parametrize(
    ("x", "dtype", "name", "wire"),
    [
        ([1.0, 2.0], None, "float32", np.float64),  # lists: the service's default dtype, sent exactly
        (np.zeros(2, np.float64), None, "float64", np.float64),
        (np.zeros(2, np.float16), None, "float16", np.float16),
        (np.zeros(2, ml_dtypes.bfloat16), None, "bfloat16", np.float32),  # bfloat16 travels as float32
        (np.zeros(2, np.int64), None, "float32", np.float64),  # integers travel as float64
        (np.zeros(2, np.float32), "bfloat16", "bfloat16", np.float32),
        (np.zeros(2, np.float64), np.float16, "float16", np.float64),  # the server rounds, once
        (np.zeros(2, np.float32), ml_dtypes.bfloat16, "bfloat16", np.float32),
    ],
)
def test_dtype_resolution_and_wire_dtype(x, dtype, name, wire):
    spec = W.build_compute("spike", x, params={}, dtype=dtype, transport="npy")
    assert spec.params["dtype"] == name == spec.dtype
    assert np.load(io.BytesIO(spec.content)).dtype == wire
    j = W.build_compute("spike", x, params={}, dtype=dtype, transport="json")
    assert json.loads(j.content)["dtype"] == name


def test_byte_order_and_memory_layout_do_not_matter():
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    for arr in (x.astype(">f8"), np.asfortranarray(x), x.T.copy().T, x[:, ::2]):
        spec = W.build_compute("grad", arr, params={}, transport="npy")
        assert spec.dtype == "float64" and spec.shape == arr.shape
        sent = np.load(io.BytesIO(spec.content))
        assert sent.dtype == np.float64 and sent.dtype.isnative and np.array_equal(sent, arr)


def test_jax_arrays_are_accepted():
    import jax.numpy as jnp

    spec = W.build_compute("grad", jnp.linspace(-1, 1, 32, dtype=jnp.bfloat16), params={"alpha": jnp.float32(2)},
                           transport="npy")
    assert spec.params["dtype"] == "bfloat16" and spec.params["alpha"] == "2.0"
    assert np.load(io.BytesIO(spec.content)).dtype == np.float32


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        ([True, False], TypeError, "booleans"),
        ([1 + 2j], TypeError, "complex"),
        (["a"], TypeError, "expected numbers"),
        ([[1.0, 2.0], [3.0]], ValueError, "rectangular"),
    ],
)
def test_bad_inputs_are_refused_before_sending(x, exc, match):
    with pytest.raises(exc, match=match):
        W.build_compute("spike", x, params={}, transport="json")


def test_bad_arguments():
    with pytest.raises(ValueError, match="transport"):
        W.build_compute("spike", 1.0, params={}, transport="xml")
    with pytest.raises(TypeError, match="cotangent"):
        W.build_compute("spike", 1.0, params={}, cotangent=1.0)
    with pytest.raises(ValueError, match="unknown op"):
        W.build_compute("vjp", 1.0, params={})


def test_batch_is_json():
    spec, dtypes = W.build_batch("fun", [{"x": 0.5}, {"x": np.array([0.1, 0.2], np.float64), "alpha": 4}])
    assert json.loads(spec.content) == [{"x": 0.5, "dtype": "float32"}, {"x": [0.1, 0.2], "alpha": 4, "dtype": "float64"}]
    assert dtypes == ["float32", "float64"]
    with pytest.raises(TypeError, match="missing 'x'"):
        W.build_batch("fun", [{"alpha": 1.0}])


def test_decode_npy_keeps_shape_and_dtype():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    got = W.decode_compute("grad", W.NPY, {"x-surrogate-dtype": "float16"}, npy(a), "float16")
    assert got.dtype == np.float16 and np.array_equal(got, a)
    b = np.array([0.5, 1.0, 3.0], np.float32)
    got = W.decode_compute("grad", W.NPY, {"x-surrogate-dtype": "bfloat16"}, npy(b), "bfloat16")
    assert got.dtype == ml_dtypes.bfloat16 and got.astype(np.float32).tolist() == [0.5, 1.0, 3.0]


def test_decode_json_scalars_empties_and_bfloat16(monkeypatch):
    doc = lambda **kw: json.dumps({"surrogate": "piecewise_quadratic", **kw}).encode()  # noqa: E731
    got = W.decode_compute("fun", "application/json", {}, doc(dtype="float32", shape=[], fun=0.875), "float32")
    assert got.shape == () and got.dtype == np.float32 and got == 0.875
    got = W.decode_compute("grad", "application/json", {}, doc(dtype="float64", shape=[0, 3], grad=[]), "float64")
    assert got.shape == (0, 3) and got.dtype == np.float64
    got = W.decode_compute("grad", "application/json", {}, doc(dtype="bfloat16", shape=[1], grad=[1.0078125]),
                           "bfloat16")
    assert got.dtype == ml_dtypes.bfloat16 and float(got[0]) == 1.0078125
    monkeypatch.setattr(W, "BFLOAT16", None)  # as without ml_dtypes: float32 holding the bfloat16 values
    got = W.decode_compute("grad", W.NPY, {"x-surrogate-dtype": "bfloat16"}, npy(np.array([1.0078125], np.float32)),
                           "bfloat16")
    assert got.dtype == np.float32 and got[0] == 1.0078125


def test_result_shape_is_the_broadcast_shape():
    # a 0-d result that arrives as shape (1,) in .npy is given back its shape ()
    got = W.decode_compute("grad", W.NPY, {"x-surrogate-dtype": "float32"}, npy(np.array([1.0], np.float32)),
                           "float32", ())
    assert got.shape == () and got == 1.0
    spec = W.build_compute("grad", np.zeros((2, 1)), params={"alpha": np.ones(3)}, cotangent=2.0, transport="npy")
    assert spec.shape == (2, 3)
    with pytest.raises(DecodingError, match="shape"):
        W.decode_compute("grad", W.NPY, {}, npy(np.zeros(5)), "float64", (2, 3))


@pytest.mark.parametrize(
    ("ctype", "content"),
    [
        (W.NPY, b"not an npy file"),
        ("application/json", b"{"),
        ("application/json", b'{"surrogate": "x", "dtype": "float32", "shape": [3], "grad": [1, 2]}'),
        ("text/html", b"<html>"),
    ],
)
def test_undecodable_answers(ctype, content):
    with pytest.raises(DecodingError):
        W.decode_compute("grad", ctype, {}, content, "float32")
