"""Memory held by refused requests, against a real server: a refused large body is let go when its
refusal is sent (no exception, traceback or future keeps it), a client's value is never echoed
whole, and an answer to a client that stopped reading is dropped with its connection.

Memory is read from ``/proc/<pid>/status``. Each case first sends a few refusals of its own kind,
so that the allocator has made the arenas that kind of request uses, then measures the resident
size after 20 more against the size before them: memory that returned stays near the start,
memory held by a reference cycle grows by about a body (and what was decoded from it) each time.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from liveserver import info, metric, npy, proc_status_bytes, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = 1 << 20
BODY = 16 * MiB


def post(port: int, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body=body, headers={"content-type": ctype})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def numbers_then_null(size: int) -> bytes:
    """A JSON array of about ``size`` bytes of numbers whose last element is null."""
    return b"[" + b"0.5," * ((size - 8) // 4) + b"null]"


def v1_null(size: int) -> bytes:
    return b'{"x":' + numbers_then_null(size) + b"}"


def v2_null(size: int) -> bytes:
    data = numbers_then_null(size)
    n = data.count(b",") + 1
    return (b'{"inputs":[{"name":"x","shape":[%d],"datatype":"FP64","data":' % n) + data + b"}]}"


def v1_dtype(size: int) -> bytes:
    return b'{"x":[1.0],"dtype":"' + b"a" * size + b'"}'


CASES = {
    "v1 null": ("/v1/grad", v1_null, 422),
    "v2 null": ("/v2/models/sigmoid/infer", v2_null, 400),
    "v1 dtype": ("/v1/grad", v1_dtype, 422),
}


@pytest.fixture(scope="module")
def server():
    with running_server(memory_budget=1 << 30, send_timeout=2) as (base, proc):
        yield int(base.rsplit(":", 1)[1]), proc.pid


@pytest.mark.parametrize("case", list(CASES))
def test_refused_large_bodies_give_their_memory_back(server, case):
    port, pid = server
    path, make, status = CASES[case]
    body = make(BODY)
    for _ in range(3):  # the allocator's arenas for this kind of request
        assert post(port, path, body)[0] == status
    time.sleep(0.5)
    start = proc_status_bytes(pid, "VmRSS")
    for _ in range(20):
        code, data = post(port, path, body)
        assert code == status
        assert len(data) < 1024  # the refusal names the problem; it does not repeat the body
    time.sleep(0.5)
    grown = proc_status_bytes(pid, "VmRSS") - start
    print(f"{case}: 20 refused {len(body) / MiB:.0f} MiB bodies, RSS {grown / MiB:+.0f} MiB")
    assert grown < 3 * BODY  # (before: about 160 MiB a request, 3 GiB over the 20)
    assert info(port)["memory"]["in_use"] == 0


@contextlib.contextmanager
def unread(port: int, request: bytes, n: int = 8) -> Iterator[list[socket.socket]]:
    """``n`` connections that send ``request`` and do not read (a 4 KiB receive buffer each)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def test_echoed_values_are_cut_even_to_clients_that_never_read(server):
    """8 large dtype values on sockets that never read: each refusal is a few hundred bytes."""
    port, pid = server
    body = v1_dtype(32 * MiB)
    request = (f"POST /v1/grad HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    start = proc_status_bytes(pid, "VmRSS")
    with unread(port, request) as socks:
        time.sleep(1.0)
        grown = proc_status_bytes(pid, "VmRSS") - start
        print(f"8 x 32 MiB dtype values, unread refusals: RSS {grown / MiB:+.0f} MiB")
        assert grown < 8 * 32 * MiB
        for s in socks:  # each refusal is whole, and small
            s.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            assert length < 1024


def sockets(pid: int) -> int:
    """The server's open sockets (its listening socket and connections)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def test_answers_to_clients_that_stop_reading_are_dropped_with_the_connection(server):
    """8 connections ask for a 16 MiB .npy answer and never read it: past the send timeout each is
    counted as ``send_timeout``, and its connection is closed at once with what was queued for it
    (a graceful close would wait, with the answer's last pieces, for the client to read)."""
    port, pid = server
    body = npy(np.linspace(-1, 1, 4 * MiB, dtype=np.float32))
    request = (f"POST /v1/grad HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-npy\r\naccept: application/x-npy\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    assert post(port, "/v1/grad", body, "application/x-npy")[0] == 200  # warm: compiled
    time.sleep(0.5)
    open_before = sockets(pid)
    cut = metric(port, 'surrogate_rejections_total{reason="send_timeout"}')
    start = proc_status_bytes(pid, "VmRSS")
    with unread(port, request):
        deadline = time.monotonic() + 30
        while metric(port, 'surrogate_rejections_total{reason="send_timeout"}') < cut + 8:
            assert time.monotonic() < deadline, "the slow readers were not cut off"
            time.sleep(0.2)
        time.sleep(0.5)
        grown = proc_status_bytes(pid, "VmRSS") - start
        print(f"8 x 16 MiB answers, unread, sockets open: RSS {grown / MiB:+.0f} MiB after the send timeout")
        assert info(port)["memory"]["in_use"] == 0
        # (before: 8 more, open as long as the clients were). The server closes its side of the probe
        # connection just used (info, metric) once it reads the client's close: let it.
        settle = time.monotonic() + 2
        while sockets(pid) != open_before and time.monotonic() < settle:
            time.sleep(0.05)
        assert sockets(pid) == open_before
