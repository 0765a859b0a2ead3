"""``create_app(settings)``: builds the FastAPI app; the lifespan warms up the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

import surrogate_core as core

from . import __version__
from .errors import install_error_handlers
from .batching import Batcher
from .metrics import Metrics
from .middleware import ServiceMiddleware
from .routes import compute_router, health_router, meta_router, metrics_router
from .security import token_digests
from .schemas import COMPUTE_MODELS, ErrorResponse
from .settings import Settings
from .state import Runtime

__all__ = ["create_app"]

log = logging.getLogger("service")

DESCRIPTION = """\
Spikes and surrogate gradients of spiking neural networks, over HTTP, with the semantics of
`braintools.surrogate`. The spike is the Heaviside step H(x) = 1 where x >= 0, else 0; its
surrogate gradient g'(x) replaces the true derivative in a backward pass.

Every compute endpoint takes one job object or a list of job objects. Every error has the body
`{"error": {"status", "code", "message", "job", "field"}}`.
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
        rt.warmup_error = repr(exc)
        log.exception("warm-up failed; compiling on demand")
    rt.ready.set()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a spawned worker process: nothing configured logging yet
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("jax").setLevel(logging.WARNING)
    engine = core.Engine(min_bucket=1 << max(0, (settings.min_bucket - 1).bit_length()))
    batcher = Batcher(
        engine,
        max_delay=settings.batch_max_delay,
        max_batch_elements=settings.batch_max_elements,
        max_queue=settings.max_queue,
        offload_elements=settings.offload_elements,
    )
    metrics = Metrics(engine, lambda: batcher.depth)
    batcher.on_batch = metrics.on_batch
    rt = Runtime(
        settings=settings, engine=engine, batcher=batcher, metrics=metrics,
        token_digests=token_digests(settings.tokens()),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dev = core.device_info()
        log.info(
            "surrogate-serve %s computing on %s (%s, %d device(s)), jax %s",
            __version__, dev["platform"], dev["device_kind"], dev["device_count"], dev["jax_version"],
        )
        if rt.token_digests:
            log.info("authentication on: %d bearer token(s) accepted", len(rt.token_digests))
        else:
            log.warning("authentication off: no SURROGATE_API_TOKEN set, every client is served")
        task = None
        if settings.warmup:
            task = asyncio.create_task(asyncio.to_thread(_warm_up, rt))
        else:
            rt.ready.set()
        try:
            yield
        finally:
            await batcher.drain(settings.graceful_timeout)
            if task is not None and not task.done():
                with contextlib.suppress(BaseException):
                    await task

    app = FastAPI(
        title="surrogate-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        license_info={"name": "Apache-2.0", "identifier": "Apache-2.0"},
        # off unless asked for: checking for a provider costs ~15 us per request
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = rt
    install_error_handlers(app)
    app.include_router(compute_router)
    app.include_router(meta_router)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.add_middleware(ServiceMiddleware, runtime=rt)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The contract: FastAPI's schema plus the compute bodies, which the routes decode themselves."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        license_info=app.license_info,
    )
    models = [(m, "validation") for req, res, _ in COMPUTE_MODELS.values() for m in (req, res)]
    models.append((ErrorResponse, "validation"))
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref("ErrorResponse")}}}

    for endpoint, (req, res, key) in COMPUTE_MODELS.items():
        op = schema["paths"][f"/v1/{endpoint}"]["post"]
        example_job = req.model_config["json_schema_extra"]["examples"][0]
        example_res = res.model_config["json_schema_extra"]["examples"][0]
        binary_note = (
            "Binary bodies only (application/x-npy or application/x-npz); a JSON body carries these "
            "fields in the job object and must have no query string."
        )
        params = [
            {
                "name": "surrogate",
                "in": "query",
                "required": False,
                "description": "The surrogate. " + binary_note,
                "schema": ref("SurrogateName"),
            },
            {
                "name": "dtype",
                "in": "query",
                "required": False,
                "description": "Computation dtype; default: the .npy array's own (float16, float32, float64). "
                "bfloat16 travels as float32 with dtype=bfloat16. " + binary_note,
                "schema": {"type": "string", "enum": list(core.DTYPES)},
            },
        ]
        names = sorted({p.name for sur in core.all_surrogates() for p in sur.params})
        if endpoint == "grad":
            names.append("cotangent")
        for name in names:
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": f"Scalar {name} (an array goes in an .npz member of that name). " + binary_note,
                    "schema": {"type": "number"},
                }
            )
        op["parameters"] = params
        op["requestBody"] = {
            "required": True,
            "description": "One job, or a non-empty list of jobs (answered in order), as JSON; or one job as a "
            "binary body: x as a .npy file (application/x-npy) with scalar fields in the query string, or an .npz "
            "archive (application/x-npz) of named arrays x, parameters and cotangent. Binary input may hold NaN "
            "and infinities (IEEE semantics); objects, structured dtypes and pickles are refused.",
            "content": {
                "application/x-npy": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "<x as written by numpy.save, e.g. float32 [-2, -0.5, 0, 0.5, 2]>",
                },
                "application/x-npz": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "<numpy.savez(f, x=..., alpha=np.array([[0.5], [1], [2], [4]]))>",
                },
                "application/json": {
                    "schema": {
                        "oneOf": [ref(req.__name__), {"type": "array", "minItems": 1, "items": ref(req.__name__)}]
                    },
                    "examples": {
                        "seed": {"summary": "The seed's example", "value": example_job},
                        "batch": {"summary": "A list of jobs", "value": [example_job, {"x": [[0.25, -1.5]]}]},
                    },
                }
            },
        }
        op["responses"] = {
            "200": {
                "description": "The result (a list of results, in order, for a list of jobs); a .npy file "
                "when the request has Accept: application/x-npy.",
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [ref(res.__name__), {"type": "array", "items": ref(res.__name__)}]},
                        "example": example_res,
                    },
                    "application/x-npy": {
                        "schema": {"type": "string", "format": "binary"},
                        "example": "<the result as a .npy file; bfloat16 results as float32>",
                    },
                },
                "headers": {
                    "X-Surrogate-Dtype": {
                        "description": "On .npy answers: the computation dtype (bfloat16 travels as float32).",
                        "schema": {"type": "string"},
                    },
                    "X-Surrogate-Name": {
                        "description": "On .npy answers: the surrogate used.",
                        "schema": {"type": "string"},
                    },
                },
            },
            "400": error("Malformed body: not JSON, or empty."),
            "406": error("Accept: application/x-npy for a list of jobs (lists are answered in JSON)."),
            "401": error("Missing or wrong bearer token (only when the server has a token configured)."),
            "408": error("The body did not arrive within the request time limit."),
            "413": error("Body over the configured byte limit."),
            "415": error("Unsupported Content-Type."),
            "422": error(
                "Invalid job: the message names the job index and field. Also a malformed, truncated, "
                "object-dtype or oversized binary body (code invalid_binary, invalid_type or too_large)."
            ),
            "500": error("Unexpected server error (logged; no details leak)."),
            "503": {
                "description": "Overloaded (queue or concurrency limit), over the time limit, or the device "
                "ran out of memory: retry after Retry-After seconds.",
                "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": ref("ErrorResponse")}},
            },
        }
    app.openapi_schema = schema
    return schema
