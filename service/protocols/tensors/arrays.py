"""What every protocol shares to read JSON tensors and to write results: a JSON number or nested list
into a NumPy array (with an error that points at the offending element), the scan for the ``true`` /
``false`` literals that NumPy would silently take for numbers, the memory a general JSON parse makes
of a body, results as JSON writes them, and whether a result can be sent at all. Owned by no
protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ...errors import ApiError

if TYPE_CHECKING:
    import surrogate_core as core

    from ...dataplane.limits import Limits

__all__ = [
    "MAX_JSON_ARRAYS",
    "RankError",
    "check_finite",
    "encode_json",
    "for_json",
    "has_literals",
    "is_finite",
    "json_array",
    "json_parse_bytes",
    "kind",
    "qualities",
    "small_float32",
]

_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY

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



def kind(v: Any) -> str:
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


_F32_MAX = float(np.finfo(np.float32).max)


def small_float32(values: Any) -> np.ndarray | None:
    """A short flat list of JSON floats as float32, cast once: each number is a float64 already, so
    this is the float64-then-float32 reading of the general path, with no overflow to look for.
    ``None`` for anything else (integers, nesting, values past float32's range, long lists)."""
    if type(values) is list and len(values) <= 256 and all(type(v) is float for v in values) \
            and (not values or max(map(abs, values)) <= _F32_MAX):
        return np.asarray(values, np.float32)
    return None


def json_array(value: Any, field: str, *, careful: bool, limits: Limits) -> np.ndarray:
    """A JSON number or rectangular nested list of numbers as a NumPy array (float64 or int64).

    Raises ``ValueError`` with a message that points at the offending element (``x[1][2]: ...``),
    ``RankError`` (a ``ValueError``) past the rank limit.
    """
    if isinstance(value, np.ndarray):  # decoded by the simdjson fast path: float64, rectangular
        problem = limits.rank(value.ndim)
        if problem is not None:
            raise RankError(f"{field}: {problem}")
        return value
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, list)):
        raise ValueError(f"{field}: expected a number or a nested list of numbers, got {kind(value)}")
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
            problem = limits.rank(a.ndim)
            if problem is not None:
                raise RankError(f"{field}: {problem}")
            # a JSON number is read as the nearest float64 (as the simdjson path and most JSON
            # readers do), then cast to the job's dtype: integers take the same route as decimals
            return a if a.dtype.kind == "f" else a.astype(np.float64)
    shape = _walk(value, field, limits)
    try:
        return np.asarray(value, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise ValueError(f"{field}: an integer is too large for a float64") from None


def _big_int(v: int, field: str) -> np.ndarray:
    try:
        return np.asarray(float(v))
    except OverflowError:
        raise ValueError(f"{field}: integer {v} is too large for a float64") from None


def _walk(value: Any, path: str, limits: Limits) -> tuple[int, ...]:
    """Check a nested list is rectangular and all numbers; return its shape.

    Depth-first, so the first offending element is reported with its index path (``x[1][2]``).
    """
    shape: list[int] = []
    v: Any = value
    while isinstance(v, list):  # the shape is read off the first element at each depth
        shape.append(len(v))
        problem = limits.rank(len(shape))
        if problem is not None:  # (the nesting goes deeper still: the rank is not known)
            raise RankError(f"{path}: rank exceeds the limit of {limits.max_rank}")
        if not v:
            break
        v = v[0]

    def check(node: Any, depth: int, idx: list[int]) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise ValueError(f"{_at(path, idx)}: ragged nested list (a list where a number belongs)")
            if isinstance(node, bool) or node is None or not isinstance(node, (int, float)):
                raise ValueError(f"{_at(path, idx)}: expected a number, got {kind(node)}")
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
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def encode_json(payload: Any) -> bytes:
    """orjson with NumPy arrays serialised natively (float32 with its shortest round-trip repr)."""
    return orjson.dumps(payload, option=_NUMPY_JSON)

#: body of 16 million one-element rows would hold the interpreter for seconds. Larger nested
#: arrays travel as ``.npy``.
MAX_JSON_ARRAYS = 1 << 17


def json_parse_bytes(body: bytes, *, max_objects: int | None = None, max_keys: int | None = None) -> int:
    """An upper estimate of the memory a general JSON parser makes of ``body`` (a Python object and
    a list slot per number, a list per bracket, a dict per brace and a key per colon), counted at C
    speed before parsing; a body of more than ``MAX_JSON_ARRAYS`` arrays (or ``max_objects``
    objects, ``max_keys`` colons, where given) is refused here."""
    commas, brackets, braces = body.count(b","), body.count(b"["), body.count(b"{")
    if brackets > MAX_JSON_ARRAYS:
        raise ApiError(
            422,
            f"the JSON body holds {brackets} arrays, over the limit of {MAX_JSON_ARRAYS}; send large nested arrays "
            "as .npy (application/x-npy)",
            field="x", code="too_large",
        )
    if max_objects is not None and braces > max_objects:
        raise ApiError(422, f"the JSON body holds {braces} objects, over the limit of {max_objects}", code="too_large")
    colons = 0
    if max_keys is not None:
        colons = body.count(b":")
        if colons > max_keys:
            raise ApiError(422, f"the JSON body holds {colons} keys (':'), over the limit of {max_keys}",
                           code="too_large")
    # a number: its Python object, its list slot and the parser's own 16-byte value (measured peak
    # with orjson 3.13: 68 bytes per 11-character float); a string: its text twice (the parser's
    # copy and the Python string) and the object's header
    return 72 * (commas + 1) + 72 * brackets + 240 * braces + 64 * colons + _string_bytes(body)


#: Past this many quotes (or with an escaped quote) strings are bounded by the body's length.
_EXACT_QUOTES = 4096


def _string_bytes(body: bytes) -> int:
    """An upper estimate of the memory of the strings a JSON parser makes of ``body``: their text
    (measured between the quotes where there are few, else bounded by the body's length), at one
    byte a character for an ASCII body without ``\\u`` escapes, else four (one character past
    U+FFFF makes a Python string four bytes a character), plus the parser's own copy of the text
    (its UTF-8) and each string object's header."""
    quotes = body.count(b'"')
    if quotes > _EXACT_QUOTES or b'\\"' in body:
        text = len(body)
    else:
        text, i = 0, 0
        for _ in range(quotes // 2):
            start = body.find(b'"', i)
            end = body.find(b'"', start + 1)
            text += end - start - 1
            i = end + 1
    width = 1 if body.isascii() and b"\\u" not in body else 4
    return (width + 1) * text + 80 * (quotes // 2)


def _isfinite(a: np.ndarray) -> np.ndarray:
    # bfloat16 (ml_dtypes) is not a NumPy float kind: widen it (exactly) to float32 first
    return np.isfinite(a if a.dtype.kind == "f" else a.astype(np.float32))


def is_finite(a: np.ndarray) -> bool:
    return a.size == 0 or bool(_isfinite(a).all())


def check_finite(
    job: core.Job, result: np.ndarray, *, text: bool, where: str, job_index: int | None, hint: str
) -> None:
    """Raise ``not_representable`` when ``result`` overflowed (non-finite where every input was
    finite), or, for a text answer (JSON cannot carry them), holds NaN or infinity at all."""
    if is_finite(result):
        return
    finite = np.ones(result.shape, bool)
    for a in (job.x, job.cotangent, *job.params.values()):
        if a is not None:
            finite &= _isfinite(a)
    if bool((~_isfinite(result) & finite).any()):
        raise ApiError(
            422,
            f"{where}: the result is not finite in {job.dtype} (overflow for these values); "
            "use a wider dtype or smaller values",
            job=job_index, field="dtype", code="not_representable",
        )
    if text:
        raise ApiError(
            422,
            f"{where}: the result holds NaN or infinity (from NaN/inf in the input), which JSON cannot carry; {hint}",
            job=job_index, field="x", code="not_representable",
        )


def qualities(header: str | None) -> dict[str, float]:
    """An ``Accept``-style header as ``{token: q}`` (tokens lower-cased; the best q of a repeated
    token; an unreadable q counts as 0)."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        token, q = fields[0].lower(), 1.0
        if not token:
            continue
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        out[token] = max(out.get(token, -1.0), q)
    return out
