"""The jnp formulas, one small pure function each.

Transcribed from ``braintools.surrogate`` (``braintools/surrogate/_impl.py``). Every function is
elementwise in ``x`` and in each parameter; constants are Python scalars so that the result keeps
``x``'s dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
    "heaviside",
    "piecewise_quadratic_grad",
    "piecewise_quadratic_fun",
]


def heaviside(x):
    r"""The spike: :math:`H(x) = 1` where :math:`x \ge 0` (also at ``-0.0``), else 0; NaN gives 0.

    >>> heaviside(jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0]))
    Array([0., 0., 1., 1., 1.], dtype=float32)
    """
    return (x >= 0).astype(x.dtype)


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
