"""One error model, mapped to status codes in one place.

Every error response has the body::

    {"error": {"status": 422, "code": "invalid_value", "message": "...", "job": 0, "field": "alpha"}}

``job`` is the index of the offending job (0 for a single-job body) and ``field`` the offending
field, where the error concerns one; both are ``null`` otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger("service.errors")

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    500: "internal_error",
    503: "unavailable",
}


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _DEFAULT_CODES.get(status, "error")
        self.message = message
        self.job = job
        self.field = field
        self.headers = headers

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


def error_response(err: ApiError) -> Response:
    return Response(
        orjson.dumps(err.body()), status_code=err.status, media_type="application/json", headers=err.headers
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no route {request.url.path}; see /docs or /openapi.json"
        return error_response(ApiError(exc.status_code, msg, headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        field = loc[-1] if loc else None
        msg = f"{'.'.join(loc)}: {first.get('msg', 'invalid request')}"
        return error_response(ApiError(422, msg, field=field))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal error; the server log has the details"))
