"""Against a real server: a huge zero-size result answered as JSON (tens of megabytes of nested empty
lists from a 128-byte ``.npy``) is right, the server stays responsive while it is made and sent, and
the process's peak memory grows by about what the request reserved, not by many times its text."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import orjson
import pytest
from liveserver import npy, proc_status_bytes, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NPY = "application/x-npy"
MiB = 1 << 20


def reset_peak(pid: int) -> None:
    """Reset the process's peak resident size (VmHWM) to its present size (Linux ``clear_refs``)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


@pytest.mark.parametrize(("op", "shape"), [("grad", (16_777_216, 0)), ("spike", (2, 8_388_608, 0))], ids=str)
def test_a_huge_zero_size_json_answer_is_right_prompt_and_within_its_reservation(op, shape):
    with running_server() as (base, proc), httpx.Client(base_url=base, timeout=60) as c:
        assert c.post(f"/v1/{op}", json={"x": [1.0]}).status_code == 200  # compiled, warm
        body = npy(np.zeros(shape, np.float32))
        assert len(body) == 128
        peak_before = c.get("/v1/info").json()["memory"]["peak"]
        reset_peak(proc.pid)
        start = proc_status_bytes(proc.pid, "VmHWM")

        waits: list[float] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=base, timeout=30) as h:
                while not done.is_set():
                    t = time.perf_counter()
                    assert h.get("/healthz").status_code == 200
                    waits.append(time.perf_counter() - t)
                    time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            r = c.post(f"/v1/{op}", content=body, headers={"content-type": NPY, "accept": "application/json"})
        finally:
            done.set()
            poller.join()
        grown = proc_status_bytes(proc.pid, "VmHWM") - start
        info = c.get("/v1/info").json()["memory"]

    assert r.status_code == 200, r.text[:200]
    inner = b"[" + b"[]," * (shape[-2] - 1) + b"[]]"  # one list of shape[-2] empty lists
    text = inner if len(shape) == 2 else b"[" + b",".join([inner] * shape[0]) + b"]"
    head = orjson.dumps({"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": list(shape)})[:-1]
    assert r.content == head + b',"' + op.encode() + b'":' + text + b"}"
    assert int(r.headers["content-length"]) == len(r.content)
    reserved = info["peak"]
    assert reserved >= max(peak_before, len(r.content))  # the request reserved at least its answer
    assert info["in_use"] == 0
    # about the reservation at most (a constant for the server's own buffers), not 15 times the answer's text
    assert grown < 2 * reserved + 64 * MiB, (grown / MiB, reserved / MiB)
    assert waits, "no /healthz answered while the answer was made"
    assert max(waits) < 5.0  # /healthz kept answering (a generous bound: the machine is shared)
