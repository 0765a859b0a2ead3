"""The reservation made before a JSON body is parsed (``json_parse_bytes``) covers what parsing it
holds at its peak: its numbers (a Python object, a list slot and the parser's own value each) and its
strings (a 28 MiB ``id`` or ``dtype`` value is 28 MiB of Python string, and the parser's copy).
Measured as the resident memory of a fresh process (its high-water mark, reset before parsing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.protocols.tensors.arrays import json_parse_bytes

MiB = 1 << 20

MAKE = {
    "a long ASCII id": """b'{"id": "' + b"a" * (48 * MiB) + b'", "inputs": []}'""",
    "floats": """orjson.dumps({"x": [0.123456789] * 4_000_000})""",
    "small integers": """orjson.dumps({"x": [1] * 16_000_000})""",
    "a long value past U+FFFF": """b'{"dtype": "' + "\\U0001f600".encode() + b"a" * (24 * MiB) + b'"}'""",
    "an escape past U+FFFF": """b'{"dtype": "\\\\ud83d\\\\ude00' + b"a" * (24 * MiB) + b'"}'""",
    "many short strings": """orjson.dumps({"x": [1.0], "k": ["abcdef"] * 2_000_000})""",
}

PROBE = """
import sys, orjson
from service.protocols.tensors.arrays import json_parse_bytes
MiB = 1 << 20
body = {make}
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
doc = orjson.loads(body)
print(status("VmHWM") - base, json_parse_bytes(body))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("make", MAKE.values(), ids=MAKE.keys())
def test_the_parse_estimate_covers_what_parsing_holds(make):
    out = subprocess.run([sys.executable, "-c", PROBE.format(make=make)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    peak, estimate = map(int, out.split())
    assert peak > 8 * MiB  # (the probe measures something)
    assert peak <= estimate, f"parsing held {peak / MiB:.1f} MiB, the estimate is {estimate / MiB:.1f} MiB"


def test_strings_are_measured_between_their_quotes_where_there_are_few():
    """A numeric body pays for its few keys and values, not for a bound of its whole length."""
    import orjson

    body = orjson.dumps({"x": [0.123456789] * 200_000, "dtype": "float32"})
    without = body.replace(b'"x"', b"[]").replace(b'"dtype"', b"[]").replace(b'"float32"', b"1")
    assert 0 < json_parse_bytes(body) - json_parse_bytes(without) < 1000
