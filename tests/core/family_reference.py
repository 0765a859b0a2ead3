"""Independent NumPy transcriptions of the whole braintools surrogate family (the test oracle).

Written from braintools 0.3.0's definitions with NumPy and ``math`` only (no JAX, no SciPy, nothing
from ``surrogate_core``). Each reference takes ``x`` and the parameters as already rounded to the
request's dtype, computes in float64 and returns float64: the exact value a correctly rounded
computation would approximate. Where a simpler or more stable closed form exists it is used (e.g.
the sigmoid derivative as ``alpha * e^-|z| / (1 + e^-|z|)**2``) so the reference is not a copy of
the formula under test; branch conditions keep braintools' comparison directions, because they
decide the value at the break points and at NaN (e.g. ``|x| > w`` rather than ``|x| <= w``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GRAD", "FUN", "spike"]


def _f(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _logistic(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z), without overflow."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


_erf = np.frompyfunc(math.erf, 1, 1)


def spike(x) -> np.ndarray:
    x = np.asarray(x)
    return np.where(x >= 0, 1.0, 0.0).astype(x.dtype)


# -- gradients ------------------------------------------------------------------------------------


def sigmoid_grad(x, alpha):
    z = _f(alpha) * _f(x)
    e = np.exp(-np.abs(z))
    return _f(alpha) * e / (1.0 + e) ** 2


def piecewise_quadratic_grad(x, alpha):
    x, a = _f(x), _f(alpha)
    return np.where(np.abs(x) > 1.0 / a, 0.0, a * (1.0 - a * np.abs(x)))


def piecewise_exp_grad(x, alpha):
    a = _f(alpha)
    return 0.5 * a * np.exp(-a * np.abs(_f(x)))


def soft_sign_grad(x, alpha):
    a = _f(alpha)
    return 1.0 / (2.0 * a * (1.0 / a + np.abs(_f(x))) ** 2)


def arctan_grad(x, alpha):
    a = _f(alpha)
    u = math.pi * a * _f(x) / 2.0
    return a / (2.0 + 2.0 * u * u)


def nonzero_sign_log_grad(x, alpha):
    a = _f(alpha)
    return a / (1.0 + a * np.abs(_f(x)))


def erf_grad(x, alpha):
    a = _f(alpha)
    return a / math.sqrt(math.pi) * np.exp(-((a * _f(x)) ** 2))


def piecewise_leaky_relu_grad(x, c, w):
    # braintools' code: 1/(2w) inside the window (its docstring says 1/w); NaN falls inside.
    x, c, w = _f(x), _f(c), _f(w)
    return np.where(np.abs(x) > w, c, 0.5 / w)


def squarewave_fourier_series_grad(x, n, t_period):
    x, n, t = np.broadcast_arrays(_f(x), _f(n), _f(t_period))
    out = np.zeros(x.shape)
    for i in range(1, int(n.max()) + 1):
        out += np.where(i <= n, np.cos((2 * i - 1) * 2.0 * math.pi * x / t), 0.0)
    return 4.0 * out / t


def s2nn_grad(x, alpha, beta, epsilon):
    x, a, b = _f(x), _f(alpha), _f(beta)
    neg = sigmoid_grad(x, a)
    pos = b / (np.where(x < 0, 0.0, x) + 1.0)
    return np.where(x < 0, neg, pos)


def q_pseudo_spike_grad(x, alpha):
    a = _f(alpha)
    return np.exp(-a * np.log1p(2.0 * np.abs(_f(x)) / (a + 1.0)))


def leaky_relu_grad(x, alpha, beta):
    x = _f(x)
    return np.where(x < 0, _f(alpha), _f(beta))


def log_tailed_relu_grad(x, alpha):
    x = _f(x)
    return np.where(x > 1, 1.0 / np.where(x > 1, x, 1.0), np.where(x > 0, 1.0, _f(alpha)))


def relu_grad_grad(x, alpha, width):
    return np.maximum(_f(alpha) * (_f(width) - np.abs(_f(x))), 0.0)


def _normal_pdf(x, mu, sd):
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2.0 * math.pi))


def gaussian_grad_grad(x, sigma, alpha):
    return _f(alpha) * _normal_pdf(_f(x), 0.0, _f(sigma))


def multi_gaussian_grad_grad(x, h, s, sigma, scale):
    x, h, s, sd = _f(x), _f(h), _f(s), _f(sigma)
    side = _normal_pdf(x, sd, s * sd) + _normal_pdf(x, -sd, s * sd)
    return _f(scale) * ((1.0 + h) * _normal_pdf(x, 0.0, sd) - h * side)


def inv_square_grad_grad(x, alpha):
    return (1.0 + _f(alpha) * np.abs(_f(x))) ** -2.0


def slayer_grad_grad(x, alpha):
    return np.exp(-_f(alpha) * np.abs(_f(x)))


# -- smooth functions -----------------------------------------------------------------------------


def sigmoid_fun(x, alpha):
    return _logistic(_f(alpha) * _f(x))


def piecewise_quadratic_fun(x, alpha):
    x, a = _f(x), _f(alpha)
    inner = 0.5 + a * x - 0.5 * a * a * x * np.abs(x)
    return np.where(x < -1.0 / a, 0.0, np.where(x > 1.0 / a, 1.0, inner))


def piecewise_exp_fun(x, alpha):
    x, a = _f(x), _f(alpha)
    return np.where(x < 0, 0.5 * np.exp(a * np.minimum(x, 0.0)), 1.0 - 0.5 * np.exp(-a * np.maximum(x, 0.0)))


def soft_sign_fun(x, alpha):
    ax = _f(alpha) * _f(x)
    return 0.5 * (ax / (1.0 + np.abs(ax)) + 1.0)


def arctan_fun(x, alpha):
    return 0.5 + np.arctan(math.pi / 2.0 * _f(alpha) * _f(x)) / math.pi


def nonzero_sign_log_fun(x, alpha):
    x = _f(x)
    return np.where(x < 0, -1.0, 1.0) * np.log1p(np.abs(_f(alpha) * x))


def erf_fun(x, alpha):
    z = _f(alpha) * _f(x)
    return 0.5 * (1.0 + np.asarray(_erf(z), np.float64))


def piecewise_leaky_relu_fun(x, c, w):
    x, c, w = _f(x), _f(c), _f(w)
    return np.where(x < -w, c * (x + w), np.where(x > w, c * (x - w) + 1.0, (x / w + 1.0) / 2.0))


def squarewave_fourier_series_fun(x, n, t_period):
    x, n, t = np.broadcast_arrays(_f(x), _f(n), _f(t_period))
    out = np.zeros(x.shape)
    for i in range(1, int(n.max()) + 1):
        k = 2 * i - 1
        out += np.where(i <= n, np.sin(k * 2.0 * math.pi * x / t) / k, 0.0)
    return 0.5 + 2.0 * out / math.pi


def s2nn_fun(x, alpha, beta, epsilon):
    x = _f(x)
    pos = _f(beta) * np.log(np.abs(x + 1.0) + _f(epsilon)) + 0.5
    return np.where(x < 0, _logistic(_f(alpha) * x), pos)


def q_pseudo_spike_fun(x, alpha):
    x, a = _f(x), _f(alpha)
    lb = np.log1p(2.0 * np.abs(x) / (a + 1.0))
    one = a == 1.0
    d = np.where(one, 1.0, 1.0 - a)
    integral = np.where(one, (a + 1.0) / 2.0 * lb, (a + 1.0) / (2.0 * d) * np.expm1(d * lb))
    return 0.5 + np.sign(x) * integral


def leaky_relu_fun(x, alpha, beta):
    x = _f(x)
    return np.where(x < 0, _f(alpha) * x, _f(beta) * x)


def log_tailed_relu_fun(x, alpha):
    x = _f(x)
    return np.where(x > 1, 1.0 + np.log(np.where(x > 1, x, 1.0)), np.where(x > 0, x, _f(alpha) * x))


GRAD = {
    "sigmoid": sigmoid_grad,
    "piecewise_quadratic": piecewise_quadratic_grad,
    "piecewise_exp": piecewise_exp_grad,
    "soft_sign": soft_sign_grad,
    "arctan": arctan_grad,
    "nonzero_sign_log": nonzero_sign_log_grad,
    "erf": erf_grad,
    "piecewise_leaky_relu": piecewise_leaky_relu_grad,
    "squarewave_fourier_series": squarewave_fourier_series_grad,
    "s2nn": s2nn_grad,
    "q_pseudo_spike": q_pseudo_spike_grad,
    "leaky_relu": leaky_relu_grad,
    "log_tailed_relu": log_tailed_relu_grad,
    "relu_grad": relu_grad_grad,
    "gaussian_grad": gaussian_grad_grad,
    "multi_gaussian_grad": multi_gaussian_grad_grad,
    "inv_square_grad": inv_square_grad_grad,
    "slayer_grad": slayer_grad_grad,
}

FUN = {
    "sigmoid": sigmoid_fun,
    "piecewise_quadratic": piecewise_quadratic_fun,
    "piecewise_exp": piecewise_exp_fun,
    "soft_sign": soft_sign_fun,
    "arctan": arctan_fun,
    "nonzero_sign_log": nonzero_sign_log_fun,
    "erf": erf_fun,
    "piecewise_leaky_relu": piecewise_leaky_relu_fun,
    "squarewave_fourier_series": squarewave_fourier_series_fun,
    "s2nn": s2nn_fun,
    "q_pseudo_spike": q_pseudo_spike_fun,
    "leaky_relu": leaky_relu_fun,
    "log_tailed_relu": log_tailed_relu_fun,
}
