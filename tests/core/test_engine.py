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
    assert [e.bucket(n) for n in (0, 1, 64, 65, 1024, 1025, 1536, 1537, 2048, 2049, 3073, 700_000, 1_000_000,
                                  10_000_000)] == [
        64, 64, 64, 1024, 1024, 1536, 1536, 2048, 2048, 3072, 4096, 786_432, 1 << 20, 3 << 22,
    ]
    assert sc.Engine(min_bucket=16).bucket(1) == 16  # the small bucket is never above the smallest
    assert sc.Engine(min_bucket=1024, small_bucket=1024).bucket(1) == 1024
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
    assert n == 6 and e.stats.compilations == 6  # 64, 1024, 1536, 2048, 3072, 4096
    e.run([sc.make_job("grad", np.zeros(3000, np.float32))])
    e.run([sc.make_job("grad", np.zeros(16, np.float32))])
    assert e.stats.compilations == 6


def test_device_info_reports_a_platform():
    info = sc.device_info()
    assert info["platform"] in {"cpu", "gpu", "cuda", "rocm", "tpu"}
    assert info["device_count"] >= 1


# -- the compile cache ----------------------------------------------------------------------------


def _grad_of(n: int, alpha: float = 1.5) -> tuple[sc.Job, np.ndarray]:
    """A grad job of ``n`` elements (bucket n with min_bucket=1 for n = 1, 2, 3, 4, 6, 8, ...)."""
    x = np.linspace(-1.2, 1.2, n).astype(np.float32)
    return sc.make_job("grad", x, params={"alpha": alpha}), ref.pq_grad(x, np.float32(alpha))


def _cached_buckets(e: sc.Engine) -> set[int]:
    return {n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if e.is_compiled([_grad_of(n)[0]])}


def test_cache_holds_at_most_max_variants_and_counts_evictions():
    e = sc.Engine(min_bucket=1, max_variants=3)
    sizes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]  # ten distinct buckets, so ten variants
    for n in sizes:
        j, want = _grad_of(n)
        (out,) = e.run([j])
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6)
        assert sum(e.variants().values()) <= 3
    assert e.stats.compilations == 10
    assert e.stats.evictions == 7
    assert e.variants() == {"grad/piecewise_quadratic/float32": 3}
    assert _cached_buckets(e) == {16, 24, 32}  # the three most recent


def test_recently_used_variants_survive_eviction():
    e = sc.Engine(min_bucket=1, max_variants=3)
    for n in (1, 2, 3):
        e.run([_grad_of(n)[0]])
    e.run([_grad_of(1)[0]])  # 1 is now the most recently used, 2 the least
    e.run([_grad_of(4)[0]])  # evicts 2
    assert _cached_buckets(e) == {1, 3, 4}
    e.run([_grad_of(3)[0]])
    e.run([_grad_of(6)[0]])  # evicts 1 (3 was used after it)
    assert _cached_buckets(e) == {3, 4, 6}
    assert e.stats.evictions == 2


def test_an_evicted_variant_compiles_again_and_computes_correctly():
    e = sc.Engine(min_bucket=1, max_variants=1)
    j2, want2 = _grad_of(2, alpha=0.75)
    j3, want3 = _grad_of(3, alpha=2.0)
    e.run([j2])
    e.run([j3])
    assert not e.is_compiled([j2]) and e.is_compiled([j3])
    (out,) = e.run([j2])
    np.testing.assert_allclose(out, want2, rtol=2e-6, atol=1e-6)
    (out,) = e.run([j3])
    np.testing.assert_allclose(out, want3, rtol=2e-6, atol=1e-6)
    assert e.stats.compilations == 4 and e.stats.evictions == 3


def test_eviction_lowers_the_variant_count_of_its_own_group():
    e = sc.Engine(min_bucket=1, max_variants=2)
    e.run([_grad_of(1)[0]])
    e.run([_grad_of(2)[0]])
    assert e.variants() == {"grad/piecewise_quadratic/float32": 2}
    e.run([sc.make_job("grad", [0.25], dtype="float64")])
    assert e.variants() == {"grad/piecewise_quadratic/float32": 1, "grad/piecewise_quadratic/float64": 1}
    e.run([sc.make_job("spike", [0.25], dtype="float64")])
    assert e.variants() == {"grad/piecewise_quadratic/float64": 1, "spike/*/float64": 1}


def test_max_variants_none_is_unbounded_and_zero_is_refused():
    e = sc.Engine(min_bucket=1, max_variants=None)
    for n in (1, 2, 3, 4, 6):
        e.run([_grad_of(n)[0]])
    assert e.stats.evictions == 0 and _cached_buckets(e) == {1, 2, 3, 4, 6}
    with pytest.raises(ValueError):
        sc.Engine(max_variants=0)


def test_is_compiled_follows_the_plan_of_run():
    e = sc.Engine(min_bucket=4)
    a = sc.make_job("grad", np.zeros(3, np.float32), params={"alpha": 2.0})
    b = sc.make_job("grad", np.zeros(2, np.float32), params={"alpha": 2.0})
    c = sc.make_job("grad", np.zeros(2, np.float32), params={"alpha": 3.0})
    assert e.is_compiled([]) and e.is_compiled([sc.make_job("grad", np.zeros((2, 0), np.float32))])
    assert not e.is_compiled([a])
    e.run([a])
    assert e.is_compiled([a]) and e.is_compiled([b])  # same bucket (4), same scalar layout
    assert not e.is_compiled([a, b])  # 5 elements together: bucket 8
    assert not e.is_compiled([b, c])  # two alphas: the elementwise layout
    assert not e.is_compiled([sc.make_job("grad", np.zeros(3), dtype="float64")])
    assert not e.is_compiled([a, sc.make_job("spike", np.zeros(3, np.float32))])  # one group is cold
    assert e.stats.compilations == 1  # asking compiled nothing


def test_compile_prepares_exactly_what_run_needs():
    e = sc.Engine(min_bucket=4)
    jobs = [
        sc.make_job("grad", np.linspace(-1, 1, 3).astype(np.float32), params={"alpha": 2.0}),
        sc.make_job("grad", np.linspace(-1, 1, 2).astype(np.float32), params={"alpha": 3.0}),
        sc.make_job("spike", np.zeros(3, np.float32)),
    ]
    assert e.compile(jobs) == 2 and e.is_compiled(jobs)
    assert e.stats.device_calls == 0
    assert e.compile(jobs) == 0
    outs = e.run(jobs)
    assert e.stats.compilations == 2 and e.stats.device_calls == 2
    np.testing.assert_allclose(outs[1], ref.pq_grad(jobs[1].x, np.float32(3.0)), rtol=2e-6, atol=1e-5)


def test_concurrent_runs_with_a_small_cache_stay_correct():
    from concurrent.futures import ThreadPoolExecutor

    e = sc.Engine(min_bucket=1, max_variants=2)
    cases = [_grad_of(n, alpha=a) for n in (1, 2, 3, 4, 6) for a in (0.5, 2.0)] * 3

    def one(case):
        j, want = case
        (out,) = e.run([j])
        return np.allclose(out, want, rtol=2e-6, atol=1e-5)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, cases))
    assert sum(e.variants().values()) <= 2
    assert sum(e.variants().values()) == len(_cached_buckets(e))


def test_compilations_log_at_debug_only(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="surrogate_core.engine"):
        sc.Engine(min_bucket=1).run([_grad_of(5)[0]])
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="surrogate_core.engine"):
        sc.Engine(min_bucket=1).run([_grad_of(5)[0]])
    assert any("compiled grad/piecewise_quadratic/float32 bucket=6" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("n", [1 << 20, 1_000_000, 1 << 18])
def test_a_run_keeps_none_of_its_inputs(n):
    """Once ``run`` returns and its caller lets go, nothing holds the input: not the engine's plan of
    the last jobs, nor JAX, which keeps the arguments of its last call (a view of the input itself
    when it fills its bucket: 2^20, 2^18; the padded copy otherwise)."""
    import gc
    import weakref

    eng = sc.Engine()

    def once() -> weakref.ref:
        x = np.linspace(-1.5, 1.5, n, dtype=np.float32)
        jobs = [sc.make_job("grad", x, dtype="float32", params={"alpha": 1.0})]
        assert eng.is_compiled(jobs) in (True, False)  # plans (and so may keep) the jobs
        (g,) = eng.run(jobs)
        np.testing.assert_allclose(g, np.where(np.abs(x) <= 1, 1 - np.abs(x), 0), atol=1e-6)
        return weakref.ref(x)

    once()  # compiled
    once()  # (JAX's first call of a fresh executable keeps its arguments once, in a cycle)
    gc.disable()
    try:
        assert [once()() is None for _ in range(3)] == [True] * 3
    finally:
        gc.enable()
