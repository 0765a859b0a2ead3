"""``SurrogateClient`` (blocking) and ``AsyncSurrogateClient``: one httpx client each, retries,
typed errors. The request and response formats are in ``_wire``; this module only sends."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import numpy as np

from . import _wire
from ._exceptions import (
    DecodingError,
    ServerError,
    ServiceUnavailable,
    Timeout,
    TransportError,
    UnsupportedMediaType,
    api_error_from_response,
)
from ._version import __version__

__all__ = ["AsyncSurrogateClient", "SurrogateClient"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

#: Statuses answered again after a pause (the server asks to come back later).
RETRY_STATUSES = frozenset({429, 503})

#: Transport errors after which a request is sent again: the connection failed or broke before
#: an answer (every compute request is a pure function of its body, so resending is safe).
#: Read and write timeouts are not retried: the server may just be busy with the same request.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.NetworkError,  # ConnectError, ReadError, WriteError, CloseError
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,  # e.g. a kept-alive connection closed by the server
)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Base:
    """Configuration and the parts shared by the blocking and the async client."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: str,
        timeout: float | httpx.Timeout | None,
        retries: int,
        backoff: float,
        max_backoff: float,
        token: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        if transport not in _wire.TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(map(repr, _wire.TRANSPORTS))}, got {transport!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        self.base_url = str(base_url).rstrip("/")
        self.transport = transport
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._headers = {"User-Agent": f"surrogate-client/{__version__}", "Accept": _wire.JSON}
        if headers:
            self._headers.update(headers)
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        # Set to False when the server answers a binary request with 415 (it predates the binary
        # transport): transport="auto" then uses JSON for the rest of this client's life.
        self._binary_ok = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, transport={self.transport!r})"

    # -- pieces shared by both clients ---------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Pause before retry number ``attempt`` (0-based): the server's Retry-After if it sent
        one, else exponential backoff; at most ``max_backoff`` either way."""
        wait = _retry_after(response) if response is not None else None
        if wait is None:
            wait = self.backoff * (2.0**attempt)
        return min(wait, self.max_backoff)

    def _compute_spec(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any,
                      surrogate: str | None, dtype: Any, transport: str | None) -> _wire.RequestSpec:
        mode = transport or self.transport
        if mode == "auto" and not self._binary_ok:
            mode = "json"
        return _wire.build_compute(
            op, x, params=params, cotangent=cotangent, surrogate=surrogate, dtype=dtype, transport=mode
        )

    def _fallback(self, spec: _wire.RequestSpec, err: Exception, transport: str | None) -> bool:
        """Whether to resend a refused binary request as JSON (``auto`` against an older server)."""
        if (transport or self.transport) != "auto" or not spec.binary:
            return False
        if isinstance(err, UnsupportedMediaType):
            self._binary_ok = False
            return True
        return False

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise api_error_from_response(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise DecodingError(f"the answer to {response.request.url.path} is not JSON: {exc}") from None

    @staticmethod
    def _decode(op: str, response: httpx.Response, spec: _wire.RequestSpec) -> np.ndarray:
        return _wire.decode_compute(
            op, response.headers.get("content-type"), response.headers, response.content, spec.dtype, spec.shape
        )


def _wrap_transport_error(exc: httpx.TransportError, url: str) -> TransportError:
    cls = Timeout if isinstance(exc, httpx.TimeoutException) else TransportError
    return cls(f"{type(exc).__name__} on {url}: {exc}")


class SurrogateClient(_Base):
    """Blocking client of a surrogate-serve server.

    >>> with SurrogateClient("http://127.0.0.1:8000") as c:      # doctest: +SKIP
    ...     c.grad([-2.0, -0.5, 0.0, 0.5, 2.0], alpha=1.0)
    array([0. , 0.5, 1. , 0.5, 0. ], dtype=float32)

    Arguments (all but ``base_url`` keyword-only):

    - ``transport``: how arrays travel: ``"auto"`` (binary .npy/.npz from 16 result elements on,
      JSON below), ``"json"``, ``"npy"`` (always binary: .npy, or .npz when a parameter or the
      cotangent is an array) or ``"npz"`` (always an .npz archive). Each call can override it.
    - ``timeout``: seconds or an :class:`httpx.Timeout` (default 30 s, 5 s to connect).
    - ``retries``, ``backoff``, ``max_backoff``: a request that fails to connect (or whose
      connection breaks) or is answered 503/429 is sent again up to ``retries`` times, after
      ``backoff * 2**n`` seconds or the server's ``Retry-After``, at most ``max_backoff`` seconds.
    - ``token``: sent as ``Authorization: Bearer <token>``. ``headers``: extra headers.
    - ``http_transport``: an :class:`httpx.BaseTransport` (e.g. :class:`httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: _wire.Transport = "auto",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, transport=transport, timeout=timeout, retries=retries, backoff=backoff,
            max_backoff=max_backoff, token=token, headers=headers,
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=http_transport
        )
        self._sleep: Callable[[float], None] = time.sleep

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> SurrogateClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def _send(self, spec: _wire.RequestSpec, *, retry_statuses: frozenset[int] = RETRY_STATUSES) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    spec.method, spec.path, params=spec.params or None, headers=spec.headers, content=spec.content
                )
            except RETRY_EXCEPTIONS as exc:
                if attempt >= self.retries:
                    raise _wrap_transport_error(exc, self.base_url + spec.path) from exc  # type: ignore[arg-type]
                self._sleep(self._delay(attempt, None))
            except httpx.TransportError as exc:
                raise _wrap_transport_error(exc, self.base_url + spec.path) from exc
            else:
                if response.status_code not in retry_statuses or attempt >= self.retries:
                    return self._check(response)
                self._sleep(self._delay(attempt, response))
            attempt += 1

    def _get(self, path: str) -> Any:
        return self._json(self._send(_wire.RequestSpec("GET", path)))

    def _compute(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any, surrogate: str | None,
                 dtype: Any, transport: str | None) -> np.ndarray:
        spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, transport)
        try:
            response = self._send(spec)
        except UnsupportedMediaType as err:
            if not self._fallback(spec, err, transport):
                raise
            spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, "json")
            response = self._send(spec)
        return self._decode(op, response, spec)

    # -- compute -------------------------------------------------------------------------------

    def spike(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
              transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """Spikes of ``x``: 1 where ``x >= 0``, else 0, with the broadcast shape of x and params.

        ``dtype`` defaults to x's dtype when x is a float16/32/64 or bfloat16 array, else float32.
        """
        return self._compute("spike", x, params, None, surrogate, dtype, transport)

    def grad(self, x: Any, *, cotangent: Any = None, surrogate: str | None = None, dtype: Any = None,
             transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """Surrogate gradient ``g'(x)``, or ``cotangent * g'(x)``; parameters (e.g. ``alpha``) and
        the cotangent broadcast against ``x`` by NumPy's rules."""
        return self._compute("grad", x, params, cotangent, surrogate, dtype, transport)

    def fun(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
            transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """The smooth surrogate function ``g(x)`` (braintools' ``surrogate_fun``)."""
        return self._compute("fun", x, params, None, surrogate, dtype, transport)

    def batch(self, op: str, jobs: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Several jobs of one op (``"spike"``, ``"grad"`` or ``"fun"``) in one request (JSON).

        Each job is a mapping like the service's job object: ``{"x": ..., "alpha": ...,
        "dtype": ..., "surrogate": ..., "cotangent": ...}``; the results come back in order.
        """
        spec, dtypes = _wire.build_batch(op, list(jobs))
        response = self._send(spec)
        return _wire.decode_batch(op, response.content, dtypes)

    # -- metadata and health ---------------------------------------------------------------------

    def surrogates(self) -> dict[str, Any]:
        """``GET /v1/surrogates``: ``{"default": name, "surrogates": [{"name", "parameters", ...}]}``."""
        return self._get("/v1/surrogates")

    def surrogate(self, name: str) -> dict[str, Any]:
        """``GET /v1/surrogates/{name}``: one surrogate (raises :class:`NotFound` if unknown)."""
        return self._get(f"/v1/surrogates/{quote(name, safe='')}")

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: version, JAX version, device, limits, compiled variants."""
        return self._get("/v1/info")

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` while the server process answers."""
        return self._get("/healthz")

    def ready(self) -> bool:
        """``GET /readyz``: True once the server has warmed up, False while it answers 503."""
        try:
            self._send(_wire.RequestSpec("GET", "/readyz"), retry_statuses=frozenset())
        except ServiceUnavailable:
            return False
        return True

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Wait until :meth:`ready`, tolerating refused connections; :class:`Timeout` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except (TransportError, ServerError):  # not up yet, or not answering
                pass
            if time.monotonic() >= deadline:
                raise Timeout(f"{self.base_url} was not ready within {timeout} s")
            self._sleep(interval)


class AsyncSurrogateClient(_Base):
    """The asynchronous twin of :class:`SurrogateClient` (same arguments and methods, awaited).

    ``http_transport`` is an :class:`httpx.AsyncBaseTransport`, e.g.
    ``httpx.ASGITransport(app=create_app())`` to call the service in process.

    >>> async with AsyncSurrogateClient("http://127.0.0.1:8000") as c:   # doctest: +SKIP
    ...     g = await c.grad(x, alpha=2.0)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: _wire.Transport = "auto",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, transport=transport, timeout=timeout, retries=retries, backoff=backoff,
            max_backoff=max_backoff, token=token, headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=http_transport
        )
        self._sleep: Callable[[float], Any] = anyio.sleep

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSurrogateClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _send(self, spec: _wire.RequestSpec, *,
                    retry_statuses: frozenset[int] = RETRY_STATUSES) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    spec.method, spec.path, params=spec.params or None, headers=spec.headers, content=spec.content
                )
            except RETRY_EXCEPTIONS as exc:
                if attempt >= self.retries:
                    raise _wrap_transport_error(exc, self.base_url + spec.path) from exc  # type: ignore[arg-type]
                await self._sleep(self._delay(attempt, None))
            except httpx.TransportError as exc:
                raise _wrap_transport_error(exc, self.base_url + spec.path) from exc
            else:
                if response.status_code not in retry_statuses or attempt >= self.retries:
                    return self._check(response)
                await self._sleep(self._delay(attempt, response))
            attempt += 1

    async def _get(self, path: str) -> Any:
        return self._json(await self._send(_wire.RequestSpec("GET", path)))

    async def _compute(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any, surrogate: str | None,
                       dtype: Any, transport: str | None) -> np.ndarray:
        spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, transport)
        try:
            response = await self._send(spec)
        except UnsupportedMediaType as err:
            if not self._fallback(spec, err, transport):
                raise
            spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, "json")
            response = await self._send(spec)
        return self._decode(op, response, spec)

    async def spike(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
                    transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.spike`."""
        return await self._compute("spike", x, params, None, surrogate, dtype, transport)

    async def grad(self, x: Any, *, cotangent: Any = None, surrogate: str | None = None, dtype: Any = None,
                   transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.grad`."""
        return await self._compute("grad", x, params, cotangent, surrogate, dtype, transport)

    async def fun(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
                  transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.fun`."""
        return await self._compute("fun", x, params, None, surrogate, dtype, transport)

    async def batch(self, op: str, jobs: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """See :meth:`SurrogateClient.batch`."""
        spec, dtypes = _wire.build_batch(op, list(jobs))
        response = await self._send(spec)
        return _wire.decode_batch(op, response.content, dtypes)

    async def surrogates(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.surrogates`."""
        return await self._get("/v1/surrogates")

    async def surrogate(self, name: str) -> dict[str, Any]:
        """See :meth:`SurrogateClient.surrogate`."""
        return await self._get(f"/v1/surrogates/{quote(name, safe='')}")

    async def info(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.info`."""
        return await self._get("/v1/info")

    async def health(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.health`."""
        return await self._get("/healthz")

    async def ready(self) -> bool:
        """See :meth:`SurrogateClient.ready`."""
        try:
            await self._send(_wire.RequestSpec("GET", "/readyz"), retry_statuses=frozenset())
        except ServiceUnavailable:
            return False
        return True

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """See :meth:`SurrogateClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except (TransportError, ServerError):
                pass
            if time.monotonic() >= deadline:
                raise Timeout(f"{self.base_url} was not ready within {timeout} s")
            await self._sleep(interval)
