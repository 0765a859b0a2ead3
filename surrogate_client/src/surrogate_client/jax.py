"""JAX spike functions whose backward pass is computed by a surrogate-serve server.

>>> import jax, jax.numpy as jnp                                        # doctest: +SKIP
>>> from surrogate_client import SurrogateClient
>>> from surrogate_client.jax import spike_function
>>> spike = spike_function(SurrogateClient("http://127.0.0.1:8000"), "sigmoid", alpha=4.0)
>>> jax.jit(jax.grad(lambda x: spike(x).sum()))(jnp.linspace(-1, 1, 5))

The forward pass is the spike ``H(x) = 1 where x >= 0 else 0`` (exact, computed by JAX in x's
dtype, from x's bits as the service computes it). The backward pass (a :func:`jax.custom_vjp`)
fetches ``g'(x)`` from ``/v1/grad`` in one request (``x`` alone), through :func:`jax.pure_callback`,
and multiplies the incoming gradient by it locally, bit for bit the product the service computes;
so it works under :func:`jax.jit`, :func:`jax.grad`, :func:`jax.lax.scan` (backpropagation through
time: one request per time step) and :func:`jax.vmap` (one request for the whole batch).

:func:`scan` is :func:`jax.lax.scan` for networks of served spike functions: the forward pass
records each spike function's input at every step, and the backward pass fetches ``g'(x)`` for all
of them in one request per spike function (``x`` alone, as one binary body), then multiplies each
step's incoming gradient by it locally, the same IEEE product the service computes, so the
gradients are bit for bit those of one request per step.

Errors: outside ``jit`` a failure of the service during the backward pass raises the client's
exception itself. Inside compiled code JAX turns any exception of a callback into its own runtime
error; run the compiled call under :func:`service_errors` to get the client's exception back.

This module imports JAX; ``import surrogate_client`` alone does not.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._adapter import ServedSpikeBase
from ._client import SurrogateClient
from ._exceptions import SurrogateError

__all__ = ["SpikeFunction", "scan", "service_errors", "spike_function"]

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


def _times(cotangent: jax.Array, g: jax.Array) -> jax.Array:
    """``cotangent * g`` rounded to their dtype, as the service's product.

    XLA on the CPU may contract a product and the sum it feeds into one fused multiply-add, which
    skips the product's rounding (so does an optimization barrier). Subtracting a zero that the
    compiler cannot see is zero (``(g - g) * 0``: +0.0 for a finite g; where g is NaN or infinite
    the product is NaN or infinite anyway) leaves every product as it is, -0.0 included, and
    whether or not the subtraction itself is contracted, the result is the rounded product."""
    return cotangent * g - (g - g) * jnp.zeros((), g.dtype)


class _Frame:
    """The spike calls made while :func:`scan` traces its step function: (function, input) pairs, and
    the trace they must belong to (a call inside a transformation nested in the step is not recorded)."""

    def __init__(self, trace: object) -> None:
        self.trace = trace
        self.calls: list[tuple[SpikeFunction, jax.Array]] = []


_frames = threading.local()


def _frame_for(x: jax.Array) -> _Frame | None:
    stack: list[_Frame] = getattr(_frames, "stack", [])
    if not stack or stack[-1].trace is None or getattr(x, "_trace", None) is not stack[-1].trace:
        return None
    return stack[-1]


class SpikeFunction(ServedSpikeBase):
    """``H(x)`` forward, ``cotangent * g'(x)`` from the service backward; see :func:`spike_function`."""

    def __init__(self, client: SurrogateClient, surrogate: str, params: Mapping[str, Any]) -> None:
        super().__init__(client, surrogate, {name: _param(name, value) for name, value in params.items()})
        self._limits: tuple[int, int] | None = None

        @jax.custom_vjp
        def spike(x: jax.Array) -> jax.Array:
            return _heaviside(x)

        def fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return spike(x), x

        spike.defvjp(fwd, self._bwd)
        self._spike = spike

        # inside scan(): H(x), and x itself as a second output that scan() collects over the steps;
        # its cotangent is not a gradient but g'(x), put there by the one request of the backward pass
        @jax.custom_vjp
        def deferred(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return _heaviside(x), x

        def deferred_fwd(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
            return deferred(x), None

        def deferred_bwd(_: None, cts: tuple[jax.Array, jax.Array]) -> tuple[jax.Array]:
            cotangent, g = cts
            return (_times(cotangent, g),)

        deferred.defvjp(deferred_fwd, deferred_bwd)
        self._deferred = deferred

    def __call__(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
        self._check_shape(tuple(x.shape))
        frame = _frame_for(x)
        if frame is not None:
            y, recorded = self._deferred(x)
            frame.calls.append((self, recorded))
            return y
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

    def grads(self, xs: Sequence[Any]) -> list[np.ndarray]:
        """``g'(x)`` for each x (NumPy arrays of one dtype, each of a shape the parameters broadcast
        against), in as few ``/v1/grad`` requests as the server's limits allow: one, unless they
        hold more elements (or bytes) than one request may."""
        xs = [np.asarray(x) for x in xs]
        dtype = xs[0].dtype
        shapes = {x.shape for x in xs}
        max_elements, max_bytes = self._server_limits()
        # bytes per element of a request: x (bfloat16 travels as float32) and each array parameter
        width = max(dtype.itemsize, 4) + sum(np.asarray(v).dtype.itemsize for v in self.params.values() if np.ndim(v))
        per_request = max(1, min(max_elements, (max_bytes - 65536) // width))
        total = sum(x.size for x in xs)
        if len(xs) == 1 and total <= per_request:
            return [self._grad(xs[0], self.params)]
        if len(shapes) == 1 and total <= per_request:  # one request, the xs stacked on a new first axis
            return list(self._grad(np.stack(xs), self.params))
        # flat: every x and every array parameter broadcast to it, end to end, in chunks
        flat_x = np.concatenate([x.reshape(-1) for x in xs])
        arrays = {k: np.concatenate([np.broadcast_to(np.asarray(v), x.shape).reshape(-1) for x in xs])
                  for k, v in self.params.items() if np.ndim(v)}
        parts = []
        for start in range(0, total, per_request):
            cut = slice(start, start + per_request)
            params = {k: (arrays[k][cut] if k in arrays else v) for k, v in self.params.items()}
            parts.append(self._grad(flat_x[cut], params))
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
        out, offset = [], 0
        for x in xs:
            out.append(np.asarray(flat[offset:offset + x.size], dtype).reshape(x.shape))
            offset += x.size
        return out

    def _grad(self, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """``g'(x)`` from one ``/v1/grad`` request, in x's dtype."""
        try:
            out = self.client.grad(x, surrogate=self.surrogate, dtype=x.dtype, **params)
        except SurrogateError as err:
            _record(err)
            raise
        return np.asarray(out, dtype=x.dtype).reshape(x.shape)

    def _server_limits(self) -> tuple[int, int]:
        """The server's largest request, in elements and in body bytes (``GET /v1/info``, once)."""
        if self._limits is None:
            limits = self.client.info().get("limits", {})
            self._limits = (int(limits.get("max_elements", 1 << 24)), int(limits.get("max_body_bytes", 1 << 26)))
        return self._limits

    def _bwd(self, x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
        # g'(x) alone travels (one .npy body each way) and the product is made here: the one the
        # service makes with the cotangent, bit for bit (see _times), for half the bytes
        if not isinstance(x, jax.core.Tracer):
            g = jnp.asarray(self._grad(np.asarray(x), self.params))  # eager: the client's exceptions as they are
        else:
            # Under vmap, "broadcast_all" gives the callback x with the batch axes in front: the service
            # computes elementwise, and the parameters broadcast against the trailing axes, so the
            # whole batch is one request.
            result = jax.ShapeDtypeStruct(x.shape, x.dtype)
            g = jax.pure_callback(lambda x: self._grad(np.asarray(x), self.params), result, x,
                                  vmap_method="broadcast_all")
        return (_times(cotangent, g),)


def _fetch(functions: Sequence[SpikeFunction], xs: Sequence[jax.Array]) -> list[jax.Array]:
    """``g'(x)`` for each recorded x (``xs[i]`` from ``functions[i]``): one request per spike function,
    through one callback (the client's exceptions as they are when nothing is traced)."""

    def host(*arrays: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(arrays)
        for fn in dict.fromkeys(functions):  # each function once, in order of first use
            idx = [i for i, f in enumerate(functions) if f is fn]
            try:
                grads = fn.grads([arrays[i] for i in idx])
            except SurrogateError as err:
                _record(err)
                raise
            for i, g in zip(idx, grads, strict=True):
                out[i] = g
        return out  # type: ignore[return-value]

    if not any(isinstance(x, jax.core.Tracer) for x in xs):
        return [jnp.asarray(g) for g in host(*(np.asarray(x) for x in xs))]
    result = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
    return list(jax.pure_callback(host, result, *xs, vmap_method="broadcast_all"))


def _tied(functions: tuple[SpikeFunction, ...]) -> Callable[[Any, list[jax.Array]], Any]:
    """``tie(outputs, xs)``: the outputs unchanged; backward, their cotangents unchanged, and as the
    cotangent of the recorded inputs ``xs``, ``g'(xs)`` from the service: the spike calls inside the
    scan multiply their incoming gradients by it."""

    @jax.custom_vjp
    def tie(outputs: Any, xs: list[jax.Array]) -> Any:
        return outputs

    def fwd(outputs: Any, xs: list[jax.Array]) -> tuple[Any, list[jax.Array]]:
        return outputs, xs

    def bwd(xs: list[jax.Array], cotangent: Any) -> tuple[Any, list[jax.Array]]:
        return cotangent, _fetch(functions, xs)

    tie.defvjp(fwd, bwd)
    return tie


def scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any = None, length: int | None = None,
         reverse: bool = False, unroll: int | bool = 1) -> tuple[Any, Any]:
    """:func:`jax.lax.scan` (same arguments, same results) whose served spike functions fetch their
    gradients in one request per backward pass instead of one per step.

    Each call of a served spike function made by ``f`` itself records its input ``x`` at every step;
    the backward pass of the scan fetches ``g'(x)`` for all steps at once (one ``/v1/grad`` request
    per spike function: ``x`` alone, all steps stacked in one binary body; more only where that
    would pass the server's limits on one request), and each step multiplies its incoming gradient
    by its ``g'(x)`` locally. The product is the one the service computes (one IEEE multiply in x's
    dtype), so gradients and losses are bit for bit those of :func:`jax.lax.scan` with one request
    per step. The forward pass never calls the service; without differentiation nothing is recorded.

    A spike call inside a transformation nested in ``f`` (an inner ``lax.scan``, ``vmap`` or
    ``cond``) is not deferred: it makes its own request per backward call, as outside ``scan``.
    """
    recorded: list[SpikeFunction] = []
    stack: list[_Frame] = _frames.__dict__.setdefault("stack", [])

    def body(carry: Any, x: Any) -> tuple[Any, Any]:
        frame = _Frame(getattr(jnp.zeros(()), "_trace", None))  # the trace f's own operations are in
        stack.append(frame)
        try:
            carry, y = f(carry, x)
        finally:
            stack.pop()
        recorded[:] = [fn for fn, _ in frame.calls]
        return carry, (y, [v for _, v in frame.calls])

    carry, (ys, inputs) = jax.lax.scan(body, init, xs, length=length, reverse=reverse, unroll=unroll)
    if not recorded:
        return carry, ys
    return _tied(tuple(recorded))((carry, ys), inputs)


def spike_function(client: SurrogateClient, surrogate: str = "piecewise_quadratic", **params: Any) -> SpikeFunction:
    """A spike function for JAX whose gradient is served.

    - forward: ``1`` where ``x >= 0`` (also at 0 and -0.0), else ``0``, in x's dtype;
    - backward (:func:`jax.custom_vjp`): ``cotangent * g'(x)``, ``g'(x)`` from one ``/v1/grad``
      request per call, through :func:`jax.pure_callback`: works under ``jit``, ``grad``,
      ``lax.scan`` and ``vmap``, in float16, bfloat16, float32 and float64 (with x64 enabled).
      Under :func:`scan` instead, one request per backward pass of the whole scan.

    ``params`` are the surrogate's parameters by braintools' names (``alpha=2.0``): numbers or
    arrays that broadcast against x. They are checked by the service now: an unknown
    ``surrogate`` raises :class:`~surrogate_client.NotFound`, an unknown parameter or a value
    outside its constraint :class:`~surrogate_client.ValidationError`. See :func:`service_errors`
    for failures during a compiled backward pass.
    """
    return SpikeFunction(client, surrogate, params)
