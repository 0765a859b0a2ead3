"""The route table: every endpoint of the service once, as routes of one FastAPI router.

- **Compute** (``POST /v1/spike|grad|fun``, ``POST /v2/models/{model}[/versions/{version}]/infer``):
  ``ComputeRoute``, a FastAPI ``APIRoute`` whose operation (request body, responses, security)
  FastAPI documents from the Pydantic schemas and ``openapi_extra``, and whose ASGI app is the raw
  ``service.compute.ComputeEndpoint`` of the route's codec (no ``Request``, no dependency
  resolution, no response serialization on the hot path).
- **Everything else** (metadata, health, the repository index, ``/v1/info``, ``/metrics``, the
  Swagger UI): plain path operations with ``response_model``s, ``ServiceRoute``s, which render
  every error in their protocol's shape and count each request once in the metrics.

The bearer token is a FastAPI security dependency (``bearerAuth`` in the contract); the compute
routes check the same token themselves.
"""

from __future__ import annotations

import logging
import mimetypes
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

import surrogate_core as core
from surrogate_core._registry import unknown_message

from . import __version__
from .compute import Answer, ComputeEndpoint
from .errors import ApiError, shown
from .protocols.shm import Regions, off_error
from .protocols.v1 import codec as v1
from .protocols.v2 import codec as v2
from .schemas import (
    COMPUTE_MODELS,
    ErrorResponse,
    Health,
    Info,
    Readiness,
    SurrogateInfo,
    SurrogateList,
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2RepositoryIndexRequest,
    V2RepositoryModel,
    V2ServerMetadata,
    V2SharedMemoryRegion,
    V2SharedMemoryRegister,
    V2StatisticsResponse,
)
from .server.security import check_token
from .state import Runtime

__all__ = ["ComputeRoute", "ServiceRoute", "add_routes", "as_response"]

log = logging.getLogger("service.errors")

RENDER = {"v1": v1.render_error, "v2": v2.render_error}
ERROR_MODEL = {"v1": ErrorResponse, "v2": V2Error}


def as_response(answer: Answer) -> Response:
    """An ``Answer`` (what the codecs make) as a Starlette response, for path operations."""
    r = Response(b"".join(bytes(c) for c in answer.chunks), answer.status)
    r.raw_headers = list(answer.headers)
    return r


def protocol_of(path: str) -> str:
    """The protocol a path belongs to (the shape of its errors): ``/v2...`` is the OIP's."""
    return "v2" if path == "/v2" or path.startswith("/v2/") else "v1"


class ServiceRoute(APIRoute):
    """A path operation of the service: errors (``ApiError``, FastAPI's validation errors) rendered
    in the route's protocol, one metrics record per request under the route template."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, runtime: Runtime, protocol: str,
                 **kwargs: Any) -> None:
        self.runtime = runtime
        self.protocol = protocol
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        render, label, protocol, metrics = RENDER[self.protocol], self.path, self.protocol, self.runtime.metrics

        async def metered(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except ApiError as err:
                response = as_response(render(err))
            except RequestValidationError as exc:
                response = as_response(render(validation_error(exc, protocol)))
            except HTTPException as exc:  # FastAPI's own: a body that is not JSON
                response = as_response(render(ApiError(exc.status_code, str(exc.detail))))
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = as_response(render(ApiError(500, "internal error; the server log has the details")))
            metrics.observe_request(label, protocol, response.status_code, time.perf_counter() - t0)
            return response

        return metered


def validation_error(exc: RequestValidationError, protocol: str) -> ApiError:
    """FastAPI's validation error as the protocol's own (the first problem, its field named; the
    input not echoed)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "path", "query", "header", "cookie"):
        loc = loc[1:]
    field = loc[0] if loc else None
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
    return ApiError(400 if protocol == "v2" else 422, message, field=field)


class ComputeRoute(APIRoute):
    """A compute endpoint: FastAPI documents it (``endpoint`` is its signature only, never called);
    the raw ``ComputeEndpoint`` answers it."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, asgi: ComputeEndpoint, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.compute = asgi
        self.app = asgi


# -- the bearer token ------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False, scheme_name="bearerAuth",
    description="Needed only when the server is configured with SURROGATE_API_TOKEN or SURROGATE_API_TOKEN_FILE.",
)


def _auth(rt: Runtime) -> Any:
    def authorized(request: Request,
                   _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None) -> None:
        if rt.token_digests:
            check_token(rt.token_digests, request.headers.get("authorization"))

    return Security(authorized)


def _error(description: str, protocol: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "model": ERROR_MODEL[protocol]}
    if retry:
        out["headers"] = _RETRY
    return out


_RETRY = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}


def _unauthorized(protocol: str) -> dict[int | str, dict[str, Any]]:
    return {401: _error("Missing or wrong bearer token (only when the server has a token configured).", protocol)}


# -- the table -------------------------------------------------------------------------------

def add_routes(r: APIRouter, rt: Runtime) -> None:
    """Every route of the service, for the runtime ``rt``, into the router ``r``: the compute routes
    first (they are matched first, so a 16-element request does not try twenty patterns), then the
    path operations."""
    s = rt.settings
    auth = _auth(rt)

    def op(method: str, path: str, endpoint: Callable[..., Any], *, protocol: str, tag: str, summary: str,
           auth_needed: bool = True, errors: dict[int | str, dict[str, Any]] | None = None, **kw: Any) -> None:
        responses = dict(errors or {})
        if auth_needed:
            responses.update(_unauthorized(protocol))
        r.add_api_route(path, endpoint, methods=[method], tags=[tag], summary=summary, operation_id=kw.pop("name"),
                        dependencies=[auth] if auth_needed else None, responses=responses,
                        route_class_override=_route_class(rt, protocol), **kw)

    # compute ------------------------------------------------------------------------------------
    compute: list[ComputeRoute] = []
    for name, (summary, description) in V1_COMPUTE.items():
        req, res, _ = COMPUTE_MODELS[name]
        compute.append(ComputeRoute(
            f"/v1/{name}", _v1_signature(req, res),
            asgi=ComputeEndpoint(v1.V1Codec(name, rt.dataplane.limits, max_jobs=s.max_jobs), rt, f"/v1/{name}"),
            methods=["POST"], tags=["compute"], summary=summary, description=description, operation_id=name,
            response_model=res | list[res],  # type: ignore[valid-type]
            response_description="The result (a list of results, in order, for a list of jobs); a .npy file "
            "when the request has Accept: application/x-npy.",
            responses={**_v1_compute_errors(), **_unauthorized("v1")}, dependencies=[auth],
            openapi_extra=_v1_compute_extra(name),
        ))
    for suffix in ("", "/versions/{version}"):
        path = "/v2/models/{model}" + suffix + "/infer"
        compute.append(ComputeRoute(
            path, _v2_signature(bool(suffix)), asgi=ComputeEndpoint(v2.V2Codec(rt.dataplane.limits, rt.shm), rt, path),
            methods=["POST"],
            tags=["open inference protocol"],
            summary="Inference: spike, grad, fun and vjp of x, as JSON tensors or binary tensor data",
            description=V2_INFER_DESCRIPTION, operation_id="v2_infer" + ("_version" if suffix else ""),
            response_model=V2InferResponse, responses={**_v2_infer_errors(), **_unauthorized("v2")},
            dependencies=[auth], openapi_extra=_V2_INFER_EXTRA,
        ))

    # /v1 metadata and health -----------------------------------------------------------------------
    def surrogates() -> dict[str, Any]:
        return {"default": core.DEFAULT_SURROGATE, "surrogates": [x.describe() for x in core.all_surrogates()]}

    def surrogate(name: str) -> dict[str, Any]:
        try:
            return core.get(name).describe()
        except KeyError:
            raise ApiError(404, unknown_message(name, shown), code="unknown_surrogate", field="name") from None

    def info() -> dict[str, Any]:
        dev = core.device_info()
        dp = rt.dataplane
        return {
            "name": "surrogate-serve", "version": __version__, "jax_version": dev["jax_version"],
            "device": {k: v for k, v in dev.items() if k != "jax_version"}, "ready": rt.ready.is_set(),
            "default_surrogate": core.DEFAULT_SURROGATE, "dtypes": list(core.DTYPES),
            "limits": {k: getattr(s, k) for k in ("max_body_bytes", "max_elements", "max_rank", "max_jobs",
                                                   "max_concurrent", "max_queue", "max_variants")},
            "memory": {"budget": dp.budget.capacity, "source": dp.budget_source, "in_use": dp.budget.in_use,
                       "peak": dp.budget.peak},
            "root_path": s.root_path, "compilations": rt.engine.stats.compilations, "variants": rt.engine.variants(),
        }

    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def readyz(response: Response) -> dict[str, str]:
        if rt.ready.is_set():
            return {"status": "ready"}
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        return {"status": "warming_up"}

    def metrics() -> Response:
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    op("GET", "/v1/surrogates", surrogates, protocol="v1", tag="metadata", name="surrogates",
       summary="All surrogates with their parameters", response_model=SurrogateList)
    op("GET", "/v1/surrogates/{name}", surrogate, protocol="v1", tag="metadata", name="surrogate",
       summary="One surrogate with its parameters", response_model=SurrogateInfo,
       errors={404: _error("Unknown surrogate", "v1")})
    op("GET", "/v1/info", info, protocol="v1", tag="metadata", name="info", summary="Version, device and limits",
       response_model=Info)
    op("GET", "/healthz", healthz, protocol="v1", tag="health", name="healthz",
       summary="Liveness: the process answers", auth_needed=False, response_model=Health)
    op("GET", "/readyz", readyz, protocol="v1", tag="health", name="readyz",
       summary="Readiness: 200 once the warm-up compilation is done, 503 before", auth_needed=False,
       response_model=Readiness,
       errors={503: {"description": "Still warming up (Retry-After says when to ask again)", "model": Readiness,
                     "headers": _RETRY}})
    op("GET", "/metrics", metrics, protocol="v1", tag="metadata", name="metrics", summary="Prometheus metrics",
       response_class=Response, errors={200: {"description": "Prometheus text format",
                                              "content": {"text/plain": {"schema": {"type": "string"}}}}})

    # the Open Inference Protocol's metadata and health ---------------------------------------------
    oip = "open inference protocol"

    def not_ready() -> ApiError:
        return ApiError(503, "the server is warming up (compiling); retry shortly", code="unavailable",
                        headers={"Retry-After": "1"})

    def server_metadata() -> dict[str, Any]:
        return {"name": "surrogate-serve", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository", "statistics"]
                + (["system_shared_memory"] if rt.shm is not None else [])}

    def health_live() -> dict[str, bool]:
        return {"live": True}

    def health_ready() -> dict[str, bool]:
        if not rt.ready.is_set():
            raise not_ready()
        return {"ready": True}

    def model_metadata(model: str, version: str | None = None) -> dict[str, Any]:
        return v2.describe_model(v2.model(model, version), s.max_rank)

    def model_ready(model: str, version: str | None = None) -> dict[str, Any]:
        sur = v2.model(model, version)
        if not rt.ready.is_set():
            raise not_ready()
        return {"name": sur.name, "ready": True}

    def repository_index(body: Annotated[V2RepositoryIndexRequest | None, Body()] = None) -> list[dict[str, Any]]:
        state = "READY" if rt.ready.is_set() else "UNAVAILABLE"
        return [{"name": x.name, "version": v2.VERSION, "state": state, "reason": ""} for x in core.all_surrogates()]

    op("GET", "/v2", server_metadata, protocol="v2", tag=oip, name="v2_server_metadata",
       summary="Server metadata: name, version, extensions", response_model=V2ServerMetadata)
    op("GET", "/v2/health/live", health_live, protocol="v2", tag=oip, name="v2_health_live", summary="Liveness",
       auth_needed=False, response_model=V2Live)
    op("GET", "/v2/health/ready", health_ready, protocol="v2", tag=oip, name="v2_health_ready",
       summary="Readiness (503 while warming up)", auth_needed=False, response_model=V2Ready,
       errors={503: _error("Warming up", "v2", retry=True)})
    op("POST", "/v2/repository/index", repository_index, protocol="v2", tag=oip, name="v2_repository_index",
       summary="Every model (surrogate) and its state", response_model=list[V2RepositoryModel],
       errors={400: _error("Malformed body", "v2")})
    def statistics() -> dict[str, Any]:
        return rt.dataplane.stats.snapshot()

    def model_statistics(model: str) -> dict[str, Any]:
        return rt.dataplane.stats.snapshot(model)

    def model_version_statistics(model: str, version: str) -> dict[str, Any]:
        return rt.dataplane.stats.snapshot(model, version)

    # (before /v2/models/{model}, which "stats" would match)
    op("GET", "/v2/models/stats", statistics, protocol="v2", tag=oip, name="v2_statistics",
       summary="Statistics of every model (Triton's statistics extension)", response_model=V2StatisticsResponse)
    for suffix, endpoint in (("", model_statistics), ("/versions/{version}", model_version_statistics)):
        op("GET", "/v2/models/{model}" + suffix + "/stats", endpoint, protocol="v2", tag=oip,
           name="v2_model_statistics" + ("_version" if suffix else ""),
           summary="Statistics of a model: requests, failures, queue and compute times",
           response_model=V2StatisticsResponse, errors={404: _error("Unknown model or version", "v2")})
    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{model}" + suffix
        vs = "_version" if suffix else ""
        op("GET", base, model_metadata, protocol="v2", tag=oip, name=f"v2_model_metadata{vs}",
           summary="Model metadata: inputs (x, parameters, cotangent) and outputs (spike, grad, fun, vjp)",
           response_model=V2ModelMetadata, errors={404: _error("Unknown model or version", "v2")})
        op("GET", base + "/ready", model_ready, protocol="v2", tag=oip, name=f"v2_model_ready{vs}",
           summary="Model readiness", response_model=V2ModelReady,
           errors={404: _error("Unknown model or version", "v2"), 503: _error("Warming up", "v2", retry=True)})

    # Triton's system shared-memory extension (off: every endpoint answers 400) --------------------
    def regions() -> Regions:
        if rt.shm is None:
            raise off_error()
        return rt.shm

    async def shm_status() -> list[dict[str, Any]]:
        return regions().status()

    async def shm_region_status(name: str) -> list[dict[str, Any]]:
        return regions().status(name)

    async def shm_register(name: str, body: Annotated[V2SharedMemoryRegister, Body()]) -> dict[str, Any]:
        regions().register(name, body.key, body.offset, body.byte_size)
        return {}

    async def shm_unregister() -> dict[str, Any]:
        regions().unregister()
        return {}

    async def shm_region_unregister(name: str) -> dict[str, Any]:
        regions().unregister(name)
        return {}

    shm_errors: dict[int | str, dict[str, Any]] = {
        400: _error("Shared memory is off (SURROGATE_SHARED_MEMORY), or a bad request: the message names the field",
                    "v2")}
    shm = "/v2/systemsharedmemory"
    op("GET", shm + "/status", shm_status, protocol="v2", tag=oip, name="v2_shm_status",
       summary="Every registered system shared-memory region", response_model=list[V2SharedMemoryRegion],
       errors=shm_errors)
    op("GET", shm + "/region/{name}/status", shm_region_status, protocol="v2", tag=oip, name="v2_shm_region_status",
       summary="One registered system shared-memory region", response_model=list[V2SharedMemoryRegion],
       errors={**shm_errors, 404: _error("No region of that name is registered", "v2")})
    op("POST", shm + "/region/{name}/register", shm_register, protocol="v2", tag=oip, name="v2_shm_register",
       summary="Register a POSIX shared-memory region (its bytes count against the memory budget)",
       response_model=dict[str, Any], strict_content_type=False,  # (tritonclient sends its JSON without a type)
       errors={**shm_errors, 503: _error("The memory budget is in use by requests in flight", "v2", retry=True)})
    op("POST", shm + "/region/{name}/unregister", shm_region_unregister, protocol="v2", tag=oip,
       name="v2_shm_region_unregister", summary="Unregister a system shared-memory region (unmapped once no "
       "request uses it)", response_model=dict[str, Any], errors=shm_errors)
    op("POST", shm + "/unregister", shm_unregister, protocol="v2", tag=oip, name="v2_shm_unregister",
       summary="Unregister every system shared-memory region", response_model=dict[str, Any], errors=shm_errors)

    # the Swagger UI, offline -----------------------------------------------------------------------
    def swagger_ui(request: Request) -> HTMLResponse:
        root = (s.root_path or request.scope.get("root_path") or "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json", title="surrogate-serve - Swagger UI",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        )

    def swagger_asset(file: str) -> Response:
        if file not in _ASSETS:
            raise ApiError(404, f"no asset {shown(file)}")
        ctype = mimetypes.guess_type(file)[0] or "application/octet-stream"
        return Response((_assets() / file).read_bytes(), media_type=ctype,
                        headers={"Cache-Control": "public, max-age=86400"})

    op("GET", "/docs", swagger_ui, protocol="v1", tag="docs", name="docs", summary="Swagger UI", auth_needed=False,
       include_in_schema=False, response_class=HTMLResponse)
    op("GET", "/docs/assets/{file}", swagger_asset, protocol="v1", tag="docs", name="docs_asset",
       summary="Swagger UI assets", auth_needed=False, include_in_schema=False, response_class=Response)
    r.routes[0:0] = compute


def _route_class(rt: Runtime, protocol: str) -> type[ServiceRoute]:
    class Route(ServiceRoute):
        def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
            super().__init__(path, endpoint, runtime=rt, protocol=protocol, **kwargs)

    return Route


_ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"})


def _assets() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


# -- what the contract says of the compute operations --------------------------------------------

V1_COMPUTE: dict[str, tuple[str, str]] = {
    "spike": (
        "Spikes: the Heaviside step of x",
        "1 where x >= 0 (also at x = 0 and x = -0.0), else 0, in the job's dtype. The body is one job "
        "or a list of jobs; a list is answered in order, computed in one fused device call per dtype.",
    ),
    "grad": (
        "Surrogate gradient g'(x), or the vector-Jacobian product c * g'(x)",
        "The surrogate gradient of the chosen surrogate with its parameters (braintools' names and "
        "defaults). With `cotangent` c the result is c * g'(x). Parameters and cotangent broadcast against x.",
    ),
    "fun": (
        "The smooth surrogate function g(x)",
        "braintools' `surrogate_fun`: the smooth function whose derivative is the surrogate gradient, "
        "for plotting. Gradient-only surrogates answer 422 (code `no_smooth_function`).",
    ),
}


def _v1_signature(req: Any, res: Any) -> Callable[..., Any]:
    example = req.model_config["json_schema_extra"]["examples"][0]

    body = Body(
        description="One job, or a non-empty list of jobs (answered in order), as JSON; or one job as a "
        "binary body: x as a .npy file (application/x-npy) with scalar fields in the query string, or an .npz "
        "archive (application/x-npz) of named arrays x, parameters and cotangent. Binary input may hold NaN "
        "and infinities (IEEE semantics); objects, structured dtypes and pickles are refused.",
        openapi_examples={
            "one_job": {"summary": "One job (x, and the surrogate's parameters)", "value": example},
            "list_of_jobs": {"summary": "A list of jobs, answered in order",
                             "value": [example, {"x": [[0.25, -1.5]]}]},
        },
    )

    def compute(body: Any) -> None:
        raise NotImplementedError  # documentation only: ComputeEndpoint answers

    # the annotation holds this call's models (a string annotation could not name them)
    compute.__annotations__ = {"body": Annotated[req | list[req], body], "return": None}
    return compute


def _v1_compute_extra(endpoint: str) -> dict[str, Any]:
    binary_note = (
        "Binary bodies only (application/x-npy or application/x-npz); a JSON body carries these "
        "fields in the job object and must have no query string."
    )
    params: list[dict[str, Any]] = [
        {"name": "surrogate", "in": "query", "required": False, "description": "The surrogate. " + binary_note,
         "schema": {"$ref": "#/components/schemas/SurrogateName"}},
        {"name": "dtype", "in": "query", "required": False,
         "description": "Computation dtype; default: the .npy array's own (float16, float32, float64). "
         "bfloat16 travels as float32 with dtype=bfloat16. " + binary_note,
         "schema": {"type": "string", "enum": list(core.DTYPES)}},
    ]
    names = sorted({p.name for sur in core.all_surrogates() for p in sur.params})
    if endpoint == "grad":
        names.append("cotangent")
    for name in names:
        params.append({
            "name": name, "in": "query", "required": False,
            "description": f"Scalar {name} (an array goes in an .npz member of that name). " + binary_note,
            "schema": {"type": "number"},
        })
    return {
        "parameters": params,
        "requestBody": {"content": {
            "application/x-npy": {"schema": {"type": "string", "format": "binary"},
                                  "example": "<x as written by numpy.save, e.g. float32 [-2, -0.5, 0, 0.5, 2]>"},
            "application/x-npz": {"schema": {"type": "string", "format": "binary"},
                                  "example": "<numpy.savez(f, x=..., alpha=np.array([[0.5], [1], [2], [4]]))>"},
        }},
        "responses": {"200": {
            "content": {"application/json": {"example": COMPUTE_MODELS[endpoint][1].model_config[
                            "json_schema_extra"]["examples"][0]},  # type: ignore[index]
                        "application/x-npy": {"schema": {"type": "string", "format": "binary"},
                                              "example": "<the result as a .npy file; bfloat16 results as float32>"}},
            "headers": {
                "X-Surrogate-Dtype": {"description": "On .npy answers: the computation dtype (bfloat16 travels as "
                                      "float32).", "schema": {"type": "string"}},
                "X-Surrogate-Name": {"description": "On .npy answers: the surrogate used.",
                                     "schema": {"type": "string"}},
            },
        }},
    }


def _v1_compute_errors() -> dict[int | str, dict[str, Any]]:
    return {
        400: _error("Malformed body: not JSON, or empty.", "v1"),
        406: _error("Accept: application/x-npy for a list of jobs (lists are answered in JSON).", "v1"),
        408: _error("The body did not arrive within the request time limit.", "v1"),
        413: _error("Body over the configured byte limit.", "v1"),
        415: _error("Unsupported Content-Type.", "v1"),
        422: _error("Invalid job: the message names the job index and field. Also a malformed, truncated, "
                    "object-dtype or oversized binary body (code invalid_binary, invalid_type or too_large).", "v1"),
        500: _error("Unexpected server error (logged; no details leak).", "v1"),
        503: _error("Overloaded (queue or concurrency limit), over the time limit, or the device ran out of "
                    "memory: retry after Retry-After seconds.", "v1", retry=True),
    }


V2_INFER_DESCRIPTION = (
    "The Open Inference Protocol's infer. Inputs: `x` (required), the surrogate's parameters by name (tensors that "
    "broadcast against x, or scalars in the request's `parameters`) and `cotangent`. Outputs: `spike`, `grad`, `fun` "
    "(where the surrogate has a smooth function) and `vjp` (cotangent * g'(x), needs `cotangent`); `outputs` selects, "
    "absent means every output the request can produce. Datatypes FP16, FP32, FP64, and BF16 as binary data; the "
    "outputs have x's datatype. Tensors travel as JSON `data` (flat or nested; written flat) or with the binary tensor "
    "data extension: the JSON header's length in `Inference-Header-Content-Length`, each binary input's size in "
    "`parameters.binary_data_size`, raw little-endian row-major bytes after the header; binary outputs are asked with "
    "`parameters.binary_data` on an output or `binary_data_output` on the request. Bodies may be gzip or deflate "
    "compressed (`Content-Encoding`); answers are compressed on `Accept-Encoding`."
)

_V2_INFER_EXTRA: dict[str, Any] = {
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "description": "Length of the JSON header when binary tensors follow it.", "schema": {"type": "integer"}},
    ],
    "requestBody": {"content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "example": "<JSON header, then raw little-endian tensors>"},
    }},
    "responses": {"200": {
        "description": "The outputs; with binary outputs, the JSON header (its length in "
        "Inference-Header-Content-Length) followed by the binary tensors.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {"Inference-Header-Content-Length": {"description": "On binary answers: the JSON header's "
                                                        "length.", "schema": {"type": "integer"}}},
    }},
}


def _v2_infer_errors() -> dict[int | str, dict[str, Any]]:
    return {
        400: _error("Invalid request: the message names the input, output or parameter.", "v2"),
        404: _error("Unknown model or version.", "v2"),
        408: _error("The body did not arrive within the request time limit.", "v2"),
        413: _error("Body (or inflated body) over the configured byte limit.", "v2"),
        415: _error("Unsupported Content-Encoding.", "v2"),
        500: _error("Unexpected server error (logged; no details leak).", "v2"),
        503: _error("Overloaded, over the time limit, or out of device memory: retry after Retry-After seconds.",
                    "v2", retry=True),
    }


def _v2_signature(versioned: bool) -> Callable[..., Any]:
    if versioned:
        def infer_version(model: str, version: str,
                          body: Annotated[V2InferRequest, Body()]) -> None:
            raise NotImplementedError  # documentation only: ComputeEndpoint answers

        return infer_version

    def infer(model: str, body: Annotated[V2InferRequest, Body()]) -> None:
        raise NotImplementedError  # documentation only: ComputeEndpoint answers

    return infer

