"""The jnp formulas, one small pure function each, in braintools' order.

Transcribed from ``braintools.surrogate`` 0.3.0 (``braintools/surrogate/_impl.py``): each function
is the ``surrogate_grad`` or ``surrogate_fun`` of the braintools class its docstring names,
operation by operation (same comparisons and where-branches, same order of operations), with
``self.<param>`` replaced by the argument of the same name. Where braintools' docstring and code
disagree, the code is followed (see the "Docstring vs code" notes in ``_surrogates.py``).

Every function is elementwise in ``x`` and in each parameter, and every parameter is traced (a 0-d
array or an array of ``x``'s shape, never a static Python value); constants are Python scalars so
that the result keeps ``x``'s dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
from jax import lax

__all__ = [
    "heaviside",
    "sigmoid_grad",
    "sigmoid_fun",
    "piecewise_quadratic_grad",
    "piecewise_quadratic_fun",
    "piecewise_exp_grad",
    "piecewise_exp_fun",
    "soft_sign_grad",
    "soft_sign_fun",
    "arctan_grad",
    "arctan_fun",
    "nonzero_sign_log_grad",
    "nonzero_sign_log_fun",
    "erf_grad",
    "erf_fun",
    "piecewise_leaky_relu_grad",
    "piecewise_leaky_relu_fun",
    "squarewave_fourier_series_grad",
    "squarewave_fourier_series_fun",
    "s2nn_grad",
    "s2nn_fun",
    "q_pseudo_spike_grad",
    "q_pseudo_spike_fun",
    "leaky_relu_grad",
    "leaky_relu_fun",
    "log_tailed_relu_grad",
    "log_tailed_relu_fun",
    "relu_grad_grad",
    "gaussian_grad_grad",
    "multi_gaussian_grad_grad",
    "inv_square_grad_grad",
    "slayer_grad_grad",
]


def heaviside(x):
    r"""The spike: :math:`H(x) = 1` where :math:`x \ge 0` (also at ``-0.0``), else 0; NaN gives 0.

    Read from the bits of ``x``, not by a float comparison: XLA on the CPU flushes subnormals to
    zero, so ``x >= 0`` would be 1 for a negative subnormal such as ``-1.4e-45`` (float32). As an
    integer of the same width, ``x`` is ``>= 0`` exactly when its sign bit is clear, at most the bits
    of ``+inf`` when it is not NaN, and the smallest integer when it is ``-0.0``.

    >>> heaviside(jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0]))
    Array([0., 0., 1., 1., 1.], dtype=float32)
    """
    itype = _SAME_WIDTH_INT[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(x, itype)
    inf = int(np.asarray(np.inf, x.dtype).view(itype))
    minus_zero = -(1 << (8 * x.dtype.itemsize - 1))  # the sign bit alone: the smallest integer
    return (((bits >= 0) & (bits <= inf)) | (bits == minus_zero)).astype(x.dtype)


#: the signed integer type of each float width (bytes), for reading a float's bits
_SAME_WIDTH_INT = {2: np.int16, 4: np.int32, 8: np.int64}


def sigmoid_grad(x, alpha):
    r"""Sigmoid gradient.

    .. math::
        g'(x) = \alpha \, (1 - \sigma(\alpha x)) \, \sigma(\alpha x), \qquad
        \sigma(z) = 1 / (1 + e^{-z})
    """
    sgax = jsp.special.expit(x * alpha)
    return (1.0 - sgax) * sgax * alpha


def sigmoid_fun(x, alpha):
    r"""Sigmoid smooth function.

    .. math::
        g(x) = \sigma(\alpha x)
    """
    return jsp.special.expit(alpha * x)


def piecewise_quadratic_grad(x, alpha):
    r"""PiecewiseQuadratic gradient.

    .. math::
        g'(x) = \begin{cases} 0, & |x| > 1/\alpha \\ \alpha - \alpha^2 |x|, & |x| \le 1/\alpha \end{cases}
    """
    ax = jnp.abs(x)
    return jnp.where(ax > 1 / alpha, 0.0, alpha - alpha**2 * ax)


def piecewise_quadratic_fun(x, alpha):
    r"""PiecewiseQuadratic smooth function.

    .. math::
        g(x) = \begin{cases} 0, & x < -1/\alpha \\ 1, & x > 1/\alpha \\
        (-\alpha |x| / 2 + 1)\,\alpha x + 1/2, & \text{otherwise} \end{cases}
    """
    return jnp.where(
        x < -1 / alpha,
        0.0,
        jnp.where(x > 1 / alpha, 1.0, (-alpha * jnp.abs(x) / 2 + 1) * alpha * x + 0.5),
    )


def piecewise_exp_grad(x, alpha):
    r"""PiecewiseExp gradient.

    .. math::
        g'(x) = \frac{\alpha}{2} e^{-\alpha |x|}
    """
    return (alpha / 2) * jnp.exp(-alpha * jnp.abs(x))


def piecewise_exp_fun(x, alpha):
    r"""PiecewiseExp smooth function.

    .. math::
        g(x) = \begin{cases} e^{\alpha x} / 2, & x < 0 \\ 1 - e^{-\alpha x} / 2, & x \ge 0 \end{cases}
    """
    return jnp.where(x < 0, jnp.exp(alpha * x) / 2, 1 - jnp.exp(-alpha * x) / 2)


def soft_sign_grad(x, alpha):
    r"""SoftSign gradient.

    .. math::
        g'(x) = \frac{\alpha}{2 (1 + |\alpha x|)^2}
    """
    return alpha * 0.5 / (1 + jnp.abs(alpha * x)) ** 2


def soft_sign_fun(x, alpha):
    r"""SoftSign smooth function.

    .. math::
        g(x) = \frac{x}{2/\alpha + 2|x|} + \frac{1}{2}
    """
    return x / (2 / alpha + 2 * jnp.abs(x)) + 0.5


def arctan_grad(x, alpha):
    r"""Arctan gradient.

    .. math::
        g'(x) = \frac{\alpha}{2 \, (1 + (\frac{\pi}{2} \alpha x)^2)}
    """
    return alpha * 0.5 / (1 + (jnp.pi / 2 * alpha * x) ** 2)


def arctan_fun(x, alpha):
    r"""Arctan smooth function.

    .. math::
        g(x) = \frac{1}{\pi} \arctan(\frac{\pi}{2} \alpha x) + \frac{1}{2}
    """
    return jnp.arctan(jnp.pi / 2 * alpha * x) / jnp.pi + 0.5


def nonzero_sign_log_grad(x, alpha):
    r"""NonzeroSignLog gradient.

    .. math::
        g'(x) = \frac{1}{1/\alpha + |x|}
    """
    return 1.0 / (1 / alpha + jnp.abs(x))


def nonzero_sign_log_fun(x, alpha):
    r"""NonzeroSignLog smooth function (the sign is +1 at ``x = 0`` and ``x = -0.0``).

    .. math::
        g(x) = \mathrm{NonzeroSign}(x) \log(|\alpha x| + 1), \qquad
        \mathrm{NonzeroSign}(x) = \begin{cases} -1, & x < 0 \\ 1, & x \ge 0 \end{cases}
    """
    return jnp.where(x < 0, -1.0, 1.0) * jnp.log(jnp.abs(alpha * x) + 1)


def erf_grad(x, alpha):
    r"""ERF gradient.

    .. math::
        g'(x) = \frac{\alpha}{\sqrt{\pi}} e^{-\alpha^2 x^2}
    """
    return (alpha / jnp.sqrt(jnp.pi)) * jnp.exp(-jnp.power(alpha, 2) * x * x)


def erf_fun(x, alpha):
    r"""ERF smooth function.

    .. math::
        g(x) = \frac{1}{2} \left(1 - \mathrm{erf}(-\alpha x)\right)
    """
    return 0.5 * (1.0 - jsp.special.erf(-alpha * x))


def piecewise_leaky_relu_grad(x, c, w):
    r"""PiecewiseLeakyRelu gradient (braintools' code: ``1/(2w)`` inside the window).

    .. math::
        g'(x) = \begin{cases} c, & |x| > w \\ \frac{1}{2w}, & |x| \le w \end{cases}
    """
    return jnp.where(jnp.abs(x) > w, c, 1 / (2 * w))


def piecewise_leaky_relu_fun(x, c, w):
    r"""PiecewiseLeakyRelu smooth function.

    .. math::
        g(x) = \begin{cases} c x + c w, & x < -w \\ c x - c w + 1, & x > w \\
        \frac{x}{2w} + \frac{1}{2}, & \text{otherwise} \end{cases}
    """
    return jnp.where(
        x < -w,
        c * x + c * w,
        jnp.where(x > w, c * x - c * w + 1, 0.5 * x / w + 0.5),
    )


def _odd_harmonics(x, n, t_period, term):
    r"""``sum(term(c * w * x, c) for c = 1, 3, ..., 2n - 1)`` with ``w = 2 pi / t_period``, added in
    braintools' order (its Python loop starts from the ``c = 1`` term; ``0 + a == a`` exactly).

    ``n`` is traced and may differ per element: the loop runs to ``max(n)`` (a dynamic trip count,
    so no value of ``n`` compiles anything new) and an element takes term ``i`` only while
    ``i <= n``.
    """
    w = jnp.pi * 2.0 / t_period
    n_int = jnp.asarray(n).astype(jnp.int32)
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(n), jnp.shape(t_period))
    acc = jnp.zeros(shape, jnp.result_type(x, t_period))

    def add_term(i, acc):
        c = (2 * i - 1).astype(acc.dtype)  # braintools: 2 * i - 1.
        return acc + jnp.where(i <= n_int, term(c * w * x, c), 0.0)

    return lax.fori_loop(1, jnp.max(n_int) + 1, add_term, acc)


def squarewave_fourier_series_grad(x, n, t_period):
    r"""SquarewaveFourierSeries gradient (``n`` terms; ``n`` may differ per element).

    .. math::
        g'(x) = \frac{4}{T} \sum_{i=1}^{n} \cos\left((2i - 1) \frac{2\pi}{T} x\right)
    """
    dx = _odd_harmonics(x, n, t_period, lambda z, c: jnp.cos(z))
    return dx * (4.0 / t_period)


def squarewave_fourier_series_fun(x, n, t_period):
    r"""SquarewaveFourierSeries smooth function.

    .. math::
        g(x) = \frac{1}{2} + \frac{2}{\pi} \sum_{i=1}^{n}
        \frac{\sin\left((2i - 1) \frac{2\pi}{T} x\right)}{2i - 1}
    """
    ret = _odd_harmonics(x, n, t_period, lambda z, c: jnp.sin(z) / c)
    return 0.5 + 2.0 / jnp.pi * ret


def s2nn_grad(x, alpha, beta, epsilon):
    r"""S2NN gradient (``epsilon`` is unused: it only enters the smooth function).

    .. math::
        g'(x) = \begin{cases} \alpha \, \sigma(\alpha x) (1 - \sigma(\alpha x)), & x < 0 \\
        \frac{\beta}{x + 1}, & x \ge 0 \end{cases}
    """
    del epsilon
    sg = jsp.special.expit(alpha * x)
    x_safe = jnp.where(x < 0.0, 1.0, x)
    return jnp.where(x < 0.0, alpha * sg * (1.0 - sg), beta / (x_safe + 1.0))


def s2nn_fun(x, alpha, beta, epsilon):
    r"""S2NN smooth function.

    .. math::
        g(x) = \begin{cases} \sigma(\alpha x), & x < 0 \\
        \beta \ln(|x + 1| + \epsilon) + \frac{1}{2}, & x \ge 0 \end{cases}
    """
    return jnp.where(
        x < 0.0,
        jsp.special.expit(x * alpha),
        beta * jnp.log(jnp.abs(x + 1.0) + epsilon) + 0.5,
    )


def q_pseudo_spike_grad(x, alpha):
    r"""QPseudoSpike gradient.

    .. math::
        g'(x) = \left(1 + \frac{2 |x|}{\alpha + 1}\right)^{-\alpha}
    """
    return jnp.power(1 + 2 / (alpha + 1) * jnp.abs(x), -alpha)


def q_pseudo_spike_fun(x, alpha):
    r"""QPseudoSpike smooth function (the ``alpha = 1`` case is the logarithmic limit).

    .. math::
        g(x) = \frac{1}{2} + \mathrm{sign}(x) \begin{cases}
        \frac{\alpha + 1}{2 (1 - \alpha)} \left[b^{1 - \alpha} - 1\right], & \alpha \ne 1 \\
        \frac{\alpha + 1}{2} \ln b, & \alpha = 1 \end{cases}, \qquad
        b = 1 + \frac{2 |x|}{\alpha + 1}
    """
    a = alpha
    base = 1.0 + 2.0 / (a + 1.0) * jnp.abs(x)
    one_minus_a = 1.0 - a
    safe = jnp.where(one_minus_a == 0.0, 1.0, one_minus_a)
    integral = jnp.where(
        one_minus_a == 0.0,
        (a + 1.0) / 2.0 * jnp.log(base),
        (a + 1.0) / (2.0 * safe) * (jnp.power(base, one_minus_a) - 1.0),
    )
    return 0.5 + jnp.sign(x) * integral


def leaky_relu_grad(x, alpha, beta):
    r"""LeakyRelu gradient.

    .. math::
        g'(x) = \begin{cases} \alpha, & x < 0 \\ \beta, & x \ge 0 \end{cases}
    """
    return jnp.where(x < 0.0, alpha, beta)


def leaky_relu_fun(x, alpha, beta):
    r"""LeakyRelu smooth function.

    .. math::
        g(x) = \begin{cases} \alpha x, & x < 0 \\ \beta x, & x \ge 0 \end{cases}
    """
    return jnp.where(x < 0.0, alpha * x, beta * x)


def log_tailed_relu_grad(x, alpha):
    r"""LogTailedRelu gradient.

    .. math::
        g'(x) = \begin{cases} \alpha, & x \le 0 \\ 1, & 0 < x \le 1 \\ 1/x, & x > 1 \end{cases}
    """
    x_safe = jnp.where(x > 1, x, 1.0)
    return jnp.where(x > 1, 1 / x_safe, jnp.where(x > 0, 1.0, alpha))


def log_tailed_relu_fun(x, alpha):
    r"""LogTailedRelu smooth function.

    .. math::
        g(x) = \begin{cases} \alpha x, & x \le 0 \\ x, & 0 < x \le 1 \\ 1 + \ln x, & x > 1 \end{cases}
    """
    x_safe = jnp.where(x > 1, x, 1.0)
    return jnp.where(x > 1, 1.0 + jnp.log(x_safe), jnp.where(x > 0, x, alpha * x))


def relu_grad_grad(x, alpha, width):
    r"""ReluGrad gradient (gradient-only).

    .. math::
        g'(x) = \max(\alpha w - \alpha |x|, 0), \qquad w = \mathrm{width}
    """
    return jnp.maximum(alpha * width - jnp.abs(x) * alpha, 0)


def gaussian_grad_grad(x, sigma, alpha):
    r"""GaussianGrad gradient (gradient-only).

    .. math::
        g'(x) = \alpha \, \frac{1}{\sigma \sqrt{2\pi}} \exp\left(-\frac{x^2}{2\sigma^2}\right)
    """
    dx = jnp.exp(-(x**2) / (2 * jnp.power(sigma, 2))) / (jnp.sqrt(2 * jnp.pi) * sigma)
    return alpha * dx


def multi_gaussian_grad_grad(x, h, s, sigma, scale):
    r"""MultiGaussianGrad gradient (gradient-only).

    .. math::
        g'(x) = \mathrm{scale} \left[(1 + h) \mathcal{N}(x; 0, \sigma^2)
        - h \mathcal{N}(x; \sigma, (s\sigma)^2) - h \mathcal{N}(x; -\sigma, (s\sigma)^2)\right]
    """
    g1 = jnp.exp(-(x**2) / (2 * jnp.power(sigma, 2))) / (jnp.sqrt(2 * jnp.pi) * sigma)
    g2 = jnp.exp(-((x - sigma) ** 2) / (2 * jnp.power(s * sigma, 2))) / (jnp.sqrt(2 * jnp.pi) * s * sigma)
    g3 = jnp.exp(-((x + sigma) ** 2) / (2 * jnp.power(s * sigma, 2))) / (jnp.sqrt(2 * jnp.pi) * s * sigma)
    dx = g1 * (1.0 + h) - g2 * h - g3 * h
    return scale * dx


def inv_square_grad_grad(x, alpha):
    r"""InvSquareGrad gradient (gradient-only).

    .. math::
        g'(x) = \frac{1}{(\alpha |x| + 1)^2}
    """
    return 1.0 / (alpha * jnp.abs(x) + 1.0) ** 2


def slayer_grad_grad(x, alpha):
    r"""SlayerGrad gradient (gradient-only).

    .. math::
        g'(x) = e^{-\alpha |x|}
    """
    return jnp.exp(-alpha * jnp.abs(x))
