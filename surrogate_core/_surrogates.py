"""The surrogate definitions: one ``register(Surrogate(...))`` per function, in braintools' order.

To add a surrogate: write its formulas in ``_formulas.py`` and register it here. Nothing else
(engine, service, schema, client) needs to change.

Docstring vs code
-----------------
The formulas follow braintools 0.3.0's *code* (``braintools/surrogate/_impl.py``). Where its
docstrings say something else, the code wins; the disagreements found:

* ``PiecewiseLeakyRelu`` (``piecewise_leaky_relu``): the docstring's backward function is
  ``g'(x) = 1/w`` for ``|x| <= w`` (``c`` outside). The code returns
  ``jnp.where(jnp.abs(x) > w, c, 1 / (2 * w))``, i.e. ``1/(2w)`` inside the window, which is the
  slope of the docstring's own original function ``x/(2w) + 1/2``. Served: ``1/(2w)``.
* ``S2NN`` (``s2nn``): the docstring's original function for ``x >= 0`` is
  ``beta * ln(|x + 1|) + 0.5``; the code's ``surrogate_fun`` is
  ``beta * log(|x + 1| + epsilon) + 0.5``. The code's ``surrogate_grad`` (``beta / (x + 1)``)
  ignores ``epsilon``, so it is the derivative of the documented function, not exactly of the
  code's ``surrogate_fun`` (whose derivative is ``beta / (x + 1 + epsilon)``, a relative
  difference of about ``epsilon``). Served: both exactly as the code computes them.
* ``QPseudoSpike`` (``q_pseudo_spike``): the class docstring's introduction says alpha allows
  "gradient profiles from heavy-tailed to compact support"; the code's gradient
  ``(1 + 2|x|/(alpha + 1))**-alpha`` is > 0 for every finite ``x`` (never compact support), as the
  docstring's own Parameters section says.
* ``GaussianGrad`` (``gaussian_grad``): the Parameters section says alpha "determines the maximum
  gradient value at x=0"; the code's value at ``x = 0`` is ``alpha / (sigma * sqrt(2*pi))``
  (0.399 at the defaults, not alpha = 0.5), as the docstring's Notes say.
* The package docstring (``braintools/surrogate/__init__.py``) calls
  ``PiecewiseLeakyRelu(c=0.01, alpha=1.0)`` (the class has no ``alpha``: its parameters are ``c``
  and ``w``) and ``MultiGaussianGrad(h=0.15, s=6.0, gamma=0.5)`` with ``s`` commented as "sigma"
  (the class has no ``gamma``; ``s`` is the width factor of the side Gaussians, ``sigma`` is its
  own parameter). Both calls raise ``TypeError`` in braintools; the parameter names here are the
  classes' (``c, w`` and ``h, s, sigma, scale``).

Constraints follow from the formulas: a parameter that is divided by, or is a width, a rate or a
steepness, is ``POSITIVE``; a gain or leak whose zero is meaningful (braintools documents
``alpha = 0`` for LeakyRelu and LogTailedRelu) is ``NONNEGATIVE``. ``Check`` entries refuse
parameter values whose derived quantities would overflow (or, for a divisor, underflow to 0) in the
request's dtype, which would otherwise turn results into inf/NaN or silently into 0. A divisor
must also stay a normal number: XLA flushes subnormal intermediates to zero.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from . import _formulas as F
from ._registry import NONNEGATIVE, POSITIVE, Check, Param, Surrogate, integer_between, register

__all__: list[str] = []

#: The most Fourier terms SquarewaveFourierSeries may sum: its loop runs ``max(n)`` times per
#: element, so ``n`` is bounded. Every dtype but bfloat16 holds the odd factors ``2n - 1`` exactly.
MAX_FOURIER_TERMS = 1000

_SQRT_2PI = math.sqrt(2 * math.pi)


def _k(a: np.ndarray, value: float) -> np.generic:
    """``value`` in ``a``'s dtype (NumPy would promote a Python float with bfloat16 to float32)."""
    return a.dtype.type(value)


def _normal(v: np.ndarray) -> np.ndarray:
    """``v``, with inf where it is 0 or subnormal: for a divisor that must not underflow. XLA
    flushes subnormal intermediates to zero (CPU, and GPU in float32), so a subnormal divisor is
    as bad as 0 (``0/0`` is NaN at ``x = 0``)."""
    return np.where(np.abs(v) >= ml_dtypes.finfo(v.dtype).tiny, v, np.inf)


register(
    Surrogate(
        name="sigmoid",
        braintools_name="Sigmoid",
        description=(
            "Sigmoid surrogate: the derivative of the logistic function sigma(alpha*x), a bell of "
            "height alpha/4 at x = 0."
        ),
        params=(
            Param("alpha", 4.0, POSITIVE, "Steepness: larger values give a taller, narrower gradient."),
        ),
        grad=F.sigmoid_grad,
        grad_formula="g'(x) = alpha * (1 - sigmoid(alpha*x)) * sigmoid(alpha*x), sigmoid(z) = 1/(1 + exp(-z))",
        fun=F.sigmoid_fun,
        fun_formula="g(x) = sigmoid(alpha*x)",
    )
)

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

register(
    Surrogate(
        name="piecewise_exp",
        braintools_name="PiecewiseExp",
        description=(
            "Piecewise exponential surrogate (Neftci et al. 2019): a Laplace-shaped gradient "
            "alpha/2 * exp(-alpha*|x|)."
        ),
        params=(
            Param(
                "alpha", 1.0, POSITIVE, "Decay rate: the gradient is alpha/2 at x = 0 and decays like exp(-alpha*|x|)."
            ),
        ),
        grad=F.piecewise_exp_grad,
        grad_formula="g'(x) = alpha/2 * exp(-alpha * |x|)",
        fun=F.piecewise_exp_fun,
        fun_formula="g(x) = exp(alpha*x) / 2 if x < 0 else 1 - exp(-alpha*x) / 2",
    )
)

register(
    Surrogate(
        name="soft_sign",
        braintools_name="SoftSign",
        description=(
            "Soft-sign surrogate: gradient alpha / (2 * (1 + |alpha*x|)**2), height alpha/2 with a "
            "1/x**2 tail."
        ),
        params=(
            Param("alpha", 1.0, POSITIVE, "Steepness: larger values give a taller, narrower gradient."),
        ),
        grad=F.soft_sign_grad,
        grad_formula="g'(x) = alpha * 0.5 / (1 + |alpha * x|)**2",
        fun=F.soft_sign_fun,
        fun_formula="g(x) = x / (2/alpha + 2*|x|) + 1/2",
        checks=(Check("2/alpha", ("alpha",), lambda alpha: _k(alpha, 2) / alpha),),
    )
)

register(
    Surrogate(
        name="arctan",
        braintools_name="Arctan",
        description=(
            "Arctangent surrogate: a Lorentzian-shaped gradient alpha / (2 * (1 + (pi/2*alpha*x)**2)) "
            "of height alpha/2."
        ),
        params=(
            Param("alpha", 1.0, POSITIVE, "Steepness: larger values give a taller, narrower gradient."),
        ),
        grad=F.arctan_grad,
        grad_formula="g'(x) = alpha * 0.5 / (1 + (pi/2 * alpha * x)**2)",
        fun=F.arctan_fun,
        fun_formula="g(x) = arctan(pi/2 * alpha * x) / pi + 1/2",
        checks=(Check("pi/2*alpha", ("alpha",), lambda alpha: _k(alpha, math.pi / 2) * alpha),),
    )
)

register(
    Surrogate(
        name="nonzero_sign_log",
        braintools_name="NonzeroSignLog",
        description=(
            "Nonzero-sign-log surrogate: gradient 1 / (1/alpha + |x|), height alpha with a 1/|x| "
            "tail; cheap to compute."
        ),
        params=(
            Param("alpha", 1.0, POSITIVE, "Steepness: the gradient is alpha at x = 0."),
        ),
        grad=F.nonzero_sign_log_grad,
        grad_formula="g'(x) = 1 / (1/alpha + |x|)",
        fun=F.nonzero_sign_log_fun,
        fun_formula="g(x) = s * log(|alpha * x| + 1), s = -1 if x < 0 else 1",
        checks=(Check("1/alpha", ("alpha",), lambda alpha: _k(alpha, 1) / alpha),),
    )
)

register(
    Surrogate(
        name="erf",
        braintools_name="ERF",
        description=(
            "Error-function surrogate (Esser et al. 2015; Wu et al. 2018; Yin et al. 2020): a "
            "Gaussian-shaped gradient alpha/sqrt(pi) * exp(-alpha**2 * x**2)."
        ),
        params=(
            Param("alpha", 1.0, POSITIVE, "Steepness: the gradient is alpha/sqrt(pi) at x = 0, of width ~1/alpha."),
        ),
        grad=F.erf_grad,
        grad_formula="g'(x) = alpha / sqrt(pi) * exp(-alpha**2 * x * x)",
        fun=F.erf_fun,
        fun_formula="g(x) = (1 - erf(-alpha * x)) / 2",
        checks=(Check("alpha**2", ("alpha",), lambda alpha: alpha * alpha),),
    )
)

register(
    Surrogate(
        name="piecewise_leaky_relu",
        braintools_name="PiecewiseLeakyRelu",
        description=(
            "Piecewise leaky ReLU surrogate (Yin et al. 2017; Wu et al. 2018; Huh & Sejnowski 2018; "
            "and others): gradient 1/(2w) on [-w, w] and the leak c outside (braintools' code; its "
            "docstring says 1/w)."
        ),
        params=(
            Param("c", 0.01, NONNEGATIVE, "Leak: the gradient for |x| > w."),
            Param("w", 1.0, POSITIVE, "Half-width of the window [-w, w] where the gradient is 1/(2w)."),
        ),
        grad=F.piecewise_leaky_relu_grad,
        grad_formula="g'(x) = c if |x| > w else 1/(2*w)",
        fun=F.piecewise_leaky_relu_fun,
        fun_formula="g(x) = c*x + c*w if x < -w; c*x - c*w + 1 if x > w; x/(2*w) + 1/2 otherwise",
        checks=(
            Check("2*w", ("w",), lambda w: 2 * w),
            Check("1/(2*w)", ("w",), lambda w: _k(w, 1) / (2 * w)),
            Check("c*w", ("c", "w"), lambda c, w: c * w),
        ),
    )
)

register(
    Surrogate(
        name="squarewave_fourier_series",
        braintools_name="SquarewaveFourierSeries",
        description=(
            "Square-wave Fourier series surrogate: the derivative of the first n odd harmonics of a "
            "square wave of period t_period (a periodic gradient of height 4n/t_period at x = 0)."
        ),
        params=(
            Param(
                "n",
                2,
                integer_between(1, MAX_FOURIER_TERMS),
                "Number of Fourier terms (odd harmonics 1, 3, ..., 2n-1) summed.",
            ),
            Param("t_period", 8.0, POSITIVE, "Period T of the square wave (and of the gradient)."),
        ),
        grad=F.squarewave_fourier_series_grad,
        grad_formula="g'(x) = 4/T * sum_{i=1..n} cos((2i - 1) * 2*pi/T * x), T = t_period",
        fun=F.squarewave_fourier_series_fun,
        cost=lambda p: np.max(p["n"]),  # n cosines per element
        fun_formula="g(x) = 1/2 + 2/pi * sum_{i=1..n} sin((2i - 1) * 2*pi/T * x) / (2i - 1), T = t_period",
        checks=(
            Check(
                "(2*n - 1) * 2*pi/t_period",
                ("t_period", "n"),
                lambda t, n: (2 * n - 1) * (_k(t, 2 * math.pi) / t),
            ),  # the highest harmonic's frequency; when finite, so is the peak 4*n/t_period
        ),
    )
)

register(
    Surrogate(
        name="s2nn",
        braintools_name="S2NN",
        description=(
            "S2NN surrogate (Suetake et al. 2022): a sigmoid-shaped gradient for x < 0 and "
            "beta/(x + 1) for x >= 0."
        ),
        params=(
            Param("alpha", 4.0, POSITIVE, "Steepness of the sigmoid-shaped gradient for x < 0."),
            Param("beta", 1.0, NONNEGATIVE, "Scale of the gradient beta/(x + 1) for x >= 0."),
            Param(
                "epsilon",
                1e-8,
                NONNEGATIVE,
                "Added inside the logarithm of the smooth function for x >= 0; unused by the gradient.",
            ),
        ),
        grad=F.s2nn_grad,
        grad_formula=(
            "g'(x) = alpha * sigmoid(alpha*x) * (1 - sigmoid(alpha*x)) if x < 0 else beta / (x + 1)"
        ),
        fun=F.s2nn_fun,
        fun_formula="g(x) = sigmoid(alpha*x) if x < 0 else beta * log(|x + 1| + epsilon) + 1/2",
    )
)

register(
    Surrogate(
        name="q_pseudo_spike",
        braintools_name="QPseudoSpike",
        description=(
            "q-PseudoSpike surrogate (Herranz-Celotti & Rouat 2022): gradient "
            "(1 + 2|x|/(alpha + 1))**-alpha, 1 at x = 0 with a power-law tail."
        ),
        params=(
            Param("alpha", 2.0, POSITIVE, "Tail fatness q: smaller values give heavier tails."),
        ),
        grad=F.q_pseudo_spike_grad,
        grad_formula="g'(x) = (1 + 2/(alpha + 1) * |x|)**(-alpha)",
        fun=F.q_pseudo_spike_fun,
        fun_formula=(
            "g(x) = 1/2 + sign(x) * (alpha + 1)/(2*(1 - alpha)) * (b**(1 - alpha) - 1), "
            "b = 1 + 2/(alpha + 1) * |x|; at alpha = 1: 1/2 + sign(x) * (alpha + 1)/2 * log(b)"
        ),
        checks=(Check("2*(1 - alpha)", ("alpha",), lambda alpha: 2 * (1 - alpha)),),
    )
)

register(
    Surrogate(
        name="leaky_relu",
        braintools_name="LeakyRelu",
        description="Leaky ReLU surrogate: a constant gradient alpha for x < 0 and beta for x >= 0.",
        params=(
            Param("alpha", 0.1, NONNEGATIVE, "Gradient for x < 0 (0 gives the plain ReLU)."),
            Param("beta", 1.0, NONNEGATIVE, "Gradient for x >= 0."),
        ),
        grad=F.leaky_relu_grad,
        grad_formula="g'(x) = alpha if x < 0 else beta",
        fun=F.leaky_relu_fun,
        fun_formula="g(x) = alpha * x if x < 0 else beta * x",
    )
)

register(
    Surrogate(
        name="log_tailed_relu",
        braintools_name="LogTailedRelu",
        description=(
            "Log-tailed ReLU surrogate (Cai et al. 2017): gradient alpha for x <= 0, 1 on (0, 1] "
            "and 1/x beyond."
        ),
        params=(
            Param("alpha", 0.0, NONNEGATIVE, "Gradient for x <= 0 (0: none; > 0: leaky)."),
        ),
        grad=F.log_tailed_relu_grad,
        grad_formula="g'(x) = 1/x if x > 1; 1 if 0 < x <= 1; alpha if x <= 0",
        fun=F.log_tailed_relu_fun,
        fun_formula="g(x) = 1 + log(x) if x > 1; x if 0 < x <= 1; alpha * x if x <= 0",
    )
)

register(
    Surrogate(
        name="relu_grad",
        braintools_name="ReluGrad",
        description=(
            "ReLU-gradient surrogate (Neftci et al. 2019): a triangle of height alpha*width at "
            "x = 0, zero for |x| >= width. Gradient-only."
        ),
        params=(
            Param("alpha", 0.3, NONNEGATIVE, "Slope of the triangle's sides; the peak is alpha*width."),
            Param("width", 1.0, POSITIVE, "Half-width of the triangle: the gradient is 0 for |x| >= width."),
        ),
        grad=F.relu_grad_grad,
        grad_formula="g'(x) = max(alpha*width - |x|*alpha, 0)",
        checks=(Check("alpha*width", ("alpha", "width"), lambda alpha, width: alpha * width),),
    )
)

register(
    Surrogate(
        name="gaussian_grad",
        braintools_name="GaussianGrad",
        description=(
            "Gaussian surrogate (Yin et al. 2021): alpha times the normal density N(x; 0, sigma**2). "
            "Gradient-only."
        ),
        params=(
            Param("sigma", 0.5, POSITIVE, "Standard deviation (width) of the Gaussian."),
            Param("alpha", 0.5, NONNEGATIVE, "Scale: the gradient at x = 0 is alpha/(sigma*sqrt(2*pi))."),
        ),
        grad=F.gaussian_grad_grad,
        grad_formula="g'(x) = alpha * exp(-x**2 / (2*sigma**2)) / (sqrt(2*pi) * sigma)",
        checks=(
            Check("2*sigma**2", ("sigma",), lambda sigma: 2 * _normal(sigma * sigma)),
            Check(
                "alpha/(sqrt(2*pi)*sigma)",
                ("alpha", "sigma"),
                lambda alpha, sigma: alpha * (_k(sigma, 1) / (_k(sigma, _SQRT_2PI) * sigma)),
            ),
        ),
    )
)

register(
    Surrogate(
        name="multi_gaussian_grad",
        braintools_name="MultiGaussianGrad",
        description=(
            "Multi-Gaussian surrogate (Yin et al. 2021): scale * ((1 + h) N(x; 0, sigma**2) - "
            "h N(x; sigma, (s*sigma)**2) - h N(x; -sigma, (s*sigma)**2)), a central Gaussian minus "
            "two wider side Gaussians. Gradient-only."
        ),
        params=(
            Param("h", 0.15, NONNEGATIVE, "Weight of the two negative side Gaussians (0: a single Gaussian)."),
            Param("s", 6.0, POSITIVE, "Width factor of the side Gaussians: their deviation is s*sigma."),
            Param("sigma", 0.5, POSITIVE, "Deviation of the central Gaussian, and the side Gaussians' offset."),
            Param("scale", 0.5, NONNEGATIVE, "Overall scale of the gradient."),
        ),
        grad=F.multi_gaussian_grad_grad,
        grad_formula=(
            "g'(x) = scale * (g1 * (1 + h) - g2 * h - g3 * h), "
            "g1 = exp(-x**2 / (2*sigma**2)) / (sqrt(2*pi) * sigma), "
            "g2, g3 = exp(-(x -+ sigma)**2 / (2*(s*sigma)**2)) / (sqrt(2*pi) * s * sigma)"
        ),
        checks=(
            Check("2*sigma**2", ("sigma",), lambda sigma: 2 * _normal(sigma * sigma)),
            Check("2*(s*sigma)**2", ("s", "sigma"), lambda s, sigma: 2 * _normal((s * sigma) * (s * sigma))),
            Check("sqrt(2*pi)*s*sigma", ("s", "sigma"), lambda s, sigma: (_k(s, _SQRT_2PI) * s) * sigma),
            Check(
                "scale*(1 + h)/(sqrt(2*pi)*sigma)",
                ("scale", "h", "sigma"),
                lambda scale, h, sigma: scale * ((1 + h) * (_k(sigma, 1) / (_k(sigma, _SQRT_2PI) * sigma))),
            ),
        ),
    )
)

register(
    Surrogate(
        name="inv_square_grad",
        braintools_name="InvSquareGrad",
        description="Inverse-square surrogate: gradient 1/(alpha*|x| + 1)**2, 1 at x = 0. Gradient-only.",
        params=(
            Param("alpha", 100.0, POSITIVE, "Sharpness: the gradient halves at |x| = (sqrt(2) - 1)/alpha."),
        ),
        grad=F.inv_square_grad_grad,
        grad_formula="g'(x) = 1 / (alpha * |x| + 1)**2",
    )
)

register(
    Surrogate(
        name="slayer_grad",
        braintools_name="SlayerGrad",
        description=(
            "SLAYER surrogate (Shrestha & Orchard 2018): gradient exp(-alpha*|x|), 1 at x = 0. "
            "Gradient-only."
        ),
        params=(
            Param("alpha", 1.0, POSITIVE, "Decay rate: the decay length is 1/alpha."),
        ),
        grad=F.slayer_grad_grad,
        grad_formula="g'(x) = exp(-alpha * |x|)",
    )
)
