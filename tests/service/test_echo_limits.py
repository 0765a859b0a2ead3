"""What a refusal holds and repeats, in process: a client's value is repeated only cut (64
characters and an ellipsis, in the message and in ``field``), the ``/v2`` ``id`` is at most 256
bytes, a ``/v2`` JSON request has few objects and keys and no repeated key, a refusal the client
does not read is cut off at the send timeout, and no request body outlives its refusal."""

from __future__ import annotations

import asyncio
import gc
import io
import tracemalloc

import numpy as np
import orjson
import pytest
from helpers import App, asgi_post, npy

from service.errors import ECHO_LIMIT, shown

pytestmark = pytest.mark.anyio
LONG = "q" * (1 << 20)  # a 1 MiB client value
QLONG = "q" * 4000  # one in a query string (a request's head is bounded)
CUT = LONG[:ECHO_LIMIT]
V2 = "/v2/models/sigmoid/infer"
JSON = {"content-type": "application/json"}


@pytest.fixture
async def app():
    async with App(max_body_bytes=64 << 20) as a:
        yield a


def x_tensor(**kw):
    return {"name": "x", "shape": [2], "datatype": "FP32", "data": [0.5, -0.5], **kw}


#: (path, body, query, content type) where a 1 MiB client value goes into a /v1 refusal
V1_PLACES = {
    "dtype": ("/v1/grad", orjson.dumps({"x": [1.0], "dtype": LONG}), "", "application/json"),
    "surrogate": ("/v1/grad", orjson.dumps({"x": [1.0], "surrogate": LONG}), "", "application/json"),
    "unknown key": ("/v1/grad", orjson.dumps({"x": [1.0], LONG: 1.0}), "", "application/json"),
    "duplicate key": ("/v1/grad", b'{"x":[1.0],"' + LONG.encode() + b'":1,"' + LONG.encode() + b'":2}', "",
                      "application/json"),
    "dtype in the query": ("/v1/grad", npy(np.zeros(2, np.float32)), "dtype=" + QLONG, "application/x-npy"),
    "surrogate in the query": ("/v1/grad", npy(np.zeros(2, np.float32)), "surrogate=" + QLONG, "application/x-npy"),
    "query key": ("/v1/grad", npy(np.zeros(2, np.float32)), QLONG + "=1", "application/x-npy"),
    "query value": ("/v1/grad", npy(np.zeros(2, np.float32)), "alpha=" + QLONG, "application/x-npy"),
}


@pytest.mark.parametrize("place", list(V1_PLACES))
async def test_v1_refusals_repeat_a_client_value_cut(app, place):
    path, content, query, ctype = V1_PLACES[place]
    r = await app.client.post(path + ("?" + query if query else ""), content=content, headers={"content-type": ctype})
    assert r.status_code in (400, 422), r.text[:200]
    assert len(r.content) < 1024
    err = r.json()["error"]
    assert shown(LONG) in err["message"] and LONG[: ECHO_LIMIT + 1] not in err["message"]  # (QLONG alike)
    assert err["field"] in ("dtype", "surrogate", "alpha", CUT + "…")


def v2_request(**kw):
    return {"inputs": [x_tensor()], **kw}


#: /v2 bodies where a 1 MiB client value goes into a refusal
V2_PLACES = {
    "datatype": {"inputs": [x_tensor(datatype=LONG)]},
    "input name": {"inputs": [x_tensor(), {**x_tensor(), "name": LONG}]},
    "input name of bad data": {"inputs": [{**x_tensor(), "name": LONG, "data": [0.5, "a"]}]},
    "input name of a bad shape": {"inputs": [{**x_tensor(), "name": LONG, "shape": "[2]"}]},
    "output name": v2_request(outputs=[{"name": LONG}]),
    "parameter key": v2_request(parameters={LONG: 1.0}),
    "model_name": v2_request(model_name=LONG),
    "unknown field": v2_request(**{LONG: 1}),
    "binary_data_size": {"inputs": [x_tensor(parameters={"binary_data_size": LONG})]},
}


@pytest.mark.parametrize("place", list(V2_PLACES))
async def test_v2_refusals_repeat_a_client_value_cut(app, place):
    r = await app.client.post(V2, content=orjson.dumps(V2_PLACES[place]), headers=JSON)
    assert r.status_code == 400, r.text[:200]
    assert len(r.content) < 1024
    message = r.json()["error"]
    assert CUT in message and LONG[: ECHO_LIMIT + 1] not in message


async def test_v2_model_and_version_in_the_path_are_cut(app):
    name = "m" * 4000
    r = await app.client.post(f"/v2/models/{name}/infer", content=orjson.dumps(v2_request()), headers=JSON)
    assert r.status_code == 404 and len(r.content) < 1024 and shown(name) in r.json()["error"]
    r = await app.client.post(f"/v2/models/sigmoid/versions/{name}/infer", content=orjson.dumps(v2_request()),
                              headers=JSON)
    assert r.status_code == 404 and len(r.content) < 1024 and shown(name) in r.json()["error"]


async def test_an_unknown_surrogate_or_asset_is_named_cut(app):
    name = "s" * 4000
    r = await app.client.get(f"/v1/surrogates/{name}")
    assert r.status_code == 404 and len(r.content) < 1024 and shown(name) in r.json()["error"]["message"]
    r = await app.client.get(f"/docs/assets/{name}")
    assert r.status_code == 404 and len(r.content) < 1024 and shown(name) in r.json()["error"]["message"]


async def test_an_unknown_route_is_named_cut(app):
    path = "/v1/" + "p" * 4000
    r = await app.client.get(path)
    assert r.status_code == 404 and len(r.content) < 1024
    assert r.json()["error"]["message"].startswith(f"no route {path[:ECHO_LIMIT]}…;")


# -- the /v2 id -------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", ["i" * 256, "é" * 128, "€" * 85 + "i"])
async def test_an_id_of_256_bytes_is_echoed(app, rid):
    assert len(rid.encode()) == 256
    r = await app.client.post(V2, content=orjson.dumps(v2_request(id=rid)), headers=JSON)
    assert r.status_code == 200 and r.json()["id"] == rid


@pytest.mark.parametrize("rid", ["i" * 257, "é" * 128 + "i", "€" * 86, "i" * (56 << 20)])
async def test_an_id_past_256_bytes_is_refused_by_name(app, rid):
    r = await app.client.post(V2, content=orjson.dumps(v2_request(id=rid)), headers={**JSON, "accept-encoding": "gzip"})
    assert r.status_code == 400 and len(r.content) < 1024
    assert "'id'" in r.json()["error"] and "256 bytes" in r.json()["error"]


async def test_an_id_must_be_a_string(app):
    r = await app.client.post(V2, content=orjson.dumps(v2_request(id=["i"] * 100_000)), headers=JSON)
    assert r.status_code == 400 and "'id' must be a string" in r.json()["error"]


# -- /v2 JSON: objects, keys, repeated keys -----------------------------------------------------

HEAD = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[0.5]}],"parameters":{"timeout":'


@pytest.mark.parametrize("n", [1024, 1025])
async def test_a_request_holds_at_most_1024_objects(app, n):
    content = HEAD + b"[" + b",".join([b"{}"] * (n - 3)) + b"]}}"  # (the timeout parameter is ignored)
    assert content.count(b"{") == n
    r = await app.client.post(V2, content=content, headers=JSON)
    if n <= 1024:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and "1025 objects, over the limit of 1024" in r.json()["error"]


@pytest.mark.parametrize("n", [4096, 4097])
async def test_a_request_holds_at_most_4096_keys(app, n):
    content = HEAD + b'"' + b":" * (n - HEAD.count(b":")) + b'"}}'  # a colon in a string counts too
    assert content.count(b":") == n
    r = await app.client.post(V2, content=content, headers=JSON)
    if n <= 4096:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and "4097 keys" in r.json()["error"]


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("where", ["request", "tensor"])
async def test_a_repeated_key_is_refused_by_name(app, size, where):
    data = [0.25] * (1 if size == "small" else 20_000)  # (a large request takes the simdjson path)
    x = orjson.dumps(x_tensor(shape=[len(data)], data=data))
    if where == "request":
        content = b'{"id":"a","inputs":[' + x + b'],"id":"b"}'
    else:
        content = b'{"inputs":[' + x[:-1] + b',"datatype":"FP64"}]}'
    r = await app.client.post(V2, content=content, headers=JSON)
    assert r.status_code == 400, r.text[:200]
    key = "id" if where == "request" else "datatype"
    assert f"duplicate key {key!r}" in r.json()["error"]


async def test_nested_data_takes_the_fast_path_and_is_exact(app):
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 2, (300, 40))
    t = {"name": "x", "shape": [300, 40], "datatype": "FP64", "data": x.tolist()}
    content = orjson.dumps({"inputs": [t], "outputs": [{"name": "spike"}]})
    assert len(content) > 32 * 1024
    r = await app.client.post(V2, content=content, headers=JSON)
    assert r.status_code == 200
    out = r.json()["outputs"][0]
    assert out["shape"] == [300, 40] and out["data"] == (x >= 0).astype(float).ravel().tolist()
    ragged = orjson.dumps({"inputs": [{**t, "data": x.tolist()[:-1] + [[0.5]]}]})
    r = await app.client.post(V2, content=ragged, headers=JSON)
    assert r.status_code == 400 and "ragged" in r.json()["error"]
    for data in (x.tolist()[:-1] + [x[-1].tolist()[:-1] + [[0.5]]],  # a list where a number belongs
                 x.ravel().tolist()[:5] + [[0.5]] + x.ravel().tolist()[6:]):  # (flat data too)
        shape = [300, 40] if len(data) == 300 else [12000]
        hidden = orjson.dumps({"inputs": [{**t, "shape": shape, "data": data}]})
        r = await app.client.post(V2, content=hidden, headers=JSON)
        assert r.status_code == 400 and "ragged" in r.json()["error"], r.text[:200]


# -- a refusal the client does not read ---------------------------------------------------------

async def test_a_refusal_the_client_does_not_read_is_cut_off_and_counted():
    async with App(send_timeout=0.2) as a:
        aborted = []

        async def receive():
            return {"type": "http.request", "body": b'{"x":[1.0],"dtype":"nope"}', "more_body": False}

        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.sleep(3600)  # a client that never reads

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/grad", "raw_path": b"/v1/grad", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"26")],
                 "server": ("t", 80), "client": ("c", 1), "surrogate.abort": lambda: aborted.append(1)}
        await asyncio.wait_for(a.app(scope, receive, send), 10)  # no exception out of the app
        assert aborted == [1]
        metrics = (await a.client.get("/metrics")).text
        assert 'surrogate_rejections_total{reason="send_timeout"} 1.0' in metrics


# -- no body outlives its refusal -----------------------------------------------------------------

MiB = 1 << 20


def numbers_then_null(n: int) -> bytes:
    return b"[" + b"0.5," * n + b"null]"


REFUSED = {
    "v1 null": ("/v1/grad", b'{"x":' + numbers_then_null(MiB) + b"}", "application/json", 422),
    "v2 null": (V2, b'{"inputs":[{"name":"x","shape":[%d],"datatype":"FP64","data":' % (MiB + 1)
                + numbers_then_null(MiB) + b"}]}", "application/json", 400),
    "v1 dtype": ("/v1/grad", b'{"x":[1.0],"dtype":"' + b"a" * (4 * MiB) + b'"}', "application/json", 422),
    "v1 ragged": ("/v1/grad", b'{"x":[' + b"[0.5,0.5]," * (MiB // 2) + b'[0.5]]}', "application/json",
                                422),
}


async def held_after(request, times: int = 2) -> int:
    """The bytes (tracemalloc) still held after ``times`` awaits of ``request()``, with the cyclic
    garbage collector off: only what reference counting frees is freed."""
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(times):
            await request()
        await asyncio.sleep(0.05)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()


@pytest.mark.parametrize("case", list(REFUSED))
async def test_no_body_outlives_its_refusal_with_the_collector_off(app, case):
    """With the cyclic garbage collector off, what a refusal leaves behind is only what reference
    counting frees: a body kept by a cycle (an exception, its traceback, a frame) would stay."""
    path, content, ctype, status = REFUSED[case]
    r = await app.client.post(path, content=content, headers={"content-type": ctype})  # (imports, caches)
    assert r.status_code == status
    del r

    async def refused() -> None:
        r = await app.client.post(path, content=content, headers={"content-type": ctype})
        assert r.status_code == status and len(r.content) < 1024

    left = await held_after(refused)
    assert left < len(content) // 4, f"{left / MiB:.1f} MiB left behind by 2 refusals of {len(content) / MiB:.1f} MiB"


async def test_no_batch_outlives_a_failed_device_call(app, monkeypatch):
    """A failed device call (through the batcher's future, in a worker thread) keeps no job."""
    x = npy(np.linspace(-1, 1, 1 << 20, dtype=np.float32))

    def fail(group):
        raise RuntimeError("device failure")

    monkeypatch.setattr(app.rt.engine, "_run_group", fail)  # inside the engine's run, as a device fails

    async def failed() -> None:
        r = await app.client.post("/v1/grad", content=x, headers={"content-type": "application/x-npy"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "device_error"

    left = await held_after(failed)
    assert left < len(x) // 4, f"{left / MiB:.1f} MiB left behind"


@pytest.mark.parametrize("n", [1 << 10, 1 << 20])
async def test_no_job_outlives_its_answer(app, n):
    """An answered request leaves nothing behind, small (computed on the event loop) or large
    (in a worker thread, then on the loop once measured quick): the engine keeps no plan of it, and
    JAX, which keeps the arguments of its last call (here a view of the body itself: 2^20 elements
    fill their bucket), is made to let go of them."""
    x = npy(np.linspace(-1, 1, n, dtype=np.float32))

    async def answered() -> None:  # straight through the app: an httpx response would keep its answer in a cycle
        status, content = await asgi_post(app.app, "/v1/grad", x,
                                          {"content-type": "application/x-npy", "accept": "application/x-npy"})
        assert status == 200
        np.testing.assert_allclose(np.load(io.BytesIO(content)), 1 - np.abs(np.linspace(-1, 1, n)), atol=1e-6)

    for _ in range(3):  # compiled, measured
        await answered()
    left = await held_after(answered)
    assert left < max(len(x) // 4, 64 << 10), f"{left / MiB:.1f} MiB left behind"
