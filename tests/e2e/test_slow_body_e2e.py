"""Against a real server: request bodies that never come, trickle, or carry huge trailers, and
compressed bodies with data after their end.

The server runs with a body timeout of 1 s (``SURROGATE_BODY_TIMEOUT``), a minimum rate of 1024
bytes/s (``SURROGATE_BODY_MIN_RATE``), a 4 KiB head and trailer limit, a bearer token, 8 concurrent
compute requests and a 256 MiB memory budget, so that every bound is reached in seconds. Each test
waits at most 10 s for what the server must do within about 1 s (the request timeout, 30 s, is what
used to end these requests, when anything did).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from liveserver import rss_bytes, running_server
from reference import pq_grad

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MiB = 1 << 20
LIMIT = 4096
TOKEN = "a-token-of-more-than-16-characters"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
WAIT = 10.0  # seconds: far more than the body timeout, far less than the request timeout


@pytest.fixture(scope="module")
def server():
    with running_server(body_timeout=1, body_min_rate=1024, max_header_bytes=LIMIT, api_token=TOKEN,
                        max_concurrent=8, memory_budget=256 * MiB, log_level="warning") as (base, proc):
        yield base, int(base.rsplit(":", 1)[1]), proc


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=WAIT, headers={"Authorization": f"Bearer {TOKEN}"})


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(WAIT)
    return s


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length body, read within WAIT seconds."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer after {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        assert chunk, "closed in the middle of an answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed(s: socket.socket) -> bool:
    """Whether the server ends the connection (EOF or reset) within WAIT seconds."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def grad_request(n: int = 64) -> tuple[bytes, np.ndarray]:
    x = np.linspace(-2.0, 2.0, n)
    body = json.dumps({"x": x.tolist(), "alpha": 1.5}).encode()
    return body, pq_grad(x, 1.5).astype(np.float32)


def assert_grad(answer: dict, want: np.ndarray) -> None:
    assert answer["shape"] == [len(want)]
    np.testing.assert_allclose(np.asarray(answer["grad"], np.float32), want, rtol=1e-6, atol=1e-6)


def compute_ok(base: str) -> None:
    body, want = grad_request()
    with client(base) as c:
        r = c.post("/v1/grad", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert_grad(r.json(), want)


def rejections(base: str, reason: str) -> float:
    with client(base) as c:
        text = c.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f'surrogate_rejections_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def head(path: str, length: int | None, *, auth: bool = True, media: str = "application/json",
         method: str = "POST", extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {media}\r\n".encode() + (AUTH if auth else b"")
            + framing + extra + b"\r\n")


# -- a declared body that never comes -----------------------------------------------------------------

def test_heads_of_large_uploads_hold_no_memory_and_end_at_the_body_timeout(server):
    """Four heads of 64 MiB .npy uploads used to reserve the whole 256 MiB budget (and allocate it)
    until the request timeout: every other compute request got 503 meanwhile."""
    base, port, proc = server
    compute_ok(base)
    rss0 = rss_bytes(proc.pid)
    before = rejections(base, "request_timeout")
    socks = [connect(port) for _ in range(4)]
    for s in socks:
        s.sendall(head("/v1/grad", 64 * MiB, media="application/x-npy"))
    time.sleep(0.3)
    with client(base) as c:
        memory = c.get("/v1/info").json()["memory"]
    assert memory["in_use"] == 0, memory  # nothing arrived: nothing reserved
    assert rss_bytes(proc.pid) - rss0 < 32 * MiB  # nor allocated
    compute_ok(base)  # others are served meanwhile
    for s in socks:
        status, headers, body = read_answer(s)
        assert status == 408, body
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout"
        assert "SURROGATE_BODY_TIMEOUT" in error["message"]
        assert closed(s)
        s.close()
    assert rejections(base, "request_timeout") == before + 4


def test_heads_that_never_send_their_body_give_back_the_concurrency_slots(server):
    """Eight heads with ``Content-Length: 10`` take the eight slots, until the body timeout only."""
    base, port, _ = server
    socks = [connect(port) for _ in range(8)]
    for s in socks:
        s.sendall(head("/v1/grad", 10))
    time.sleep(0.3)
    with client(base) as c:
        body, _ = grad_request()
        r = c.post("/v1/grad", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 503  # the slots are taken...
    assert r.json()["error"]["code"] == "overloaded"
    for s in socks:
        assert read_answer(s)[0] == 408  # ... for the body timeout, not the request timeout
        s.close()
    compute_ok(base)


def test_a_body_that_stalls_is_408_after_the_body_timeout(server):
    _, port, _ = server
    body, _ = grad_request()
    with connect(port) as s:
        t0 = time.monotonic()
        s.sendall(head("/v1/grad", len(body)) + body[:10])
        status, headers, answer = read_answer(s)
        assert status == 408
        assert headers["connection"] == "close"
        assert time.monotonic() - t0 >= 0.9
        assert "no byte of the request body arrived for 1 s" in json.loads(answer)["error"]["message"]
        assert closed(s)


# -- a body that trickles, and one that is slow but steady -------------------------------------------

def test_a_body_trickling_under_the_minimum_rate_is_cut(server):
    """A byte every 0.3 s: never idle for the body timeout, but 3 bytes/s."""
    _, port, _ = server
    body, _ = grad_request()
    with connect(port) as s:
        s.sendall(head("/v1/grad", len(body)))
        s.settimeout(0.3)
        answer = b""
        for i in range(int(WAIT / 0.3)):
            try:
                s.sendall(body[i : i + 1])
                answer = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"fewer than 1024 bytes per second" in answer
        assert i < len(body)  # cut long before the body's end


def test_a_slow_but_steady_upload_is_answered(server):
    """300 bytes every 0.1 s (about 3 KiB/s, three times the minimum) for about 2 s."""
    _, port, _ = server
    body, want = grad_request(300)
    assert 4000 < len(body) < 8000
    with connect(port) as s:
        s.sendall(head("/v1/grad", len(body)))
        for i in range(0, len(body), 300):
            s.sendall(body[i : i + 300])
            time.sleep(0.1)
        status, _, answer = read_answer(s)
    assert status == 200, answer
    assert_grad(json.loads(answer), want)


# -- bodies that are not read: answers before the body ---------------------------------------------

@contextmanager
def trickling(s: socket.socket, every: float = 0.5) -> Iterator[None]:
    """Send a byte every ``every`` seconds on ``s`` while the block runs."""
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(every):
            try:
                s.send(b"x")
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def test_healthz_with_a_body_that_never_comes_is_answered_and_closed_at_the_body_timeout(server):
    """Answered, then closed when the rest of the body stalls for the body timeout (1 s here), not
    at uvicorn's keep-alive timeout (5 s) or never."""
    _, port, _ = server
    with connect(port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n")
        assert read_answer(s)[0] == 200
        s.settimeout(3.0)
        assert closed(s)


@pytest.mark.parametrize("request_head", [
    b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n",
    head("/v1/grad", 100, auth=False),  # no token: 401 at once
], ids=["healthz", "401"])
def test_an_answered_request_trickling_its_body_is_closed(server, request_head):
    """A byte every 0.5 s: each used to restart uvicorn's keep-alive timer, and the connection
    stayed open for as long as the client liked."""
    _, port, _ = server
    with connect(port) as s:
        s.sendall(request_head)
        with trickling(s):
            assert read_answer(s)[0] in (200, 401)
            assert closed(s)


@pytest.mark.parametrize("size", [64 * 1024, 4 * MiB])
def test_a_client_that_writes_its_whole_body_before_reading_gets_an_early_answer(server, size):
    """A 401 answered before the body arrived: the server reads and drops the rest, so a client that
    writes the whole body first (aiohttp, like most) reads the 401 instead of a broken connection;
    the connection then serves the next request."""
    import aiohttp

    base, _, _ = server
    body = b"\x00" * size

    async def go() -> list[int]:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                async with s.get(f"{base}/healthz", data=io.BytesIO(body), headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)
                npy_type = {"content-type": "application/x-npy"}
                async with s.post(f"{base}/v1/grad", data=io.BytesIO(body), headers=npy_type) as r:
                    await r.read()
                    statuses.append(r.status)
            return statuses

    assert asyncio.run(go()) == [200, 401, 200, 401]


# -- chunked trailers -----------------------------------------------------------------------------------

def chunked(body: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))


def trailer_of(size: int) -> bytes:
    """A trailer section of exactly ``size`` bytes (one field, then the blank line)."""
    section = b"X-Trailer: " + b"t" * (size - 15) + b"\r\n\r\n"
    assert len(section) == size
    return section


def test_a_trailer_section_of_exactly_the_limit_is_accepted(server):
    _, port, _ = server
    body, want = grad_request()
    with connect(port) as s:
        s.sendall(head("/v1/grad", None) + chunked(body) + b"0\r\n" + trailer_of(LIMIT))
        status, _, answer = read_answer(s)
    assert status == 200, answer
    assert_grad(json.loads(answer), want)


def test_one_trailer_byte_past_the_limit_is_431_and_closes(server):
    base, port, _ = server
    before = rejections(base, "headers_too_large")
    body, _ = grad_request()
    with connect(port) as s:
        s.sendall(head("/v1/grad", None) + chunked(body) + b"0\r\n" + trailer_of(LIMIT + 1))
        status, headers, answer = read_answer(s)
        assert status == 431
        assert headers["connection"] == "close"
        assert json.loads(answer)["error"] == {"status": 431, "code": "headers_too_large", "job": None,
                                               "field": None, "message": f"the trailer fields exceed {LIMIT} bytes"}
        assert closed(s)
    assert rejections(base, "headers_too_large") == before + 1


@pytest.mark.parametrize("auth", [True, False], ids=["token", "no-token"])
def test_a_64_mib_trailer_is_refused_without_holding_memory_or_the_loop(server, auth):
    """Used to be parsed whole (before auth): +128 MiB, and /healthz blocked for seconds."""
    _, port, proc = server
    rss0 = rss_bytes(proc.pid)
    body, _ = grad_request()
    probes: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # /healthz from another connection, all along: each answer's round trip
        while True:
            t = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            try:
                c.request("GET", "/healthz")
                ok = c.getresponse().status == 200
            except OSError:
                ok = False
            c.close()
            probes.append(time.perf_counter() - t if ok else float("inf"))
            if stop.wait(0.05):
                return

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    with connect(port) as s:
        s.sendall(head("/v1/grad", None, auth=auth) + chunked(body) + b"0\r\nX-Flood: ")
        piece = b"f" * MiB
        try:
            for _ in range(64):
                s.sendall(piece)
        except OSError:
            pass  # the server closed the connection: the rest is not sent
        status, _, _ = read_answer(s)
        # without the token: 401 when the app answers before the trailer arrives, else 431
        assert status == 431 if auth else status in (401, 431)
        assert closed(s)
    stop.set()
    prober.join()
    assert probes
    assert max(probes) < WAIT
    assert rss_bytes(proc.pid) - rss0 < 32 * MiB


# -- compressed bodies with data after their end -------------------------------------------------------

@pytest.mark.parametrize(("encoding", "tail"), [
    ("gzip", b"garbage"),
    ("gzip", gzip.compress(b'{"inputs": []}')),  # a second member
    ("deflate", b"garbage"),
])
def test_data_after_a_compressed_body_is_400_naming_content_encoding(server, encoding, tail):
    base, _, _ = server
    x = np.linspace(-2.0, 2.0, 64)
    body = json.dumps({"inputs": [{"name": "x", "shape": [64], "datatype": "FP64", "data": x.tolist()}],
                       "outputs": [{"name": "grad"}]}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    with client(base) as c:
        r = c.post("/v2/models/piecewise_quadratic/infer", content=packed + tail, headers=headers)
        assert r.status_code == 400, r.text
        message = r.json()["error"]
        assert f"Content-Encoding {encoding}" in message
        assert "after the end" in message
        r = c.post("/v2/models/piecewise_quadratic/infer", content=packed, headers=headers)  # the stream alone
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["outputs"][0]["data"], pq_grad(x, 1.0))
