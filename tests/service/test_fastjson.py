"""The simdjson fast path for large JSON bodies: same jobs as the general path, and ``None`` (so the
general path decodes and diagnoses) for anything unusual."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.dataplane.limits import Limits
from service.protocols.tensors import fastjson
from service.protocols.tensors.arrays import has_literals
from service.protocols.v1 import codec as codecs

pytestmark = pytest.mark.anyio
BIG = 5000  # elements: enough to pass fastjson.MIN_BYTES
LIMITS = Limits(max_rank=8, max_elements=10**8, max_cost=1e18)


def pad(doc) -> bytes:
    return orjson.dumps(doc)


def general(body: bytes):
    docs, single = codecs.parse_json(body)
    return codecs.jobs_from_json(docs, "grad", careful=has_literals(body), limits=LIMITS, max_jobs=64), single


def fast(body: bytes):
    decoded = fastjson.decode(body, max_rank=8)
    assert decoded is not None
    docs, single = decoded
    return codecs.jobs_from_json(docs, "grad", careful=False, limits=LIMITS, max_jobs=64), single


def test_small_bodies_are_left_to_the_general_path():
    assert fastjson.decode(b'{"x": [1.0, 2.0]}', max_rank=8) is None


@pytest.mark.parametrize(
    "doc",
    [
        {"x": np.linspace(-3, 3, BIG).tolist(), "alpha": 2.0},
        {"x": np.linspace(-3, 3, BIG).reshape(50, 100).tolist(), "alpha": [[0.5], [1.0]] * 25, "dtype": "float64"},
        [{"x": np.linspace(-1, 1, BIG).tolist()}, {"x": 0.25, "cotangent": [1, 2, 3]}, {"x": [[[]]]}],
        {"x": list(range(-BIG, BIG)), "alpha": 3},
        {"x": np.linspace(-3, 3, BIG).reshape(5, 10, 100).tolist(), "surrogate": "sigmoid", "alpha": 4},
    ],
)
def test_same_jobs_as_the_general_path(doc):
    body = pad(doc)
    (g, gs), (f, fs) = general(body), fast(body)
    assert gs == fs and len(g) == len(f)
    for a, b in zip(g, f):
        assert (a.op, a.surrogate, a.dtype, a.shape) == (b.op, b.surrogate, b.dtype, b.shape)
        np.testing.assert_array_equal(a.x, b.x)
        assert a.x.dtype == b.x.dtype
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])


ROW = np.linspace(-1, 1, BIG).tolist()


@pytest.mark.parametrize(
    "raw",
    [
        pad({"x": [ROW[:100], ROW[:100], ROW[:99] + [[1.0]]]} | {"pad": ROW}),  # an array hidden in a row
        pad({"x": [ROW[:2000], ROW[:3000], ROW[:1000]]}),  # ragged, same total as the first-row shape
        pad({"x": [ROW[:2000], ROW[:2001]]}),
        pad({"x": ROW[:-1] + ["1.0"]}),
        pad({"x": ROW[:-1] + [None]}),
        pad({"x": ROW, "meta": {"a": 1}}),
        pad({"x": ROW, "surrogate": "[weird["}),
        pad({"x": ROW})[:-1] + b', "x": [1.0]}',  # duplicate key
        pad({"x": ROW})[:-2] + b", 1e400]}",  # out of float64 range
        pad([{"x": ROW}, 3]),
        pad({"x": np.zeros((70_000, 1)).tolist()}),  # too many rows to check one by one
        pad({"x": [[[[[[[[[1.0]]]]]]]]], "pad": ROW}),  # rank 9
        b"[" * 40_000 + b"]" * 40_000,
    ],
)
def test_unusual_bodies_fall_back(raw):
    assert len(raw) >= fastjson.MIN_BYTES
    assert fastjson.decode(raw, max_rank=8) is None


async def test_the_service_answers_the_same_either_way(client):
    x = np.random.default_rng(4).uniform(-2, 2, (20, 500))
    body = orjson.dumps({"x": x.tolist(), "alpha": 1.5, "dtype": "float64"})
    r = await client.post("/v1/grad", content=body, headers={"content-type": "application/json"})
    got = np.array(r.json()["grad"])
    want = np.where(np.abs(x) > 1 / 1.5, 0, 1.5 - 2.25 * np.abs(x))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # and a ragged big body still gets the exact message of the general path
    bad = orjson.dumps({"x": [x[0].tolist(), x[1, :-1].tolist()] + x[2:].tolist()})
    r = await client.post("/v1/grad", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "x[1]: ragged nested list" in r.json()["error"]["message"]
