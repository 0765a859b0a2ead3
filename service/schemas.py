"""Pydantic models: the request and response shapes of the contract (``openapi.yaml``).

The job models are built from the surrogate registry, so a new surrogate or parameter shows up in
the contract without touching this file. The compute routes decode bodies with the codecs in
``protocols/v1/codec.py`` and ``protocols/v2/codec.py`` (which enforce exactly these shapes, with
messages that name the job and field); the models here document them (FastAPI builds the contract
from them) and serialise the metadata responses.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model
from typing_extensions import TypeAliasType

import surrogate_core as core

__all__ = [
    "NumArray",
    "SpikeJob",
    "GradJob",
    "FunJob",
    "SpikeResult",
    "GradResult",
    "FunResult",
    "ErrorBody",
    "ErrorResponse",
    "ParameterInfo",
    "SurrogateInfo",
    "SurrogateList",
    "Info",
    "Health",
    "Readiness",
    "COMPUTE_MODELS",
    "V2_MODELS",
]

NumArray = TypeAliasType("NumArray", float | list["NumArray"])  # type: ignore[misc]

DTypeName = Literal["float32", "float64", "float16", "bfloat16"]
assert set(DTypeName.__args__) == set(core.DTYPES)  # type: ignore[attr-defined]

#: The registered surrogate names (an enum in the contract, built from the registry).
SurrogateName = enum.Enum("SurrogateName", {n: n for n in core.names()}, type=str)  # type: ignore[misc]

SEED_X: list[Any] = [-2.0, -0.5, 0.0, 0.5, 2.0]


def _param_fields() -> dict[str, Any]:
    users: dict[str, list[str]] = {}
    for s in core.all_surrogates():
        for p in s.params:
            users.setdefault(p.name, []).append(f"{s.name} (default {p.default}, {p.constraint.text}): {p.description}")
    fields: dict[str, Any] = {}
    for name in sorted(users):
        fields[name] = (
            NumArray | None,
            Field(
                None,
                description=(
                    "Surrogate parameter, named as in braintools; a number or a nested list that "
                    "broadcasts against x (NumPy rules). Used by: " + "; ".join(users[name])
                ),
            ),
        )
    return fields


def _job_model(name: str, doc: str, *, cotangent: bool, example: dict[str, Any]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        "x": (
            NumArray,
            Field(description="Membrane potential: a number or a rectangular nested list of numbers (rank <= 8)."),
        ),
        "surrogate": (
            SurrogateName,
            Field(
                SurrogateName(core.DEFAULT_SURROGATE),
                description="The surrogate function, as listed by GET /v1/surrogates.",
            ),
        ),
        "dtype": (
            DTypeName,
            Field(core.DEFAULT_DTYPE, description="Floating-point type of the computation and of the result."),
        ),
    }
    fields.update(_param_fields())
    if cotangent:
        fields["cotangent"] = (
            NumArray | None,
            Field(
                None,
                description="Optional cotangent c, broadcasting like a parameter: the result is then c * g'(x), "
                "the vector-Jacobian product a backward pass needs.",
            ),
        )
    return create_model(
        name,
        __doc__=doc,
        __config__=ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [example]}),
        **fields,
    )


SpikeJob = _job_model(
    "SpikeJob",
    "One spike job: x and, optionally, the surrogate, its parameters and the dtype. Parameters are "
    "validated and broadcast into the result's shape but do not change the spikes.",
    cotangent=False,
    example={"x": SEED_X},
)
GradJob = _job_model(
    "GradJob",
    "One surrogate-gradient job: g'(x) with the surrogate's parameters, or c * g'(x) with a cotangent.",
    cotangent=True,
    example={"x": SEED_X, "alpha": 1.0},
)
FunJob = _job_model(
    "FunJob",
    "One smooth-function job: the smooth surrogate g(x) (braintools' surrogate_fun), for plotting.",
    cotangent=False,
    example={"x": SEED_X, "alpha": 1.0},
)


def _result_model(name: str, key: str, doc: str, example: list[Any]) -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload]
        name,
        __doc__=doc,
        __config__=ConfigDict(
            json_schema_extra={
                "examples": [{"surrogate": core.DEFAULT_SURROGATE, "dtype": "float32", "shape": [5], key: example}]
            }
        ),
        surrogate=(str, Field(description="The surrogate used.")),
        dtype=(DTypeName, Field(description="dtype of the computation; JSON numbers are its exact values.")),
        shape=(list[int], Field(description="Shape of the result: x broadcast with the parameters (and cotangent).")),
        **{key: (NumArray, Field(description=f"The {key} values, nested to `shape`."))},
    )


SpikeResult = _result_model("SpikeResult", "spike", "Spikes: 1 where x >= 0, else 0.", [0.0, 0.0, 1.0, 1.0, 1.0])
GradResult = _result_model("GradResult", "grad", "Surrogate gradient g'(x) (or c * g'(x)).", [0.0, 0.5, 1.0, 0.5, 0.0])
FunResult = _result_model("FunResult", "fun", "Smooth surrogate function g(x).", [0.0, 0.125, 0.5, 0.875, 1.0])

#: endpoint name -> (request model, response model, response key)
COMPUTE_MODELS: dict[str, tuple[type[BaseModel], type[BaseModel], str]] = {
    "spike": (SpikeJob, SpikeResult, "spike"),
    "grad": (GradJob, GradResult, "grad"),
    "fun": (FunJob, FunResult, "fun"),
}


class ErrorBody(BaseModel):
    status: int = Field(description="The HTTP status, repeated.")
    code: str = Field(description="Machine-readable error code, e.g. invalid_value, unknown_field, body_too_large.")
    message: str = Field(description="What is wrong, naming the job and field.")
    job: int | None = Field(description="Index of the offending job (0 for a single-job body), if any.")
    field: str | None = Field(description="The offending field (x, alpha, dtype, ...), if any.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx response has this body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "status": 422,
                        "code": "invalid_value",
                        "message": "job 0, field 'alpha': must be finite and > 0, got -1.0",
                        "job": 0,
                        "field": "alpha",
                    }
                }
            ]
        }
    )
    error: ErrorBody


class ParameterInfo(BaseModel):
    name: str
    type: Literal["number", "integer"] = Field(description="integer for whole-number parameters (e.g. n).")
    default: int | float
    constraint: str
    description: str


class SurrogateInfo(BaseModel):
    name: str = Field(description="The name to pass as `surrogate`.")
    braintools: str = Field(description="The braintools class it follows.")
    description: str
    parameters: list[ParameterInfo]
    grad_formula: str
    has_fun: bool = Field(description="Whether /v1/fun serves its smooth function (false: gradient-only).")
    fun_formula: str | None


class SurrogateList(BaseModel):
    default: str
    surrogates: list[SurrogateInfo]


class Info(BaseModel):
    name: str
    version: str
    jax_version: str
    device: dict[str, Any] = Field(description="The device the core computes on (platform, kind, count).")
    ready: bool
    default_surrogate: str
    dtypes: list[str]
    limits: dict[str, int]
    memory: dict[str, Any] = Field(
        description="The memory budget for request data (bytes), where it comes from (setting, cgroup, meminfo, "
        "default), the bytes reserved now and the most ever reserved at once."
    )
    root_path: str | None = Field(None, description="The path prefix a proxy strips (SURROGATE_ROOT_PATH).")
    compilations: int = Field(description="Compiled variants so far (bounded by the size buckets).")
    variants: dict[str, int] = Field(description="Compiled variants per op/surrogate/dtype.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "warming_up"]


# -- the Open Inference Protocol (documentation of /v2; the handlers decode and encode themselves) --

V2Datatype = Literal["FP16", "FP32", "FP64", "BF16"]


class V2Error(BaseModel):
    """Every /v2 error (OIP shape)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "input 'alpha': must be finite and > 0, got -1.0"}]}
    )
    error: str = Field(description="What is wrong, naming the input, output or parameter.")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a free dimension.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2RepositoryModel(BaseModel):
    name: str
    version: str
    state: str
    reason: str


V2RepositoryIndex = TypeAliasType("V2RepositoryIndex", list[V2RepositoryModel])


class V2RepositoryIndexRequest(BaseModel):
    ready: bool | None = None


class V2StatisticDuration(BaseModel):
    count: int = Field(description="How many times it was measured.")
    ns: int = Field(description="The total duration, in nanoseconds.")


class V2InferStatistics(BaseModel):
    success: V2StatisticDuration
    fail: V2StatisticDuration
    queue: V2StatisticDuration
    compute_input: V2StatisticDuration
    compute_infer: V2StatisticDuration
    compute_output: V2StatisticDuration
    cache_hit: V2StatisticDuration
    cache_miss: V2StatisticDuration


class V2ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="When the last successful request ended, in ms since the epoch; 0: never.")
    inference_count: int = Field(description="Successful inferences: one per /v2 request, one per /v1 job.")
    execution_count: int = Field(description="Engine calls (a batch of requests fused into one call counts once).")
    inference_stats: V2InferStatistics
    batch_stats: list[dict[str, Any]]


class V2StatisticsResponse(BaseModel):
    model_stats: list[V2ModelStatistics]


class V2InputTensor(BaseModel):
    name: str = Field(description="x, a parameter of the surrogate (braintools' name) or cotangent.")
    shape: list[int]
    datatype: V2Datatype
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes in the binary part of the body (then no data)."
    )
    data: NumArray | None = Field(None, description="The values, flat (row-major) or nested.")


class V2RequestedOutput(BaseModel):
    name: Literal["spike", "grad", "fun", "vjp"]
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for a binary output.")


class V2InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"alpha": 1.0},
                    "inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": SEED_X}],
                    "outputs": [{"name": "spike"}, {"name": "grad"}],
                }
            ]
        }
    )
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="Scalar surrogate parameters by name; binary_data_output: true for binary outputs."
    )
    inputs: list[V2InputTensor]
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: V2Datatype
    parameters: dict[str, Any] | None = None
    data: list[float] | None = Field(None, description="Flat, row-major (absent for binary outputs).")


class V2InferResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "piecewise_quadratic",
                    "model_version": "1",
                    "id": "42",
                    "outputs": [
                        {"name": "spike", "datatype": "FP32", "shape": [5], "data": [0.0, 0.0, 1.0, 1.0, 1.0]},
                        {"name": "grad", "datatype": "FP32", "shape": [5], "data": [0.0, 0.5, 1.0, 0.5, 0.0]},
                    ],
                }
            ]
        }
    )
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2SharedMemoryRegister(BaseModel):
    """A system shared-memory region to register: ``byte_size`` bytes at ``offset`` of the POSIX
    shared-memory object ``key``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"key": "/surrogate_input", "offset": 0, "byte_size": 4000000}]})
    key: StrictStr = Field(description="The shared-memory object's key, as shm_open names it (e.g. /input0).")
    offset: StrictInt = Field(0, ge=0, description="Where the region starts in the object, in bytes.")
    byte_size: StrictInt = Field(ge=1, description="The region's size in bytes; it must lie within the object.")


class V2SharedMemoryRegion(BaseModel):
    name: str
    key: str
    offset: int
    byte_size: int


V2_MODELS: dict[str, Any] = {
    m.__name__ if hasattr(m, "__name__") else str(m): m
    for m in (V2Error, V2ServerMetadata, V2Live, V2Ready, V2ModelReady, V2ModelMetadata, V2RepositoryIndexRequest,
              V2InferRequest, V2InferResponse)
}
