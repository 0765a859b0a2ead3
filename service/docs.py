"""The contract (``/openapi.json``, checked in as ``openapi.yaml``), built from the route table, and
the Swagger UI at ``/docs``, served from the ``swagger-ui-bundle`` package so it works without
internet access."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

import orjson
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic.json_schema import models_json_schema

import surrogate_core as core

from . import __version__
from .asgi import Call, Response, json_response
from .errors import ApiError
from .schemas import (
    COMPUTE_MODELS,
    V2_MODELS,
    ErrorResponse,
    Health,
    Info,
    Readiness,
    SurrogateInfo,
    SurrogateList,
    V2RepositoryModel,
)
from .settings import Settings
from .state import Runtime

__all__ = ["build_openapi", "openapi_json", "swagger_asset", "swagger_ui"]

DESCRIPTION = """\
Spikes and surrogate gradients of spiking neural networks, over HTTP, with the semantics of
`braintools.surrogate`. The spike is the Heaviside step H(x) = 1 where x >= 0, else 0; its
surrogate gradient g'(x) replaces the true derivative in a backward pass.

Two protocols over one data plane: `/v1`, whose compute endpoints take one job object or a list of
job objects (every error has the body `{"error": {"status", "code", "message", "job", "field"}}`),
and `/v2`, the Open Inference Protocol (KServe v2 / Triton HTTP) with the binary tensor data
extension, where each surrogate is a model (errors: `{"error": "<message>"}`).
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"application/json": content}


def _error(description: str, protocol: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("ErrorResponse" if protocol == "v1" else "V2Error"))}


_RETRY = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}


def build_openapi(endpoints: list[Any], settings: Settings) -> dict[str, Any]:
    models: list[Any] = [m for req, res, _ in COMPUTE_MODELS.values() for m in (req, res)]
    models += [ErrorResponse, SurrogateList, SurrogateInfo, Info, Health, Readiness, V2RepositoryModel]
    models += V2_MODELS.values()
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = dict(sorted(defs.get("$defs", {}).items()))
    schemas["V2RepositoryIndex"] = {"type": "array", "items": _ref("V2RepositoryModel"), "title": "V2RepositoryIndex"}
    paths: dict[str, Any] = {}
    for ep in endpoints:
        if not ep.in_schema:
            continue
        op: dict[str, Any] = {"tags": [ep.tag], "summary": ep.summary, "operationId": ep.name}
        if ep.description:
            op["description"] = ep.description
        params = [
            {"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ep.path.split("/") if p.startswith("{")
        ]
        if ep.compute and ep.protocol == "v1":
            _v1_compute(op, ep.name)
        elif ep.doc.get("infer"):
            _v2_infer(op)
        else:
            responses: dict[str, Any] = {}
            if "model" in ep.doc:
                responses["200"] = {"description": "OK", "content": _json(_ref(ep.doc["model"]))}
            elif "text" in ep.doc:
                text = {"text/plain": {"schema": {"type": "string"}}}
                responses["200"] = {"description": ep.doc["text"], "content": text}
            for code in ("400", "404", "503"):
                if code in ep.doc:
                    responses[code] = _error(ep.doc[code], ep.protocol)
                    if code == "503":
                        responses[code]["headers"] = _RETRY
            if "body" in ep.doc:
                op["requestBody"] = {"required": False, "content": _json(_ref(ep.doc["body"]))}
            op["responses"] = responses
        if params:
            op["parameters"] = params + op.get("parameters", [])
        if ep.auth:
            op["security"] = [{"bearerAuth": []}]
            op["responses"]["401"] = _error(
                "Missing or wrong bearer token (only when the server has a token configured).", ep.protocol
            )
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "surrogate-serve",
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
            "version": __version__,
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed only when the server is configured with SURROGATE_API_TOKEN or "
                    "SURROGATE_API_TOKEN_FILE.",
                }
            },
        },
    }
    if settings.root_path:
        doc["servers"] = [{"url": settings.root_path}]
    return doc


def _v1_compute(op: dict[str, Any], endpoint: str) -> None:
    req, res, _ = COMPUTE_MODELS[endpoint]
    example_job = req.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    example_res = res.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    binary_note = (
        "Binary bodies only (application/x-npy or application/x-npz); a JSON body carries these "
        "fields in the job object and must have no query string."
    )
    params: list[dict[str, Any]] = [
        {"name": "surrogate", "in": "query", "required": False, "description": "The surrogate. " + binary_note,
         "schema": _ref("SurrogateName")},
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
    op["parameters"] = params
    op["requestBody"] = {
        "required": True,
        "description": "One job, or a non-empty list of jobs (answered in order), as JSON; or one job as a "
        "binary body: x as a .npy file (application/x-npy) with scalar fields in the query string, or an .npz "
        "archive (application/x-npz) of named arrays x, parameters and cotangent. Binary input may hold NaN "
        "and infinities (IEEE semantics); objects, structured dtypes and pickles are refused.",
        "content": {
            "application/x-npy": {"schema": {"type": "string", "format": "binary"},
                                  "example": "<x as written by numpy.save, e.g. float32 [-2, -0.5, 0, 0.5, 2]>"},
            "application/x-npz": {"schema": {"type": "string", "format": "binary"},
                                  "example": "<numpy.savez(f, x=..., alpha=np.array([[0.5], [1], [2], [4]]))>"},
            "application/json": {
                "schema": {
                    "oneOf": [_ref(req.__name__), {"type": "array", "minItems": 1, "items": _ref(req.__name__)}]
                },
                "examples": {
                    "seed": {"summary": "The seed's example", "value": example_job},
                    "batch": {"summary": "A list of jobs", "value": [example_job, {"x": [[0.25, -1.5]]}]},
                },
            },
        },
    }
    op["responses"] = {
        "200": {
            "description": "The result (a list of results, in order, for a list of jobs); a .npy file "
            "when the request has Accept: application/x-npy.",
            "content": {
                "application/json": {
                    "schema": {"oneOf": [_ref(res.__name__), {"type": "array", "items": _ref(res.__name__)}]},
                    "example": example_res,
                },
                "application/x-npy": {"schema": {"type": "string", "format": "binary"},
                                      "example": "<the result as a .npy file; bfloat16 results as float32>"},
            },
            "headers": {
                "X-Surrogate-Dtype": {"description": "On .npy answers: the computation dtype (bfloat16 travels as "
                                      "float32).", "schema": {"type": "string"}},
                "X-Surrogate-Name": {
                    "description": "On .npy answers: the surrogate used.", "schema": {"type": "string"}
                },
            },
        },
        "400": _error("Malformed body: not JSON, or empty.", "v1"),
        "406": _error("Accept: application/x-npy for a list of jobs (lists are answered in JSON).", "v1"),
        "408": _error("The body did not arrive within the request time limit.", "v1"),
        "413": _error("Body over the configured byte limit.", "v1"),
        "415": _error("Unsupported Content-Type.", "v1"),
        "422": _error(
            "Invalid job: the message names the job index and field. Also a malformed, truncated, "
            "object-dtype or oversized binary body (code invalid_binary, invalid_type or too_large).", "v1"),
        "500": _error("Unexpected server error (logged; no details leak).", "v1"),
        "503": {
            "description": "Overloaded (queue or concurrency limit), over the time limit, or the device "
            "ran out of memory: retry after Retry-After seconds.",
            "headers": _RETRY,
            "content": _json(_ref("ErrorResponse")),
        },
    }


def _v2_infer(op: dict[str, Any]) -> None:
    op["requestBody"] = {
        "required": True,
        "description": "An inference request as JSON; with the binary tensor data extension, the JSON header "
        "(its length in Inference-Header-Content-Length) followed by the binary tensors.",
        "content": {
            "application/json": {"schema": _ref("V2InferRequest")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "example": "<JSON header, then raw little-endian tensors>"},
        },
    }
    op["parameters"] = [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "description": "Length of the JSON header when binary tensors follow it.", "schema": {"type": "integer"}},
    ]
    op["responses"] = {
        "200": {
            "description": "The outputs; with binary outputs, the JSON header (its length in "
            "Inference-Header-Content-Length) followed by the binary tensors.",
            "content": {
                "application/json": {"schema": _ref("V2InferResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "headers": {"Inference-Header-Content-Length": {"description": "On binary answers: the JSON header's "
                                                            "length.", "schema": {"type": "integer"}}},
        },
        "400": _error("Invalid request: the message names the input, output or parameter.", "v2"),
        "404": _error("Unknown model or version.", "v2"),
        "408": _error("The body did not arrive within the request time limit.", "v2"),
        "413": _error("Body (or inflated body) over the configured byte limit.", "v2"),
        "415": _error("Unsupported Content-Encoding.", "v2"),
        "500": _error("Unexpected server error (logged; no details leak).", "v2"),
        "503": {"description": "Overloaded, over the time limit, or out of device memory: retry after Retry-After "
                "seconds.", "headers": _RETRY, "content": _json(_ref("V2Error"))},
    }


# -- handlers ---------------------------------------------------------------------------------

async def openapi_json(call: Call, rt: Runtime) -> Response:
    doc = rt.contract()
    root = (call.scope.get("root_path") or "").rstrip("/")
    if root and "servers" not in doc:  # started with uvicorn --root-path rather than SURROGATE_ROOT_PATH
        doc = {**doc, "servers": [{"url": root}]}
    return json_response(orjson.dumps(doc))


def _assets() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


async def swagger_ui(call: Call, rt: Runtime) -> Response:
    root = (rt.settings.root_path or call.scope.get("root_path") or "").rstrip("/")
    html = get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="surrogate-serve - Swagger UI",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
    )
    return Response(200, b"text/html; charset=utf-8", (bytes(html.body),))


_ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"})


async def swagger_asset(call: Call, rt: Runtime) -> Response:
    name = call.params["file"]
    if name not in _ASSETS:
        raise ApiError(404, f"no asset {name!r}")
    path = _assets() / name
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(200, ctype.encode(), (path.read_bytes(),), [(b"cache-control", b"public, max-age=86400")])
