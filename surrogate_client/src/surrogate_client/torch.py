"""PyTorch spike functions whose backward pass is computed by a surrogate-serve server.

>>> import snntorch as snn                                              # doctest: +SKIP
>>> from surrogate_client import SurrogateClient
>>> from surrogate_client.torch import spike_function
>>> client = SurrogateClient("http://127.0.0.1:8000")
>>> lif = snn.Leaky(beta=0.9, spike_grad=spike_function(client, "sigmoid", alpha=4.0))

The forward pass is the spike ``H(x) = 1 where x >= 0 else 0`` (exact, computed locally from x's
bits as the service computes it, in x's dtype, on x's device). The backward pass returns
``grad_output * g'(x)``, on x's device and in x's dtype, with ``g'(x)`` from ``/v1/grad``:

- ``fetch="step"`` (the default): the forward pass records each ``x`` autograd will need; the first
  backward call that needs a ``g'(x)`` fetches those of every recorded ``x`` in one request (one
  per dtype), and each backward call multiplies its incoming gradient by its ``g'(x)`` locally
  (the same single IEEE multiply the service makes);
- ``fetch="call"``: one request per backward call, ``x`` and the incoming gradient in one binary
  body (nothing is held between the forward and the backward pass).

This module imports PyTorch; ``import surrogate_client`` alone does not.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._adapter import ServedSpikeBase
from ._client import SurrogateClient

__all__ = ["FETCH_ELEMENTS", "SpikeFunction", "spike_function"]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
}


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array on the host (bfloat16 widened exactly to float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _param(value: Any) -> Any:
    """A parameter as the client takes it: tensors as host arrays, anything else as it is."""
    return _host(value) if isinstance(value, torch.Tensor) else value


#: the signed integer type of each float width (bytes), for reading a float's bits
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _heaviside(x: torch.Tensor) -> torch.Tensor:
    """1 where ``x >= 0`` (also at -0.0), else 0, NaN 0, in x's dtype: read from x's bits, as the
    service computes it, so that a negative subnormal gives 0 whether or not the device flushes
    subnormals to zero (as an integer, x is >= 0 when its sign bit is clear, and the smallest
    integer at -0.0)."""
    itype = _SAME_WIDTH_INT[x.element_size()]
    if x.device.type == "cpu":  # the same in NumPy, a few times faster on small tensors
        u = x.detach().view(itype).numpy()
        u = u.view(u.dtype.str.replace("i", "u"))  # the bits as an unsigned integer
        # x >= 0 and not NaN: from +0.0 to +inf, the sign bit clear; -0.0: the sign bit alone
        spikes = np.asarray(u <= _INF_BITS[x.dtype])  # an array also when x is 0-d
        spikes |= u == 1 << (8 * x.element_size() - 1)
        np_dtype = _NUMPY_FLOATS.get(x.dtype)
        if np_dtype is not None:
            return torch.from_numpy(spikes.astype(np_dtype))
        return torch.from_numpy(spikes).to(x.dtype)
    bits = x.view(itype)
    return (((bits >= 0) & ~torch.isnan(x)) | (bits == torch.iinfo(itype).min)).to(x.dtype)


#: the bits of +inf of each dtype, as an integer (the largest of a number >= 0 that is not NaN)
_INF_BITS = {dt: int(torch.tensor(float("inf"), dtype=dt).view(_SAME_WIDTH_INT[dt.itemsize]).item())
             for dt in _DTYPE_NAMES}
_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


#: the most elements one deferred fetch sends in one request (16 MiB of float32, 32 MiB of float64:
#: within the service's default limits of 2**24 elements and 64 MiB per body)
FETCH_ELEMENTS = 1 << 22


class _Record:
    """An ``x`` whose ``g'(x)`` a backward pass will need (``fetch="step"``): held by the autograd
    node (its ctx) only, so a graph that is never backpropagated takes its record with it."""

    __slots__ = ("key", "x", "g", "__weakref__")

    def __init__(self, key: int, x: torch.Tensor) -> None:
        self.key = key  # its place in the forward pass
        self.x: torch.Tensor | None = x  # until fetched
        self.g: torch.Tensor | None = None  # g'(x) on x's device, in x's dtype, until used


class _ServedSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: SpikeFunction, record: _Record | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn = fn
        ctx.record = record
        return _heaviside(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (x,) = ctx.saved_tensors
        record = ctx.record
        if record is None:
            return ctx.fn.vjp(x, grad_output), None, None
        return ctx.fn._deferred_vjp(record, x, grad_output), None, None


class SpikeFunction(ServedSpikeBase):
    """``H(x)`` forward, ``grad_output * g'(x)`` from the service backward; see :func:`spike_function`."""

    def __init__(self, client: SurrogateClient, surrogate: str, params: Mapping[str, Any], *,
                 fetch: str = "step") -> None:
        if fetch not in ("step", "call"):
            raise ValueError(f"fetch must be 'step' or 'call', got {fetch!r}")
        super().__init__(client, surrogate, {name: _param(value) for name, value in params.items()})
        self.fetch = fetch
        self._lock = threading.Lock()
        # records not fetched yet and records fetched but not used yet, in the order of the forward
        # pass; weak, so that they go with their autograd nodes
        self._pending: weakref.WeakValueDictionary[int, _Record] = weakref.WeakValueDictionary()
        self._held: weakref.WeakValueDictionary[int, _Record] = weakref.WeakValueDictionary()
        self._ids = itertools.count()
        self._fetched = False  # a backward pass has fetched since the last forward record
        # scalar parameters: x's of one dtype travel flattened in one body; array parameters must
        # broadcast against each x, so x's of one shape travel stacked
        self._flat = all(np.ndim(v) == 0 for v in self.params.values())

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if self.fetch == "step" else f"{text[:-1]}, fetch='call')"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPE_NAMES:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"expected a float16, bfloat16, float32 or float64 tensor, got {got}")
        if not self._flat:  # numbers never enlarge x
            self._check_shape(tuple(x.shape))
        if not (x.requires_grad and torch.is_grad_enabled()):  # nothing to backpropagate
            return _heaviside(x)
        record = None
        if self.fetch == "step":
            with self._lock:
                if self._fetched:  # a new training step: what the last one left unused is let go
                    self._start_step()
                record = _Record(next(self._ids), x)
                self._pending[record.key] = record
        return _ServedSpike.apply(x, self, record)

    def _start_step(self) -> None:
        """Forget the records of earlier steps that are still alive (a graph kept but not, or not
        wholly, backpropagated): they are fetched one by one if they are ever needed."""
        for rec in self._held.values():
            rec.g = None
        self._held.clear()
        self._pending.clear()
        self._fetched = False

    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``cotangent * g'(x)`` from one ``/v1/grad`` request, on x's device and in x's dtype."""
        if cotangent.numel() > 1 and not any(cotangent.stride()):  # an expanded scalar: send one number
            ct: Any = _host(cotangent.reshape(-1)[:1]).reshape(())
        else:
            ct = _host(cotangent)
        out = self.client.grad(
            _host(x), cotangent=ct, surrogate=self.surrogate, dtype=_DTYPE_NAMES[x.dtype], **self.params
        )
        return _tensor(out, x)

    def _deferred_vjp(self, record: _Record, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``cotangent * g'(x)`` with ``g'(x)`` fetched for every pending record at once if it is not here."""
        with self._lock:
            g = record.g
            if g is None:
                batch = list(self._pending.values())
                self._pending.clear()
                if all(rec is not record for rec in batch):  # forgotten, or used once already
                    record.x = x
                    batch.append(record)
                try:
                    self._fetch(batch)
                except BaseException:
                    for rec in batch:  # fetched again by the next backward call
                        if rec.g is None and rec.x is not None:
                            self._pending[rec.key] = rec
                    raise
                for rec in batch:
                    if rec is not record:
                        self._held[rec.key] = rec
                self._fetched = True
                g = record.g
            else:
                self._held.pop(record.key, None)
            record.g = None  # used: a second backward pass through this node fetches again
        assert g is not None
        return cotangent * g.to(device=cotangent.device)

    def _fetch(self, records: list[_Record]) -> None:
        """``g'(x)`` of every record, one request per dtype and device (and per shape, with array
        parameters), at most :data:`FETCH_ELEMENTS` elements per request unless one ``x`` alone has more."""
        groups: dict[Any, list[tuple[_Record, torch.Tensor]]] = {}
        for rec in records:
            x = rec.x
            assert x is not None
            key = (x.dtype, x.device) if self._flat else (x.dtype, x.device, tuple(x.shape))
            groups.setdefault(key, []).append((rec, x.detach()))
        for group in groups.values():
            chunk: list[tuple[_Record, torch.Tensor]] = []
            total = 0
            for rec, x in group:
                if chunk and total + x.numel() > FETCH_ELEMENTS:
                    self._fetch_one(chunk)
                    chunk, total = [], 0
                chunk.append((rec, x))
                total += x.numel()
            self._fetch_one(chunk)

    def _fetch_one(self, chunk: list[tuple[_Record, torch.Tensor]]) -> None:
        """One request: the x's flattened into one array (stacked with array parameters), no cotangent;
        the answer is put on their device once and each record gets its part."""
        xs = [x for _, x in chunk]
        body = torch.cat([x.reshape(-1) for x in xs]) if self._flat else torch.stack(xs)
        out = self.client.grad(_host(body), surrogate=self.surrogate, dtype=_DTYPE_NAMES[body.dtype], **self.params)
        flat = _tensor(out, body).reshape(-1)
        offset = 0
        for rec, x in chunk:
            n = x.numel()
            rec.g = flat[offset:offset + n].view(x.shape)
            rec.x = None
            offset += n


def _tensor(out: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """The service's answer as a tensor of x's shape, on x's device and in x's dtype."""
    if out.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has no torch equivalent in NumPy
        out = out.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(x.shape)).to(device=x.device, dtype=x.dtype)


def spike_function(client: SurrogateClient, surrogate: str = "piecewise_quadratic", *, fetch: str = "step",
                   **params: Any) -> SpikeFunction:
    """A spike function for PyTorch (and snnTorch's ``spike_grad``) whose gradient is served.

    - forward: ``1`` where ``x >= 0`` (also at 0 and -0.0), else ``0``, in x's dtype and device;
    - backward: ``grad_output * g'(x)``, on x's device and in x's dtype (float16, bfloat16,
      float32, float64), with ``g'(x)`` from ``/v1/grad``.

    ``fetch`` chooses when the service is asked:

    - ``"step"`` (the default): the forward pass records each ``x`` that autograd will need (grad
      enabled and ``x`` requiring grad); the first backward call that needs a ``g'(x)`` fetches
      ``g'(x)`` of every recorded ``x`` in one request (one per dtype, and per shape of ``x`` when a
      parameter is an array; at most :data:`FETCH_ELEMENTS` elements per request), and each
      backward call multiplies its incoming gradient by its ``g'(x)`` locally, the same product the
      service computes. A training step of L spiking layers x T time steps sharing this function is
      one request. ``g'(x)`` is held from the fetch to its backward call, and dropped once used;
      records of a graph that is never backpropagated go with the graph, and the first recording
      forward call after a fetch lets go of what earlier steps left unused (fetched again, one
      request per backward call, if it is ever needed, as after ``retain_graph=True``).
    - ``"call"``: one request per backward call, ``x`` and the incoming gradient in one binary body;
      nothing is held between the passes (for memory-tight cases).

    ``params`` are the surrogate's parameters by braintools' names (``alpha=2.0``): numbers, or
    arrays or tensors that broadcast against x (sent as arrays). They are checked by the service
    now: an unknown ``surrogate`` raises :class:`~surrogate_client.NotFound`, an unknown parameter
    or a value outside its constraint :class:`~surrogate_client.ValidationError`. A failure of the
    service during a backward pass raises the client's exception
    (:class:`~surrogate_client.SurrogateError` and its subclasses).
    """
    return SpikeFunction(client, surrogate, params, fetch=fetch)
