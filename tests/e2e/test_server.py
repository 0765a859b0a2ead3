"""End to end: a real uvicorn server (`python -m service`) on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from liveserver import free_port, running_server

pytestmark = pytest.mark.e2e

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]


@pytest.fixture
def server(shared_server):
    return shared_server  # the session's: these tests only send requests


def test_seed_example_over_http(server):
    base, _ = server
    with httpx.Client(base_url=base) as c:
        r = c.post("/v1/spike", json={"x": SEED})
        assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [5], "spike": [0, 0, 1, 1, 1]}
        r = c.post("/v1/grad", json=[{"x": SEED, "alpha": 1.0}, {"x": SEED, "alpha": 2.0, "cotangent": 3.0}])
        assert [b["grad"] for b in r.json()] == [[0.0, 0.5, 1.0, 0.5, 0.0], [0.0, 0.0, 6.0, 0.0, 0.0]]
        r = c.post("/v1/grad", json={"x": SEED, "alpha": -1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "alpha"
        assert c.get("/v1/info").json()["device"]["platform"] == "cpu"


def test_large_request_over_http(server):
    base, _ = server
    n = 200_000
    x = [((i % 401) - 200) / 100 for i in range(n)]
    with httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/v1/grad", json={"x": x, "alpha": 2.0})
        body = r.json()
        assert body["shape"] == [n]
        g = body["grad"]
        for i in (0, 150, 200, 250, 399, n - 1):
            xi = x[i]
            want = 0.0 if abs(xi) > 0.5 else 2.0 - 4.0 * abs(xi)
            assert abs(g[i] - want) < 1e-6


def test_sigterm_exits_cleanly():
    with running_server() as (_, proc):  # a server of its own: the module's serves the other tests
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "computing on cpu" in out and "warm-up compiled" in out


def test_uvicorn_serves_the_app_factory():
    """``uvicorn --factory service.app:create_app``: the app is an ordinary ASGI (FastAPI) app."""
    port = free_port()
    env = dict(os.environ, SURROGATE_WARMUP_MAX_ELEMENTS="1024")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not serve the app"
                time.sleep(0.2)
            r = c.post("/v1/grad", json={"x": [-2.0, -0.5, 0.0, 0.5, 2.0], "alpha": 1.0})
            assert r.status_code == 200 and r.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]
            assert c.get("/openapi.json").json()["paths"]["/v1/grad"]["post"]["operationId"] == "grad"
    finally:
        proc.terminate()
        proc.wait(30)
