"""PyTorch spike functions whose backward pass is computed by a surrogate-serve server.

>>> import snntorch as snn                                              # doctest: +SKIP
>>> from surrogate_client import SurrogateClient
>>> from surrogate_client.torch import spike_function
>>> client = SurrogateClient("http://127.0.0.1:8000")
>>> lif = snn.Leaky(beta=0.9, spike_grad=spike_function(client, "sigmoid", alpha=4.0))

The forward pass is the spike ``H(x) = 1 where x >= 0 else 0`` (exact, computed locally from x's
bits as the service computes it, in x's dtype, on x's device). The backward pass sends ``x`` and
the incoming gradient to ``/v1/grad`` in one binary request and returns ``grad_output * g'(x)``,
on x's device and in x's dtype.

This module imports PyTorch; ``import surrogate_client`` alone does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._adapter import ServedSpikeBase
from ._client import SurrogateClient

__all__ = ["SpikeFunction", "spike_function"]

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
    bits = x.view(itype)
    return (((bits >= 0) & ~torch.isnan(x)) | (bits == torch.iinfo(itype).min)).to(x.dtype)


class _ServedSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: SpikeFunction) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn = fn
        return _heaviside(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (x,) = ctx.saved_tensors
        return ctx.fn.vjp(x, grad_output), None


class SpikeFunction(ServedSpikeBase):
    """``H(x)`` forward, ``grad_output * g'(x)`` from the service backward; see :func:`spike_function`."""

    def __init__(self, client: SurrogateClient, surrogate: str, params: Mapping[str, Any]) -> None:
        super().__init__(client, surrogate, {name: _param(value) for name, value in params.items()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPE_NAMES:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"expected a float16, bfloat16, float32 or float64 tensor, got {got}")
        self._check_shape(tuple(x.shape))
        return _ServedSpike.apply(x, self)

    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``cotangent * g'(x)`` from one ``/v1/grad`` request, on x's device and in x's dtype."""
        if cotangent.numel() > 1 and not any(cotangent.stride()):  # an expanded scalar: send one number
            ct: Any = _host(cotangent.reshape(-1)[:1]).reshape(())
        else:
            ct = _host(cotangent)
        out = self.client.grad(
            _host(x), cotangent=ct, surrogate=self.surrogate, dtype=_DTYPE_NAMES[x.dtype], **self.params
        )
        if out.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has no torch equivalent in NumPy
            out = out.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(out).reshape(x.shape)).to(device=x.device, dtype=x.dtype)


def spike_function(client: SurrogateClient, surrogate: str = "piecewise_quadratic", **params: Any) -> SpikeFunction:
    """A spike function for PyTorch (and snnTorch's ``spike_grad``) whose gradient is served.

    - forward: ``1`` where ``x >= 0`` (also at 0 and -0.0), else ``0``, in x's dtype and device;
    - backward: ``grad_output * g'(x)``, one ``/v1/grad`` request per call (x and the incoming
      gradient in one binary body), on x's device and in x's dtype (float16, bfloat16, float32,
      float64).

    ``params`` are the surrogate's parameters by braintools' names (``alpha=2.0``): numbers, or
    arrays or tensors that broadcast against x (sent as arrays). They are checked by the service
    now: an unknown ``surrogate`` raises :class:`~surrogate_client.NotFound`, an unknown parameter
    or a value outside its constraint :class:`~surrogate_client.ValidationError`. A failure of the
    service during a backward pass raises the client's exception
    (:class:`~surrogate_client.SurrogateError` and its subclasses).
    """
    return SpikeFunction(client, surrogate, params)
