"""Limits at their edges, the element limit over a list of jobs, Accept ties, device failures on
every path of the batcher, and the count of every refusal in ``surrogate_rejections_total``.

In process, through ``httpx.ASGITransport``; each test builds the app with the limits it needs.
"""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from helpers import App as InProcessApp
from helpers import body as v2_body
from helpers import npy, npz
from helpers import tensor as v2_tensor
from prometheus_client.parser import text_string_to_metric_families

import surrogate_core as core

pytestmark = pytest.mark.anyio
JSON, NPY, NPZ = "application/json", "application/x-npy", "application/x-npz"


class App(InProcessApp):
    async def post(self, body: bytes, ctype: str = JSON, path: str = "/v1/grad", **headers: str) -> httpx.Response:
        return await self.client.post(path, content=body, headers={"content-type": ctype, **headers})

    async def post_x(self, fmt: str, x: np.ndarray) -> httpx.Response:
        """A job of ``x`` alone, in one of the wire formats: json, npy or npz."""
        if fmt == "json":
            return await self.post(orjson.dumps({"x": x.tolist()}))
        if fmt == "npy":
            return await self.post(npy(x), NPY)
        return await self.post(npz(x=x), NPZ)

    async def rejections(self) -> dict[str, float]:
        text = (await self.client.get("/metrics")).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "surrogate_rejections":
                for s in family.samples:
                    if s.name == "surrogate_rejections_total":
                        out[s.labels["reason"]] = s.value
        return out


def nested(rank: int) -> Any:
    v: Any = 0.5
    for _ in range(rank):
        v = [v]
    return v


def grad_ref(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """piecewise_quadratic's g'(x), by hand: alpha - alpha**2 |x| inside |x| < 1/alpha, else 0."""
    x = np.asarray(x, np.float64)
    return np.where(np.abs(x) < 1 / alpha, alpha - alpha * alpha * np.abs(x), 0.0)


def err(r: httpx.Response) -> tuple[int, str, Any, Any]:
    e = r.json()["error"]
    return r.status_code, e["code"], e["job"], e["field"]


# -- the element limit over a list of jobs ------------------------------------------------------

async def test_the_element_limit_counts_all_jobs_together_and_names_the_job_that_passes_it():
    async with App(max_elements=1000) as a:
        x = np.linspace(-1, 1, 600).tolist()  # 60 % of the limit each
        r = await a.post(orjson.dumps([{"x": x}, {"x": x}]))
        assert err(r) == (422, "too_large", 1, "x")
        assert "job 1" in r.json()["error"]["message"]
        # either job alone is fine
        r = await a.post(orjson.dumps([{"x": x}]))
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()[0]["grad"], grad_ref(x), rtol=1e-6, atol=1e-6)


# -- limits at their edge -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "npy", "npz"])
async def test_exactly_max_elements_is_accepted_and_one_more_refused(fmt):
    limit = 2000
    async with App(max_elements=limit) as a:
        for n, ok in ((limit, True), (limit + 1, False)):
            x = np.linspace(-1.5, 1.5, n, dtype=np.float32)
            r = await a.post_x(fmt, x)
            if ok:
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["grad"], grad_ref(x), rtol=1e-6, atol=1e-6)
            else:
                assert err(r) == (422, "too_large", 0, "x")


async def test_the_element_limit_applies_after_broadcasting_at_its_edge():
    async with App(max_elements=1000) as a:
        x = np.linspace(-1, 1, 100).tolist()
        r = await a.post(orjson.dumps({"x": x, "alpha": [[1.0]] * 10}))  # (10, 100): exactly 1000
        assert r.status_code == 200
        assert r.json()["shape"] == [10, 100]
        r = await a.post(orjson.dumps({"x": x + [0.0], "alpha": [[1.0]] * 10}))  # (10, 101)
        assert err(r) == (422, "too_large", 0, "x")


def _json_of_size(size: int) -> bytes:
    body = b'{"x": [0.25, -0.5]}'
    return body[:-1] + b" " * (size - len(body)) + b"}"


def _npy_of_size(size: int) -> bytes:
    """A valid .npy of exactly ``size`` bytes (float32 data, a one-dimensional shape)."""
    for n in range(size // 4, 0, -1):
        b = npy(np.linspace(-1, 1, n, dtype=np.float32))
        if len(b) == size:
            return b
    raise AssertionError(size)


@pytest.mark.parametrize("fmt", ["json", "npy"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_exactly_max_body_bytes_is_accepted_and_one_more_is_413(fmt, chunked):
    limit = 4096
    async with App(max_body_bytes=limit, max_elements=10_000) as a:
        body = _json_of_size(limit) if fmt == "json" else _npy_of_size(limit)
        assert len(body) == limit
        over = body[:-1] + b" }" if fmt == "json" else body + b"\x00"
        assert len(over) == limit + 1
        ctype = JSON if fmt == "json" else NPY

        async def send(b: bytes) -> httpx.Response:
            if not chunked:
                return await a.post(b, ctype)

            async def pieces():  # no Content-Length: the limit is enforced while reading
                for i in range(0, len(b), 1000):
                    yield b[i:i + 1000]

            return await a.client.post("/v1/grad", content=pieces(), headers={"content-type": ctype})

        r = await send(body)
        assert r.status_code == 200, r.text
        r = await send(over)
        assert err(r) == (413, "body_too_large", None, "body")


async def test_exactly_max_jobs_is_accepted_and_one_more_refused():
    async with App(max_jobs=8) as a:
        jobs = [{"x": [0.1 * i]} for i in range(8)]
        r = await a.post(orjson.dumps(jobs))
        assert r.status_code == 200
        np.testing.assert_allclose([j["grad"][0] for j in r.json()], grad_ref(0.1 * np.arange(8)), rtol=1e-6)
        r = await a.post(orjson.dumps(jobs + [{"x": [0.0]}]))
        assert err(r) == (422, "too_large", None, None)


@pytest.mark.parametrize("fmt", ["json", "npy", "npz"])
@pytest.mark.parametrize("max_rank", [3, 8])
async def test_rank_exactly_max_rank_is_accepted_and_one_more_refused(fmt, max_rank):
    async with App(max_rank=max_rank) as a:
        for rank, ok in ((max_rank, True), (max_rank + 1, False)):
            x = np.full((1,) * rank, 0.5, np.float32)  # as JSON: nested(rank)
            r = await a.post_x(fmt, x)
            if ok:
                assert r.status_code == 200, r.text
                assert r.json()["shape"] == [1] * rank
                assert np.asarray(r.json()["grad"]).item() == 0.5
            else:
                assert err(r) == (422, "too_large", 0, "x")
                assert f"rank {rank}" in r.json()["error"]["message"] or "rank exceeds" in r.json()["error"]["message"]


@pytest.mark.parametrize("binary", [False, True])
async def test_v2_scalars_pass_a_rank_limit_of_zero_and_a_vector_does_not(binary):
    """/v2 JSON ``data`` is a flat list whatever the declared shape: the rank limit applies to the
    declared shape (a scalar, ``[]``, is rank 0), not to the list that carries it."""
    async with App(max_rank=0) as a:
        for shape, ok in (((), True), ((1,), False)):
            parts = [v2_tensor("x", np.full(shape, 0.25, np.float32), binary=binary),
                     v2_tensor("alpha", np.full(shape, 2.0, np.float32), binary=binary)]
            req = {"inputs": [t for t, _ in parts], "outputs": [{"name": "grad"}]}
            content, headers = v2_body(req, [raw for _, raw in parts])
            r = await a.client.post("/v2/models/piecewise_quadratic/infer", content=content, headers=headers)
            if ok:
                assert r.status_code == 200, r.text
                (out,) = r.json()["outputs"]
                assert out["shape"] == []
                assert out["data"] == [2.0 - 4.0 * 0.25]  # alpha - alpha^2 |x|
            else:
                assert r.status_code == 400
                assert "rank 1 exceeds the limit of 0" in r.json()["error"]


# -- Accept ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("accept", "npy_wins"),
    [
        ("application/json, application/x-npy", False),  # a tie: JSON, the default
        ("application/x-npy, application/json", False),
        ("application/x-npy;q=0.5, application/json;q=0.5", False),
        ("application/x-npy, */*", False),
        ("application/x-npy, application/json;q=0.9", True),
        ("application/json;q=0.1, application/x-npy;q=0.2", True),
        ("application/x-npy", True),
        ("application/x-npy;q=0", False),
    ],
)
async def test_accept_ties_go_to_json(accept, npy_wins):
    async with App() as a:
        x = np.array([-0.5, 0.0, 2.0], np.float32)
        r = await a.post(npy(x), NPY, accept=accept)
        assert r.status_code == 200
        if npy_wins:
            assert r.headers["content-type"] == NPY
            got = np.load(io.BytesIO(r.content))
        else:
            assert r.headers["content-type"] == JSON
            got = np.asarray(r.json()["grad"], np.float32)
        np.testing.assert_array_equal(got, grad_ref(x).astype(np.float32))


# -- device failures on the queued and the thread path ----------------------------------------------

FAILURES = [
    (RuntimeError("XLA exploded"), 500, "device_error"),
    (MemoryError(), 503, "device_out_of_memory"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), 503, "device_out_of_memory"),
]


def _check_failure(r: httpx.Response, status: int, code: str) -> None:
    assert err(r) == (status, code, None, None)
    if status == 503:
        assert r.headers["retry-after"] == "1"
    else:
        assert "retry-after" not in r.headers
    assert "XLA exploded" not in r.text
    assert "RESOURCE_EXHAUSTED" not in r.text


async def _compile(a: App) -> None:
    r = await a.post(orjson.dumps({"x": [0.5]}))
    assert r.json()["grad"] == [0.5]


@pytest.mark.parametrize(("exc", "status", "code"), FAILURES, ids=["error", "memory", "resource-exhausted"])
async def test_a_device_failure_on_the_thread_path(exc, status, code, monkeypatch):
    async with App(offload_elements=0) as a:  # every batch computes in a worker thread
        await _compile(a)
        calls: list[bool] = []

        def run(jobs):
            calls.append(threading.current_thread() is threading.main_thread())
            raise exc

        real = a.rt.engine.run
        monkeypatch.setattr(a.rt.engine, "run", run)
        _check_failure(await a.post(orjson.dumps({"x": [0.5, 1.5]})), status, code)
        assert calls == [False]  # the failing call ran off the event loop's thread
        monkeypatch.setattr(a.rt.engine, "run", real)
        r = await a.post(orjson.dumps({"x": [0.5, 1.5]}))
        assert r.json()["grad"] == [0.5, 0.0]
        assert a.rt.batcher.depth == 0


@pytest.mark.parametrize(("exc", "status", "code"), FAILURES, ids=["error", "memory", "resource-exhausted"])
async def test_a_device_failure_on_the_queued_path(exc, status, code, monkeypatch):
    """A request that arrives while a large batch computes in a thread is queued, then computed
    inline by the batcher (small and compiled); its failure fails it alone."""
    async with App(offload_elements=64, batch_max_delay=0.001) as a:
        await _compile(a)
        started, release = threading.Event(), threading.Event()
        calls: list[tuple[int, bool]] = []
        real = a.rt.engine.run

        def run(jobs):
            n = sum(j.size for j in jobs)
            calls.append((n, threading.current_thread() is threading.main_thread()))
            if n > 64:  # the large request: holds the batcher busy until released
                started.set()
                assert release.wait(30)
                return real(jobs)
            raise exc

        monkeypatch.setattr(a.rt.engine, "run", run)
        big = np.linspace(-2, 2, 100)
        large = asyncio.create_task(a.post(orjson.dumps({"x": big.tolist()})))
        while not started.is_set():
            await asyncio.sleep(0.005)
        small = await a.post(orjson.dumps({"x": [0.5, 1.5]}))  # queued behind the busy batcher
        release.set()
        _check_failure(small, status, code)
        r = await large
        assert r.status_code == 200  # the other batch is unaffected
        np.testing.assert_allclose(r.json()["grad"], grad_ref(big), rtol=1e-6, atol=1e-6)
        assert calls == [(100, False), (2, True)]  # thread, then the queued one on the loop's thread
        monkeypatch.setattr(a.rt.engine, "run", real)
        assert (await a.post(orjson.dumps({"x": [0.5, 1.5]}))).json()["grad"] == [0.5, 0.0]
        assert a.rt.batcher.depth == 0
        text = (await a.client.get("/metrics")).text
        assert "surrogate_device_failures_total 1.0" in text


# -- every refusal is counted once, under its reason ---------------------------------------------

async def _slow_upload(a: App, body: bytes, ctype: str) -> httpx.Response:
    async def pieces():
        yield body[:5]
        await asyncio.sleep(0.6)
        yield body[5:]

    return await a.client.post("/v1/grad", content=pieces(), headers={"content-type": ctype})


def _slow(a: App, seconds: float, monkeypatch: Any) -> None:
    import time

    real = a.rt.engine.run

    def run(jobs):
        time.sleep(seconds)
        return real(jobs)

    monkeypatch.setattr(a.rt.engine, "run", run)


async def _disconnect(a: App) -> None:
    """A client that goes away in the middle of its upload (answered by nothing: 499)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/grad", "raw_path": b"/v1/grad", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"t")], "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    messages = [{"type": "http.request", "body": b'{"x": [', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await a.app(scope, receive, send)
    assert sent == []


REFUSALS = {
    # name: (settings, reason)
    "413 declared": ({}, "body_too_large"),
    "413 streamed": ({}, "body_too_large"),
    "too_large elements json": ({}, "too_large"),
    "too_large elements npy": ({}, "too_large"),
    "too_large rank json": ({}, "too_large"),
    "too_large rank npy": ({}, "too_large"),
    "too_large jobs": ({}, "too_large"),
    "too_large npz members": ({}, "too_large"),
    "408 upload": ({"request_timeout": 0.3}, "request_timeout"),
    "503 timeout": ({"request_timeout": 0.2, "offload_elements": 0}, "timeout"),
    "503 concurrency": ({"max_concurrent": 1, "offload_elements": 0}, "concurrency"),
    "503 queue": ({"max_queue": 1, "offload_elements": 0}, "queue"),
    "499 client gone": ({}, "client_disconnect"),
    "memory budget": ({"memory_budget": 1 << 20, "max_body_bytes": 8 << 20, "max_elements": 1 << 20}, "memory"),
}
LIMITS = {"max_body_bytes": 16384, "max_elements": 500, "max_jobs": 4, "max_rank": 4}


@pytest.mark.parametrize("name", list(REFUSALS))
async def test_each_refusal_is_counted_once_under_its_reason(name, monkeypatch):
    settings, reason = REFUSALS[name]
    async with App(**{**LIMITS, **settings}) as a:
        await _compile(a)
        before = await a.rejections()
        big_json = orjson.dumps({"x": [0.25] * 5000})  # over 16384 bytes
        assert len(big_json) > 16384
        if name == "413 declared":
            r = await a.post(big_json)
            assert err(r)[:2] == (413, "body_too_large")
        elif name == "413 streamed":
            async def pieces():
                for i in range(0, len(big_json), 1000):
                    yield big_json[i:i + 1000]

            r = await a.client.post("/v1/grad", content=pieces(), headers={"content-type": JSON})
            assert err(r)[:2] == (413, "body_too_large")
        elif name == "too_large elements json":
            assert err(await a.post(orjson.dumps({"x": [0.0] * 501})))[:2] == (422, "too_large")
        elif name == "too_large elements npy":
            assert err(await a.post(npy(np.zeros(501, np.float32)), NPY))[:2] == (422, "too_large")
        elif name == "too_large rank json":
            assert err(await a.post(orjson.dumps({"x": nested(5)})))[:2] == (422, "too_large")
        elif name == "too_large rank npy":
            assert err(await a.post(npy(np.zeros((1,) * 5, np.float32)), NPY))[:2] == (422, "too_large")
        elif name == "too_large jobs":
            assert err(await a.post(orjson.dumps([{"x": 0.0}] * 5)))[:2] == (422, "too_large")
        elif name == "too_large npz members":
            body = npz(x=np.zeros(2, np.float32), **{f"m{i}": np.zeros(1, np.float32) for i in range(16)})
            assert err(await a.post(body, NPZ))[:2] == (422, "too_large")
        elif name == "408 upload":
            assert err(await _slow_upload(a, b'{"x": [0.5, 1.0]}', JSON))[:2] == (408, "request_timeout")
        elif name == "503 timeout":
            _slow(a, 0.5, monkeypatch)
            r = await a.post(orjson.dumps({"x": [0.5]}))
            assert err(r)[:2] == (503, "timeout")
            await asyncio.sleep(0.5)  # let the slow call end
        elif name in ("503 concurrency", "503 queue"):
            _slow(a, 0.3, monkeypatch)
            rs = await asyncio.gather(*(a.post(orjson.dumps({"x": [0.5]})) for _ in range(2)))
            assert sorted(r.status_code for r in rs) == [200, 503]
            assert {r.json()["error"]["code"] for r in rs if r.status_code == 503} == {"overloaded"}
        elif name == "499 client gone":
            await _disconnect(a)
        elif name == "memory budget":  # a request larger than the whole budget
            r = await a.post(npy(np.zeros(300_000, np.float32)), NPY)
            assert err(r)[:2] == (413, "body_too_large")
            assert "memory budget" in r.json()["error"]["message"]
        after = await a.rejections()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
        assert {k: v for k, v in delta.items() if v} == {reason: 1.0}
        if name == "499 client gone":
            text = (await a.client.get("/metrics")).text
            assert 'surrogate_requests_total{endpoint="/v1/grad",protocol="v1",status="499"} 1.0' in text


async def test_a_refusal_of_a_well_formed_request_is_not_a_rejection():
    """Errors in the request itself (not a limit) leave the counter alone."""
    async with App(**LIMITS) as a:
        await _compile(a)
        before = await a.rejections()
        for body in (b'{"x": [1, 2', b'{"x": [0.5], "alpha": -1}', b'{"x": [0.5], "alpah": 1}', b"[]"):
            assert (await a.post(body)).status_code in (400, 422)
        assert await a.rejections() == before


def test_the_reference_matches_the_core():
    """The hand-written g'(x) of these tests agrees with the core's own evaluation."""
    x = np.linspace(-2, 2, 41)
    job = core.make_job("grad", x, surrogate=core.DEFAULT_SURROGATE, dtype="float64")
    np.testing.assert_allclose(core.Engine().run([job])[0], grad_ref(x), rtol=1e-12, atol=1e-12)


# -- the metrics' text: the same as prometheus-client's own objects would write ---------------------

class NativeMetrics:
    """The reference: the same metrics as prometheus-client's Counter, Gauge and Histogram, each
    update taking their locks (what service.metrics replaced on the request path)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from service.dataplane.metrics import BATCH_ELEMENT_BUCKETS, BATCH_REQUEST_BUCKETS, LATENCY_BUCKETS

        r = self.registry = CollectorRegistry()
        self.requests = Counter("surrogate_requests", "HTTP requests by endpoint, protocol and status.",
                                ["endpoint", "protocol", "status"], registry=r)
        self.latency = Histogram("surrogate_request_duration_seconds", "Request latency by endpoint.",
                                 ["endpoint", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("surrogate_requests_in_flight", "Compute requests being handled.", registry=r)
        self.elements = Counter("surrogate_elements", "Result elements computed, by endpoint.", ["endpoint"],
                                registry=r)
        self.batch_requests = Histogram("surrogate_batch_requests", "Requests fused into one engine call.",
                                        buckets=BATCH_REQUEST_BUCKETS, registry=r)
        self.batch_elements = Histogram("surrogate_batch_elements", "Elements in one engine call.",
                                        buckets=BATCH_ELEMENT_BUCKETS, registry=r)
        self.batch_seconds = Histogram("surrogate_batch_seconds", "Engine call time.", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.rejections = Counter("surrogate_rejections", "Requests refused by a limit, by reason.", ["reason"],
                                  registry=r)
        self.device_failures = Counter("surrogate_device_failures", "Engine calls that failed.", registry=r)

    def observe_request(self, endpoint, protocol, status, seconds):
        self.requests.labels(endpoint, protocol, str(status)).inc()
        self.latency.labels(endpoint, protocol).observe(seconds)

    def reject(self, reason):
        self.rejections.labels(reason).inc()

    def count_elements(self, endpoint, n):
        self.elements.labels(endpoint).inc(n)

    def on_batch(self, requests, elements, seconds):
        self.batch_requests.observe(requests)
        self.batch_elements.observe(elements)
        self.batch_seconds.observe(seconds)


def _events(m: Any) -> None:
    """The same updates for both: values on bucket bounds, between them and past the last."""
    from service.dataplane.metrics import LATENCY_BUCKETS

    rng = np.random.default_rng(7)
    latencies = [*LATENCY_BUCKETS, 0.0, 1e-7, 31.0, *rng.uniform(0, 2, 50).tolist()]
    for i, s in enumerate(latencies):
        m.observe_request("/v1/grad" if i % 3 else "/v2/models/{model}/infer", "v1" if i % 3 else "v2",
                          (200, 422, 503)[i % 3], s)
    m.observe_request("other", "v1", 404, 0.001)
    for reason in ("too_large", "body_too_large", "too_large", "queue"):
        m.reject(reason)
    for endpoint, n in (("grad", 5), ("spike", 1 << 20), ("grad", 0)):
        m.count_elements(endpoint, n)
    for req, el, s in ((1, 4, 0.0005), (3, 4**12, 0.2), (256, 4**13, 40.0), (2, 5, 0.0)):
        m.on_batch(req, el, s)
    m.in_flight.inc()
    m.in_flight.inc()
    m.in_flight.dec()
    m.device_failures.inc()


def _without_created_values(text: str) -> str:
    import re

    return re.sub(r"^(\w+_created(\{.*\})?) \S+$", r"\1 T", text, flags=re.MULTILINE)


def test_the_metrics_text_is_what_prometheus_clients_objects_write():
    from prometheus_client import generate_latest

    from service.dataplane.metrics import LocalMetrics

    engine = core.Engine()
    ours = LocalMetrics(engine, lambda: 0)
    ref = NativeMetrics()
    _events(ours)
    _events(ref)
    text = generate_latest(ours.registry).decode()
    ref_text = generate_latest(ref.registry).decode()
    engine_families = ("surrogate_compil", "surrogate_device_calls", "surrogate_jobs", "surrogate_padded",
                       "surrogate_queue_depth", "surrogate_device_info")
    ours_only = "\n".join(
        line for line in text.splitlines() if not any(f in line for f in engine_families)
    ) + "\n"
    assert _without_created_values(ours_only) == _without_created_values(ref_text)
    # the values themselves, as Prometheus reads them
    assert ours.registry.get_sample_value(
        "surrogate_request_duration_seconds_bucket", {"endpoint": "/v1/grad", "protocol": "v1", "le": "0.0005"}
    ) == ref.registry.get_sample_value(
        "surrogate_request_duration_seconds_bucket", {"endpoint": "/v1/grad", "protocol": "v1", "le": "0.0005"}
    )
    assert ours.registry.get_sample_value("surrogate_batch_elements_count") == 4
    assert ours.registry.get_sample_value("surrogate_batch_elements_bucket", {"le": "+Inf"}) == 4
    assert ours.registry.get_sample_value("surrogate_batch_elements_bucket", {"le": "4.0"}) == 1
    assert ours.registry.get_sample_value("surrogate_rejections_total", {"reason": "too_large"}) == 2
    assert ours.registry.get_sample_value("surrogate_requests_in_flight") == 1
    # and the engine's families are there, read at scrape time
    for family in ("surrogate_compilations_total 0.0", "surrogate_device_calls_total 0.0", "surrogate_queue_depth 0.0",
                   "# TYPE surrogate_compiled_variants gauge", "surrogate_device_info{"):
        assert family in text


def test_the_created_series_are_the_times_the_series_appeared():
    import time as _time

    from service.dataplane.metrics import LocalMetrics

    t0 = _time.time()
    m = LocalMetrics(core.Engine(), lambda: 0)
    m.reject("queue")
    t1 = _time.time()
    created = m.registry.get_sample_value("surrogate_rejections_created", {"reason": "queue"})
    assert t0 <= created <= t1
    assert t0 <= m.registry.get_sample_value("surrogate_batch_seconds_created") <= t1


def test_the_workers_metrics_add_up_in_one_scrape(tmp_path, monkeypatch):
    """prometheus-client's multiprocess mode, two workers simulated in one process (each with its
    own process identifier): one scrape sees the sum of both, engine statistics included."""
    from prometheus_client import generate_latest, values

    from service.dataplane import metrics as sm

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    workers = []
    for k, pid in enumerate(("1001", "1002")):
        # what a worker process does: its values go to files named by its own process identifier
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(process_identifier=lambda p=pid: p))
        engine = core.Engine()
        m = sm.Metrics(engine, lambda: 1)
        assert isinstance(m, sm.SharedMetrics)
        workers.append((m, engine))
        x = np.linspace(-1, 1, 10 + k)
        engine.run([core.make_job("grad", x, surrogate=core.DEFAULT_SURROGATE, dtype="float32")])
        for _ in range(3 + k):
            m.observe_request("/v1/grad", "v1", 200, 0.002)
        m.count_elements("grad", 10 + k)
        m.reject("too_large")
        m.on_batch(1, 10 + k, 0.001)
        m.in_flight.inc()
    for m, _ in workers:  # whichever worker answers the scrape, it sees both
        reg = m.registry
        assert reg.get_sample_value(
            "surrogate_requests_total", {"endpoint": "/v1/grad", "protocol": "v1", "status": "200"}) == 7
        assert reg.get_sample_value(
            "surrogate_request_duration_seconds_count", {"endpoint": "/v1/grad", "protocol": "v1"}) == 7
        assert reg.get_sample_value("surrogate_elements_total", {"endpoint": "grad"}) == 21
        assert reg.get_sample_value("surrogate_rejections_total", {"reason": "too_large"}) == 2
        assert reg.get_sample_value("surrogate_batch_elements_count") == 2
        assert reg.get_sample_value("surrogate_requests_in_flight") == 2
        assert reg.get_sample_value("surrogate_compilations_total") == 2
        assert reg.get_sample_value("surrogate_device_calls_total") == 2
        assert reg.get_sample_value("surrogate_jobs_total") == 2
        assert reg.get_sample_value("surrogate_queue_depth") == 2
        assert reg.get_sample_value(
            "surrogate_compiled_variants", {"op": "grad", "surrogate": core.DEFAULT_SURROGATE, "dtype": "float32"}
        ) == 2
        text = generate_latest(reg).decode()
        assert "# TYPE surrogate_requests_total counter" in text
        assert "surrogate_device_info{" in text
    # publishing again adds nothing: counters grow by what the engine did since
    workers[0][0].publish()
    workers[0][0].publish()
    assert workers[1][0].registry.get_sample_value("surrogate_compilations_total") == 2


# -- large JSON bodies (the simdjson path) are refused as small ones are ------------------------------

_BIG = b"[" + b",".join([b"0.5"] * 10_000) + b"]"  # past service.protocols.v1.fastjson.MIN_BYTES


@pytest.mark.parametrize(
    ("body", "code", "job", "field"),
    [
        (b'{"x": ' + _BIG + b', "alpha": ' + orjson.dumps(nested(9)) + b"}", "too_large", 0, "alpha"),
        (b'[{"x": ' + _BIG + b'}, {"x": [1], "x": [2]}]', "duplicate_key", 1, "x"),
        (b'[{"x": ' + _BIG + b'}, {"x": [1], "alpha": 1e999}]', "not_representable", 1, "alpha"),
        (b'{"x": ' + _BIG + b', "alpha": true}', "invalid_type", 0, "alpha"),
        (b'[{"x": ' + _BIG + b'}, {"x": ' + _BIG + b"}]", "too_large", 1, "x"),
    ],
    ids=["rank", "duplicate", "past-float64", "boolean", "elements"],
)
async def test_large_json_bodies_are_refused_as_small_ones(body, code, job, field):
    from service.protocols.tensors import fastjson

    assert len(body) > fastjson.MIN_BYTES
    async with App(max_elements=15_000) as a:
        r = await a.post(body)
        assert err(r) == (422, code, job, field)
