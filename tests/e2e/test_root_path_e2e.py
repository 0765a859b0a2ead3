"""Behind a prefix-stripping proxy: a real uvicorn with --root-path answers every endpoint correctly."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from liveserver import free_port

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("how", ["uvicorn", "python -m service"])
def test_compute_metadata_and_oip_under_a_root_path(how, tmp_path):
    port = free_port()
    if how == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port),
               "--root-path", "/api"]
    else:
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--root-path", "/api"]
    env = {"SURROGATE_WARMUP": "false", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as c:
            for _ in range(300):
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise AssertionError("server did not start")
            # the proxy stripped /api: the request arrives without it
            r = c.post("/v1/spike", json={"x": [-1, 0, 1]})
            assert r.status_code == 200
            assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [3], "spike": [0.0, 1.0, 1.0]}
            r = c.post("/v1/grad", json={"x": [-1, 0, 1]})
            assert r.json()["grad"] == [0.0, 1.0, 0.0]
            r = c.post("/v2/models/piecewise_quadratic/infer",
                       json={"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [-1, 0, 1]}],
                             "outputs": [{"name": "grad"}]})
            assert r.json()["outputs"][0]["data"] == [0.0, 1.0, 0.0]
            assert c.get("/v1/surrogates/sigmoid").json()["name"] == "sigmoid"
            assert c.get("/openapi.json").json()["servers"] == [{"url": "/api"}]
            assert 'href="/api/docs/assets/swagger-ui.css"' in c.get("/docs").text
            text = c.get("/metrics").text
            assert 'surrogate_requests_total{endpoint="/v1/spike",protocol="v1",status="200"} 1.0' in text
    finally:
        proc.terminate()
        proc.wait(30)
