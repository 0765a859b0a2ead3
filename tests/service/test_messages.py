"""Messages that say what to do: a .npy/.npz body sent as JSON, NaN and Infinity in JSON, a
misspelled surrogate or braintools' class name (one suggestion rule for /v1 and /v2), and the
shapes the OIP model metadata declares. In process, and against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from helpers import App, body, npy, npz, tensor
from liveserver import running_server

import surrogate_core as sc
from service.errors import ECHO_LIMIT

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
X = np.array([-1.0, 0.0, 0.5], np.float32)
JSON = {"content-type": "application/json"}


def braintools_names() -> dict[str, str]:
    """braintools class name -> surrogate name, from the table of docs/surrogates.md."""
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| `([A-Za-z0-9]+)` \|", (ROOT / "docs" / "surrogates.md").read_text(), re.M)
    assert len(rows) == 18
    return {cls: name for name, cls in rows}


# -- a .npy or .npz body sent as JSON -----------------------------------------------------------

@pytest.mark.parametrize(("data", "ctype"), [(npy(X), "application/x-npy"), (npz(x=X), "application/x-npz")],
                         ids=["npy", "npz"])
@pytest.mark.parametrize("declared", [{"content-type": "application/json"}, {}], ids=["as-json", "no-content-type"])
async def test_a_binary_body_sent_as_json_is_named_with_its_content_type(data, ctype, declared):
    async with App() as a:
        r = await a.client.post("/v1/grad", content=data, headers=declared)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "bad_request"
        assert f"'content-type: {ctype}'" in err["message"]
        assert "surrogate" not in err["message"]  # not orjson's "surrogates not allowed"
        # what the message says to do works
        ok = await a.client.post("/v1/grad", content=data, headers={"content-type": ctype})
        assert ok.status_code == 200 and ok.json()["grad"] == [0.0, 1.0, 0.5]


@pytest.mark.parametrize(("data", "what"), [(npy(X), ".npy file"), (npz(x=X), "zip archive")], ids=["npy", "npz"])
async def test_a_binary_body_sent_to_v2_is_named(data, what):
    async with App() as a:
        r = await a.client.post("/v2/models/sigmoid/infer", content=data)
        assert r.status_code == 400
        message = r.json()["error"]
        assert what in message and "/v1" in message and "binary tensor data" in message
        assert "surrogate" not in message


async def test_other_bytes_that_are_not_utf8_are_named_so():
    async with App() as a:
        r = await a.client.post("/v1/grad", content=b'{"x": [1], "dtype": "\xff"}', headers=JSON)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert "not UTF-8" in message and "surrogate" not in message


# -- NaN and Infinity in JSON -------------------------------------------------------------------

NONFINITE = ["NaN", "nan", "Infinity", "-Infinity", "+Infinity", "inf", "-inf", "Inf"]


@pytest.mark.parametrize("token", NONFINITE)
@pytest.mark.parametrize("pad", [0, 40_000], ids=["small", "large"])  # the large body tries the simdjson path first
async def test_nan_and_infinity_in_v1_json_are_named_and_point_to_npy(token, pad):
    prefix = b'{"x": [' + b"0.5, " * (pad // 5)
    raw = prefix + token.encode() + b", 1.0]}"
    async with App(max_body_bytes=1 << 20) as a:
        r = await a.client.post("/v1/grad", content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "bad_request"
    message = err["message"]
    assert message.startswith(f"invalid JSON: {token!r} at line 1 column {len(prefix) + 1}: "), message
    assert "JSON has no NaN or Infinity" in message
    assert "application/x-npy" in message and ".npy" in message


async def test_the_way_the_message_points_to_works():
    """NaN and infinities in a .npy body: IEEE results (docs/api.md), answered as .npy."""
    x = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    async with App() as a:
        r = await a.client.post("/v1/grad", content=npy(x), headers={"content-type": "application/x-npy",
                                                                        "accept": "application/x-npy"})
        assert r.status_code == 200, r.text
        import io

        g = np.load(io.BytesIO(r.content))
        assert np.isnan(g[0]) and g[1:].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("token", ["NaN", "-Infinity"])
async def test_nan_in_v2_json_data_points_to_binary_data_which_works(token):
    head = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0.5, ' + token.encode() + b"]}]}"
    async with App() as a:
        r = await a.client.post("/v2/models/piecewise_quadratic/infer", content=head, headers=JSON)
        assert r.status_code == 400
        message = r.json()["error"]
        assert f"{token!r} at line 1 column {head.index(token.encode()) + 1}" in message
        assert "JSON has no NaN or Infinity" in message and "binary tensor data" in message
        t, raw = tensor("x", np.array([0.5, np.nan if token == "NaN" else -np.inf]), binary=True)
        content, headers = body({"inputs": [t], "outputs": [{"name": "grad", "parameters": {"binary_data": True}}]},
                                [raw])
        ok = await a.client.post("/v2/models/piecewise_quadratic/infer", content=content, headers=headers)
        assert ok.status_code == 200, ok.text
        n = int(ok.headers["inference-header-content-length"])
        grad = np.frombuffer(ok.content[n:], "<f4")
        assert grad[0] == 0.5 and (np.isnan(grad[1]) if token == "NaN" else grad[1] == 0.0)


async def test_other_syntax_errors_keep_the_parsers_words():
    async with App() as a:
        r = await a.client.post("/v1/grad", content=b'{"x": [1, 2', headers=JSON)
        assert r.json()["error"]["message"] == "invalid JSON: unexpected end of data: line 1 column 12 (char 11)"
        r = await a.client.post("/v1/grad", content=b'{"x": [1, Nope]}', headers=JSON)
        assert "NaN" not in r.json()["error"]["message"]


# -- one suggestion rule for surrogate names ----------------------------------------------------

def suggestion(message: str) -> str | None:
    m = re.search(r"did you mean '([a-z0-9_]+)'\?", message)
    return m.group(1) if m else None


async def _every_way(a: App, name: str) -> dict[str, str]:
    """The message for the unknown surrogate ``name`` from each place that takes one."""
    out = {}
    r = await a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5], "surrogate": name}), headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["field"] == "surrogate"
    out["v1-json"] = r.json()["error"]["message"]
    r = await a.client.post("/v1/grad", params={"surrogate": name}, content=npy(X),
                            headers={"content-type": "application/x-npy"})
    assert r.status_code == 422
    out["v1-npy"] = r.json()["error"]["message"]
    r = await a.client.get(f"/v1/surrogates/{name}")
    assert r.status_code == 404 and r.json()["error"]["field"] == "name"
    out["v1-metadata"] = r.json()["error"]["message"]
    content, headers = body({"inputs": [tensor("x", X)[0]]})
    r = await a.client.post(f"/v2/models/{name}/infer", content=content, headers=headers)
    assert r.status_code == 404
    out["v2-infer"] = r.json()["error"]
    r = await a.client.get(f"/v2/models/{name}")
    assert r.status_code == 404
    out["v2-metadata"] = r.json()["error"]
    return out


async def test_every_braintools_class_name_is_answered_with_its_surrogate_everywhere():
    async with App() as a:
        for cls, name in braintools_names().items():
            for where, message in (await _every_way(a, cls)).items():
                assert suggestion(message) == name, (cls, where, message)
                assert f"'{cls}'" in message


@pytest.mark.parametrize(("given", "meant"), [
    ("sigmod", "sigmoid"), ("sigmoud", "sigmoid"), ("SIGMOID", "sigmoid"), ("Piecewise-Quadratic", "piecewise_quadratic"),
    ("piecewisequadratic", "piecewise_quadratic"), ("braintools.surrogate.ERF", "erf"), ("relu", "relu_grad"),
    ("nope", None), ("x", None),
])
async def test_v1_and_v2_suggest_alike(given, meant):
    async with App() as a:
        messages = await _every_way(a, given)
    assert {where: suggestion(m) for where, m in messages.items()} == dict.fromkeys(messages, meant)


async def test_a_long_name_is_cut_in_every_message_and_gets_no_suggestion():
    name = "sigmoid" * 3000
    async with App() as a:
        messages = await _every_way(a, name)
    for where, message in messages.items():
        assert repr(name[:ECHO_LIMIT]) + "…" in message, where
        assert name[: ECHO_LIMIT + 1] not in message and len(message) < 600, where
        assert suggestion(message) is None, where


async def test_class_names_are_not_accepted_as_names():
    """One name per surrogate: braintools' class name is suggested, never computed under."""
    async with App() as a:
        r = await a.client.post("/v1/grad", content=orjson.dumps({"x": [0.5], "surrogate": "Sigmoid"}), headers=JSON)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_surrogate"
        index = (await a.client.post("/v2/repository/index")).json()
        assert {m["name"] for m in index} == set(sc.names())


# -- OIP model metadata: the shapes accepted ----------------------------------------------------

@pytest.mark.parametrize("max_rank", [8, 3, 1])
async def test_metadata_declares_max_rank_free_dimensions_and_that_is_what_is_taken(max_rank):
    async with App(max_rank=max_rank) as a:
        meta = (await a.client.get("/v2/models/piecewise_quadratic")).json()
        shapes = [t["shape"] for t in meta["inputs"] + meta["outputs"]]
        assert shapes == [[-1] * max_rank] * len(shapes)

        async def infer(x_shape, alpha_shape):
            x = np.full(x_shape, 0.25, np.float32)
            alpha = np.full(alpha_shape, 2.0, np.float32)
            content, headers = body({"inputs": [tensor("x", x)[0], tensor("alpha", alpha)[0]],
                                     "outputs": [{"name": "grad"}]})
            return await a.client.post("/v2/models/piecewise_quadratic/infer", content=content, headers=headers)

        # every tensor at the declared rank (the broadcast output too), and at rank 0
        at = (2,) + (1,) * (max_rank - 1) if max_rank else ()
        r = await infer(at, at[::-1])
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        want_shape = [2] * (max_rank > 0) + [1] * max(max_rank - 2, 0) + [2] * (max_rank > 1)
        assert out["shape"] == want_shape
        assert out["data"] == [1.0] * int(np.prod(want_shape))  # 2 - 4 * 0.25
        r = await infer((), ())
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == []
        # one dimension past the declared shape is refused, naming the input
        r = await infer((1,) * (max_rank + 1), ())
        assert r.status_code == 400 and "'x'" in r.json()["error"]
        r = await infer((), (1,) * (max_rank + 1))
        assert r.status_code == 400 and "'alpha'" in r.json()["error"]


# -- against a real server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with running_server() as (base, _proc):
        yield base


def test_the_messages_over_a_real_server(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post("/v1/grad", content=npy(X), headers=JSON)
        assert r.status_code == 400 and "'content-type: application/x-npy'" in r.json()["error"]["message"]
        r = c.post("/v1/grad", content=b'{"x": [NaN]}', headers=JSON)
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("invalid JSON: 'NaN' at line 1 column 8: JSON has no NaN")
        r = c.post("/v1/grad", json={"x": [0.5], "surrogate": "Sigmoid"})
        assert r.status_code == 422 and suggestion(r.json()["error"]["message"]) == "sigmoid"
        r = c.get("/v1/surrogates/sigmod")
        assert r.status_code == 404 and suggestion(r.json()["error"]["message"]) == "sigmoid"
        r = c.get("/v2/models/PiecewiseQuadratic")
        assert r.status_code == 404 and suggestion(r.json()["error"]) == "piecewise_quadratic"
        meta = c.get("/v2/models/sigmoid").json()
        assert meta["inputs"][0]["shape"] == [-1] * 8
