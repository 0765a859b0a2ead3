"""Access and abuse limits, in process: bearer tokens compared whole, tokens read from the
environment or a mounted secret file without their surrounding whitespace, the cost limit on every
computing op (the vjp included) and JSON answers reserved at their JSON size in the memory budget.

Values are checked against NumPy transcriptions of the formulas, not the core."""

from __future__ import annotations

import io
import math

import numpy as np
import orjson
import pytest
from helpers import App as InProcessApp
from helpers import npz

from service.errors import ApiError
from service.server.security import check_token, token_digests
from service.server.settings import Settings, load_settings

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}
TOKEN = "s3cret-token-0123456789-abcdefXYZ"  # 33 characters
SEED = [-2.0, -0.5, 0.0, 0.5, 2.0]
V2_BODY = {"inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": SEED}], "outputs": [{"name": "grad"}]}


def pq_grad(x, alpha=1.0):
    x = np.asarray(x, np.float64)
    return np.where(np.abs(x) <= 1.0 / alpha, alpha - alpha * alpha * np.abs(x), 0.0)


def fourier_grad(x, n, t_period=8.0):
    """g'(x) = 4/T * sum_{i=1..n} cos((2i - 1) * 2 pi/T * x)."""
    x = np.asarray(x, np.float64)
    return 4.0 / t_period * sum(np.cos((2 * i - 1) * 2 * math.pi / t_period * x) for i in range(1, n + 1))


def npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


class App(InProcessApp):
    async def status_with(self, token: str | None) -> dict[str, int]:
        """The status of a compute (v1 and v2), a metadata and the metrics request with ``token``."""
        h = {} if token is None else {"authorization": f"Bearer {token}"}
        c = self.client
        r = await c.post("/v1/grad", content=orjson.dumps({"x": SEED}), headers={**JSON, **h})
        if r.status_code == 200:
            assert r.json()["grad"] == pq_grad(SEED).tolist()
        else:
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        return {
            "v1": r.status_code,
            "v2": (await c.post("/v2/models/piecewise_quadratic/infer", json=V2_BODY, headers=h)).status_code,
            "info": (await c.get("/v1/info", headers=h)).status_code,
            "metrics": (await c.get("/metrics", headers=h)).status_code,
        }


ALL_OK = {"v1": 200, "v2": 200, "info": 200, "metrics": 200}
ALL_401 = {"v1": 401, "v2": 401, "info": 401, "metrics": 401}


# -- tokens are compared whole -----------------------------------------------------------------

NEAR_MISSES = [
    TOKEN[:16],  # the first 16 characters alone
    TOKEN[:16] + "x" * (len(TOKEN) - 16),  # the first 16 right, the rest wrong
    TOKEN[:-1],  # one character short
    TOKEN[:-1] + "Q",  # the last character wrong
    TOKEN + "x",  # one character more
    TOKEN + TOKEN,
    TOKEN.upper(),  # tokens are case-sensitive
    "x" + TOKEN[1:],  # the first character wrong
]


async def test_a_token_is_accepted_only_whole():
    async with App(api_token=TOKEN) as a:
        assert await a.status_with(TOKEN) == ALL_OK
        assert await a.status_with(None) == ALL_401
        for wrong in NEAR_MISSES:
            assert await a.status_with(wrong) == ALL_401, wrong
        r = await a.client.get("/v1/info", headers={"authorization": f"bearer {TOKEN}"})  # the scheme: any case
        assert r.status_code == 200
        r = await a.client.get("/v1/info", headers={"authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401


async def test_tokens_of_a_file_that_share_a_long_prefix_are_told_apart(tmp_path):
    shared = "team-a-operator-token-"  # 22 characters in common
    f = tmp_path / "tokens"
    f.write_text(f"{shared}0001\n{shared}0002\n")
    async with App(api_token_file=f) as a:
        for tok, want in [(f"{shared}0001", ALL_OK), (f"{shared}0002", ALL_OK), (f"{shared}0003", ALL_401),
                          (shared, ALL_401), (f"{shared}00010", ALL_401)]:
            assert await a.status_with(tok) == want, tok


def test_check_token_compares_whole_tokens():
    digests = token_digests([TOKEN])
    check_token(digests, f"Bearer {TOKEN}")
    for wrong in NEAR_MISSES:
        with pytest.raises(ApiError) as e:
            check_token(digests, f"Bearer {wrong}")
        assert e.value.status == 401, wrong


# -- tokens from the environment and from files, whitespace stripped ----------------------------

@pytest.mark.parametrize("raw", [f"{TOKEN}\n", f"  {TOKEN}  ", f"\t{TOKEN}\r\n", f"\n{TOKEN}\n\n"],
                         ids=["newline", "spaces", "tab-crlf", "blank-lines"])
async def test_a_token_given_with_whitespace_is_accepted_bare(monkeypatch, raw):
    monkeypatch.delenv("SURROGATE_API_TOKEN_FILE", raising=False)
    monkeypatch.setenv("SURROGATE_API_TOKEN", raw)
    s = load_settings(warmup=False)
    assert s.tokens() == [TOKEN]
    assert Settings(api_token=raw, warmup=False).tokens() == [TOKEN]
    async with App(s) as a:
        assert await a.status_with(TOKEN) == ALL_OK
        assert await a.status_with(TOKEN[:-1]) == ALL_401


@pytest.mark.parametrize("content", [
    f"{TOKEN}\n", f"  {TOKEN}  \n", f"{TOKEN}\r\n", f"# the operators\n\n\t{TOKEN}\t\n\n",
], ids=["newline", "spaces", "crlf", "comment-tab"])
async def test_a_token_file_with_whitespace_is_accepted_bare(monkeypatch, tmp_path, content):
    f = tmp_path / "token"
    f.write_bytes(content.encode())
    monkeypatch.delenv("SURROGATE_API_TOKEN", raising=False)
    monkeypatch.setenv("SURROGATE_API_TOKEN_FILE", str(f))
    s = load_settings(warmup=False)
    assert s.tokens() == [TOKEN]
    async with App(s) as a:
        assert await a.status_with(TOKEN) == ALL_OK
        assert await a.status_with(TOKEN + "x") == ALL_401


async def test_env_token_and_token_file_together(monkeypatch, tmp_path):
    other = "second-operator-token-0000"
    f = tmp_path / "token"
    f.write_text(f"  {other}\n")
    monkeypatch.setenv("SURROGATE_API_TOKEN", f"{TOKEN}\n")
    monkeypatch.setenv("SURROGATE_API_TOKEN_FILE", str(f))
    s = load_settings(warmup=False)
    assert sorted(s.tokens()) == sorted([TOKEN, other])
    async with App(s) as a:
        assert await a.status_with(TOKEN) == ALL_OK
        assert await a.status_with(other) == ALL_OK
        assert await a.status_with(other[:16]) == ALL_401


# -- the cost limit applies to every computing op, the vjp included -----------------------------

FOURIER = "squarewave_fourier_series"
X20 = np.linspace(-3.0, 3.0, 20)
CT20 = np.linspace(0.5, 2.0, 20)


def v1_job(n, cotangent=True, x=X20):
    job = {"x": x.tolist(), "surrogate": FOURIER, "n": n, "dtype": "float64"}
    if cotangent:
        job["cotangent"] = CT20[: len(x)].tolist()
    return job


def v2_req(n, outputs, cotangent=True):
    inputs = [{"name": "x", "shape": [20], "datatype": "FP64", "data": X20.tolist()}]
    if cotangent:
        inputs.append({"name": "cotangent", "shape": [20], "datatype": "FP64", "data": CT20.tolist()})
    return {"inputs": inputs, "parameters": {"n": n}, "outputs": [{"name": o} for o in outputs]}


async def test_the_cost_limit_applies_to_the_vjp_on_v1_and_v2():
    """20 elements at n cosines each cost 20 n: over a limit of 1000 past n = 50."""
    async with App(max_cost=1000) as a:
        c = a.client
        # within the limit (the boundary included): computed, and right
        for n in (2, 50):
            r = await c.post("/v1/grad", json=v1_job(n))
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["grad"], CT20 * fourier_grad(X20, n), rtol=1e-9, atol=1e-9)
        r = await c.post(f"/v2/models/{FOURIER}/infer", json=v2_req(2, ["vjp"]))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], CT20 * fourier_grad(X20, 2), rtol=1e-9, atol=1e-9)
        # over it: /v1/grad with a cotangent (JSON and .npz), without one, and a list whose sum is over
        for what, r in [
            ("vjp", await c.post("/v1/grad", json=v1_job(51))),
            ("vjp .npz", await c.post(f"/v1/grad?surrogate={FOURIER}&n=100&dtype=float64",
                                      content=npz(x=X20, cotangent=CT20),
                                      headers={"content-type": "application/x-npz"})),
            ("grad", await c.post("/v1/grad", json=v1_job(100, cotangent=False))),
            ("vjp list", await c.post("/v1/grad", json=[v1_job(30), v1_job(30)])),
        ]:
            assert r.status_code == 422, (what, r.text)
            err = r.json()["error"]
            assert err["code"] == "too_large" and "SURROGATE_MAX_COST" in err["message"], (what, err)
            if what == "vjp list":
                assert err["job"] == 1  # 600 for job 0, 1200 with job 1
        # /v2: the vjp output alone, and with the others
        for outputs in (["vjp"], ["grad"], ["spike", "vjp"]):
            r = await c.post(f"/v2/models/{FOURIER}/infer", json=v2_req(100, outputs))
            assert r.status_code == 400, (outputs, r.text)
            assert "SURROGATE_MAX_COST" in r.json()["error"], outputs
        r = await c.post(f"/v2/models/{FOURIER}/infer", json=v2_req(100, ["spike"]))
        assert r.status_code == 200  # a spike costs 1 per element, whatever n
        assert r.json()["outputs"][0]["data"] == np.where(X20 >= 0, 1.0, 0.0).tolist()


# -- a JSON answer is reserved at its JSON size ------------------------------------------------

ROWS = 100_000
EMPTY_ROWS = np.zeros((ROWS, 0), np.float32)  # a .npy of 128 bytes whose JSON answer is [[],[],...]: 300 kB


async def test_a_json_answer_larger_than_the_budget_is_refused_where_the_npy_one_fits():
    async with App(memory_budget=250_000) as a:  # less than the JSON answer alone
        body = npy(EMPTY_ROWS)
        r = await a.client.post("/v1/grad", content=body, headers={"content-type": "application/x-npy",
                                                                   "accept": "application/x-npy"})
        assert r.status_code == 200, r.text
        assert np.load(io.BytesIO(r.content)).shape == (ROWS, 0)
        r = await a.client.post("/v1/grad", content=body, headers={"content-type": "application/x-npy"})
        assert r.status_code == 422, r.status_code
        err = r.json()["error"]
        assert err["code"] == "too_large" and "memory budget" in err["message"]
        assert a.rt.dataplane.budget.in_use == 0


async def test_a_json_answer_is_held_in_the_reservation():
    async with App(memory_budget=64 << 20) as a:
        body = npy(EMPTY_ROWS)
        r = await a.client.post("/v1/grad", content=body, headers={"content-type": "application/x-npy"})
        assert r.status_code == 200
        out = r.json()
        assert out["shape"] == [ROWS, 0] and out["grad"] == [[]] * ROWS
        budget = a.rt.dataplane.budget
        assert len(r.content) > 3 * ROWS
        assert budget.peak >= len(r.content) + len(body), (budget.peak, len(r.content))
        assert budget.in_use == 0


def test_a_token_file_with_a_byte_order_mark(tmp_path):
    from service.server.settings import Settings

    f = tmp_path / "tokens"
    f.write_bytes("\ufeffsecret-token-one-0123\nsecret-token-two-4567\n".encode())
    assert Settings(api_token_file=f).tokens() == ["secret-token-one-0123", "secret-token-two-4567"]
