"""The whole braintools surrogate family through the public core API.

Every surrogate's gradient and smooth function against the independent NumPy references in
``family_reference.py`` (boundaries, zero, negative zero, negative x, inf, NaN; every dtype), the
gradient against JAX autodiff of the smooth function, hand-computed values, the Heaviside spike,
parameter validation, broadcasting of every parameter, and bounded compilation.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import surrogate_core as sc
from surrogate_core import _registry


def _load_reference():
    """The sibling ``family_reference.py``, whatever pytest's import mode and path."""
    path = pathlib.Path(__file__).with_name("family_reference.py")
    spec = importlib.util.spec_from_file_location("family_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("family_reference", module)
    spec.loader.exec_module(module)
    return module


R = _load_reference()

DTYPES = ["float64", "float32", "float16", "bfloat16"]
#: Relative tolerance per dtype; the absolute one is this times the gradient's scale (its largest
#: magnitude at the test points) times a conditioning factor (see ``_cond``).
TOL = {"float64": 1e-12, "float32": 1e-6, "float16": 4e-3, "bfloat16": 3e-2}

#: braintools 0.3.0: registry name -> (class name, parameters in signature order with defaults).
BRAINTOOLS = {
    "sigmoid": ("Sigmoid", {"alpha": 4.0}),
    "piecewise_quadratic": ("PiecewiseQuadratic", {"alpha": 1.0}),
    "piecewise_exp": ("PiecewiseExp", {"alpha": 1.0}),
    "soft_sign": ("SoftSign", {"alpha": 1.0}),
    "arctan": ("Arctan", {"alpha": 1.0}),
    "nonzero_sign_log": ("NonzeroSignLog", {"alpha": 1.0}),
    "erf": ("ERF", {"alpha": 1.0}),
    "piecewise_leaky_relu": ("PiecewiseLeakyRelu", {"c": 0.01, "w": 1.0}),
    "squarewave_fourier_series": ("SquarewaveFourierSeries", {"n": 2, "t_period": 8.0}),
    "s2nn": ("S2NN", {"alpha": 4.0, "beta": 1.0, "epsilon": 1e-8}),
    "q_pseudo_spike": ("QPseudoSpike", {"alpha": 2.0}),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.1, "beta": 1.0}),
    "log_tailed_relu": ("LogTailedRelu", {"alpha": 0.0}),
    "relu_grad": ("ReluGrad", {"alpha": 0.3, "width": 1.0}),
    "gaussian_grad": ("GaussianGrad", {"sigma": 0.5, "alpha": 0.5}),
    "multi_gaussian_grad": ("MultiGaussianGrad", {"h": 0.15, "s": 6.0, "sigma": 0.5, "scale": 0.5}),
    "inv_square_grad": ("InvSquareGrad", {"alpha": 100.0}),
    "slayer_grad": ("SlayerGrad", {"alpha": 1.0}),
}
NAMES = list(BRAINTOOLS)
GRAD_ONLY = {"relu_grad", "gaussian_grad", "multi_gaussian_grad", "inv_square_grad", "slayer_grad"}
WITH_FUN = [n for n in NAMES if n not in GRAD_ONLY]

#: Parameter sets tested per surrogate (the first is braintools' defaults); every parameter takes at
#: least three distinct values across a surrogate's sets (the broadcasting test uses them).
CASES = {
    "sigmoid": [{"alpha": 4.0}, {"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 10.0}],
    "piecewise_quadratic": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 2.0}, {"alpha": 4.0}],
    "piecewise_exp": [{"alpha": 1.0}, {"alpha": 2.0}, {"alpha": 0.25}],
    "soft_sign": [{"alpha": 1.0}, {"alpha": 2.0}, {"alpha": 0.3}],
    "arctan": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 2.0}],
    "nonzero_sign_log": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 4.0}],
    "erf": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 2.0}],
    "piecewise_leaky_relu": [{"c": 0.01, "w": 1.0}, {"c": 0.05, "w": 2.0}, {"c": 0.0, "w": 0.5}],
    "squarewave_fourier_series": [
        {"n": 2, "t_period": 8.0},
        {"n": 1, "t_period": 8.0},
        {"n": 3, "t_period": 6.0},
        {"n": 5, "t_period": 2.0},
    ],
    "s2nn": [
        {"alpha": 4.0, "beta": 1.0, "epsilon": 1e-8},
        {"alpha": 8.0, "beta": 2.0, "epsilon": 0.0},
        {"alpha": 2.0, "beta": 0.5, "epsilon": 1e-3},
    ],
    "q_pseudo_spike": [{"alpha": 2.0}, {"alpha": 0.5}, {"alpha": 1.0}, {"alpha": 3.0}],
    "leaky_relu": [
        {"alpha": 0.1, "beta": 1.0},
        {"alpha": 0.0, "beta": 1.0},
        {"alpha": 0.3, "beta": 2.0},
        {"alpha": 0.2, "beta": 0.5},
    ],
    "log_tailed_relu": [{"alpha": 0.0}, {"alpha": 0.1}, {"alpha": 0.3}],
    "relu_grad": [{"alpha": 0.3, "width": 1.0}, {"alpha": 0.5, "width": 2.0}, {"alpha": 1.0, "width": 0.5}],
    "gaussian_grad": [{"sigma": 0.5, "alpha": 0.5}, {"sigma": 0.3, "alpha": 1.0}, {"sigma": 2.0, "alpha": 0.25}],
    "multi_gaussian_grad": [
        {"h": 0.15, "s": 6.0, "sigma": 0.5, "scale": 0.5},
        {"h": 0.0, "s": 6.0, "sigma": 0.5, "scale": 0.7},
        {"h": 0.3, "s": 2.0, "sigma": 1.0, "scale": 1.0},
        {"h": 0.5, "s": 3.0, "sigma": 0.25, "scale": 2.0},
    ],
    "inv_square_grad": [{"alpha": 100.0}, {"alpha": 10.0}, {"alpha": 1.0}],
    "slayer_grad": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 4.0}],
}


def kinks(name: str, p: dict) -> list[float]:
    """Where the surrogate's pieces meet or its definition changes (each is also tested at -x)."""
    p = dict(BRAINTOOLS[name][1], **p)
    if name in ("piecewise_quadratic", "piecewise_exp", "nonzero_sign_log", "inv_square_grad"):
        return [1 / p["alpha"]]
    if name == "piecewise_leaky_relu":
        return [p["w"]]
    if name == "squarewave_fourier_series":
        return [p["t_period"] * k / 4 for k in (1, 2, 4)]
    if name in ("s2nn", "log_tailed_relu"):
        return [1.0]
    if name == "relu_grad":
        return [p["width"]]
    if name == "gaussian_grad":
        return [p["sigma"]]
    if name == "multi_gaussian_grad":
        return [p["sigma"], p["s"] * p["sigma"]]
    return []


COMMON = [0.0, -0.0, 1e-3, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0]
SPECIAL = [np.inf, -np.inf, np.nan]


def points(name: str, p: dict, dt: np.dtype, *, special: bool = True) -> np.ndarray:
    """Test points in ``dt``: common values, both signs, a grid, the break points and their
    neighbours in ``dt`` on both sides, and (optionally) inf and NaN."""
    base = COMMON + [-v for v in COMMON] + list(np.linspace(-4, 4, 81))
    pts = [np.asarray(base, np.float64).astype(dt)]
    for b in kinks(name, p):
        for v in (b, -b):
            c = np.asarray(v, np.float64).astype(dt)
            pts.append(np.array([c, np.nextafter(c, dt.type(np.inf)), np.nextafter(c, dt.type(-np.inf))], dt))
    if special:
        pts.append(np.array(SPECIAL, dt))
    return np.concatenate(pts)


def _cast_params(p: dict, dt: np.dtype) -> dict:
    return {k: np.asarray(v, np.float64).astype(dt) for k, v in p.items()}


def _cond(name: str, p: dict, x: np.ndarray, *, fun: bool = False) -> np.ndarray:
    """Per-point conditioning of braintools' formulas, by which rounding in the dtype is amplified:
    the Fourier series' cosines and sines take arguments up to (2n-1)*2*pi/T*|x|, and
    QPseudoSpike's smooth function divides b**(1-alpha) - 1 by 1 - alpha (cancellation near
    alpha = 1). Every other formula is well conditioned relative to its scale."""
    x = np.asarray(x, np.float64)
    if name == "squarewave_fourier_series":
        top = (2 * float(p["n"]) - 1) * 2 * math.pi / float(p["t_period"])
        with np.errstate(invalid="ignore"):
            return 1.0 + np.nan_to_num(np.abs(x) * top, posinf=0.0)
    if name == "q_pseudo_spike" and fun and float(p["alpha"]) != 1.0:
        return np.full(x.shape, 1.0 + 1.0 / abs(1.0 - float(p["alpha"])))
    return np.ones(x.shape)


def assert_close(got, want, *, rtol, atol, x, what):
    """``got`` within ``atol + rtol * |want|`` of ``want``. XLA on the CPU flushes subnormal
    numbers (results and intermediates) to zero where NumPy keeps them, so values that differ by
    less than the smallest normal number of ``got``'s dtype are equal here."""
    tiny = float(ml_dtypes.finfo(np.asarray(got).dtype).tiny)
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    with np.errstate(invalid="ignore"):
        ok = (np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))
        ok |= np.abs(got - want) <= atol + rtol * np.abs(want)
        ok |= np.abs(got - want) < tiny
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())[:6]
        xs = np.broadcast_to(np.asarray(x, np.float64), got.shape).ravel()
        rows = ", ".join(f"x={xs[i]!r}: got {got.ravel()[i]!r} want {want.ravel()[i]!r}" for i in bad)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} differ ({rows})")


def _ref(table, name, x, p):
    with np.errstate(all="ignore"):
        return table[name](x, **p)


def _scale(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return max(float(finite.max()) if finite.size else 0.0, 1e-300)


# -- the registry -----------------------------------------------------------------------------


def test_registry_holds_the_family_in_braintools_order_with_its_defaults():
    assert set(sc.names()) == set(NAMES)
    assert list(_registry._REGISTRY) == NAMES  # registered in the table's order
    for name, (cls, defaults) in BRAINTOOLS.items():
        s = sc.get(name)
        assert s.braintools_name == cls
        assert s.param_names == tuple(defaults)  # braintools' names, in its signature order
        assert s.defaults == defaults
        assert (s.fun is None) == (name in GRAD_ONLY)
        assert (s.fun_formula is None) == (name in GRAD_ONLY)
        assert s.grad_formula and s.description
        d = s.describe()
        assert d["braintools"] == f"braintools.surrogate.{cls}" and d["has_fun"] == (name not in GRAD_ONLY)
        for p, described in zip(s.params, d["parameters"]):
            # the default is described as the JSON type of the parameter: 2 for n, 4.0 for alpha
            assert described["default"] == defaults[p.name]
            assert type(described["default"]) is type(defaults[p.name])
            assert described["type"] == ("integer" if isinstance(defaults[p.name], int) else "number")
            assert p.description and p.constraint.text
            assert "\n" not in p.description


def test_docstring_vs_code_notes_are_recorded():
    from surrogate_core import _surrogates

    doc = _surrogates.__doc__
    assert "Docstring vs code" in doc
    for cls in ("PiecewiseLeakyRelu", "S2NN", "QPseudoSpike", "GaussianGrad"):
        assert cls in doc


# -- values against the NumPy references -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_reference(name, dtype):
    dt = sc.DTYPES[dtype]
    for p in CASES[name]:
        x = points(name, p, dt)
        pc = _cast_params(p, dt)
        got = sc.grad(x, surrogate=name, dtype=dtype, **p)
        assert got.dtype == dt and got.shape == x.shape
        want = _ref(R.GRAD, name, x, pc)
        tol = TOL[dtype]
        assert_close(got, want, rtol=tol, atol=tol * _scale(want) * _cond(name, p, x), x=x,
                     what=f"grad {name} {p} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", WITH_FUN)
def test_fun_matches_reference(name, dtype):
    dt = sc.DTYPES[dtype]
    for p in CASES[name]:
        x = points(name, p, dt)
        pc = _cast_params(p, dt)
        got = sc.fun(x, surrogate=name, dtype=dtype, **p)
        assert got.dtype == dt and got.shape == x.shape
        want = _ref(R.FUN, name, x, pc)
        tol = TOL[dtype]
        assert_close(got, want, rtol=tol, atol=tol * _cond(name, p, x, fun=True), x=x, what=f"fun {name} {p} {dtype}")


HAND_GRAD = [
    # (surrogate, params, x, expected): worked out by hand from braintools' code
    ("sigmoid", {}, [0.0, -0.0], [1.0, 1.0]),
    ("piecewise_exp", {"alpha": 2.0}, [0.0, 0.5, -0.5], [1.0, math.exp(-1), math.exp(-1)]),
    ("soft_sign", {"alpha": 2.0}, [0.0, 0.5, -0.5], [1.0, 0.25, 0.25]),
    ("arctan", {"alpha": 2.0}, [0.0, 1 / math.pi, -1 / math.pi], [1.0, 0.5, 0.5]),
    ("nonzero_sign_log", {}, [-1.0, 0.0, 3.0], [0.5, 1.0, 0.25]),
    ("erf", {}, [0.0, 1.0], [1 / math.sqrt(math.pi), math.exp(-1) / math.sqrt(math.pi)]),
    # 1/(2w) inside [-w, w] (the code), not the docstring's 1/w; c strictly outside
    ("piecewise_leaky_relu", {}, [-2.0, -1.0, 0.0, 1.0, 2.0], [0.01, 0.5, 0.5, 0.5, 0.01]),
    ("piecewise_leaky_relu", {"c": 0.1, "w": 2.0}, [-2.5, -2.0, 2.0, 2.5], [0.1, 0.25, 0.25, 0.1]),
    # n = 2, T = 8: (cos(pi x / 4) + cos(3 pi x / 4)) / 2
    ("squarewave_fourier_series", {}, [0.0, 2.0, 4.0, -4.0], [1.0, 0.0, -1.0, -1.0]),
    ("squarewave_fourier_series", {"n": 1}, [0.0, 2.0, 4.0], [0.5, 0.0, -0.5]),
    ("squarewave_fourier_series", {"n": 3, "t_period": 4.0}, [0.0, 2.0], [3.0, -3.0]),
    # beta / (x + 1) from x = 0 (also -0.0) on; the sigmoid branch only for x < 0, finite at -1
    ("s2nn", {}, [0.0, -0.0, 1.0, 3.0], [1.0, 1.0, 0.5, 0.25]),
    ("s2nn", {}, [-1.0], [4 * math.exp(-4) / (1 + math.exp(-4)) ** 2]),
    ("q_pseudo_spike", {}, [0.0, 1.5, -1.5], [1.0, 0.25, 0.25]),
    ("q_pseudo_spike", {"alpha": 1.0}, [1.0], [0.5]),
    ("leaky_relu", {}, [-1.0, -0.0, 0.0, 1.0], [0.1, 1.0, 1.0, 1.0]),
    ("log_tailed_relu", {"alpha": 0.1}, [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0], [0.1, 0.1, 1.0, 1.0, 0.5, 0.25]),
    ("relu_grad", {}, [0.0, 0.5, -0.5, 1.0, 2.0], [0.3, 0.15, 0.15, 0.0, 0.0]),
    ("gaussian_grad", {}, [0.0], [1 / math.sqrt(2 * math.pi)]),
    ("inv_square_grad", {}, [0.0, 0.01, -0.01], [1.0, 0.25, 0.25]),
    ("slayer_grad", {}, [0.0, 1.0, -1.0], [1.0, math.exp(-1), math.exp(-1)]),
]


@pytest.mark.parametrize(
    ("name", "params", "x", "want"), HAND_GRAD, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND_GRAD)]
)
def test_grad_hand_values(name, params, x, want):
    got = sc.grad(np.array(x), surrogate=name, dtype="float64", **params)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


HAND_FUN = [
    ("sigmoid", {}, [0.0], [0.5]),
    ("piecewise_exp", {}, [0.0, -0.0, math.log(2)], [0.5, 0.5, 0.75]),
    ("soft_sign", {}, [0.0, 1.0, -1.0], [0.5, 0.75, 0.25]),
    ("arctan", {}, [0.0, 2.0], [0.5, math.atan(math.pi) / math.pi + 0.5]),
    # NonzeroSign(x) log(|alpha x| + 1): 0 at x = 0, odd
    ("nonzero_sign_log", {}, [0.0, math.e - 1, 1 - math.e], [0.0, 1.0, -1.0]),
    ("erf", {}, [0.0], [0.5]),
    ("piecewise_leaky_relu", {}, [0.0, 1.0, -1.0, 2.0, -2.0], [0.5, 1.0, 0.0, 1.01, -0.01]),
    ("squarewave_fourier_series", {}, [0.0, 2.0], [0.5, 0.5 + 2 / math.pi * (1 - 1 / 3)]),
    ("s2nn", {"epsilon": 0.0}, [0.0, math.e - 1], [0.5, 1.5]),
    ("q_pseudo_spike", {}, [0.0, 1.5, -1.5], [0.5, 1.25, -0.25]),  # (a+1)/(2(1-a)) (b^-1 - 1), b = 2
    ("q_pseudo_spike", {"alpha": 1.0}, [1.0], [0.5 + math.log(2)]),
    ("leaky_relu", {}, [-1.0, 0.0, 2.0], [-0.1, 0.0, 2.0]),
    ("log_tailed_relu", {"alpha": 0.1}, [-1.0, 0.5, 1.0, math.e], [-0.1, 0.5, 1.0, 2.0]),
]


@pytest.mark.parametrize(
    ("name", "params", "x", "want"), HAND_FUN, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND_FUN)]
)
def test_fun_hand_values(name, params, x, want):
    got = sc.fun(np.array(x), surrogate=name, dtype="float64", **params)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_multi_gaussian_with_h_zero_is_the_gaussian():
    x = np.linspace(-3, 3, 61)
    g = sc.grad(x, surrogate="gaussian_grad", sigma=0.5, alpha=0.7, dtype="float64")
    m = sc.grad(x, surrogate="multi_gaussian_grad", h=0.0, s=6.0, sigma=0.5, scale=0.7, dtype="float64")
    np.testing.assert_allclose(m, g, rtol=1e-12, atol=1e-15)


def test_squarewave_many_terms():
    x = np.linspace(-4, 4, 101)
    for n in (50, 1000):
        got = sc.grad(x, surrogate="squarewave_fourier_series", n=n, dtype="float64")
        want = R.squarewave_fourier_series_grad(x, n, 8.0)
        cond = _cond("squarewave_fourier_series", {"n": n, "t_period": 8.0}, x)
        assert_close(got, want, rtol=1e-12, atol=1e-12 * _scale(want) * cond, x=x, what=f"n={n}")
    assert got[50] == 4 * 1000 / 8  # x = 0: every cosine is 1


def test_s2nn_grad_ignores_epsilon_like_braintools():
    # braintools' surrogate_grad is beta/(x + 1) for x >= 0 whatever epsilon; its surrogate_fun
    # has log(|x + 1| + epsilon), whose derivative is beta/(x + 1 + epsilon)
    x = np.array([0.0, 0.5, 2.0])
    a = sc.grad(x, surrogate="s2nn", epsilon=0.0, dtype="float64")
    b = sc.grad(x, surrogate="s2nn", epsilon=0.5, dtype="float64")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, 1 / (x + 1), rtol=1e-15)
    with jax.enable_x64(True):  # the autodiff reference in float64, for this thread only
        p = {"alpha": jnp.float64(4.0), "beta": jnp.float64(1.0), "epsilon": jnp.float64(0.5)}
        auto = np.asarray(_autodiff("s2nn")(jnp.asarray(x), p))
    np.testing.assert_allclose(auto, 1 / (x + 1.5), rtol=1e-12)


@settings(max_examples=12, deadline=None)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_grad_property_float64(name, data):
    x = np.array(data.draw(st.lists(st.floats(-50, 50, allow_subnormal=False), min_size=1, max_size=200), label="x"))
    p = {k: data.draw(strategy, label=k) for k, strategy in PARAM_STRATEGIES[name].items()}
    got = sc.grad(x, surrogate=name, dtype="float64", **p)
    want = _ref(R.GRAD, name, x, p)
    scale = _scale(np.concatenate([want, _ref(R.GRAD, name, np.zeros(1), p)]))
    assert_close(got, want, rtol=1e-12, atol=1e-12 * scale * _cond(name, p, x), x=x, what=f"grad {name} {p}")


def test_a_subnormal_result_flushed_to_zero_passes_as_equal():
    # found by hypothesis: the reference keeps alpha * exp(-x**2 / 2) / sqrt(2 pi) = 4.0e-309, a
    # subnormal number, where XLA on the CPU flushes it to 0.0
    x, p = np.array([3.0]), {"sigma": 1.0, "alpha": 9.04e-307}
    want = _ref(R.GRAD, "gaussian_grad", x, p)
    assert 0 < want[0] < np.finfo(np.float64).tiny
    got = sc.grad(x, surrogate="gaussian_grad", dtype="float64", **p)
    assert got.dtype == np.float64 and abs(got[0]) < np.finfo(np.float64).tiny
    assert_close(got, want, rtol=1e-12, atol=0.0, x=x, what="flushed")
    with pytest.raises(AssertionError):  # a normal number is still compared strictly
        assert_close(got + 1e-300, want, rtol=1e-12, atol=0.0, x=x, what="not flushed")


# XLA on CPU flushes subnormal numbers to zero, so hypothesis draws no subnormal inputs, and
# assert_close takes results that differ by less than the smallest normal number as equal (a
# normal input can still give a subnormal result: a tiny alpha times a small Gaussian).
def _pos(lo, hi):
    return st.floats(lo, hi, allow_subnormal=False)


def _nonneg(hi):
    return st.one_of(st.just(0.0), st.floats(0.0, hi, allow_subnormal=False))


PARAM_STRATEGIES = {
    "sigmoid": {"alpha": _pos(0.1, 20)},
    "piecewise_quadratic": {"alpha": _pos(0.1, 20)},
    "piecewise_exp": {"alpha": _pos(0.05, 20)},
    "soft_sign": {"alpha": _pos(0.05, 20)},
    "arctan": {"alpha": _pos(0.05, 20)},
    "nonzero_sign_log": {"alpha": _pos(0.05, 20)},
    "erf": {"alpha": _pos(0.05, 20)},
    "piecewise_leaky_relu": {"c": _nonneg(1), "w": _pos(0.05, 5)},
    "squarewave_fourier_series": {"n": st.integers(1, 12), "t_period": _pos(0.5, 20)},
    "s2nn": {"alpha": _pos(0.1, 20), "beta": _nonneg(5), "epsilon": _nonneg(1e-2)},
    "q_pseudo_spike": {"alpha": _pos(0.05, 10)},
    "leaky_relu": {"alpha": _nonneg(1), "beta": _nonneg(5)},
    "log_tailed_relu": {"alpha": _nonneg(1)},
    "relu_grad": {"alpha": _nonneg(5), "width": _pos(0.05, 5)},
    "gaussian_grad": {"sigma": _pos(0.05, 5), "alpha": _nonneg(5)},
    "multi_gaussian_grad": {"h": _nonneg(1), "s": _pos(0.5, 10), "sigma": _pos(0.05, 5), "scale": _nonneg(5)},
    "inv_square_grad": {"alpha": _pos(0.1, 200)},
    "slayer_grad": {"alpha": _pos(0.05, 20)},
}


@settings(max_examples=8, deadline=None)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_every_parameter_per_element(name, data):
    """Every parameter an array of x's shape at once (the engine's elementwise layout)."""
    m = data.draw(st.integers(1, 64), label="m")
    x = np.array(data.draw(st.lists(st.floats(-10, 10, allow_subnormal=False), min_size=m, max_size=m), label="x"))
    p = {
        k: np.array(data.draw(st.lists(s, min_size=m, max_size=m), label=k), np.float64)
        for k, s in PARAM_STRATEGIES[name].items()
    }
    got = sc.grad(x, surrogate=name, dtype="float64", **p)
    with np.errstate(all="ignore"):
        # element by element with scalar parameters, so a formula mixing elements would show
        want = np.array([R.GRAD[name](x[i], **{k: v[i] for k, v in p.items()}) for i in range(m)])
        peaks = np.array([R.GRAD[name](0.0, **{k: v[i] for k, v in p.items()}) for i in range(m)])
        cond = np.array([_cond(name, {k: v[i] for k, v in p.items()}, x[i : i + 1])[0] for i in range(m)])
        cond_f = np.array([_cond(name, {k: v[i] for k, v in p.items()}, x[i : i + 1], fun=True)[0] for i in range(m)])
    atol = 1e-12 * np.maximum(np.abs(peaks), np.abs(want)) * cond + 1e-300
    assert_close(got, want, rtol=1e-12, atol=atol, x=x, what=f"grad {name} per element")
    if sc.get(name).fun is not None:
        got_f = sc.fun(x, surrogate=name, dtype="float64", **p)
        with np.errstate(all="ignore"):
            want_f = np.array([R.FUN[name](x[i], **{k: v[i] for k, v in p.items()}) for i in range(m)])
        assert_close(got_f, want_f, rtol=1e-12, atol=1e-12 * cond_f, x=x, what=f"fun {name} per element")


# -- autodiff of the smooth function -----------------------------------------------------------

_AUTODIFF: dict = {}


def _autodiff(name):
    """jit(vmap(d fun/dx)) with the parameters traced. The Fourier series' loop has a dynamic trip
    count (a while loop), which JAX differentiates in forward mode only, hence jacfwd there."""
    if name not in _AUTODIFF:
        fun = sc.get(name).fun
        d = jax.jacfwd if name == "squarewave_fourier_series" else jax.grad
        _AUTODIFF[name] = jax.jit(jax.vmap(d(lambda v, p: fun(v, **p)), in_axes=(0, None)))
    return _AUTODIFF[name]


@pytest.mark.parametrize("name", WITH_FUN)
def test_grad_is_the_derivative_of_fun(name):
    for p in CASES[name]:
        xs = np.linspace(-3.3, 3.3, 331) + 1.234e-4
        for k in [0.0] + kinks(name, p):  # the derivative is one-sided at the kinks
            xs = xs[np.abs(np.abs(xs) - k) > 1e-6]
        with jax.enable_x64(True):  # the autodiff reference in float64, for this thread only
            auto = np.asarray(_autodiff(name)(jnp.asarray(xs), {k: jnp.float64(v) for k, v in p.items()}))
        got = sc.grad(xs, surrogate=name, dtype="float64", **p)
        assert np.isfinite(auto).all()
        # braintools' S2NN grad ignores epsilon, its fun does not: d fun/dx = beta/(x + 1 + eps)
        rtol = max(1e-10, 2 * p["epsilon"]) if name == "s2nn" else 1e-10
        assert_close(got, auto, rtol=rtol, atol=1e-12 * _scale(got), x=xs, what=f"d fun/dx {name} {p}")


# -- spike, vjp, gradient-only -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_spike_is_the_same_heaviside_for_all(name):
    x = [-np.inf, -2.0, -(2.0**-14), -0.0, 0.0, 2.0**-14, 2.0, np.inf, np.nan]
    want = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    for dtype in DTYPES:
        out = sc.spike(np.array(x, sc.DTYPES[dtype]), surrogate=name, **CASES[name][-1])
        assert out.dtype == sc.DTYPES[dtype]
        assert out.astype(np.float64).tolist() == want
    np.testing.assert_array_equal(sc.spike(np.array(x), surrogate=name), R.spike(np.array(x)))


def test_vjp_is_cotangent_times_grad():
    x = np.linspace(-3, 3, 61, dtype=np.float32)
    ct = np.float32(-2.5)
    for name in ("squarewave_fourier_series", "s2nn", "multi_gaussian_grad"):
        g = sc.grad(x, surrogate=name)
        v = sc.vjp(x, ct, surrogate=name)
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, ct * g, rtol=1e-6, atol=1e-6 * _scale(g))


@pytest.mark.parametrize("name", sorted(GRAD_ONLY))
def test_fun_of_a_gradient_only_surrogate_is_refused(name):
    with pytest.raises(sc.JobError) as info:
        sc.fun([0.0, 1.0], surrogate=name)
    assert info.value.code == "no_smooth_function" and info.value.field == "surrogate"
    assert sc.grad([0.0], surrogate=name).shape == (1,)


# -- parameter validation ----------------------------------------------------------------------

BAD = {
    "positive": [0.0, -0.0, -1.0, np.nan, np.inf, -np.inf],
    "nonnegative": [-1e-3, -1.0, np.nan, np.inf, -np.inf],
    "integer_1_to_1000": [0.0, -1.0, 1.5, 1001.0, 1e6, np.nan, np.inf],
}
GOOD_EDGE = {"positive": [1e-3], "nonnegative": [0.0, -0.0], "integer_1_to_1000": [1, 1000, 7.0]}
PARAMS = [(n, p.name) for n in NAMES for p in sc.get(n).params]


@pytest.mark.parametrize(("name", "param"), PARAMS, ids=[f"{n}.{p}" for n, p in PARAMS])
def test_each_constraint_is_enforced_and_names_the_parameter(name, param):
    c = sc.get(name).param(param).constraint
    assert c.name in BAD, f"untested constraint {c.name}"
    x = np.zeros(2, np.float32)
    for bad in BAD[c.name]:
        for value in (bad, [sc.get(name).param(param).default, bad]):
            with pytest.raises(sc.JobError) as info:
                sc.make_job("grad", x, surrogate=name, params={param: value})
            assert info.value.field == param and info.value.code == "invalid_value", (param, value)
            assert param in str(info.value) and c.text in str(info.value)
    for good in GOOD_EDGE[c.name]:
        sc.make_job("grad", x, surrogate=name, params={param: good})


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_used_when_omitted_and_unknown_parameters_refused(name):
    s = sc.get(name)
    job = sc.make_job("grad", np.zeros(3, np.float32), surrogate=name)
    assert {k: float(v) for k, v in job.params.items()} == {
        k: float(np.float32(v)) for k, v in BRAINTOOLS[name][1].items()
    }
    x = np.linspace(-2, 2, 9)
    np.testing.assert_array_equal(
        sc.grad(x, surrogate=name, dtype="float64"), sc.grad(x, surrogate=name, dtype="float64", **s.defaults)
    )
    foreign = next(p for p in ("alpha", "w", "sigma", "n", "bogus") if p not in s.param_names)
    for unknown in ("bogus", foreign):
        with pytest.raises(sc.JobError) as info:
            sc.make_job("grad", x, surrogate=name, params={unknown: 1.0})
        assert info.value.field == unknown and info.value.code == "unknown_field"


NOT_REPRESENTABLE = [
    # (surrogate, params, field, dtype): a derived quantity overflows, or a divisor underflows
    ("soft_sign", {"alpha": 1e-5}, "alpha", "float16"),  # 2/alpha
    ("arctan", {"alpha": 50000.0}, "alpha", "float16"),  # pi/2*alpha
    ("nonzero_sign_log", {"alpha": 1e-5}, "alpha", "float16"),  # 1/alpha
    ("erf", {"alpha": 300.0}, "alpha", "float16"),  # alpha**2
    ("piecewise_leaky_relu", {"w": 40000.0}, "w", "float16"),  # 2*w
    ("piecewise_leaky_relu", {"w": 5e-6}, "w", "float16"),  # 1/(2*w)
    ("piecewise_leaky_relu", {"c": 300.0, "w": 300.0}, "c", "float16"),  # c*w
    ("squarewave_fourier_series", {"n": 1000, "t_period": 0.1}, "t_period", "float16"),  # (2n-1)*2*pi/T
    ("squarewave_fourier_series", {"n": 1, "t_period": 5e-5}, "t_period", "float16"),  # 2*pi/T
    ("q_pseudo_spike", {"alpha": 40000.0}, "alpha", "float16"),  # 2*(1 - alpha)
    ("relu_grad", {"alpha": 300.0, "width": 300.0}, "alpha", "float16"),  # alpha*width
    ("gaussian_grad", {"sigma": 1e-4}, "sigma", "float16"),  # sigma**2 underflows to 0
    ("gaussian_grad", {"sigma": 0.005}, "sigma", "float16"),  # sigma**2 is subnormal
    ("gaussian_grad", {"sigma": 1e-19}, "sigma", "float32"),  # sigma**2 is subnormal
    ("gaussian_grad", {"sigma": 200.0}, "sigma", "float16"),  # 2*sigma**2 overflows
    ("gaussian_grad", {"sigma": 0.01, "alpha": 60000.0}, "alpha", "float16"),  # the peak
    ("multi_gaussian_grad", {"sigma": 1e-4}, "sigma", "float16"),
    ("multi_gaussian_grad", {"sigma": 1e-19}, "sigma", "float32"),
    ("multi_gaussian_grad", {"s": 0.01, "sigma": 0.01}, "s", "float16"),  # (s*sigma)**2 underflows
    ("multi_gaussian_grad", {"s": 1e-10, "sigma": 1e-10}, "s", "float32"),  # (s*sigma)**2 underflows
    ("multi_gaussian_grad", {"s": 30000.0, "sigma": 0.01}, "s", "float16"),  # sqrt(2*pi)*s overflows
    ("multi_gaussian_grad", {"sigma": 0.01, "scale": 60000.0}, "scale", "float16"),  # the peak
]
WIDER = {"float16": np.float32, "float32": np.float64}


@pytest.mark.parametrize(("name", "params", "field", "dtype"), NOT_REPRESENTABLE)
def test_derived_quantities_must_be_representable(name, params, field, dtype):
    x = np.array([0.0, 0.5], sc.DTYPES[dtype])
    with pytest.raises(sc.JobError) as info:
        sc.make_job("grad", x, surrogate=name, params=params)
    assert info.value.field == field and info.value.code == "not_representable"
    assert dtype in str(info.value)
    # a wider dtype holds them, and the result is finite
    out = sc.grad(x.astype(WIDER[dtype]), surrogate=name, **params)
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "params", "dtype"),
    [
        ("arctan", {"alpha": 50000.0}, "float16"),
        ("gaussian_grad", {"sigma": 1e-4}, "float16"),
        ("gaussian_grad", {"sigma": 1e-19}, "float32"),  # XLA flushes the subnormal sigma**2 to 0
        ("squarewave_fourier_series", {"n": 1000, "t_period": 0.1}, "float16"),
    ],
)
def test_without_the_checks_the_engine_would_give_nan_or_inf(name, params, dtype):
    # what the checks prevent: the same job, built by hand past make_job, computes inf or NaN
    dt = sc.DTYPES[dtype]
    x = np.array([0.0, 0.5], dt)
    p = {k: np.asarray(v, dt) for k, v in dict(sc.get(name).defaults, **params).items()}
    job = sc.Job("grad", name, dtype, x, p, None, x.shape)
    (out,) = sc.Engine().run([job])
    assert not np.isfinite(out).all()


# -- broadcasting ------------------------------------------------------------------------------


def _values(name, param):
    vals = []
    for case in CASES[name]:
        if case[param] not in vals:
            vals.append(case[param])
    assert len(vals) >= 3, (name, param)
    return vals[:3]


@pytest.mark.parametrize(("name", "param"), PARAMS, ids=[f"{n}.{p}" for n, p in PARAMS])
def test_each_parameter_broadcasts(name, param):
    x = np.linspace(-3, 3, 50, dtype=np.float32)
    vals = _values(name, param)
    column = np.array(vals, np.float32).reshape(3, 1)
    ops = [(sc.grad, R.GRAD)] + ([(sc.fun, R.FUN)] if sc.get(name).fun is not None else [])
    for op, table in ops:
        out = op(x, surrogate=name, **{param: column})
        assert out.shape == (3, 50) and out.dtype == np.float32
        for row, v in zip(out, vals):
            single = op(x, surrogate=name, **{param: v})
            p = dict(sc.get(name).defaults, **{param: v})
            want = _ref(table, name, x, _cast_params(p, np.dtype(np.float32)))
            scale = _scale(want) if op is sc.grad else 1.0
            atol = 1e-6 * scale * _cond(name, p, x, fun=op is sc.fun)
            assert_close(row, single, rtol=1e-6, atol=atol, x=x, what=f"{op.__name__} {name} {param}={v} row")
            assert_close(row, want, rtol=1e-6, atol=atol, x=x, what=f"{op.__name__} {name} {param}={v} ref")


# -- bounded compilation -----------------------------------------------------------------------


def test_new_parameter_values_compile_nothing():
    engine = sc.default_engine()
    rng = np.random.default_rng(7)
    x = np.linspace(-3, 3, 200)
    name = "multi_gaussian_grad"
    draws = lambda size=None: {  # noqa: E731
        "h": rng.uniform(0, 1, size), "s": rng.uniform(0.5, 10, size),
        "sigma": rng.uniform(0.1, 3, size), "scale": rng.uniform(0, 3, size),
    }
    # first calls: the scalar and the per-element layouts
    sc.grad(x, surrogate=name, dtype="float64")
    sc.grad(x, surrogate=name, dtype="float64", **draws(x.shape))
    sc.grad(x, surrogate="squarewave_fourier_series", dtype="float64")
    sc.grad(x, surrogate="squarewave_fourier_series", dtype="float64", n=np.ones(x.shape), t_period=np.ones(x.shape))
    before = engine.stats.compilations
    for _ in range(25):
        p = {k: float(v) for k, v in draws().items()}
        out = sc.grad(x, surrogate=name, dtype="float64", **p)
        np.testing.assert_allclose(out, R.GRAD[name](x, **p), rtol=1e-12, atol=1e-12)
        p = draws(x.shape)
        out = sc.grad(x, surrogate=name, dtype="float64", **p)
        np.testing.assert_allclose(out, R.GRAD[name](x, **p), rtol=1e-12, atol=1e-12)
    # any number of Fourier terms, shared or per element: the loop's trip count is traced
    for n in [1, 3, 17, 64, 300, 1000]:
        t = float(rng.uniform(1, 10))
        out = sc.grad(x, surrogate="squarewave_fourier_series", dtype="float64", n=n, t_period=t)
        np.testing.assert_allclose(out, R.squarewave_fourier_series_grad(x, n, t), rtol=1e-9, atol=1e-9 * n)
        ns = rng.integers(1, n + 1, x.shape).astype(np.float64)
        ts = rng.uniform(1, 10, x.shape)
        out = sc.grad(x, surrogate="squarewave_fourier_series", dtype="float64", n=ns, t_period=ts)
        np.testing.assert_allclose(out, R.squarewave_fourier_series_grad(x, ns, ts), rtol=1e-9, atol=1e-9 * n)
    assert engine.stats.compilations == before
