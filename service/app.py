"""``create_app(settings)``: the service as a FastAPI application.

A request flows one way: FastAPI's router (``service.routes``, the one route table) -> the endpoint:
a compute route's codec (``service.protocols.v1|v2``) run by the data plane (``service.dataplane``:
admission, limits, batcher) over the engine (``surrogate_core``), or a plain path operation. Errors
are rendered by one renderer per protocol, whether raised by a route or by FastAPI (404, 405,
validation); every request is counted once in the metrics under its route template.

The app is an ordinary FastAPI app: add middleware, routers and exception handlers to it, test it
with ``TestClient``, or mount it in a larger application and run its lifespan from there
(``app.router.lifespan_context``; see docs/embedding.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import surrogate_core as core

from . import __version__
from .dataplane import DataPlane
from .dataplane.memory import detect_budget, own_rss
from .errors import ApiError, shown_field
from .protocols.grpc.server import start as grpc_start
from .protocols.grpc.server import stop as grpc_stop
from .protocols.shm import Regions
from .routes import RENDER, add_routes, as_response, protocol_of, validation_error
from .server.security import token_digests
from .server.settings import Settings
from .state import Runtime

__all__ = ["DESCRIPTION", "create_app"]

log = logging.getLogger("service")

DESCRIPTION = """\
Spikes and surrogate gradients of spiking neural networks, over HTTP, with the semantics of
`braintools.surrogate`. The spike is the Heaviside step H(x) = 1 where x >= 0, else 0; its
surrogate gradient g'(x) replaces the true derivative in a backward pass.

Two protocols over one data plane: `/v1`, whose compute endpoints take one job object or a list of
job objects (every error has the body `{"error": {"status", "code", "message", "job", "field"}}`),
and `/v2`, the Open Inference Protocol (KServe v2 / Triton HTTP) with the binary tensor data
extension, where each surrogate is a model (errors: `{"error": "<message>"}`).
"""


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


def _lifespan(rt: Runtime) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Start (warm-up in a thread; /readyz is 503 until done) and stop (drain the batcher)."""
        s = rt.settings
        dev = core.device_info()
        log.info(
            "surrogate-serve %s computing on %s (%s, %d device(s)), jax %s",
            __version__, dev["platform"], dev["device_kind"], dev["device_count"], dev["jax_version"],
        )
        if rt.token_digests:
            log.info("authentication on: %d bearer token(s) accepted", len(rt.token_digests))
        else:
            log.warning("authentication off: no SURROGATE_API_TOKEN set, every client is served")
        warmup: asyncio.Task | None = None
        if s.warmup:
            warmup = asyncio.create_task(asyncio.to_thread(_warm_up, rt))
        else:
            _size_budget(rt)
            rt.ready.set()
        grpc_server = await grpc_start(rt)  # the Open Inference Protocol over gRPC (SURROGATE_GRPC_PORT)
        try:
            yield
        finally:
            await grpc_stop(grpc_server, s.graceful_timeout)
            try:
                await rt.batcher.drain(s.graceful_timeout)
            finally:
                if rt.shm is not None:  # every region unmapped (each once the requests using it are done)
                    rt.shm.unregister()
            if warmup is not None and not warmup.done():
                with contextlib.suppress(BaseException):
                    await warmup

    return lifespan


class RootPath:
    """``SURROGATE_ROOT_PATH``: the prefix a proxy serves the app under, for a server started without
    ``--root-path`` (routes then match with or without the prefix in the path, and the contract's
    ``servers`` and the Swagger UI name it)."""

    def __init__(self, app: Any, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not scope.get("root_path"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


def _route_path(request: Request) -> str:
    root = (request.scope.get("root_path") or "").rstrip("/")
    path = request.url.path
    return path[len(root):] or "/" if root and path.startswith(root) else path


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service's FastAPI application, with its runtime (engine, data plane, metrics) in
    ``app.state.runtime``."""
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a spawned worker process: nothing configured logging yet
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("jax").setLevel(logging.WARNING)
    core.configure_for_serving()  # the service owns its process: tune JAX for serving
    engine = core.Engine(min_bucket=1 << max(0, (settings.min_bucket - 1).bit_length()),
                         max_variants=settings.max_variants)
    rt = Runtime(settings=settings, engine=engine, dataplane=DataPlane(settings, engine),
                 token_digests=token_digests(settings.tokens()))
    if settings.shared_memory:
        rt.shm = Regions(rt.dataplane.budget, settings.shared_memory_max_regions)
    telemetry = settings.opentelemetry
    app = FastAPI(
        title="surrogate-serve", description=DESCRIPTION, version=__version__,
        license_info={"name": "Apache-2.0", "identifier": "Apache-2.0"},
        lifespan=_lifespan(rt), docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        servers=[{"url": settings.root_path}] if settings.root_path else None,
        telemetry={"tracing": telemetry, "metrics": telemetry, "logs": telemetry},
    )
    app.state.runtime = rt
    add_routes(app.router, rt)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path.rstrip("/"))

    async def http_error(request: Request, exc: Exception) -> Response:
        """404 and 405 from the router, in the shape of the protocol the path belongs to."""
        assert isinstance(exc, StarletteHTTPException)
        path = _route_path(request)
        protocol = protocol_of(path)
        if exc.status_code == 404:
            err = ApiError(404, f"no route {shown_field(path)}; see /docs or /openapi.json")
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            err = ApiError(405, f"method {shown_field(request.method)} not allowed on {shown_field(path)}; "
                           f"allowed: {allow}", headers={"Allow": allow})
        else:
            err = ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        rt.metrics.observe_request("other", protocol, err.status, 0.0)
        return as_response(RENDER[protocol](err))

    async def api_error(request: Request, exc: Exception) -> Response:
        """An ``ApiError`` raised outside the service's routes (a dependency or a route added to the app)."""
        assert isinstance(exc, ApiError)
        return as_response(RENDER[protocol_of(_route_path(request))](exc))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        protocol = protocol_of(_route_path(request))
        return as_response(RENDER[protocol](validation_error(exc, protocol)))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    return app
