"""Against a real server of its own: tritonclient's ``get_inference_statistics`` reads the per-model
statistics, with exact counts after known requests over /v2 (tritonclient) and /v1 (httpx)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from liveserver import running_server

import surrogate_core as sc

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.e2e
MODEL = "piecewise_quadratic"
PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


def make_input(name, a):
    t = httpclient.InferInput(name, list(a.shape), "FP32")
    t.set_data_from_numpy(a, binary_data=True)
    return t


def test_tritonclient_reads_the_statistics_of_known_requests():
    with running_server() as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        triton = httpclient.InferenceServerClient(url=base.removeprefix("http://"))
        try:
            (fresh,) = triton.get_inference_statistics(MODEL)["model_stats"]
            assert fresh["name"] == MODEL
            assert fresh["version"] == "1"
            assert fresh["inference_count"] == fresh["execution_count"] == fresh["last_inference"] == 0
            assert {k: v["count"] for k, v in fresh["inference_stats"].items()} == dict.fromkeys(
                ("success", "fail", *PARTS, "cache_hit", "cache_miss"), 0)

            x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)
            started = time.time_ns() // 1_000_000
            for alpha in (1.0, 2.0, 4.0):
                r = triton.infer(MODEL, [make_input("x", x)], parameters={"alpha": alpha})
                assert r.as_numpy("spike").tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
            with pytest.raises(InferenceServerException, match="'alpha'"):
                triton.infer(MODEL, [make_input("x", x)], parameters={"alpha": -1.0})
            assert http.post("/v1/grad", json=[{"x": [0.5], "surrogate": MODEL},
                                               {"x": [1.0], "surrogate": MODEL}]).status_code == 200
            ended = time.time_ns() // 1_000_000

            got = triton.get_inference_statistics(MODEL)
            assert got == triton.get_inference_statistics(MODEL, "1")
            (entry,) = got["model_stats"]
            s = entry["inference_stats"]
            assert s["success"]["count"] == 4  # 3 /v2 requests and the /v1 list
            assert s["fail"]["count"] == 1
            assert s["fail"]["ns"] > 0
            assert entry["inference_count"] == 5  # 3 /v2 requests, 2 /v1 jobs
            assert entry["execution_count"] == 4  # one engine call each (sent one after the other)
            assert [s[k]["count"] for k in PARTS] == [4] * 4
            assert sum(s[k]["ns"] for k in PARTS) == s["success"]["ns"] > 0
            assert started - 5 <= entry["last_inference"] <= ended + 5

            everything = triton.get_inference_statistics()["model_stats"]
            assert sorted(m["name"] for m in everything) == sorted(sc.names())
            assert [m for m in everything if m["name"] == MODEL] == [entry]
            assert all(m["inference_count"] == 0 for m in everything if m["name"] != MODEL)
            with pytest.raises(InferenceServerException, match="unknown model 'sigmoud'"):
                triton.get_inference_statistics("sigmoud")
            with pytest.raises(InferenceServerException, match="no version '2'"):
                triton.get_inference_statistics(MODEL, "2")
            assert "statistics" in triton.get_server_metadata()["extensions"]
        finally:
            triton.close()
