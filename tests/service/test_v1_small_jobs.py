"""The decoder of small plain job objects (``V1Codec._fast_job``) makes exactly the job the general
path makes, or declines (``None``) so that the general path decodes the body and words its error."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.dataplane.limits import Limits
from service.protocols.tensors.arrays import has_literals
from service.protocols.v1 import codec as v1


F32_MAX = float(np.finfo(np.float32).max)
LIMITS = Limits(max_rank=8, max_elements=10**7, max_cost=1e18)


def general(endpoint: str, body: bytes):
    docs, _ = v1.parse_json(body)
    return v1.jobs_from_json(docs, endpoint, careful=has_literals(body), limits=LIMITS, max_jobs=64)[0]


def codec(endpoint: str) -> v1.V1Codec:
    return v1.V1Codec(endpoint, LIMITS, max_jobs=64)


def same(a, b) -> None:
    assert (a.op, a.surrogate, a.dtype, a.shape) == (b.op, b.surrogate, b.dtype, b.shape)
    assert a.x.dtype == b.x.dtype and a.x.tobytes() == b.x.tobytes()
    assert set(a.params) == set(b.params)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype and a.params[k].tobytes() == b.params[k].tobytes()


numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.sampled_from([F32_MAX, -F32_MAX, float(np.nextafter(F32_MAX, np.inf)), 3.4028235677973366e38, 1e-46, -0.0, 2**53 + 1, 2**54 + 2**30 + 1]),
)


@settings(max_examples=300, deadline=None)
@given(x=st.lists(numbers, max_size=40), dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16", None]),
       alpha=st.one_of(st.none(), st.floats(0.01, 100), st.integers(1, 5)),
       endpoint=st.sampled_from(["spike", "grad", "fun"]))
def test_the_small_job_decoder_makes_the_general_paths_job_or_declines(x, dtype, alpha, endpoint):
    doc: dict = {"x": x}
    if dtype is not None:
        doc["dtype"] = dtype
    if alpha is not None:
        doc["alpha"] = alpha
    body = orjson.dumps(doc)
    try:
        expected = general(endpoint, body)
    except Exception as exc:  # the general path refuses: the small decoder must decline
        assert codec(endpoint)._fast_job(body) is None, exc
        return
    got = codec(endpoint)._fast_job(body)
    if got is not None:
        same(got, expected)


@pytest.mark.parametrize("body", [
    b'{"x": [1.0, true]}',  # a boolean is not a number
    b'{"x": [1.0], "x": [2.0]}',  # a repeated key
    b'{"x": [1.0], "alpha": 1.0, "alpha": 2.0}',
    b'{"x": [1.0], "surrogate": "sig\\"moid"}',  # an escape
    b'{"x": [1.0], "alpha": "1"}',  # a string parameter
    b'{"x": [1.0], "cotangent": [1.0]}',
    b'{"x": [1.0], "alhpa": 1.0}',  # an unknown parameter
    b'{"x": [1.0], "surrogate": "nope"}',
    b'{"x": [1.0], "dtype": "int8"}',
    b'{"x": [[1.0], [2.0, 3.0]]}',  # ragged
    b'{"x": [1e39]}',  # past float32
    b'{"x": [null]}',
    b'[{"x": [1.0]}]',  # a list of jobs
    b'{"x": 1.0}',  # a scalar x goes the general way
])
def test_the_small_job_decoder_declines_what_is_unusual_or_wrong(body):
    assert codec("grad")._fast_job(body) is None


@settings(max_examples=200, deadline=None)
@given(x=st.lists(numbers, max_size=40))
def test_a_small_v2_x_is_read_as_the_general_path_reads_it(x):
    """/v2 reads a short flat FP32 x of floats in one cast; the values are those of the general
    reading (each JSON number as the nearest float64, then float32)."""
    from service.protocols.tensors.arrays import small_float32
    from service.protocols.v2 import codec as v2

    a = small_float32(x)
    if a is None:
        return
    with np.errstate(over="raise"):
        expected = np.asarray(x, np.float64).astype(np.float32)
    assert a.dtype == np.float32 and a.tobytes() == expected.tobytes()
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [len(x)], "datatype": "FP32", "data": x}],
                        "outputs": [{"name": "grad"}]})
    request = v2.V2Request(v2.model("piecewise_quadratic"), None, None)
    (job,) = v2.V2Codec(LIMITS).decode(request, body).jobs
    assert job.dtype == "float32" and job.x.tobytes() == expected.tobytes()
