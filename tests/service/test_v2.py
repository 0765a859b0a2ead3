"""The Open Inference Protocol (/v2), in process: metadata, health, infer (JSON and binary tensors,
every datatype, broadcasting, every output), compression, errors in the OIP shape, and equality
with /v1 bit for bit."""

from __future__ import annotations

import gzip
import zlib

import httpx
import numpy as np
import orjson
import pytest

import surrogate_core as sc
from reference import pq_grad
from service.app import create_app

from helpers import WIRE, body, make_settings, tensor

pytestmark = pytest.mark.anyio
SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
INFER = "/v2/models/piecewise_quadratic/infer"
def outputs(r) -> dict[str, np.ndarray]:
    """The outputs of an answer, JSON or binary, as arrays of their datatype."""
    n = r.headers.get("inference-header-content-length")
    raw = r.content
    head = orjson.loads(raw[: int(n)] if n else raw)
    out, o = {}, int(n) if n else 0
    for t in head["outputs"]:
        dt = np.dtype(WIRE[t["datatype"]])
        if "data" in t:
            out[t["name"]] = np.asarray(t["data"], dtype=dt).reshape(t["shape"])
        else:
            size = t["parameters"]["binary_data_size"]
            out[t["name"]] = np.frombuffer(raw, dtype=dt, count=size // dt.itemsize, offset=o).reshape(t["shape"])
            o += size
    assert o == (len(raw) if n else 0)
    return out


@pytest.fixture
async def client():
    app = create_app(make_settings(max_elements=100_000, max_body_bytes=2_000_000))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c


async def infer(client, inputs, model="piecewise_quadratic", **req):
    ts, blobs = zip(*inputs) if inputs else ((), ())
    content, headers = body({"inputs": list(ts), **req}, blobs)
    return await client.post(f"/v2/models/{model}/infer", content=content, headers=headers)


# -- metadata and health ------------------------------------------------------------------------

async def test_server_metadata_health_and_repository(client):
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "surrogate-serve" and "binary_tensor_data" in meta["extensions"]
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    index = (await client.post("/v2/repository/index")).json()
    assert {m["name"] for m in index} == set(sc.names())
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index)


async def test_model_metadata_names_inputs_and_outputs(client):
    for path in ("/v2/models/sigmoid", "/v2/models/sigmoid/versions/1"):
        meta = (await client.get(path)).json()
        assert meta["name"] == "sigmoid" and meta["versions"] == ["1"]
        assert [t["name"] for t in meta["inputs"]] == ["x", "alpha", "cotangent"]
        assert [t["name"] for t in meta["outputs"]] == ["spike", "grad", "fun", "vjp"]
        assert all(t["shape"] == [-1] * 8 for t in meta["inputs"] + meta["outputs"])  # SURROGATE_MAX_RANK
    gradient_only = next(s.name for s in sc.all_surrogates() if s.fun is None)
    meta = (await client.get(f"/v2/models/{gradient_only}")).json()
    assert "fun" not in [t["name"] for t in meta["outputs"]]
    assert (await client.get("/v2/models/sigmoid/ready")).json() == {"name": "sigmoid", "ready": True}
    assert (await client.get("/v2/models/sigmoid/versions/1/ready")).status_code == 200


async def test_unknown_model_or_version_is_404_in_the_oip_shape(client):
    r = await client.get("/v2/models/sigmoud")
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'sigmoud'; did you mean 'sigmoid'?"}
    r = await client.get("/v2/models/sigmoid/versions/2")
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]
    r = await infer(client, [tensor("x", SEED)], model="nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}


# -- infer ---------------------------------------------------------------------------------------

async def test_infer_json_gives_every_output_the_request_can_produce(client):
    r = await infer(client, [tensor("x", SEED)], id="req-7")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["model_name"] == "piecewise_quadratic" and doc["model_version"] == "1" and doc["id"] == "req-7"
    assert [o["name"] for o in doc["outputs"]] == ["spike", "grad", "fun"]
    out = {o["name"]: o["data"] for o in doc["outputs"]}
    assert out["spike"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert out["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]  # the seed's values, by hand


async def test_nested_data_is_accepted_and_written_flat(client):
    x = np.array([[-2.0, -0.5], [0.0, 0.5]])
    t, _ = tensor("x", x)
    t["data"] = x.tolist()
    r = await infer(client, [(t, b"")], outputs=[{"name": "grad"}])
    (o,) = r.json()["outputs"]
    assert o["shape"] == [2, 2] and o["data"] == [0.0, 0.5, 1.0, 0.5]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "BF16"])
async def test_binary_tensors_both_ways_in_every_datatype(client, datatype):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, (3, 7)).astype(WIRE[datatype])
    r = await infer(client, [tensor("x", x, datatype, binary=True)], parameters={"alpha": 2.0, "binary_data_output": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    out = outputs(r)
    dt = sc.resolve_dtype(np.dtype(WIRE[datatype]))[0]
    for name, op in (("spike", sc.spike), ("grad", sc.grad), ("fun", sc.fun)):
        want = op(x, alpha=2.0, dtype=dt)
        assert out[name].dtype == want.dtype and np.array_equal(out[name], want, equal_nan=True), name
    ref = pq_grad(x.astype(np.float64), 2.0)
    np.testing.assert_allclose(out["grad"].astype(np.float64), ref, rtol=1e-2 if datatype in ("FP16", "BF16") else 1e-6, atol=1e-2)


async def test_v2_equals_v1_bit_for_bit(client):
    rng = np.random.default_rng(1)
    x = rng.normal(size=1000).astype(np.float32)
    ct = rng.normal(size=1000).astype(np.float32)
    r = await infer(client, [tensor("x", x, binary=True), tensor("cotangent", ct, binary=True)], model="sigmoid",
                    parameters={"alpha": 3.0}, outputs=[{"name": n, "parameters": {"binary_data": True}}
                                                        for n in ("spike", "grad", "vjp")])
    out = outputs(r)
    for name, job in (("spike", {"x": x.tolist()}), ("grad", {"x": x.tolist(), "alpha": 3.0}),
                      ("vjp", {"x": x.tolist(), "alpha": 3.0, "cotangent": ct.tolist()})):
        endpoint = "grad" if name == "vjp" else name
        v1 = await client.post(f"/v1/{endpoint}", json={**job, "surrogate": "sigmoid"}, headers={"accept": "application/x-npy"})
        want = np.load(__import__("io").BytesIO(v1.content))
        assert np.array_equal(out[name], want), name


async def test_alpha_sweep_by_broadcasting_and_parameters_as_inputs(client):
    x = np.linspace(-2, 2, 9)
    alpha = np.array([[0.5], [1.0], [2.0]])
    r = await infer(client, [tensor("x", x), tensor("alpha", alpha)], outputs=[{"name": "grad"}])
    (o,) = r.json()["outputs"]
    assert o["shape"] == [3, 9]
    np.testing.assert_allclose(np.reshape(o["data"], (3, 9)), pq_grad(x, alpha), rtol=1e-6)


async def test_vjp_and_selected_outputs(client):
    x, ct = np.array(SEED), np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    r = await infer(client, [tensor("x", x), tensor("cotangent", ct)], outputs=[{"name": "vjp"}])
    assert [o["name"] for o in r.json()["outputs"]] == ["vjp"]
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], ct * pq_grad(x, 1.0))
    r = await infer(client, [tensor("x", x), tensor("cotangent", ct)])  # absent: everything, vjp included
    assert [o["name"] for o in r.json()["outputs"]] == ["spike", "grad", "fun", "vjp"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_requests_and_answers(client, encoding):
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    decompress = gzip.decompress if encoding == "gzip" else zlib.decompress
    x = np.linspace(-2, 2, 101, dtype=np.float32)
    content, headers = body({"inputs": [tensor("x", x, binary=True)[0]], "outputs": [
        {"name": "grad", "parameters": {"binary_data": True}}]}, [x.tobytes()])
    async with client.stream("POST", INFER, content=compress(content),
                             headers={**headers, "content-encoding": encoding, "accept-encoding": encoding}) as r:
        wire = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.status_code == 200 and r.headers["content-encoding"] == encoding
    raw = decompress(wire)  # what travelled was compressed
    n = int(r.headers["inference-header-content-length"])
    head = orjson.loads(raw[:n])
    got = np.frombuffer(raw[n:], "<f4")
    assert head["outputs"][0]["parameters"]["binary_data_size"] == got.nbytes
    np.testing.assert_allclose(got, pq_grad(x.astype(np.float64), 1.0), rtol=1e-6)


async def test_a_compression_bomb_is_refused_after_at_most_the_limit():
    app = create_app(make_settings(max_body_bytes=100_000))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")
            assert len(bomb) < 100_000
            r = await c.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
            assert r.status_code == 413 and "inflated" in r.json()["error"]
            ok = gzip.compress(orjson.dumps({"inputs": [tensor("x", SEED)[0]]}))
            assert (await c.post(INFER, content=ok, headers={"content-encoding": "gzip"})).status_code == 200


# -- hostile input: each a 4xx naming the input, and the server healthy after ----------------------

def _binary(x=SEED):
    return tensor("x", np.asarray(x, np.float32), binary=True)


HOSTILE = [
    # (description, request, blobs, headers override, expected status, words in the message)
    ("size differs from bytes", {"inputs": [{**_binary()[0], "parameters": {"binary_data_size": 12}}]}, [_binary()[1]],
     None, 400, ["'x'", "binary_data_size 12"]),
    ("bytes missing", {"inputs": [_binary()[0]]}, [b"\0" * 8], None, 400, ["'x'", "past the end"]),
    ("bytes left over", {"inputs": [_binary()[0]]}, [_binary()[1] + b"\0\0\0\0"], None, 400, ["4 bytes"]),
    ("negative shape", {"inputs": [{"name": "x", "shape": [-1, 5], "datatype": "FP32", "data": SEED}]}, [], None, 400,
     ["'x'", "negative"]),
    ("huge shape", {"inputs": [{"name": "x", "shape": [2**40, 2**40], "datatype": "FP32", "data": SEED}]}, [], None, 400,
     ["'x'", "over the limit"]),
    ("boolean shape", {"inputs": [{"name": "x", "shape": [True], "datatype": "FP32", "data": [1.0]}]}, [], None, 400,
     ["'x'", "shape"]),
    ("shape vs data", {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": SEED}]}, [], None, 400,
     ["'x'", "5 values", "needs 4"]),
    ("duplicate input", {"inputs": [tensor("x", SEED)[0], tensor("x", SEED)[0]]}, [], None, 400, ["'x'", "more than once"]),
    ("unknown input", {"inputs": [tensor("x", SEED)[0], tensor("alpah", [1.0])[0]]}, [], None, 400,
     ["'alpah'", "did you mean 'alpha'"]),
    ("string in data", {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, "a"]}]}, [], None, 400,
     ["x[1]", "string"]),
    ("boolean in data", {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, True]}]}, [], None, 400,
     ["x[1]", "boolean"]),
    ("null in data", {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [None, 1.0]}]}, [], None, 400,
     ["x[0]", "null"]),
    ("BF16 as JSON", {"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1.0]}]}, [], None, 400,
     ["'x'", "BF16", "binary"]),
    ("INT32", {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}]}, [], None, 400,
     ["'x'", "INT32"]),
    ("BYTES", {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, [], None, 400, ["'x'", "BYTES"]),
    ("no x", {"inputs": [tensor("alpha", [1.0])[0]]}, [], None, 400, ["'x'", "required"]),
    ("bad alpha", {"inputs": [tensor("x", SEED)[0]], "parameters": {"alpha": -1.0}}, [], None, 400,
     ["'alpha'", "> 0"]),
    ("unknown parameter", {"inputs": [tensor("x", SEED)[0]], "parameters": {"alpah": 1.0}}, [], None, 400,
     ["'alpah'", "did you mean 'alpha'"]),
    ("vjp without cotangent", {"inputs": [tensor("x", SEED)[0]], "outputs": [{"name": "vjp"}]}, [], None, 400,
     ["'vjp'", "cotangent"]),
    ("unknown output", {"inputs": [tensor("x", SEED)[0]], "outputs": [{"name": "grads"}]}, [], None, 400,
     ["'grads'", "did you mean 'grad'"]),
    ("header past the body", {"inputs": [tensor("x", SEED)[0]]}, [], {"inference-header-content-length": "99999"}, 400,
     ["Inference-Header-Content-Length", "past the end"]),
    ("not JSON", None, [b"{nope"], {"content-type": "application/json"}, 400, ["invalid JSON"]),
]


@pytest.mark.parametrize(("what", "req", "blobs", "headers", "status", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_inputs_are_4xx_naming_the_input(client, what, req, blobs, headers, status, words):
    if req is None:
        content, hdrs = b"".join(blobs), {}
    else:
        content, hdrs = body(req, blobs)
    r = await client.post(INFER, content=content, headers={**hdrs, **(headers or {})})
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert set(r.json()) == {"error"} and isinstance(msg, str)
    for w in words:
        assert w in msg, (w, msg)
    ok = await infer(client, [tensor("x", SEED)], outputs=[{"name": "grad"}])
    assert ok.json()["outputs"][0]["data"] == [0.0, 0.5, 1.0, 0.5, 0.0]


async def test_non_finite_results_need_binary_outputs(client):
    x = np.array([np.nan, 0.0], np.float32)
    r = await infer(client, [tensor("x", x, binary=True)], outputs=[{"name": "grad"}])
    assert r.status_code == 400 and "NaN" in r.json()["error"] and "binary" in r.json()["error"]
    r = await infer(client, [tensor("x", x, binary=True)], outputs=[{"name": "grad", "parameters": {"binary_data": True}}])
    got = outputs(r)["grad"]
    assert np.isnan(got[0]) and got[1] == 1.0


async def test_auth_answers_401_in_the_oip_shape():
    token = "s3cret-token-0123456789"
    app = create_app(make_settings(api_token=token))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await infer(c, [tensor("x", SEED)])
            assert r.status_code == 401 and set(r.json()) == {"error"} and r.headers["www-authenticate"] == "Bearer"
            assert (await c.get("/v2/health/live")).status_code == 200  # probes stay open
            content, headers = body({"inputs": [tensor("x", SEED)[0]]})
            r = await c.post(INFER, content=content, headers={**headers, "authorization": f"Bearer {token}"})
            assert r.status_code == 200


async def test_metrics_label_the_protocol(client):
    await infer(client, [tensor("x", SEED)])
    text = (await client.get("/metrics")).text
    assert 'surrogate_requests_total{endpoint="/v2/models/{model}/infer",protocol="v2",status="200"} 1.0' in text


@pytest.mark.parametrize("n", [16, 50_000])  # below and above the size where simdjson reads the body
async def test_small_and_large_json_requests_read_the_same(client, n):
    x = np.linspace(-2, 2, n)
    big = 2**54 + 2**30 + 1  # read as the nearest float64, then cast, on both paths
    data = [big] + x[1:].tolist()
    r = await infer(client, [({"name": "x", "shape": [n], "datatype": "FP64", "data": data}, b"")],
                    outputs=[{"name": "grad", "parameters": {"binary_data": True}}])
    got = outputs(r)["grad"]
    np.testing.assert_array_equal(got, sc.grad(np.array([float(big), *x[1:]]), dtype="float64"))
    ragged = [[0.5] * (n // 2), [0.5] * (n - n // 2 - 1) + [[0.5]]]
    r = await infer(client, [({"name": "x", "shape": [n], "datatype": "FP32", "data": ragged}, b"")])
    assert r.status_code == 400 and "ragged" in r.json()["error"]
    bad = [0.5] * (n - 1) + [True]
    r = await infer(client, [({"name": "x", "shape": [n], "datatype": "FP32", "data": bad}, b"")])
    assert r.status_code == 400 and f"x[{n - 1}]" in r.json()["error"] and "boolean" in r.json()["error"]


async def test_literals_in_parameters_do_not_hide_literals_in_data(client):
    """binary_data: true in an output's parameters, and a boolean inside the data: still refused."""
    outs = [{"name": "grad", "parameters": {"binary_data": False}}]
    ok = await infer(client, [tensor("x", SEED)], outputs=outs, parameters={"binary_data_output": False})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [0.0, 0.5, 1.0, 0.5, 0.0]
    t = {"name": "x", "shape": [3], "datatype": "FP32", "data": [0.5, False, 1.0], "parameters": {"note": True}}
    r = await infer(client, [(t, b"")], outputs=outs)
    assert r.status_code == 400 and "x[1]" in r.json()["error"] and "boolean" in r.json()["error"]


async def test_compressed_answers_stream_in_pieces_and_their_compressor_is_reserved():
    """A gzip answer is made while it is sent (chunked, no Content-Length, one compressed piece at a
    time, none larger than about a megabyte), and the compressor's memory is part of the reservation."""
    from service.protocols.v2.codec import COMPRESS_PIECE, COMPRESSOR_BYTES

    app = create_app(make_settings(max_elements=2_000_000, max_body_bytes=64 << 20, memory_budget=256 << 20))
    rt = app.state.runtime
    x = np.random.default_rng(3).uniform(-2, 2, 1_000_000).astype(np.float32)
    content, headers = body({"inputs": [tensor("x", x, binary=True)[0]], "outputs": [
        {"name": "grad", "parameters": {"binary_data": True}}]}, [x.tobytes()])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": INFER, "raw_path": INFER.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-length", str(len(content)).encode()), (b"accept-encoding", b"gzip"),
                         *[(k.encode(), v.encode()) for k, v in headers.items()]]}
    messages: list[dict] = []
    held: list[int] = []

    async def receive():
        return {"type": "http.request", "body": content, "more_body": False}

    async def send(message):
        held.append(rt.dataplane.budget.in_use)
        messages.append(message)

    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    start, pieces = messages[0], [m["body"] for m in messages[1:]]
    names = {k for k, _ in start["headers"]}
    assert start["status"] == 200 and b"content-length" not in names and (b"content-encoding", b"gzip") in start["headers"]
    assert len(pieces) > 2 and messages[-1].get("more_body") is False
    assert max(len(p) for p in pieces) <= COMPRESS_PIECE + COMPRESS_PIECE // 100 + 64
    raw = gzip.decompress(b"".join(pieces))
    n = int(dict(start["headers"])[b"inference-header-content-length"])
    np.testing.assert_allclose(np.frombuffer(raw[n:], "<f4"), pq_grad(x.astype(np.float64), 1.0), rtol=1e-6)
    # while it was sent, the reservation held the answer, one compressed piece and the compressor
    assert min(held) >= 4 * x.size + COMPRESSOR_BYTES
    assert rt.dataplane.budget.in_use == 0


async def test_a_small_compressed_answer_reserves_its_compressor(client):
    from service.protocols.v2.codec import COMPRESSOR_BYTES

    budget = client._transport.app.state.runtime.dataplane.budget
    x = np.linspace(-2, 2, 16, dtype=np.float32)
    req = {"inputs": [tensor("x", x)[0]], "outputs": [{"name": "spike"}]}
    peaks = []
    for headers in ({"accept-encoding": "gzip"}, {"accept-encoding": "identity"}):
        budget.peak = 0
        r = await client.post(INFER, json=req, headers=headers)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [float(v >= 0) for v in x]
        peaks.append(budget.peak)
    assert peaks[0] - peaks[1] >= COMPRESSOR_BYTES
