"""The ``/v1`` codec: JSON and ``.npy``/``.npz`` bodies into core jobs, results into JSON or ``.npy``,
errors into ``{"error": {status, code, message, job, field}}``. No admission, limits or math here:
those are the data plane's and the core's.

JSON: the body is parsed by orjson (strict RFC 8259: no NaN/Infinity, no trailing commas) and each
array turned into NumPy by ``np.asarray``. Booleans and nulls would be silently turned into numbers
by NumPy, so when the raw body contains a ``true``/``false``/``null`` token anywhere the arrays are
walked element by element instead; that walk is also what finds the exact position of a ragged row
or a string, for the error message.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import orjson

import surrogate_core as core
from surrogate_core._jobs import unknown_param_message
from surrogate_core._registry import unknown_message

from ...compute import Answer, Head
from ...dataplane.limits import Limits
from ...errors import ECHO_LIMIT, ApiError, error_json, shown, shown_field
from ..tensors import fastjson, jsonerror
from ..tensors.arrays import (
    RankError,
    check_finite,
    encode_json,
    for_json,
    has_literals,
    json_array,
    json_parse_bytes,
    kind,
    qualities,
    small_float32,
)
from ..tensors.jsonout import PIECE, result_pieces
from ..tensors.npy import NPY, NPZ, decode_npy, decode_npz, jobs_answer_bytes, npy_parts

__all__ = ["V1Codec", "accepts_npy", "job_from_binary", "jobs_from_json", "media_type", "parse_json",
           "render_error", "result_dict"]

_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def media_type(content_type: str | None, accepted: tuple[str, ...]) -> str:
    """The request's media type if it is one of ``accepted`` (a missing header counts as JSON)."""
    if content_type is None:
        return "application/json"
    mt = content_type.split(";", 1)[0].strip().lower()
    if mt not in accepted:
        raise ApiError(415, f"unsupported Content-Type {shown(content_type)}; send one of: {', '.join(accepted)}")
    return mt


def parse_json(body: bytes) -> tuple[list[Any], bool]:
    """Parse a JSON body: ``(jobs, single)`` where ``single`` says the body was one job object."""
    if not body.strip():
        raise ApiError(400, "empty request body; send a job object or a list of job objects")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "number is infinity" in str(exc):  # valid JSON, but past float64's range
            job, field, _ = _locate(body, "infinity")
            where = f"job {job}, field {shown(field)}: " if field is not None else ""
            raise ApiError(
                422, f"{where}a number is out of float64 range ({exc})", code="not_representable", job=job,
                field=None if field is None else shown_field(field),
            ) from None
        raise ApiError(400, f"invalid JSON: {jsonerror.explain(body, exc, 'v1')}") from None
    if isinstance(doc, dict):
        _no_duplicate_keys(body, [doc])
        return [doc], True
    if isinstance(doc, list):
        _no_duplicate_keys(body, [d for d in doc if isinstance(d, dict)])
        return doc, False
    raise ApiError(
        422, f"the body must be a job object or a list of job objects, got {kind(doc)}", code="invalid_type"
    )


def _no_duplicate_keys(body: bytes, jobs: list[dict[str, Any]]) -> None:
    """Refuse a job object with a repeated key (orjson, like most parsers, keeps the last one).

    Fast check: a valid body holds no strings but keys and short enum values, so each key's quoted
    form occurs once per job that has it. Only when the counts disagree (or the body has escapes) is
    the body re-parsed to find the duplicate exactly, with the job and field it is in.
    """
    counts: dict[bytes, int] = {}
    for d in jobs:
        for k in d:
            kb = k.encode()
            counts[kb] = counts.get(kb, 0) + 1
    if b"\\" not in body:
        strings = _quoted_strings(body, 64 * len(jobs) + 64)
        if strings is not None:
            seen: dict[bytes, int] = {}
            for t in strings:
                if t in counts:
                    seen[t] = seen.get(t, 0) + 1
            if seen == counts:
                return
    job, field, key = _locate(body, "duplicate")
    if field is not None:
        what = f"duplicate key {shown(key)} in " + ("a job object" if key == field else "an object")
        raise ApiError(422, f"job {job}, field {shown(field)}: {what}", code="duplicate_key", job=job,
                       field=shown_field(field))


class _Duplicate(dict[str, Any]):
    """An object of the re-parse that had a repeated key (``key``)."""

    key = ""


class _OutOfRange:
    """A number of the re-parse that is past float64's range."""


_OUT_OF_RANGE = _OutOfRange()


def _locate(body: bytes, kind: str) -> tuple[int | None, str | None, str | None]:
    """The job index and field of the first repeated key (``kind="duplicate"``) or number past
    float64's range (``"infinity"``) of a body, by a slow re-parse with Python's json module (the
    error path only): ``(job, field, repeated key)``, all ``None`` when there is none in a job."""
    import json

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys: set[str] = set()
        for k, _ in pairs:
            if k in keys:
                d = _Duplicate(pairs)
                d.key = k
                return d
            keys.add(k)
        return dict(pairs)

    def number(text: str) -> Any:
        try:
            v = float(text)
        except OverflowError:  # an integer literal past float64's range
            return _OUT_OF_RANGE
        return _OUT_OF_RANGE if v in (math.inf, -math.inf) else v

    try:
        doc = json.loads(body, object_pairs_hook=pairs_hook, parse_float=number, parse_int=number)
    except (ValueError, RecursionError):  # nested deeper than Python's parser goes: no job to name
        return None, None, None

    def find(v: Any) -> str | None:  # the repeated key, or "" for a number out of range
        if kind == "infinity" and v is _OUT_OF_RANGE:
            return ""
        if kind == "duplicate" and isinstance(v, _Duplicate):
            return v.key
        for e in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
            found = find(e)
            if found is not None:
                return found
        return None

    docs = [doc] if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            continue
        if kind == "duplicate" and isinstance(d, _Duplicate):
            return i, d.key, d.key
        for k, v in d.items():
            found = find(v)
            if found is not None:
                return i, k, found or None
    return None, None, None


def _quoted_strings(body: bytes, limit: int) -> list[bytes] | None:
    """Every double-quoted string of a body without escapes, found by memchr; None past ``limit``."""
    out = []
    i = body.find(b'"')
    while i != -1:
        j = body.find(b'"', i + 1)
        if j == -1:
            break
        out.append(body[i + 1:j])
        if len(out) > limit:
            return None
        i = body.find(b'"', j + 1)
    return out


def result_dict(op_key: str, surrogate: str, dtype: str, arr: np.ndarray) -> dict[str, Any]:
    return {"surrogate": surrogate, "dtype": dtype, "shape": list(arr.shape), op_key: for_json(arr)}


def jobs_from_json(docs: list[Any], endpoint: str, *, careful: bool, limits: Limits, max_jobs: int) -> list[core.Job]:
    """Turn parsed JSON job objects into validated core jobs; ``ApiError`` 422 names job and field.
    (Their elements, over the request, are the data plane's to count.)"""
    if not docs:
        raise ApiError(422, "empty list of jobs; send at least one job object", code="empty_batch")
    if len(docs) > max_jobs:
        raise ApiError(422, f"{len(docs)} jobs in one request, over the limit of {max_jobs}", code="too_large")
    jobs: list[core.Job] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ApiError(422, f"job {i}: must be a JSON object, got {kind(doc)}", job=i, code="invalid_type")
        jobs.append(_job_from_json(i, doc, endpoint, careful=careful, limits=limits))
    return jobs


def _fail(i: int, field: str | None, message: str, code: str = "invalid_value") -> ApiError:
    """A 422 for job ``i`` whose message names the job and the field (a client's key, cut)."""
    where = f"job {i}, field {shown(field)}" if field else f"job {i}"
    return ApiError(422, f"{where}: {message}", job=i, field=shown_field(field) if field else field, code=code)


def _surrogate(i: int, name: str) -> core.Surrogate:
    try:
        return core.get(name)
    except KeyError:
        pass
    raise _fail(i, "surrogate", unknown_message(name, shown), "unknown_surrogate")


def _make_job(
    i: int, endpoint: str, x: Any, ct: Any, params: dict[str, np.ndarray], surrogate: str, dtype: str | None,
    limits: core.Limits,
) -> core.Job:
    """The job for ``endpoint`` (``/v1/grad`` with a cotangent is the vjp), its errors as 422s."""
    op = {"spike": "spike", "fun": "fun", "grad": "vjp" if ct is not None else "grad"}[endpoint]
    try:
        return core.make_job(op, x, surrogate=surrogate, dtype=dtype, params=params, cotangent=ct, limits=limits)
    except core.JobError as exc:
        raise _fail(i, exc.field, exc.message, exc.code) from None


def _job_from_json(i: int, doc: dict[str, Any], endpoint: str, *, careful: bool, limits: Limits) -> core.Job:
    def fail(field: str | None, message: str, code: str = "invalid_value") -> ApiError:
        return _fail(i, field, message, code)

    if "x" not in doc:
        raise fail("x", "is required", "missing_field")
    surrogate = doc.get("surrogate", core.DEFAULT_SURROGATE)
    if not isinstance(surrogate, str):
        raise fail("surrogate", f"must be a string, got {kind(surrogate)}", "invalid_type")
    sur = _surrogate(i, surrogate)
    dtype = doc.get("dtype", core.DEFAULT_DTYPE)
    if not isinstance(dtype, str) or dtype not in core.DTYPES:
        raise fail("dtype", f"unknown dtype {shown(dtype)}; supported: {', '.join(core.DTYPES)}", "unknown_dtype")
    x = ct = None
    params: dict[str, np.ndarray] = {}
    for key, value in doc.items():
        if key == "surrogate" or key == "dtype":
            continue
        if (key == "cotangent" and endpoint != "grad") or (
            key not in ("x", "cotangent") and key not in sur.param_names
        ):
            raise fail(key, _unknown(key, sur, endpoint), "unknown_field")
        try:
            arr = json_array(value, key, careful=careful, limits=limits)
        except ValueError as exc:
            code = "too_large" if isinstance(exc, RankError) else "invalid_type"
            message: str | None = str(exc).removeprefix(f"{key}: ")
        else:
            message = None
        if message is not None:  # raised past the except block: no frame left holds the value and its error
            raise fail(key, message, code)
        if key == "x":
            x = arr
        elif key == "cotangent":
            ct = arr
        else:
            params[key] = arr
    return _make_job(i, endpoint, x, ct, params, surrogate, dtype, limits.core)


def job_from_binary(
    endpoint: str, media_type: str, body: bytes, query: list[tuple[str, str]], *, limits: Limits
) -> core.Job:
    """One job from an ``.npy`` (x) or ``.npz`` (x, parameters, cotangent) body plus the query string
    (surrogate, dtype and scalar parameters)."""
    def fail(field: str | None, message: str, code: str = "invalid_value") -> ApiError:
        return _fail(0, field, message, code)

    seen: set[str] = set()
    for key, _ in query:
        if key in seen:
            raise fail(key, "given more than once in the query string", "invalid_value")
        seen.add(key)
    q = dict(query)
    surrogate = q.pop("surrogate", core.DEFAULT_SURROGATE)
    sur = _surrogate(0, surrogate)
    dtype = q.pop("dtype", None)
    if dtype is not None and dtype not in core.DTYPES:
        raise fail("dtype", f"unknown dtype {shown(dtype)}; supported: {', '.join(core.DTYPES)}", "unknown_dtype")
    if media_type == NPY:
        arrays = {"x": decode_npy(body, limits=limits)}
    else:
        arrays = decode_npz(body, limits=limits)
        if "x" not in arrays:
            raise fail("x", "the .npz has no member named x", "missing_field")
    allowed = set(sur.param_names) | ({"cotangent"} if endpoint == "grad" else set())
    for key in arrays:
        if key != "x" and key not in allowed:
            if key in ("surrogate", "dtype"):
                raise fail(key, "goes in the query string, not in the .npz", "unknown_field")
            raise fail(key, _unknown(key, sur, endpoint), "unknown_field")
    for key, raw in q.items():
        if key == "x":
            raise fail("x", "goes in the body (the .npy array, or the .npz member x), not in the query string",
                       "unknown_field")
        if key not in allowed:
            raise fail(key, _unknown(key, sur, endpoint) + " (in the query string)", "unknown_field")
        if key in arrays:
            raise fail(key, "given both in the query string and in the body", "invalid_value")
        if not _NUMBER.fullmatch(raw):
            raise fail(key, f"query value {shown(raw)} is not a number", "invalid_type")
        arrays[key] = np.asarray(float(raw))
    x = arrays.pop("x")
    ct = arrays.pop("cotangent", None)
    return _make_job(0, endpoint, x, ct, arrays, surrogate, dtype, limits.core)


# A JSON-style number, plus nan/inf spellings (refused later by the constraints, with a clear message)
# (ASCII digits only: ``\d`` would take a fullwidth or Arabic-Indic digit, which float() reads)
_NUMBER = re.compile(
    r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE | re.ASCII
)


def accepts_npy(accept: str | None) -> bool:
    """Whether the Accept header prefers ``application/x-npy`` to JSON (q-values honoured)."""
    if not accept:
        return False
    q = qualities(accept)
    npy = q.get("application/x-npy", -1.0)
    json = max(q.get(t, -1.0) for t in ("application/json", "application/*", "*/*"))
    return npy > 0 and npy > json


def _unknown(key: str, sur: core.Surrogate, endpoint: str) -> str:
    if key == "cotangent":
        return f"only /v1/grad takes a cotangent; /v1/{endpoint} does not"
    return unknown_param_message(key[:ECHO_LIMIT], sur)  # (the message names no key; a long one is like none)


JSON = "application/json"
#: JSON bodies up to this size first try the decoder of a plain job object (``V1Codec._fast_job``).
FAST_BYTES = 16 * 1024
_EXACT = 2**53  # integers up to this size are exactly floats
_MEDIA = (JSON, NPY, NPZ)
_MEDIA_OF: dict[str | None, str] = {}  # Content-Type header -> media type, for those accepted
_NPY = NPY.encode()
_JSON = JSON.encode()


def render_error(err: ApiError) -> Answer:
    headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    return Answer(err.status, _JSON, (error_json(err),), headers)


class V1Request:
    """What ``prepare`` learns from the head: media type, answer type, query, body options."""

    __slots__ = ("media", "npy", "query", "inflate", "into_buffer")

    def __init__(self, media: str, npy: bool, query: list[tuple[str, str]]) -> None:
        self.media = media
        self.npy = npy
        self.query = query
        self.inflate = False
        self.into_buffer = media != JSON


class V1Decoded:
    __slots__ = ("jobs", "single", "npy")

    def __init__(self, jobs: list[core.Job], single: bool, npy: bool) -> None:
        self.jobs = jobs
        self.single = single
        self.npy = npy


class V1Codec:
    """``POST /v1/{endpoint}``: one job object or a list of them as JSON, or one job as ``.npy`` /
    ``.npz``; answered as JSON, or ``.npy`` on ``Accept: application/x-npy``."""

    protocol = "v1"
    job_index = True

    def __init__(self, endpoint: str, limits: Limits, *, max_jobs: int) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.max_jobs = max_jobs

    render_error = staticmethod(render_error)

    def prepare(self, head: Head, limit: int) -> V1Request:
        raw = head.header(b"content-type")
        mt = _MEDIA_OF.get(raw)
        if mt is None:
            mt = media_type(raw, _MEDIA)
            if len(_MEDIA_OF) < 256:  # the few spellings clients use, remembered
                _MEDIA_OF[raw] = mt
        query = head.query
        if mt == JSON and query:
            key = query[0][0]
            raise ApiError(
                422, f"query parameter {shown(key)}: the query string is for binary bodies; put fields in the JSON job",
                field=shown_field(key), code="unknown_field",
            )
        return V1Request(mt, accepts_npy(head.header(b"accept")), query)

    def parse_bytes(self, request: V1Request, body: bytes) -> int:
        return json_parse_bytes(body) if request.media == JSON else 0

    def decode(self, request: V1Request, body: bytes) -> V1Decoded:
        if request.media == JSON and len(body) <= FAST_BYTES:
            job = self._fast_job(body)
            if job is not None:
                return V1Decoded([job], True, request.npy)
        if request.media == JSON:
            careful = has_literals(body)
            fast = None if careful else fastjson.decode(body, max_rank=self.limits.max_rank)
            docs, single = fast if fast is not None else parse_json(body)
            jobs = jobs_from_json(docs, self.endpoint, careful=careful, limits=self.limits, max_jobs=self.max_jobs)
        else:
            jobs = [job_from_binary(self.endpoint, request.media, body, request.query, limits=self.limits)]
            single = True
        if request.npy and not single:
            raise ApiError(406, f"a list of jobs is answered in JSON only; drop 'Accept: {NPY}' or send one job")
        return V1Decoded(jobs, single, request.npy)

    def _fast_job(self, body: bytes) -> core.Job | None:
        """The job of a small body that is one plain job object (x a list of numbers, scalar
        parameters, the surrogate and dtype as strings), decoded with the least work; ``None`` for
        anything else, or anything wrong, which the general path then decodes or words the error of.
        A job it returns is the one the general path would make."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(doc) is not dict:
            return None
        x = doc.get("x")
        if type(x) is not list:
            return None
        surrogate, dtype = core.DEFAULT_SURROGATE, core.DEFAULT_DTYPE
        params: dict[str, Any] = {}
        strings = 0
        for key, value in doc.items():
            kind_ = type(value)
            if key == "x":
                continue
            if key == "surrogate" or key == "dtype":
                if kind_ is not str:
                    return None
                strings += 1
                if key == "surrogate":
                    surrogate = value
                else:
                    dtype = value
            elif kind_ is float or (kind_ is int and -_EXACT <= value <= _EXACT):
                params[key] = value
            else:
                return None
        # a repeated key, an escaped quote or true/false anywhere: the general path reads the body
        if b"\\" in body or body.count(b'"') != 2 * (len(doc) + strings) or has_literals(body):
            return None
        a = small_float32(x) if dtype == "float32" else None
        if a is None:
            try:
                a = np.asarray(x)
            except (ValueError, TypeError, OverflowError):
                return None
            if a.dtype.kind not in "if" or self.limits.rank(a.ndim) is not None:
                return None
            if a.dtype.kind == "i":
                a = a.astype(np.float64)
        op = "grad" if self.endpoint == "grad" else self.endpoint
        try:
            return core.make_job(op, a, surrogate=surrogate, dtype=dtype, params=params, limits=self.limits.core)
        except core.JobError:
            return None

    @staticmethod
    def where(decoded: V1Decoded, i: int) -> str:
        return f"job {i}"

    @staticmethod
    def extra_bytes(decoded: V1Decoded) -> int:
        return 0  # answers are not compressed

    @staticmethod
    def binary_answer(decoded: V1Decoded) -> bool:
        return decoded.npy

    @staticmethod
    def answer_bytes(decoded: V1Decoded) -> int:
        return jobs_answer_bytes(decoded.jobs, json=not decoded.npy)

    def encode(self, decoded: V1Decoded, results: list[Any]) -> Answer:
        jobs, endpoint = decoded.jobs, self.endpoint
        if decoded.npy:
            job, res = jobs[0], results[0]
            check_finite(job, res, text=False, where="job 0", job_index=0, hint="")
            return Answer(200, _NPY, npy_parts(res),
                          [(b"x-surrogate-dtype", job.dtype.encode()), (b"x-surrogate-name", job.surrogate.encode())])
        hint = f"ask for 'Accept: {NPY}'"
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            if job.op != "spike":  # spikes are 0 or 1, always finite
                check_finite(job, res, text=True, where=f"job {i}", job_index=i, hint=hint)
        if decoded.single and not _large(results[0]):
            job, res = jobs[0], results[0]
            return Answer(200, _JSON, (encode_json(result_dict(endpoint, job.surrogate, job.dtype, res)),))
        if not any(_large(r) for r in results):
            out = [result_dict(endpoint, job.surrogate, job.dtype, res) for job, res in zip(jobs, results, strict=True)]
            return Answer(200, _JSON, (encode_json(out[0] if decoded.single else out),))
        pieces: list[bytes] = [] if decoded.single else [b"["]
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            if i:
                pieces.append(b",")
            fields = {"surrogate": job.surrogate, "dtype": job.dtype, "shape": list(res.shape)}
            pieces += result_pieces(fields, endpoint, for_json(res))
        if not decoded.single:
            pieces.append(b"]")
        return Answer(200, _JSON, pieces)


def _large(a: Any) -> bool:
    """Whether an answer is written in pieces: many elements, or many (nested) empty lists."""
    if a.size:
        return a.size > PIECE
    shape = a.shape
    return a.ndim > 1 and math.prod(shape[: shape.index(0)]) > 1024
