"""Limits, overload, auth, faults, batching and metrics, in-process (ASGI transport)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from service.app import create_app
from service.server.settings import Settings

from helpers import App, make_settings

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-token-0123456789"
JSON = {"content-type": "application/json"}
SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]


def slow_engine(rt, seconds: float):
    real = rt.engine.run

    def run(jobs):
        time.sleep(seconds)
        return real(jobs)

    rt.engine.run = run


async def grad(client, x=SEED, **kw):
    return await client.post("/v1/grad", content=orjson.dumps({"x": x, **kw}), headers=JSON)


# -- auth -------------------------------------------------------------------------------------

async def test_auth_protects_compute_metadata_and_metrics_but_not_probes():
    async with App(api_token=TOKEN) as a:
        c = a.client
        for method, path in [("POST", "/v1/grad"), ("GET", "/v1/surrogates"), ("GET", "/v1/info"), ("GET", "/metrics")]:
            for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": f"Basic {TOKEN}"}):
                r = await c.request(method, path, headers={**JSON, **headers}, content=b'{"x": [1]}' if method == "POST" else None)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "unauthorized"
        ok = {"authorization": f"Bearer {TOKEN}", **JSON}
        r = await c.post("/v1/grad", content=b'{"x": [0.5]}', headers=ok)
        assert r.json()["grad"] == [0.5]
        assert (await c.get("/metrics", headers=ok)).status_code == 200
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200


async def test_token_file_accepts_each_token(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# operators\nfirst-token-aaaaaaaaaaaa\n\nsecond-token-bbbbbbbbbbb\n")
    async with App(api_token_file=f) as a:
        for tok, status in [("first-token-aaaaaaaaaaaa", 200), ("second-token-bbbbbbbbbbb", 200), ("third-token-ccccccccccccc", 401)]:
            r = await a.client.get("/v1/info", headers={"authorization": f"Bearer {tok}"})
            assert r.status_code == status


def test_unsafe_tokens_are_refused(tmp_path):
    with pytest.raises(ValueError, match="16 characters"):
        Settings(api_token="short")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no token"):
        Settings(api_token_file=empty)
    with pytest.raises(ValueError, match="not a readable file"):
        Settings(api_token_file=tmp_path / "missing")


async def test_auth_is_off_by_default_and_says_so(caplog):
    caplog.set_level("WARNING", logger="service")
    async with App() as a:
        assert (await grad(a.client)).status_code == 200
    assert "authentication off" in caplog.text


def test_contract_declares_the_bearer_scheme():
    doc = create_app(make_settings()).openapi()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": "Needed only when the server is configured with SURROGATE_API_TOKEN or SURROGATE_API_TOKEN_FILE.",
    }
    assert doc["paths"]["/v1/grad"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


# -- overload, limits, time -------------------------------------------------------------------

async def test_queue_limit_answers_503_with_retry_after_and_recovers():
    async with App(max_queue=2, offload_elements=0, batch_max_delay=0) as a:
        slow_engine(a.rt, 0.3)
        rs = await asyncio.gather(*(grad(a.client, x=[0.5 * i / 10]) for i in range(10)))
        codes = [r.status_code for r in rs]
        assert set(codes) == {200, 503}, codes
        for i, r in enumerate(rs):
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["grad"] == [pytest.approx(1 - 0.05 * i)]
        assert a.rt.batcher.depth == 0
        assert (await grad(a.client)).status_code == 200  # recovers by itself
        metrics = (await a.client.get("/metrics")).text
        assert 'surrogate_rejections_total{reason="queue"}' in metrics


async def test_concurrency_limit_answers_503_at_once():
    async with App(max_concurrent=1, offload_elements=0) as a:
        slow_engine(a.rt, 0.3)
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(grad(a.client) for _ in range(4)))
        assert sorted(r.status_code for r in rs) == [200, 503, 503, 503]
        assert time.perf_counter() - t0 < 5


async def test_request_time_limit():
    async with App(request_timeout=0.2, offload_elements=0) as a:
        slow_engine(a.rt, 0.6)
        r = await grad(a.client)
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        await asyncio.sleep(0.6)

        async def slow_body():
            yield b'{"x": ['
            await asyncio.sleep(1.0)
            yield b"1]}"

        r = await a.client.post("/v1/grad", content=slow_body(), headers=JSON)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"


# -- faults -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [(RuntimeError("XLA exploded"), 500, "device_error"), (MemoryError(), 503, "device_out_of_memory"),
     (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4GB"), 503, "device_out_of_memory")],
)
async def test_a_device_failure_fails_only_its_batch(exc, status, code):
    async with App() as a:
        real = a.rt.engine.run
        calls = {"n": 0}

        def flaky(jobs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise exc
            return real(jobs)

        a.rt.engine.run = flaky
        r = await grad(a.client)
        assert r.status_code == status and r.json()["error"]["code"] == code
        assert "XLA exploded" not in r.text  # no internals leak
        r = await grad(a.client)
        assert r.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]
        assert "surrogate_device_failures_total 1.0" in (await a.client.get("/metrics")).text


async def test_unexpected_errors_are_a_generic_500(monkeypatch):
    async with App() as a:
        import service.protocols.v1.codec as v1

        def boom(*args, **kw):
            raise KeyError("internal detail")

        monkeypatch.setattr(v1, "result_dict", boom)
        r = await grad(a.client)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "internal detail" not in r.text


async def test_cancelled_requests_leak_nothing():
    async with App(offload_elements=0) as a:
        slow_engine(a.rt, 0.2)
        tasks = [asyncio.create_task(grad(a.client)) for _ in range(5)]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):
            if a.rt.batcher.depth == 0:
                break
            await asyncio.sleep(0.02)
        assert a.rt.batcher.depth == 0
        assert (await grad(a.client)).status_code == 200


# -- batching and metrics -------------------------------------------------------------------

async def test_concurrent_requests_are_batched_and_answered_correctly():
    async with App(batch_max_delay=0.005) as a:
        xs = [np.linspace(-1, 1, 3 + i).tolist() for i in range(24)]
        alphas = [0.5 + 0.25 * i for i in range(24)]
        rs = await asyncio.gather(*(grad(a.client, x=x, alpha=al) for x, al in zip(xs, alphas)))
        for x, al, r in zip(xs, alphas, rs):
            x = np.array(x, np.float32)
            want = np.where(np.abs(x) > 1 / np.float32(al), 0, al - al * al * np.abs(x))
            np.testing.assert_allclose(r.json()["grad"], want, rtol=2e-6, atol=1e-6)
        st = a.rt.batcher.stats
        assert st.requests == 24 and st.batches < 24
        text = (await a.client.get("/metrics")).text
        assert "surrogate_batch_requests_bucket" in text


async def test_metrics_count_requests_compilations_and_device():
    async with App() as a:
        await grad(a.client)
        await grad(a.client, alpha=-1)
        text = (await a.client.get("/metrics")).text
        assert 'surrogate_requests_total{endpoint="/v1/grad",protocol="v1",status="200"} 1.0' in text
        assert 'surrogate_requests_total{endpoint="/v1/grad",protocol="v1",status="422"} 1.0' in text
        assert 'surrogate_request_duration_seconds_bucket{endpoint="/v1/grad",le=' in text
        assert "surrogate_compilations_total 1.0" in text
        assert 'surrogate_compiled_variants{dtype="float32",op="grad",surrogate="piecewise_quadratic"} 1.0' in text
        assert 'surrogate_elements_total{endpoint="grad"} 5.0' in text
        assert "surrogate_queue_depth 0.0" in text
        assert 'surrogate_device_info{jax_version=' in text
        # unknown paths share one label: no unbounded cardinality
        await a.client.get("/nope/1")
        await a.client.get("/nope/2")
        assert 'surrogate_requests_total{endpoint="other",protocol="v1",status="404"} 2.0' in (await a.client.get("/metrics")).text


# -- hostile input ----------------------------------------------------------------------------

HOSTILE = [
    (b'{"x": [1], "x": [2]}', 422, "duplicate_key"),
    (b'[{"x": [1]}, {"x": [1], "alpha": 1, "alpha": 2}]', 422, "duplicate_key"),
    (b'{"x": [1], "\\u0078": [2]}', 422, "duplicate_key"),
    (b'{"x": [1e308, -1e308]}', 422, "not_representable"),  # float32 overflow
    (b'{"x": [1e308], "dtype": "float64"}', 200, None),
    (b'{"x": [1], "alpha": 1e-400}', 422, "invalid_value"),  # underflows to 0
    (b'{"x": [123456789012345678901234567890]}', 200, None),
    (b'{"x": [1], "surrogate": "\xc3\xa9\xe2\x82\xac"}', 422, "unknown_surrogate"),
    (b'{"x": [1], "\xf0\x9f\x98\x80": 1}', 422, "unknown_field"),
    (b'{"x": [1], "dtype": "\\u0000"}', 422, "unknown_dtype"),
    (b'\xff\xfe{"x": 1}', 400, "bad_request"),
    (b'{"x": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 400, "bad_request"),
    (b'{"x": ' + b"[" * 9 + b"1" + b"]" * 9 + b"}", 422, "too_large"),
    (b'{"x": [1, 2, 3' , 400, "bad_request"),
    (b'{"x": [1]} trailing', 400, "bad_request"),
    (b'{"x": [Infinity]}', 400, "bad_request"),
    (b'{"x": [1]}' * 3, 400, "bad_request"),
    (b'null', 422, "invalid_type"),
    (b'"x"', 422, "invalid_type"),
    (b'{"x": [[]]}', 200, None),
    (b'{"x": [[], [1]]}', 422, "invalid_type"),
]


@pytest.mark.parametrize(("raw", "status", "code"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
async def test_hostile_json(raw, status, code):
    async with App() as a:
        r = await a.client.post("/v1/grad", content=raw, headers=JSON)
        assert r.status_code == status, r.text
        if code:
            assert r.json()["error"]["code"] == code
        assert (await grad(a.client)).status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonx", "image/png"])
async def test_wrong_content_types(ctype):
    async with App() as a:
        r = await a.client.post("/v1/spike", content=b'{"x": [1]}', headers={"content-type": ctype})
        assert r.status_code == 415


async def test_json_with_charset_is_fine():
    async with App() as a:
        r = await a.client.post("/v1/spike", content=b'{"x": [1]}', headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200


def test_an_empty_token_means_no_token(monkeypatch):
    monkeypatch.setenv("SURROGATE_API_TOKEN", "")
    monkeypatch.setenv("SURROGATE_API_TOKEN_FILE", " ")
    s = Settings()
    assert s.api_token is None and s.api_token_file is None and s.tokens() == []
