"""The batcher's behaviour, in process: fused batches hand every request exactly its own results (a
request that has gone in between included), a failed worker-thread batch leaves the batcher idle,
every spelling of a device out-of-memory error is a 503 (any other failure a 500), and a queued
thread batch is computed as long as any of its requests still waits for it.

Values are checked against NumPy transcriptions of the formulas (``ref`` below), not the core."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio.to_thread
import httpx
import numpy as np
import orjson
import pytest
from helpers import make_settings

import surrogate_core as core
from service.app import create_app
from service.dataplane.batching import Batcher, DeviceError

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}


# -- an independent reference -----------------------------------------------------------------

def ref(op: str, x: np.ndarray, alpha: float) -> np.ndarray:
    """PiecewiseQuadratic: spike = 1 where x >= 0; g'(x) = alpha - alpha^2 |x| where |x| <= 1/alpha, else 0."""
    x = np.asarray(x, np.float64)
    if op == "spike":
        return np.where(x >= 0, 1.0, 0.0)
    return np.where(np.abs(x) <= 1.0 / alpha, alpha - alpha * alpha * np.abs(x), 0.0)


def request_specs(i: int) -> list[tuple[str, np.ndarray, float]]:
    """Request ``i``: one or two jobs, each of its own length and values (so a result handed to
    the wrong request differs in shape or values)."""
    x = np.linspace(-1.5 + 0.1 * i, 1.5 - 0.05 * i, 5 + 3 * i)
    alpha = 0.75 + 0.25 * i
    if i % 2:
        return [("spike", x - 0.3, alpha), ("grad", x, alpha)]
    return [("grad", x, alpha)]


def jobs_of(specs) -> list[core.Job]:
    return [core.make_job(op, x, dtype="float64", params={} if op == "spike" else {"alpha": a})
            for op, x, a in specs]


def assert_own_results(specs, results, who: str) -> None:
    assert len(results) == len(specs), who
    for k, ((op, x, a), got) in enumerate(zip(specs, results, strict=True)):
        want = ref(op, x, a)
        assert np.shape(got) == want.shape, f"{who}, job {k}: shape {np.shape(got)} != {want.shape}"
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{who}, job {k}")


class Hooked:
    """The real engine, noting each run (its thread and number of jobs) and calling ``hook(jobs)``
    first, in whichever thread computes."""

    def __init__(self, engine: core.Engine, hook=None) -> None:
        self.engine = engine
        self.hook = hook
        self.calls: list[tuple[int, int]] = []

    def is_compiled(self, jobs) -> bool:
        return self.engine.is_compiled(jobs)

    @property
    def stats(self):
        return self.engine.stats

    def run(self, jobs):
        self.calls.append((threading.get_ident(), len(jobs)))
        if self.hook is not None:
            self.hook(jobs)
        return self.engine.run(jobs)


@pytest.fixture(scope="module")
def engine() -> core.Engine:
    return core.Engine()


# -- 1. a request gone from a fused batch does not shift its neighbours' results ---------------

@pytest.mark.parametrize("path", ["thread", "inline"])
async def test_a_request_cancelled_after_dispatch_leaves_every_other_request_its_own_results(engine, path):
    n = 6
    specs = [request_specs(i) for i in range(n)]
    all_jobs = [j for s in specs for j in jobs_of(s)]
    gone = (1, 4)  # each has two jobs: a missed offset would shift every later request
    tasks: list[asyncio.Task] = []
    if path == "thread":
        started, release = threading.Event(), threading.Event()

        def hook(jobs):
            started.set()
            assert release.wait(10)

        eng = Hooked(engine, hook)
        b = Batcher(eng, max_delay=0, offload_elements=0)  # every batch computes in a worker thread
    else:
        engine.run(all_jobs)  # compiled: the fused batch computes inline, on the event loop

        def hook(jobs):  # while the batch computes, two of its requests go away
            for i in gone:
                tasks[i].cancel()

        eng = Hooked(engine, hook)
        b = Batcher(eng, max_delay=0, offload_elements=1 << 20)
    tasks += [asyncio.create_task(b.submit(jobs_of(s), alone=False)) for s in specs]
    if path == "thread":
        assert await asyncio.to_thread(started.wait, 10)  # dispatched: the worker computes the batch
        for i in gone:
            tasks[i].cancel()
        await asyncio.sleep(0)
        release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert [c[1] for c in eng.calls] == [len(all_jobs)]  # one fused device call for every request
    if path == "thread":
        assert eng.calls[0][0] != threading.get_ident()
    else:
        assert eng.calls[0][0] == threading.get_ident()
    for i, (s, r) in enumerate(zip(specs, results, strict=True)):
        if i in gone:
            assert isinstance(r, asyncio.CancelledError), (i, r)
        else:
            assert not isinstance(r, BaseException), (i, r)
            assert_own_results(s, r, f"request {i}")
    assert b.depth == 0 and b._in_flight == 0
    assert b.stats.batches == 1 and b.stats.requests == n


async def test_concurrent_requests_through_the_app_are_fused_and_each_gets_its_own_values():
    """The same through the app: a slowed engine, every batch in a worker thread, one client gone."""
    app = create_app(make_settings(offload_elements=0, batch_max_delay=0.02))
    rt = app.state.runtime
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t", timeout=30) as c:
            real = rt.engine.run

            def slow(jobs):
                time.sleep(0.3)
                return real(jobs)

            rt.engine.run = slow

            async def post(i):
                x = np.linspace(-1.5 + 0.1 * i, 1.5, 4 + i).tolist()
                body = [{"x": x, "alpha": 0.5 + 0.25 * i}] + ([{"x": x, "alpha": 2.0}] if i % 2 else [])
                return await c.post("/v1/grad", content=orjson.dumps(body), headers=JSON)

            first = asyncio.create_task(post(0))  # keeps the device busy: the others gather
            await asyncio.sleep(0.05)
            tasks = [asyncio.create_task(post(i)) for i in range(1, 8)]
            await asyncio.sleep(0.15)  # their batch is computing now
            tasks[2].cancel()
            rs = await asyncio.gather(first, *tasks, return_exceptions=True)
            for i, r in enumerate(rs):
                if i == 3:
                    assert isinstance(r, asyncio.CancelledError)
                    continue
                assert r.status_code == 200, r.text
                x = np.linspace(-1.5 + 0.1 * i, 1.5, 4 + i)
                alphas = [0.5 + 0.25 * i] + ([2.0] if i % 2 else [])
                out = r.json()
                assert len(out) == len(alphas)
                for a, o in zip(alphas, out, strict=True):
                    np.testing.assert_allclose(o["grad"], ref("grad", x, a), rtol=2e-6, atol=1e-6)
            assert rt.batcher.stats.batches < 8  # some were fused


# -- 2. a failed worker-thread batch leaves the batcher idle -----------------------------------

async def test_after_a_failed_thread_batch_a_lone_request_is_computed_at_once_inline(engine):
    small = request_specs(2)  # 11 elements
    engine.run(jobs_of(small))  # compiled
    fail = {"next": True}

    def hook(jobs):
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("XLA: kernel launch failed")

    eng = Hooked(engine, hook)
    b = Batcher(eng, max_delay=2.0, offload_elements=64)  # a busy batcher would wait 2 s to gather
    big = [("grad", np.linspace(-2, 2, 200), 1.0)]  # over offload_elements: a worker thread
    with pytest.raises(DeviceError):
        await asyncio.wait_for(b.submit(jobs_of(big), alone=True), 10)
    assert eng.calls[0][0] != threading.get_ident()  # it failed in a worker thread
    assert b._in_flight == 0 and b.depth == 0 and b.stats.failures == 1
    t0 = time.perf_counter()
    results = await asyncio.wait_for(b.submit(jobs_of(small), alone=True), 10)
    elapsed = time.perf_counter() - t0
    assert_own_results(small, results, "the request after the failure")
    assert eng.calls[1][0] == threading.get_ident()  # inline, on the event loop
    assert elapsed < 1.0  # no gathering delay
    assert b._in_flight == 0 and b.depth == 0
    # and the thread path works again too
    results = await asyncio.wait_for(b.submit(jobs_of(big), alone=True), 10)
    assert_own_results(big, results, "a large request after the failure")
    assert b._in_flight == 0


# -- 3. every spelling of a device out-of-memory error is a 503 --------------------------------

class XlaRuntimeError(RuntimeError):
    """What jaxlib raises (by name): the message carries the status."""


OOM = [
    XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes."),
    RuntimeError("RESOURCE_EXHAUSTED: failed to allocate request"),
    RuntimeError("Out of memory allocating 4GB on device 0"),
    RuntimeError("out of memory"),
    RuntimeError("CUDA error: OUT OF MEMORY"),
    RuntimeError("cudaMalloc failed: Out Of Memory"),
    MemoryError(),
    MemoryError("Unable to allocate 3.00 GiB for an array"),
]
OTHER = [
    RuntimeError("XLA exploded"),
    XlaRuntimeError("INTERNAL: failed to launch kernel"),
    ValueError("memory layout mismatch"),
    ZeroDivisionError("division by zero"),
]


@pytest.mark.parametrize("offload_elements", [0, 16384], ids=["thread", "inline"])
async def test_every_spelling_of_device_oom_is_503_and_other_failures_500(offload_elements):
    app = create_app(make_settings(offload_elements=offload_elements))
    rt = app.state.runtime
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t", timeout=30) as c:
            body = orjson.dumps({"x": [-2.0, -0.5, 0.0, 0.5, 2.0]})
            v2 = {"inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": [-2.0, -0.5, 0.0, 0.5, 2.0]}],
                  "outputs": [{"name": "grad"}]}
            r = await c.post("/v1/grad", content=body, headers=JSON)
            assert r.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]  # compiled: the next ones run inline
            r = await c.post("/v2/models/piecewise_quadratic/infer", json=v2)
            assert r.status_code == 200
            real = rt.engine.run
            failures = 0
            for exc in OOM + OTHER:
                oom = any(exc is e for e in OOM)
                threads = []

                def failing(jobs, exc=exc, threads=threads):
                    threads.append(threading.get_ident())
                    raise exc

                rt.engine.run = failing
                r = await c.post("/v1/grad", content=body, headers=JSON)
                r2 = await c.post("/v2/models/piecewise_quadratic/infer", json=v2)
                rt.engine.run = real
                failures += 2
                want = 503 if oom else 500
                assert r.status_code == want, (exc, r.text)
                assert r.json()["error"]["code"] == ("device_out_of_memory" if oom else "device_error"), exc
                assert r2.status_code == want, (exc, r2.text)
                if oom:
                    assert r.headers["retry-after"] == "1" and r2.headers["retry-after"] == "1"
                else:
                    assert "retry-after" not in r.headers
                for detail in ("4294967296", "XLA", "kernel", "cudaMalloc", "CUDA", "layout", "division", "3.00 GiB"):
                    assert detail not in r.text and detail not in r2.text  # no internals leak
                on_loop = threading.get_ident()
                assert len(threads) == 2
                assert all((t == on_loop) == (offload_elements > 0) for t in threads), "not the path tested"
                r = await c.post("/v1/grad", content=body, headers=JSON)  # fails only its batch
                assert r.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]
            text = (await c.get("/metrics")).text
            assert f"surrogate_device_failures_total {float(failures)}" in text
            assert rt.batcher._in_flight == 0 and rt.batcher.depth == 0


def test_out_of_memory_detection_on_the_error_itself():
    for exc in OOM:
        assert DeviceError(exc).resource_exhausted, exc
    for exc in OTHER:
        assert not DeviceError(exc).resource_exhausted, exc


# -- 4. a queued thread batch is computed while any of its requests waits -----------------------

@pytest.mark.parametrize("gone", ["one", "all"])
async def test_a_thread_batch_runs_unless_every_request_of_it_has_gone(engine, gone):
    gate, started = threading.Event(), threading.Event()

    def hook(jobs):
        if not started.is_set():  # the first batch holds the only worker thread until the gate opens
            started.set()
            assert gate.wait(10)

    eng = Hooked(engine, hook)
    b = Batcher(eng, max_delay=0, offload_elements=0)
    a_specs, b_specs, c_specs = request_specs(0), request_specs(1), request_specs(2)
    limiter = anyio.to_thread.current_default_thread_limiter()
    old = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        ta = asyncio.create_task(b.submit(jobs_of(a_specs), alone=False))
        assert await asyncio.to_thread(started.wait, 10)
        tb = asyncio.create_task(b.submit(jobs_of(b_specs), alone=False))
        tc = asyncio.create_task(b.submit(jobs_of(c_specs), alone=False))
        for _ in range(500):  # B and C gathered into one batch, queued for the worker thread
            if b._in_flight == 2:
                break
            await asyncio.sleep(0.01)
        assert b._in_flight == 2 and not b._pending
        tb.cancel()  # gone before the worker thread starts on its batch
        if gone == "all":
            tc.cancel()
        await asyncio.sleep(0)
        gate.set()
        assert_own_results(a_specs, await asyncio.wait_for(ta, 10), "request A")
        if gone == "one":
            assert_own_results(c_specs, await asyncio.wait_for(tc, 5), "request C")
        for _ in range(500):
            if not b._tasks:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
        limiter.total_tokens = old
    with pytest.raises(asyncio.CancelledError):
        await tb
    if gone == "one":
        assert [n for _, n in eng.calls] == [1, 3]  # A; then B's and C's jobs in one call
        assert b.stats.skipped == 0
    else:
        with pytest.raises(asyncio.CancelledError):
            await tc
        assert [n for _, n in eng.calls] == [1]  # nothing left to compute for: not started
        assert b.stats.skipped == 1
    assert b._in_flight == 0 and b.depth == 0


@pytest.mark.parametrize("message", ["resource exhausted: out of HBM", "Resource_Exhausted", "OOM when allocating tensor"])
def test_other_spellings_of_device_oom_are_out_of_memory(message):
    from service.dataplane.batching import DeviceError

    assert DeviceError(RuntimeError(message)).resource_exhausted
    assert not DeviceError(RuntimeError("shape mismatch in dot")).resource_exhausted


# -- where a batch computes: on the event loop when small or measured quick, else a worker thread --

def _big(n: int, op: str = "grad", surrogate: str = "piecewise_quadratic", alpha: float = 1.0) -> list[core.Job]:
    x = np.linspace(-1.5, 1.5, n)
    return [core.make_job(op, x, surrogate=surrogate, dtype="float64", params={"alpha": alpha})]


async def _where(b: Batcher, eng: Hooked, jobs: list[core.Job]) -> str:
    """Submit ``jobs`` alone; "loop" or "thread" for where the engine ran them, results checked."""
    before = len(eng.calls)
    (got,) = await b.submit(jobs, alone=True)
    np.testing.assert_allclose(got, ref("grad", jobs[0].x, 1.0), rtol=1e-12, atol=1e-15)
    assert len(eng.calls) == before + 1
    return "loop" if eng.calls[-1][0] == threading.get_ident() else "thread"


async def test_a_large_batch_moves_onto_the_loop_once_measured_quick_and_back_when_slow(engine, monkeypatch):
    """Above offload_elements, a kind never measured computes in a worker thread; measured quicker
    than offload_seconds, on the loop; measured slower again (the clock says so), back in a thread."""
    jobs = _big(20_000)
    for warm in (jobs, _big(10_000)):  # compiled: where they compute is the policy's choice alone
        engine.run(warm)
    eng = Hooked(engine)
    b = Batcher(eng, max_delay=0, offload_elements=10_000, offload_seconds=3600.0)
    assert b.times.expected(jobs) is None
    assert await _where(b, eng, jobs) == "thread"  # unknown: off the loop
    per = b.times.expected(jobs)
    assert per is not None and per > 0
    assert await _where(b, eng, jobs) == "loop"  # measured far quicker than an hour
    assert await _where(b, eng, _big(10_000)) == "loop"  # at the element threshold: always on the loop
    b.offload_seconds = 0.0  # nothing is quicker than 0 s
    assert await _where(b, eng, jobs) == "thread"
    assert await _where(b, eng, _big(10_000)) == "loop"
    # a slow outlier measured: the kind goes back to a worker thread until measured quick again
    b.offload_seconds = 3600.0
    b.times.record(jobs, 20_000, 7200.0 * 3)
    assert b.times.expected(jobs) > 3600.0
    assert await _where(b, eng, jobs) == "thread"


async def test_each_kind_is_measured_on_its_own(engine):
    """A measurement of one op, surrogate and dtype says nothing of another: an unmeasured kind, or a
    batch mixing kinds that are not all measured, computes in a worker thread."""
    grad, fun = _big(20_000), _big(20_000, op="fun")
    engine.run(grad)
    engine.run(fun)
    eng = Hooked(engine)
    b = Batcher(eng, max_delay=0, offload_elements=10_000, offload_seconds=3600.0)
    await b.submit(grad, alone=True)
    assert b.times.expected(grad) is not None and b.times.expected(fun) is None
    assert b.times.expected(grad + fun) is None
    before = len(eng.calls)
    await b.submit(fun, alone=True)
    assert eng.calls[before][0] != threading.get_ident()
    # a mixed batch is computed but not measured: each kind's figure stays its own
    b2 = Batcher(eng, max_delay=0, offload_elements=0, offload_seconds=3600.0)
    await b2.submit(grad + fun, alone=True)
    assert b2.times.expected(grad) is None and b2.times.expected(fun) is None


def test_device_times_average_and_ignore_small_batches():
    from service.dataplane.batching import DeviceTimes

    t = DeviceTimes(min_elements=4096)
    jobs = _big(8192)
    t.record(jobs, 4095, 1.0)  # under min_elements: the call's own overhead would dominate
    assert t.expected(jobs) is None
    t.record(jobs, 8192, 8192e-9)  # 1 ns per element
    assert t.expected(jobs) == pytest.approx(8192e-9)
    t.record(jobs, 8192, 3 * 8192e-9)  # 3 ns: averaged with the last figure, 2 ns
    assert t.expected(jobs) == pytest.approx(2 * 8192e-9)
    assert t.expected(jobs + jobs) == pytest.approx(4 * 8192e-9)


async def test_a_compilation_is_not_measured_as_device_time():
    """A batch whose variant is not compiled computes in a worker thread and leaves no figure: its
    compilation would make the kind look slow."""
    fresh = core.Engine()
    jobs = _big(20_000, alpha=1.0)
    eng = Hooked(fresh)
    b = Batcher(eng, max_delay=0, offload_elements=0, offload_seconds=3600.0)
    await b.submit(jobs, alone=True)
    assert eng.calls[0][0] != threading.get_ident()
    assert b.times.expected(jobs) is None
    await b.submit(jobs, alone=True)  # compiled now: measured
    assert b.times.expected(jobs) is not None
