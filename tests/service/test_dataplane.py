"""The request path's shape: one door per endpoint (under a root path too), compilation off the
event loop, one JSON reading whatever the body's size, and documentation that needs no internet."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import numpy as np
import orjson
import pytest

from service.app import create_app

from helpers import make_settings

pytestmark = pytest.mark.anyio


class UvicornStyle(httpx.ASGITransport):
    """What uvicorn does with ``--root-path``: the root path is put in front of the request's path."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(path=self.root_path + request.url.path)
        return await super().handle_async_request(request)


async def test_every_endpoint_answers_under_a_root_path():
    app = create_app(make_settings(root_path="/api/"))
    async with app.router.lifespan_context(app):
        transport = UvicornStyle(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/spike", content=b'{"x":[-1,0,1]}', headers={"content-type": "application/json"})
            assert r.status_code == 200
            assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [3], "spike": [0.0, 1.0, 1.0]}
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            assert (await c.get("/v1/surrogates/sigmoid")).json()["name"] == "sigmoid"
            r = await c.post("/v2/models/sigmoid/infer", json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                                           "data": [0.0]}], "outputs": [{"name": "grad"}]})
            assert r.json()["outputs"][0]["data"] == [1.0]  # sigmoid, alpha 4: alpha/4 at 0
            doc = (await c.get("/openapi.json")).json()
            assert doc["servers"] == [{"url": "/api"}]
            html = (await c.get("/docs")).text
            assert 'href="/api/docs/assets/swagger-ui.css"' in html and "url: '/api/openapi.json'" in html
            assert (await c.get("/docs/assets/swagger-ui-bundle.js")).status_code == 200
            assert (await c.get("/nothing")).status_code == 404


async def test_the_docs_need_no_internet(client):
    html = (await client.get("/docs")).text
    assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    js = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and js.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert len(js.content) > 100_000
    assert (await client.get("/docs/assets/..%2Fsettings.py")).status_code == 404
    assert (await client.get("/docs/assets/index.j2")).status_code == 404


def test_the_route_table_declares_every_endpoint_once_and_the_contract_comes_from_it():
    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    from service.routes import ComputeRoute

    app = create_app(make_settings())
    assert isinstance(app, FastAPI)
    routes = [r for r in app.router.routes if isinstance(r, APIRoute)]
    keys = [(m, r.path) for r in routes for m in r.methods]
    assert len(keys) == len(set(keys))
    doc = app.openapi()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(m, r.path) for r in routes for m in r.methods if r.include_in_schema}
    assert "servers" not in doc
    # the compute endpoints are raw ASGI routes, matched before every other route
    compute = [r for r in app.router.routes if isinstance(r, ComputeRoute)]
    assert {r.path for r in compute} == {"/v1/spike", "/v1/grad", "/v1/fun", "/v2/models/{model}/infer",
                                         "/v2/models/{model}/versions/{version}/infer"}
    assert app.router.routes[: len(compute)] == compute
    assert all(r.app is r.compute for r in compute)


async def test_path_parameters_are_matched_by_segment(client):
    r = await client.post("/v2/models/sigmoid/versions/1/infer",
                          json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}],
                                "outputs": [{"name": "spike"}]})
    assert r.status_code == 200 and r.json()["model_name"] == "sigmoid"
    assert (await client.post("/v2/models//infer", json={})).status_code == 404
    assert (await client.post("/v2/models/sigmoid/infer/x", json={})).status_code == 404


async def test_a_cold_variant_compiles_off_the_event_loop():
    """While a never-seen variant compiles, probes and warm requests are answered: the compilation is
    held until they have been, which would deadlock (and time out) were it on the event loop."""
    app = create_app(make_settings())
    rt = app.state.runtime
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            warm = {"x": [0.5]}
            assert (await c.post("/v1/grad", json=warm)).status_code == 200
            started, release = threading.Event(), threading.Event()
            real = rt.engine._get_or_compile

            def held(key):
                if rt.engine._cached(key) is None:
                    started.set()
                    assert release.wait(30), "the compilation was never released"
                return real(key)

            rt.engine._get_or_compile = held
            cold = asyncio.create_task(c.post("/v1/grad", json={"x": [0.5], "surrogate": "arctan", "dtype": "float64"}))
            assert await asyncio.to_thread(started.wait, 30)
            r = await asyncio.wait_for(c.get("/healthz"), 10)
            assert r.status_code == 200
            r = await asyncio.wait_for(c.post("/v1/grad", json=warm), 10)
            assert r.json()["grad"] == [0.5]
            assert not cold.done()
            release.set()
            r = await asyncio.wait_for(cold, 30)
            assert r.status_code == 200 and r.json()["dtype"] == "float64"


@pytest.mark.parametrize("big", [2**54 + 2**30 + 1, 2**53 + 1, -(2**60) - 12345, 2**63 + 2**40])
async def test_integers_read_the_same_whatever_the_body_size(client, big):
    """A JSON number is read as the nearest float64, then cast: the small-body (orjson) and the
    large-body (simdjson) readers agree. The value is seen through c * g'(0) = c (alpha = 1)."""
    want = np.float32(np.float64(big))
    vals = []
    for pad in (0, 8000):
        body = orjson.dumps({"x": [0.0] * (1 + pad), "cotangent": [big] + [0.25] * pad})
        assert (len(body) >= 32 * 1024) == bool(pad)
        r = await client.post("/v1/grad", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200
        vals.append(np.float32(r.json()["grad"][0]))
    assert vals[0] == vals[1] == want


async def encoded_off_the_loop(monkeypatch, n: int, accept: str, **settings) -> bool:
    """Whether the answer of a ``/v1/grad`` of ``n`` float32 elements (sent as .npy, answered as
    ``accept``) was encoded in a worker thread; the answer checked against NumPy."""
    from helpers import App
    from service.protocols.v1.codec import V1Codec

    threads: list[int] = []
    encode = V1Codec.encode

    def recording(self, decoded, results):
        threads.append(threading.get_ident())
        return encode(self, decoded, results)

    monkeypatch.setattr(V1Codec, "encode", recording)
    x = np.linspace(-2, 2, n, dtype=np.float32)
    async with App(**settings) as a:
        buf = io.BytesIO()
        np.save(buf, x)
        r = await a.client.post("/v1/grad", content=buf.getvalue(),
                                headers={"content-type": "application/x-npy", "accept": accept})
        assert r.status_code == 200, r.text
        got = np.load(io.BytesIO(r.content)) if accept != "application/json" else np.asarray(r.json()["grad"])
        np.testing.assert_allclose(got, np.maximum(0, 1 - np.abs(x)), rtol=1e-6, atol=1e-6)
    assert len(threads) == 1
    return threads[0] != threading.get_ident()


@pytest.mark.parametrize(("n", "off_loop"), [(30_000, False), (120_000, True)])
async def test_answers_are_encoded_off_the_loop_by_their_bytes(monkeypatch, n, off_loop):
    """With the element threshold out of reach, an answer estimated over 1 MiB (120,000 JSON numbers)
    is still written in a worker thread, and a smaller one (30,000: about 0.5 MiB) on the loop."""
    from service.dataplane import OFFLOAD_BYTES
    from service.protocols.tensors.npy import answer_bytes

    assert (answer_bytes((n,), 4, json=True) > OFFLOAD_BYTES) is off_loop
    assert await encoded_off_the_loop(monkeypatch, n, "application/json", offload_elements=10**9) is off_loop


@pytest.mark.parametrize(("n", "accept", "off_loop"), [
    (200_000, "application/x-npy", False),  # 0.8 MB binary: a copy at most, on the loop
    (300_000, "application/x-npy", True),  # 1.2 MB: over 1 MiB, in a worker thread
    (20_000, "application/json", True),  # over offload_elements as text: in a worker thread
    (16_384, "application/json", False),  # at offload_elements: on the loop
])
async def test_binary_answers_are_encoded_on_the_loop_below_a_mebibyte(monkeypatch, n, accept, off_loop):
    """Text answers go to a worker thread past offload_elements numbers; binary ones only past 1 MiB."""
    assert await encoded_off_the_loop(monkeypatch, n, accept) is off_loop
