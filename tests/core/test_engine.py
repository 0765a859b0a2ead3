"""The engine: bounded compilation, traced parameters, fused batches, layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

import surrogate_core as sc

import reference as ref


def job(op="grad", x=(0.5,), **kw):
    return sc.make_job(op, np.asarray(x, np.float32), **kw)


def test_bucket_sizes():
    e = sc.Engine(min_bucket=1024)
    assert [e.bucket(n) for n in (0, 1, 1024, 1025, 1536, 1537, 2048, 2049, 3073, 700_000, 1_000_000, 10_000_000)] == [
        1024, 1024, 1024, 1536, 1536, 2048, 2048, 3072, 4096, 786_432, 1 << 20, 3 << 22,
    ]
    # every size fits, with at most 50% padding past the smallest bucket
    for n in range(1025, 70_000, 37):
        b = e.bucket(n)
        assert n <= b <= 1.5 * n
    with pytest.raises(ValueError):
        sc.Engine(min_bucket=1000)


def test_compilations_bounded_over_hundreds_of_lengths():
    e = sc.Engine(min_bucket=256)
    rng = np.random.default_rng(0)
    lengths = sorted(set(rng.integers(1, 200_000, 300).tolist()) | {1, 2, 255, 256, 257})
    for n in lengths:
        x = rng.uniform(-2, 2, n).astype(np.float32)
        (out,) = e.run([sc.make_job("grad", x)])
        assert out.shape == (n,)
        np.testing.assert_allclose(out[:5], ref.pq_grad(x[:5], 1.0), rtol=2e-6, atol=1e-6)
    bound = 2 * math.ceil(math.log2(200_000 / 256)) + 1
    assert e.stats.compilations <= bound
    assert e.variants() == {"grad/piecewise_quadratic/float32": e.stats.compilations}


def test_new_alpha_compiles_nothing():
    e = sc.Engine()
    x = np.linspace(-2, 2, 100, dtype=np.float32)
    e.run([sc.make_job("grad", x, params={"alpha": 1.0})])
    before = e.stats.compilations
    for a in np.linspace(0.1, 30, 50):
        (out,) = e.run([sc.make_job("grad", x, params={"alpha": a})])
        np.testing.assert_allclose(out, ref.pq_grad(x, np.float32(a)), rtol=2e-6, atol=2e-6 * a * a)
    assert e.stats.compilations == before


def test_list_of_jobs_is_one_device_call_and_answers_in_order():
    e = sc.Engine()
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-3, 3, n).astype(np.float32) for n in (5, 0, 17, 300)]
    alphas = [0.5, 1.0, 2.0, 4.0]
    jobs = [sc.make_job("grad", x, params={"alpha": a}) for x, a in zip(xs, alphas)]
    outs = e.run(jobs)
    assert e.stats.device_calls == 1
    for x, a, out in zip(xs, alphas, outs):
        assert out.shape == x.shape
        np.testing.assert_allclose(out, ref.pq_grad(x, np.float32(a)), rtol=2e-6, atol=1e-5)


def test_shared_scalar_parameters_use_the_scalar_layout():
    e = sc.Engine()
    e.run([job(params={"alpha": 2.0}), job(params={"alpha": 2.0})])
    e.run([job(params={"alpha": 2.0}), job(params={"alpha": 3.0})])
    # one scalar-layout and one elementwise-layout variant
    assert e.stats.compilations == 2


def test_groups_by_op_and_dtype():
    e = sc.Engine()
    jobs = [
        job("spike"),
        job("grad"),
        sc.make_job("grad", [0.25], dtype="float64"),
        job("vjp", cotangent=np.float32(2.0)),
        job("spike"),
    ]
    outs = e.run(jobs)
    assert e.stats.device_calls == 4
    assert [o.tolist() for o in outs] == [[1.0], [0.5], [0.75], [1.0], [1.0]]
    assert outs[2].dtype == np.float64


def test_empty_arrays_need_no_device_call():
    e = sc.Engine()
    (out,) = e.run([sc.make_job("grad", np.zeros((3, 0), np.float32))])
    assert out.shape == (3, 0) and e.stats.device_calls == 0


def test_warm_up_compiles_each_bucket_once():
    e = sc.Engine(min_bucket=1024)
    n = e.warm_up(surrogate="piecewise_quadratic", dtype="float32", ops=("grad",), max_elements=4096)
    assert n == 5 and e.stats.compilations == 5  # 1024, 1536, 2048, 3072, 4096
    e.run([sc.make_job("grad", np.zeros(3000, np.float32))])
    assert e.stats.compilations == 5


def test_device_info_reports_a_platform():
    info = sc.device_info()
    assert info["platform"] in {"cpu", "gpu", "cuda", "rocm", "tpu"}
    assert info["device_count"] >= 1
