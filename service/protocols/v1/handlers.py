"""The ``/v1`` dialect: JSON and ``.npy``/``.npz`` bodies into core jobs, results into JSON or
``.npy``, errors into ``{"error": {status, code, message, job, field}}``. Plus the metadata, health
and metrics endpoints. No math and no limits here: those are the data plane's."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import surrogate_core as core

from ... import __version__
from ...asgi import Call, Response, json_response
from ...binary import NPY, NPZ, npy_parts
from ...dataplane import OFFLOAD_BYTES, check_finite, json_parse_bytes, off_loop_if
from ...errors import ApiError, error_json
from ...jsonout import PIECE, result_pieces
from ...state import Runtime
from . import fastjson
from .codecs import (
    accepts_npy,
    encode_json,
    for_json,
    has_literals,
    job_from_binary,
    jobs_from_json,
    media_type,
    parse_json,
    result_dict,
)

__all__ = ["compute", "healthz", "info", "metrics", "readyz", "render_error", "surrogate", "surrogates"]

JSON = "application/json"
_MEDIA = (JSON, NPY, NPZ)
_NPY = NPY.encode()

def render_error(err: ApiError) -> Response:
    headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    return json_response(error_json(err), err.status, headers)


def compute(endpoint: str):
    """The handler of ``POST /v1/{endpoint}``."""

    def decode(mt: str, body: bytes, query: list[tuple[str, str]], s: Any) -> tuple[list[core.Job], bool]:
        if mt == JSON:
            careful = has_literals(body)
            fast = None if careful else fastjson.decode(body, max_rank=s.max_rank)
            docs, single = fast if fast is not None else parse_json(body)
            jobs = jobs_from_json(
                docs, endpoint, careful=careful, max_rank=s.max_rank, max_elements=s.max_elements, max_jobs=s.max_jobs
            )
            return jobs, single
        return [job_from_binary(endpoint, mt, body, query, max_rank=s.max_rank, max_elements=s.max_elements)], True

    def encode(jobs: list[core.Job], results: list[Any], single: bool) -> Response:
        hint = f"ask for 'Accept: {NPY}'"
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            check_finite(job, res, text=True, where=f"job {i}", job_index=i, hint=hint)
        if not any(_large(r) for r in results):
            out = [result_dict(endpoint, job.surrogate, job.dtype, res) for job, res in zip(jobs, results, strict=True)]
            return json_response(encode_json(out[0] if single else out))
        pieces: list[bytes] = [] if single else [b"["]
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            if i:
                pieces.append(b",")
            fields = {"surrogate": job.surrogate, "dtype": job.dtype, "shape": list(res.shape)}
            pieces += result_pieces(fields, endpoint, for_json(res))
        if not single:
            pieces.append(b"]")
        return Response(200, b"application/json", pieces)

    async def handler(call: Call, rt: Runtime) -> Response:
        s = rt.settings
        dp = rt.dataplane
        mt = media_type(call.header(b"content-type"), _MEDIA)
        want_npy = accepts_npy(call.header(b"accept"))
        query = call.query
        if mt == JSON and query:
            key = query[0][0]
            raise ApiError(
                422,
                f"query parameter {key!r}: the query string is for binary bodies; put fields in the JSON job",
                field=key,
                code="unknown_field",
            )
        body = await call.body(s.max_body_bytes, into_buffer=mt != JSON)
        ticket = call.ticket
        parsed = len(body) + (json_parse_bytes(body) if mt == JSON else 0)
        if ticket is not None:
            ticket.require(parsed, f"decoding a {len(body)}-byte body")
        jobs, single = await off_loop_if(len(body) > OFFLOAD_BYTES, decode, mt, body, query, s)
        if want_npy and not single:
            raise ApiError(406, f"a list of jobs is answered in JSON only; drop 'Accept: {NPY}' or send one job")
        dp.admit_jobs(jobs, ticket, parsed, text=not want_npy, where=_job_where)
        results = await dp.infer(jobs, endpoint)
        if want_npy:
            job, res = jobs[0], results[0]
            check_finite(job, res, text=False, where="job 0", job_index=0, hint="")
            return Response(200, _NPY, npy_parts(res),
                            [(b"x-surrogate-dtype", job.dtype.encode()), (b"x-surrogate-name", job.surrogate.encode())])
        return await off_loop_if(sum(j.size for j in jobs) > s.offload_elements, encode, jobs, results, single)

    handler.__name__ = endpoint
    return handler


def _job_where(i: int) -> str:
    return f"job {i}"


def _large(a: Any) -> bool:
    """Whether an answer is written in pieces: many elements, or many (nested) empty lists."""
    if a.size:
        return a.size > PIECE
    shape = a.shape
    return a.ndim > 1 and math.prod(shape[: shape.index(0)]) > 1024


async def surrogates(call: Call, rt: Runtime) -> Response:
    return json_response(
        encode_json({"default": core.DEFAULT_SURROGATE, "surrogates": [s.describe() for s in core.all_surrogates()]})
    )


async def surrogate(call: Call, rt: Runtime) -> Response:
    try:
        return json_response(encode_json(core.get(call.params["name"]).describe()))
    except KeyError as exc:
        raise ApiError(404, exc.args[0], code="unknown_surrogate", field="name") from None


async def info(call: Call, rt: Runtime) -> Response:
    dev = core.device_info()
    s = rt.settings
    return json_response(encode_json({
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
            "max_concurrent": s.max_concurrent,
            "max_queue": s.max_queue,
            "max_variants": s.max_variants,
        },
        "memory": {
            "budget": rt.dataplane.budget.capacity,
            "source": rt.dataplane.budget_source,
            "in_use": rt.dataplane.budget.in_use,
            "peak": rt.dataplane.budget.peak,
        },
        "root_path": s.root_path,
        "compilations": rt.engine.stats.compilations,
        "variants": rt.engine.variants(),
    }))


_OK = encode_json({"status": "ok"})
_READY = encode_json({"status": "ready"})
_WARMING = encode_json({"status": "warming_up"})


async def healthz(call: Call, rt: Runtime) -> Response:
    return json_response(_OK)


async def readyz(call: Call, rt: Runtime) -> Response:
    if rt.ready.is_set():
        return json_response(_READY)
    return json_response(_WARMING, 503, [(b"retry-after", b"1")])


async def metrics(call: Call, rt: Runtime) -> Response:
    return Response(200, CONTENT_TYPE_LATEST.encode(), (generate_latest(rt.metrics.registry),))
