"""The HTTP endpoints: compute (/v1/spike, /v1/grad, /v1/fun), metadata, health. No math here."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

import surrogate_core as core

from . import __version__, fastjson
from .binary import NPY, NPZ, BytesResponse, NpyResponse
from .codecs import (
    accepts_npy,
    all_finite,
    job_from_binary,
    overflowed,
    check_media_type,
    encode_json,
    has_literals,
    jobs_from_json,
    parse_json,
    read_body,
    result_dict,
)
from .batching import DeviceError, Overloaded
from .errors import ApiError
from .schemas import Health, Info, Readiness, SurrogateInfo, SurrogateList
from .security import require_token
from .state import Runtime

__all__ = ["compute_router", "health_router", "meta_router", "metrics_router"]


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

AUTH = [Depends(require_token)]
compute_router = APIRouter(prefix="/v1", tags=["compute"], dependencies=AUTH)
meta_router = APIRouter(prefix="/v1", tags=["metadata"], dependencies=AUTH)
health_router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metadata"], dependencies=AUTH)

JSON = "application/json"


async def compute(endpoint: str, request: Request, rt: Runtime) -> Response:
    """Answer one compute request (called by the middleware's fast path and by the routes)."""
    s = rt.settings
    media_type = check_media_type(request, (JSON, NPY, NPZ))
    want_npy = accepts_npy(request.headers.get("accept"))
    body = await read_body(request, s.max_body_bytes)
    request.state.body_done = True
    if media_type == JSON:
        if request.query_params:
            key = next(iter(request.query_params))
            raise ApiError(
                422,
                f"query parameter {key!r}: the query string is for binary bodies; put fields in the JSON job",
                field=key,
                code="unknown_field",
            )
        careful = has_literals(body)
        fast = None if careful else fastjson.decode(body, max_rank=s.max_rank)
        docs, single = fast if fast is not None else parse_json(body)
        jobs = jobs_from_json(
            docs,
            endpoint,
            careful=careful,
            max_rank=s.max_rank,
            max_elements=s.max_elements,
            max_jobs=s.max_jobs,
        )
    else:
        single = True
        jobs = [
            job_from_binary(
                endpoint, media_type, body, request.query_params, max_rank=s.max_rank, max_elements=s.max_elements
            )
        ]
    if want_npy and not single:
        raise ApiError(406, f"a list of jobs is answered in JSON only; drop 'Accept: {NPY}' or send one job")
    try:
        results = await rt.batcher.submit(jobs)
    except Overloaded as exc:
        rt.metrics.rejections.labels("queue").inc()
        raise ApiError(503, f"overloaded: {exc}; retry shortly", code="overloaded", headers={"Retry-After": "1"}) from None
    except DeviceError as exc:
        rt.metrics.device_failures.inc()
        if exc.resource_exhausted:
            raise ApiError(
                503, "the device ran out of memory for this batch; retry, or send smaller requests",
                code="device_out_of_memory", headers={"Retry-After": "1"},
            ) from None
        raise ApiError(500, "the computation failed for this batch; the server log has the details",
                       code="device_error") from None
    rt.metrics.count_elements(endpoint, sum(j.size for j in jobs))
    if want_npy:
        job, res = jobs[0], results[0]
        if overflowed(job, res):
            raise _overflow(0, job)
        return NpyResponse(res, {"X-Surrogate-Dtype": job.dtype, "X-Surrogate-Name": job.surrogate})  # type: ignore[return-value]
    out: list[dict[str, Any]] = []
    for i, (job, res) in enumerate(zip(jobs, results)):
        if not all_finite(res):
            if overflowed(job, res):
                raise _overflow(i, job)
            raise ApiError(
                422,
                f"job {i}: the result holds NaN or infinity (from NaN/inf in the input), which JSON cannot carry; "
                f"ask for 'Accept: {NPY}'",
                job=i,
                field="x",
                code="not_representable",
            )
        out.append(result_dict(endpoint, job.surrogate, job.dtype, res))
    return BytesResponse(encode_json(out[0] if single else out), JSON)  # type: ignore[return-value]


def _overflow(i: int, job: core.Job) -> ApiError:
    return ApiError(
        422,
        f"job {i}: the result is not finite in {job.dtype} (overflow for these values); "
        "use a wider dtype or smaller values",
        job=i,
        field="dtype",
        code="not_representable",
    )


#: The compute endpoints: name -> (summary, description). Declared here for the contract; requests
#: are answered by the middleware's fast path with the same handler, ``compute``.
COMPUTE_ENDPOINTS = {
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


def _compute_route(endpoint: str):
    async def route(request: Request, rt: RuntimeDep) -> Response:
        return await compute(endpoint, request, rt)

    route.__name__ = endpoint
    return route


for _name, (_summary, _description) in COMPUTE_ENDPOINTS.items():
    compute_router.add_api_route(
        f"/{_name}", _compute_route(_name), methods=["POST"], summary=_summary, description=_description,
        operation_id=_name,
    )


@meta_router.get("/surrogates", response_model=SurrogateList, summary="All surrogates with their parameters")
async def surrogates() -> dict[str, Any]:
    return {"default": core.DEFAULT_SURROGATE, "surrogates": [s.describe() for s in core.all_surrogates()]}


@meta_router.get(
    "/surrogates/{name}",
    response_model=SurrogateInfo,
    summary="One surrogate with its parameters",
    responses={404: {"description": "Unknown surrogate"}},
)
async def surrogate(name: str) -> dict[str, Any]:
    try:
        return core.get(name).describe()
    except KeyError as exc:
        raise ApiError(404, exc.args[0], code="unknown_surrogate", field="name") from None


@meta_router.get("/info", response_model=Info, summary="Version, device and limits")
async def info(rt: RuntimeDep) -> dict[str, Any]:
    dev = core.device_info()
    s = rt.settings
    return {
        "name": "surrogate-serve",
        "version": __version__,
        "jax_version": dev["jax_version"],
        "device": {k: v for k, v in dev.items() if k != "jax_version"},
        "ready": rt.ready.is_set(),
        "default_surrogate": core.DEFAULT_SURROGATE,
        "dtypes": list(core.DTYPES),
        "limits": {
            "max_body_bytes": s.max_body_bytes,
            "max_elements": s.max_elements,
            "max_rank": s.max_rank,
            "max_jobs": s.max_jobs,
        },
        "compilations": rt.engine.stats.compilations,
        "variants": rt.engine.variants(),
    }


@health_router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: 200 once the warm-up compilation is done, 503 before",
    responses={503: {"model": Readiness, "description": "Still warming up (Retry-After says when to ask again)"}},
)
async def readyz(rt: RuntimeDep) -> Response:
    if rt.ready.is_set():
        return Response(encode_json({"status": "ready"}), media_type=JSON)
    return Response(
        encode_json({"status": "warming_up"}), status_code=503, media_type=JSON, headers={"Retry-After": "1"}
    )


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
)
async def metrics(rt: RuntimeDep) -> Response:
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
