"""surrogate_client.jax against a real server: gradients equal ``jax.grad`` of a local custom_vjp
with the same formula, under jit, scan (backpropagation through time) and vmap."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from surrogate_client import NotFound, TransportError, ValidationError  # noqa: E402

pytestmark = pytest.mark.e2e


# surrogate_client.jax is imported when a test runs, not when pytest collects this module: importing a
# submodule binds its name on the package, which tests of the package's public names look at.
def service_errors(*args, **kwargs):
    from surrogate_client.jax import service_errors as made

    return made(*args, **kwargs)


def spike_function(*args, **kwargs):
    from surrogate_client.jax import spike_function as made

    return made(*args, **kwargs)


@pytest.fixture(autouse=True)
def _x64():
    """float64 needs JAX's x64 mode: on for these tests, restored after each."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# -- local reference: the formulas of surrogate_core/_surrogates.py (braintools), in jnp ---------


def _pq(x, alpha):
    ax = jnp.abs(x)
    return jnp.where(ax > 1 / alpha, 0.0, alpha - alpha**2 * ax).astype(x.dtype)


def _sigmoid(x, alpha):
    s = jax.nn.sigmoid(alpha * x)
    return (1 - s) * s * alpha


def _piecewise_leaky_relu(x, c, w):
    return jnp.where(jnp.abs(x) > w, c, 1 / (2 * w)).astype(x.dtype)


def _gaussian_grad(x, sigma, alpha):
    return alpha * jnp.exp(-(x**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)


FORMULAS = {
    "piecewise_quadratic": _pq,
    "sigmoid": _sigmoid,
    "piecewise_leaky_relu": _piecewise_leaky_relu,
    "gaussian_grad": _gaussian_grad,
}


def local_spike(surrogate: str, **params):
    """H(x) forward, ``cotangent * g'(x)`` backward, all in JAX (no service)."""
    formula = FORMULAS[surrogate]

    @jax.custom_vjp
    def spike(x):
        return (x >= 0).astype(x.dtype)

    def fwd(x):
        return spike(x), x

    def bwd(x, g):
        ps = {k: jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape) for k, v in params.items()}
        return (g * formula(x, **ps),)

    spike.defvjp(fwd, bwd)
    return spike


CASES = [
    ("piecewise_quadratic", {"alpha": 0.5}),
    ("piecewise_quadratic", {"alpha": 1.0}),
    ("piecewise_quadratic", {"alpha": 2.0}),
    ("sigmoid", {"alpha": 4.0}),
    ("piecewise_leaky_relu", {"c": 0.05, "w": 0.5}),
    ("gaussian_grad", {"sigma": 0.7, "alpha": 0.8}),
]
TOL = {"float32": {"rtol": 2e-6, "atol": 1e-7}, "float64": {"rtol": 1e-12, "atol": 1e-15}}


def _inputs(dtype, shape=(64, 33), seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return 1.5 * jax.random.normal(kx, shape, dtype), jax.random.normal(kw, shape, dtype)


def _loss(spike):
    return lambda x, w: jnp.sum(spike(x) * w)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("surrogate", "params"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_gradients_equal_local_jax_grad(client, surrogate, params, dtype):
    x, w = _inputs(dtype)
    served = jax.grad(_loss(spike_function(client, surrogate, **params)))(x, w)
    local = jax.grad(_loss(local_spike(surrogate, **params)))(x, w)
    assert served.dtype == dtype
    assert served.shape == x.shape
    assert int((served != 0).sum()) > 100
    np.testing.assert_allclose(served, local, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parameters_as_arrays(client, dtype):
    x, w = _inputs(dtype, (16, 8))
    for alpha in (np.linspace(0.5, 2.0, 8), jnp.linspace(0.5, 3.0, 16).reshape(16, 1)):
        served = jax.jit(jax.grad(_loss(spike_function(client, alpha=alpha))))(x, w)
        expected = w * _pq(x, jnp.broadcast_to(jnp.asarray(alpha, dtype), x.shape))
        np.testing.assert_allclose(served, expected, **TOL[dtype])


def test_forward_is_the_exact_spike(counted):
    c, transport = counted
    spike = spike_function(c, "sigmoid", alpha=4.0)
    before = list(transport.paths)
    values = [-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, math.inf, -math.inf, math.nan]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        x = jnp.asarray(values, dtype)
        y = jax.jit(spike)(x)
        assert y.dtype == dtype
        assert y.tolist() == [1.0 if v >= 0 else 0.0 for v in x.tolist()]  # NaN gives 0
    assert transport.paths == before


def test_jit_grad_one_request_per_call(counted):
    c, transport = counted
    spike = spike_function(c, alpha=2.0)
    x, w = _inputs("float32", (10, 20))
    step = jax.jit(jax.grad(_loss(spike)))
    start = transport.count()
    for i in range(3):
        np.testing.assert_allclose(step(x + i, w), w * _pq(x + i, 2.0), **TOL["float32"])
    assert transport.count() - start == 3


def test_vmap_is_one_request_for_the_batch(counted):
    c, transport = counted
    spike = spike_function(c, "sigmoid", alpha=4.0)
    x, w = _inputs("float32", (5, 7, 3))
    start = transport.count()
    per_example = jax.jit(jax.vmap(jax.grad(_loss(spike))))(x, w)
    assert transport.count() - start == 1
    np.testing.assert_allclose(per_example, w * _sigmoid(x, 4.0), **TOL["float32"])
    # a parameter per trailing element broadcasts under the batch axis too
    alpha = np.linspace(1.0, 4.0, 3)
    per_example = jax.vmap(jax.grad(_loss(spike_function(c, "sigmoid", alpha=alpha))))(x, w)
    expected = w * _sigmoid(x, jnp.broadcast_to(jnp.asarray(alpha, x.dtype), x.shape))
    np.testing.assert_allclose(per_example, expected, **TOL["float32"])


def _lif_loss(spike, steps=12):
    """A layer of leaky integrate-and-fire neurons run by lax.scan; loss on the spike counts."""

    def loss(weights, inputs, targets):  # inputs: (time, batch, in), targets: (batch, out)
        def step(v, x_t):
            v = 0.9 * v + x_t @ weights
            s = spike(v - 1.0)
            return v - s, s

        v0 = jnp.zeros((inputs.shape[1], weights.shape[1]), weights.dtype)
        _, spikes = jax.lax.scan(step, v0, inputs)
        return jnp.mean((spikes.mean(0) - targets) ** 2), spikes

    return loss


def _lif_data(dtype, steps=12, batch=8, n_in=10, n_out=6):
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    inputs = (jax.random.uniform(k1, (steps, batch, n_in)) < 0.5).astype(dtype)
    weights = jax.random.normal(k2, (n_in, n_out), dtype) * 0.8
    targets = jax.random.uniform(k3, (batch, n_out), dtype)
    return weights, inputs, targets


def test_scan_backprop_through_time_one_request_per_step(counted):
    c, transport = counted
    weights, inputs, targets = _lif_data("float32")
    grad_fn = jax.jit(jax.grad(_lif_loss(spike_function(c)), has_aux=True))
    start = transport.count()
    served, spikes = grad_fn(weights, inputs, targets)
    assert transport.count() - start == inputs.shape[0]
    assert float(spikes.sum()) > 0
    assert float(jnp.abs(served).sum()) > 0
    local, _ = jax.jit(jax.grad(_lif_loss(local_spike("piecewise_quadratic", alpha=1.0)), has_aux=True))(
        weights, inputs, targets
    )
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_steps_served_and_local_agree(client, dtype):
    weights0, inputs, targets = _lif_data(dtype)
    runs = {}
    for name, spike in (
        ("served", spike_function(client, "sigmoid", alpha=4.0)),
        ("local", local_spike("sigmoid", alpha=4.0)),
    ):
        value_and_grad = jax.jit(jax.value_and_grad(_lif_loss(spike), has_aux=True))
        weights, losses = weights0, []
        for _ in range(5):
            (loss, spikes), g = value_and_grad(weights, inputs, targets)
            assert float(spikes.sum()) > 0
            assert float(jnp.abs(g).sum()) > 0
            weights = weights - 0.5 * g  # plain SGD
            losses.append(float(loss))
        runs[name] = (losses, weights)
    assert len(set(runs["served"][0])) > 1
    np.testing.assert_allclose(runs["served"][0], runs["local"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["served"][1], runs["local"][1], rtol=1e-5, atol=1e-7)


# -- errors -----------------------------------------------------------------------------------


def test_unknown_surrogate_and_bad_parameters_when_made(client):
    with pytest.raises(NotFound):
        spike_function(client, "no_such_surrogate")
    with pytest.raises(ValidationError) as info:
        spike_function(client, "piecewise_quadratic", alpha=0.0)
    assert info.value.field == "alpha"
    assert info.value.code == "invalid_value"
    with pytest.raises(ValidationError) as info:
        spike_function(client, "gaussian_grad", sigma=jnp.asarray([0.5, -0.5]))
    assert info.value.field == "sigma"
    with pytest.raises(ValidationError) as info:
        spike_function(client, "sigmoid", beta=1.0)
    assert info.value.code == "unknown_field"


def test_service_errors_during_backward(counted, caplog):
    c, transport = counted
    spike = spike_function(c, "piecewise_quadratic", alpha=300.0)  # alpha**2 overflows float16
    x = jnp.zeros(20, "float16")
    grad = jax.grad(lambda x: spike(x).sum())
    with pytest.raises(ValidationError) as info:  # outside jit: the client's exception itself
        grad(x)
    assert info.value.code == "not_representable"
    with pytest.raises(ValidationError), service_errors():  # compiled: given back by service_errors
        jax.jit(grad)(x)
    with pytest.raises(RuntimeError) as raw:  # compiled, without it: JAX's own runtime error
        jax.jit(grad)(x + 0)
    assert not isinstance(raw.value, ValidationError)
    assert "ValidationError" in str(raw.value)

    spike = spike_function(c, "sigmoid", alpha=4.0)
    transport.down = True  # the service goes away
    x = jnp.linspace(-1, 1, 20, dtype="float32")
    with pytest.raises(TransportError):
        jax.grad(lambda x: spike(x).sum())(x)
    with pytest.raises(TransportError), service_errors():
        jax.jit(jax.vmap(jax.grad(lambda x: spike(x).sum())))(x.reshape(4, 5))


def test_service_errors_passes_other_errors_through():
    with pytest.raises(RuntimeError, match="unrelated"), service_errors():
        raise RuntimeError("unrelated")


def test_parameters_cannot_be_traced(client):
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda a: spike_function(client, alpha=a)(jnp.zeros(3)))(1.0)
