"""surrogate_client.torch and surrogate_client.jax against the service app in process: fast, no port,
no server process (the end-to-end tests in test_torch.py and test_jax.py cover the real server).

The adapters take a synchronous ``SurrogateClient``, whose ``http_transport`` is an
``httpx.BaseTransport``; the app is driven through ``httpx.ASGITransport`` (asynchronous) on an event
loop in a thread of its own, with the app's lifespan run there. Forward: ``H(x) = 1 where x >= 0``,
computed locally. Backward: ``cotangent * g'(x)`` from the service, compared with autodiff (torch
autograd, ``jax.grad``) of a local reference spike with the piecewise_quadratic surrogate
``g'(x) = alpha - alpha**2 |x|`` for ``|x| <= 1/alpha``, else 0."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from helpers import torch_local_spike

import surrogate_client

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
# the points where the spike or the surrogate changes: 0, -0.0, the window edges of alpha in ALPHAS
EDGES = [0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1e-30, -1e-30]
ALPHAS = [0.5, 1.0, 2.0]


class InProcessTransport(httpx.BaseTransport):
    """A synchronous httpx transport over ``httpx.ASGITransport(app)``: the app and its lifespan run
    on an event loop in a daemon thread; requests (from any thread) are counted by path."""

    def __init__(self, app) -> None:
        self.paths: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asgi-app", daemon=True)
        self._thread.start()
        self._asgi = httpx.ASGITransport(app=app)
        self._lifespan = app.router.lifespan_context(app)
        try:
            self._run(self._lifespan.__aenter__())
        except BaseException:
            self._stop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        request.read()

        async def send() -> tuple[int, httpx.Headers, bytes]:
            response = await self._asgi.handle_async_request(request)
            body = b"".join([chunk async for chunk in response.aiter_raw()])
            await response.aclose()
            return response.status_code, response.headers, body

        status, headers, body = self._run(send())
        return httpx.Response(status, headers=headers, content=body, request=request)

    def count(self, path: str = "/v1/grad") -> int:
        return self.paths.count(path)

    def shutdown(self) -> None:
        try:
            self._run(self._lifespan.__aexit__(None, None, None))
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


@pytest.fixture(scope="module")
def app():
    from helpers import make_settings

    from service.app import create_app

    return create_app(make_settings(max_elements=100_000, max_body_bytes=2_000_000))


@pytest.fixture(scope="module")
def inprocess(app) -> Iterator[InProcessTransport]:
    transport = InProcessTransport(app)
    try:
        yield transport
    finally:
        transport.shutdown()


@pytest.fixture
def counted(inprocess) -> Iterator[tuple[surrogate_client.SurrogateClient, InProcessTransport]]:
    """A client (no retries) of the in-process app, and its transport (requests counted by path)."""
    inprocess.paths.clear()
    with surrogate_client.SurrogateClient("http://testserver", http_transport=inprocess, retries=0) as c:
        yield c, inprocess


def pq_grad(x: np.ndarray, alpha: float) -> np.ndarray:
    """g'(x) of piecewise_quadratic in float64 (NumPy, shares no code with the service)."""
    ax = np.abs(np.asarray(x, np.float64))
    return np.where(ax > 1.0 / alpha, 0.0, alpha - alpha**2 * ax)


def test_the_in_process_client_reaches_the_service(counted):
    c, transport = counted
    assert c.grad(SEED, alpha=1.0).tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert transport.paths == ["/v1/grad"]


# -- PyTorch --------------------------------------------------------------------------------------


@pytest.fixture
def torch_adapter():
    torch = pytest.importorskip("torch")
    from surrogate_client.torch import spike_function

    return torch, spike_function


def _torch_local_spike(torch, alpha: float):
    """H(x) forward, ``grad_output * g'(x)`` backward, all in torch (no service)."""

    def grad(x):
        ax = x.abs()
        return torch.where(ax > 1 / alpha, torch.zeros_like(x), alpha - alpha**2 * ax)

    return torch_local_spike(grad)


def test_torch_forward_is_the_spike_and_asks_nothing(counted, torch_adapter):
    torch, spike_function = torch_adapter
    c, transport = counted
    spike = spike_function(c, "piecewise_quadratic", alpha=2.0)
    made = list(transport.paths)  # the checks when made: the surrogate, and one grad
    assert made == ["/v1/surrogates/piecewise_quadratic", "/v1/grad"]
    values = [*EDGES, 3.0, -3.0, math.inf, -math.inf, math.nan]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor(values, dtype=dtype, requires_grad=True)
        y = spike(x)
        assert y.dtype == dtype
        assert y.tolist() == [1.0 if v >= 0 else 0.0 for v in x.tolist()]  # NaN gives 0
    assert transport.paths == made  # the forward pass never calls the service


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_backward_is_cotangent_times_the_surrogate(counted, torch_adapter, alpha, dtype):
    torch, spike_function = torch_adapter
    c, transport = counted
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat([torch.tensor(EDGES, dtype=tdtype), 1.5 / alpha * torch.randn(200, generator=gen, dtype=tdtype)])
    w = torch.randn(x0.shape, generator=gen, dtype=tdtype)  # a non-trivial incoming gradient
    results = {}
    for name, spike in (("served", spike_function(c, alpha=alpha)), ("local", _torch_local_spike(torch, alpha))):
        x = x0.clone().requires_grad_(True)
        loss = (spike(x) * w).sum()
        start = transport.count()
        loss.backward()
        results[name] = (loss.detach(), x.grad, transport.count() - start)
    (loss, grad, requests), (local_loss, local_grad, _) = results["served"], results["local"]
    assert requests == 1  # one /v1/grad per backward pass
    assert grad.dtype == tdtype
    assert grad.shape == x0.shape
    assert int((grad != 0).sum()) > 50
    torch.testing.assert_close(loss, local_loss, rtol=0, atol=0)
    tol = {"float32": {"rtol": 2e-6, "atol": 1e-7}, "float64": {"rtol": 1e-12, "atol": 1e-15}}[dtype]
    torch.testing.assert_close(grad, local_grad, **tol)
    np.testing.assert_allclose(grad.numpy(), w.numpy() * pq_grad(x0.numpy(), alpha), **tol)


def test_torch_gradients_through_a_layer_equal_local_autograd(counted, torch_adapter):
    torch, spike_function = torch_adapter
    c, transport = counted
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 6, generator=gen)
    weight0 = 0.5 * torch.randn(6, 10, generator=gen)
    targets = (torch.rand(32, 10, generator=gen) < 0.5).float()
    results = {}
    for name, spike in (("served", spike_function(c, alpha=1.0)), ("local", _torch_local_spike(torch, 1.0))):
        weight = weight0.clone().requires_grad_(True)
        loss = torch.nn.functional.mse_loss(spike(inputs @ weight), targets)
        loss.backward()
        results[name] = (loss.item(), weight.grad)
    assert results["served"][0] == results["local"][0]
    assert float(results["served"][1].abs().sum()) > 0
    torch.testing.assert_close(results["served"][1], results["local"][1], rtol=1e-5, atol=1e-7)
    # nothing needs a gradient: no request
    start = transport.count()
    with torch.no_grad():
        spike_function(c, alpha=1.0)(inputs @ weight0)
    assert transport.count() == start + 1  # only the check when made


# -- JAX ------------------------------------------------------------------------------------------


@pytest.fixture
def jax_adapter():
    """JAX with x64 on (float64 inputs) for the test, restored after it; the adapter's spike_function."""
    jax = pytest.importorskip("jax")
    from surrogate_client.jax import spike_function

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield jax, spike_function
    finally:
        jax.config.update("jax_enable_x64", before)


def _jax_local_spike(jax, alpha: float):
    """H(x) forward, ``cotangent * g'(x)`` backward, all in JAX (no service)."""
    jnp = jax.numpy

    @jax.custom_vjp
    def spike(x):
        return (x >= 0).astype(x.dtype)

    def fwd(x):
        return spike(x), x

    def bwd(x, g):
        ax = jnp.abs(x)
        return (g * jnp.where(ax > 1 / alpha, 0.0, alpha - alpha**2 * ax).astype(x.dtype),)

    spike.defvjp(fwd, bwd)
    return spike


def test_jax_forward_is_the_spike_and_asks_nothing(counted, jax_adapter):
    jax, spike_function = jax_adapter
    c, transport = counted
    spike = spike_function(c, "piecewise_quadratic", alpha=2.0)
    made = list(transport.paths)
    values = [*EDGES, 3.0, -3.0, math.inf, -math.inf, math.nan]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        x = jax.numpy.asarray(values, dtype)
        for fn in (spike, jax.jit(spike)):
            y = fn(x)
            assert y.dtype == dtype
            assert y.tolist() == [1.0 if v >= 0 else 0.0 for v in x.tolist()]  # NaN gives 0
    assert transport.paths == made


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jax_backward_is_cotangent_times_the_surrogate(counted, jax_adapter, alpha, dtype):
    jax, spike_function = jax_adapter
    jnp = jax.numpy
    c, transport = counted
    kx, kw = jax.random.split(jax.random.key(0))
    x = jnp.concatenate([jnp.asarray(EDGES, dtype), 1.5 / alpha * jax.random.normal(kx, (200,), dtype)])
    w = jax.random.normal(kw, x.shape, dtype)
    tol = {"float32": {"rtol": 2e-6, "atol": 1e-7}, "float64": {"rtol": 1e-12, "atol": 1e-15}}[dtype]
    expected = np.asarray(w, np.float64) * pq_grad(np.asarray(x), alpha)
    local = jax.value_and_grad(lambda x: jnp.sum(_jax_local_spike(jax, alpha)(x) * w))
    local_loss, local_grad = local(x)
    spike = spike_function(c, alpha=alpha)
    served = jax.value_and_grad(lambda x: jnp.sum(spike(x) * w))
    for fn in (served, jax.jit(served)):  # eager (the client called directly) and compiled (pure_callback)
        start = transport.count()
        loss, grad = fn(x)
        assert transport.count() - start == 1
        assert grad.dtype == dtype
        assert grad.shape == x.shape
        assert int((grad != 0).sum()) > 50
        assert float(loss) == float(local_loss)
        np.testing.assert_allclose(grad, local_grad, **tol)
        np.testing.assert_allclose(grad, expected, **tol)


def test_jax_gradients_through_a_layer_equal_local_autodiff(counted, jax_adapter):
    jax, spike_function = jax_adapter
    jnp = jax.numpy
    c, _ = counted
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    inputs = jax.random.normal(k1, (32, 6), "float32")
    weight = 0.5 * jax.random.normal(k2, (6, 10), "float32")
    targets = (jax.random.uniform(k3, (32, 10)) < 0.5).astype("float32")

    def loss_fn(spike):
        return lambda weight: jnp.mean((spike(inputs @ weight) - targets) ** 2)

    served_loss, served = jax.jit(jax.value_and_grad(loss_fn(spike_function(c, alpha=1.0))))(weight)
    local_loss, local = jax.jit(jax.value_and_grad(loss_fn(_jax_local_spike(jax, 1.0))))(weight)
    assert float(served_loss) == float(local_loss)
    assert float(jnp.abs(served).sum()) > 0
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-7)
