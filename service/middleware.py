"""Pure ASGI middleware: request metrics, the concurrency cap, the per-request time limit, and the
fast path of the compute endpoints.

Kept as plain ASGI (not BaseHTTPMiddleware) so it adds microseconds, not a task per request. The
compute endpoints (``POST /v1/spike|grad|fun``) are answered here directly by the same handler the
FastAPI routes declare (``routes.compute``): FastAPI's per-request routing and dependency
resolution cost more than the whole computation of a small request, and these endpoints need none
of it (they read their bodies themselves). The FastAPI routes stay declared for the contract.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .routes import compute
from .security import check_token

__all__ = ["ServiceMiddleware", "COMPUTE_PATHS"]

log = logging.getLogger("service.errors")

COMPUTE_PATHS = frozenset({"/v1/spike", "/v1/grad", "/v1/fun"})
KNOWN_PATHS = COMPUTE_PATHS | {"/v1/surrogates", "/v1/info", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, runtime: Any) -> None:
        self.app = app
        self.rt = runtime
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else ("/v1/surrogates/{name}" if path.startswith("/v1/surrogates/") else "other")
        metrics = self.rt.metrics
        status = {"code": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        t0 = time.perf_counter()
        compute = path in COMPUTE_PATHS
        try:
            if not compute:
                await self.app(scope, receive, send_wrapper)
                return
            s = self.rt.settings
            if self.in_flight >= s.max_concurrent:
                metrics.rejections.labels("concurrency").inc()
                await error_response(
                    ApiError(503, f"{self.in_flight} requests in progress (limit {s.max_concurrent}); retry shortly",
                             code="overloaded", headers={"Retry-After": "1"})
                )(scope, receive, send_wrapper)
                return
            self.in_flight += 1
            metrics.in_flight.inc()
            try:
                async with asyncio.timeout(s.request_timeout):
                    if scope["method"] == "POST":
                        await self._compute(path[4:], scope, receive, send_wrapper)
                    else:
                        await self.app(scope, receive, send_wrapper)
            except TimeoutError:
                if status["started"]:
                    raise
                uploading = not scope.get("state", {}).get("body_done", False)
                metrics.rejections.labels("timeout").inc()
                err = (
                    ApiError(408, f"the request body did not arrive within {s.request_timeout} s", code="request_timeout",
                             headers={"Connection": "close"})
                    if uploading
                    else ApiError(503, f"the request took longer than {s.request_timeout} s", code="timeout",
                                  headers={"Retry-After": "1"})
                )
                await error_response(err)(scope, receive, send_wrapper)
            finally:
                self.in_flight -= 1
                metrics.in_flight.dec()
        finally:
            code = 499 if scope.get("state", {}).get("disconnected") else status["code"]
            metrics.observe_request(endpoint, code, time.perf_counter() - t0)

    async def _compute(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            check_token(self.rt.token_digests, request.headers.get("authorization"))
            response = await compute(endpoint, request, self.rt)
        except ApiError as exc:
            response = error_response(exc)
        except ClientDisconnect:  # gone mid-upload: nothing to answer; counted as 499 (as nginx does)
            self.rt.metrics.rejections.labels("client_disconnect").inc()
            scope.setdefault("state", {})["disconnected"] = True
            return
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(ApiError(500, "internal error; the server log has the details"))
        await response(scope, receive, send)
