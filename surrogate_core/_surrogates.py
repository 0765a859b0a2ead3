"""The surrogate definitions: one ``register(Surrogate(...))`` per function.

To add a surrogate: write its formulas in ``_formulas.py`` and register it here. Nothing else
(engine, service, schema, client) needs to change.
"""

from __future__ import annotations

from . import _formulas as F
from ._registry import POSITIVE, Check, Param, Surrogate, register

__all__: list[str] = []

register(
    Surrogate(
        name="piecewise_quadratic",
        braintools_name="PiecewiseQuadratic",
        description=(
            "Piecewise quadratic surrogate (Esser et al. 2016; Wu et al. 2018): a triangle-shaped "
            "gradient of height alpha, non-zero on [-1/alpha, 1/alpha]."
        ),
        params=(
            Param(
                "alpha",
                1.0,
                POSITIVE,
                "Width and steepness: the gradient is alpha at x = 0 and vanishes for |x| > 1/alpha.",
            ),
        ),
        grad=F.piecewise_quadratic_grad,
        grad_formula="g'(x) = 0 if |x| > 1/alpha else alpha - alpha**2 * |x|",
        fun=F.piecewise_quadratic_fun,
        fun_formula=(
            "g(x) = 0 if x < -1/alpha; 1 if x > 1/alpha; (-alpha*|x|/2 + 1) * alpha * x + 1/2 otherwise"
        ),
        checks=(
            Check("alpha**2", ("alpha",), lambda alpha: alpha * alpha),
            Check("1/alpha", ("alpha",), lambda alpha: alpha.dtype.type(1) / alpha),
        ),
    )
)
