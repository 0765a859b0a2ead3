"""``create_app(settings)``: the service as one ASGI application.

A request flows one way: the router (from the route table) picks the endpoint; auth; for compute
endpoints the data plane admits it (concurrency, time limit); the protocol adapter decodes the body
into core jobs, the data plane computes them (batcher, engine), the adapter encodes the results;
any ``ApiError`` on the way is rendered in the endpoint's protocol shape. Every request is counted
once in the metrics, under its route template.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import surrogate_core as core

from . import __version__
from .asgi import Call, ClientGone, SendTimeout
from .dataplane import DataPlane
from .errors import ApiError
from .memory import detect_budget, own_rss
from .protocols.v1.handlers import render_error as v1_error
from .protocols.v2.handlers import render_error as v2_error
from .routes import Endpoint, Router, table
from .security import check_token, token_digests
from .settings import Settings
from .state import Runtime

__all__ = ["Service", "create_app"]

log = logging.getLogger("service")
errlog = logging.getLogger("service.errors")

_RENDER = {"v1": v1_error, "v2": v2_error}


def _warm_up(rt: Runtime) -> None:
    s = rt.settings
    t0 = time.perf_counter()
    try:
        n = rt.engine.warm_up(
            surrogate=core.DEFAULT_SURROGATE, dtype=core.DEFAULT_DTYPE, max_elements=s.warmup_max_elements
        )
        log.info("warm-up compiled %d variants in %.1f s; ready", n, time.perf_counter() - t0)
    except Exception as exc:  # the service still answers; compilation then happens on demand
        rt.dataplane.warmup_error = repr(exc)
        log.exception("warm-up failed; compiling on demand")
    _size_budget(rt)
    rt.ready.set()


def _size_budget(rt: Runtime) -> None:
    """Take the memory budget now that the process's own footprint (runtime, compiled variants) is
    known, and say what it is."""
    dp = rt.dataplane
    if rt.settings.memory_budget is None:
        dp.set_budget(*detect_budget(own_rss()))
    log.info("memory budget: %d MiB for request data (%s)", dp.budget.capacity >> 20, dp.budget_source)


class Service:
    """The ASGI application: lifespan, routing from the table, auth, admission, errors, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        engine = core.Engine(min_bucket=1 << max(0, (settings.min_bucket - 1).bit_length()),
                             max_variants=settings.max_variants)
        self.runtime = rt = Runtime(
            settings=settings, engine=engine, dataplane=DataPlane(settings, engine),
            token_digests=token_digests(settings.tokens()),
        )
        rt.contract = self.openapi
        self.state = SimpleNamespace(runtime=rt)
        self.endpoints = table()
        self.router = Router(self.endpoints)
        self.root_path = settings.root_path or ""
        self._openapi: dict[str, Any] | None = None
        self._warmup: asyncio.Task | None = None

    # -- lifespan ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start (warm-up in a thread; /readyz is 503 until done) and stop (drain the batcher)."""
        rt, s = self.runtime, self.settings
        dev = core.device_info()
        log.info(
            "surrogate-serve %s computing on %s (%s, %d device(s)), jax %s",
            __version__, dev["platform"], dev["device_kind"], dev["device_count"], dev["jax_version"],
        )
        if rt.token_digests:
            log.info("authentication on: %d bearer token(s) accepted", len(rt.token_digests))
        else:
            log.warning("authentication off: no SURROGATE_API_TOKEN set, every client is served")
        if s.warmup:
            self._warmup = asyncio.create_task(asyncio.to_thread(_warm_up, rt))
        else:
            _size_budget(rt)
            rt.ready.set()
        try:
            yield
        finally:
            await rt.batcher.drain(s.graceful_timeout)
            if self._warmup is not None and not self._warmup.done():
                with contextlib.suppress(BaseException):
                    await self._warmup

    async def _lifespan(self, receive: Any, send: Any) -> None:
        cm = self.lifespan()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await cm.__aenter__()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await cm.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets: none served; returning without accepting closes them

    def _path(self, scope: dict[str, Any]) -> str:
        path: str = scope["path"]
        root = self.root_path or scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            path = path[len(root):] or "/"  # servers (uvicorn) put the root path in front of the path
        return path

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        rt = self.runtime
        path = self._path(scope)
        hit = self.router.match(path)
        ep: Endpoint | None = None
        params: dict[str, str] = {}
        if hit is not None:
            methods, params = hit
            ep = methods.get(scope["method"]) or (methods.get("GET") if scope["method"] == "HEAD" else None)
        if ep is not None:
            protocol, label = ep.protocol, ep.path
        else:  # answered in the shape of the protocol the path belongs to
            protocol, label = ("v2" if path == "/v2" or path.startswith("/v2/") else "v1"), "other"
        call = Call(scope, receive, send, params)
        try:
            if ep is None:
                if hit is None:
                    raise ApiError(404, f"no route {path}; see /docs or /openapi.json")
                allow = ", ".join(sorted(hit[0]))
                raise ApiError(405, f"method {scope['method']} not allowed on {path}; allowed: {allow}",
                               headers={"Allow": allow})
            if ep.auth and rt.token_digests:
                check_token(rt.token_digests, call.header(b"authorization"))
            if ep.compute:
                await rt.dataplane.admitted(self._respond, ep, call)
            else:
                await call.respond(await ep.handler(call, rt))
        except ApiError as err:
            await self._refuse(call, protocol, err)
        except ClientGone:  # gone mid-upload: nothing to answer; counted as 499 (as nginx does)
            rt.metrics.reject("client_disconnect")
        except SendTimeout:  # stopped reading the answer: cut off, its memory freed; counted as 499
            call.disconnected = True
            rt.metrics.reject("send_timeout")
        except Exception:
            errlog.exception("unhandled error on %s %s", scope["method"], path)
            if not call.status:
                await call.respond(_RENDER[protocol](ApiError(500, "internal error; the server log has the details")))
        finally:
            status = 499 if call.disconnected else (call.status or 500)
            rt.metrics.observe_request(label, protocol, status, time.perf_counter() - t0)

    async def _respond(self, ticket: Any, ep: Endpoint, call: Call) -> None:
        call.ticket = ticket
        call.send_timeout = self.settings.send_timeout
        await call.respond(await ep.handler(call, self.runtime))

    async def _refuse(self, call: Call, protocol: str, err: ApiError) -> None:
        if err.code == "timeout" and not call.body_done:  # still uploading: a slow client, not a slow server
            err = ApiError(408, f"the request body did not arrive within {self.settings.request_timeout} s",
                           code="request_timeout", headers={"Connection": "close"}, reason="request_timeout")
        if err.reason:
            self.runtime.metrics.reject(err.reason)
        if call.status:  # the answer has started (a timeout while sending): nothing more can be said
            return
        await call.respond(_RENDER[protocol](err))

    # -- the contract --------------------------------------------------------------------------
    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            from .docs import build_openapi

            self._openapi = build_openapi(self.endpoints, self.settings)
        return self._openapi


def create_app(settings: Settings | None = None) -> Any:
    """The service's ASGI application (a ``Service``; with ``SURROGATE_OPENTELEMETRY=true``, the
    same wrapped in FastAPI's native OpenTelemetry instrumentation)."""
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a spawned worker process: nothing configured logging yet
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("jax").setLevel(logging.WARNING)
    core.configure_for_serving()  # the service owns its process: tune JAX for serving
    service = Service(settings)
    if not settings.opentelemetry:
        return service
    from fastapi import FastAPI

    traced = FastAPI(lifespan=lambda _: service.lifespan(), openapi_url=None, docs_url=None, redoc_url=None)
    traced.mount("/", service)  # type: ignore[arg-type]
    traced.state.runtime = service.runtime
    traced.openapi = service.openapi  # type: ignore[method-assign]
    return traced

