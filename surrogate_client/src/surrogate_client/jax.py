"""JAX spike functions whose backward pass is computed by a surrogate-serve server.

>>> import jax, jax.numpy as jnp                                        # doctest: +SKIP
>>> from surrogate_client import SurrogateClient
>>> from surrogate_client.jax import spike_function
>>> spike = spike_function(SurrogateClient("http://127.0.0.1:8000"), "sigmoid", alpha=4.0)
>>> jax.jit(jax.grad(lambda x: spike(x).sum()))(jnp.linspace(-1, 1, 5))

The forward pass is the spike ``H(x) = 1 where x >= 0 else 0`` (exact, computed by JAX in x's
dtype, from x's bits as the service computes it). The backward pass (a :func:`jax.custom_vjp`)
sends ``x`` and the incoming gradient to ``/v1/grad`` in one request, through
:func:`jax.pure_callback`, so it works under :func:`jax.jit`, :func:`jax.grad`, :func:`jax.lax.scan`
(backpropagation through time: one request per time step) and :func:`jax.vmap` (one request for
the whole batch).

Errors: outside ``jit`` a failure of the service during the backward pass raises the client's
exception itself. Inside compiled code JAX turns any exception of a callback into its own runtime
error; run the compiled call under :func:`service_errors` to get the client's exception back.

This module imports JAX; ``import surrogate_client`` alone does not.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._adapter import ServedSpikeBase
from ._client import SurrogateClient
from ._exceptions import SurrogateError

__all__ = ["SpikeFunction", "service_errors", "spike_function"]

# The latest client exception raised inside a callback, with a sequence number, so that
# service_errors() can tell an error raised during its own block from an older one.
_lock = threading.Lock()
_counter = itertools.count(1)
_last_error: tuple[int, SurrogateError] | None = None


def _record(err: SurrogateError) -> None:
    global _last_error
    with _lock:
        _last_error = (next(_counter), err)


def _mark() -> int:
    with _lock:
        return _last_error[0] if _last_error is not None else 0


@contextmanager
def service_errors() -> Iterator[None]:
    """Re-raise, as the client's own exception, a service failure inside compiled JAX code.

    JAX reports any exception raised in a callback of a compiled function as its own runtime
    error. Inside this block such an error, when it comes from a served backward pass, is replaced
    by the client's exception (:class:`~surrogate_client.ValidationError`,
    :class:`~surrogate_client.TransportError`, ...), chained to JAX's::

        with service_errors():
            grads = train_step(params, batch)
    """
    start = _mark()
    try:
        yield
    except RuntimeError as exc:  # JaxRuntimeError (XlaRuntimeError before jax 0.4.34)
        with _lock:
            recorded = _last_error
        if recorded is None or recorded[0] <= start:
            raise
        raise recorded[1] from exc


def _param(name: str, value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name}: parameters are fixed when the function is made; got a traced value")
    return np.asarray(value) if isinstance(value, jax.Array) else value


#: the signed integer type of each float width (bytes), for reading a float's bits
_SAME_WIDTH_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _heaviside(x: jax.Array) -> jax.Array:
    """1 where ``x >= 0`` (also at -0.0), else 0, NaN 0, in x's dtype: read from x's bits, as the
    service computes it (XLA on the CPU flushes subnormals to zero, so ``x >= 0`` is 1 for a
    negative subnormal; as an integer, x is >= 0 when its sign bit is clear, and the smallest
    integer at -0.0)."""
    itype = _SAME_WIDTH_INT[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, itype)
    minus_zero = -(1 << (8 * x.dtype.itemsize - 1))  # the sign bit alone: the smallest integer
    return (((bits >= 0) & ~jnp.isnan(x)) | (bits == minus_zero)).astype(x.dtype)


class SpikeFunction(ServedSpikeBase):
    """``H(x)`` forward, ``cotangent * g'(x)`` from the service backward; see :func:`spike_function`."""

    def __init__(self, client: SurrogateClient, surrogate: str, params: Mapping[str, Any]) -> None:
        super().__init__(client, surrogate, {name: _param(name, value) for name, value in params.items()})

        @jax.custom_vjp
        def spike(x: jax.Array) -> jax.Array:
            return _heaviside(x)

        def fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return spike(x), x

        spike.defvjp(fwd, self._bwd)
        self._spike = spike

    def __call__(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
        self._check_shape(tuple(x.shape))
        return self._spike(x)

    def vjp(self, x: Any, cotangent: Any) -> np.ndarray:
        """``cotangent * g'(x)`` from one ``/v1/grad`` request, as a NumPy array in x's dtype."""
        x = np.asarray(x)
        try:
            out = self.client.grad(
                x, cotangent=np.asarray(cotangent), surrogate=self.surrogate, dtype=x.dtype, **self.params
            )
        except SurrogateError as err:
            _record(err)
            raise
        return np.asarray(out, dtype=x.dtype).reshape(x.shape)

    def _bwd(self, x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
        if not isinstance(x, jax.core.Tracer) and not isinstance(cotangent, jax.core.Tracer):
            return (jnp.asarray(self.vjp(x, cotangent)),)  # eager: the client's exceptions as they are
        # Under vmap, "broadcast_all" gives the callback x and the cotangent with the batch axes in
        # front: the service computes elementwise, and the parameters broadcast against the trailing
        # axes, so the whole batch is one request.
        result = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return (jax.pure_callback(self.vjp, result, x, cotangent, vmap_method="broadcast_all"),)


def spike_function(client: SurrogateClient, surrogate: str = "piecewise_quadratic", **params: Any) -> SpikeFunction:
    """A spike function for JAX whose gradient is served.

    - forward: ``1`` where ``x >= 0`` (also at 0 and -0.0), else ``0``, in x's dtype;
    - backward (:func:`jax.custom_vjp`): ``cotangent * g'(x)`` from one ``/v1/grad`` request per
      call, through :func:`jax.pure_callback`: works under ``jit``, ``grad``, ``lax.scan`` and
      ``vmap``, in float16, bfloat16, float32 and float64 (with x64 enabled).

    ``params`` are the surrogate's parameters by braintools' names (``alpha=2.0``): numbers or
    arrays that broadcast against x. They are checked by the service now: an unknown
    ``surrogate`` raises :class:`~surrogate_client.NotFound`, an unknown parameter or a value
    outside its constraint :class:`~surrogate_client.ValidationError`. See :func:`service_errors`
    for failures during a compiled backward pass.
    """
    return SpikeFunction(client, surrogate, params)
