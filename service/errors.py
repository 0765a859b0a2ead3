"""One error model for every protocol: an ``ApiError`` carries a status, a machine-readable
``code`` (the error's kind: ``overloaded``, ``timeout``, ``device_out_of_memory``,
``not_representable``, ``too_large``...), a message naming the job and field, and headers. The data
plane and the decoders raise it; each protocol adapter renders it in its own shape.

On ``/v1`` every error response has the body::

    {"error": {"status": 422, "code": "invalid_value", "message": "...", "job": 0, "field": "alpha"}}

``job`` is the index of the offending job (0 for a single-job body) and ``field`` the offending
field, where the error concerns one; both are ``null`` otherwise. On ``/v2`` (the Open Inference
Protocol) the body is ``{"error": "<message>"}``.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["ApiError", "error_json", "shown", "shown_field", "ECHO_LIMIT"]


_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    500: "internal_error",
    503: "unavailable",
}


#: Codes that mean "a limit refused this request" (counted in ``surrogate_rejections_total``).
LIMIT_CODES = frozenset({"body_too_large", "too_large", "request_timeout", "headers_too_large", "memory"})


#: The most characters of a client's own value that an error message repeats.
ECHO_LIMIT = 64


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with an ellipsis.

    Error messages name what the client sent (a dtype, a key, a model name), but never repeat it
    whole: a client's value may be megabytes long. Long strings are cut before ``repr`` runs, so
    the cost is bounded too.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
        return repr(value)[: limit + 2] + "…"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[: limit + 2] + "…"


def shown_field(name: str) -> str:
    """A client's key as the ``field`` of an error: the key itself, cut to ``ECHO_LIMIT`` characters
    with an ellipsis."""
    return name if len(name) <= ECHO_LIMIT else name[:ECHO_LIMIT] + "…"


class ApiError(Exception):
    """An error with its HTTP status; raised anywhere below the routes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        job: int | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _DEFAULT_CODES.get(status, "error")
        self.message = message
        self.job = job
        self.field = field
        self.headers = headers
        #: Set when a limit refused the request: the label of ``surrogate_rejections_total``.
        self.reason = reason or (self.code if self.code in LIMIT_CODES else None)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "status": self.status,
                "code": self.code,
                "message": self.message,
                "job": self.job,
                "field": self.field,
            }
        }


def error_json(err: ApiError) -> bytes:
    """The /v1 error body of ``err`` as JSON bytes."""
    return orjson.dumps(err.body())
