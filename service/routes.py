"""The route table: every endpoint once. Dispatch, limits, auth, metric labels, error shapes and
the contract (``openapi.yaml``) all come from it.

An ``Endpoint`` names its method and path template, its handler (``async (Call, Runtime) ->
Response``), the protocol whose error shape it answers in, whether it needs the bearer token and
whether it is a compute endpoint (admitted by the data plane: concurrency and time limits). The
``Router`` matches a path by one dictionary lookup for fixed paths and by segments for templates;
no regular expressions and no per-request objects beyond the match.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .asgi import Call, Response
from .state import Runtime

__all__ = ["Endpoint", "Router", "table"]

Handler = Callable[[Call, Runtime], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    protocol: str  # "v1" or "v2": the error shape; also the metrics' protocol label
    name: str  # the operationId in the contract
    tag: str
    summary: str
    description: str = ""
    auth: bool = True
    compute: bool = False
    doc: dict[str, Any] = field(default_factory=dict)  # the rest of the OpenAPI operation
    in_schema: bool = True


class Router:
    """Path -> (endpoints by method, path parameters)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.fixed: dict[str, dict[str, Endpoint]] = {}
        self.templates: dict[int, list[tuple[tuple[str, ...], dict[str, Endpoint]]]] = {}
        for ep in endpoints:
            if "{" not in ep.path:
                methods = self.fixed.setdefault(ep.path, {})
            else:
                segs = tuple(ep.path.split("/"))
                bucket = self.templates.setdefault(len(segs), [])
                for t, m in bucket:
                    if t == segs:
                        methods = m
                        break
                else:
                    methods = {}
                    bucket.append((segs, methods))
            if ep.method in methods:
                raise ValueError(f"{ep.method} {ep.path} is declared twice")
            methods[ep.method] = ep

    def match(self, path: str) -> tuple[dict[str, Endpoint], dict[str, str]] | None:
        methods = self.fixed.get(path)
        if methods is not None:
            return methods, {}
        segs = path.split("/")
        for template, methods in self.templates.get(len(segs), ()):
            params: dict[str, str] = {}
            for t, s in zip(template, segs, strict=True):
                if t.startswith("{"):
                    if not s:
                        break
                    params[t[1:-1]] = s
                elif t != s:
                    break
            else:
                return methods, params
        return None


def table() -> list[Endpoint]:
    """Every endpoint of the service."""
    from . import docs
    from .protocols.v1 import handlers as v1
    from .protocols.v2 import handlers as v2

    eps: list[Endpoint] = []
    for name, (summary, description) in v1_compute_docs().items():
        eps.append(Endpoint("POST", f"/v1/{name}", v1.compute(name), "v1", name, "compute", summary, description,
                            compute=True))
    eps += [
        Endpoint("GET", "/v1/surrogates", v1.surrogates, "v1", "surrogates", "metadata",
                 "All surrogates with their parameters", doc={"model": "SurrogateList"}),
        Endpoint("GET", "/v1/surrogates/{name}", v1.surrogate, "v1", "surrogate", "metadata",
                 "One surrogate with its parameters", doc={"model": "SurrogateInfo", "404": "Unknown surrogate"}),
        Endpoint("GET", "/v1/info", v1.info, "v1", "info", "metadata", "Version, device and limits",
                 doc={"model": "Info"}),
        Endpoint("GET", "/healthz", v1.healthz, "v1", "healthz", "health", "Liveness: the process answers",
                 auth=False, doc={"model": "Health"}),
        Endpoint("GET", "/readyz", v1.readyz, "v1", "readyz", "health",
                 "Readiness: 200 once the warm-up compilation is done, 503 before", auth=False,
                 doc={"model": "Readiness", "503": "Still warming up (Retry-After says when to ask again)"}),
        Endpoint("GET", "/metrics", v1.metrics, "v1", "metrics", "metadata", "Prometheus metrics",
                 doc={"text": "Prometheus text format"}),
        # The Open Inference Protocol
        Endpoint("GET", "/v2", v2.server_metadata, "v2", "v2_server_metadata", "open inference protocol",
                 "Server metadata: name, version, extensions", doc={"model": "V2ServerMetadata"}),
        Endpoint("GET", "/v2/health/live", v2.health_live, "v2", "v2_health_live", "open inference protocol",
                 "Liveness", auth=False, doc={"model": "V2Live"}),
        Endpoint("GET", "/v2/health/ready", v2.health_ready, "v2", "v2_health_ready", "open inference protocol",
                 "Readiness (503 while warming up)", auth=False, doc={"model": "V2Ready", "503": "Warming up"}),
        Endpoint("POST", "/v2/repository/index", v2.repository_index, "v2", "v2_repository_index",
                 "open inference protocol", "Every model (surrogate) and its state",
                 doc={"model": "V2RepositoryIndex", "body": "V2RepositoryIndexRequest", "400": "Malformed body"}),
    ]
    for suffix, version in (("", None), ("/versions/{version}", "version")):
        base = "/v2/models/{model}" + suffix
        vs = "_version" if version else ""
        eps += [
            Endpoint("GET", base, v2.model_metadata, "v2", f"v2_model_metadata{vs}", "open inference protocol",
                     "Model metadata: inputs (x, parameters, cotangent) and outputs (spike, grad, fun, vjp)",
                     doc={"model": "V2ModelMetadata", "404": "Unknown model or version"}),
            Endpoint("GET", base + "/ready", v2.model_ready, "v2", f"v2_model_ready{vs}", "open inference protocol",
                     "Model readiness", doc={"model": "V2ModelReady", "404": "Unknown model or version",
                                             "503": "Warming up"}),
            Endpoint("POST", base + "/infer", v2.infer, "v2", f"v2_infer{vs}", "open inference protocol",
                     "Inference: spike, grad, fun and vjp of x, as JSON tensors or binary tensor data",
                     V2_INFER_DESCRIPTION, compute=True, doc={"infer": True}),
        ]
    eps += [
        Endpoint("GET", "/openapi.json", docs.openapi_json, "v1", "openapi", "docs", "The contract", auth=False,
                 in_schema=False),
        Endpoint("GET", "/docs", docs.swagger_ui, "v1", "docs", "docs", "Swagger UI", auth=False, in_schema=False),
        Endpoint("GET", "/docs/assets/{file}", docs.swagger_asset, "v1", "docs_asset", "docs", "Swagger UI assets",
                 auth=False, in_schema=False),
    ]
    return eps


def v1_compute_docs() -> dict[str, tuple[str, str]]:
    return {
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
