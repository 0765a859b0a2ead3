"""SurrogateClient and AsyncSurrogateClient against a deliberately hostile HTTP server.

The server is real (a socket on a loopback port, one thread per connection) and answers every
request with crafted bytes: answers larger than the request can explain, compressed answers that
inflate to hundreds of megabytes, answers that never end or arrive a byte at a time, results of the
wrong dtype or shape. The client must stop each of them with a typed error (``DecodingError`` or
``Timeout``) before it has read, inflated or waited past its bounds; memory is judged by the bytes
the server managed to send and by tracemalloc's peak, never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import brotli
import numpy as np
import pytest
from helpers import LoopbackServer

import surrogate_client as scl

KINDS = ["sync", "async"]
MiB = 1 << 20

# The answer cap of a (6,) float32 result asked for as JSON, by hand: an envelope of 256 bytes, 22 for
# the one dimension of the shape, 3 for the one list, (16 + 1) for each of the 6 elements (float32's
# longest text and a comma) = 383; plus the default margin of 64 KiB.
JSON6_BYTES = 256 + 22 + 3 + 17 * 6
JSON6_CAP = JSON6_BYTES + 65536
X6 = [0.5, -0.5, 0.0, 1.0, -1.0, 2.0]


class Hostile(LoopbackServer):
    """An HTTP/1.1 server on a loopback port that reads each request and hands the connection to
    ``answer(server, conn)``; it counts the requests and the bytes it managed to send."""

    def __init__(self, answer: Callable[[Hostile, socket.socket], None]) -> None:
        super().__init__(sndbuf=1 << 16)  # little held in flight
        self.answer = answer
        self.requests = 0
        self.sent = 0
        self.start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            with contextlib.suppress(OSError):  # the client went away: what it should do
                self.answer(self, conn)

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)



@contextlib.contextmanager
def hostile(answer: Callable[[Hostile, socket.socket], None]) -> Iterator[Hostile]:
    server = Hostile(answer)
    try:
        yield server
    finally:
        server.close()


def head(status: int = 200, **headers: str | int) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def fixed(body: bytes, status: int = 200, **headers: str | int) -> Callable[[Hostile, socket.socket], None]:
    """An answer of ``body`` with its Content-Length."""
    def answer(server: Hostile, conn: socket.socket) -> None:
        server.send(conn, head(status, Content_Length=len(body), **headers) + body)
    return answer


def endless(status: int = 200, limit: int = 64 * MiB, **headers: str) -> Callable[[Hostile, socket.socket], None]:
    """A chunked answer that goes on (up to ``limit`` bytes, so that an unbounded client ends)."""
    def answer(server: Hostile, conn: socket.socket) -> None:
        server.send(conn, head(status, Transfer_Encoding="chunked", **headers))
        chunk = b"10000\r\n" + b"[" * 65536 + b"\r\n"
        while server.sent < limit and not server.stop.is_set():
            server.send(conn, chunk)
        server.send(conn, b"0\r\n\r\n")
    return answer


def trickle(prefix: bytes, byte: bytes, every: float = 0.3,
            limit: float = 30.0) -> Callable[[Hostile, socket.socket], None]:
    """``prefix`` at once, then ``byte`` every ``every`` seconds (for ``limit`` seconds at most)."""
    def answer(server: Hostile, conn: socket.socket) -> None:
        server.send(conn, prefix)
        end = time.monotonic() + limit
        while time.monotonic() < end and not server.stop.wait(every):
            server.send(conn, byte)
    return answer


def call(kind: str, url: str, method: str, *args: Any, client: dict[str, Any] | None = None, **kw: Any) -> Any:
    """``method(*args, **kw)`` on a new client of ``kind`` (no retries unless ``client`` says)."""
    options = {"retries": 0, **(client or {})}
    if kind == "sync":
        with scl.SurrogateClient(url, **options) as c:
            return getattr(c, method)(*args, **kw)

    async def main() -> Any:
        async with scl.AsyncSurrogateClient(url, **options) as c:
            return await getattr(c, method)(*args, **kw)

    return asyncio.run(main())


def doc(**fields: Any) -> dict[str, Any]:
    return {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [6], "grad": [0.5] * 6, **fields}


def json_body(d: Any, size: int | None = None) -> bytes:
    body = json.dumps(d).encode()
    return body if size is None else body + b" " * (size - len(body))


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the answer's size


@pytest.mark.parametrize("kind", KINDS)
def test_an_answer_exactly_at_the_cap_is_read_and_one_byte_more_is_refused(kind):
    with hostile(fixed(json_body(doc(), JSON6_CAP), Content_Type="application/json")) as srv:
        got = call(kind, srv.url, "grad", X6, transport="json")
    assert got.tolist() == [0.5] * 6
    assert got.dtype == np.float32
    with hostile(fixed(json_body(doc(), JSON6_CAP + 1), Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match=f"larger than {JSON6_CAP} bytes"):
            call(kind, srv.url, "grad", X6, transport="json")


@pytest.mark.parametrize("kind", KINDS)
def test_the_margin_is_the_clients_to_choose(kind):
    with hostile(fixed(json_body(doc(), JSON6_BYTES), Content_Type="application/json")) as srv:
        assert call(kind, srv.url, "grad", X6, transport="json", client={"answer_margin": 0}).shape == (6,)
    with hostile(fixed(json_body(doc(), JSON6_BYTES + 1), Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match=f"larger than {JSON6_BYTES} bytes"):
            call(kind, srv.url, "grad", X6, transport="json", client={"answer_margin": 0})


@pytest.mark.parametrize("kind", KINDS)
def test_a_chunked_answer_that_never_ends_is_cut_at_the_cap(kind):
    with hostile(endless(Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match=f"larger than {JSON6_CAP} bytes"):
            call(kind, srv.url, "grad", X6, transport="json")
    # the server stops at 64 MiB; the client read about 64 KiB (socket buffers hold a few MiB more)
    assert srv.sent < 16 * MiB, srv.sent


@pytest.mark.parametrize("kind", KINDS)
def test_an_endless_npy_answer_is_cut_at_its_size(kind):
    x = np.zeros(1000, np.float32)  # binary: the cap is the .npy's 4,000 data bytes, a header and the margin
    with hostile(endless(Content_Type="application/x-npy", X_Surrogate_Dtype="float32")) as srv:
        with pytest.raises(scl.DecodingError, match=f"larger than {128 + 22 + 4000 + 65536} bytes"):
            call(kind, srv.url, "grad", x)
    assert srv.sent < 16 * MiB, srv.sent


def bomb(encoding: str, size: int = 256 * MiB) -> bytes:
    """``size`` zero bytes compressed with ``encoding``: a valid stream of a few hundred kilobytes."""
    block, n = bytes(MiB), size // MiB
    if encoding == "br":
        c = brotli.Compressor(quality=1)
        return b"".join([c.process(block) for _ in range(n)] + [c.finish()])
    gz = encoding == "gzip"
    z = zlib.compressobj(9, zlib.DEFLATED, 31 if gz else 15)
    first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every further block
    end = z.flush()[: -8 if gz else -4]  # the final block, without the checksum of two blocks
    check = 0 if gz else 1
    for _ in range(n):
        check = zlib.crc32(block, check) if gz else zlib.adler32(block, check)
    trailer = struct.pack("<II", check, size & 0xFFFFFFFF) if gz else struct.pack(">I", check)
    return first + again * (n - 1) + end + trailer


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    out = {e: bomb(e) for e in ("gzip", "deflate", "br")}
    assert len(zlib.decompress(out["gzip"], 31)) == 256 * MiB  # a valid stream (checked once)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compression_bomb_is_not_inflated_past_the_cap(kind, encoding, bombs):
    body = bombs[encoding]
    assert len(body) < MiB
    with hostile(fixed(body, Content_Type="application/json", Content_Encoding=encoding)) as srv:
        tracemalloc.start()
        try:
            with pytest.raises(scl.DecodingError, match=f"larger than {JSON6_CAP} bytes"):
                call(kind, srv.url, "grad", X6, transport="json")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 * MiB, peak  # 256 MiB inflated in full


def compress(body: bytes, encoding: str) -> bytes:
    for coding in encoding.split(", "):  # in the order they were applied
        if coding == "br":
            body = brotli.compress(body)
        else:
            z = zlib.compressobj(6, zlib.DEFLATED, {"gzip": 31, "deflate": 15, "raw-deflate": -15}[coding])
            body = z.compress(body) + z.flush()
    return body


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "br", "deflate, gzip"])
def test_a_correct_compressed_answer_is_read(kind, encoding):
    body = compress(json_body(doc(grad=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0])), encoding)
    named = encoding.replace("raw-deflate", "deflate")  # servers send raw deflate under that name too
    with hostile(fixed(body, Content_Type="application/json", Content_Encoding=named)) as srv:
        got = call(kind, srv.url, "grad", X6, transport="json")
    assert got.tolist() == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert got.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_content_encoding_is_refused(kind):
    with hostile(fixed(json_body(doc()), Content_Type="application/json", Content_Encoding="zstd")) as srv:
        with pytest.raises(scl.DecodingError, match="Content-Encoding 'zstd'"):
            call(kind, srv.url, "grad", X6, transport="json")


@pytest.mark.parametrize("kind", KINDS)
def test_an_endless_error_answer_is_cut_and_retried_as_before(kind):
    with hostile(endless(503, Content_Type="text/plain", Retry_After="0")) as srv:
        with pytest.raises(scl.ServiceUnavailable) as info:
            call(kind, srv.url, "grad", X6, transport="json", client={"retries": 2})
    assert srv.requests == 3
    assert info.value.message.startswith("[[[")
    assert srv.sent < 3 * 16 * MiB, srv.sent


# ---------------------------------------------------------------------------------------------
# the deadline


def test_the_default_deadline_and_how_timeout_sets_it():
    assert scl.SurrogateClient().deadline == 60.0  # 2 x the default 30 s timeout
    assert scl.SurrogateClient(timeout=10.0).deadline == 60.0
    assert scl.SurrogateClient(timeout=100.0).deadline == 200.0  # a longer timeout keeps its waits
    assert scl.SurrogateClient(timeout=None).deadline is None  # no timeouts asked for: none at all
    assert scl.AsyncSurrogateClient(deadline=5.0).deadline == 5.0
    assert scl.SurrogateClient(deadline=None).deadline is None
    with pytest.raises(ValueError, match="deadline"):
        scl.SurrogateClient(deadline=0)


TRICKLED_BODY = head(Content_Type="application/json", Content_Length=100_000)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickle_of_bytes_ends_at_the_deadline(kind, where):
    # one byte every 0.3 s: no read ever waits its 30 s timeout, yet the call ends at 1.5 s
    prefix, byte = (TRICKLED_BODY, b" ") if where == "body" else (b"HTTP/1.1 200 OK\r\n", b"X")
    with hostile(trickle(prefix, byte)) as srv:
        start = time.monotonic()
        with pytest.raises(scl.Timeout, match=r"deadline of 1\.5 s"):
            call(kind, srv.url, "grad", X6, transport="json", client={"deadline": 1.5})
        assert time.monotonic() - start < 10  # rather than the 30 s of the trickle


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_at_the_deadline(kind):
    with hostile(fixed(b'{"error": {"code": "unavailable", "message": "busy"}}', 503,
                       Content_Type="application/json", Retry_After="1")) as srv, pytest.raises(scl.ServiceUnavailable):
        call(kind, srv.url, "grad", X6, transport="json", client={"deadline": 2.5, "retries": 10})
    assert 2 <= srv.requests <= 3  # at 0, 1 and 2 s; the pause to 3 s would end past the deadline


# ---------------------------------------------------------------------------------------------
# dtype and shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"dtype": "object"}, "dtype 'object'"),
        ({"dtype": "U3"}, "dtype 'U3'"),
        ({"grad": ["0.5"] * 6}, "<U3 values"),
        ({"grad": [True] * 6}, "bool values"),
        ({"grad": [{"a": 1}] * 6}, "object values"),
        ({"shape": ["6"]}, "shape"),
    ],
    ids=["object", "U3", "strings", "booleans", "objects", "shape-strings"],
)
def test_json_results_of_undocumented_dtypes_are_refused_and_not_retried(kind, fields, match):
    with hostile(fixed(json_body(doc(**fields)), Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match=match):
            call(kind, srv.url, "grad", X6, transport="json", client={"retries": 3})
    assert srv.requests == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("array", "named", "match"),
    [
        (np.full(32, 0.5, np.float32), "object", "dtype 'object'"),
        (np.full(32, 0.5, np.float32), "U3", "dtype 'U3'"),
        (np.full(32, 0.5, np.float64), "float32", "holds float64 for a float32 result"),
        (np.full(32, 0.5, np.longdouble), "float32", "expected float16, float32 or float64"),
    ],
    ids=["object", "U3", "float64-as-float32", "longdouble"],
)
def test_npy_results_of_undocumented_dtypes_are_refused(kind, array, named, match):
    answer = fixed(npy(array), Content_Type="application/x-npy", X_Surrogate_Dtype=named)
    with hostile(answer) as srv, pytest.raises(scl.DecodingError, match=match):
        call(kind, srv.url, "grad", np.zeros(32, np.float32), client={"retries": 3})
    assert srv.requests == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_deep_json_answer_is_a_decoding_error(kind):
    deep = b'{"surrogate": "x", "dtype": "float32", "shape": [6], "grad": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    assert len(deep) < JSON6_CAP
    with hostile(fixed(deep, Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match="nested too deeply"):
            call(kind, srv.url, "grad", X6, transport="json")
    with hostile(fixed(b"[" * 20000 + b"]" * 20000, Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match="nested too deeply"):
            call(kind, srv.url, "info")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("transport", "answer"),
    [
        ("json", fixed(json_body(doc(shape=[3, 2], grad=[[0.5, 0.5]] * 3)), Content_Type="application/json")),
        ("json", fixed(json_body(doc(shape=[6], grad=[[0.5, 0.5]] * 3)), Content_Type="application/json")),
        ("json", fixed(json_body(doc(shape=[3, 2], grad=[0.5] * 6)), Content_Type="application/json")),
        ("npy", fixed(npy(np.full((3, 2), 0.5, np.float32)), Content_Type="application/x-npy",
                      X_Surrogate_Dtype="float32")),
    ],
    ids=["json", "json-values", "json-shape", "npy"],
)
def test_a_result_of_another_shape_is_not_reshaped(kind, transport, answer):
    with hostile(answer) as srv, pytest.raises(scl.DecodingError, match=r"shape \(3, 2\)|shape \(6,\)"):
        call(kind, srv.url, "grad", X6, transport=transport)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_result_of_another_shape_is_refused(kind):
    answer = [doc(shape=[2], grad=[0.5, 0.5]), doc(shape=[3, 2], grad=[[0.5, 0.5]] * 3)]
    with hostile(fixed(json_body(answer), Content_Type="application/json")) as srv:
        with pytest.raises(scl.DecodingError, match=r"shape \(3, 2\).*\(6,\)"):
            call(kind, srv.url, "batch", "grad", [{"x": [0.5, 1.0]}, {"x": X6}])


# ---------------------------------------------------------------------------------------------
# the cap is never below a correct answer


# the longest text of each dtype (orjson, as the service writes JSON), found by trying every float16
# and bfloat16 value and every decade of float32 and float64
LONGEST = {"float32": -1.8028688e-06, "float64": -2.2250738585072014e-308, "float16": -1.0728836e-06,
           "bfloat16": -1.0058284e-06}


@pytest.mark.parametrize("dtype", list(LONGEST))
@pytest.mark.parametrize("shape", [(), (6,), (3, 2), (1000, 0), (2, 0, 3), (0,), (5, 1, 1, 1), (70000,)])
def test_the_cap_holds_the_longest_answer_the_service_writes(dtype, shape):
    """The service's own encoders, on values with the longest text of each dtype and the longest
    surrogate name: both encodings fit the client's estimate (before its margin)."""
    import ml_dtypes
    import orjson

    import surrogate_core as core
    from service.protocols.tensors.arrays import encode_json, for_json
    from service.protocols.tensors.jsonout import result_pieces
    from service.protocols.tensors.npy import npy_parts
    from service.protocols.v1.codec import result_dict
    from surrogate_client import _wire as W

    wire = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    a = np.full(shape, LONGEST[dtype], np.float64).astype(wire[dtype])
    name = max(core.names(), key=len)
    fields = {"surrogate": name, "dtype": dtype, "shape": list(shape)}
    texts = [encode_json(result_dict("grad", name, dtype, a)), b"".join(result_pieces(fields, "grad", for_json(a)))]
    assert max(map(len, texts)) <= W.answer_bytes(shape, dtype, binary=False)
    if a.size:  # the values have the longest text: 24 characters for float64, 16 for the others
        one = orjson.dumps(for_json(a).reshape(-1)[:1], option=orjson.OPT_SERIALIZE_NUMPY)
        assert len(one) - 2 == (24 if dtype == "float64" else 16), one
    header, data = npy_parts(a)
    assert len(header) + len(data) <= W.answer_bytes(shape, dtype, binary=True)


def test_the_requests_are_as_before():
    """The caps change nothing the server sees: Accept-Encoding is httpx's own (brotli >= 1.2 here)."""
    import httpx

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=doc())

    with scl.SurrogateClient("http://svc", http_transport=httpx.MockTransport(handler)) as c:
        c.grad(X6, transport="json")
    with httpx.Client() as plain:
        assert seen[0].headers["accept-encoding"] == plain.headers["accept-encoding"] == "gzip, deflate, br"


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_workers():
    """The blocking client's calls run in reused worker threads; a forked child has none of its parent's."""
    import multiprocessing

    with hostile(fixed(json_body(doc()), Content_Type="application/json")) as srv:
        assert call("sync", srv.url, "grad", X6, transport="json").shape == (6,)  # a worker is now idle
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_grad_or_exit, args=(srv.url,))
        child.start()
        child.join(30)
    assert child.exitcode == 0


def _grad_or_exit(url: str) -> None:
    import os

    try:
        ok = call("sync", url, "grad", X6, transport="json", client={"deadline": 10.0}).shape == (6,)
    except Exception:
        ok = False
    os._exit(0 if ok else 1)
