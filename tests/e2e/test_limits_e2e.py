"""Against a real server: request shapes cannot drive compilation or memory without bound, and
clients that vanish mid-request leave nothing behind."""

from __future__ import annotations

import io
import random
import socket
import time

import httpx
import numpy as np
import pytest

from liveserver import npy, rss_bytes, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NPY = "application/x-npy"



def test_a_thousand_distinct_lengths_compile_a_bounded_number_of_variants():
    rng = random.Random(3)
    lengths = rng.sample(range(1, 300_001), 1000)
    xs = np.linspace(-2, 2, 300_000, dtype=np.float32)
    with running_server() as (base, proc), httpx.Client(base_url=base, timeout=60) as c:
        def send(ns):
            for n in ns:
                r = c.post("/v1/grad?alpha=1.0", content=npy(xs[:n]), headers={"content-type": NPY, "accept": NPY})
                assert r.status_code == 200
                out = np.load(io.BytesIO(r.content))
                assert out.shape == (n,) and out[0] == 0.0  # x = -2 is outside the window

        send(lengths[:500])
        variants = c.get("/v1/info").json()["variants"]["grad/piecewise_quadratic/float32"]
        rss_mid = rss_bytes(proc.pid)
        send(lengths[500:])
        info = c.get("/v1/info").json()
        rss_end = rss_bytes(proc.pid)
    # the small bucket (64), then buckets from 1024 to 300k: powers of two and 1.5 times them
    assert info["variants"]["grad/piecewise_quadratic/float32"] <= 19
    assert info["variants"]["grad/piecewise_quadratic/float32"] - variants <= 2
    assert rss_end <= rss_mid * 1.10, (rss_mid, rss_end)


def test_clients_that_vanish_mid_request_leak_nothing():
    body = npy(np.zeros(2_000_000, np.float32))
    with running_server() as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(20):  # headers and half a body, then gone
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(
                b"POST /v1/grad HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            s.close()
        with httpx.Client(base_url=base) as c:
            deadline = time.monotonic() + 20
            while True:
                m = c.get("/metrics").text
                if "surrogate_requests_in_flight 0.0" in m and "surrogate_queue_depth 0.0" in m:
                    break
                assert time.monotonic() < deadline, m
                time.sleep(0.05)
            assert c.post("/v1/grad", json={"x": [0.5]}).json()["grad"] == [0.5]
            assert 'surrogate_rejections_total{reason="client_disconnect"} 20.0' in c.get("/metrics").text
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert "Traceback" not in out and "unhandled" not in out, out[-3000:]
