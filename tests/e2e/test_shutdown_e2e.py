"""Against a real server: SIGTERM in the middle of a burst answers or refuses every connection,
and resets none."""

from __future__ import annotations

import collections
import errno
import json
import signal
import socket
import threading
import time

import pytest

from liveserver import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = json.dumps({"x": [-0.5, 0.0, 0.5], "alpha": 1.0}).encode()
REQUEST = (
    b"POST /v1/grad HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
)


def one_client(port: int) -> str:
    """One connection, one request: the answer's status ("200", "503"), or how it failed. A reset
    after the request was sent ("reset") is what must not happen: the client cannot tell whether
    the request was served."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        # the listener closed while the handshake was under way: connect() fails, no byte of the
        # request was sent, so the client knows that nothing was done (as with a refusal)
        return "refused in the handshake"
    except OSError as exc:
        return f"connect error {errno.errorcode.get(exc.errno, exc.errno)}"
    with s:
        try:
            s.sendall(REQUEST)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            return "reset"
        except BrokenPipeError:
            return "reset (broken pipe)"
        except OSError as exc:
            return f"error {errno.errorcode.get(exc.errno, exc.errno)}"
    if not answer:
        return "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()[1].decode()
    if status == "200":
        assert json.loads(body)["grad"] == [0.5, 1.0, 0.5]  # piecewise_quadratic, alpha = 1: 1 - |x|
    elif status == "503":
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["status"] == 503
    return status


def burst(port: int, proc, n: int = 200) -> collections.Counter:
    outcomes: list[str] = []
    lock = threading.Lock()

    def run():
        outcome = one_client(port)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for i, t in enumerate(threads):
        t.start()
        if i == n // 2:
            proc.send_signal(signal.SIGTERM)
        if i % 10 == 0:
            time.sleep(0.01)  # a burst spread a little in time: some before the listener closes, some after
    for t in threads:
        t.join()
    return collections.Counter(outcomes)


@pytest.mark.parametrize("drain", [0.5, 0.05])  # the default; short, so the burst outlasts the listener
def test_sigterm_in_a_burst_answers_or_refuses_every_connection(drain):
    with running_server(shutdown_drain=drain) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        assert one_client(port) == "200"
        outcomes = burst(port, proc, 300)
        code = proc.wait(timeout=60)
    assert set(outcomes) <= {"200", "503", "refused", "refused in the handshake"}, outcomes
    assert outcomes["200"] + outcomes["503"] > 0, outcomes
    assert code == 0


def test_readiness_is_503_while_draining_and_in_flight_requests_finish():
    with running_server(shutdown_drain=3.0) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))  # a kept-alive connection, idle at SIGTERM
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # well inside the 3 s drain: the listener is still open
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"connection: close" in answer.lower()
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "shutting_down"
        # the idle connection is answered too, not reset, when its request comes during the drain
        with idle:
            idle.settimeout(30)
            idle.sendall(REQUEST)
            answer = b""
            while chunk := idle.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert proc.wait(timeout=60) == 0



def hammer(port: int, proc, threads: int = 12) -> collections.Counter:
    """``threads`` clients connect back to back, each until it is not answered; SIGTERM after 0.5 s."""
    outcomes: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def run():
        while True:
            outcome = one_client(port)
            with lock:
                outcomes[outcome] += 1
            if outcome not in ("200", "503"):
                return

    clients = [threading.Thread(target=run) for _ in range(threads)]
    for t in clients:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    for t in clients:
        t.join(timeout=90)
    return outcomes


def test_connections_hammered_at_the_close_are_answered_or_refused_never_reset():
    """Clients that connect back to back while the listener closes: one whose handshake completed
    between the drain's last accept and the close used to be reset (its request sent, no answer).
    The listener now stops completing handshakes before its last accept: such a client is refused."""
    for _ in range(3):  # each round has a chance of a connection landing in that window
        with running_server(shutdown_drain=0.05) as (base, proc):
            outcomes = hammer(int(base.rsplit(":", 1)[1]), proc)
            code = proc.wait(timeout=60)
        assert set(outcomes) <= {"200", "503", "refused", "refused in the handshake"}, outcomes
        assert outcomes["refused"] + outcomes["refused in the handshake"] == 12, outcomes
        assert code == 0
