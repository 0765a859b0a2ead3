"""Admission by bytes, in process: every request reserves its memory before it holds it and gives it
back however it ends; over the budget is a 503, larger than the budget a 413/422; the compile
cache is capped."""

from __future__ import annotations

import asyncio
import io
import random

import httpx
import numpy as np
import orjson
import pytest

import surrogate_core as sc
from service.dataplane import working_set

from helpers import App

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}


def npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


async def test_a_request_holds_its_reservation_until_its_last_byte_then_gives_it_back():
    async with App(memory_budget=64 << 20) as a:
        held = []
        real = a.rt.engine.run

        def run(jobs):
            held.append(a.budget.in_use)
            return real(jobs)

        a.rt.engine.run = run
        x = np.linspace(-2, 2, 100_000, dtype=np.float32)
        r = await a.client.post("/v1/grad", content=npy(x), headers={"content-type": "application/x-npy",
                                                                        "accept": "application/x-npy"})
        assert r.status_code == 200
        jobs_estimate = working_set([sc.make_job("grad", x)]) + len(r.content)  # and the answer
        assert held[0] >= len(r.content) + jobs_estimate  # body + working set, reserved while computing
        assert a.budget.in_use == 0 and a.budget.peak >= held[0]


async def test_over_the_budget_is_503_and_larger_than_the_budget_is_refused_naming_it():
    async with App(memory_budget=8 << 20, max_body_bytes=32 << 20) as a:
        big = np.zeros(3_000_000, np.float32)  # 12 MB body: more than the whole budget
        r = await a.client.post("/v1/grad", content=npy(big), headers={"content-type": "application/x-npy"})
        assert r.status_code == 413 and "memory budget of 8388608 bytes" in r.json()["error"]["message"]
        # a small body whose broadcast answer is larger than the budget: refused once decoded
        r = await a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5] * 2048, "alpha": [[1.0]] * 2048}), headers=JSON)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_large" and "memory budget" in r.text
        # another request already holds most of the budget: a 503 with Retry-After
        assert a.budget.try_acquire(7 << 20)
        r = await a.client.post("/v1/grad", content=npy(np.zeros(300_000, np.float32)),
                                headers={"content-type": "application/x-npy"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        a.budget.release(7 << 20)
        text = (await a.client.get("/metrics")).text
        assert 'surrogate_rejections_total{reason="memory"} 3.0' in text
        assert a.budget.in_use == 0


async def test_a_chunked_body_is_counted_while_it_arrives():
    async with App(memory_budget=4 << 20, max_body_bytes=64 << 20) as a:
        async def chunks():
            for _ in range(100):
                yield b" " * (1 << 16)

        r = await a.client.post("/v1/grad", content=chunks(), headers=JSON)
        assert r.status_code == 413 and "memory budget" in r.json()["error"]["message"]
        assert a.budget.in_use == 0


async def test_nothing_stays_reserved_after_a_thousand_mixed_requests():
    """Successes, errors of every stage, timeouts and clients that go away."""
    async with App(memory_budget=256 << 20, request_timeout=0.5, offload_elements=0) as a:
        rng = random.Random(0)
        real = a.rt.engine.run

        def sometimes_slow(jobs):
            if jobs and jobs[0].x.size == 7:  # the timeout case
                import time

                time.sleep(0.7)
            return real(jobs)

        a.rt.engine.run = sometimes_slow
        cases = [
            lambda: a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5] * rng.randint(1, 3000)}), headers=JSON),
            lambda: a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5], "alpha": -1}), headers=JSON),
            lambda: a.client.post("/v1/grad", content=b"{nope", headers=JSON),
            lambda: a.client.post("/v1/spike", content=npy(np.ones(rng.randint(1, 5000), np.float32)),
                                  headers={"content-type": "application/x-npy", "accept": "application/x-npy"}),
            lambda: a.client.post("/v2/models/sigmoid/infer", json={"inputs": [
                {"name": "x", "shape": [2], "datatype": "FP32", "data": [0.0, 1.0]}]}),
            lambda: a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5] * 7}), headers=JSON),  # times out
        ]
        statuses = []
        for start in range(0, 1000, 50):
            batch = [rng.choice(cases)() for _ in range(50)]
            tasks = [asyncio.ensure_future(c) for c in batch]
            if start % 200 == 0:  # some clients go away mid-request
                await asyncio.sleep(0)
                tasks[0].cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, httpx.Response):
                    statuses.append(r.status_code)
        for _ in range(200):
            if a.rt.dataplane.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert {200, 422, 400, 503} <= set(statuses)
        assert a.budget.in_use == 0 and a.rt.dataplane.in_flight == 0 and a.budget.peak > 0


async def test_the_compile_cache_is_capped_and_evictions_are_counted():
    async with App(max_variants=4) as a:
        for sur in sc.names()[:4]:
            for dtype in ("float32", "float64"):
                r = await a.client.post("/v1/grad", content=orjson.dumps({"x": [0.25], "surrogate": sur, "dtype": dtype}),
                                        headers=JSON)
                assert r.status_code == 200, r.text
        st = a.rt.engine.stats
        assert sum(st.variants.values()) <= 4 and st.evictions >= 4
        text = (await a.client.get("/metrics")).text
        assert f"surrogate_compile_evictions_total {float(st.evictions)}" in text
        info = (await a.client.get("/v1/info")).json()
        assert sum(info["variants"].values()) <= 4 and info["limits"]["max_variants"] == 4
        # an evicted variant compiles again and answers correctly
        r = await a.client.post("/v1/grad", content=orjson.dumps({"x": [0.0], "surrogate": "sigmoid"}), headers=JSON)
        assert r.json()["grad"] == [1.0]


async def test_work_whose_requests_have_gone_is_not_started():
    """Batches queued for a worker thread whose requests time out before their turn compute nothing."""
    import threading

    async with App(request_timeout=0.3, offload_elements=0, batch_max_delay=0) as a:
        gate = threading.Event()
        ran = []
        real = a.rt.engine.run

        def run(jobs):
            ran.append(len(jobs))
            gate.wait(5)  # the first batch holds the only worker slot the test leaves free
            return real(jobs)

        a.rt.engine.run = run
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        old = limiter.total_tokens
        limiter.total_tokens = 1
        try:
            def send():
                return asyncio.ensure_future(a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5]}), headers=JSON))

            tasks = [send()]
            await asyncio.sleep(0.05)  # the first batch now holds the worker; the next ones queue behind it
            tasks += [send() for _ in range(3)]
            responses = await asyncio.gather(*tasks)
            assert {r.status_code for r in responses} == {503}  # all timed out
            gate.set()
            for _ in range(100):
                if a.rt.batcher.stats.skipped >= 1 and a.rt.batcher.depth == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            limiter.total_tokens = old
        assert a.rt.batcher.stats.skipped >= 1
        assert ran == [1]  # only the first batch was computed; the later ones never started
        assert a.budget.in_use == 0
