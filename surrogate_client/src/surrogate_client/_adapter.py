"""What the framework adapters (``surrogate_client.torch``, ``surrogate_client.jax``) share: the
service checks the surrogate and its parameters when a spike function is made, and x must take the
parameters' shapes without being enlarged by them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._client import SurrogateClient

__all__ = ["ServedSpikeBase"]


class ServedSpikeBase:
    """A spike function bound to a client, a surrogate and its (host) parameters."""

    def __init__(self, client: SurrogateClient, surrogate: str, params: Mapping[str, Any]) -> None:
        self.client = client
        self.surrogate = surrogate
        self.params = dict(params)
        # the service's own checks and messages: NotFound for an unknown surrogate, ValidationError
        # for an unknown parameter or a value outside its constraint
        client.surrogate(surrogate)
        client.grad(0.0, surrogate=surrogate, dtype="float64", **self.params)
        self._param_shapes = [np.shape(v) for v in self.params.values()]

    def __repr__(self) -> str:
        args = "".join(
            f", {k}={v!r}" if np.ndim(v) == 0 else f", {k}=<array {np.shape(v)}>" for k, v in self.params.items()
        )
        return f"spike_function({self.client.base_url!r}, {self.surrogate!r}{args})"

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        try:
            broadcast = np.broadcast_shapes(shape, *self._param_shapes)
        except ValueError:
            broadcast = None
        if broadcast != shape:
            raise ValueError(
                f"the parameters (shapes {self._param_shapes}) must broadcast against x (shape {shape}) "
                "without enlarging it"
            )
