"""surrogate_client: a light Python client of the surrogate-serve HTTP service.

Spikes and surrogate gradients of spiking neural networks (semantics of ``braintools.surrogate``)
computed by a surrogate-serve server. Needs only httpx and NumPy (no JAX).

>>> from surrogate_client import SurrogateClient
>>> with SurrogateClient("http://127.0.0.1:8000") as c:            # doctest: +SKIP
...     c.spike([-2.0, -0.5, 0.0, 0.5, 2.0])
...     c.grad(np.linspace(-3, 3, 1000), alpha=[[0.5], [1], [2], [4]])   # shape (4, 1000)

Arrays travel as .npy/.npz (``transport="auto"`` uses JSON only for tiny ones); results are NumPy
arrays in the computation's dtype (bfloat16 results are ``ml_dtypes.bfloat16`` arrays when
ml_dtypes is importable, float32 arrays holding the exact bfloat16 values otherwise). Errors are
typed: see :mod:`surrogate_client._exceptions` for the tree.
"""

from ._client import AsyncSurrogateClient, SurrogateClient
from ._exceptions import (
    ApiError,
    AuthenticationError,
    BadRequest,
    ClientError,
    DecodingError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    SurrogateError,
    Timeout,
    TransportError,
    UnsupportedMediaType,
    ValidationError,
)
from ._version import __version__

__all__ = [
    "ApiError",
    "AsyncSurrogateClient",
    "AuthenticationError",
    "BadRequest",
    "ClientError",
    "DecodingError",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "SurrogateClient",
    "SurrogateError",
    "Timeout",
    "TransportError",
    "UnsupportedMediaType",
    "ValidationError",
    "__version__",
]
