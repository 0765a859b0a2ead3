"""Overload and shutdown against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import io
import signal
import statistics
import threading
import time

import aiohttp
import httpx
import numpy as np
import pytest

from liveserver import npy, running_server

pytestmark = pytest.mark.e2e

NPY = "application/x-npy"



def test_overload_sheds_with_503_and_recovers():
    x = np.linspace(-2, 2, 400_000, dtype=np.float32)
    body = npy(x)
    want = np.where(np.abs(x) > 1, 0, 1 - np.abs(x)).astype(np.float32)

    async def drive(base):
        results = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def one():
                t0 = time.perf_counter()
                async with s.post(f"{base}/v1/grad", data=io.BytesIO(body), headers={"content-type": NPY, "accept": NPY}) as r:
                    data = await r.read()
                    results.append((r.status, r.headers.get("retry-after"), data, time.perf_counter() - t0))

            async def client(n):
                for _ in range(n):
                    await one()

            await asyncio.wait_for(asyncio.gather(*(client(6) for _ in range(48))), 120)
        return results

    with running_server(max_concurrent=6, max_queue=4, request_timeout=20) as (base, proc):
        results = asyncio.run(drive(base))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503}, set(statuses)
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        ok_latency = [r[3] for r in results if r[0] == 200]
        shed_latency = [r[3] for r in results if r[0] == 503]
        for status, retry, data, _ in results:
            if status == 503:
                assert retry == "1"
            else:
                np.testing.assert_allclose(np.load(io.BytesIO(data)), want, rtol=2e-6, atol=1e-6)
        # latency is bounded by the limits, not by the backlog: 288 requests of 1.6 MB each on 2 cores
        assert max(ok_latency) < 20 and max(shed_latency) < 20
        with httpx.Client(base_url=base) as c:
            assert c.post("/v1/grad", json={"x": [0.5]}).json()["grad"] == [0.5]
            m = c.get("/metrics").text
            assert "surrogate_rejections_total" in m and "surrogate_queue_depth 0.0" in m
        print(f"overload: accepted {statuses.count(200)} (median {statistics.median(ok_latency)*1e3:.0f} ms, "
              f"max {max(ok_latency)*1e3:.0f} ms), shed {statuses.count(503)} with 503 "
              f"(median {statistics.median(shed_latency)*1e3:.0f} ms, max {max(shed_latency)*1e3:.0f} ms)")


def test_sigterm_finishes_in_flight_requests_then_exits_0():
    x = np.linspace(-2, 2, 1_000_000, dtype=np.float32)
    body = npy(x)
    want = np.where(np.abs(x) > 1, 0, 1 - np.abs(x)).astype(np.float32)
    with running_server(graceful_timeout=30) as (base, proc):
        results: list = []

        def slow_body():  # the body trickles in for about 2 s: the request is in flight all along
            for i in range(10):
                yield body[i * len(body) // 10:(i + 1) * len(body) // 10]
                time.sleep(0.2)

        def call():
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{base}/v1/grad", content=slow_body(), headers={"content-type": NPY, "accept": NPY})
                results.append((r.status_code, r.content))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=base) as c:  # wait until the server has all four in hand
            while "surrogate_requests_in_flight 4.0" not in c.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert [s for s, _ in results] == [200] * 4, out[-2000:]
        for _, content in results:
            np.testing.assert_allclose(np.load(io.BytesIO(content)), want, rtol=2e-6, atol=1e-6)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz", timeout=2)


def test_two_workers_serve_and_stop_cleanly():
    with running_server(workers=2) as (base, proc):
        with httpx.Client(base_url=base) as c:
            for i in range(20):
                r = c.post("/v1/grad", json={"x": [0.5, 0.25], "alpha": 1.0})
                assert r.json()["grad"] == [0.5, 0.75]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert out.count("computing on") == 2, out[-3000:]
        assert "Traceback" not in out
