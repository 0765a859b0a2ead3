"""Against a real server with two worker processes: SIGTERM drains it as it drains one process.

The parent passes SIGTERM on to the workers at once; each answers new requests 503 for the drain
period, then closes its listener, and lets its requests in flight finish. New connections are then
refused (not left waiting in a listen queue that nobody accepts from, then reset), and the parent
exits, 0, when every worker has.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest
from liveserver import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

X = [-0.5, 0.0, 0.5]
BODY = json.dumps({"x": X, "alpha": 1.0}).encode()
GRAD = [0.5, 1.0, 0.5]  # piecewise_quadratic, alpha = 1: 1 - |x|, by hand
HEAD = (
    b"POST /v1/grad HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
)
#: how long a client waits for an answer before it counts as hung (the drain is well under a second)
HUNG = 10.0


def read_answer(s: socket.socket) -> str:
    """The status of the answer on ``s`` (checked: 200 with the right gradient, or 503 that closes)."""
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    if not answer:
        return "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()[1].decode()
    if status == "200":
        assert json.loads(body)["grad"] == GRAD
    elif status == "503":
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "shutting_down"
    return status


def one_client(port: int) -> str:
    """One connection, one request: the answer's status, or how it failed ("reset" after the request
    was sent, or "hung", must not happen)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=HUNG)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "refused in the handshake"  # no byte of the request was sent
    except TimeoutError:
        return "hung in the handshake"
    except OSError as exc:
        return f"connect error {errno.errorcode.get(exc.errno, exc.errno)}"
    with s:
        try:
            s.sendall(HEAD + BODY)
            return read_answer(s)
        except TimeoutError:
            return "hung"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except OSError as exc:
            return f"error {errno.errorcode.get(exc.errno, exc.errno)}"


def test_sigterm_in_a_burst_answers_or_refuses_every_connection():
    drain, graceful = 0.3, 5.0
    with running_server(workers=2, shutdown_drain=drain, graceful_timeout=graceful) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        assert one_client(port) == "200"
        outcomes: list[str] = []
        lock = threading.Lock()

        def run() -> None:
            outcome = one_client(port)
            with lock:
                outcomes.append(outcome)

        # clients over about 3 s, SIGTERM after the first second: some are served before it, some
        # during the drain, and the rest come after the listener closed
        threads = []
        start = time.monotonic()
        sent = None
        while time.monotonic() - start < 3.0:
            t = threading.Thread(target=run)
            t.start()
            threads.append(t)
            if sent is None and time.monotonic() - start > 1.0:
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
            time.sleep(0.01)
        code = proc.wait(timeout=drain + graceful + 30)
        exited = time.monotonic() - sent
        for t in threads:
            t.join(timeout=HUNG + 5)
            assert not t.is_alive()
    counts = collections.Counter(outcomes)
    assert set(counts) <= {"200", "503", "refused", "refused in the handshake"}, counts
    assert counts["200"] > 0, counts
    assert counts["refused"] > 0, counts
    assert code == 0
    assert exited < drain + graceful + 10


def test_the_drain_answers_503_then_refuses_while_requests_in_flight_finish():
    drain = 1.0
    with running_server(workers=2, shutdown_drain=drain) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        assert one_client(port) == "200"
        # a request in flight at SIGTERM: its body half sent
        held = socket.create_connection(("127.0.0.1", port), timeout=HUNG)
        held.sendall(HEAD + BODY[: len(BODY) // 2])
        time.sleep(0.5)  # admitted, waiting for the rest of its body
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.3)
        # well inside the drain, whichever worker accepts it: 503, not served
        assert one_client(port) == "503"
        # after the drain the listener is closed in every process: refused at once, never left
        # waiting in a listen queue
        outcomes = []
        while time.monotonic() - sent < drain + 8:
            outcome = one_client(port)
            outcomes.append(outcome)
            assert outcome in {"503", "refused"}, outcomes
            if outcome == "refused":
                break
            time.sleep(0.1)
        assert outcomes[-1] == "refused", outcomes
        # the request in flight finishes, and only then does the server exit
        assert proc.poll() is None
        with held:
            held.sendall(BODY[len(BODY) // 2:])
            assert read_answer(held) == "200"
        assert proc.wait(timeout=60) == 0


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_when_their_parent_is_killed():
    """A parent killed without its own stop (SIGKILL, the OOM killer) leaves no worker serving on:
    each gets SIGTERM from the kernel, drains and exits, and the port is then refused."""
    with running_server(workers=2, shutdown_drain=0) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        workers: set[int] = set()
        while time.monotonic() < deadline:  # the two workers, besides multiprocessing's tracker
            workers = {p for p in _children(proc.pid) if b"--multiprocessing-fork" in _cmdline(p)}
            if len(workers) == 2:
                break
            time.sleep(0.1)
        assert len(workers) == 2
        assert one_client(port) == "200"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "workers outlived their killed parent"
        assert one_client(port) == "refused"
