"""The Open Inference Protocol (KServe v2 / Triton HTTP) over the same data plane as ``/v1``.

Each surrogate is a model (version ``"1"``). An infer request's inputs are ``x``, the surrogate's
parameters by their braintools names (tensors that broadcast against ``x``, or scalars in the
request's ``parameters``) and an optional ``cotangent``; its outputs are ``spike``, ``grad``,
``fun`` and ``vjp`` (``cotangent * g'(x)``). All requested outputs are computed from one decode, in
one data-plane call (one fused engine call per op). Tensors travel as JSON ``data`` (flat or nested)
or with Triton's binary tensor data extension (``Inference-Header-Content-Length``), both ways;
request bodies may be gzip/deflate compressed, and answers are compressed on ``Accept-Encoding``.
Errors are ``{"error": "<message>"}``: 400 for bad input, 404 for an unknown model or version.
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import orjson

import surrogate_core as core
from surrogate_core._registry import suggest

from ...compute import Answer, Head
from ...dataplane.limits import Limits
from ...errors import ECHO_LIMIT, ApiError, shown, shown_field
from ..tensors import fastjson, jsonerror
from ..tensors.arrays import (
    MAX_JSON_ARRAYS,
    check_finite,
    for_json,
    has_literals,
    json_array,
    json_parse_bytes,
    qualities,
    small_float32,
)
from ..tensors.fastjson import simdjson
from ..tensors.npy import jobs_answer_bytes

if TYPE_CHECKING:
    from ..shm import Regions, Target

__all__ = ["DATATYPES", "MAX_ID_BYTES", "OUTPUTS", "V2Codec", "describe_model", "model", "render_error"]

VERSION = "1"
#: OIP datatype -> core dtype name
DATATYPES = {"FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}
_WIRE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8"),
         "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_NAMES = {v: k for k, v in DATATYPES.items()}
#: output name -> core op
OUTPUTS = {"spike": "spike", "grad": "grad", "fun": "fun", "vjp": "vjp"}
#: request parameters the Triton clients may send that do not concern the computation
_IGNORED_PARAMS = frozenset(
    {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end"}
)
_FLAT_PARAMETERS = re.compile(rb'"parameters"\s*:\s*\{[^{}\[\]]*\}')
#: The longest request ``id`` (in UTF-8 bytes): it is echoed in the answer.
MAX_ID_BYTES = 256
#: The most objects (``{``) and keys (``:``, counted wherever they are) of a request's JSON: an
#: inference request has a few of each, and each costs a dict or a string (and, for a repeated key,
#: the search for it) where a number costs a float.
MAX_OBJECTS = 1024
MAX_KEYS = 4096
#: A request whose colons and keys disagree (a repeated key, or an object or string where only
#: numbers belong) is re-read to name the repeated key only up to this size.
EXACT_BYTES = 1 << 20
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_STATUS = {422: 400, 406: 400}  # /v1's "valid JSON, invalid job" is OIP's plain bad request


def render_error(err: ApiError) -> Answer:
    headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    return Answer(_STATUS.get(err.status, err.status), b"application/json", (orjson.dumps({"error": err.message}),),
                  headers)


def _bad(message: str, field: str | None = None) -> ApiError:
    """A 400 whose ``field`` is a client's name, cut (as its message shows it: ``shown``)."""
    return ApiError(400, message, field=shown_field(field) if field else field, code="invalid_value")


# -- models ----------------------------------------------------------------------------------

def model(name: str, version: str | None = None) -> core.Surrogate:
    """The surrogate served as model ``name`` (and ``version``), or a 404 that suggests a name."""
    try:
        sur = core.get(name)
    except KeyError:
        close = suggest(name)
        hint = f"; did you mean {close!r}?" if close is not None else "; GET /v1/surrogates lists them"
        raise ApiError(404, f"unknown model {shown(name)}{hint}", code="unknown_surrogate", field="model") from None
    if version is not None and version != VERSION:
        raise ApiError(404, f"model {shown(name)} has no version {shown(version)} (versions: {VERSION})",
                       field="version")
    return sur


def describe_model(sur: core.Surrogate, max_rank: int) -> dict[str, Any]:
    """The model metadata of ``sur``. Every tensor takes any shape of rank 0 to ``max_rank``
    (broadcasting): its declared shape is ``max_rank`` free dimensions (``-1``), the most it may
    have; a tensor may have fewer, down to none (a scalar)."""
    def tensor(name: str) -> dict[str, Any]:
        return {"name": name, "datatype": "FP32", "shape": [-1] * max_rank}

    inputs = [tensor("x")] + [tensor(p.name) for p in sur.params] + [tensor("cotangent")]
    outputs = [tensor("spike"), tensor("grad")] + ([tensor("fun")] if sur.fun is not None else []) + [tensor("vjp")]
    return {"name": sur.name, "versions": [VERSION], "platform": "jax", "inputs": inputs, "outputs": outputs}


# -- infer ------------------------------------------------------------------------------------

def _shape(t: dict[str, Any], name: str, limits: Limits) -> tuple[int, ...]:
    shape = t.get("shape")
    if not isinstance(shape, list) or any(type(d) is not int for d in shape):
        raise _bad(f"input {shown(name)}: 'shape' must be a list of integers, got {shown(shape)}", name)
    problem = limits.rank(len(shape))
    if problem is None:
        if any(d < 0 for d in shape):
            raise _bad(f"input {shown(name)}: negative dimension in shape {shape}", name)
        problem = limits.shape(shape)
    if problem is not None:
        raise ApiError(400, f"input {shown(name)}: {problem}", field=shown_field(name), code="too_large",
                       reason="too_large")
    return tuple(shape)


def _decode_input(
    t: Any, i: int, rest: memoryview, offset: int, careful: bool, limits: Limits, regions: Regions | None = None
) -> tuple[str, np.ndarray, str, int]:
    """One input tensor: (name, array, its datatype as a core dtype name, offset past its binary data)."""
    if not isinstance(t, dict):
        raise _bad(f"inputs[{i}] must be an object with name, shape, datatype and data")
    name = t.get("name")
    if not isinstance(name, str):
        raise _bad(f"inputs[{i}]: 'name' must be a string")
    datatype = t.get("datatype")
    if datatype not in DATATYPES:
        raise _bad(
            f"input {shown(name)}: datatype {shown(datatype)} is not supported; send FP16, FP32, FP64 or BF16 "
            "(BF16 as binary data)",
            name,
        )
    dtype = DATATYPES[datatype]
    shape = _shape(t, name, limits)
    n = math.prod(shape)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input {shown(name)}: 'parameters' must be an object", name)
    if "shared_memory_region" in params:  # read in place from a registered region: no data, no binary entry
        if regions is None:
            raise _off(name)
        if "data" in t or "binary_data_size" in params:
            raise _bad(f"input {shown(name)}: has shared_memory_region and also "
                       f"{'data' if 'data' in t else 'binary_data_size'}; send one", name)
        return name, regions.input_array(name, params, _WIRE[dtype], shape), dtype, offset
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise _bad(f"input {shown(name)}: binary_data_size must be a non-negative integer, got {shown(size)}", name)
        if "data" in t:
            raise _bad(f"input {shown(name)}: has both binary_data_size and data; send one", name)
        wire = _WIRE[dtype]
        if size != n * wire.itemsize:
            raise _bad(
                f"input {shown(name)}: binary_data_size {size} does not match shape {list(shape)} of {datatype} "
                f"({n * wire.itemsize} bytes)", name,
            )
        if offset + size > len(rest):
            raise _bad(
                f"input {shown(name)}: binary_data_size {size} is past the end of the binary data "
                f"({len(rest) - offset} bytes left)", name,
            )
        a = np.frombuffer(rest, dtype=wire, count=n, offset=offset).reshape(shape)
        return name, a, dtype, offset + size
    if datatype == "BF16":
        raise _bad(f"input {shown(name)}: BF16 tensors travel only as binary data (parameters.binary_data_size)", name)
    if "data" not in t:
        raise _bad(f"input {shown(name)}: has neither data nor parameters.binary_data_size", name)
    small = small_float32(t["data"]) if name == "x" and datatype == "FP32" else None
    if small is not None and small.size == n:  # x decides the dtype: FP32 here, so cast once now
        return name, small.reshape(shape), dtype, offset
    try:  # a JSON number is read as the nearest float64, then cast to the computation dtype
        # the declared shape's rank is checked above: the data is flat (rank 1) or nested as the shape
        data_limits = limits if limits.max_rank >= 1 else limits.with_rank(1)
        a = json_array(t["data"], shown_field(name), careful=careful, limits=data_limits)
    except ValueError as exc:
        raise _bad(f"input {exc}", name) from None
    if a.size != n:
        raise _bad(f"input {shown(name)}: data holds {a.size} values, shape {list(shape)} needs {n}", name)
    return name, a.reshape(shape), dtype, offset


class V2Request:
    __slots__ = ("model", "head_length", "accept_encoding", "inflate", "into_buffer")

    def __init__(self, model: core.Surrogate, head_length: str | None, accept_encoding: str | None) -> None:
        self.model = model
        self.head_length = head_length
        self.accept_encoding = accept_encoding
        self.inflate = True
        self.into_buffer = True


class V2Decoded:
    """A decoded infer request. ``outputs``: ``(name, binary, target)`` per requested output, in
    order, ``target`` the shared-memory region it is written into (no data in the answer), or None."""

    __slots__ = ("request", "req", "outputs", "jobs")

    def __init__(self, request: V2Request, req: dict[str, Any], outputs: list[tuple[str, bool, Target | None]],
                 jobs: list[core.Job]) -> None:
        self.request = request
        self.req = req
        self.outputs = outputs
        self.jobs = jobs


class V2Codec:
    """``POST /v2/models/{model}[/versions/{version}]/infer``: the Open Inference Protocol's infer,
    JSON tensors and Triton's binary tensor data extension, gzip/deflate both ways."""

    protocol = "v2"
    endpoint = "infer"
    job_index = False

    def __init__(self, limits: Limits, regions: Regions | None = None) -> None:
        self.limits = limits
        self.regions = regions  # the shared-memory regions (None: shared memory is off)

    render_error = staticmethod(render_error)

    def prepare(self, head: Head, limit: int) -> V2Request:
        return V2Request(model(head.params["model"], head.params.get("version")),
                         head.header(b"inference-header-content-length"), head.header(b"accept-encoding"))

    def parse_bytes(self, request: V2Request, body: bytes) -> int:
        end = _head_end(request.head_length, len(body))
        return json_parse_bytes(body if end == len(body) else body[:end], max_objects=MAX_OBJECTS, max_keys=MAX_KEYS)

    def decode(self, request: V2Request, body: bytes) -> V2Decoded:
        head_end = _head_end(request.head_length, len(body))
        req, outputs, jobs = _decode(request.model, body, head_end, self.limits, self.regions)
        return V2Decoded(request, req, outputs, jobs)

    @staticmethod
    def where(decoded: V2Decoded, i: int) -> str:
        return f"output {decoded.outputs[i][0]!r}"

    @staticmethod
    def binary_answer(decoded: V2Decoded) -> bool:
        """Whether the answer is binary tensors and shared-memory writes alone, not compressed (cheap to make)."""
        return all(binary or target is not None for _, binary, target in decoded.outputs) \
            and _accepted_encoding(decoded.request.accept_encoding) is None

    @staticmethod
    def answer_bytes(decoded: V2Decoded) -> int:
        return _answer_size(decoded) + V2Codec.extra_bytes(decoded)

    @staticmethod
    def extra_bytes(decoded: V2Decoded) -> int:
        """What encoding holds beyond the answer: a compressed answer is made as it is sent, one
        compressed piece (at most a little larger than its input) and the compressor's state at a time."""
        if _accepted_encoding(decoded.request.accept_encoding) is None:
            return 0
        piece = min(_answer_size(decoded), COMPRESS_PIECE)
        return piece + piece // 100 + 64 + COMPRESSOR_BYTES

    def encode(self, decoded: V2Decoded, results: list[np.ndarray]) -> Answer:
        return _encode(decoded.request.accept_encoding, decoded.req, decoded.request.model, decoded.outputs,
                       decoded.jobs, results)


def _answer_size(decoded: V2Decoded) -> int:
    """An upper estimate of an answer's bytes (twice for text, which is built in a growing buffer)."""
    jobs = [j for j, (_, _, target) in zip(decoded.jobs, decoded.outputs, strict=True) if target is None]
    return jobs_answer_bytes(jobs, json=not all(b for _, b, target in decoded.outputs if target is None))


def _head_end(raw: str | None, size: int) -> int:
    """Where the JSON header of a ``size``-byte body ends (``Inference-Header-Content-Length``; the
    whole body without it)."""
    if raw is None:
        return size
    if not (raw.isascii() and raw.isdigit()):  # digits only: no sign, space, underscore or other digit
        raise _bad(f"Inference-Header-Content-Length {shown(raw)} is not a non-negative integer (digits only)")
    n = int(raw)
    if n > size:
        raise _bad(f"Inference-Header-Content-Length {n} is past the end of the {size}-byte body")
    return n


def _decode(sur: core.Surrogate, body: bytes, head_end: int, limits: Limits, regions: Regions | None = None
            ) -> tuple[dict[str, Any], list[tuple[str, bool, Target | None]], list[core.Job]]:
    """An infer request's JSON header (``body[:head_end]``) and binary tensors (the rest) into core
    jobs, one per requested output; inputs and outputs that name a shared-memory region are read
    from and go to ``regions``."""
    if head_end == len(body):  # JSON alone (no binary tensors): no copy
        head, rest = body, memoryview(b"")
    else:
        view = memoryview(body)
        head, rest = bytes(view[:head_end]), view[head_end:]
    if not head.strip():
        raise _bad("empty request body; send an inference request object")
    req = _fast_request(head, limits.max_rank)
    if req is None:
        req = _json_object(head, "the inference request", "with inputs")
        _no_repeated_keys(head, req)
    # true/false in a tensor's data must not pass for 1/0: then data is walked element by element.
    # The literals of flat "parameters" objects (binary_data: true, ...) hold no data, so they alone
    # do not make the walk necessary.
    careful = has_literals(head) and has_literals(_FLAT_PARAMETERS.sub(b"", bytes(head)))
    return decode_request(sur, req, rest, careful, limits, regions=regions)


def decode_request(sur: core.Surrogate, req: dict[str, Any], rest: memoryview, careful: bool, limits: Limits,
                   raws: list[memoryview] | None = None, regions: Regions | None = None
                   ) -> tuple[dict[str, Any], list[tuple[str, bool, Target | None]], list[core.Job]]:
    """An infer request, parsed (``req``: its JSON object, or another protocol's request in that
    shape), into core jobs: every check and message of ``/v2``. Binary inputs are read from ``rest``
    one after another, or, with ``raws``, each from its own buffer (``raws[i]`` for ``inputs[i]``,
    read whole: gRPC's ``raw_input_contents``)."""
    unknown = [k for k in req if k not in _REQUEST_FIELDS]
    if unknown:
        raise _bad(f"unknown field {shown(unknown[0])} in the inference request "
                   "(fields: id, parameters, inputs, outputs)")
    rid = req.get("id")
    if rid is not None:  # echoed in the answer: a short string, as Triton and KServe have it
        if not isinstance(rid, str):
            raise _bad(f"'id' must be a string, got {type(rid).__name__}", "id")
        if len(rid) > MAX_ID_BYTES or len(rid.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise _bad(f"'id' is longer than {MAX_ID_BYTES} bytes (UTF-8): {shown(rid)}", "id")
    named = req.get("model_name")  # KServe's client repeats the model in the body
    if named is not None and named != sur.name:
        raise _bad(f"model_name {shown(named)} in the body differs from the model {sur.name!r} in the path")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    allowed = {"x", "cotangent", *sur.param_names}
    arrays: dict[str, np.ndarray] = {}
    dtype = "float32"
    offset = 0
    for i, t in enumerate(inputs):
        if raws is None:
            name, a, dt, offset = _decode_input(t, i, rest, offset, careful, limits, regions)
        else:
            name, a, dt, _ = _decode_input(t, i, raws[i], 0, careful, limits, regions)
        if name == "x":
            dtype = dt  # the computation (and output) dtype is x's datatype
        if name in arrays:
            raise _bad(f"input {shown(name)} is given more than once", name)
        if name not in allowed:
            close = difflib.get_close_matches(name[:ECHO_LIMIT], sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            names = ", ".join(["x", *sur.param_names, "cotangent"])
            raise _bad(f"unknown input {shown(name)} for model {sur.name!r} (inputs: {names}){hint}", name)
        arrays[name] = a
    if offset != len(rest):
        raise _bad(f"{len(rest) - offset} bytes of binary data follow the last binary input")
    if "x" not in arrays:
        raise _bad("input 'x' is required", "x")

    params_in = req.get("parameters") or {}
    if not isinstance(params_in, dict):
        raise _bad("'parameters' must be an object")
    params: dict[str, Any] = {}
    for key, v in params_in.items():
        if key in _IGNORED_PARAMS:
            continue
        if key not in sur.param_names:
            close = difflib.get_close_matches(key[:ECHO_LIMIT], list(sur.param_names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            names = ", ".join(sur.param_names) or "none"
            raise _bad(f"unknown parameter {shown(key)} for model {sur.name!r} (parameters: {names}){hint}", key)
        if key in arrays:
            raise _bad(f"parameter {shown(key)} is given both as an input and in 'parameters'", key)
        if type(v) not in (int, float):
            raise _bad(f"parameter {shown(key)} must be a number, got {type(v).__name__}", key)
        params[key] = float(v)
    binary_all = params_in.get("binary_data_output") is True

    cot = arrays.pop("cotangent", None)
    x = arrays.pop("x")
    params.update(arrays)
    requested = _requested(req.get("outputs"), sur, cot is not None, binary_all, regions is not None)
    jobs = []
    for out_name, _, _ in requested:
        try:
            job = core.make_job(OUTPUTS[out_name], x, surrogate=sur.name, dtype=dtype, params=params,
                                cotangent=cot if out_name == "vjp" else None, limits=limits.core)
        except core.JobError as exc:
            kind = "parameter" if exc.field in sur.param_names and exc.field in params_in else "input"
            where = f"{kind} {exc.field!r}: " if exc.field else ""
            raise ApiError(400, where + exc.message, field=exc.field, code=exc.code) from None
        jobs.append(job)
    outputs: list[tuple[str, bool, Target | None]] = []
    for (out_name, binary, shm), job in zip(requested, jobs, strict=True):  # checked before computing
        target = None
        if shm is not None:
            assert regions is not None
            target = regions.output_target(out_name, shm, job.size * _WIRE[job.dtype].itemsize)
        outputs.append((out_name, binary, target))
    return req, outputs, jobs


def _json_object(raw: bytes, what: str, hint: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"invalid JSON in {what}: {jsonerror.explain(raw, exc, 'v2')}") from None
    if not isinstance(doc, dict):
        raise _bad(f"{what} must be a JSON object, {hint}")
    return doc


def _no_repeated_keys(head: bytes, req: dict[str, Any]) -> None:
    """Refuse a request with a repeated key (a JSON parser keeps the last one), at the cost of a walk
    over its few objects: every key of the body has one colon after it, so the colons of the body
    are the keys parsed plus the colons inside the strings parsed. Only when they disagree is the
    body re-read (up to ``EXACT_BYTES``) to name the key."""
    keys = colons = 0
    todo: list[Any] = [req]
    while todo:
        v = todo.pop()
        if type(v) is dict:
            keys += len(v)
            for k, e in v.items():
                colons += k.count(":")
                todo.append(e)
        elif type(v) is list:
            if v and type(v[0]) in (dict, list, str):  # (lists of numbers are data: no keys in them)
                todo += v
        elif type(v) is str:
            colons += v.count(":")
    if head.count(b":") == keys + colons:
        return
    if len(head) <= EXACT_BYTES:
        key = _repeated_key(head)
        if key is None:
            return  # (an escaped colon in a string): no key is repeated
        raise _bad(f"duplicate key {shown(key)} in the inference request", key)
    raise _bad("the inference request repeats a key, or holds an object or string among tensor data")


def _repeated_key(head: bytes) -> str | None:
    """The first key repeated in an object of ``head`` (by Python's JSON reader, on the error path)."""
    import json

    found: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if not found:
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    found.append(k)
                    break
                seen.add(k)
        return {}

    try:
        json.loads(head, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


def _fast_request(head: bytes, max_rank: int) -> dict[str, Any] | None:
    """A large JSON request with its tensors' ``data`` (flat, or nested and rectangular) decoded by
    simdjson straight into float64 arrays; None for a small request or anything unusual (then the
    general reader decodes it, checks it and words the errors). A repeated key is refused here."""
    if simdjson is None or len(head) < fastjson.MIN_BYTES:
        return None
    try:
        doc = simdjson.Parser().parse(bytes(head))
        if not isinstance(doc, simdjson.Object):
            return None
        req = _fields(doc, "the inference request")
        inputs = req.get("inputs")
        data_arrays = 0
        if isinstance(inputs, simdjson.Array):
            tensors = []
            for t in inputs:
                if not isinstance(t, simdjson.Object):
                    return None
                tensor = _fields(t, "an input")
                v = tensor.get("data")
                if isinstance(v, simdjson.Array):
                    if len(v) and isinstance(v[0], simdjson.Array):  # nested: rectangular, or the general reader
                        nested = fastjson.array(v, max_rank, MAX_JSON_ARRAYS)
                        if nested is None:
                            return None
                        tensor["data"], arrays = nested
                        data_arrays += arrays
                    else:
                        tensor["data"] = np.frombuffer(v.as_buffer(of_type="d"), dtype=np.float64)
                        data_arrays += 1
                tensors.append({k: _plain(e) for k, e in tensor.items()})
            req["inputs"] = tensors
        req = {k: _plain(e) for k, e in req.items()}
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError):
        return None
    # Every '[' of the body must be one of the arrays read: an array hidden among the numbers of a
    # tensor's data (which reading it as a buffer would flatten) or one in a string fails this.
    if head.count(b"[") != data_arrays + _lists(req):
        return None
    return req


def _lists(v: Any) -> int:
    """The lists in a decoded JSON value (tensor data already read as arrays not counted)."""
    if type(v) is list:
        return 1 + sum(_lists(e) for e in v if type(e) in (list, dict))
    if type(v) is dict:
        return sum(_lists(e) for e in v.values() if type(e) in (list, dict))
    return 0


def _fields(obj: Any, what: str) -> dict[str, Any]:
    """A simdjson object's fields (its values as simdjson's own, not converted), refusing a repeated
    key. (A body holds at most ``MAX_KEYS`` keys, which bounds the lookups.)"""
    out: dict[str, Any] = {}
    for k in obj.keys():  # noqa: SIM118 (a simdjson Object)
        if k in out:
            raise _bad(f"duplicate key {shown(k)} in {what}", k)
        out[k] = obj[k]
    return out


def _plain(v: Any) -> Any:
    """A simdjson value as Python's (objects and arrays converted; anything else as it is)."""
    if isinstance(v, simdjson.Object):
        return v.as_dict()
    if isinstance(v, simdjson.Array):
        return v.as_list()
    return v


def _requested(outputs: Any, sur: core.Surrogate, has_cotangent: bool, binary_all: bool, shm: bool = False
               ) -> list[tuple[str, bool, dict[str, Any] | None]]:
    """``(name, binary, parameters)`` of each requested output, ``parameters`` where it names a
    shared-memory region (else None)."""
    if outputs is None:
        names = ["spike", "grad"] + (["fun"] if sur.fun is not None else []) + (["vjp"] if has_cotangent else [])
        return [(n, binary_all, None) for n in names]
    if not isinstance(outputs, list) or not outputs:
        raise _bad("'outputs' must be a non-empty list of {\"name\": ...} objects (or absent for every output)")
    out: list[tuple[str, bool, dict[str, Any] | None]] = []
    seen: set[str] = set()
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise _bad(f"outputs[{i}] must be an object with a 'name'")
        name = o["name"]
        if name not in OUTPUTS:
            close = difflib.get_close_matches(name[:ECHO_LIMIT], list(OUTPUTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _bad(f"unknown output {shown(name)} (outputs: spike, grad, fun, vjp){hint}", name)
        if name in seen:
            raise _bad(f"output {shown(name)} is requested more than once", name)
        seen.add(name)
        if name == "vjp" and not has_cotangent:
            raise _bad("output 'vjp' needs an input 'cotangent'", "cotangent")
        if name == "fun" and sur.fun is None:
            raise _bad(
                f"model {sur.name!r} is gradient-only: braintools defines no smooth function (no output 'fun')", name
            )
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise _bad(f"output {shown(name)}: 'parameters' must be an object", name)
        region = "shared_memory_region" in p
        binary = p.get("binary_data", False if region else binary_all)
        if not isinstance(binary, bool):
            raise _bad(f"output {shown(name)}: binary_data must be true or false", name)
        if region:
            if not shm:
                raise _off(name, "output")
            if binary:
                raise _bad(f"output {shown(name)}: has shared_memory_region and binary_data true; ask for one", name)
        out.append((name, binary, p if region else None))
    return out


def _off(name: str, kind: str = "input") -> ApiError:
    return _bad(f"{kind} {shown(name)}: names a shared memory region, but system shared memory is off on this "
                "server (SURROGATE_SHARED_MEMORY=true turns it on)", name)


def _encode(accept_encoding: str | None, req: dict[str, Any], sur: core.Surrogate,
            outputs: list[tuple[str, bool, Target | None]], jobs: list[core.Job], results: list[np.ndarray]) -> Answer:
    descr: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    writes: list[tuple[Target, np.ndarray, np.dtype, str]] = []  # made once every output is checked
    for (name, binary, target), job, res in zip(outputs, jobs, results, strict=True):
        if job.op != "spike":  # spikes are 0 or 1, always finite
            check_finite(job, res, text=not (binary or target), where=f"output {shown(name)}", job_index=None,
                         hint="ask for binary data (parameters.binary_data)")
        datatype = _NAMES[job.dtype]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(res.shape)}
        if target is not None:  # written into its region: no data in the answer
            writes.append((target, res, _WIRE[job.dtype], name))
            out["parameters"] = target.parameters()
        elif binary:
            data = np.ascontiguousarray(res, dtype=_WIRE[job.dtype])
            out["parameters"] = {"binary_data_size": data.nbytes}
            chunks.append(data.reshape(-1).view(np.uint8).data)
        else:
            if job.dtype == "bfloat16":
                raise _bad(
                    f"output {shown(name)}: BF16 tensors travel only as binary data; set parameters.binary_data", name
                )
            out["data"] = for_json(res.reshape(-1))
        descr.append(out)
    for target, res, wire, name in writes:
        target.write(res, wire, name)
    answer: dict[str, Any] = {"model_name": sur.name, "model_version": VERSION}
    if "id" in req:
        answer["id"] = req["id"]
    answer["outputs"] = descr
    head = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    headers: list[tuple[bytes, bytes]] = []
    if chunks:
        headers.append((b"inference-header-content-length", str(len(head)).encode()))
        ctype = b"application/octet-stream"
    else:
        ctype = b"application/json"
    parts: list[bytes | memoryview] = [head, *chunks]
    encoding = _accepted_encoding(accept_encoding)
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode()))
        return Answer(200, ctype, (), headers, stream=_compressed(parts, encoding),
                      length=sum(len(p) for p in parts))
    return Answer(200, ctype, parts, headers)


#: A compressed answer is made in pieces of this many input bytes: at most one compressed piece and
#: the compressor's state (``COMPRESSOR_BYTES``) are held at a time, besides the results.
COMPRESS_PIECE = 1 << 20
COMPRESSOR_BYTES = 1 << 19  # zlib at level 6: a 32 KiB window and 128 KiB of hash state, with room


def _compressed(parts: list[bytes | memoryview], encoding: str) -> Iterator[bytes]:
    z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    for part in parts:
        view = memoryview(part).cast("B")
        for o in range(0, len(view), COMPRESS_PIECE):
            out = z.compress(view[o:o + COMPRESS_PIECE])
            if out:
                yield out
    yield z.flush()


def _accepted_encoding(accept: str | None) -> str | None:
    """gzip or deflate when the client accepts it (q > 0), preferring gzip; else None."""
    q = qualities(accept)
    gzip, deflate = q.get("gzip", 0.0), q.get("deflate", 0.0)
    if gzip <= 0 and deflate <= 0:
        return None
    return "gzip" if gzip >= deflate else "deflate"
