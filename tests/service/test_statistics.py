"""Per-model statistics (Triton's statistics extension), in process: exact counts after known
requests (successes, failures by kind, requests that name no model), the durations' parts adding up
to the total and growing, executions against the batcher's own count of engine calls, the routes'
answers and errors, and the JSON read by the gRPC message it is converted into."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import orjson
import pytest
from helpers import App, npy

import surrogate_core as sc

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def v2(x, **req):
    return orjson.dumps({"inputs": [{"name": "x", "shape": [len(x)], "datatype": "FP32", "data": x}], **req})


async def stats(a, model):
    r = await a.client.get(f"/v2/models/{model}/stats")
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    return entry


def counts(entry):
    s = entry["inference_stats"]
    return {"success": s["success"]["count"], "fail": s["fail"]["count"], "inferences": entry["inference_count"],
            "executions": entry["execution_count"]}


async def test_exact_counts_after_known_requests():
    async with App(max_elements=1000, api_token="a-secret-of-16-chars") as a:
        auth = {"authorization": "Bearer a-secret-of-16-chars"}
        for name in ("sigmoid", "arctan", "erf"):
            assert counts(await stats_auth(a, name, auth)) == {"success": 0, "fail": 0, "inferences": 0,
                                                               "executions": 0}
        # 3 successes on sigmoid over /v2 (one with every output: still one inference)
        for req in ({}, {"outputs": [{"name": "grad"}]}, {"outputs": [{"name": "spike"}, {"name": "grad"}]}):
            r = await a.client.post("/v2/models/sigmoid/infer", content=v2([0.5, -1.0], **req), headers=auth)
            assert r.status_code == 200
        # /v1: one job on sigmoid, then a list of 2 sigmoid jobs and 1 arctan job (one engine call)
        r = await a.client.post("/v1/grad", json={"x": [1.0], "surrogate": "sigmoid"}, headers=auth)
        assert r.status_code == 200
        jobs = [{"x": [1.0], "surrogate": "sigmoid"}, {"x": [2.0], "surrogate": "sigmoid"},
                {"x": [0.5], "surrogate": "arctan"}]
        r = await a.client.post("/v1/grad", json=jobs, headers=auth)
        assert r.status_code == 200
        # failures of a known model: a bad /v2 input (decoding), a /v1 job over the element limit
        r = await a.client.post("/v2/models/sigmoid/infer", content=v2([0.5], parameters={"alpha": -1}), headers=auth)
        assert r.status_code == 400
        r = await a.client.post("/v1/grad", json={"x": [0.0] * 1001, "surrogate": "arctan"}, headers=auth)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "too_large"
        # a device failure
        real = a.rt.engine.run

        def broken(jobs):
            raise RuntimeError("the device is gone")

        a.rt.engine.run = broken
        r = await a.client.post("/v2/models/arctan/infer", content=v2([1.0]), headers=auth)
        assert r.status_code == 500
        a.rt.engine.run = real
        # no model known, or refused before the data plane: counted nowhere
        before = (await a.client.get("/v2/models/stats", headers=auth)).json()
        assert (await a.client.post("/v2/models/sigmoud/infer", content=v2([1.0]), headers=auth)).status_code == 404
        assert (await a.client.post("/v1/grad", content=b"{nope", headers={**JSON, **auth})).status_code == 400
        assert (await a.client.post("/v2/models/sigmoid/infer", content=v2([1.0]))).status_code == 401
        assert (await a.client.get("/v2/models/stats", headers=auth)).json() == before
        # the statistics need the token, as the other metadata does
        assert (await a.client.get("/v2/models/stats")).status_code == 401
        assert (await a.client.get("/v2/models/sigmoid/stats")).status_code == 401

        sig, arc = await stats_auth(a, "sigmoid", auth), await stats_auth(a, "arctan", auth)
        # sigmoid: 3 /v2 + 2 /v1 requests; inferences 3 + 1 + 2 jobs; executions: 4 lone calls and the list's
        assert counts(sig) == {"success": 5, "fail": 1, "inferences": 6, "executions": 5}
        # arctan: the list (1 job, in the same engine call as sigmoid's), 2 failures
        assert counts(arc) == {"success": 1, "fail": 2, "inferences": 1, "executions": 1}
        assert counts(await stats_auth(a, "erf", auth)) == {"success": 0, "fail": 0, "inferences": 0,
                                                                 "executions": 0}
        assert a.rt.batcher.stats.batches == 5  # the engine calls: 4 sigmoid alone, 1 with both
        for entry in (sig, arc):
            s = entry["inference_stats"]
            assert [s[k]["count"] for k in ("queue", "compute_input", "compute_infer", "compute_output")] == \
                [s["success"]["count"]] * 4
            assert s["cache_hit"] == s["cache_miss"] == {"count": 0, "ns": 0}
            assert s["fail"]["ns"] > 0
            assert entry["batch_stats"] == []


async def test_a_request_past_its_time_limit_or_refused_for_memory_is_a_failure_of_its_model():
    async with App(request_timeout=0.2, offload_elements=0, memory_budget=1 << 20) as a:
        real = a.rt.engine.run

        def slow(jobs):  # in a worker thread (offload_elements=0): the deadline cancels the request meanwhile
            time.sleep(0.6)
            return real(jobs)

        a.rt.engine.run = slow
        r = await a.client.post("/v2/models/soft_sign/infer", content=v2([1.0]))
        assert r.status_code == 503
        assert "longer than 0.2 s" in r.json()["error"]
        for _ in range(200):  # the device call goes on in its thread: it ran, and counts as an execution
            if a.rt.batcher.stats.batches:
                break
            await asyncio.sleep(0.05)
        a.rt.engine.run = real
        assert a.budget.try_acquire(a.budget.capacity - 1000)  # the budget is in use by others
        r = await a.client.post("/v2/models/soft_sign/infer", content=v2([1.0] * 100))
        assert r.status_code == 503
        assert "memory budget" in r.json()["error"]
        entry = await stats(a, "soft_sign")
        assert counts(entry) == {"success": 0, "fail": 2, "inferences": 0, "executions": 1}
        assert entry["inference_stats"]["fail"]["ns"] >= 200_000_000  # the first waited for its deadline


async def stats_auth(a, model, headers):
    r = await a.client.get(f"/v2/models/{model}/stats", headers=headers)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    return entry


async def test_the_parts_add_up_to_the_total_and_the_device_call_is_compute_infer():
    async with App() as a:
        real = a.rt.engine.run

        def slow(jobs):  # the device call takes at least 30 ms
            time.sleep(0.03)
            return real(jobs)

        a.rt.engine.run = slow
        seen, walls = [], []
        for k in range(3):
            t0 = time.perf_counter_ns()
            r = await a.client.post("/v2/models/erf/infer", content=v2([0.1 * k, 1.0]))
            walls.append(time.perf_counter_ns() - t0)
            assert r.status_code == 200
            seen.append((await stats(a, "erf"))["inference_stats"])
        for s in seen:
            parts = sum(s[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
            assert parts == s["success"]["ns"]
        # each request's time is within what the client waited for it
        assert 30_000_000 <= seen[0]["success"]["ns"] <= walls[0]
        for (earlier, later), wall in zip(itertools.pairwise(seen), walls[1:], strict=True):
            assert 30_000_000 <= later["success"]["ns"] - earlier["success"]["ns"] <= wall
        for k, s in enumerate(seen, 1):
            assert s["compute_infer"]["ns"] >= k * 30_000_000  # each request's device call is in it
            assert s["success"]["count"] == k
        for earlier, later in itertools.pairwise(seen):  # monotone: each part grows or stays
            for key in DURATIONS:
                assert later[key]["ns"] >= earlier[key]["ns"]
            assert later["success"]["ns"] > earlier["success"]["ns"]


async def test_last_inference_is_when_the_last_success_ended():
    async with App() as a:
        assert (await stats(a, "sigmoid"))["last_inference"] == 0
        before = time.time_ns() // 1_000_000
        assert (await a.client.post("/v2/models/sigmoid/infer", content=v2([1.0]))).status_code == 200
        after = time.time_ns() // 1_000_000
        first = (await stats(a, "sigmoid"))["last_inference"]
        assert before - 5 <= first <= after + 5  # (the clocks are read differently: a few ms of slack)
        assert (await a.client.post("/v2/models/sigmoid/infer", content=v2([1.0], parameters={"alpha": 0}))
                ).status_code == 400
        assert (await stats(a, "sigmoid"))["last_inference"] == first  # a failure is not an inference


async def test_requests_fused_into_one_engine_call_are_one_execution():
    async with App(offload_elements=0) as a:  # every batch in a worker thread: the requests wait together
        x = npy(np.linspace(-1, 1, 8, dtype=np.float32))
        headers = {"content-type": "application/x-npy"}
        assert (await a.client.post("/v1/grad?surrogate=arctan", content=x, headers=headers)).status_code == 200
        calls = a.rt.batcher.stats.batches
        rs = await asyncio.gather(*(a.client.post("/v1/grad?surrogate=arctan", content=x, headers=headers)
                                    for _ in range(8)))
        assert [r.status_code for r in rs] == [200] * 8
        calls = a.rt.batcher.stats.batches - calls
        entry = await stats(a, "arctan")
        assert entry["inference_count"] == 9
        assert entry["inference_stats"]["success"]["count"] == 9
        assert entry["execution_count"] == 1 + calls
        assert calls < 8  # (the batcher fused some of them: the counts differ)


async def test_the_routes_answer_as_triton_does():
    async with App() as a:
        everything = (await a.client.get("/v2/models/stats")).json()["model_stats"]
        assert [m["name"] for m in everything] == [s.name for s in sc.all_surrogates()]
        assert all(m["version"] == "1" and m["inference_count"] == 0 for m in everything)
        one = (await a.client.get("/v2/models/sigmoid/versions/1/stats")).json()
        assert one == (await a.client.get("/v2/models/sigmoid/stats")).json()
        assert one["model_stats"] == [m for m in everything if m["name"] == "sigmoid"]
        r = await a.client.get("/v2/models/sigmoud/stats")
        assert r.status_code == 404
        assert r.json() == {"error": "unknown model 'sigmoud'; did you mean 'sigmoid'?"}
        r = await a.client.get("/v2/models/sigmoid/versions/2/stats")
        assert r.status_code == 404
        assert r.json() == {"error": "model 'sigmoid' has no version '2' (versions: 1)"}
        # the model and version are path segments only (a query names nothing)
        r = await a.client.get("/v2/models/stats?model=sigmoid&version=2")
        assert r.status_code == 200
        assert [m["name"] for m in r.json()["model_stats"]] == [m["name"] for m in everything]
        for route in ("/v2/models/stats", "/v2/models/{model}/stats", "/v2/models/{model}/versions/{version}/stats"):
            params = a.app.openapi()["paths"][route]["get"].get("parameters", [])
            assert [p["in"] for p in params] == ["path"] * route.count("{")
        assert "statistics" in (await a.client.get("/v2")).json()["extensions"]
        assert (await a.client.get("/v2/models/sigmoid")).json()["name"] == "sigmoid"  # metadata still there


async def test_snapshot_takes_empty_names_as_every_model_and_refuses_a_version_alone():
    from service.errors import ApiError

    async with App() as a:
        stats_ = a.rt.dataplane.stats
        assert stats_.snapshot("", "") == stats_.snapshot() == (await a.client.get("/v2/models/stats")).json()
        assert stats_.snapshot("sigmoid", "") == stats_.snapshot("sigmoid")
        with pytest.raises(ApiError) as info:
            stats_.snapshot(None, "1")
        assert info.value.status == 400
        assert info.value.field == "version"


async def test_the_json_is_triton_s_grpc_message():
    """What the gRPC ModelStatistics answers is this JSON read into tritonclient's message."""
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from google.protobuf import json_format

    async with App() as a:
        assert (await a.client.post("/v2/models/sigmoid/infer", content=v2([1.0]))).status_code == 200
        snap = a.rt.dataplane.stats.snapshot()
        message = json_format.ParseDict(snap, service_pb2.ModelStatisticsResponse())
        sig = next(m for m in message.model_stats if m.name == "sigmoid")
        assert sig.inference_count == 1
        assert sig.inference_stats.success.count == 1
        assert sig.version == "1"
        back = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
        assert len(back["model_stats"]) == len(snap["model_stats"])
