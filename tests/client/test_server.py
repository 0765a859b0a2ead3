"""SurrogateClient and AsyncSurrogateClient against a real uvicorn server (``python -m service``)."""

from __future__ import annotations

import asyncio

import httpx
import ml_dtypes
import numpy as np
import pytest

import surrogate_client as scl

import reference as ref

from liveserver import free_port

pytestmark = pytest.mark.e2e

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
ALPHAS = np.array([[0.5], [1.0], [2.0], [4.0]])


def bits(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a
    return a.view(f"u{a.dtype.itemsize}")


@pytest.fixture(scope="module")
def client(server_url):
    with scl.SurrogateClient(server_url) as c:
        yield c


def test_seed_example(client):
    assert client.health() == {"status": "ok"} and client.ready()
    assert client.spike(SEED).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert client.grad(SEED, alpha=1.0).tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert client.grad(SEED, alpha=2.0, cotangent=3.0).tolist() == [0.0, 0.0, 6.0, 0.0, 0.0]
    assert client.fun(SEED).tolist() == [0.0, 0.125, 0.5, 0.875, 1.0]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_binary_equals_json_bit_for_bit_and_the_reference(client, dtype):
    """The seed's figure data (1000 points, four alphas in one broadcast call) in every dtype."""
    x = np.concatenate([np.linspace(-3, 3, 1000), [0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0]])
    xd = x.astype(DTYPES[dtype])
    for op in ("grad", "fun", "spike"):
        via = {t: getattr(client, op)(xd, alpha=ALPHAS, transport=t) for t in ("json", "npy", "npz")}
        # lists and float64 input with an explicit dtype: the server rounds once, the same way
        via["list"] = getattr(client, op)(xd.astype(np.float64).tolist(), alpha=ALPHAS.tolist(), dtype=dtype)
        for t, r in via.items():
            assert r.shape == (4, x.size) and r.dtype == DTYPES[dtype], (op, t)
            np.testing.assert_array_equal(bits(r), bits(via["json"]), err_msg=f"{op} {t}")
        a = ALPHAS.astype(DTYPES[dtype])
        want = {"grad": ref.pq_grad(xd, a), "fun": ref.pq_fun(xd, a), "spike": np.broadcast_to(ref.spike(xd), (4, x.size))}
        np.testing.assert_allclose(via["npy"].astype(np.float64), want[op], rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_a_million_elements_binary(client):
    x = np.linspace(-2, 2, 1_000_000, dtype=np.float32)
    g = client.grad(x, alpha=1.5, cotangent=2.0)
    assert g.shape == x.shape and g.dtype == np.float32
    np.testing.assert_allclose(g, 2.0 * ref.pq_grad(x, np.float32(1.5)), rtol=2e-6, atol=1e-5)


def test_one_connection_is_reused(server_url):
    opened = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            response = super().handle_request(request)
            opened.append(len(self._pool.connections))
            return response

    with scl.SurrogateClient(server_url, http_transport=Counting()) as c:
        for _ in range(5):
            c.spike(np.zeros(100))
            c.grad([0.5])
    assert opened == [1] * 10


def test_errors_from_the_real_server(client):
    with pytest.raises(scl.ValidationError) as info:
        client.grad(np.zeros(100), alpha=-1.0)
    assert (info.value.job, info.value.field, info.value.code) == (0, "alpha", "invalid_value")
    with pytest.raises(scl.ValidationError) as info:
        client.grad([70000.0], dtype="float16")
    assert info.value.code == "not_representable"
    with pytest.raises(scl.NotFound):
        client.surrogate("no_such_surrogate")


def test_unreachable_server_gives_up():
    with scl.SurrogateClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as c:
        with pytest.raises(scl.TransportError) as info:
            c.spike([1.0])
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_async_client_concurrently(server_url):
    async def main():
        async with scl.AsyncSurrogateClient(server_url) as c:
            assert await c.ready()
            xs = [np.linspace(-1, 1, 50 + i) for i in range(8)]
            outs = await asyncio.gather(*(c.grad(x, alpha=2.0) for x in xs))
            listing = await c.surrogates()
        return xs, outs, listing

    xs, outs, listing = asyncio.run(main())
    for x, g in zip(xs, outs):
        np.testing.assert_allclose(g, ref.pq_grad(x, 2.0), atol=1e-12)
    assert listing["default"] == "piecewise_quadratic"
