"""surrogate_client.jax.scan against a real server: the backward pass of a scan fetches g'(x) for every
time step in one /v1/grad request per spike function, and the gradients and training losses are bit for
bit those of one request per time step (jax.lax.scan) and of local training with the same surrogate.

The local reference: H(x) forward; backward, the piecewise_quadratic g'(x) = alpha - alpha**2 |x| (0 for
|x| > 1/alpha) written in JAX, with alpha a power of two so that every operation of it is exact, times the
cotangent rounded once, as NumPy multiplies (a host callback: XLA on the CPU would contract a product in
the compiled program with the sum it feeds into a fused multiply-add)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from surrogate_client import SurrogateClient, TransportError, ValidationError  # noqa: E402

pytestmark = pytest.mark.e2e


# surrogate_client.jax is imported when a test runs, not when pytest collects this module (see test_jax.py)
def _jax_adapter():
    import surrogate_client.jax as adapter

    return adapter


def spike_function(*args, **kwargs):
    return _jax_adapter().spike_function(*args, **kwargs)


def scan(*args, **kwargs):
    return _jax_adapter().scan(*args, **kwargs)


@pytest.fixture(autouse=True)
def _x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def local_spike(alpha: float):
    """H(x) forward; backward ``cotangent * g'(x)`` for piecewise_quadratic, the product made by NumPy."""

    @jax.custom_vjp
    def spike(x):
        return (x >= 0).astype(x.dtype)

    def bwd(x, cotangent):
        ax = jnp.abs(x)
        g = jnp.where(ax > 1 / alpha, 0.0, alpha - alpha**2 * ax).astype(x.dtype)
        result = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return (jax.pure_callback(lambda c, g: np.multiply(c, g), result, cotangent, g, vmap_method="broadcast_all"),)

    spike.defvjp(lambda x: (spike(x), x), bwd)
    return spike


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def assert_same_bits(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    np.testing.assert_array_equal(_bits(a), _bits(b))


def _lif_loss(spikes_of, scanner, widths=(6,)):
    """Layers of leaky integrate-and-fire neurons over time by ``scanner`` (lax.scan or scan); the loss
    on the last layer's spike counts. ``spikes_of[i]`` is layer i's spike function."""

    def loss(weights, inputs, targets):
        def step(vs, x_t):
            new, h = [], x_t
            for i, (v, w) in enumerate(zip(vs, weights, strict=True)):
                v = 0.9 * v + h @ w
                h = spikes_of[i](v - 1.0)
                new.append(v - h)
            return new, h

        v0 = [jnp.zeros((inputs.shape[1], w.shape[1]), w.dtype) for w in weights]
        _, spikes = scanner(step, v0, inputs)
        return jnp.mean((spikes.mean(0) - targets) ** 2)

    return loss


def _lif_data(dtype, steps=10, batch=8, widths=(12, 6), seed=3):
    keys = jax.random.split(jax.random.key(seed), len(widths) + 1)
    inputs = (jax.random.uniform(keys[0], (steps, batch, widths[0])) < 0.5).astype(dtype)
    weights = [(jax.random.normal(k, (n_in, n_out)) * 1.2).astype(dtype)
               for k, n_in, n_out in zip(keys[1:-1], widths[:-1], widths[1:], strict=True)]
    targets = jax.random.uniform(keys[-1], (batch, widths[-1])).astype(dtype)
    return weights, inputs, targets


def _train(loss, weights, inputs, targets, steps=4):
    """Plain SGD under jit; the losses and the final weights."""
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    losses = []
    for _ in range(steps):
        value, g = value_and_grad(weights, inputs, targets)
        assert all(float(jnp.abs(gi).sum()) > 0 for gi in g)
        weights = [w - jnp.asarray(0.5, w.dtype) * gi for w, gi in zip(weights, g, strict=True)]
        losses.append(float(value))
    return losses, weights


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_losses_identical_local_per_step_per_scan(counted, dtype):
    c, transport = counted
    served = spike_function(c, "piecewise_quadratic", alpha=2.0)
    local = local_spike(2.0)
    data = _lif_data(dtype, widths=(12, 9, 6))
    runs, requests = {}, {}
    for name, spike, scanner in [("local", local, jax.lax.scan), ("per step", served, jax.lax.scan),
                                 ("per scan", served, scan)]:
        start = transport.count()
        runs[name] = _train(_lif_loss([spike, spike], scanner), *data)
        requests[name] = (transport.count() - start) / 4
    assert requests == {"local": 0, "per step": 2 * 10, "per scan": 1}  # 2 layers x 10 steps, or 1
    assert len(set(runs["local"][0])) > 1  # the loss moves
    for name in ("per step", "per scan"):
        assert runs[name][0] == runs["local"][0], name
        for w, w_local in zip(runs[name][1], runs["local"][1], strict=True):
            assert_same_bits(w, w_local)


SURROGATES = [("sigmoid", {"alpha": 4.0}), ("gaussian_grad", {"sigma": 0.7, "alpha": 0.8}),
              ("piecewise_quadratic", {"alpha": 0.7})]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(("surrogate", "params"), SURROGATES, ids=[s for s, _ in SURROGATES])
def test_scan_gradients_are_the_per_step_gradients_bit_for_bit(counted, surrogate, params, dtype):
    c, transport = counted
    spike = spike_function(c, surrogate, **params)
    weights, inputs, targets = _lif_data(dtype)
    per_step = jax.jit(jax.grad(_lif_loss([spike], jax.lax.scan)))(weights, inputs, targets)
    start = transport.count()
    per_scan = jax.jit(jax.grad(_lif_loss([spike], scan)))(weights, inputs, targets)
    assert transport.count() - start == 1
    assert float(jnp.abs(per_scan[0].astype("float32")).sum()) > 0
    assert_same_bits(per_scan[0], per_step[0])


def test_per_step_gradients_are_the_services_product(client):
    """The per-step backward pass fetches g'(x) alone and multiplies locally: the same bits as the
    service's own product, the cotangent sent with x (SpikeFunction.vjp)."""
    def by_service(spike):
        @jax.custom_vjp
        def f(x):
            return spike(x)

        def bwd(x, cotangent):
            result = jax.ShapeDtypeStruct(x.shape, x.dtype)
            return (jax.pure_callback(spike.vjp, result, x, cotangent),)

        f.defvjp(lambda x: (f(x), x), bwd)
        return f

    for dtype in ("float16", "float32", "float64"):
        for surrogate, params in SURROGATES:
            spike = spike_function(client, surrogate, **params)
            data = _lif_data(dtype)
            ours = jax.jit(jax.grad(_lif_loss([spike], jax.lax.scan)))(*data)
            theirs = jax.jit(jax.grad(_lif_loss([by_service(spike)], jax.lax.scan)))(*data)
            assert_same_bits(ours[0], theirs[0])


def test_layers_of_other_shapes_and_spike_functions(counted):
    """Calls of one spike function on layers of different widths go in one request (flat, array
    parameters broadcast to each); two spike functions make two requests."""
    c, transport = counted
    data = _lif_data("float32", widths=(12, 8, 5))
    per_neuron = spike_function(c, "sigmoid", alpha=np.linspace(2.0, 5.0, 8))
    shared = spike_function(c, "piecewise_quadratic", alpha=1.5)
    for spikes, expected in [([shared, shared], 1), ([per_neuron, shared], 2)]:
        per_step = jax.jit(jax.grad(_lif_loss(spikes, jax.lax.scan)))(*data)
        start = transport.count()
        per_scan = jax.jit(jax.grad(_lif_loss(spikes, scan)))(*data)
        assert transport.count() - start == expected
        for a, b in zip(per_scan, per_step, strict=True):
            assert_same_bits(a, b)
    two_shapes = spike_function(c, "sigmoid", alpha=np.linspace(2.0, 5.0, 3))

    def loss(x):  # one spike function, inputs of shapes (4, 3) and (2, 3) every step
        def step(carry, x_t):
            return carry, two_shapes(x_t).sum() + 2 * two_shapes(x_t[:2] * 1.5).sum()

        return scan(step, 0.0, x)[1].sum()

    x = jax.random.normal(jax.random.key(1), (5, 4, 3), "float32")
    start = transport.count()
    g = jax.jit(jax.grad(loss))(x)
    assert transport.count() - start == 1
    alpha = jnp.linspace(2.0, 5.0, 3, dtype="float32")
    expected = np.asarray(c.grad(x, surrogate="sigmoid", alpha=np.linspace(2.0, 5.0, 3), dtype="float32"))
    expected[:, :2] += np.asarray(c.grad(x[:, :2] * 1.5, surrogate="sigmoid", alpha=alpha, dtype="float32")) * 3
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_forward_is_lax_scan_and_makes_no_request(counted):
    c, transport = counted
    spike = spike_function(c, "sigmoid", alpha=4.0)
    weights, inputs, _ = _lif_data("float32")

    def run(scanner):
        def step(v, x_t):
            v = 0.9 * v + x_t @ weights[0]
            s = spike(v - 1.0)
            return v - s, (s, v)

        return scanner(step, jnp.zeros((inputs.shape[1], 6)), inputs)

    start = transport.count()
    expected = jax.jit(lambda: run(jax.lax.scan))()
    for result in (jax.jit(lambda: run(scan))(), run(scan)):
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True):
            assert_same_bits(a, b)
    assert float(expected[1][0].sum()) > 0
    assert transport.count() == start


def test_scan_arguments_eager_and_vmap(counted):
    """reverse, length without xs, unroll; grad outside jit; vmap over sequences: one request each."""
    c, transport = counted
    spike = spike_function(c, "sigmoid", alpha=3.0)
    w = jax.random.normal(jax.random.key(4), (4, 5), "float32")
    xs = jax.random.normal(jax.random.key(5), (7, 3, 4), "float32")

    def loss(scanner, **kw):
        def f(w, xs):
            def step(v, x_t):
                v = 0.8 * v + (x_t @ w if x_t is not None else 0.3 * w.sum(0)[None])
                s = spike(v - 0.5)
                return v - s, s * jnp.arange(1.0, 6.0)[None]

            init = jnp.zeros((3, 5))
            if "length" in kw:
                return scanner(step, jnp.ones((3, 4)) @ w, None, **kw)[1].sum()
            return scanner(step, init, xs, **kw)[1].sum()

        return f

    for kw in ({"reverse": True}, {"length": 6}, {"unroll": 3}):
        per_step = jax.grad(loss(jax.lax.scan, **kw))(w, xs)
        for jit in (True, False):
            grad = jax.grad(loss(scan, **kw))
            start = transport.count()
            per_scan = (jax.jit(grad) if jit else grad)(w, xs)
            assert transport.count() - start == 1, kw
            assert_same_bits(per_scan, per_step)
    batched = xs.reshape(7, 3, 1, 4).transpose(1, 0, 2, 3)  # 3 sequences of 7 steps, batch 1
    per_step = jax.vmap(jax.grad(loss(jax.lax.scan)), in_axes=(None, 0))(w, batched)
    start = transport.count()
    per_scan = jax.jit(jax.vmap(jax.grad(loss(scan)), in_axes=(None, 0)))(w, batched)
    assert transport.count() - start == 1
    assert_same_bits(per_scan, per_step)


def test_call_inside_a_nested_transformation_is_not_deferred(counted):
    c, transport = counted
    spike = spike_function(c, "sigmoid", alpha=3.0)
    xs = jax.random.normal(jax.random.key(6), (5, 2, 3), "float32")

    def loss(scanner):
        def step(carry, x_t):
            return carry, jax.vmap(spike)(x_t) * jnp.arange(1.0, 4.0)[None] + spike(0.5 * x_t)

        return lambda xs: scanner(step, 0.0, xs)[1].sum()

    per_step = jax.grad(loss(jax.lax.scan))(xs)
    start = transport.count()
    per_scan = jax.jit(jax.grad(loss(scan)))(xs)
    assert transport.count() - start == 5 + 1  # the vmapped call: one per step; the direct one: one
    assert_same_bits(per_scan, per_step)


def test_service_errors_in_the_scan_backward(counted):
    c, transport = counted
    adapter = _jax_adapter()
    spike = spike_function(c, "piecewise_quadratic", alpha=300.0)  # alpha**2 overflows float16
    xs = jnp.zeros((4, 5), "float16")
    grad = jax.grad(lambda xs: scan(lambda c, x: (c, spike(x)), 0.0, xs)[1].sum())
    with pytest.raises(ValidationError) as info:  # outside jit: the client's exception itself
        grad(xs)
    assert info.value.code == "not_representable"
    with pytest.raises(ValidationError), adapter.service_errors():
        jax.jit(grad)(xs)
    spike = spike_function(c, "sigmoid", alpha=4.0)
    grad = jax.jit(jax.grad(lambda xs: scan(lambda c, x: (c, spike(x)), 0.0, xs)[1].sum()))
    transport.down = True
    with pytest.raises(TransportError), adapter.service_errors():
        grad(jnp.ones((4, 5), "float32"))


def test_requests_split_at_the_servers_element_limit():
    """A backward pass over more elements than one request may hold is several requests, each within
    the server's limit: exactly at the limit one request, one element more two."""
    from liveserver import running_server

    class Counting(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.paths: list[str] = []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.paths.append(request.url.path)
            return super().handle_request(request)

        def count(self) -> int:
            return self.paths.count("/v1/grad")

    with running_server(max_elements=60, warmup_max_elements=60) as (base, _proc):
        transport = Counting()
        with SurrogateClient(base, http_transport=transport, retries=0) as c:
            spike = spike_function(c, "sigmoid", alpha=2.0)
            for shape, expected in [((5, 3, 4), 1), ((61, 1, 1), 2), ((4, 4, 4), 2)]:
                x = jax.random.normal(jax.random.key(shape[0]), shape, "float32")

                def loss(scanner, x=x):
                    return scanner(lambda c, x_t: (c, spike(x_t)), 0.0, x)[1].sum()

                per_step = jax.grad(lambda x: loss(jax.lax.scan, x))(x)
                start = transport.count()
                per_scan = jax.jit(jax.grad(lambda x: loss(scan, x)))(x)
                assert transport.count() - start == expected, shape
                assert_same_bits(per_scan, per_step)
