"""The spike of every number by its sign bit, subnormals included, in every dtype and on every path.

XLA on the CPU flushes subnormals to zero, so a float comparison ``x >= 0`` inside a compiled kernel
says 1 for a negative subnormal (it sees -0.0). ``H(x) = 1 where x >= 0`` says 0. The reference here
is NumPy on the integer bits of each value: 1 where the sign bit is clear (NaN excepted), 1 at
``-0.0`` (``-0.0 >= 0``, as braintools has it), else 0. It is compared with the core, ``/v1`` JSON and
``.npy``, ``/v2`` binary, and the forward pass of the torch and JAX adapters. The gradient is not
touched by any of this: it is checked at the same points against the piecewise-quadratic formula."""

from __future__ import annotations

import asyncio
import io

import httpx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orjson
import pytest
from helpers import WIRE, App, npy, tensor
from helpers import body as v2_body

import surrogate_client
import surrogate_core as sc

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
DATATYPE = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64"}
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
MANTISSA = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}


def values(name: str) -> np.ndarray:
    """Numbers of dtype ``name`` made from their bits: every subnormal of the 16-bit types, the smallest,
    the largest and a random sample of the others' (both signs), the zeros, the smallest normals, ones,
    infinities and NaNs of both signs."""
    dt = DTYPES[name]
    u = UINT[dt.itemsize]
    m = MANTISSA[name]
    bits = 8 * dt.itemsize
    sign = 1 << (bits - 1)
    top = (1 << m) - 1  # the largest subnormal's mantissa
    if m <= 10:
        mantissas = list(range(1, top + 1))
    else:
        rng = np.random.default_rng(m)
        mantissas = [*range(1, 65), *range(top - 63, top + 1), *(int(v) for v in rng.integers(1, top, 256))]
    special = [0, 1 << m, (1 << m) + 1, int(np.asarray(1.0, dt).view(u)), int(np.asarray(np.inf, dt).view(u)),
               int(np.asarray(np.inf, dt).view(u)) | (1 << (m - 1))]  # 0, the smallest normals, 1.0, inf, a quiet NaN
    positive = [*mantissas, *special]
    out = np.array([*positive, *(p | sign for p in positive)], dtype=u)
    return out.view(dt)


def reference(x: np.ndarray) -> np.ndarray:
    """H(x) from the bits of x, in float64: the sign bit clear and not NaN, or -0.0."""
    u = UINT[x.dtype.itemsize]
    bits = x.view(u).astype(np.uint64)
    width = 8 * x.dtype.itemsize
    sign = bits >> np.uint64(width - 1)
    magnitude = bits & np.uint64((1 << (width - 1)) - 1)
    inf = np.uint64(int(np.asarray(np.inf, x.dtype).view(u)))
    return (((sign == 0) & (magnitude <= inf)) | (magnitude == 0)).astype(np.float64)


def finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x.astype(np.float64))]


@pytest.mark.parametrize("name", list(DTYPES))
def test_the_values_hold_negative_subnormals_and_the_reference_gives_them_0(name):
    x = values(name)
    w = x.astype(np.float64)
    negative_subnormal = (w < 0) & (w > -float(ml_dtypes.finfo(x.dtype).smallest_normal))
    assert negative_subnormal.sum() >= 127
    assert (reference(x)[negative_subnormal] == 0).all()
    # hand-picked: -0.0 -> 1, 0.0 -> 1, the smallest negative subnormal -> 0, NaN -> 0, -inf -> 0
    tiny = np.array([1], UINT[x.dtype.itemsize]).view(x.dtype)
    picks = np.array([-0.0, 0.0, -tiny[0], tiny[0], np.nan, -np.inf, np.inf], x.dtype)
    assert reference(picks).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("name", list(DTYPES))
def test_the_core_spikes_by_the_sign_bit(name):
    x = values(name)
    got = sc.spike(x, dtype=name)
    assert got.dtype == DTYPES[name]
    np.testing.assert_array_equal(got.astype(np.float64), reference(x))
    # also within a larger batch (another bucket, another compiled variant), and as one element
    big = np.resize(x, 5000)
    np.testing.assert_array_equal(sc.spike(big, dtype=name).astype(np.float64), reference(big))
    for v in x[:3]:
        assert float(sc.spike(np.asarray(v), dtype=name)) == reference(np.asarray([v]))[0]


@pytest.mark.parametrize("name", ["float32", "float64", "bfloat16"])
def test_the_gradient_at_subnormals_is_unchanged(name):
    # g'(x) = alpha - alpha**2 |x| for |x| <= 1/alpha: alpha at a subnormal (|x| is lost in alpha)
    x = finite(values(name))
    got = sc.grad(x, dtype=name, alpha=1.0).astype(np.float64)
    want = np.where(np.abs(x.astype(np.float64)) <= 1.0, 1.0 - np.abs(x.astype(np.float64)), 0.0)
    np.testing.assert_allclose(got, want.astype(DTYPES[name]).astype(np.float64), rtol=0, atol=0)


# -- through the service ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    """(post, transport): ``post(path, **kw)`` against one app in process for the module, and a
    synchronous httpx transport to the same app for the client adapters."""
    runner = asyncio.Runner()
    app = App()
    runner.run(app.__aenter__())

    class Transport(httpx.BaseTransport):
        asgi = httpx.ASGITransport(app=app.app)

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.read()

            async def go():
                r = await self.asgi.handle_async_request(request)
                content = b"".join([c async for c in r.aiter_raw()])
                await r.aclose()
                return r.status_code, r.headers, content

            status, headers, content = runner.run(go())
            return httpx.Response(status, headers=headers, content=content, request=request)

    def post(path: str, **kw) -> httpx.Response:
        return runner.run(app.client.post(path, **kw))

    yield post, Transport()
    runner.run(app.__aexit__(None, None, None))
    runner.close()


@pytest.mark.parametrize("name", list(DTYPES))
def test_v1_json_spikes_by_the_sign_bit(served, name):
    post, _ = served
    x = finite(values(name))  # JSON has no NaN or infinity
    r = post("/v1/spike", json={"x": x.astype(np.float64).tolist(), "dtype": name})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(r.json()["spike"]), reference(x))


@pytest.mark.parametrize("name", list(DTYPES))
def test_v1_npy_spikes_by_the_sign_bit(served, name):
    post, _ = served
    x = values(name)
    wire = x.astype(np.float32) if name == "bfloat16" else x  # bfloat16 travels as float32 (exact)
    r = post(f"/v1/spike?dtype={name}", content=npy(wire),
             headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(got.astype(np.float64), reference(x))


@pytest.mark.parametrize("name", list(DTYPES))
def test_v2_binary_spikes_by_the_sign_bit(served, name):
    post, _ = served
    x = values(name)
    datatype = DATATYPE[name]
    t, raw = tensor("x", x, datatype=datatype, binary=True)
    content, headers = v2_body({"inputs": [t], "outputs": [{"name": "spike", "parameters": {"binary_data": True}}]},
                               [raw])
    r = post("/v2/models/piecewise_quadratic/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    (out,) = orjson.loads(r.content[:n])["outputs"]
    assert out["datatype"] == datatype
    got = np.frombuffer(r.content[n:], dtype=np.dtype(WIRE[datatype]))
    np.testing.assert_array_equal(got.astype(np.float64), reference(x))


# -- the adapters' forward pass -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DTYPES))
def test_the_torch_adapter_forward_spikes_by_the_sign_bit(served, name):
    torch = pytest.importorskip("torch")
    from surrogate_client.torch import spike_function

    _, transport = served
    x = values(name)
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
              "float64": torch.float64}[name]
    # the same bits in a torch tensor (torch has no view from ml_dtypes' bfloat16: go through the integers)
    signed = {2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]
    xt = torch.from_numpy(x.view(signed).copy()).view(tdtype)
    with surrogate_client.SurrogateClient("http://t", http_transport=transport, retries=0) as c:
        spike = spike_function(c, "piecewise_quadratic", alpha=1.0)
        for flush in (False, True):  # torch's own setting: subnormals flushed to zero on the CPU, as XLA does
            if flush and not torch.set_flush_denormal(True):
                continue  # not supported by this CPU
            try:
                out = spike(xt)
                assert out.dtype == tdtype
                np.testing.assert_array_equal(out.double().numpy(), reference(x))
                np.testing.assert_array_equal(spike(xt.reshape(2, -1)[:, ::2]).double().numpy().ravel(),
                                              reference(x.reshape(2, -1)[:, ::2].ravel()))  # strided
                np.testing.assert_array_equal(spike(xt[0]).double().numpy(), reference(x[:1])[0])  # 0-d
            finally:
                torch.set_flush_denormal(False)


@pytest.mark.parametrize("name", list(DTYPES))
def test_the_jax_adapter_forward_spikes_by_the_sign_bit(served, name):
    from surrogate_client.jax import spike_function

    _, transport = served
    x = values(name)
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with surrogate_client.SurrogateClient("http://t", http_transport=transport, retries=0) as c:
            spike = spike_function(c, "piecewise_quadratic", alpha=1.0)
            xj = jnp.asarray(x)
            assert xj.dtype == x.dtype
            for f in (spike, jax.jit(spike)):  # eager, and compiled by XLA (where subnormals are flushed)
                out = f(xj)
                assert out.dtype == x.dtype
                np.testing.assert_array_equal(np.asarray(out).astype(np.float64), reference(x))
    finally:
        jax.config.update("jax_enable_x64", before)
