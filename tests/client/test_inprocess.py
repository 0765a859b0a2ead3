"""AsyncSurrogateClient against the service app in process (httpx.ASGITransport): fast, no ports."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import surrogate_client as scl

import reference as ref

pytestmark = pytest.mark.anyio

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
ALPHAS = np.array([[0.5], [1.0], [2.0], [4.0]])


def points(dtype: str) -> np.ndarray:
    """A grid over [-3, 3] plus the window edges, zeros and large values, exact in ``dtype``."""
    x = np.concatenate([np.linspace(-3, 3, 101), [0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 40.0]])
    return x.astype(DTYPES[dtype])


def bits(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a
    return a.view(f"u{a.dtype.itemsize}")


async def test_seed_example_both_ways(aclient):
    for transport in ("json", "npy", "npz"):
        s = await aclient.spike(SEED, transport=transport)
        assert s.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and s.dtype == np.float32
        g = await aclient.grad(SEED, alpha=1.0, transport=transport)
        assert g.tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
        assert (await aclient.grad(SEED, alpha=2.0, transport=transport)).tolist() == [0.0, 0.0, 2.0, 0.0, 0.0]
        assert (await aclient.fun(SEED, transport=transport)).tolist() == [0.0, 0.125, 0.5, 0.875, 1.0]


@pytest.mark.parametrize("dtype", list(DTYPES))
async def test_all_transports_agree_bit_for_bit_and_match_the_reference(aclient, dtype):
    x = points(dtype)
    for op in ("grad", "fun", "spike"):
        results = {t: await getattr(aclient, op)(x, alpha=ALPHAS, transport=t) for t in ("json", "npy", "npz")}
        for t, r in results.items():
            assert r.shape == (4, x.size) and r.dtype == DTYPES[dtype], (op, t)
        np.testing.assert_array_equal(bits(results["json"]), bits(results["npy"]))
        np.testing.assert_array_equal(bits(results["json"]), bits(results["npz"]))
        a = ALPHAS.astype(DTYPES[dtype])
        want = {"grad": ref.pq_grad(x, a), "fun": ref.pq_fun(x, a), "spike": np.broadcast_to(ref.spike(x), (4, x.size))}
        np.testing.assert_allclose(results["npy"].astype(np.float64), want[op], rtol=TOL[dtype],
                                   atol=TOL[dtype] * 4)


async def test_cotangent_gives_the_vjp(aclient):
    x = np.linspace(-1, 1, 64)
    c = np.linspace(-3, 3, 64)
    for transport in ("json", "npy"):
        got = await aclient.grad(x, cotangent=c, alpha=2.0, transport=transport)
        np.testing.assert_allclose(got, c * ref.pq_grad(x, 2.0), atol=1e-12)
    scalar = await aclient.grad(x, cotangent=3.0, transport="npy")
    np.testing.assert_allclose(scalar, 3.0 * ref.pq_grad(x, 1.0), atol=1e-12)


async def test_jax_arrays_in_numpy_arrays_out(aclient):
    x = jnp.linspace(-2, 2, 41, dtype=jnp.bfloat16)
    g = await aclient.grad(x, alpha=jnp.float32(1.0))
    assert isinstance(g, np.ndarray) and g.dtype == ml_dtypes.bfloat16 and g.shape == (41,)
    np.testing.assert_allclose(g.astype(np.float64), ref.pq_grad(np.asarray(x), 1.0), atol=1.6e-2)
    g32 = await aclient.grad(jnp.ones((2, 3), dtype=jnp.float32), transport="json")
    assert g32.dtype == np.float32 and g32.shape == (2, 3)


async def test_scalars_and_empty_arrays(aclient):
    for transport in ("auto", "json", "npy", "npz"):
        g = await aclient.grad(0.25, alpha=2.0, transport=transport)
        assert isinstance(g, np.ndarray) and g.shape == () and g == 1.0 and g.dtype == np.float32, transport
        s = await aclient.spike(np.float16(-0.5), transport=transport)
        assert s.shape == () and s == 0.0 and s.dtype == np.float16, transport
    for transport in ("auto", "npy", "npz"):
        e = await aclient.spike(np.zeros((0, 3)), transport=transport)
        assert e.shape == (0, 3) and e.dtype == np.float64
    e = await aclient.grad(np.zeros(0, np.float16), transport="json")
    assert e.shape == (0,) and e.dtype == np.float16


async def test_non_finite_inputs_travel_binary(aclient):
    s = await aclient.spike([np.nan, -np.inf, np.inf, 0.0] * 4)
    assert s.tolist()[:4] == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="JSON"):
        await aclient.spike([np.nan], transport="json")


async def test_batch(aclient):
    out = await aclient.batch("fun", [{"x": 0.5}, {"x": [0.1, 0.2], "alpha": 4, "dtype": "float64"}])
    assert out[0].shape == () and out[0] == 0.875 and out[0].dtype == np.float32
    np.testing.assert_allclose(out[1], ref.pq_fun([0.1, 0.2], 4.0), atol=1e-12)
    assert out[1].dtype == np.float64
    with pytest.raises(scl.ValidationError) as info:
        await aclient.batch("grad", [{"x": 1.0}, {"x": 1.0, "alpha": 0}])
    assert info.value.job == 1 and info.value.field == "alpha"


@pytest.mark.parametrize("transport", ["json", "npy", "npz"])
async def test_server_errors_are_typed_with_job_and_field(aclient, transport):
    with pytest.raises(scl.ValidationError) as info:
        await aclient.grad(np.zeros(20), alpha=-1.0, transport=transport)
    assert (info.value.status, info.value.code, info.value.job, info.value.field) == (422, "invalid_value", 0, "alpha")
    assert "must be finite and > 0" in info.value.message
    with pytest.raises(scl.ValidationError) as info:
        await aclient.grad(np.zeros(20), alpah=2.0, transport=transport)
    assert info.value.code == "unknown_field" and "alpha" in info.value.message
    with pytest.raises(scl.ValidationError) as info:
        await aclient.grad(np.zeros(20), alpha=np.ones(3), transport=transport)
    assert info.value.code == "shape_mismatch"
    with pytest.raises(scl.ValidationError) as info:
        await aclient.spike(np.zeros(20), surrogate="nope", transport=transport)
    assert info.value.code == "unknown_surrogate" and info.value.field == "surrogate"
    with pytest.raises(scl.ValidationError) as info:
        await aclient.spike(np.zeros(20), dtype="float8", transport=transport)
    assert info.value.code == "unknown_dtype"


async def test_payload_too_large(aclient):
    with pytest.raises(scl.PayloadTooLarge):
        await aclient.spike(np.zeros(600_000))  # 4.8 MB of float64 over the app's 4 MB limit


async def test_metadata_and_health(aclient):
    listing = await aclient.surrogates()
    assert listing["default"] == "piecewise_quadratic"
    pq = await aclient.surrogate("piecewise_quadratic")
    assert [p["name"] for p in pq["parameters"]] == ["alpha"]
    assert pq in listing["surrogates"]
    with pytest.raises(scl.NotFound) as info:
        await aclient.surrogate("no_such_thing")
    assert info.value.code == "unknown_surrogate"
    info_ = await aclient.info()
    assert info_["name"] == "surrogate-serve" and "float32" in info_["dtypes"]
    assert await aclient.health() == {"status": "ok"}
    assert await aclient.ready() is True
    await aclient.wait_ready(timeout=1)


async def test_bearer_token():
    import httpx

    from helpers import make_settings
    from service.app import create_app

    token = "client-test-token-0123456789"
    app = create_app(make_settings(api_token=token))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with scl.AsyncSurrogateClient("http://testserver", http_transport=transport, retries=0) as anon:
            assert await anon.health() == {"status": "ok"}  # probes stay open
            with pytest.raises(scl.AuthenticationError) as info:
                await anon.grad(SEED)
            assert info.value.status == 401 and info.value.code == "unauthorized"
            with pytest.raises(scl.AuthenticationError):
                await anon.surrogates()
        async with scl.AsyncSurrogateClient("http://testserver", http_transport=transport, token=token) as c:
            assert (await c.grad(SEED, transport="npy")).tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
            assert (await c.surrogates())["default"] == "piecewise_quadratic"
