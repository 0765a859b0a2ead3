"""Decode request bodies into jobs and encode results, with no per-element Python work on the
common path.

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

from ...asgi import qualities
from ...errors import ApiError

__all__ = [
    "accepts_npy",
    "encode_json",
    "for_json",
    "has_literals",
    "job_from_binary",
    "jobs_from_json",
    "json_array",
    "media_type",
    "parse_json",
    "result_dict",
]

_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def media_type(content_type: str | None, accepted: tuple[str, ...]) -> str:
    """The request's media type if it is one of ``accepted`` (a missing header counts as JSON)."""
    if content_type is None:
        return "application/json"
    mt = content_type.split(";", 1)[0].strip().lower()
    if mt not in accepted:
        raise ApiError(415, f"unsupported Content-Type {content_type!r}; send one of: {', '.join(accepted)}")
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
            where = f"job {job}, field {field!r}: " if field is not None else ""
            raise ApiError(
                422, f"{where}a number is out of float64 range ({exc})", code="not_representable", job=job, field=field
            ) from None
        raise ApiError(400, f"invalid JSON: {exc}") from None
    if isinstance(doc, dict):
        _no_duplicate_keys(body, [doc])
        return [doc], True
    if isinstance(doc, list):
        _no_duplicate_keys(body, [d for d in doc if isinstance(d, dict)])
        return doc, False
    raise ApiError(
        422, f"the body must be a job object or a list of job objects, got {_kind(doc)}", code="invalid_type"
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
        what = f"duplicate key {key!r} in a job object" if key == field else f"duplicate key {key!r} in an object"
        raise ApiError(422, f"job {job}, field {field!r}: {what}", code="duplicate_key", job=job, field=field)


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


def has_literals(body: bytes) -> bool:
    """Whether the raw body may hold ``true`` or ``false``, which NumPy would turn into 1.0 and 0.0.

    (``null`` needs no scan: NumPy makes an object array of it, which the careful walk catches.)
    Numbers contain neither ``t`` nor ``f``, so only their few occurrences (in keys and enum strings)
    are looked at, each found by memchr; a body with very many is simply walked carefully.
    """
    for letter, word in ((b"t", b"true"), (b"f", b"false")):
        i = body.find(letter)
        seen = 0
        while i != -1:
            if body.startswith(word, i):
                return True
            seen += 1
            if seen > 10_000:
                return True
            i = body.find(letter, i + 1)
    return False


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


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


class RankError(ValueError):
    """A nested list deeper than the rank limit (``too_large``, as for binary arrays)."""


def json_array(value: Any, field: str, *, careful: bool, max_rank: int) -> np.ndarray:
    """A JSON number or rectangular nested list of numbers as a NumPy array (float64 or int64).

    Raises ``ValueError`` with a message that points at the offending element (``x[1][2]: ...``),
    ``RankError`` (a ``ValueError``) past ``max_rank``.
    """
    if isinstance(value, np.ndarray):  # decoded by the simdjson fast path: float64, rectangular
        if value.ndim > max_rank:
            raise RankError(f"{field}: rank {value.ndim} exceeds the limit of {max_rank}")
        return value
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, list)):
        raise ValueError(f"{field}: expected a number or a nested list of numbers, got {_kind(value)}")
    if not isinstance(value, list):
        if isinstance(value, int) and abs(value) >= 2**63:
            return _big_int(value, field)
        return np.asarray(float(value))
    if not careful:
        try:
            a = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            a = None
        if a is not None and a.dtype.kind in "if":
            if a.ndim > max_rank:
                raise RankError(f"{field}: rank {a.ndim} exceeds the limit of {max_rank}")
            # a JSON number is read as the nearest float64 (as the simdjson path and most JSON
            # readers do), then cast to the job's dtype: integers take the same route as decimals
            return a if a.dtype.kind == "f" else a.astype(np.float64)
    shape = _walk(value, field, max_rank)
    try:
        return np.asarray(value, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise ValueError(f"{field}: an integer is too large for a float64") from None


def _big_int(v: int, field: str) -> np.ndarray:
    try:
        return np.asarray(float(v))
    except OverflowError:
        raise ValueError(f"{field}: integer {v} is too large for a float64") from None


def _walk(value: Any, path: str, max_rank: int) -> tuple[int, ...]:
    """Check a nested list is rectangular and all numbers; return its shape.

    Depth-first, so the first offending element is reported with its index path (``x[1][2]``).
    """
    shape: list[int] = []
    v: Any = value
    while isinstance(v, list):  # the shape is read off the first element at each depth
        shape.append(len(v))
        if len(shape) > max_rank:
            raise RankError(f"{path}: rank exceeds the limit of {max_rank}")
        if not v:
            break
        v = v[0]

    def check(node: Any, depth: int, idx: list[int]) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise ValueError(f"{_at(path, idx)}: ragged nested list (a list where a number belongs)")
            if isinstance(node, bool) or node is None or not isinstance(node, (int, float)):
                raise ValueError(f"{_at(path, idx)}: expected a number, got {_kind(node)}")
            return
        if not isinstance(node, list):
            raise ValueError(f"{_at(path, idx)}: ragged nested list (a number where a list belongs)")
        if len(node) != shape[depth]:
            raise ValueError(
                f"{_at(path, idx)}: ragged nested list (length {len(node)}, expected {shape[depth]})"
            )
        if depth + 1 == len(shape):
            for i, e in enumerate(node):
                if type(e) is not float and (type(e) is not int):
                    check(e, depth + 1, idx + [i])
            return
        for i, e in enumerate(node):
            check(e, depth + 1, idx + [i])

    check(value, 0, [])
    return tuple(shape)


def _at(path: str, idx: list[int]) -> str:
    return path + "".join(f"[{i}]" for i in idx)


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def for_json(a: np.ndarray) -> Any:
    """A result as JSON writes it: float32 or float64 (float16 and bfloat16 widen exactly to float32),
    contiguous; a 0-d result as its scalar."""
    if a.dtype != _F32 and a.dtype != _F64:
        a = a.astype(np.float32)  # float16 and bfloat16 widen exactly to float32
    if a.ndim == 0:
        return a[()]
    return np.ascontiguousarray(a)


def encode_json(payload: Any) -> bytes:
    """orjson with NumPy arrays serialised natively (float32 with its shortest round-trip repr)."""
    return orjson.dumps(payload, option=_NUMPY_JSON)


def result_dict(op_key: str, surrogate: str, dtype: str, arr: np.ndarray) -> dict[str, Any]:
    return {"surrogate": surrogate, "dtype": dtype, "shape": list(arr.shape), op_key: for_json(arr)}


def jobs_from_json(
    docs: list[Any], endpoint: str, *, careful: bool, max_rank: int, max_elements: int, max_jobs: int
) -> list[core.Job]:
    """Turn parsed JSON job objects into validated core jobs; ``ApiError`` 422 names job and field."""
    if not docs:
        raise ApiError(422, "empty list of jobs; send at least one job object", code="empty_batch")
    if len(docs) > max_jobs:
        raise ApiError(422, f"{len(docs)} jobs in one request, over the limit of {max_jobs}", code="too_large")
    limits = core.Limits(max_rank=max_rank, max_elements=max_elements)
    jobs: list[core.Job] = []
    total = 0
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ApiError(422, f"job {i}: must be a JSON object, got {_kind(doc)}", job=i, code="invalid_type")
        job = _job_from_json(i, doc, endpoint, careful=careful, limits=limits)
        total += job.size
        if total > max_elements:
            raise ApiError(
                422,
                f"job {i}: the request has more than {max_elements} elements in all (after broadcasting), "
                "over the limit",
                job=i,
                field="x",
                code="too_large",
            )
        jobs.append(job)
    return jobs


def _fail(i: int, field: str | None, message: str, code: str = "invalid_value") -> ApiError:
    """A 422 for job ``i`` whose message names the job and the field."""
    where = f"job {i}, field {field!r}" if field else f"job {i}"
    return ApiError(422, f"{where}: {message}", job=i, field=field, code=code)


def _surrogate(i: int, name: str) -> core.Surrogate:
    try:
        return core.get(name)
    except KeyError as exc:
        raise _fail(i, "surrogate", exc.args[0], "unknown_surrogate") from None


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


def _job_from_json(i: int, doc: dict[str, Any], endpoint: str, *, careful: bool, limits: core.Limits) -> core.Job:
    def fail(field: str | None, message: str, code: str = "invalid_value") -> ApiError:
        return _fail(i, field, message, code)

    if "x" not in doc:
        raise fail("x", "is required", "missing_field")
    surrogate = doc.get("surrogate", core.DEFAULT_SURROGATE)
    if not isinstance(surrogate, str):
        raise fail("surrogate", f"must be a string, got {_kind(surrogate)}", "invalid_type")
    sur = _surrogate(i, surrogate)
    dtype = doc.get("dtype", core.DEFAULT_DTYPE)
    if not isinstance(dtype, str) or dtype not in core.DTYPES:
        raise fail("dtype", f"unknown dtype {dtype!r}; supported: {', '.join(core.DTYPES)}", "unknown_dtype")
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
            arr = json_array(value, key, careful=careful, max_rank=limits.max_rank)
        except ValueError as exc:
            code = "too_large" if isinstance(exc, RankError) else "invalid_type"
            raise fail(key, str(exc).removeprefix(f"{key}: "), code) from None
        if key == "x":
            x = arr
        elif key == "cotangent":
            ct = arr
        else:
            params[key] = arr
    return _make_job(i, endpoint, x, ct, params, surrogate, dtype, limits)


def job_from_binary(
    endpoint: str, media_type: str, body: bytes, query: list[tuple[str, str]], *, max_rank: int, max_elements: int
) -> core.Job:
    """One job from an ``.npy`` (x) or ``.npz`` (x, parameters, cotangent) body plus the query string
    (surrogate, dtype and scalar parameters)."""
    from ...binary import NPY, decode_npy, decode_npz

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
        raise fail("dtype", f"unknown dtype {dtype!r}; supported: {', '.join(core.DTYPES)}", "unknown_dtype")
    if media_type == NPY:
        arrays = {"x": decode_npy(body, max_rank=max_rank, max_elements=max_elements)}
    else:
        arrays = decode_npz(body, max_rank=max_rank, max_elements=max_elements)
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
            raise fail(key, f"query value {raw!r} is not a number", "invalid_type")
        arrays[key] = np.asarray(float(raw))
    x = arrays.pop("x")
    ct = arrays.pop("cotangent", None)
    limits = core.Limits(max_rank=max_rank, max_elements=max_elements)
    return _make_job(0, endpoint, x, ct, arrays, surrogate, dtype, limits)


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
    return unknown_param_message(key, sur)
