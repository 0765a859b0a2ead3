"""Safe ``.npy`` / ``.npz`` decoding and ``.npy`` answers.

Nothing here calls ``np.load``: headers are parsed with ``numpy.lib.format``'s header readers, the
dtype must be a plain floating type (no objects, no structured or void types, so nothing can be
unpickled), the declared shape is checked against the element limit BEFORE any data is touched, and
the data must be exactly as long as the header says. ``.npz`` members are streamed out of the zip
with reads bounded by their declared sizes, so a compressed member that inflates past what its
header declares (a zip bomb) is refused after reading at most one byte more than the limit.
"""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import sys
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib import format as npformat

import surrogate_core as core

from ...dataplane.limits import Limits
from ...errors import ApiError, shown

__all__ = ["ACCEPTED_KINDS", "NPY", "NPZ", "answer_bytes", "decode_npy", "decode_npz", "jobs_answer_bytes", "npy_parts"]

NPY = "application/x-npy"
NPZ = "application/x-npz"

#: dtypes accepted on the wire (any byte order): IEEE half, single and double.
ACCEPTED_KINDS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
MAX_NPZ_MEMBERS = 16


def _bad(message: str, field: str | None = None, code: str = "invalid_binary") -> ApiError:
    text = message if field is None else f"job 0, field {shown(field)}: {message}"
    return ApiError(422, text, code=code, job=0, field=field)


def _read_header(fp: Any, field: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=10_000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=10_000)
        else:  # pragma: no cover - read_magic only returns known versions
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # NumPy's header parser raises many kinds on a malformed header (ValueError,
        # SyntaxError, tokenize.TokenError, TypeError, OverflowError, ...): each means the same
        raise _bad(f"not a valid .npy file: {_clean(exc)}", field) from None
    _check_shape(shape, dtype, field)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _bad(f"dtype {dtype} is not allowed (object and structured arrays are refused)", field, "invalid_type")
    if dtype.newbyteorder("=") not in ACCEPTED_KINDS and dtype not in ACCEPTED_KINDS:
        raise _bad(
            f"dtype {dtype} is not accepted; send float16, float32 or float64 (bfloat16 travels as float32 "
            "with ?dtype=bfloat16)",
            field,
            "invalid_type",
        )
    return shape, fortran, dtype


def _clean(exc: BaseException) -> str:
    """An exception's message fit for a client: no object reprs (``<ast.Name object at 0x...>``, which
    NumPy's header parser puts in its messages), no echo of a long header."""
    text = " ".join(str(exc).split())
    if _OBJECT_REPR.search(text) or not text:
        return "the header is not a Python literal dictionary of 'descr', 'fortran_order' and 'shape'"
    return text if len(text) <= 200 else text[:200] + "..."


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _check_shape(shape: Any, dtype: np.dtype, field: str) -> None:
    """The declared shape must be a tuple of non-negative Python ints (not booleans) whose array NumPy
    can represent: NumPy's header reader lets ``(-1, -4)``, ``(True, 2)`` and ``(2**63, 0)`` through."""
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        shown = repr(shape)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise _bad(f"shape {shown} is not valid: every dimension must be a non-negative integer", field)
    # NumPy's own rule, zero-size arrays included: the product of the non-zero dimensions, in bytes,
    # must fit in a signed machine word
    nonzero = math.prod(d for d in shape if d)
    if nonzero * max(dtype.itemsize, 1) > sys.maxsize:
        raise _bad(f"shape {list(shape)} is not valid: too large to represent", field)


def _limits(shape: tuple[int, ...], field: str, limits: Limits, max_elements: int | None = None) -> int:
    problem = limits.shape(shape, max_elements)
    if problem is not None:
        raise _bad(problem, field, "too_large")
    return math.prod(shape)


def _array(
    data: bytes | memoryview, offset: int, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, n: int
) -> np.ndarray:
    a = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
    a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    if not dtype.isnative:
        a = a.astype(dtype.newbyteorder("="))
    return a


def _header_end(body: bytes | memoryview) -> int | None:
    """Where the header of a ``.npy`` body ends (its data starts), from the magic and the length field;
    None when the body does not start like a ``.npy`` file of a known version."""
    if len(body) < 12 or body[:6] != b"\x93NUMPY":
        return None
    if body[6] == 1:
        return 10 + int.from_bytes(body[8:10], "little")
    if body[6] in (2, 3):
        return 12 + int.from_bytes(body[8:12], "little")
    return None


@functools.lru_cache(maxsize=1024)
def _cached_header(head: bytes, field: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    # clients send the same few headers over and over; parsing one (a Python literal) costs ~30 us
    return _read_header(io.BytesIO(head), field)


def decode_npy(body: bytes, *, field: str = "x", limits: Limits) -> np.ndarray:
    """A ``.npy`` body as a read-only array (no copy when it is native and C-ordered)."""
    end = _header_end(body)
    if end is not None and end <= min(len(body), 256):  # a short header: parsed once, then remembered
        shape, fortran, dtype = _cached_header(bytes(body[:end]), field)
        offset = end
    else:
        fp = io.BytesIO(body)
        shape, fortran, dtype = _read_header(fp, field)
        offset = fp.tell()
    n = _limits(shape, field, limits)
    expected = n * dtype.itemsize
    if len(body) - offset != expected:
        raise _bad(
            f"the header declares shape {list(shape)} of {dtype} ({expected} bytes of data) but the body holds "
            f"{len(body) - offset} bytes (truncated or padded file)",
            field,
        )
    return _array(body, offset, shape, fortran, dtype, n)


def npz_member_count(body: bytes) -> int | None:
    """The number of members an ``.npz`` (zip) declares in its end-of-central-directory record, read
    before the central directory itself is parsed (which takes seconds for a zip of 640,000 empty
    members); None when the record is not found (then ``zipfile`` reports what is wrong)."""
    i = body.rfind(b"PK\x05\x06", max(0, len(body) - (1 << 16) - 22))
    if i < 0 or len(body) < i + 22:
        return None
    (entries,) = struct.unpack_from("<H", body, i + 10)
    return entries  # 0xFFFF: a zip64 archive, far more members than allowed anyway


_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record
_CDIR = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry (then name, extra, comment)
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header (then name, extra, data)


def _stored_members(body: bytes) -> list[tuple[str, memoryview]] | None:
    """The members of an ``.npz`` whose members are all stored (uncompressed, as ``np.savez`` and the
    client write them), as views of the body: no copy, each checked against its CRC-32. None for
    anything else (compressed members, zip64, a comment, data outside the body, a CRC that does not
    match...): ``zipfile`` then reads it, or says what is wrong."""
    if len(body) < _EOCD.size:
        return None
    end = len(body) - _EOCD.size
    sig, disk, cd_disk, n_here, n, cd_size, cd_at, comment = _EOCD.unpack_from(body, end)
    if sig != 0x06054B50 or disk or cd_disk or n_here != n or comment or cd_at + cd_size != end:
        return None
    view = memoryview(body)
    out: list[tuple[str, memoryview]] = []
    at = cd_at
    for _ in range(n):
        if at + _CDIR.size > end:
            return None
        (sig, _made, _need, flags, method, _t, _d, crc, csize, usize, nlen, elen, clen, _disk, _iattr, _eattr,
         offset) = _CDIR.unpack_from(body, at)
        name = bytes(view[at + _CDIR.size:at + _CDIR.size + nlen])
        at += _CDIR.size + nlen + elen + clen
        if (sig != 0x02014B50 or flags & 0x1 or method != 0 or csize != usize or at > end
                or offset + _LOCAL.size > cd_at):
            return None
        lsig, _need, lflags, lmethod, _t, _d, _crc, _cs, _us, lnlen, lelen = _LOCAL.unpack_from(body, offset)
        start = offset + _LOCAL.size + lnlen + lelen
        if (lsig != 0x04034B50 or lflags & 0x1 or lmethod != 0 or start + csize > cd_at
                or bytes(view[offset + _LOCAL.size:offset + _LOCAL.size + lnlen]) != name):
            return None
        data = view[start:start + csize]
        if zlib.crc32(data) != crc:
            return None
        try:
            out.append((name.decode("utf-8" if flags & 0x800 else "cp437"), data))
        except UnicodeDecodeError:
            return None
    return out if at == end else None


def _member(name: str, data: memoryview, out: dict[str, np.ndarray], budget: int, limits: Limits) -> int:
    """Decode one stored member into ``out``; the elements left of ``budget``."""
    field = _member_field(name, out)
    end = _header_end(data)
    if end is not None and end <= min(len(data), 256):  # a short header: parsed once, then remembered
        shape, fortran, dtype = _cached_header(bytes(data[:end]), field)
        offset = end
    else:
        fp = io.BytesIO(data[:_HEAD_MAX])
        shape, fortran, dtype = _read_header(fp, field)
        offset = fp.tell()
    n = _limits(shape, field, limits, budget)
    expected = n * dtype.itemsize
    if len(data) - offset != expected:
        held = len(data) - offset
        raise _bad(
            f"the header declares shape {list(shape)} of {dtype} ({expected} bytes) but the member holds "
            f"{'more' if held > expected else held} bytes",
            field,
        )
    out[field] = _array(data, offset, shape, fortran, dtype, n)
    return budget - n


#: The most of a member read to find its .npy header (numpy's own is at most 10,000 bytes here)
_HEAD_MAX = 10_000 + 16


def _member_field(name: str, out: dict[str, np.ndarray]) -> str:
    if not name.endswith(".npy") or "/" in name or name[:-4] in out:
        raise _bad(f".npz member {shown(name)} is not a top-level NAME.npy array (or is repeated)")
    return name[:-4]


def decode_npz(body: bytes, *, limits: Limits) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` body. The element limit applies to all members together.
    Stored members (``np.savez``, the client) are read in place, without a copy."""
    declared = npz_member_count(body)
    if declared is not None and declared > MAX_NPZ_MEMBERS:
        raise _bad(f".npz has {declared} members, over the limit of {MAX_NPZ_MEMBERS}", code="too_large")
    stored = _stored_members(body)
    if stored is not None:
        out: dict[str, np.ndarray] = {}
        budget = limits.max_elements
        for name, member in stored:
            budget = _member(name, member, out, budget, limits)
        return out
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except Exception as exc:  # BadZipFile, LargeZipFile, ValueError, OSError, ...: not a zip this reads
        raise _bad(f"not a valid .npz (zip) file: {_clean(exc)}") from None
    out = {}
    budget = limits.max_elements
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise _bad(f".npz has {len(infos)} members, over the limit of {MAX_NPZ_MEMBERS}", code="too_large")
        for info in infos:
            name = info.filename
            field = _member_field(name, out)
            try:
                with zf.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp, field)
                    n = _limits(shape, field, limits, budget)
                    expected = n * dtype.itemsize
                    data = fp.read(expected + 1)  # bounded: never inflate more than declared + 1 byte
            except ApiError:
                raise
            except Exception as exc:  # a damaged member: BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, ...
                raise _bad(f"cannot read .npz member {shown(name)}: {_clean(exc)}", field) from None
            if len(data) != expected:
                raise _bad(
                    f"the header declares shape {list(shape)} of {dtype} ({expected} bytes) but the member holds "
                    f"{'more' if len(data) > expected else len(data)} bytes",
                    field,
                )
            budget -= n
            out[field] = _array(data, 0, shape, fortran, dtype, n)
    return out


def npy_parts(a: np.ndarray) -> tuple[bytes, memoryview]:
    """``a`` as a ``.npy`` file in two parts, header and data; the data is a view of ``a``'s memory
    (no copy) when ``a`` is contiguous."""
    if a.dtype.kind != "f":  # bfloat16 is widened, exactly, to float32
        a = a.astype(np.float32)
    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes 0-d arrays 1-d
    return _npy_header(a.dtype.str, a.shape), a.reshape(-1).view(np.uint8).data


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, header) if _fits_v1(header) else npformat.write_array_header_2_0(buf, header)
    return buf.getvalue()


def _fits_v1(header: dict[str, Any]) -> bool:
    return len(repr(header)) < 60_000


#: The longest JSON text of one element, by the itemsize of its dtype: float64's shortest round-trip
#: repr is at most 24 characters (``-2.2250738585072014e-308``, ``-0.000012345678901234568``),
#: float32's 16 (``-0.0000018028688``); float16 and bfloat16 are written through float32.
_MAX_JSON_ELEMENT = {8: 24, 4: 16, 2: 16}


def jobs_answer_bytes(jobs: Sequence[core.Job], *, json: bool) -> int:
    """An upper estimate of the bytes of the answer to ``jobs`` (each result in its dtype, at least
    4 bytes an element as the encoders write it), twice for JSON, which is built in a growing buffer."""
    total = 0
    for job in jobs:
        total += answer_bytes(job.shape, max(core.DTYPES[job.dtype].itemsize, 4), json=json) * (2 if json else 1)
    return total


def answer_bytes(shape: tuple[int, ...], itemsize: int, json: bool) -> int:
    """An upper estimate of the size in bytes of an encoded answer holding one result of ``shape``.

    Zero-size dimensions count: a JSON answer of shape ``(100_000_000, 0)`` holds no element but is
    ``[[],[],...]``, about 300 MB, so a size check on the element count alone lets it through. JSON:
    per nesting level, every list costs its two brackets and a comma; every element its longest repr
    and a comma; plus the envelope (names, dtype, shape). ``.npy``: the exact header and data size.
    """
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if not json:
        dtype = np.dtype(f"<f{itemsize}") if itemsize in (2, 4, 8) else np.dtype("<f8")
        return len(_npy_header(dtype.str, shape)) + n * itemsize  # exactly what npy_parts writes
    lists = sum(math.prod(shape[:i]) for i in range(len(shape)))  # every list at every level
    element = _MAX_JSON_ELEMENT.get(itemsize, 24)
    envelope = 256 + 21 * len(shape)  # {"surrogate": ..., "dtype": ..., "shape": [...], "grad": ...}
    return envelope + 3 * lists + (element + 1) * n
