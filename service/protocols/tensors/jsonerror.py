"""What is wrong with a body that is not JSON, in words that say what to do.

orjson's own message names a position and a parser's view (``str is not valid UTF-8: surrogates
not allowed`` for a binary body, ``unexpected character`` for ``NaN``). The body often tells what
the client meant: a ``.npy`` file or an ``.npz`` archive sent as JSON, or NaN/Infinity, which JSON
has no numbers for. ``explain`` names that and the way to send it, for each protocol.
"""

from __future__ import annotations

import re

import orjson

from ...errors import shown

__all__ = ["explain"]

#: the first bytes of a .npy file (numpy.lib.format) and of a zip archive (an .npz)
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

#: the spellings of NaN and infinities that Python, JavaScript and NumPy write (none is JSON)
_NONFINITE = re.compile(rb"[+-]?(?:nan|inf(?:inity)?)(?![A-Za-z0-9_])", re.IGNORECASE)

_ADVICE = {
    "v1": {
        "npy": "send it with 'content-type: application/x-npy'",
        "npz": "send it with 'content-type: application/x-npz'",
        "nonfinite": "send such values in a .npy or .npz body ('content-type: application/x-npy' or "
        "'application/x-npz'), which may hold NaN and infinities",
    },
    "v2": {
        "npy": "this endpoint takes an inference request: JSON, with tensors as JSON data or as binary tensor "
        "data after it (Inference-Header-Content-Length); a .npy file goes to /v1 with "
        "'content-type: application/x-npy'",
        "npz": "this endpoint takes an inference request: JSON, with tensors as JSON data or as binary tensor "
        "data after it (Inference-Header-Content-Length); an .npz archive goes to /v1 with "
        "'content-type: application/x-npz'",
        "nonfinite": "send such values as binary tensor data (parameters.binary_data_size), which may hold "
        "NaN and infinities",
    },
}


def explain(body: bytes, exc: orjson.JSONDecodeError, protocol: str) -> str:
    """The problem of ``body``, which orjson refused with ``exc``, and what to do about it, for
    ``protocol`` (``"v1"`` or ``"v2"``); orjson's own words where the body tells nothing more."""
    advice = _ADVICE[protocol]
    if body.startswith(NPY_MAGIC):
        return f"the body is a .npy file, not JSON; {advice['npy']}"
    if body.startswith(ZIP_MAGICS):
        return f"the body is a zip archive (an .npz?), not JSON; {advice['npz']}"
    pos = exc.pos
    if 0 < pos <= len(body) and body[pos - 1:pos] in (b"-", b"+"):  # orjson stops after a sign
        pos -= 1
    m = _NONFINITE.match(body, pos, pos + 10)
    if m is not None:
        where = f"line {exc.lineno} column {exc.colno - (exc.pos - pos)}"
        return f"{shown(m.group().decode())} at {where}: JSON has no NaN or Infinity; {advice['nonfinite']}"
    if str(exc).startswith("str is not valid UTF-8"):
        return f"the body is not UTF-8 text (line {exc.lineno} column {exc.colno}); JSON is"
    return str(exc)
