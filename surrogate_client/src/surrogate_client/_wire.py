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

import functools
import io
import json
import math
import numbers
import struct
import zlib
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

try:  # optional: brotli-compressed answers (httpx asks for them when brotli is installed)
    import brotli as _brotli  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None

__all__ = [
    "ACCEPT_ENCODING",
    "AUTO_BINARY_MIN_ELEMENTS",
    "BFLOAT16",
    "BodyReader",
    "DTYPE_NAMES",
    "JSON",
    "NPY",
    "NPZ",
    "OPS",
    "RequestSpec",
    "Transport",
    "answer_bytes",
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

_WIRE_FLOATS = {np.dtype(t): np.dtype(t).name for t in (np.float16, np.float32, np.float64)}


@dataclass
class RequestSpec:
    """One HTTP request, ready to send (and to send again on a retry)."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | bytearray | None = None
    binary: bool = False
    dtype: str = ""  # the computation dtype a compute request asks for
    shape: tuple[int, ...] | None = None  # the result's shape, where the client can tell
    answer_bytes: int | None = None  # the most bytes a correct answer can have (None: not a compute request)
    shapes: list[tuple[int, ...] | None] = field(default_factory=list)  # a list of jobs: each result's shape


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
    return dt.kind not in "iufbc" and dt.name == "bfloat16"  # (the kind first: ``name`` is slow to compute)


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
        return _WIRE_FLOATS.get(xdt, "float32")
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


def _result_size(arrays: list[np.ndarray], shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else max(a.size for a in arrays)


#: The bytes one element of a result takes in a .npy answer, by computation dtype (bfloat16
#: travels as float32). A dtype the client does not know counts as the widest.
_WIRE_ITEMSIZE = {"float16": 2, "float32": 4, "bfloat16": 4, "float64": 8}

#: The longest JSON text of one element as the service writes it (orjson's shortest round trip):
#: float64's is 24 characters (``-2.2250738585072014e-308``), float32's 16 (``-0.0000018028688``);
#: float16 and bfloat16 are written through float32 (``-0.0000010728836``, ``-0.0000010058284``).
_JSON_ELEMENT = {2: 16, 4: 16, 8: 24}


def answer_bytes(shape: tuple[int, ...], dtype_name: str, *, binary: bool) -> int:
    """The most bytes a correct answer holding one result of ``shape`` can have.

    ``.npy``: the header and the data. JSON: every list at every nesting level (an empty
    ``(1000, 0)`` result is a thousand ``[]``), the longest text of every element, and the
    envelope (surrogate, dtype, shape).
    """
    n = math.prod(shape)
    itemsize = _WIRE_ITEMSIZE.get(dtype_name, 8)
    if binary:
        return 128 + 22 * len(shape) + n * itemsize
    lists = sum(math.prod(shape[:i]) for i in range(len(shape)))
    return 256 + 22 * len(shape) + 3 * lists + (_JSON_ELEMENT[itemsize] + 1) * n


@functools.lru_cache(maxsize=256)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The header of a C-ordered .npy file (format 1.0, as ``np.save`` writes it)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy_parts(arr: np.ndarray) -> tuple[bytes, np.ndarray]:
    """``arr`` in its wire dtype as a .npy file: the header, and the data as a C-ordered array."""
    a = np.ascontiguousarray(_wire_array(arr)).reshape(arr.shape)  # (ascontiguousarray makes 0-d arrays 1-d)
    return _npy_header(a.dtype.str, a.shape), a


def _npy_bytes(arr: np.ndarray) -> bytes:
    header, a = _npy_parts(arr)
    return header + a.tobytes()


#: The zip records of an .npz archive of stored (uncompressed) members.
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes, then the name
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes, then the name
_END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_ZIP_TIME, _ZIP_DATE = 0, (1980 - 1980) << 9 | 1 << 5 | 1  # 1980-01-01 00:00, the earliest a zip can say


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytearray:
    """An .npz archive (what ``np.savez`` writes: a zip of ``NAME.npy`` members, stored), written
    straight into one buffer: each array is copied once, and its CRC-32 computed in place. An archive
    past the 4 GiB a plain zip can describe is left to ``np.savez`` (zip64)."""
    members = [(f"{name}.npy".encode(), *_npy_parts(arr)) for name, arr in arrays.items()]
    size = sum(_LOCAL.size + _CENTRAL.size + 2 * len(name) + len(head) + a.nbytes for name, head, a in members)
    if size + _END.size >= 0xFFFFFFFF:
        buf = io.BytesIO()
        np.savez(buf, **{k: _wire_array(v) for k, v in arrays.items()})  # type: ignore[arg-type]
        return bytearray(buf.getbuffer())
    out = bytearray(size + _END.size)
    view = memoryview(out)
    central = []
    at = 0
    for name, head, a in members:
        data = at + _LOCAL.size + len(name)
        end = data + len(head) + a.nbytes
        view[data:data + len(head)] = head
        np.frombuffer(out, np.uint8, count=a.nbytes, offset=data + len(head))[:] = a.reshape(-1).view(np.uint8)
        crc = zlib.crc32(view[data:end])
        n = end - data
        _LOCAL.pack_into(out, at, 0x04034B50, 20, 0, 0, _ZIP_TIME, _ZIP_DATE, crc, n, n, len(name), 0)
        view[at + _LOCAL.size:data] = name
        central.append(_CENTRAL.pack(0x02014B50, 20, 20, 0, 0, _ZIP_TIME, _ZIP_DATE, crc, n, n, len(name), 0, 0, 0,
                                     0, 0o600 << 16, at) + name)
        at = end
    directory = b"".join(central)
    view[at:at + len(directory)] = directory
    _END.pack_into(out, at + len(directory), 0x06054B50, 0, 0, len(members), len(members), len(directory), at, 0)
    view.release()
    return out


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
    shape = xa.shape if not extra else _result_shape(arrays)
    if transport == "auto":
        binary = _result_size(arrays, shape) >= AUTO_BINARY_MIN_ELEMENTS or not all(map(_json_safe, arrays))
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
            shape=shape, answer_bytes=answer_bytes(shape, dtype_name, binary=False) if shape is not None else 0,
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
    content: bytes | bytearray
    if len(archive) == 1:
        content, ctype = _npy_bytes(xa), NPY
    else:
        content, ctype = _npz_bytes(archive), NPZ
    return RequestSpec(
        "POST", path, params=query, headers={"Content-Type": ctype, "Accept": NPY}, content=content,
        binary=True, dtype=dtype_name, shape=shape,
        answer_bytes=answer_bytes(shape, dtype_name, binary=True) if shape is not None else 0,
    )


def build_batch(op: str, jobs: list[Mapping[str, Any]]) -> tuple[RequestSpec, list[str]]:
    """The JSON request for a list of jobs (dicts with ``x`` and optionally ``surrogate``,
    ``dtype``, ``cotangent`` and parameters), and the dtype name of each job."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    docs: list[dict[str, Any]] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...] | None] = []
    for i, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise TypeError(f"job {i}: expected a mapping with 'x', got {type(job).__name__}")
        if "x" not in job:
            raise TypeError(f"job {i}: missing 'x'")
        dtype_name = resolve_dtype(job.get("dtype"), job["x"])
        doc: dict[str, Any] = {}
        arrays: list[np.ndarray] = []
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
            arrays.append(arr)
        doc["dtype"] = dtype_name
        docs.append(doc)
        dtypes.append(dtype_name)
        shapes.append(_result_shape(arrays))
    body = json.dumps(docs, separators=(",", ":")).encode()
    size = sum(answer_bytes(s, dt, binary=False) for s, dt in zip(shapes, dtypes, strict=True) if s is not None)
    spec = RequestSpec("POST", f"/v1/{op}", headers={"Content-Type": JSON, "Accept": JSON}, content=body,
                       answer_bytes=size + len(shapes), shapes=shapes)
    return spec, dtypes


# ---------------------------------------------------------------------------------------------
# outputs


#: How much is inflated or copied at a time while an answer is read.
PIECE = _PIECE = 1 << 20


def _brotli_bounded() -> bool:
    """Whether the installed brotli can inflate a bounded piece at a time (``output_buffer_limit``,
    brotli >= 1.2); without it brotli answers are not asked for, so none can overflow the cap."""
    if _brotli is None:
        return False
    try:
        _brotli.Decompressor().process(b"", output_buffer_limit=1)
    except TypeError:
        return False
    return True


_BROTLI = _brotli_bounded()

#: The ``Accept-Encoding`` the client sends: the encodings it can inflate within the answer cap
#: (httpx's own choice where brotli >= 1.2 is installed or brotli is absent).
ACCEPT_ENCODING = "gzip, deflate, br" if _BROTLI else "gzip, deflate"


class _Zlib:
    """gzip, or deflate (zlib-wrapped, or raw as some servers send it), at most ``n`` bytes at a time."""

    def __init__(self, gzip: bool) -> None:
        self._d = zlib.decompressobj(zlib.MAX_WBITS | 16 if gzip else zlib.MAX_WBITS)
        self._tail = b""
        self._first: bytes | None = None if gzip else b""  # deflate: the input until it decodes

    def push(self, data: bytes) -> None:
        self._tail += data
        if self._first is not None:
            self._first += data

    def pull(self, n: int) -> bytes:
        try:
            out = self._d.decompress(self._tail, n)
        except zlib.error:
            if self._first is None:
                raise
            self._d, self._tail, self._first = zlib.decompressobj(-zlib.MAX_WBITS), self._first, None
            out = self._d.decompress(self._tail, n)
        self._tail = self._d.unconsumed_tail
        if out:
            self._first = None
        return out


class _Brotli:
    """brotli, at most about ``n`` bytes at a time."""

    def __init__(self) -> None:
        assert _brotli is not None
        self._d = _brotli.Decompressor()
        self._tail = b""

    def push(self, data: bytes) -> None:
        self._tail += data

    def pull(self, n: int) -> bytes:
        data = b""
        if self._tail and self._d.can_accept_more_data():
            data, self._tail = self._tail, b""
        return bytes(self._d.process(data, output_buffer_limit=n))


class BodyReader:
    """An answer's body, inflated (``Content-Encoding``) as it arrives, refused past ``cap`` bytes.

    Feed it the raw chunks as they come (:meth:`feed`); it keeps the decoded body, never holding
    more than ``cap`` bytes of it however small the compressed input (an answer of a few kilobytes
    can inflate to gigabytes), and refuses more than twice ``cap`` raw bytes (a compressed stream
    can also decode to nothing, forever). Past the cap it raises :class:`DecodingError`, or with
    ``truncate`` keeps the first ``cap`` bytes and sets :attr:`full` (the rest is not wanted: an
    error body, whose excerpt is enough).
    """

    def __init__(self, content_encoding: str | None, cap: int, *, what: str, truncate: bool = False) -> None:
        self.cap, self.what, self.truncate = cap, what, truncate
        self.full = False
        self._raw = 0
        self._buf = bytearray()
        self._stages: list[_Zlib | _Brotli] = []
        codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
        for coding in reversed(codings):  # the last one applied is undone first
            if coding == "identity":
                continue
            if coding in ("gzip", "x-gzip", "deflate"):
                self._stages.append(_Zlib(gzip=coding != "deflate"))
            elif coding == "br" and _BROTLI:
                self._stages.append(_Brotli())
            else:
                raise DecodingError(f"{what} has Content-Encoding {_shown(content_encoding)}, expected one of "
                                    f"{ACCEPT_ENCODING}")

    def feed(self, data: bytes) -> None:
        """Take the next raw chunk."""
        if self.full:
            return
        self._raw += len(data)
        if self._raw > 2 * self.cap + _PIECE:
            self._over()
            return
        try:
            self._decode(0, data)
        except DecodingError:
            raise
        except Exception as exc:  # zlib.error, brotli.error: corrupt compressed data
            raise DecodingError(f"{self.what} cannot be decompressed: {_shown(str(exc))}") from None

    def _decode(self, stage: int, data: bytes) -> None:
        if stage == len(self._stages):
            self._keep(data)
            return
        decoder = self._stages[stage]
        decoder.push(data)
        last = stage + 1 == len(self._stages)
        while not self.full:
            piece = decoder.pull(min(_PIECE, self.cap - len(self._buf) + 1) if last else _PIECE)
            if not piece:
                return
            self._decode(stage + 1, piece)

    def _keep(self, data: bytes) -> None:
        room = self.cap - len(self._buf)
        if len(data) > room:
            self._buf += memoryview(data)[:room]
            self._over()
            return
        self._buf += data

    def _over(self) -> None:
        if not self.truncate:
            raise DecodingError(f"{self.what} is larger than {self.cap} bytes, more than a correct answer to the "
                                "request can hold")
        self.full = True

    def take(self, body: bytearray) -> None:
        """Take a whole body read without ``Content-Encoding`` (no copy), at most ``cap`` bytes."""
        if self._stages or self._raw or len(body) > self.cap:
            raise ValueError("take() is for a whole body, within the cap, without Content-Encoding")
        self._raw = len(body)
        self._buf = body

    def body(self) -> bytearray:
        """The decoded body (the first ``cap`` bytes of it when :attr:`full`)."""
        return self._buf


def _shown(value: Any) -> str:
    """A value from an answer in a message: its repr, cut to 64 characters."""
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "…"


def parse_json(content: bytes | bytearray, what: str) -> Any:
    """An answer's JSON document; :class:`DecodingError` for invalid or too deeply nested JSON."""
    try:
        return json.loads(content)
    except RecursionError:
        raise DecodingError(f"{what} is JSON nested too deeply to read") from None
    except ValueError as exc:
        raise DecodingError(f"{what} is not valid JSON: {exc}") from None


def _result_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return BFLOAT16 if BFLOAT16 is not None else np.dtype(np.float32)
    return np.dtype(name)


def _answered_dtype(name: Any) -> str:
    """The dtype an answer names, checked: one of :data:`DTYPE_NAMES`."""
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise DecodingError(f"the answer's dtype {_shown(name)} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def _from_wire(arr: np.ndarray, dtype_name: str) -> np.ndarray:
    """A decoded result in the dtype to return: bfloat16 (float32 without ml_dtypes), else as is."""
    want = _result_dtype(dtype_name)
    if arr.dtype != want:
        arr = arr.astype(want)
    return arr


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


#: The longest .npy header read: numpy's own is at most 64 KiB in format 1.0.
_NPY_HEAD_MAX = (1 << 16) + 16


def _check_shape(shape: tuple[int, ...], expected: tuple[int, ...] | None, what: str) -> None:
    """A result's shape must be the request's broadcast shape; a 0-d result may arrive as (1,)."""
    if expected is not None and shape != expected and not (expected == () and shape == (1,)):
        raise DecodingError(f"{what} has shape {_shown(shape)}, the request's result has shape {expected}")


def _read_npy_head(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The shape, order and dtype a .npy file's header declares, and where its data starts."""
    head = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise ValueError(f".npy format version {version} is not written for float arrays")
    except Exception as exc:  # ValueError, EOFError, SyntaxError...: not a .npy file
        raise DecodingError(f"the answer is not a valid .npy file: {_shown(str(exc))}") from None
    return shape, fortran, dtype, head.tell()


#: the same few answer headers come back call after call; parsing one (a Python literal) costs ~40 us
_npy_head = functools.lru_cache(maxsize=256)(_read_npy_head)


def decode_npy(content: bytes | bytearray, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A .npy answer as an array: float16/32/64 only, of ``expected_shape`` where given, with exactly
    its data; the header is read before any array is made, so a header that announces more than
    the answer holds costs nothing. The array shares a ``bytearray``'s memory."""
    view = memoryview(content)
    end = 10 + int.from_bytes(view[8:10], "little") if len(view) >= 10 and view[6] == 1 else 0
    if 10 < end <= min(len(view), 256):  # a short format 1.0 header: parsed once, then remembered
        shape, fortran, dtype, offset = _npy_head(bytes(view[:end]))
    else:
        shape, fortran, dtype, offset = _read_npy_head(bytes(view[:_NPY_HEAD_MAX]))
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise DecodingError(f"the .npy answer has dtype {_shown(str(dtype))}, expected float16, float32 or float64")
    _check_shape(shape, expected_shape, "the .npy answer")
    n = math.prod(shape)
    if len(view) - offset != n * dtype.itemsize:
        raise DecodingError(f"the .npy answer holds {len(view) - offset} data bytes, its header "
                            f"({shape}, {dtype}) says {n * dtype.itemsize}")
    arr = np.frombuffer(content, dtype=dtype, count=n, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    if not dtype.isnative or not arr.flags.writeable:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def _answered_shape(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > 64 or not all(type(n) is int and n >= 0 for n in raw):
        raise DecodingError(f"the answer's shape {_shown(raw)} is not a list of sizes")
    return tuple(raw)


def _result_from_doc(doc: Any, op: str, expected_dtype: str | None,
                     expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(doc, dict) or op not in doc or "shape" not in doc:
        raise DecodingError(f"the answer is not a {op} result object: {_shown(doc)}")
    named = doc.get("dtype")
    dtype_name = _answered_dtype(expected_dtype or "float32" if named is None else named)
    shape = _answered_shape(doc["shape"])
    _check_shape(shape, expected_shape, f"the {op} result")
    try:
        values = np.asarray(doc[op])
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise DecodingError(f"the {op} result is not a rectangular array of numbers") from None
    if values.dtype.kind not in "iuf":
        raise DecodingError(f"the {op} result holds {values.dtype} values, expected numbers")
    if values.shape != shape:
        if values.size or math.prod(shape):  # JSON writes an empty (0, 3) as [], but data is never moved
            raise DecodingError(f"the {op} result has shape {values.shape}, the answer says {shape}")
        values = values.reshape(shape)
    if expected_shape is not None:
        values = values.reshape(expected_shape)
    wire = np.float64 if dtype_name == "float64" else np.float32
    return _from_wire(values.astype(wire), dtype_name)  # float64 -> float32 is exact for these values


def decode_compute(op: str, content_type: str | None, headers: Mapping[str, str], content: bytes | bytearray,
                   expected_dtype: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The result array of a successful compute answer, whichever encoding the server chose.

    Only the documented answers are accepted (:class:`DecodingError` otherwise): a result in one of
    :data:`DTYPE_NAMES` (in .npy, stored in the float type that dtype travels in), of
    ``expected_shape`` (the broadcast shape of the request's arrays) where given. Nothing is
    reshaped but a 0-d result sent as shape (1,).
    """
    mt = _media_type(content_type)
    if mt == NPY:
        arr = decode_npy(content, expected_shape)
        named = headers.get("x-surrogate-dtype")
        if named is None:
            named = expected_dtype if expected_dtype in DTYPE_NAMES else arr.dtype.name
        dtype_name = _answered_dtype(named)
        if arr.dtype.itemsize != _WIRE_ITEMSIZE[dtype_name]:
            raise DecodingError(f"the .npy answer holds {arr.dtype} for a {dtype_name} result")
        if expected_shape is not None:
            arr = arr.reshape(expected_shape)
        return _from_wire(arr, dtype_name)
    if mt == JSON or mt.endswith("+json"):
        return _result_from_doc(parse_json(content, "the answer"), op, expected_dtype, expected_shape)
    raise DecodingError(f"unexpected Content-Type {_shown(content_type)} in the answer")


def decode_batch(op: str, content: bytes | bytearray, dtypes: list[str],
                 shapes: list[tuple[int, ...] | None] | None = None) -> list[np.ndarray]:
    docs = parse_json(content, "the answer")
    if not isinstance(docs, list) or len(docs) != len(dtypes):
        raise DecodingError(f"expected a list of {len(dtypes)} results, got {_shown(docs)}")
    shapes = shapes or [None] * len(dtypes)
    return [_result_from_doc(d, op, dt, sh) for d, dt, sh in zip(docs, dtypes, shapes, strict=True)]
