"""/v2 infer behaviour against independent references: the Inference-Header-Content-Length rule,
the datatype of JSON inputs (computed and answered in it), Accept-Encoding with q-values, the
``binary_data_output`` request parameter over a listed ``outputs``, and the service's own handling
of Triton's binary tensor data (a request built with the binary helper, an answer decoded by hand).

References: piecewise_quadratic's g'(x) = alpha - alpha^2 |x| where |x| <= 1/alpha, else 0, and the
spike H(x) = 1 where x >= 0 (-0.0 included), else 0; in a given dtype, NumPy evaluates them in it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from helpers import body, make_settings, tensor

from service.app import create_app

pytestmark = pytest.mark.anyio
INFER = "/v2/models/piecewise_quadratic/infer"
WIRE = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
IDENTITY = {"accept-encoding": "identity"}  # httpx would ask for gzip by default


def grad_ref(x: Any, alpha: float = 1.0) -> np.ndarray:
    x = np.abs(np.asarray(x, np.float64))
    return np.where(x <= 1.0 / alpha, alpha - alpha * alpha * x, 0.0)


def spike_ref(x: Any) -> np.ndarray:
    return np.where(np.asarray(x) >= 0, 1.0, 0.0)


def grad_in(x64: np.ndarray, alpha: float, dt: np.dtype) -> np.ndarray:
    """g'(x) evaluated by NumPy in ``dt``: x rounded to dt, then every operation in dt."""
    x, a = np.asarray(x64).astype(dt), dt.type(alpha)
    ax = np.abs(x)
    return np.where(ax > dt.type(1) / a, dt.type(0), a - a * a * ax).astype(dt)


@pytest.fixture
async def app():
    application = create_app(make_settings(max_elements=100_000, max_body_bytes=2_000_000))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def raw_post(app: Any, content: bytes, headers: list[tuple[str, str]], path: str = INFER
                   ) -> tuple[int, dict[str, str], bytes]:
    """One request straight to the ASGI app, its headers exactly as given (no client adds or
    normalises any); the answer's status, headers and body bytes as they would travel."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"t"), (b"content-length", str(len(content)).encode()),
                    *[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]],
        "client": ("127.0.0.1", 1), "server": ("t", 80),
    }
    delivered = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": content, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], hdrs, b"".join(bytes(m.get("body", b"")) for m in sent[1:])


def split_answer(headers: Any, raw: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An answer's JSON header and its outputs by name, decoded by hand: JSON data as float64, binary
    data as the little-endian bytes of the output's datatype (read with struct)."""
    n = headers.get("inference-header-content-length")
    head = orjson.loads(raw[: int(n)] if n is not None else raw)
    offset = int(n) if n is not None else len(raw)
    out: dict[str, np.ndarray] = {}
    for t in head["outputs"]:
        if "data" in t:
            out[t["name"]] = np.asarray(t["data"], np.float64).reshape(t["shape"])
            continue
        size = t["parameters"]["binary_data_size"]
        code = {"FP16": "e", "FP32": "f", "FP64": "d"}[t["datatype"]]
        count = size // struct.calcsize("<" + code)
        values = struct.unpack_from(f"<{count}{code}", raw, offset)
        out[t["name"]] = np.asarray(values, np.float64).reshape(t["shape"])
        offset += size
    assert offset == len(raw), "the binary outputs do not fill the rest of the answer"
    return head, out


# -- Inference-Header-Content-Length: digits only, within the body -------------------------------------

X5 = np.array([-2.0, -0.5, 0.0, 0.25, 0.75], np.float32)
# (id, the header value given the JSON header's length L and the binary data's length B, status)
HEADER_LENGTHS = [
    pytest.param(lambda L, B: str(L), 200, id="digits"),
    pytest.param(lambda L, B: f"-{B}", 400, id="negative-that-would-split-right"),
    pytest.param(lambda L, B: "-1", 400, id="minus-one"),
    pytest.param(lambda L, B: "abc", 400, id="letters"),
    pytest.param(lambda L, B: "", 400, id="empty"),
    pytest.param(lambda L, B: hex(L), 400, id="hex"),
    pytest.param(lambda L, B: f"{L}.0", 400, id="decimal-point"),
    pytest.param(lambda L, B: f"{L // 10}_{L % 10}", 400, id="underscore"),
    pytest.param(lambda L, B: f"+{L}", 400, id="plus"),
    pytest.param(lambda L, B: f" {L}", 400, id="leading-space"),
]


@pytest.mark.parametrize(("spell", "status"), HEADER_LENGTHS)
async def test_inference_header_content_length_is_digits_only(app, spell, status):
    t, blob = tensor("x", X5, "FP32", binary=True)
    head = orjson.dumps({"inputs": [t], "outputs": [{"name": "grad"}]})
    assert len(head) >= 10 and len(blob) == 20
    value = spell(len(head), len(blob))
    # the lenient spellings (+L, " L", L with an underscore) all mean the right split: only the
    # digits-only rule can refuse them
    got, headers, raw = await raw_post(app, head + blob, [("inference-header-content-length", value),
                                                          ("accept-encoding", "identity")])
    assert got == status, (value, raw)
    if status == 200:
        _, out = split_answer(headers, raw)
        np.testing.assert_array_equal(out["grad"], grad_ref(X5).astype(np.float32))
    else:
        error = orjson.loads(raw)
        assert set(error) == {"error"} and "Inference-Header-Content-Length" in error["error"], error
    # and the server answers the next request
    got, headers, raw = await raw_post(app, head + blob, [("inference-header-content-length", str(len(head)))])
    assert got == 200


# -- the datatype of JSON inputs is the computation's and the answer's ---------------------------------

@pytest.mark.parametrize("n", [24, 400], ids=["short", "long"])  # a short list may be read another way
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
async def test_json_inputs_are_computed_and_answered_in_their_datatype(client, datatype, n):
    dt = WIRE[datatype]
    rng = np.random.default_rng(11)
    x64 = np.concatenate([rng.uniform(-0.6, 0.6, n), [-1e-9, -1e-50, 1e-50, -0.0, 0.5, -0.5, 0.1, 1 / 3]])
    alpha = 2.0  # a power of two: alpha, alpha**2 * |x| and 1/alpha are exact, one rounding per value
    req = {"inputs": [{"name": "x", "shape": [x64.size], "datatype": datatype, "data": x64.tolist()}],
           "parameters": {"alpha": alpha}, "outputs": [{"name": "grad"}, {"name": "spike"}]}
    r = await client.post(INFER, content=orjson.dumps(req), headers={"content-type": "application/json", **IDENTITY})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [o["datatype"] for o in doc["outputs"]] == [datatype, datatype]
    got = {o["name"]: np.asarray(o["data"], np.float64) for o in doc["outputs"]}
    want_grad, want_spike = grad_in(x64, alpha, dt), spike_ref(x64.astype(dt)).astype(dt)
    for name, want in (("grad", want_grad), ("spike", want_spike)):
        values = got[name]
        if dt.itemsize < 8:  # written as float32 (float16 widened exactly): read back as float32
            values32 = values.astype(np.float32)
            # the text is float32's shortest repr, not a float64's digits
            shortest = [float(str(f)) for f in values32]
            assert np.array_equal(shortest, values), f"{name}: not written as {dt}"
            assert np.array_equal(values32.astype(dt).astype(np.float32), values32), f"{name}: not values of {dt}"
            values = values32.astype(dt)
        assert values.dtype == dt
        assert np.array_equal(values, want), (name, datatype, np.flatnonzero(values != want)[:5])
    if dt.itemsize < 8:  # the data set tells the dtypes apart: in float64 the answers would differ
        assert not np.array_equal(want_grad.astype(np.float64), grad_ref(x64, alpha))
        assert not np.array_equal(want_spike.astype(np.float64), spike_ref(x64))
    else:
        np.testing.assert_array_equal(got["grad"], grad_ref(x64, alpha))
        np.testing.assert_array_equal(got["spike"], spike_ref(x64))


async def test_the_computation_follows_x_not_the_other_inputs(client):
    x64 = np.array([0.1, -0.3, 0.7, -1e-9])
    req = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP16", "data": x64.tolist()},
                      {"name": "alpha", "shape": [1], "datatype": "FP64", "data": [1.0]}],
           "outputs": [{"name": "grad"}]}
    r = await client.post(INFER, content=orjson.dumps(req), headers={"content-type": "application/json", **IDENTITY})
    (o,) = r.json()["outputs"]
    assert o["datatype"] == "FP16"
    got = np.asarray(o["data"], np.float64).astype(np.float32).astype(np.float16)
    assert np.array_equal(got, grad_in(x64, 1.0, np.dtype(np.float16)))


# -- Accept-Encoding: q=0 refuses an encoding ---------------------------------------------------------

ENCODINGS = [
    # (Accept-Encoding, the answer's Content-Encoding: None for none)
    (None, None),
    ("identity", None),
    ("gzip", "gzip"),
    ("deflate", "deflate"),
    ("GZip", "gzip"),
    ("gzip;q=0", None),
    ("gzip; q=0", None),
    ("gzip;Q=0", None),
    ("gzip;q=0.0", None),
    ("gzip;q=0.000", None),
    ("gzip;q=-1", None),
    ("gzip;q=abc", None),  # an unreadable q counts as 0
    ("gzip;q=0.001", "gzip"),
    ("deflate;q=0", None),
    ("gzip;q=0, deflate;q=0", None),
    ("deflate;q=0, gzip", "gzip"),
    ("gzip;q=0, deflate", "deflate"),
    ("gzip;q=0.5, deflate", "deflate"),
    ("deflate;q=0.9, gzip;q=0.8", "deflate"),
    ("gzip, deflate", "gzip"),
    ("deflate, gzip", "gzip"),  # a tie goes to gzip
    ("gzip;q=0.5, deflate;q=0.5", "gzip"),
    ("br", None),
    ("*", None),  # as the service defines it: only gzip and deflate named with q > 0 count
    ("*;q=0", None),
    ("*;q=0, gzip", "gzip"),
    ("identity;q=0, gzip;q=0", None),
    ("gzip;q=0, gzip", "gzip"),  # a repeated token: its best q
]


@pytest.mark.parametrize(("accept", "encoding"), ENCODINGS, ids=[f"{a!r}" for a, _ in ENCODINGS])
async def test_accept_encoding_q_values(app, accept, encoding):
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    content = orjson.dumps({"inputs": [tensor("x", x, "FP64")[0]], "outputs": [{"name": "grad"}, {"name": "spike"}]})
    headers = [("content-type", "application/json")] + ([] if accept is None else [("accept-encoding", accept)])
    status, hdrs, raw = await raw_post(app, content, headers)
    assert status == 200
    assert hdrs.get("content-encoding") == encoding, (accept, hdrs)
    if encoding == "gzip":
        raw = gzip.decompress(raw)
    elif encoding == "deflate":
        raw = zlib.decompress(raw)
    else:
        assert hdrs["content-length"] == str(len(raw))
    doc = orjson.loads(raw)  # what travelled is exactly the named encoding of the JSON answer
    out = {o["name"]: o["data"] for o in doc["outputs"]}
    assert out == {"grad": grad_ref(x).tolist(), "spike": spike_ref(x).tolist()}


# -- binary_data_output over a listed outputs ---------------------------------------------------------

async def _infer(client, req: dict[str, Any], blobs: Any = ()) -> httpx.Response:
    content, headers = body(req, blobs)
    r = await client.post(INFER, content=content, headers={**headers, **IDENTITY})
    assert r.status_code == 200, r.text
    return r


X = np.linspace(-1.5, 1.5, 13)


@pytest.mark.parametrize(
    ("request_flag", "per_output", "binary"),
    [
        # binary_data_output in the request's parameters; each listed output's binary_data (absent: None)
        (True, {"grad": None, "spike": None, "fun": None}, {"grad", "spike", "fun"}),
        (True, {"grad": None, "spike": False, "fun": None}, {"grad", "fun"}),
        (True, {"grad": False, "spike": False, "fun": False}, set()),
        (False, {"grad": None, "spike": True, "fun": None}, {"spike"}),
        (None, {"grad": None, "spike": None, "fun": True}, {"fun"}),
        (None, {"grad": None, "spike": None, "fun": None}, set()),
    ],
    ids=["all-from-request", "per-output-false-overrides", "all-overridden", "request-false-per-output-true",
         "no-request-flag", "json-by-default"],
)
async def test_binary_data_output_applies_to_listed_outputs(client, request_flag, per_output, binary):
    outs = []
    for name, flag in per_output.items():
        o: dict[str, Any] = {"name": name}
        if flag is not None:
            o["parameters"] = {"binary_data": flag}
        outs.append(o)
    req: dict[str, Any] = {"inputs": [tensor("x", X, "FP64")[0]], "outputs": outs}
    if request_flag is not None:
        req["parameters"] = {"binary_data_output": request_flag}
    r = await _infer(client, req)
    head, out = split_answer(r.headers, r.content)
    sent_binary = {o["name"] for o in head["outputs"] if "data" not in o}
    assert sent_binary == binary
    for o in head["outputs"]:
        if o["name"] in binary:
            assert o["parameters"]["binary_data_size"] == 8 * X.size and "data" not in o
    if binary:
        assert r.headers["content-type"] == "application/octet-stream"
        assert int(r.headers["inference-header-content-length"]) < len(r.content)
    else:
        assert r.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in r.headers
    assert [o["name"] for o in head["outputs"]] == ["grad", "spike", "fun"]
    np.testing.assert_array_equal(out["grad"], grad_ref(X))
    np.testing.assert_array_equal(out["spike"], spike_ref(X))
    fun = np.where(X < -1, 0.0, np.where(X > 1, 1.0, (-np.abs(X) / 2 + 1) * X + 0.5))
    np.testing.assert_allclose(out["fun"], fun, rtol=1e-12, atol=1e-15)


# -- the service's binary tensor data, both ways (replaces test_v2's test_binary_helper_round_trips) ----

async def test_the_service_reads_a_binary_request_and_its_binary_answer_decodes_right(client):
    x = np.array([1.0, -2.0, 0.25, -0.25, 0.0, 0.75, -0.0])
    ct = np.array([2.0, 3.0, -4.0, 0.5, 1.5, -1.0, 8.0])
    tx, bx = tensor("x", x, "FP32", binary=True)
    tc, bc = tensor("cotangent", ct, "FP16", binary=True)
    ta, _ = tensor("alpha", [1.0], "FP64")  # a JSON tensor between binary ones
    # the request as the helper builds it: the JSON header, then the tensors' little-endian bytes
    assert bx == struct.pack("<7f", *x) and tx["parameters"] == {"binary_data_size": 28}
    assert bc == struct.pack("<7e", *ct) and tc["parameters"] == {"binary_data_size": 14}
    req = {"inputs": [tx, ta, tc], "parameters": {"binary_data_output": True},
           "outputs": [{"name": "grad"}, {"name": "vjp"}, {"name": "spike"}]}
    content, headers = body(req, [bx, bc])
    assert content[int(headers["inference-header-content-length"]):] == bx + bc
    r = await client.post(INFER, content=content, headers={**headers, **IDENTITY})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    # the answer, by hand: the JSON header of the declared length, then each output's bytes in order
    n = int(r.headers["inference-header-content-length"])
    head = orjson.loads(r.content[:n])
    assert [(o["name"], o["datatype"], o["shape"], o["parameters"]) for o in head["outputs"]] == [
        (name, "FP32", [7], {"binary_data_size": 28}) for name in ("grad", "vjp", "spike")
    ]
    assert len(r.content) == n + 3 * 28
    grad = struct.unpack_from("<7f", r.content, n)
    vjp = struct.unpack_from("<7f", r.content, n + 28)
    spike = struct.unpack_from("<7f", r.content, n + 56)
    assert list(grad) == [0.0, 0.0, 0.75, 0.75, 1.0, 0.25, 1.0]  # by hand: 1 - |x| inside |x| <= 1
    assert list(grad) == grad_ref(x).tolist()
    assert list(vjp) == (ct * grad_ref(x)).tolist()
    assert list(spike) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0] == spike_ref(x).tolist()


async def test_a_binary_request_with_its_bytes_cut_or_padded_is_refused(client):
    tx, bx = tensor("x", np.array([0.5, -0.5]), "FP64", binary=True)
    for blob, words in ((bx[:-1], "past the end"), (bx + b"\0", "1 bytes of binary data")):
        content, headers = body({"inputs": [tx]}, [blob])
        r = await client.post(INFER, content=content, headers={**headers, **IDENTITY})
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = await _infer(client, {"inputs": [tx], "outputs": [{"name": "grad"}]}, [bx])
    assert r.json()["outputs"][0]["data"] == [0.5, 0.5]
