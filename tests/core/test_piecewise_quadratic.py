"""PiecewiseQuadratic through the public core API against the NumPy reference and JAX autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import surrogate_core as sc
from surrogate_core import _formulas as F

import reference as ref

ALPHAS = [0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 10.0]
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def boundary_points(alpha: float) -> np.ndarray:
    b = 1.0 / alpha
    eps = [0.0, 1e-6, -1e-6, 1e-3]
    pts = [0.0, -0.0, b, -b, 2 * b, -2 * b, 0.5 * b, -0.5 * b, 3.0, -3.0, 100.0, -100.0]
    pts += [b + e for e in eps] + [-b - e for e in eps]
    return np.array(pts)


def test_seed_example():
    x = [-2.0, -0.5, 0.0, 0.5, 2.0]
    assert sc.spike(x).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    # hand-computed: g'(x) = 1 - |x| inside [-1, 1]
    assert sc.grad(x).tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert sc.grad(x, alpha=2.0).tolist() == [0.0, 0.0, 2.0, 0.0, 0.0]
    # hand-computed smooth function at alpha = 1: (1 - |x|/2) x + 1/2
    assert sc.fun(x).tolist() == [0.0, 0.125, 0.5, 0.875, 1.0]


def test_spike_at_zero_and_negative_zero():
    out = sc.spike(np.array([0.0, -0.0, -1e-30, 1e-30], np.float32))
    assert out.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_grad_and_fun_match_reference_at_boundaries(dtype, alpha):
    dt = sc.DTYPES[dtype]
    x = boundary_points(alpha).astype(dt)
    a = np.asarray(alpha, dt)
    got = sc.grad(x, alpha=alpha, dtype=dtype)
    assert got.dtype == dt and got.shape == x.shape
    want = ref.pq_grad(x, a)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=TOL[dtype], atol=TOL[dtype] * alpha)
    # exactly at the edges |x| == 1/alpha (in the dtype) the gradient is alpha - alpha**2/alpha, ~0
    got_fun = sc.fun(x, alpha=alpha, dtype=dtype)
    np.testing.assert_allclose(got_fun.astype(np.float64), ref.pq_fun(x, a), rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(sc.spike(x, dtype=dtype), ref.spike(x))


def test_window_edges_exact_in_float64():
    for alpha in ALPHAS:
        b = 1.0 / alpha
        g = sc.grad(np.array([b, -b, np.nextafter(b, 9), -np.nextafter(b, 9)]), alpha=alpha, dtype="float64")
        np.testing.assert_allclose(g[:2], alpha - alpha * alpha * b, atol=1e-12)
        assert g[2] == 0.0 and g[3] == 0.0  # just outside the window


@settings(max_examples=60, deadline=None)
@given(
    x=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=300),
    alpha=st.floats(0.0625, 50.0, width=32),
)
def test_grad_property_float32(x, alpha):
    xs = np.array(x, np.float32)
    got = sc.grad(xs, alpha=alpha, dtype="float32")
    want = ref.pq_grad(xs, np.float32(alpha))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * alpha * alpha * 20)


@settings(max_examples=40, deadline=None)
@given(
    x=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=200),
    c=st.floats(-100, 100, allow_nan=False),
    alpha=st.floats(0.1, 20.0),
)
def test_vjp_is_cotangent_times_grad(x, c, alpha):
    xs = np.array(x)
    got = sc.vjp(xs, c, alpha=alpha, dtype="float64")
    np.testing.assert_allclose(got, c * ref.pq_grad(xs, alpha), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_grad_equals_autodiff_of_smooth_function(alpha):
    # away from the kinks at 0 and +-1/alpha, where the derivative is one-sided
    with jax.enable_x64(True):  # the autodiff reference in float64, for this thread only
        xs = jnp.linspace(-3.0, 3.0, 601, dtype=jnp.float64) + 1.234e-4
        xs = xs[jnp.abs(jnp.abs(xs) - 1 / alpha) > 1e-6]
        auto = jax.vmap(jax.grad(lambda v: F.piecewise_quadratic_fun(v, alpha)))(xs)
        assert auto.dtype == jnp.float64
    got = sc.grad(np.asarray(xs), alpha=alpha, dtype="float64")
    np.testing.assert_allclose(got, np.asarray(auto), rtol=1e-12, atol=1e-12)


def test_formulas_under_jit_match_reference():
    # XLA may fuse alpha - alpha**2 * |x| into one FMA under jit, so compare with a tolerance
    x = jnp.linspace(-2, 2, 41, dtype=jnp.float32)
    a = jnp.float32(1.5)
    np.testing.assert_allclose(jax.jit(F.piecewise_quadratic_grad)(x, a), ref.pq_grad(x, a), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(F.piecewise_quadratic_fun)(x, a), ref.pq_fun(x, a), rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(F.heaviside)(x), ref.spike(np.asarray(x)))


def test_ieee_special_values_follow_braintools():
    x = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    assert sc.spike(x).tolist() == [0.0, 1.0, 0.0, 1.0]
    g = sc.grad(x)
    assert np.isnan(g[0]) and g[1] == 0.0 and g[2] == 0.0 and g[3] == 1.0
    f = sc.fun(x)
    assert np.isnan(f[0]) and f[1] == 1.0 and f[2] == 0.0


def test_alpha_sweep_broadcasts():
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    alphas = np.array([[0.5], [1.0], [2.0], [4.0]], np.float32)
    out = sc.grad(x, alpha=alphas)
    assert out.shape == (4, 1000)
    for row, a in zip(out, alphas[:, 0]):
        np.testing.assert_allclose(row, ref.pq_grad(x, a), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_output_dtype_follows_request(dtype):
    for f in (sc.spike, sc.grad, sc.fun):
        assert f([0.5, -0.5], dtype=dtype).dtype == sc.DTYPES[dtype]
