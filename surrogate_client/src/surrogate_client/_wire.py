"""What goes on the wire: arrays to request bodies, response bodies to arrays. No I/O here.

Two encodings of a compute job (see the service's README):

- JSON: ``{"x": [...], "surrogate": ..., "dtype": ..., <params>, "cotangent": ...}``; the answer
  ``{"surrogate", "dtype", "shape", <op>: [...]}``.
- Binary: ``application/x-npy`` (``x`` as a .npy file; surrogate, dtype, scalar parameters and a
  scalar cotangent in the query string) or ``application/x-npz`` (``x`` and the array-valued
  parameters / cotangent as named arrays of an .npz archive). With ``Accept: application/x-npy``
  the answer is the result as a .npy file (bfloat16 results travel as float32).

Arrays travel in a lossless wire dtype (float16/32/64 as they are, bfloat16 as float32, integers as
float64) and the computation dtype is always named explicitly, so the server rounds once from the
caller's values whichever encoding is used, and both give bit-identical results.
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._exceptions import DecodingError

try:  # optional: the bfloat16 NumPy type (it comes with JAX)
    import ml_dtypes as _ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

__all__ = [
    "AUTO_BINARY_MIN_ELEMENTS",
    "BFLOAT16",
    "DTYPE_NAMES",
    "JSON",
    "NPY",
    "NPZ",
    "OPS",
    "RequestSpec",
    "Transport",
    "as_array",
    "build_batch",
    "build_compute",
    "decode_batch",
    "decode_compute",
    "resolve_dtype",
]

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"

Transport = Literal["auto", "json", "npy", "npz"]
TRANSPORTS = ("auto", "json", "npy", "npz")

#: The compute operations: the path is ``/v1/<op>`` and the result key in JSON is ``<op>``.
OPS = ("spike", "grad", "fun")

#: The dtypes the service computes in.
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")

#: ``transport="auto"`` uses the binary encoding from this many result elements on: below it the
#: JSON body is smaller than a .npy file (whose header alone is 128 bytes).
AUTO_BINARY_MIN_ELEMENTS = 16

_WIRE_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


@dataclass
class RequestSpec:
    """One HTTP request, ready to send (and to send again on a retry)."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    binary: bool = False
    dtype: str = ""  # the computation dtype a compute request asks for
    shape: tuple[int, ...] | None = None  # the result's shape, where the client can tell


# ---------------------------------------------------------------------------------------------
# inputs


def as_array(value: Any, name: str) -> np.ndarray:
    """Anything array-like (number, nested list, NumPy or JAX array) as a real-valued NumPy array.

    Booleans, complex numbers, strings and objects are refused with :class:`TypeError`, ragged
    lists with NumPy's :class:`ValueError`.
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except ValueError as exc:
            raise ValueError(f"{name}: not a rectangular array of numbers ({exc})") from None
    if _is_bfloat16(arr.dtype):
        return arr
    kind = arr.dtype.kind
    if kind in "iuf":
        return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
    if kind == "b":
        raise TypeError(f"{name}: booleans are not accepted as numbers; cast to float first")
    if kind == "c":
        raise TypeError(f"{name}: complex numbers are not supported")
    raise TypeError(f"{name}: expected numbers, got an array of dtype {arr.dtype}")


def _is_bfloat16(dt: np.dtype) -> bool:
    return dt.name == "bfloat16"


def resolve_dtype(dtype: Any, x: Any) -> str:
    """The computation dtype's name: ``dtype`` if given, else that of ``x`` if x is a float16/32/64
    or bfloat16 array or scalar (NumPy, JAX...), else float32 (the service's default: for lists,
    Python numbers and integer arrays).

    ``dtype`` may be a name (``"bfloat16"``), a NumPy dtype or type (``np.float16``) or
    ``ml_dtypes.bfloat16``. A name the client does not know is sent as it is, for the server to
    refuse with the list of the ones it knows.
    """
    if dtype is None:
        raw = getattr(x, "dtype", None)
        try:
            xdt = np.dtype(raw) if raw is not None else None
        except TypeError:
            xdt = None
        if xdt is None:
            return "float32"
        xdt = xdt.newbyteorder("=")  # ">f8" is float64 too
        if _is_bfloat16(xdt):
            return "bfloat16"
        if xdt in _WIRE_FLOATS:
            return xdt.name
        return "float32"
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype: expected a dtype name or a NumPy dtype, got {dtype!r}") from None


def _wire_array(arr: np.ndarray) -> np.ndarray:
    """The array in a dtype the binary transport carries losslessly (never integers or bfloat16)."""
    if arr.dtype in _WIRE_FLOATS:
        return arr
    if _is_bfloat16(arr.dtype):
        return arr.astype(np.float32)  # exact
    return arr.astype(np.float64)  # integers: exact up to 2**53


def _json_value(arr: np.ndarray) -> Any:
    """A JSON-ready number or nested list holding exactly the array's values."""
    if _is_bfloat16(arr.dtype) or arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # exact; float32.tolist() gives the same values as Python floats
    return arr.tolist()


def _query_scalar(arr: np.ndarray) -> str:
    """A 0-d array as a query-string number that parses back to exactly its value."""
    v = arr.item() if not _is_bfloat16(arr.dtype) else float(arr.astype(np.float32))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    return repr(float(v))


def _all_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind in "iu":
        return True
    if _is_bfloat16(arr.dtype):
        arr = arr.astype(np.float32)
    return bool(np.isfinite(arr).all())


_JSON_UNSAFE = (
    "NaN, infinity and empty arrays of rank > 1 cannot travel in JSON (an empty nested list loses its "
    "inner dimensions)"
)


def _json_safe(arr: np.ndarray) -> bool:
    """Whether JSON carries the array exactly: finite values, and a shape that nested lists keep."""
    if arr.size == 0:
        return arr.ndim <= 1
    return _all_finite(arr)


def _result_shape(arrays: list[np.ndarray]) -> tuple[int, ...] | None:
    try:
        return np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:  # does not broadcast: the server will say so
        return None


def _result_size(arrays: list[np.ndarray]) -> int:
    shape = _result_shape(arrays)
    return math.prod(shape) if shape is not None else max(a.size for a in arrays)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, _wire_array(arr), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: _wire_array(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def build_compute(
    op: str,
    x: Any,
    *,
    params: Mapping[str, Any],
    cotangent: Any = None,
    surrogate: str | None = None,
    dtype: Any = None,
    transport: str = "auto",
) -> RequestSpec:
    """The request for one job of ``op`` (``spike``, ``grad`` or ``fun``).

    ``transport``: ``"json"``; ``"npy"`` (binary: x as .npy with the rest in the query string, or
    an .npz archive when a parameter or the cotangent is an array); ``"npz"`` (always an .npz
    archive, scalars included); ``"auto"`` (binary from :data:`AUTO_BINARY_MIN_ELEMENTS` result
    elements on, or when x holds NaN or infinity, which JSON cannot carry; JSON otherwise).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}")
    xa = as_array(x, "x")
    dtype_name = resolve_dtype(dtype, x)
    extra: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if value is None:
            continue
        if name in ("x", "surrogate", "dtype", "cotangent"):
            raise TypeError(f"{name!r} is not a surrogate parameter")
        extra[name] = as_array(value, name)
    if cotangent is not None:
        if op != "grad":
            raise TypeError("cotangent is only accepted by grad")
        extra["cotangent"] = as_array(cotangent, "cotangent")

    arrays = [xa, *extra.values()]
    if transport == "auto":
        binary = _result_size(arrays) >= AUTO_BINARY_MIN_ELEMENTS or not all(map(_json_safe, arrays))
    else:
        binary = transport != "json"

    path = f"/v1/{op}"
    if not binary:
        job: dict[str, Any] = {"x": _json_value(xa)}
        if surrogate is not None:
            job["surrogate"] = surrogate
        job["dtype"] = dtype_name
        for name, arr in extra.items():
            job[name] = _json_value(arr)
        for name, arr in (("x", xa), *extra.items()):
            if not _json_safe(arr):
                raise ValueError(f"{name}: {_JSON_UNSAFE}; use transport='npy' (or 'auto')")
        body = json.dumps(job, separators=(",", ":")).encode()
        return RequestSpec(
            "POST", path, headers={"Content-Type": JSON, "Accept": JSON}, content=body, dtype=dtype_name,
            shape=_result_shape(arrays),
        )

    query: dict[str, str] = {"dtype": dtype_name}
    if surrogate is not None:
        query["surrogate"] = surrogate
    if transport == "npz":
        archive = {"x": xa, **extra}
    else:
        archive = {"x": xa}
        for name, arr in extra.items():
            if arr.ndim == 0:
                query[name] = _query_scalar(arr)
            else:
                archive[name] = arr
    if len(archive) == 1:
        content, ctype = _npy_bytes(xa), NPY
    else:
        content, ctype = _npz_bytes(archive), NPZ
    return RequestSpec(
        "POST", path, params=query, headers={"Content-Type": ctype, "Accept": NPY}, content=content,
        binary=True, dtype=dtype_name, shape=_result_shape(arrays),
    )


def build_batch(op: str, jobs: list[Mapping[str, Any]]) -> tuple[RequestSpec, list[str]]:
    """The JSON request for a list of jobs (dicts with ``x`` and optionally ``surrogate``,
    ``dtype``, ``cotangent`` and parameters), and the dtype name of each job."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    docs: list[dict[str, Any]] = []
    dtypes: list[str] = []
    for i, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise TypeError(f"job {i}: expected a mapping with 'x', got {type(job).__name__}")
        if "x" not in job:
            raise TypeError(f"job {i}: missing 'x'")
        dtype_name = resolve_dtype(job.get("dtype"), job["x"])
        doc: dict[str, Any] = {}
        for key, value in job.items():
            if key == "dtype" or value is None:
                continue
            if key == "surrogate":
                doc[key] = value
                continue
            arr = as_array(value, f"job {i}: {key}")
            if not _json_safe(arr):
                raise ValueError(f"job {i}: {key}: {_JSON_UNSAFE} (a list of jobs is JSON only)")
            doc[key] = _json_value(arr)
        doc["dtype"] = dtype_name
        docs.append(doc)
        dtypes.append(dtype_name)
    body = json.dumps(docs, separators=(",", ":")).encode()
    return RequestSpec("POST", f"/v1/{op}", headers={"Content-Type": JSON, "Accept": JSON}, content=body), dtypes


# ---------------------------------------------------------------------------------------------
# outputs


def _result_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return BFLOAT16 if BFLOAT16 is not None else np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        raise DecodingError(f"the server answered with an unknown dtype {name!r}") from None


def _from_wire(arr: np.ndarray, dtype_name: str) -> np.ndarray:
    """A decoded result in the dtype to return: bfloat16 (float32 without ml_dtypes), else as is."""
    want = _result_dtype(dtype_name)
    if arr.dtype != want:
        arr = arr.astype(want)
    return arr


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_npy(content: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(content), allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError...: not a .npy file
        raise DecodingError(f"the answer is not a valid .npy file: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise DecodingError("the answer is an .npz archive, expected one .npy array")
    return arr


def _result_from_doc(doc: Any, op: str, expected_dtype: str | None) -> np.ndarray:
    if not isinstance(doc, dict) or op not in doc or "shape" not in doc:
        raise DecodingError(f"the answer is not a {op} result object: {str(doc)[:200]}")
    dtype_name = str(doc.get("dtype") or expected_dtype or "float32")
    try:
        shape = tuple(int(n) for n in doc["shape"])
        values = np.asarray(doc[op], dtype=np.float64)
        arr = values.reshape(shape)
    except (TypeError, ValueError) as exc:
        raise DecodingError(f"the {op} result does not match its shape {doc.get('shape')}: {exc}") from None
    wire = np.float64 if dtype_name == "float64" else np.float32
    return _from_wire(arr.astype(wire), dtype_name)  # float64 -> float32 is exact for these values


def decode_compute(op: str, content_type: str | None, headers: Mapping[str, str], content: bytes,
                   expected_dtype: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The result array of a successful compute answer, whichever encoding the server chose.

    With ``expected_shape`` (the broadcast shape of the request's arrays) the result is checked
    against it, and given it where only the layout differs: a 0-d result can arrive as shape (1,)
    in .npy, and JSON cannot tell an empty (0, 3) from an empty (0,).
    """
    arr = _decode_compute(op, content_type, headers, content, expected_dtype)
    if expected_shape is not None and arr.shape != expected_shape:
        if arr.size != math.prod(expected_shape):
            raise DecodingError(f"the result has shape {arr.shape}, expected {expected_shape}")
        arr = arr.reshape(expected_shape)
    return arr


def _decode_compute(op: str, content_type: str | None, headers: Mapping[str, str], content: bytes,
                    expected_dtype: str) -> np.ndarray:
    mt = _media_type(content_type)
    if mt == NPY:
        arr = decode_npy(content)
        dtype_name = headers.get("x-surrogate-dtype") or (
            expected_dtype if expected_dtype == "bfloat16" else arr.dtype.name
        )
        if arr.dtype.kind != "f":
            raise DecodingError(f"the .npy answer has dtype {arr.dtype}, expected floats")
        return _from_wire(arr, dtype_name)
    if mt == JSON or mt.endswith("+json"):
        try:
            doc = json.loads(content)
        except ValueError as exc:
            raise DecodingError(f"the answer is not valid JSON: {exc}") from None
        return _result_from_doc(doc, op, expected_dtype)
    raise DecodingError(f"unexpected Content-Type {content_type!r} in the answer")


def decode_batch(op: str, content: bytes, dtypes: list[str]) -> list[np.ndarray]:
    try:
        docs = json.loads(content)
    except ValueError as exc:
        raise DecodingError(f"the answer is not valid JSON: {exc}") from None
    if not isinstance(docs, list) or len(docs) != len(dtypes):
        raise DecodingError(f"expected a list of {len(dtypes)} results, got {str(docs)[:200]}")
    return [_result_from_doc(d, op, dt) for d, dt in zip(docs, dtypes, strict=True)]
