"""Against a real server: the size and time limits on a request's line and headers."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from liveserver import rss_bytes, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 8192
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server():
    with running_server(max_header_bytes=LIMIT, header_timeout=TIMEOUT) as (base, proc):
        yield base, int(base.rsplit(":", 1)[1]), proc


def head_of(size: int, path: str = "/healthz", method: str = "GET", extra: bytes = b"") -> bytes:
    """A request head of exactly ``size`` bytes, request line to blank line included."""
    start = f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"X-Pad: "
    end = b"\r\n\r\n"
    head = start + b"p" * (size - len(start) - len(end)) + end
    assert len(head) == size
    return head


def exchange(port: int, data: bytes, *, wait: float = 30.0) -> tuple[int, dict, bytes, bool]:
    """Send ``data``, read one answer: (status, headers, body, whether the server then closed)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed without an answer after {buf!r}"
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers["content-length"]):
            chunk = s.recv(65536)
            assert chunk
            body += chunk
        closed = headers.get("connection") == "close" and s.recv(1) == b""
        return status, headers, body, closed


def test_a_head_of_exactly_the_limit_is_served(server):
    _, port, _ = server
    status, _, body, _ = exchange(port, head_of(LIMIT))
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_one_byte_past_the_limit_is_431_and_the_connection_closes(server):
    _, port, _ = server
    status, headers, body, closed = exchange(port, head_of(LIMIT + 1))
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "error": {
            "status": 431,
            "code": "headers_too_large",
            "message": f"the request line and headers exceed {LIMIT} bytes",
            "job": None,
            "field": None,
        }
    }
    assert closed


def test_the_body_does_not_count_towards_the_head(server):
    _, port, _ = server
    body = json.dumps({"x": [0.5] * 4000}).encode()  # 20 kB, over the head limit on its own
    extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
    status, _, answer, _ = exchange(port, head_of(LIMIT, "/v1/grad", "POST", extra) + body)
    assert status == 200
    assert json.loads(answer)["grad"] == [0.5] * 4000


def test_a_second_request_on_the_connection_has_a_limit_of_its_own(server):
    _, port, _ = server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        pad = "p" * (LIMIT - 200)
        for _ in range(5):  # five heads just under the limit on one kept-alive connection
            assert c.get("/healthz", headers={"x-pad": pad}).status_code == 200
        assert c.get("/healthz", headers={"x-pad": pad + "p" * 200}).status_code == 431


def test_unfinished_huge_heads_are_cut_off_and_memory_stays_bounded(server):
    base, port, proc = server
    before = rss_bytes(proc.pid)
    answers: list[bytes] = []

    def flood():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(30)
            try:  # 16 MB of one header line that never ends
                s.sendall(b"GET /healthz HTTP/1.1\r\nX-Flood: " + b"f" * (16 << 20))
            except OSError:
                pass  # the server may close before all of it is sent
            try:
                answers.append(s.recv(200))
            except OSError as exc:
                answers.append(repr(exc).encode())

    threads = [threading.Thread(target=flood) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grown = rss_bytes(proc.pid) - before
    # 20 x 16 MB were offered; without the limit the parser holds all of it
    assert grown < 64 << 20, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert sum(a.startswith(b"HTTP/1.1 431 ") for a in answers) >= 15, answers
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200


def test_a_head_that_never_completes_is_408_after_the_timeout(server):
    base, port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)  # far above the server's 1 s: only a server that never times out fails
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, body = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    error = json.loads(body.split(b"\r\n\r\n", 1)[1])["error"]
    assert (error["status"], error["code"]) == (408, "request_timeout")
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200


def test_a_connection_that_sends_nothing_is_closed_quietly(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        assert s.recv(100) == b""
