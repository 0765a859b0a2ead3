"""The exceptions the client raises.

Every exception derives from :class:`SurrogateError`::

    SurrogateError
     ├── ApiError              the server answered with an error status (4xx/5xx)
     │    ├── ClientError      4xx: the request is wrong; retrying it will not help
     │    │    ├── BadRequest              400  body not decodable (bad JSON, empty, corrupt .npy)
     │    │    ├── AuthenticationError     401, 403  missing or wrong bearer token
     │    │    ├── NotFound                404  no such route or surrogate
     │    │    ├── PayloadTooLarge         413  body over the server's byte limit
     │    │    ├── UnsupportedMediaType    415  content type not accepted (e.g. no binary support)
     │    │    └── ValidationError         422  a job is invalid (field, value, shape, size...)
     │    └── ServerError      5xx: the server failed
     │         └── ServiceUnavailable      503  still after the retries
     ├── TransportError        no HTTP answer: connection refused or reset, DNS, TLS...
     │    └── Timeout          connect, read, write or pool timeout, or the call's deadline
     └── DecodingError         an answer the client cannot read (not the documented format, or
                               larger than a correct answer to the request can be)

:class:`ApiError` carries the server's error body: ``status``, ``code``, ``message``, ``job``
and ``field`` (see the service's README), and the ``response``. Problems found on the client side
before anything is sent (a ragged list, a string where a number belongs, an unknown ``transport``)
raise the built-in :class:`TypeError` or :class:`ValueError`.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "ApiError",
    "AuthenticationError",
    "BadRequest",
    "ClientError",
    "DecodingError",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "SurrogateError",
    "Timeout",
    "TransportError",
    "UnsupportedMediaType",
    "ValidationError",
]


class SurrogateError(Exception):
    """Base class of every error raised by :mod:`surrogate_client`."""


class ApiError(SurrogateError):
    """The server answered with an error status; the attributes are its error body.

    ``str(err)`` is ``"<status> <code>: <message>"``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        job: int | None = None,
        field: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.job = job
        self.field = field
        self.response = response

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the keyword-only arguments
        return (_rebuild_api_error, (type(self), self.status, self.code, self.message, self.job, self.field))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r}, "
            f"job={self.job!r}, field={self.field!r})"
        )


def _rebuild_api_error(
    cls: type[ApiError], status: int, code: str, message: str, job: int | None, field: str | None
) -> ApiError:
    return cls(status, code, message, job=job, field=field)


class ClientError(ApiError):
    """4xx: the request is wrong; sending it again will not help."""


class BadRequest(ClientError):
    """400: the body could not be decoded (invalid JSON, empty body, corrupt .npy/.npz)."""


class AuthenticationError(ClientError):
    """401 or 403: the bearer token is missing, wrong, or not allowed to do this."""


class NotFound(ClientError):
    """404: no such route, or no such surrogate."""


class PayloadTooLarge(ClientError):
    """413: the body is over the server's byte limit (``max_body_bytes`` in ``info()``)."""


class UnsupportedMediaType(ClientError):
    """415: the server does not accept this content type (e.g. it has no binary transport)."""


class ValidationError(ClientError):
    """422: a job is invalid; ``job`` and ``field`` say which, ``code`` says how."""


class ServerError(ApiError):
    """5xx: the server failed to answer the request."""


class ServiceUnavailable(ServerError):
    """503: the server is not able to answer now, still after the client's retries."""


class TransportError(SurrogateError):
    """No HTTP answer: the connection failed (refused, reset, DNS, TLS), after the client's retries.

    The underlying :class:`httpx.TransportError` is the ``__cause__``.
    """


class Timeout(TransportError):
    """A connect, read, write or pool timeout (the client's ``timeout``), or a call that did not
    finish within the client's ``deadline``."""


class DecodingError(SurrogateError):
    """The server's answer is not in the documented format (not JSON / .npy, a dtype the service
    does not compute in, the wrong shape), or is larger than a correct answer to the request can be
    (the client's answer cap). It is not retried."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFound,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    503: ServiceUnavailable,
}


def error_class(status: int) -> type[ApiError]:
    """The most specific :class:`ApiError` subclass for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 400 <= status < 500:
        return ClientError
    if status >= 500:
        return ServerError
    return ApiError


def api_error_from_response(response: httpx.Response) -> ApiError:
    """Build the typed error of an error response, from its JSON error body if it has one."""
    status = response.status_code
    code = f"http_{status}"
    message = response.reason_phrase or "error"
    job: int | None = None
    field: str | None = None
    try:
        body = response.json()
    except Exception:  # not JSON (a proxy's HTML page, say): keep a short excerpt of the text
        text = response.text.strip()
        if text:
            message = text[:500]
    else:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
            job = err.get("job") if isinstance(err.get("job"), int) else None
            field = err.get("field") if isinstance(err.get("field"), str) else None
        else:
            message = str(body)[:500]
    return error_class(status)(status, code, message, job=job, field=field, response=response)
