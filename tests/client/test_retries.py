"""Retries, backoff, typed errors and headers, against scripted answers (httpx.MockTransport)."""

from __future__ import annotations

import io
from collections.abc import Callable
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest

import surrogate_client as scl

OK = {"surrogate": "piecewise_quadratic", "dtype": "float32", "shape": [2], "grad": [0.5, 1.0]}


def npy_answer(a: np.ndarray, dtype: str) -> httpx.Response:
    buf = io.BytesIO()
    np.save(buf, a)
    return httpx.Response(200, content=buf.getvalue(),
                          headers={"content-type": "application/x-npy", "x-surrogate-dtype": dtype,
                                   "x-surrogate-name": "piecewise_quadratic"})


def error(status: int, code: str, message: str, job=None, field=None, **headers) -> httpx.Response:
    body = {"error": {"status": status, "code": code, "message": message, "job": job, "field": field}}
    return httpx.Response(status, json=body, headers=headers)


class Script:
    """Answers requests from a list: a Response, or an exception to raise."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, Exception):
            raise a
        if callable(a):
            return a(request)
        return a


def make(script: Script, **kw) -> tuple[scl.SurrogateClient, list[float]]:
    kw.setdefault("backoff", 0.1)
    c = scl.SurrogateClient("http://svc", http_transport=httpx.MockTransport(script), **kw)
    sleeps: list[float] = []
    c._sleep = sleeps.append  # record the pauses instead of sleeping
    return c, sleeps


def test_503_with_retry_after_then_success():
    script = Script(error(503, "unavailable", "warming up", **{"Retry-After": "2"}), httpx.Response(200, json=OK))
    c, sleeps = make(script)
    with c:
        g = c.grad([0.5, 0.0])
    assert g.tolist() == [0.5, 1.0] and g.dtype == np.float32
    assert sleeps == [2.0] and len(script.requests) == 2
    assert script.requests[0].content == script.requests[1].content  # the same body, sent again


def test_retry_after_as_http_date_and_bounded():
    later = format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), usegmt=True)
    script = Script(error(503, "unavailable", "busy", **{"Retry-After": later}),
                    error(503, "unavailable", "busy", **{"Retry-After": "600"}), httpx.Response(200, json=OK))
    c, sleeps = make(script, max_backoff=3.0)
    c.grad([0.5, 0.0])
    assert sleeps == [3.0, 3.0]


def test_exponential_backoff_then_give_up_with_the_servers_message():
    script = Script(error(503, "unavailable", "overloaded, try later"))
    c, sleeps = make(script, retries=3, backoff=0.5)
    with pytest.raises(scl.ServiceUnavailable) as info:
        c.spike([1.0])
    assert sleeps == [0.5, 1.0, 2.0] and len(script.requests) == 4
    assert info.value.status == 503 and info.value.message == "overloaded, try later"
    assert isinstance(info.value, scl.ServerError)


def test_429_is_retried_too():
    script = Script(error(429, "rate_limited", "slow down", **{"Retry-After": "1"}), httpx.Response(200, json=OK))
    c, sleeps = make(script)
    assert c.grad([0.5, 0.0]).shape == (2,) and sleeps == [1.0]


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.RemoteProtocolError("closed"),
                                 httpx.ReadError("reset"), httpx.ConnectTimeout("slow")])
def test_connection_errors_then_success(exc):
    script = Script(exc, exc, httpx.Response(200, json=OK))
    c, sleeps = make(script, backoff=0.25)
    assert c.grad([0.5, 0.0]).tolist() == [0.5, 1.0]
    assert sleeps == [0.25, 0.5]


def test_connection_errors_give_up_after_n():
    script = Script(httpx.ConnectError("connection refused"))
    c, sleeps = make(script, retries=2)
    with pytest.raises(scl.TransportError, match="connection refused") as info:
        c.health()
    assert len(script.requests) == 3 and len(sleeps) == 2
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert not isinstance(info.value, scl.Timeout)


def test_read_timeout_is_not_retried():
    script = Script(httpx.ReadTimeout("too slow"))
    c, sleeps = make(script)
    with pytest.raises(scl.Timeout):
        c.grad([0.5])
    assert len(script.requests) == 1 and sleeps == []


def test_4xx_raises_the_servers_error_without_retrying():
    script = Script(error(422, "invalid_value", "job 0, field 'alpha': must be finite and > 0, got -1.0", 0, "alpha"))
    c, sleeps = make(script)
    with pytest.raises(scl.ValidationError) as info:
        c.grad([0.5], alpha=-1.0)
    err = info.value
    assert (err.status, err.code, err.job, err.field) == (422, "invalid_value", 0, "alpha")
    assert err.message == "job 0, field 'alpha': must be finite and > 0, got -1.0"
    assert str(err) == f"422 invalid_value: {err.message}"
    assert err.response.status_code == 422
    assert len(script.requests) == 1 and sleeps == []


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, scl.BadRequest), (401, scl.AuthenticationError), (403, scl.AuthenticationError), (404, scl.NotFound),
     (405, scl.ClientError), (413, scl.PayloadTooLarge), (415, scl.UnsupportedMediaType), (500, scl.ServerError)],
)
def test_status_to_error_class(status, cls):
    c, _ = make(Script(error(status, "some_code", "what went wrong")))
    with pytest.raises(cls) as info:
        c.grad([0.5], transport="json")
    assert type(info.value) is cls and info.value.code == "some_code" and info.value.message == "what went wrong"


def test_error_without_the_json_body():
    c, sleeps = make(Script(httpx.Response(502, text="<html>Bad Gateway</html>")))
    with pytest.raises(scl.ServerError) as info:
        c.info()
    assert info.value.code == "http_502" and "Bad Gateway" in info.value.message and sleeps == []


def test_token_user_agent_and_accept_headers():
    script = Script(httpx.Response(200, json=OK))
    c, _ = make(script, token="s3cret", headers={"X-Trace": "1"})
    c.grad([0.5, 0.0])
    h = script.requests[0].headers
    assert h["authorization"] == "Bearer s3cret" and h["x-trace"] == "1"
    assert h["user-agent"] == f"surrogate-client/{scl.__version__}"
    assert h["content-type"] == "application/json" and h["accept"] == "application/json"
    assert "s3cret" not in repr(c)


def test_binary_request_and_answer():
    script = Script(lambda req: npy_answer(np.full((4, 32), 0.25, np.float32), "float32"))
    c, _ = make(script)
    g = c.grad(np.zeros(32, np.float32), alpha=[[0.5], [1], [2], [4]])
    req = script.requests[0]
    assert req.headers["content-type"] == "application/x-npz" and req.headers["accept"] == "application/x-npy"
    assert req.url.params["dtype"] == "float32"
    assert g.shape == (4, 32) and g.dtype == np.float32


def test_auto_falls_back_to_json_on_415_and_remembers():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["content-type"] != "application/json":
            return error(415, "unsupported_media_type", "send application/json")
        return httpx.Response(200, json={**OK, "shape": [32], "grad": [1.0] * 32})

    script = Script(handler)
    c, _ = make(script)
    assert c.grad(np.zeros(32)).shape == (32,)
    assert c.grad(np.zeros(32)).shape == (32,)
    assert [r.headers["content-type"] for r in script.requests] == ["application/x-npy", "application/json",
                                                                   "application/json"]
    c2, _ = make(Script(handler), transport="npy")  # forced binary: the 415 is the caller's to see
    with pytest.raises(scl.UnsupportedMediaType):
        c2.grad(np.zeros(32))


def test_ready_and_wait_ready():
    script = Script(httpx.ConnectError("refused"), error(503, "unavailable", "warming up", **{"Retry-After": "1"}),
                    httpx.Response(200, json={"status": "ready"}))
    c, sleeps = make(script, retries=0)
    c.wait_ready(timeout=5, interval=0.01)
    assert len(script.requests) == 3 and sleeps == [0.01, 0.01]
    assert c.ready() is True
    c2, _ = make(Script(error(503, "unavailable", "warming up", **{"Retry-After": "1"})))
    assert c2.ready() is False
    with pytest.raises(scl.Timeout):
        c2.wait_ready(timeout=0, interval=0.01)


def test_bad_configuration():
    with pytest.raises(ValueError, match="transport"):
        scl.SurrogateClient(transport="grpc")
    with pytest.raises(ValueError, match="retries"):
        scl.SurrogateClient(retries=-1)


@pytest.mark.anyio
async def test_async_retries_and_errors():
    script = Script(httpx.ConnectError("refused"), error(503, "unavailable", "busy", **{"Retry-After": "0.5"}),
                    httpx.Response(200, json=OK), error(422, "shape_mismatch", "job 0, field 'alpha': ...", 0, "alpha"))
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async with scl.AsyncSurrogateClient("http://svc", http_transport=httpx.MockTransport(script), backoff=0.1,
                                        token="t") as c:
        c._sleep = fake_sleep
        assert (await c.grad([0.5, 0.0])).tolist() == [0.5, 1.0]
        assert sleeps == [0.1, 0.5]
        with pytest.raises(scl.ValidationError) as info:
            await c.grad([0.5, 0.0], alpha=[1.0, 2.0, 3.0])
        assert info.value.code == "shape_mismatch" and info.value.field == "alpha"
    assert script.requests[0].headers["authorization"] == "Bearer t"
