"""What FastAPI users do with the app, each one tested: middleware (CORS), extra routers, exception
handlers, ``TestClient``, and mounting the app inside a larger FastAPI application that runs its
lifespan (docs/embedding.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import orjson
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from service.app import create_app
from service.errors import ApiError

from helpers import make_settings

pytestmark = pytest.mark.anyio

SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
SPIKE = [0.0, 0.0, 1.0, 1.0, 1.0]  # H(x) = 1 where x >= 0
PQ_GRAD = [0.0, 0.5, 1.0, 0.5, 0.0]  # piecewise quadratic, alpha = 1: max(0, alpha - alpha^2 |x|)
JSON = {"content-type": "application/json"}
ORIGIN = "https://ui.example.org"


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` with its lifespan running, and an in-process client of it."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            yield c


async def post(client: httpx.AsyncClient, path: str, body: object, **headers: str) -> httpx.Response:
    return await client.post(path, content=orjson.dumps(body), headers={**JSON, **headers})


def slow_engine(app: FastAPI, seconds: float) -> None:
    """Every device call of ``app`` takes ``seconds`` longer (in the worker thread that runs it)."""
    engine = app.state.runtime.engine
    real = engine.run

    def run(jobs):
        time.sleep(seconds)
        return real(jobs)

    engine.run = run


# -- middleware ------------------------------------------------------------------------------------


def cors_app() -> FastAPI:
    app = create_app(make_settings())
    app.add_middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["GET", "POST"],
                       allow_headers=["Content-Type", "Authorization"])
    return app


async def test_cors_preflight_of_a_compute_route_is_answered_by_the_middleware():
    async with serving(cors_app()) as c:
        r = await c.options("/v1/spike", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        })
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert {m.strip() for m in r.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "authorization"} <= allowed
        # the rules are the middleware's: another origin, or a method not allowed, is refused
        r = await c.options("/v1/spike", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await c.options("/v1/spike", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400
        # without the middleware, OPTIONS is no method of the route: 405 in the v1 shape
        async with serving(create_app(make_settings())) as plain:
            r = await plain.options("/v1/spike", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_cors_headers_on_cross_origin_compute_answers_and_errors():
    async with serving(cors_app()) as c:
        r = await post(c, "/v1/spike", {"x": SEED}, Origin=ORIGIN)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in r.headers["vary"].lower()
        assert r.json() == {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [5], "spike": SPIKE}
        r = await post(c, "/v1/grad", {"x": SEED, "alpha": 1.0}, Origin=ORIGIN)
        assert r.json()["grad"] == PQ_GRAD and r.headers["access-control-allow-origin"] == ORIGIN
        # a browser reads an error only with the header too (raw compute route, then a path operation)
        r = await post(c, "/v1/spike", {"x": "abc"}, Origin=ORIGIN)
        assert r.status_code == 422 and r.headers["access-control-allow-origin"] == ORIGIN
        assert r.json()["error"]["field"] == "x"
        r = await c.get("/v2/models/sigmoid", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        # a same-origin request (no Origin) gets no CORS header
        r = await post(c, "/v1/spike", {"x": SEED})
        assert r.json()["spike"] == SPIKE and "access-control-allow-origin" not in r.headers


# -- routers ---------------------------------------------------------------------------------------


def app_with_router() -> FastAPI:
    app = create_app(make_settings())
    router = APIRouter(prefix="/extra", tags=["extra"])

    @router.get("/double/{n}", summary="Twice n")
    def double(n: int) -> dict[str, int]:
        return {"n": n, "double": 2 * n}

    app.include_router(router)
    return app


async def test_an_included_router_answers_and_is_in_the_contract():
    app = app_with_router()
    async with serving(app) as c:
        r = await c.get("/extra/double/21")
        assert r.status_code == 200 and r.json() == {"n": 21, "double": 42}
        # the service's own routes still answer
        assert (await post(c, "/v1/spike", {"x": SEED})).json()["spike"] == SPIKE
        assert (await c.get("/readyz")).json() == {"status": "ready"}
        served = (await c.get("/openapi.json")).json()
    for doc in (served, app.openapi()):
        paths = doc["paths"]
        assert paths["/extra/double/{n}"]["get"]["summary"] == "Twice n"
        assert paths["/extra/double/{n}"]["get"]["tags"] == ["extra"]
        for own in ("/v1/spike", "/v1/grad", "/v1/fun", "/v2/models/{model}/infer", "/readyz", "/v1/surrogates"):
            assert own in paths, own
        assert "post" in paths["/v1/spike"] and "bearerAuth" in doc["components"]["securitySchemes"]


# -- exception handlers ----------------------------------------------------------------------------


class OutOfTea(Exception):
    def __init__(self, cups: int) -> None:
        super().__init__(cups)
        self.cups = cups


def app_with_handlers() -> FastAPI:
    app = create_app(make_settings())
    router = APIRouter()

    @router.get("/tea/{cups}")
    def tea(cups: int) -> dict[str, int]:
        raise OutOfTea(cups)

    @router.get("/extra/limited")
    def limited() -> dict[str, str]:
        raise ApiError(429, "slow down", code="rate_limited", headers={"Retry-After": "7"})

    @router.get("/v2/extra/echo")
    def echo(n: int) -> dict[str, int]:
        return {"n": n}

    app.include_router(router)

    async def out_of_tea(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OutOfTea)
        return JSONResponse({"teapot": True, "cups": exc.cups}, status_code=418)

    app.add_exception_handler(OutOfTea, out_of_tea)
    return app


async def test_a_user_exception_handler_answers_for_its_exception():
    async with serving(app_with_handlers()) as c:
        r = await c.get("/tea/3")
        assert r.status_code == 418 and r.json() == {"teapot": True, "cups": 3}
        # the service's error renderers still serve a user's route: ApiError and validation errors
        # in the shape of the protocol the path belongs to
        r = await c.get("/extra/limited")
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json() == {"error": {"status": 429, "code": "rate_limited", "message": "slow down",
                                      "job": None, "field": None}}
        r = await c.get("/tea/many")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_value"
        assert "cups" in r.json()["error"]["message"]
        r = await c.get("/v2/extra/echo")
        assert r.status_code == 400 and list(r.json()) == ["error"] and "n" in r.json()["error"]
        assert (await c.get("/v2/extra/echo", params={"n": 5})).json() == {"n": 5}


async def test_the_service_errors_keep_their_protocol_shapes_beside_user_handlers():
    async with serving(app_with_handlers()) as c:
        r = await post(c, "/v1/grad", {"x": [0.5], "alpha": "wide"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert set(err) == {"status", "code", "message", "job", "field"}
        assert (err["status"], err["job"], err["field"]) == (422, 0, "alpha")
        r = await post(c, "/v1/spike", [{"x": SEED}, {"x": [1.0], "surrogate": "nope"}])
        assert r.status_code == 422 and r.json()["error"]["job"] == 1
        assert r.json()["error"]["code"] == "unknown_surrogate"
        r = await c.get("/v1/surrogates/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_surrogate"
        infer = {"inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": SEED}]}
        r = await post(c, "/v2/models/nope/infer", infer)
        assert r.status_code == 404 and list(r.json()) == ["error"] and "nope" in r.json()["error"]
        r = await c.get("/no/such/path")
        assert r.status_code == 404
        assert r.json() == {"error": {"status": 404, "code": "not_found",
                                      "message": "no route /no/such/path; see /docs or /openapi.json",
                                      "job": None, "field": None}}
        r = await c.get("/v2/no/such/path")
        assert r.status_code == 404 and r.json() == {"error": "no route /v2/no/such/path; see /docs or /openapi.json"}
        # and the compute routes still compute
        r = await post(c, "/v2/models/piecewise_quadratic/infer", {**infer, "outputs": [{"name": "spike"}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == SPIKE


# -- TestClient ------------------------------------------------------------------------------------


# Starlette 1.x's TestClient prefers the ``httpx2`` package and warns, when it is imported, that it
# falls back to ``httpx`` (StarletteDeprecationWarning). The project does not depend on httpx2, and
# warnings are errors in this suite: this one warning is filtered here (and fastapi.testclient is
# imported inside the test, so that the filter is in force when it warns).
@pytest.mark.filterwarnings(
    "ignore:Using `httpx` with `starlette.testclient` is deprecated:starlette.exceptions.StarletteDeprecationWarning"
)
def test_testclient_as_a_context_manager_runs_the_lifespan():
    from fastapi.testclient import TestClient

    app = create_app(make_settings())
    # without `with`, the client runs no lifespan: the app never becomes ready
    r = TestClient(app).get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "warming_up"}
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready"}
        r = client.post("/v1/spike", json={"x": SEED})
        assert r.status_code == 200 and r.json()["spike"] == SPIKE
        r = client.post("/v1/grad", json={"x": SEED, "alpha": 1.0})
        assert r.json()["grad"] == PQ_GRAD
        r = client.post("/v1/grad", json={"x": SEED, "alpha": -1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "alpha"


# -- mounted in a larger application ---------------------------------------------------------------


def mounted(**settings: object) -> tuple[FastAPI, FastAPI]:
    """(outer, inner): the service mounted at /surrogate, its lifespan run by the outer app's."""
    inner = create_app(make_settings(**settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner.router.lifespan_context(inner):
            yield

    outer = FastAPI(lifespan=lifespan)

    @outer.get("/")
    def home() -> dict[str, str]:
        return {"app": "outer"}

    outer.mount("/surrogate", inner)
    return outer, inner


async def test_mounted_app_is_served_under_its_prefix_once_the_outer_lifespan_runs():
    outer, _ = mounted()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t", timeout=60) as c:
        # Starlette never runs a mounted app's lifespan itself: before the outer one runs, not ready
        r = await c.get("/surrogate/readyz")
        assert r.status_code == 503 and r.json() == {"status": "warming_up"}
        async with outer.router.lifespan_context(outer):
            r = await c.get("/surrogate/readyz")
            assert r.status_code == 200 and r.json() == {"status": "ready"}
            assert (await c.get("/")).json() == {"app": "outer"}
            r = await post(c, "/surrogate/v1/spike", {"x": SEED})
            assert r.status_code == 200 and r.json()["spike"] == SPIKE
            r = await post(c, "/surrogate/v1/grad", {"x": SEED, "alpha": 1.0})
            assert r.json()["grad"] == PQ_GRAD
            infer = {"inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": SEED}],
                     "outputs": [{"name": "grad"}], "parameters": {"alpha": 1.0}}
            r = await post(c, "/surrogate/v2/models/piecewise_quadratic/infer", infer)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == PQ_GRAD
            # errors name the path inside the app, in the protocol's shape
            r = await c.get("/surrogate/nothing")
            assert r.status_code == 404
            assert r.json()["error"]["message"] == "no route /nothing; see /docs or /openapi.json"
            r = await c.get("/surrogate/v2/nothing")
            assert r.json() == {"error": "no route /v2/nothing; see /docs or /openapi.json"}
            r = await c.get("/surrogate/v1/grad")
            assert r.status_code == 405 and r.headers["allow"] == "POST"
            # the contract and the Swagger UI, with the prefix as the server
            r = await c.get("/surrogate/openapi.json")
            assert r.status_code == 200
            doc = r.json()
            assert doc["servers"] == [{"url": "/surrogate"}]
            assert {"/v1/spike", "/v2/models/{model}/infer", "/readyz"} <= set(doc["paths"])
            r = await c.get("/surrogate/docs")
            assert r.status_code == 200
            assert "'/surrogate/openapi.json'" in r.text and "/surrogate/docs/assets/swagger-ui-bundle.js" in r.text
            # metrics: labelled by the route template, not by the prefixed path
            text = (await c.get("/surrogate/metrics")).text
            assert 'surrogate_requests_total{endpoint="/v1/spike",protocol="v1",status="200"} 1.0' in text
            assert 'surrogate_requests_total{endpoint="/readyz",protocol="v1",status="503"} 1.0' in text
            assert "/surrogate/v1" not in text
            # a path outside the prefix is the outer app's: its own 404, not the service's
            assert (await c.get("/nothing")).json() == {"detail": "Not Found"}


async def test_mounted_app_drains_in_flight_requests_when_the_outer_lifespan_ends():
    outer, inner = mounted(offload_elements=0, batch_max_delay=0)  # every batch in a worker thread
    rt = inner.state.runtime
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t", timeout=60) as c:
        async with outer.router.lifespan_context(outer):
            assert (await post(c, "/surrogate/v1/grad", {"x": SEED, "alpha": 1.0})).json()["grad"] == PQ_GRAD
            slow_engine(inner, 0.5)
            in_flight = asyncio.create_task(post(c, "/surrogate/v1/grad", {"x": SEED, "alpha": 1.0}))
            with anyio.fail_after(30):
                while rt.batcher.depth == 0:
                    await asyncio.sleep(0.005)
            assert not in_flight.done()
        # leaving the lifespan waited for the batch in flight (without the drain, depth would be 1)
        assert rt.batcher.depth == 0 and rt.batcher.stats.requests >= 2
        r = await asyncio.wait_for(in_flight, 30)
        assert r.status_code == 200 and r.json()["grad"] == PQ_GRAD
