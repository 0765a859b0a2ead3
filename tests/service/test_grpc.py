"""The Open Inference Protocol over gRPC, in process: the app's lifespan serves
``inference.GRPCInferenceService`` on a loopback port in its own event loop; every RPC, raw and
typed contents in every datatype, parameters as KServe and Triton send them, outputs aligned by
position, and every error as a gRPC status with the message ``/v2`` gives for the same request."""

from __future__ import annotations

import grpc
import grpc.aio
import ml_dtypes
import numpy as np
import pytest
from helpers import WIRE, App, body, tensor
from liveserver import free_port
from reference import pq_grad, spike
from tritonclient.grpc import service_pb2 as pb

pytestmark = pytest.mark.anyio
SERVICE = "/inference.GRPCInferenceService/"
INFER = "/v2/models/piecewise_quadratic/infer"
DTYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}
#: multiples of 1/8 in [-2, 2]: with alpha 2 the gradient 2 - 4|x| is exact in every datatype
X8 = np.arange(-16, 17) / 8


class Grpc:
    """Raw calls on a channel: ``await g.call("ModelInfer", request)`` -> the response message."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def call(self, method: str, request, response_type=None, metadata=None, timeout=30):
        rtype = response_type or getattr(pb, method + "Response")
        call = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=rtype.FromString,
        )
        return await call(request, metadata=metadata or self.metadata, timeout=timeout)

    async def infer(self, request, **kw):
        return await self.call("ModelInfer", request, **kw)


@pytest.fixture
async def served():
    port = free_port()
    async with App(grpc_port=port) as a:
        g = Grpc(port)
        yield a, g
        await g.channel.close()


def infer_request(model="piecewise_quadratic", inputs=(), params=None, outputs=None, raw=True, **kw):
    """A ModelInferRequest of ``inputs`` ((name, array, datatype) triples), raw or typed contents."""
    req = pb.ModelInferRequest(model_name=model, **kw)
    for name, a, datatype in inputs:
        a = np.asarray(a)
        t = req.inputs.add(name=name, datatype=datatype, shape=a.shape)
        if raw:
            req.raw_input_contents.append(raw_bytes(a, datatype))
        elif datatype == "FP64":
            t.contents.fp64_contents.extend(a.ravel().tolist())
        else:
            t.contents.fp32_contents.extend(a.ravel().tolist())
    for k, v in (params or {}).items():
        set_param(req.parameters[k], v)
    for o in outputs or ():
        name, binary = (o, None) if isinstance(o, str) else o
        out = req.outputs.add(name=name)
        if binary is not None:
            out.parameters["binary_data"].bool_param = binary
    return req


def raw_bytes(a, datatype) -> bytes:
    return np.ascontiguousarray(a, WIRE.get(datatype, a.dtype.newbyteorder("<"))).tobytes()


def set_param(p, v):
    """An ``InferParameter`` of the field KServe's and tritonclient's clients use for ``v`` (the codec's own mapping)."""
    from service.protocols.grpc.codec import set_parameter

    set_parameter(p, v)


def raw_outputs(resp) -> dict[str, np.ndarray]:
    """tritonclient's reading: an output's data is raw_output_contents at the output's position."""
    out = {}
    for i, t in enumerate(resp.outputs):
        dt = np.dtype(WIRE[t.datatype])
        if t.HasField("contents"):
            values = t.contents.fp64_contents if t.datatype == "FP64" else t.contents.fp32_contents
            out[t.name] = np.array(values, dt).reshape(tuple(t.shape))
        else:
            out[t.name] = np.frombuffer(resp.raw_output_contents[i], dt).reshape(tuple(t.shape))
    return out


async def status_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code(), info.value.details()


# -- health, metadata, repository -------------------------------------------------------------------

async def test_health_metadata_and_repository(served):
    a, g = served
    assert (await g.call("ServerLive", pb.ServerLiveRequest())).live
    assert (await g.call("ServerReady", pb.ServerReadyRequest())).ready
    assert (await g.call("ModelReady", pb.ModelReadyRequest(name="sigmoid", version="1"))).ready
    meta = await g.call("ServerMetadata", pb.ServerMetadataRequest())
    assert meta.name == "surrogate-serve"
    assert "model_repository" in meta.extensions
    model = await g.call("ModelMetadata", pb.ModelMetadataRequest(name="piecewise_quadratic"))
    rest = (await a.client.get("/v2/models/piecewise_quadratic")).json()
    assert model.name == rest["name"]
    assert list(model.versions) == rest["versions"]
    assert model.platform == "jax"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in rest["inputs"]]
    assert [t.name for t in model.outputs] == ["spike", "grad", "fun", "vjp"]
    index = await g.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
    rest_index = (await a.client.post("/v2/repository/index")).json()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (m["name"], m["version"], m["state"]) for m in rest_index]


async def test_not_ready_while_warming_up(served):
    a, g = served
    a.rt.ready.clear()
    assert not (await g.call("ServerReady", pb.ServerReadyRequest())).ready
    assert not (await g.call("ModelReady", pb.ModelReadyRequest(name="sigmoid"))).ready
    assert not (await g.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))).models
    states = {m.state for m in (await g.call("RepositoryIndex", pb.RepositoryIndexRequest())).models}
    assert states == {"UNAVAILABLE"}


# -- infer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("datatype", list(DTYPES))
async def test_raw_contents_in_every_datatype(served, datatype):
    _, g = served
    x = X8.astype(DTYPES[datatype])
    resp = await g.infer(infer_request(inputs=[("x", x, datatype)], params={"alpha": 2.0}, id="r-1"))
    assert resp.model_name == "piecewise_quadratic"
    assert resp.model_version == "1"
    assert resp.id == "r-1"
    assert [o.name for o in resp.outputs] == ["spike", "grad", "fun"]
    assert len(resp.raw_output_contents) == 3
    out = raw_outputs(resp)
    for name in ("spike", "grad"):
        assert resp.outputs[[o.name for o in resp.outputs].index(name)].datatype == datatype
        assert out[name].dtype == np.dtype(WIRE[datatype])
        assert out[name].shape == x.shape
    assert np.array_equal(out["spike"], spike(X8))
    assert np.array_equal(out["grad"].astype(np.float64), pq_grad(X8, 2.0))


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
async def test_typed_contents_both_ways(served, datatype):
    _, g = served
    x = np.linspace(-2, 2, 41).astype(DTYPES[datatype])
    resp = await g.infer(infer_request(inputs=[("x", x, datatype)], params={"alpha": 1.5}, raw=False,
                                       outputs=[("grad", False), ("spike", False)]))
    assert not resp.raw_output_contents  # typed outputs only: no raw entry at all
    field = "fp64_contents" if datatype == "FP64" else "fp32_contents"
    grad = np.array(getattr(resp.outputs[0].contents, field), DTYPES[datatype])
    np.testing.assert_allclose(grad, pq_grad(x, 1.5).astype(DTYPES[datatype]),
                               rtol=1e-6 if datatype == "FP32" else 1e-12)
    assert np.array_equal(np.array(getattr(resp.outputs[1].contents, field)), spike(x.astype(np.float64)))


async def test_raw_entries_stay_aligned_with_typed_outputs_between(served):
    _, g = served
    x = np.linspace(-2, 2, 9).astype(np.float32)
    resp = await g.infer(infer_request(inputs=[("x", x, "FP32")], outputs=["spike", ("grad", False), "fun"]))
    assert [o.name for o in resp.outputs] == ["spike", "grad", "fun"]
    assert [len(r) for r in resp.raw_output_contents] == [36, 0, 36]
    out = raw_outputs(resp)
    assert np.array_equal(out["spike"], spike(x))
    np.testing.assert_allclose(out["grad"], pq_grad(x, 1.0), rtol=1e-6)
    assert np.array(resp.outputs[1].contents.fp32_contents).size == 9


@pytest.mark.parametrize("alpha", [2, 2.0, "2", "2.0", " 2e0 "])
async def test_alpha_as_int64_double_or_string(served, alpha):
    """KServe's client sends alpha=2 as int64_param; numbers as strings count as numbers too."""
    _, g = served
    resp = await g.infer(infer_request(inputs=[("x", X8, "FP32")], params={"alpha": alpha}, outputs=["grad"]))
    assert np.array_equal(raw_outputs(resp)["grad"], pq_grad(X8, 2.0).astype(np.float32))


async def test_alpha_broadcast_and_vjp_as_tensors(served):
    _, g = served
    x = np.linspace(-2, 2, 17).astype(np.float32)
    alpha = np.array([[0.5], [2.0]], np.float32)
    ct = np.full((2, 17), 3.0, np.float32)
    resp = await g.infer(infer_request(inputs=[("x", x, "FP32"), ("alpha", alpha, "FP32"), ("cotangent", ct, "FP32")],
                                       outputs=["grad", "vjp"]))
    out = raw_outputs(resp)
    np.testing.assert_allclose(out["grad"], pq_grad(x, alpha), rtol=1e-6)
    np.testing.assert_allclose(out["vjp"], 3.0 * pq_grad(x, alpha), rtol=1e-6)


async def test_the_same_answer_as_v2_http(served):
    a, g = served
    x = np.random.default_rng(4).uniform(-3, 3, (3, 7))
    resp = await g.infer(infer_request(model="sigmoid", inputs=[("x", x, "FP64")], params={"alpha": 4.0}))
    t, raw = tensor("x", x, "FP64", binary=True)
    b, headers = body({"inputs": [t], "parameters": {"alpha": 4.0, "binary_data_output": True}}, [raw])
    r = await a.client.post("/v2/models/sigmoid/infer", content=b, headers=headers)
    n = int(r.headers["inference-header-content-length"])
    rest = r.content[n:]
    assert b"".join(resp.raw_output_contents) == rest


async def test_an_empty_tensor_needs_no_contents(served):
    _, g = served
    req = pb.ModelInferRequest(model_name="piecewise_quadratic")
    req.inputs.add(name="x", datatype="FP32", shape=[0, 3])
    resp = await g.infer(req)
    assert [list(o.shape) for o in resp.outputs] == [[0, 3]] * 3


# -- errors: a gRPC status with /v2's message ---------------------------------------------------------

def both(inputs, params=None, outputs=None, model="piecewise_quadratic", version=""):
    """The same request for gRPC (raw contents) and /v2 (binary tensors)."""
    req = infer_request(model=model, inputs=inputs, params=params, outputs=outputs, model_version=version)
    ts = [{"name": n, "datatype": d, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
          for n, a, d in inputs]
    raws = [raw_bytes(a, d) for _, a, d in inputs]
    doc = {"inputs": ts}
    if params:
        doc["parameters"] = params
    if outputs:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return req, path, body(doc, raws)


SEED = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)
ERRORS = {
    "unknown model": (grpc.StatusCode.NOT_FOUND, both([("x", SEED, "FP32")], model="sigmoud")),
    "unknown version": (grpc.StatusCode.NOT_FOUND, both([("x", SEED, "FP32")], model="sigmoid", version="7")),
    "alpha out of range": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], {"alpha": -1.0})),
    "alpha not a number": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], {"alpha": "many"})),
    "unknown parameter": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], {"alpah": 1.0})),
    "INT32": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", np.array([1, 2], np.int32), "INT32")])),
    "unknown input": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32"), ("y", SEED, "FP32")])),
    "no x": (grpc.StatusCode.INVALID_ARGUMENT, both([("alpha", SEED, "FP32")])),
    "vjp without cotangent": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], outputs=["vjp"])),
    "unknown output": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], outputs=["gard"])),
    "rank 9": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED.reshape((1,) * 8 + (5,)), "FP32")])),
    "no fun": (grpc.StatusCode.INVALID_ARGUMENT, both([("x", SEED, "FP32")], model="relu_grad", outputs=["fun"])),
}


@pytest.mark.parametrize("case", list(ERRORS))
async def test_errors_are_statuses_with_the_v2_message(served, case):
    a, g = served
    code, (req, path, (b, headers)) = ERRORS[case]
    r = await a.client.post(path, content=b, headers=headers)
    assert r.status_code in (400, 404)
    got = await status_of(g.infer(req))
    assert got == (code, r.json()["error"])


async def test_raw_contents_of_the_wrong_size(served):
    """The size of a raw entry is checked as /v2 checks binary_data_size, with its message."""
    a, g = served
    req = pb.ModelInferRequest(model_name="sigmoid")
    req.inputs.add(name="x", datatype="FP32", shape=[4])
    req.raw_input_contents.append(b"\0" * 12)
    b, headers = body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4],
                                   "parameters": {"binary_data_size": 12}}]}, [b"\0" * 12])
    r = await a.client.post("/v2/models/sigmoid/infer", content=b, headers=headers)
    assert await status_of(g.infer(req)) == (grpc.StatusCode.INVALID_ARGUMENT, r.json()["error"])
    assert "binary_data_size 12 does not match shape [4] of FP32 (16 bytes)" in r.json()["error"]


async def test_grpc_only_mistakes(served):
    _, g = served

    def req(*inputs, raws=(), typed=None):
        m = pb.ModelInferRequest(model_name="sigmoid")
        for name, dt, shape in inputs:
            m.inputs.add(name=name, datatype=dt, shape=shape)
        m.raw_input_contents.extend(raws)
        if typed:
            getattr(m.inputs[0].contents, typed[0]).extend(typed[1])
        return m

    cases = [
        (req(("x", "FP32", [2]), raws=[b"\0" * 8, b"\0" * 8]),
         "the request has 2 raw_input_contents for 1 inputs that take raw contents "
         "(inputs in shared memory take none)"),
        (req(("x", "FP32", [2])), "input 'x': has neither contents nor raw_input_contents"),
        (req(("x", "FP32", [2]), typed=("fp64_contents", [1.0, 2.0])),
         "input 'x': FP32 typed contents go in fp32_contents, got fp64_contents"),
        (req(("x", "FP16", [2]), typed=("fp32_contents", [1.0, 2.0])),
         "input 'x': FP16 tensors travel only as raw_input_contents (the protocol has no typed contents for them)"),
        (req(("x", "FP32", [3]), typed=("fp32_contents", [1.0, 2.0])),
         "input 'x': contents hold 2 values, shape [3] needs 3"),
        (req(("x", "FP32", [2]), raws=[b"\0" * 8], typed=("fp32_contents", [1.0, 2.0])),
         "input 'x': has typed contents while the request has raw_input_contents; send one or the other"),
        (b"\xff\xff\xff", "the request is not a valid ModelInferRequest message"),
    ]
    for message, words in cases:
        assert await status_of(g.infer(message)) == (grpc.StatusCode.INVALID_ARGUMENT, words)
    x = np.array([1.0], ml_dtypes.bfloat16)
    typed_bf16 = infer_request(model="sigmoid", inputs=[("x", x, "BF16")], outputs=[("grad", False)])
    assert await status_of(g.infer(typed_bf16)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "output 'grad': BF16 tensors travel only as raw_output_contents (the "
        "protocol has no typed contents for them); leave parameters.binary_data unset")


async def test_errors_of_the_other_rpcs(served):
    a, g = served
    r = await a.client.get("/v2/models/sigmoud")
    assert await status_of(g.call("ModelMetadata", pb.ModelMetadataRequest(name="sigmoud"))) == (
        grpc.StatusCode.NOT_FOUND, r.json()["error"])
    r = await a.client.get("/v2/models/sigmoid/versions/2/ready")
    assert await status_of(g.call("ModelReady", pb.ModelReadyRequest(name="sigmoid", version="2"))) == (
        grpc.StatusCode.NOT_FOUND, r.json()["error"])


async def test_overloaded_is_unavailable_with_the_v2_message():
    port = free_port()
    async with App(grpc_port=port, max_concurrent=1) as a:
        g = Grpc(port)
        req, path, (b, headers) = both([("x", SEED, "FP32")])
        with a.rt.dataplane.admission():  # the one slot, held
            r = await a.client.post(path, content=b, headers=headers)
            assert r.status_code == 503
            assert await status_of(g.infer(req)) == (grpc.StatusCode.UNAVAILABLE, r.json()["error"])
        assert raw_outputs(await g.infer(req))["spike"].tolist() == [0, 0, 1, 1, 1]
        await g.channel.close()


async def test_memory_budget_in_use_is_unavailable_and_too_large_is_resource_exhausted():
    port = free_port()
    async with App(grpc_port=port, memory_budget=1 << 20) as a:
        g = Grpc(port)
        budget = a.rt.dataplane.budget
        assert budget.try_acquire(budget.capacity)  # the whole budget in use by others
        try:
            code, message = await status_of(g.infer(infer_request(inputs=[("x", SEED, "FP32")])))
        finally:
            budget.release(budget.capacity)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert message.startswith(f"the memory budget is in use by requests in flight ({budget.capacity} of "
                                  f"{budget.capacity} bytes; this request needs ")
        big = np.zeros(200_000, np.float32)  # 800 kB: the body and what decoding makes pass the 1 MiB budget
        code, message = await status_of(g.infer(infer_request(inputs=[("x", big, "FP32")])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the server's whole memory budget of 1048576 bytes (SURROGATE_MEMORY_BUDGET)" in message
        assert budget.in_use == 0
        await g.channel.close()


async def test_the_token_in_metadata():
    port = free_port()
    token = "t" * 24
    async with App(grpc_port=port, api_token=token) as a:
        anon, good, bad = Grpc(port), Grpc(port, token), Grpc(port, "u" * 24)
        req = infer_request(inputs=[("x", SEED, "FP32")])
        r = await a.client.post(INFER, content=req.SerializeToString())
        assert r.status_code == 401
        for g in (anon, bad):
            for method, request in [("ModelInfer", req), ("ServerMetadata", pb.ServerMetadataRequest()),
                                    ("ModelReady", pb.ModelReadyRequest(name="sigmoid")),
                                    ("RepositoryIndex", pb.RepositoryIndexRequest())]:
                assert await status_of(g.call(method, request)) == (grpc.StatusCode.UNAUTHENTICATED, r.json()["error"])
        # the probes stay open, as /v2/health/* do
        assert (await anon.call("ServerLive", pb.ServerLiveRequest())).live
        assert (await anon.call("ServerReady", pb.ServerReadyRequest())).ready
        assert raw_outputs(await good.infer(req))["spike"].tolist() == [0, 0, 1, 1, 1]
        for g in (anon, good, bad):
            await g.channel.close()


async def test_shared_memory_rpcs_when_it_is_off(served):
    a, g = served
    assert getattr(a.rt, "shm", None) is None  # off unless SURROGATE_SHARED_MEMORY=true
    message = ("system shared memory is off on this server (start it with SURROGATE_SHARED_MEMORY=true to use "
               "shared-memory regions)")
    for method, request in [
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
        ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=64)),
        ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest()),
    ]:
        assert await status_of(g.call(method, request)) == (grpc.StatusCode.UNIMPLEMENTED, message)
    meta = await g.call("ServerMetadata", pb.ServerMetadataRequest())
    assert "system_shared_memory" not in meta.extensions


async def test_unserved_rpcs_are_unimplemented(served):
    _, g = served
    code, _ = await status_of(g.call("ModelConfig", pb.ModelConfigRequest(name="sigmoid")))
    assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_metrics_count_grpc_calls(served):
    a, g = served
    await g.infer(infer_request(inputs=[("x", SEED, "FP32")], outputs=["grad"]))
    await status_of(g.infer(infer_request(model="sigmoud", inputs=[("x", SEED, "FP32")])))
    text = (await a.client.get("/metrics")).text
    label = 'endpoint="/inference.GRPCInferenceService/ModelInfer",protocol="grpc"'
    assert f'surrogate_requests_total{{{label},status="200"}} 1.0' in text
    assert f'surrogate_requests_total{{{label},status="404"}} 1.0' in text
    assert 'surrogate_elements_total{endpoint="infer"} 5.0' in text


async def test_statistics_as_v2_http_answers_them(served):
    pytest.importorskip("service.dataplane.stats", reason="the statistics extension is not on this branch")
    from google.protobuf import json_format

    a, g = served
    await g.infer(infer_request(inputs=[("x", SEED, "FP32")], outputs=["grad"]))
    resp = await g.call("ModelStatistics", pb.ModelStatisticsRequest(name="piecewise_quadratic", version="1"))
    rest = (await a.client.get("/v2/models/piecewise_quadratic/versions/1/stats")).json()
    got = json_format.MessageToDict(resp, preserving_proto_field_name=True)
    names = [m["name"] for m in got["model_stats"]]
    assert names == [m["name"] for m in rest["model_stats"]] == ["piecewise_quadratic"]
    assert int(got["model_stats"][0]["inference_stats"]["success"]["count"]) == 1
    assert int(got["model_stats"][0]["inference_count"]) == rest["model_stats"][0]["inference_count"]
    r = await a.client.get("/v2/models/sigmoud/stats")
    assert await status_of(g.call("ModelStatistics", pb.ModelStatisticsRequest(name="sigmoud"))) == (
        grpc.StatusCode.NOT_FOUND, r.json()["error"])


async def test_shutting_down_refuses_new_calls_and_reports_not_ready(served):
    from service.server import lifecycle

    _, g = served
    lifecycle.begin_shutdown()
    try:
        assert await status_of(g.infer(infer_request(inputs=[("x", SEED, "FP32")]))) == (
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another instance")
        assert not (await g.call("ServerReady", pb.ServerReadyRequest())).ready
        assert (await g.call("ServerLive", pb.ServerLiveRequest())).live
    finally:
        lifecycle.reset()
    assert raw_outputs(await g.infer(infer_request(inputs=[("x", SEED, "FP32")])))["spike"].tolist() == [0, 0, 1, 1, 1]


def slowed(batcher, seconds: float, started=None):
    """Make ``batcher`` wait ``seconds`` before each submission (setting ``started`` first); returns
    its own ``submit``, to put back."""
    import asyncio

    submit = batcher.submit

    async def slow(*args, **kw):
        if started is not None:
            started.set()
        await asyncio.sleep(seconds)
        return await submit(*args, **kw)

    batcher.submit = slow
    return submit


async def test_past_the_request_timeout_is_deadline_exceeded_with_the_v2_message():

    port = free_port()
    async with App(grpc_port=port, request_timeout=0.2) as a:
        g = Grpc(port)
        batcher = a.rt.dataplane.batcher
        submit = slowed(batcher, 5)
        req, path, (b, headers) = both([("x", SEED, "FP32")])
        r = await a.client.post(path, content=b, headers=headers)
        assert r.status_code == 503
        assert await status_of(g.infer(req)) == (grpc.StatusCode.DEADLINE_EXCEEDED, r.json()["error"])
        assert r.json()["error"] == "the request took longer than 0.2 s"
        batcher.submit = submit
        assert a.rt.dataplane.in_flight == 0
        await g.channel.close()


async def test_the_graceful_stop_lets_a_call_in_progress_finish():
    """The lifespan's end stops taking calls and lets those in progress finish."""
    import asyncio

    port = free_port()
    a = App(grpc_port=port)
    await a.__aenter__()
    g = Grpc(port)
    batcher = a.rt.dataplane.batcher
    started = asyncio.Event()
    slowed(batcher, 0.5, started)
    call = asyncio.ensure_future(g.infer(infer_request(inputs=[("x", SEED, "FP32")])))
    await started.wait()
    await a.__aexit__(None, None, None)  # waits for the call in progress
    assert raw_outputs(await call)["spike"].tolist() == [0, 0, 1, 1, 1]
    code, _ = await status_of(g.call("ServerLive", pb.ServerLiveRequest()))
    assert code == grpc.StatusCode.UNAVAILABLE  # the port is closed
    await g.channel.close()


async def test_a_call_whose_client_gives_up_is_counted_as_499_and_lets_go_of_everything(served):
    import asyncio

    a, g = served
    batcher = a.rt.dataplane.batcher
    submit = slowed(batcher, 2)
    code, _ = await status_of(g.infer(infer_request(inputs=[("x", SEED, "FP32")]), timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own deadline
    for _ in range(100):  # the server's call is cancelled when the client's deadline passes
        if a.rt.dataplane.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    batcher.submit = submit
    assert a.rt.dataplane.in_flight == 0
    assert a.rt.dataplane.budget.in_use == 0
    text = (await a.client.get("/metrics")).text
    assert ('surrogate_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",protocol="grpc",'
            'status="499"} 1.0') in text
    assert 'surrogate_rejections_total{reason="client_disconnect"} 1.0' in text
