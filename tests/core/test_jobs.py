"""make_job: validation and messages shared by the in-process API and the service."""

from __future__ import annotations

import numpy as np
import pytest

import surrogate_core as sc


@pytest.mark.parametrize(
    ("kwargs", "field", "code"),
    [
        ({"params": {"alpha": -1.0}}, "alpha", "invalid_value"),
        ({"params": {"alpha": 0.0}}, "alpha", "invalid_value"),
        ({"params": {"alpha": float("nan")}}, "alpha", "invalid_value"),
        ({"params": {"alpha": float("inf")}}, "alpha", "invalid_value"),
        ({"params": {"alpha": [1.0, -2.0]}}, "alpha", "invalid_value"),
        ({"params": {"alpah": 1.0}}, "alpah", "unknown_field"),
        ({"surrogate": "nope"}, "surrogate", "unknown_surrogate"),
        ({"dtype": "int8"}, "dtype", "unknown_dtype"),
        ({"params": {"alpha": [1.0, 2.0, 3.0]}}, "alpha", "shape_mismatch"),
        ({"params": {"alpha": 300.0}, "dtype": "float16"}, "alpha", "not_representable"),
        ({"params": {"alpha": 1e-9}, "dtype": "float16"}, "alpha", "invalid_value"),  # underflows to 0
        ({"params": {"alpha": True}}, "alpha", "invalid_type"),
    ],
)
def test_invalid_jobs_name_the_field(kwargs, field, code):
    with pytest.raises(sc.JobError) as info:
        sc.make_job("grad", np.zeros(2, np.float32), **kwargs)
    assert info.value.field == field
    assert info.value.code == code
    assert field in str(info.value)


def test_unknown_surrogate_lists_the_known_ones():
    with pytest.raises(sc.JobError) as info:
        sc.make_job("grad", [0.0], surrogate="piecewise_quadratc")
    assert "piecewise_quadratic" in info.value.message


def test_misspelled_parameter_gets_a_suggestion():
    with pytest.raises(sc.JobError, match="did you mean 'alpha'"):
        sc.make_job("grad", [0.0], params={"alpah": 1.0})


def test_x_overflowing_the_dtype_is_refused_but_given_inf_passes():
    with pytest.raises(sc.JobError) as info:
        sc.make_job("grad", [1e5], dtype="float16")
    assert info.value.field == "x" and info.value.code == "not_representable"
    job = sc.make_job("grad", np.array([np.inf, np.nan], np.float32), dtype="float16")
    assert job.x.dtype == np.float16


def test_limits():
    lim = sc.Limits(max_rank=2, max_elements=100)
    with pytest.raises(sc.JobError, match="rank 3"):
        sc.make_job("grad", np.zeros((1, 1, 1)), limits=lim)
    with pytest.raises(sc.JobError, match="over the limit of 100"):
        sc.make_job("grad", np.zeros(101), limits=lim)
    # the limit applies after broadcasting, before anything is materialised
    with pytest.raises(sc.JobError, match="elements"):
        sc.make_job("grad", np.zeros(50), params={"alpha": np.ones((50, 1))}, limits=lim)


def test_broadcast_shape_and_defaults():
    j = sc.make_job("vjp", np.zeros(7), params={"alpha": np.ones((3, 1))}, cotangent=2.0)
    assert j.shape == (3, 7) and j.size == 21 and j.dtype == "float64"
    assert sc.make_job("grad", [1, 2]).params["alpha"] == np.float32(1.0)


def test_cotangent_only_for_vjp():
    with pytest.raises(sc.JobError) as info:
        sc.make_job("grad", [0.0], cotangent=1.0)
    assert info.value.field == "cotangent"
    with pytest.raises(sc.JobError):
        sc.make_job("vjp", [0.0])


def test_dtype_of_x_is_kept_when_not_given():
    for name, dt in sc.DTYPES.items():
        assert sc.make_job("grad", np.zeros(2, dt)).dtype == name
    assert sc.make_job("grad", [1, 2]).dtype == "float32"


def test_a_job_seen_before_is_made_the_same_way_without_validating_again():
    x = np.linspace(-2, 2, 7, dtype=np.float32)
    first = sc.make_job("grad", x, dtype="float32", params={"alpha": 2.0}, limits=sc.Limits(max_elements=None))
    again = sc.make_job("grad", x * 2, dtype="float32", params={"alpha": 2.0}, limits=sc.Limits(max_elements=None))
    assert again.params is first.params and again.shape == (7,) and np.array_equal(again.x, x * 2)
    assert (again.op, again.surrogate, again.dtype, again.cotangent) == ("grad", "piecewise_quadratic", "float32", None)
    # anything the remembered job did not check is checked again
    with pytest.raises(sc.JobError, match="rank"):
        sc.make_job("grad", np.zeros((1,) * 9, np.float32), dtype="float32", params={"alpha": 2.0},
                    limits=sc.Limits(max_elements=None))
    cast = sc.make_job("grad", x.astype(np.float64), dtype="float32", params={"alpha": 2.0},
                       limits=sc.Limits(max_elements=None))
    assert cast.x.dtype == np.float32
    with pytest.raises(sc.JobError, match="alpha"):
        sc.make_job("grad", x, dtype="float32", params={"alpha": -2.0}, limits=sc.Limits(max_elements=None))
    with pytest.raises(sc.JobError, match="over the limit"):
        sc.make_job("grad", x, dtype="float32", params={"alpha": 2.0}, limits=sc.Limits(max_elements=3))
