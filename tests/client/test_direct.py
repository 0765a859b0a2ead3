"""The blocking client's own HTTP/1.1 (plain ``http://`` without a proxy): the requests are those
httpx sends, one connection carries call after call, a connection the server dropped is replaced,
a call with a deadline stays on the caller's thread, and the .npz it writes is what NumPy reads.

The servers here are real sockets on loopback ports that record what they receive."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import LoopbackServer

import surrogate_client as scl
from surrogate_client import _client, _wire

X6 = [0.5, -0.5, 0.0, 1.0, -1.0, 2.0]
DOC = {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [6], "grad": [0.5] * 6}


class Recorder(LoopbackServer):
    """An HTTP/1.1 server on a loopback port: it records each request (head lines and body) and
    answers ``DOC`` as JSON, keeping the connection open unless ``close_after`` says otherwise."""

    def __init__(self, close_after: bool = False, answer: Callable[[bytes], bytes] | None = None) -> None:
        super().__init__()
        self.close_after = close_after
        self.answer = answer
        self.requests: list[tuple[list[str], bytes]] = []
        self.start()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        with conn, contextlib.suppress(OSError):
            while not self.stop.is_set():
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                while len(data) < length:
                    data += conn.recv(65536)
                body, data = data[:length], data[length:]
                self.requests.append((lines, body))
                payload = json.dumps(DOC).encode() if self.answer is None else self.answer(body)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                if self.close_after:
                    return



@contextlib.contextmanager
def recorder(**kw: Any) -> Iterator[Recorder]:
    server = Recorder(**kw)
    try:
        yield server
    finally:
        server.close()


def headers_of(lines: list[str]) -> dict[str, str]:
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


@pytest.mark.parametrize("call", [
    lambda c: c.grad(X6, transport="json", alpha=2.0),
    lambda c: c.grad(np.linspace(-1, 1, 6, dtype=np.float32), transport="npy", alpha=2.0),
    lambda c: c.grad(np.linspace(-1, 1, 6), cotangent=np.arange(6.0), transport="npy"),
    lambda c: c.info(),
], ids=["json", "npy", "npz", "get"])
def test_the_requests_are_those_httpx_sends(call):
    """Method, target (a path prefix in the base URL included), headers (the client's, the call's,
    a token) and body: the same through the client's own HTTP/1.1 and through httpx."""
    options = {"token": "s3cret", "headers": {"X-Trace": "abc"}, "retries": 0}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=DOC if request.method == "POST" else {})

    with recorder(answer=lambda body: json.dumps(DOC).encode()) as srv:
        with scl.SurrogateClient(srv.url + "/prefix", **options) as c, contextlib.suppress(scl.DecodingError):
            call(c)
        with scl.SurrogateClient(srv.url + "/prefix", http_transport=httpx.MockTransport(handler), **options) as c, \
                contextlib.suppress(scl.DecodingError):
            call(c)
    (lines, body), = srv.requests
    want = seen[0]
    method, target, version = lines[0].split(" ")
    assert (method, version) == (want.method, "HTTP/1.1")
    assert target == want.url.raw_path.decode()
    assert target.startswith("/prefix/v1/")
    got = headers_of(lines)
    expected = {k.lower(): v for k, v in want.headers.items()}
    expected["host"] = f"127.0.0.1:{srv.port}"  # (the mock was given the same base URL)
    got.pop("connection", None)
    expected.pop("connection", None)
    assert got == expected
    assert got["authorization"] == "Bearer s3cret" and got["x-trace"] == "abc"
    assert body == want.content


def test_one_connection_carries_every_call():
    with recorder() as srv, scl.SurrogateClient(srv.url, retries=0) as c:
        for _ in range(5):
            assert c.grad(X6, transport="json").shape == (6,)
    assert srv.connections == 1 and len(srv.requests) == 5


def test_a_connection_the_server_dropped_is_replaced():
    """The server closes each connection after its answer without saying so (no Connection: close),
    as a server does with a connection idle past its keep-alive timeout: the next call sees it
    closed and opens a new one, without a retry (none allowed here) or a pause."""
    with recorder(close_after=True) as srv, scl.SurrogateClient(srv.url, retries=0) as c:
        for _ in range(3):
            assert c.grad(X6, transport="json").shape == (6,)
            time.sleep(0.2)  # the server's close arrives
    assert srv.connections == 3 and len(srv.requests) == 3


def test_an_answer_cut_short_is_a_transport_error():
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"grad\"")

    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            answer(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with scl.SurrogateClient(f"http://127.0.0.1:{srv.getsockname()[1]}", retries=0, deadline=10) as c, \
            pytest.raises(scl.TransportError) as info:
        c.grad(X6, transport="json")
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    t.join(10)
    srv.close()


def test_an_answer_sent_before_the_body_was_read_is_the_error_raised():
    """A server that refuses a large body from its head alone (413) and closes without reading it:
    the client's send fails, and the answer it got is the error raised, not a transport error."""
    srv = socket.create_server(("127.0.0.1", 0))
    error = b'{"error": {"code": "body_too_large", "message": "request body too large"}}'

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(error)}\r\n\r\n".encode() + error)
            time.sleep(0.2)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with scl.SurrogateClient(f"http://127.0.0.1:{srv.getsockname()[1]}", retries=0, deadline=20) as c, \
            pytest.raises(scl.PayloadTooLarge) as info:
        c.grad(np.zeros(8_000_000, np.float32))
    assert info.value.code == "body_too_large"
    t.join(10)
    srv.close()


def test_calls_with_a_deadline_stay_on_the_callers_thread(monkeypatch, server_url):
    def no_workers(job: Any) -> None:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(_client._WORKERS, "run", no_workers)
    x = np.linspace(-2, 2, 64, dtype=np.float32)
    with scl.SurrogateClient(server_url, deadline=30.0) as c:
        assert c.deadline == 30.0
        np.testing.assert_array_equal(c.grad(x, alpha=1.0), c.grad(x.tolist(), transport="json", alpha=1.0))


def test_a_path_in_the_base_url_keeps_its_escapes():
    with recorder() as srv, scl.SurrogateClient(srv.url + "/a%20b", retries=0) as c:
        assert c.grad(X6, transport="json").shape == (6,)
    assert srv.requests[0][0][0] == "POST /a%20b/v1/grad HTTP/1.1"


def test_a_forked_child_opens_its_own_connection():
    import multiprocessing
    import os

    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    with recorder() as srv:
        with scl.SurrogateClient(srv.url, retries=0) as c:
            assert c.grad(X6, transport="json").shape == (6,)  # a connection is now idle
            child = multiprocessing.get_context("fork").Process(target=_grad_or_exit, args=(c,))
            child.start()
            child.join(30)
            assert c.grad(X6, transport="json").shape == (6,)  # the parent's is still its own
        assert child.exitcode == 0
        assert srv.connections == 2


def _grad_or_exit(c: scl.SurrogateClient) -> None:
    import os

    try:
        ok = c.grad(X6, transport="json").shape == (6,)
    except Exception:
        ok = False
    os._exit(0 if ok else 1)


def test_a_host_name_is_resolved_within_the_deadline():
    with recorder() as srv, scl.SurrogateClient(f"http://localhost:{srv.port}", retries=0, deadline=10) as c:
        assert c.grad(X6, transport="json").shape == (6,)
    assert headers_of(srv.requests[0][0])["host"] == f"localhost:{srv.port}"


def test_a_configured_proxy_is_used(monkeypatch):
    """With HTTP_PROXY set the request goes to the proxy, as httpx sends it (absolute URL)."""
    with recorder() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with scl.SurrogateClient("http://svc.invalid:8000", retries=0) as c:
            assert c.grad(X6, transport="json").shape == (6,)
    assert proxy.requests[0][0][0] == "POST http://svc.invalid:8000/v1/grad HTTP/1.1"


CASES = [
    {"x": np.linspace(-2, 2, 512, dtype=np.float32).reshape(16, 32), "cotangent": np.ones((16, 32), np.float32)},
    {"x": np.array(3.5), "alpha": np.arange(6).reshape(2, 3)},  # 0-d; integers travel as float64
    {"x": np.zeros((0, 3), np.float16), "cotangent": np.asfortranarray(np.arange(20.0).reshape(4, 5))},
    {"x": np.arange(6, dtype=">f4"), "cotangent": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3e38], np.float32)},
]


@pytest.mark.parametrize("arrays", CASES, ids=["16x32", "0-d-and-int", "empty-and-fortran", "big-endian-nonfinite"])
def test_the_npz_the_client_writes_is_what_numpy_reads(arrays):
    arrays = {k: _wire.as_array(v, k) for k, v in arrays.items()}
    body = _wire._npz_bytes(arrays)
    reference = io.BytesIO()
    np.savez(reference, **{k: _wire._wire_array(v) for k, v in arrays.items()})
    with np.load(io.BytesIO(bytes(body))) as got, np.load(io.BytesIO(reference.getvalue())) as want:
        assert got.files == want.files == list(arrays)
        for k in got.files:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            assert got[k].tobytes() == want[k].tobytes()  # bit for bit
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as zf:
        assert zf.testzip() is None  # every CRC-32 right
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
