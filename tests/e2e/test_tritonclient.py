"""NVIDIA's tritonclient (HTTP), unchanged, against a real server: health, metadata, the repository
index, infer with JSON and binary tensors in every datatype, compression, and its exceptions."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from reference import pq_grad

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

import surrogate_core as sc  # noqa: E402

pytestmark = pytest.mark.e2e
SEED = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)


@pytest.fixture(scope="module")
def triton(server_url):
    client = httpclient.InferenceServerClient(url=server_url.removeprefix("http://"))  # the session's server
    yield client
    client.close()


def make_input(name, a, datatype, binary=True):
    t = httpclient.InferInput(name, list(a.shape), datatype)
    t.set_data_from_numpy(a, binary_data=binary)
    return t


def test_health_metadata_and_repository(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "surrogate-serve" and "binary_tensor_data" in meta["extensions"]
    assert triton.is_model_ready("sigmoid") and triton.is_model_ready("sigmoid", "1")
    model = triton.get_model_metadata("piecewise_quadratic")
    assert [t["name"] for t in model["inputs"]] == ["x", "alpha", "cotangent"]
    assert [t["name"] for t in model["outputs"]] == ["spike", "grad", "fun", "vjp"]
    index = triton.get_model_repository_index()
    assert {m["name"] for m in index} == set(sc.names()) and {m["state"] for m in index} == {"READY"}


def test_the_declared_shapes_are_what_infer_takes(triton):
    """Every tensor is declared with SURROGATE_MAX_RANK (8) free dimensions; tensors built from the
    declared shapes (each -1 a size of the caller's choosing) are taken, at that rank and below,
    and one dimension more is refused."""
    meta = triton.get_model_metadata("piecewise_quadratic")
    shapes = [t["shape"] for t in meta["inputs"] + meta["outputs"]]
    assert shapes == [[-1] * 8] * len(shapes)
    declared = meta["inputs"][0]["shape"]
    x = SEED.reshape([1] * (len(declared) - 1) + [SEED.size])
    alpha = np.array([0.5, 2.0], np.float32).reshape([2] + [1] * (len(declared) - 1))
    r = triton.infer("piecewise_quadratic", [make_input("x", x, "FP32"), make_input("alpha", alpha, "FP32")],
                     outputs=[httpclient.InferRequestedOutput("grad")])
    got = r.as_numpy("grad")
    assert got.shape == (2,) + (1,) * 6 + (5,)
    np.testing.assert_allclose(got.reshape(2, 5), pq_grad(SEED.astype(np.float64), np.array([[0.5], [2.0]])),
                               rtol=1e-6)
    r = triton.infer("piecewise_quadratic", [make_input("x", np.array(0.25, np.float32), "FP32")],
                     outputs=[httpclient.InferRequestedOutput("grad")])
    assert r.as_numpy("grad").shape == () and float(r.as_numpy("grad")) == 0.75
    with pytest.raises(InferenceServerException) as info:
        triton.infer("piecewise_quadratic", [make_input("x", x.reshape((1, *x.shape)), "FP32")])
    assert "'x'" in str(info.value) and "rank 9" in str(info.value)


@pytest.mark.parametrize("binary", [False, True])
def test_infer_spike_and_grad_in_one_call(triton, binary):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("spike", "grad")]
    r = triton.infer("piecewise_quadratic", [make_input("x", SEED, "FP32", binary)], outputs=outputs,
                     parameters={"alpha": 1.0})
    assert r.as_numpy("spike").tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert r.as_numpy("grad").tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]


@pytest.mark.parametrize(("datatype", "dtype"), [("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
                                                 ("BF16", ml_dtypes.bfloat16)])
def test_every_datatype_with_binary_outputs_by_default(triton, datatype, dtype):
    x = np.random.default_rng(3).uniform(-2, 2, (4, 5)).astype(dtype)
    r = triton.infer("sigmoid", [make_input("x", x, datatype)], parameters={"alpha": 4.0})  # outputs absent: binary
    got = r.as_numpy("grad")
    want = sc.grad(x, surrogate="sigmoid", alpha=4.0)
    assert got.dtype == want.dtype and got.shape == (4, 5)
    assert np.array_equal(got, want)
    assert r.get_output("grad")["datatype"] == datatype


def test_alpha_sweep_by_broadcasting_and_vjp(triton):
    x = np.linspace(-2, 2, 33, dtype=np.float32)
    alpha = np.array([[0.5], [1.0], [2.0]], np.float32)
    ct = np.full((3, 33), 2.0, np.float32)
    r = triton.infer("piecewise_quadratic",
                     [make_input("x", x, "FP32"), make_input("alpha", alpha, "FP32"), make_input("cotangent", ct, "FP32")],
                     outputs=[httpclient.InferRequestedOutput("grad"), httpclient.InferRequestedOutput("vjp")])
    np.testing.assert_allclose(r.as_numpy("grad"), pq_grad(x.astype(np.float64), alpha), rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("vjp"), 2.0 * pq_grad(x.astype(np.float64), alpha), rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compression_both_ways(triton, algorithm):
    x = np.linspace(-2, 2, 10_000, dtype=np.float32)
    r = triton.infer("piecewise_quadratic", [make_input("x", x, "FP32")],
                     outputs=[httpclient.InferRequestedOutput("grad")],
                     request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    np.testing.assert_allclose(r.as_numpy("grad"), pq_grad(x.astype(np.float64), 1.0), rtol=1e-6)


@pytest.mark.parametrize(("call", "words"), [
    (lambda c: c.infer("sigmoud", [make_input("x", SEED, "FP32")]), "did you mean 'sigmoid'"),
    (lambda c: c.infer("Sigmoid", [make_input("x", SEED, "FP32")]), "did you mean 'sigmoid'"),
    (lambda c: c.get_model_metadata("PiecewiseQuadratic"), "did you mean 'piecewise_quadratic'"),
    (lambda c: c.get_model_metadata("sigmoid", "7"), "no version '7'"),
    (lambda c: c.infer("sigmoid", [make_input("x", SEED, "FP32")], parameters={"alpha": -1.0}), "'alpha'"),
    (lambda c: c.infer("sigmoid", [make_input("x", np.array([1, 2], np.int32), "INT32")]), "INT32"),
    (lambda c: c.infer("sigmoid", [make_input("x", SEED, "FP32")],
                       outputs=[httpclient.InferRequestedOutput("vjp")]), "cotangent"),
])
def test_errors_raise_with_the_servers_message(triton, call, words):
    with pytest.raises(InferenceServerException) as info:
        call(triton)
    assert words in str(info.value)
