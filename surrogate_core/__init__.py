"""surrogate_core: the spike function and surrogate gradients of spiking neural networks, in JAX.

Pure JAX and NumPy, no web code. Semantics are those of ``braintools.surrogate``:

- ``spike(x)``: the Heaviside step, 1 where ``x >= 0`` (also at ``-0.0``), else 0 (NaN gives 0);
- ``grad(x)``: the surrogate gradient ``g'(x)``, used as d spike / dx in a backward pass;
- ``vjp(x, cotangent)``: ``cotangent * g'(x)``, the vector-Jacobian product;
- ``fun(x)``: the smooth surrogate ``g(x)`` itself, where braintools defines one.

Computation goes through a shared :class:`Engine` that pads inputs to power-of-two buckets, so
compilation stays bounded whatever the input shapes. Float64 computations are built and run under
JAX's thread-local x64 context, so importing this package changes no global JAX setting: the default
dtypes of the importing program stay what they were. A server calls :func:`configure_for_serving`
once at start.

>>> import surrogate_core as sc
>>> sc.spike([-2.0, -0.5, 0.0, 0.5, 2.0]).tolist()
[0.0, 0.0, 1.0, 1.0, 1.0]
>>> sc.grad([-2.0, -0.5, 0.0, 0.5, 2.0], alpha=1.0).tolist()
[0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from . import _surrogates  # noqa: F401  (registers the surrogates)
from ._dtypes import DEFAULT_DTYPE, DTYPES, resolve_dtype
from ._engine import Engine, EngineStats, device_info
from ._jobs import OPS, Job, JobError, Limits, make_job
from ._registry import (
    DEFAULT_SURROGATE,
    Check,
    Constraint,
    Param,
    Surrogate,
    all_surrogates,
    get,
    names,
    register,
)

__all__ = [
    "DEFAULT_DTYPE",
    "DEFAULT_SURROGATE",
    "DTYPES",
    "OPS",
    "Check",
    "Constraint",
    "Engine",
    "EngineStats",
    "Job",
    "JobError",
    "Limits",
    "Param",
    "Surrogate",
    "all_surrogates",
    "configure_for_serving",
    "default_engine",
    "device_info",
    "fun",
    "get",
    "grad",
    "make_job",
    "names",
    "register",
    "resolve_dtype",
    "spike",
    "vjp",
]

_default_engine: Engine | None = None


def configure_for_serving() -> None:
    """Tune the process-wide JAX configuration for a server that owns the process.

    Every engine call blocks on its result at once, so on the CPU it is cheaper to run the
    computation in the calling thread than to hand it to JAX's dispatch thread and wait: turning
    CPU async dispatch off saves about 35 us per call (it changes nothing on GPUs). This is a
    global JAX setting, so the library never sets it by itself; a program that embeds the core
    next to its own JAX code leaves it alone. Call it once, before the first computation.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def default_engine() -> Engine:
    """The process-wide engine used by the module-level functions."""
    global _default_engine
    if _default_engine is None:
        _default_engine = Engine()
    return _default_engine


def _one(
    op: str, x: Any, surrogate: str, dtype: str | None, params: dict[str, Any], cotangent: Any = None
) -> np.ndarray:
    job = make_job(op, x, surrogate=surrogate, dtype=dtype, params=params, cotangent=cotangent)
    return default_engine().run([job])[0]


def spike(x: Any, *, surrogate: str = DEFAULT_SURROGATE, dtype: str | None = None, **params: Any) -> np.ndarray:
    """Heaviside spike of ``x`` (1 where ``x >= 0``), in ``x``'s dtype. Parameters are validated
    (and broadcast into the result's shape) but do not change the values."""
    return _one("spike", x, surrogate, dtype, params)


def grad(x: Any, *, surrogate: str = DEFAULT_SURROGATE, dtype: str | None = None, **params: Any) -> np.ndarray:
    """Surrogate gradient ``g'(x)`` with the surrogate's parameters (braintools' names)."""
    return _one("grad", x, surrogate, dtype, params)


def vjp(x: Any, cotangent: Any, *, surrogate: str = DEFAULT_SURROGATE, dtype: str | None = None,
        **params: Any) -> np.ndarray:
    """``cotangent * g'(x)``: the vector-Jacobian product of the spike under the surrogate."""
    return _one("vjp", x, surrogate, dtype, params, cotangent)


def fun(x: Any, *, surrogate: str = DEFAULT_SURROGATE, dtype: str | None = None, **params: Any) -> np.ndarray:
    """The smooth surrogate function ``g(x)`` (braintools' ``surrogate_fun``)."""
    return _one("fun", x, surrogate, dtype, params)
