"""Every endpoint in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest

import surrogate_core as sc
from service.app import create_app

import reference as ref
from helpers import make_settings

pytestmark = pytest.mark.anyio

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]


async def post(client, path, body, **kw):
    return await client.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"}, **kw)


async def test_seed_example_on_every_endpoint(client):
    r = await post(client, "/v1/spike", {"x": SEED})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [5], "spike": [0, 0, 1, 1, 1]}
    r = await post(client, "/v1/grad", {"x": SEED, "alpha": 1.0})
    assert r.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]
    r = await post(client, "/v1/fun", {"x": SEED})
    assert r.json()["fun"] == [0.0, 0.125, 0.5, 0.875, 1.0]


async def test_spike_at_zero_and_negative_zero(client):
    r = await client.post("/v1/spike", content=b'{"x": [0, -0.0, 0.0, -1e-30]}', headers={"content-type": "application/json"})
    assert r.json()["spike"] == [1.0, 1.0, 1.0, 0.0]


async def test_alpha_sweep_in_one_call(client):
    x = np.linspace(-3, 3, 1000).tolist()
    r = await post(client, "/v1/grad", {"x": x, "alpha": [[0.5], [1], [2], [4]]})
    body = r.json()
    assert body["shape"] == [4, 1000]
    got = np.array(body["grad"], np.float32)
    xs = np.array(x, np.float32)
    for row, a in zip(got, [0.5, 1, 2, 4]):
        np.testing.assert_allclose(row, ref.pq_grad(xs, np.float32(a)), rtol=2e-6, atol=1e-6)


async def test_json_floats_are_exact_values_of_the_dtype(client):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.2, 1.2, 500)
    for dtype in ["float32", "float64", "float16", "bfloat16"]:
        r = await post(client, "/v1/grad", {"x": x.tolist(), "alpha": 1.3, "dtype": dtype})
        assert r.status_code == 200, r.text
        dt = sc.DTYPES[dtype]
        got = np.array(r.json()["grad"], np.float64).astype(dt)
        want = sc.grad(x.astype(dt), alpha=1.3, dtype=dtype)
        assert r.json()["dtype"] == dtype
        # parsing the JSON numbers back gives exactly the computed values, bit for bit
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))


async def test_cotangent_gives_the_vjp(client):
    r = await post(client, "/v1/grad", {"x": [[0.25, -0.5]], "cotangent": [[2.0], [-3.0]], "alpha": 1.0})
    assert r.json()["shape"] == [2, 2]
    assert r.json()["grad"] == [[1.5, 1.0], [-2.25, -1.5]]


async def test_list_of_jobs_is_answered_in_order(client):
    jobs = [{"x": [0.5], "alpha": 1.0}, {"x": 0.25, "dtype": "float64"}, {"x": [[0.0, 2.0]], "alpha": 0.5}, {"x": []}]
    r = await post(client, "/v1/grad", jobs)
    body = r.json()
    assert [b["grad"] for b in body] == [[0.5], 0.75, [[0.5, 0.0]], []]
    assert [b["shape"] for b in body] == [[1], [], [1, 2], [0]]
    assert [b["dtype"] for b in body] == ["float32", "float64", "float32", "float32"]


async def test_empty_array_is_valid(client):
    r = await post(client, "/v1/spike", {"x": []})
    assert r.status_code == 200 and r.json()["spike"] == [] and r.json()["shape"] == [0]


async def test_integers_are_accepted_as_numbers(client):
    r = await post(client, "/v1/grad", {"x": [0, 1, -1], "alpha": 2})
    assert r.json()["grad"] == [2.0, 0.0, 0.0]


BAD = [
    # (body, status, code, job, field, message fragment)
    ({"x": [[1, 2], [3]]}, 422, "invalid_type", 0, "x", "ragged"),
    ({"x": [1, "2"]}, 422, "invalid_type", 0, "x", "x[1]: expected a number, got a string"),
    ({"x": [1, None]}, 422, "invalid_type", 0, "x", "got null"),
    ({"x": [1.5, True]}, 422, "invalid_type", 0, "x", "got a boolean"),
    ({"x": [1, 2], "alpha": False}, 422, "invalid_type", 0, "alpha", "boolean"),
    ({"x": "1.0"}, 422, "invalid_type", 0, "x", "string"),
    ({"x": {"a": 1}}, 422, "invalid_type", 0, "x", "object"),
    ({"alpha": 1.0}, 422, "missing_field", 0, "x", "required"),
    ({"x": [1.0], "alpha": -1}, 422, "invalid_value", 0, "alpha", "> 0"),
    ({"x": [1.0], "alpha": 0}, 422, "invalid_value", 0, "alpha", "> 0"),
    ({"x": [1.0], "alpha": 1e39}, 422, "not_representable", 0, "alpha", "float32"),  # overflows float32
    ({"x": [1.0, 2.0], "alpha": [1.0, 2.0, 3.0]}, 422, "shape_mismatch", 0, "alpha", "broadcast"),
    ({"x": [1.0], "surrogate": "sigmoidd"}, 422, "unknown_surrogate", 0, "surrogate", "piecewise_quadratic"),
    ({"x": [1.0], "surrogate": 3}, 422, "invalid_type", 0, "surrogate", "string"),
    ({"x": [1.0], "alpah": 2.0}, 422, "unknown_field", 0, "alpah", "did you mean 'alpha'"),
    ({"x": [1.0], "dtype": "float8"}, 422, "unknown_dtype", 0, "dtype", "float32"),
    ({"x": [[[[[[[[[1.0]]]]]]]]]}, 422, "too_large", 0, "x", "rank"),
    ({"x": [0.5], "alpha": 300.0, "dtype": "float16"}, 422, "not_representable", 0, "alpha", "float16"),
    ({"x": [70000.0], "dtype": "float16"}, 422, "not_representable", 0, "x", "float16"),
    ({"x": [0.0], "alpha": 2.0, "cotangent": 60000.0, "dtype": "float16"}, 422, "not_representable", 0, "dtype", "overflow"),
    ([], 422, "empty_batch", None, None, "empty"),
    ([{"x": [1.0]}, 5], 422, "invalid_type", 1, None, "job 1"),
    ([{"x": [1.0]}, {"x": [1.0], "alpha": -2}], 422, "invalid_value", 1, "alpha", "job 1"),
    ([{"x": [0.0]}] * 17, 422, "too_large", None, None, "limit of 16"),
    ({"x": np.zeros(100_001).tolist()}, 422, "too_large", 0, "x", "100000"),
    ({"x": np.zeros(1000).tolist(), "alpha": np.ones((1000, 1)).tolist()}, 422, "too_large", 0, "x", "elements"),
    (3, 422, "invalid_type", None, None, "job object"),
    ({"x": [1e400]}, 422, "not_representable", 0, "x", "float64 range"),
]


@pytest.mark.parametrize(("body", "status", "code", "job", "field", "fragment"), BAD, ids=[str(i) for i in range(len(BAD))])
async def test_bad_input_is_a_clear_4xx(client, body, status, code, job, field, fragment):
    raw = body if isinstance(body, bytes) else orjson.dumps(body) if not (isinstance(body, dict) and body.get("x") == [1e400]) else b'{"x": [1e400]}'
    r = await client.post("/v1/grad", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["code"] == code
    assert err["job"] == job and err["field"] == field
    assert fragment in err["message"]
    # the server stays up and correct afterwards
    ok = await post(client, "/v1/grad", {"x": SEED})
    assert ok.json()["grad"] == [0.0, 0.5, 1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "code"),
    [
        (b'{"x": [1, 2,]}', "application/json", 400, "bad_request"),
        (b'{"x": [NaN]}', "application/json", 400, "bad_request"),
        (b"", "application/json", 400, "bad_request"),
        (b'{"x": [1]}', "text/plain", 415, "unsupported_media_type"),
        (b"x=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "bad_request"),
    ],
)
async def test_malformed_bodies(client, raw, ctype, status, code):
    r = await client.post("/v1/spike", content=raw, headers={"content-type": ctype})
    assert r.status_code == status and r.json()["error"]["code"] == code


async def test_cotangent_refused_outside_grad(client):
    r = await post(client, "/v1/spike", {"x": [1.0], "cotangent": 1.0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "cotangent"


async def test_body_over_the_limit_is_413(client):
    big = b'{"x": [' + b"0.0," * 600_000 + b'0.0]}'
    r = await client.post("/v1/grad", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    async def chunks():  # no Content-Length: refused while streaming
        for _ in range(100):
            yield b" " * 50_000

    r = await client.post("/v1/grad", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_surrogates_listing(client):
    r = await client.get("/v1/surrogates")
    body = r.json()
    assert body["default"] == "piecewise_quadratic"
    pq = next(s for s in body["surrogates"] if s["name"] == "piecewise_quadratic")
    assert pq["parameters"] == [
        {"name": "alpha", "type": "number", "default": 1.0, "constraint": "finite and > 0",
         "description": pq["parameters"][0]["description"]}
    ]
    assert "alpha**2" in pq["grad_formula"] and pq["has_fun"] is True
    assert (await client.get("/v1/surrogates/piecewise_quadratic")).json() == pq
    sq = next(s for s in body["surrogates"] if s["name"] == "squarewave_fourier_series")
    n = next(p for p in sq["parameters"] if p["name"] == "n")
    assert n["type"] == "integer" and n["default"] == 2 and type(n["default"]) is int
    r = await client.get("/v1/surrogates/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_surrogate"


async def test_info_reports_device_and_versions(client):
    await post(client, "/v1/spike", {"x": [1.0]})
    info = (await client.get("/v1/info")).json()
    assert info["device"]["platform"] == sc.device_info()["platform"]
    assert info["jax_version"] and info["version"] == "0.1.0"
    assert info["compilations"] >= 1 and info["variants"]["spike/*/float32"] >= 1
    assert info["limits"]["max_elements"] == 100_000


async def test_unknown_route_and_method_use_the_error_model(client):
    r = await client.get("/v3/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.get("/v1/grad")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    # under /v2 the same in the Open Inference Protocol's shape
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and r.json() == {"error": "no route /v2/nothing; see /docs or /openapi.json"}
    r = await client.get("/v2/models/sigmoid/infer")
    assert r.status_code == 405 and "allowed: POST" in r.json()["error"]


async def test_readiness_waits_for_warm_up():
    app = create_app(make_settings(warmup=True, warmup_max_elements=2048))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            first = await c.get("/readyz")
            seen = [first.status_code]
            if first.status_code == 503:
                assert first.headers["retry-after"] == "1"
                assert first.json() == {"status": "warming_up"}
            for _ in range(600):
                r = await c.get("/readyz")
                seen.append(r.status_code)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert seen[-1] == 200 and set(seen) <= {200, 503}
            info = (await c.get("/v1/info")).json()
            # warm-up compiled spike/grad/vjp/fun for the buckets 64, 1024, 1536 and 2048
            assert info["ready"] and info["compilations"] == 16


async def test_list_mixing_surrogates_is_answered_in_order(client):
    jobs = [
        {"x": [0.0], "surrogate": "sigmoid"},
        {"x": [0.0]},
        {"x": [0.0], "surrogate": "arctan", "alpha": 2.0},
        {"x": [0.5], "surrogate": "piecewise_leaky_relu", "c": 0.01, "w": 1.0},
        {"x": [0.0], "surrogate": "gaussian_grad"},
        {"x": [0.0], "surrogate": "sigmoid", "alpha": 1.0},
    ]
    r = await post(client, "/v1/grad", jobs)
    got = [b["grad"][0] for b in r.json()]
    assert [b["surrogate"] for b in r.json()] == [j.get("surrogate", "piecewise_quadratic") for j in jobs]
    # hand-computed: sigmoid alpha*s*(1-s) at 0 = alpha/4; PQ alpha; arctan alpha/2/(1+0) = 1;
    # piecewise_leaky_relu 1/(2w) inside |x| <= w; gaussian alpha/(sigma*sqrt(2 pi))
    assert got[:4] == [1.0, 1.0, 1.0, 0.5]
    assert got[4] == pytest.approx(0.5 / (0.5 * np.sqrt(2 * np.pi)), rel=1e-6)
    assert got[5] == 0.25


async def test_every_registered_surrogate_is_listed_and_served(client):
    listing = (await client.get("/v1/surrogates")).json()["surrogates"]
    assert len(listing) == 18 and {s["name"] for s in listing} == set(sc.names())
    for s in listing:
        assert s["parameters"] and all({"name", "default", "constraint", "description"} <= set(p) for p in s["parameters"])
        r = await post(client, "/v1/grad", {"x": [-0.5, 0.0, 0.5], "surrogate": s["name"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["grad"], sc.grad([-0.5, 0.0, 0.5], surrogate=s["name"]), rtol=1e-6)
        r = await post(client, "/v1/fun", {"x": [0.5], "surrogate": s["name"]})
        if s["has_fun"]:
            assert r.status_code == 200
        else:
            assert r.status_code == 422 and r.json()["error"]["code"] == "no_smooth_function"


async def test_parameters_of_another_surrogate_are_refused(client):
    r = await post(client, "/v1/grad", {"x": [0.5], "surrogate": "piecewise_leaky_relu", "alpha": 1.0})
    err = r.json()["error"]
    assert r.status_code == 422 and err["field"] == "alpha" and "c, w" in err["message"]
