"""The Open Inference Protocol over gRPC against a real server (``python -m service`` with
``SURROGATE_GRPC_PORT``): NVIDIA's tritonclient.grpc, sync and asyncio, unchanged, on every RPC,
every datatype, parameters as each client sends them, and the server's errors as gRPC statuses
with the messages ``/v2`` gives; typed contents; the token in metadata; the message size limit at
its edge; several workers on one port; KServe's own ``InferenceGRPCClient`` (in the KServe peer's
environment, whose pins differ from the service's)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import ml_dtypes
import numpy as np
import pytest
from liveserver import free_port, metric, running_server
from reference import pq_grad, spike

grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as aioclient  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import surrogate_core as sc  # noqa: E402

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SEED = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)
X8 = np.arange(-16, 17) / 8  # with alpha 2 the gradient 2 - 4|x| is exact in every datatype
DTYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}
TOKEN = "grpc-token-0123456789"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with running_server(grpc_port=port, log_level="warning") as (base, _):
        yield base, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton(server):
    client = grpcclient.InferenceServerClient(server[1])
    yield client
    client.close()


def make_input(name, a, datatype):
    t = grpcclient.InferInput(name, list(a.shape), datatype)
    t.set_data_from_numpy(a)
    return t


def test_every_rpc_with_tritonclient(server, triton):
    base = server[0]
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("sigmoid")
    assert triton.is_model_ready("sigmoid", "1")
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "surrogate-serve"
    assert "model_repository" in meta["extensions"]
    model = triton.get_model_metadata("piecewise_quadratic", as_json=True)
    rest = httpx.get(f"{base}/v2/models/piecewise_quadratic").json()
    assert [t["name"] for t in model["inputs"]] == [t["name"] for t in rest["inputs"]] == ["x", "alpha", "cotangent"]
    assert [t["name"] for t in model["outputs"]] == ["spike", "grad", "fun", "vjp"]
    assert [int(d) for d in model["inputs"][0]["shape"]] == rest["inputs"][0]["shape"] == [-1] * 8
    index = triton.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in index} == set(sc.names())
    assert {m["state"] for m in index} == {"READY"}
    with pytest.raises(InferenceServerException) as info:
        triton.get_system_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "SURROGATE_SHARED_MEMORY=true" in info.value.message()


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_raw_contents(triton, datatype):
    x = X8.astype(DTYPES[datatype])
    r = triton.infer("piecewise_quadratic", [make_input("x", x, datatype)], parameters={"alpha": 2.0},
                     outputs=[grpcclient.InferRequestedOutput("spike"), grpcclient.InferRequestedOutput("grad")])
    assert r.get_output("grad").datatype == datatype
    assert r.as_numpy("grad").dtype == np.dtype(DTYPES[datatype])
    assert np.array_equal(r.as_numpy("spike").astype(np.float64), spike(X8))
    assert np.array_equal(r.as_numpy("grad").astype(np.float64), pq_grad(X8, 2.0))


@pytest.mark.parametrize("alpha", [2, 2.0, "2", "2.0"])
def test_alpha_as_int64_double_and_string(triton, alpha):
    r = triton.infer("piecewise_quadratic", [make_input("x", X8.astype(np.float32), "FP32")],
                     parameters={"alpha": alpha}, outputs=[grpcclient.InferRequestedOutput("grad")])
    assert np.array_equal(r.as_numpy("grad"), pq_grad(X8, 2.0).astype(np.float32))


def test_every_output_at_its_position_and_tensors_that_broadcast(triton):
    x = np.linspace(-2, 2, 33, dtype=np.float32)
    alpha = np.array([[0.5], [1.0], [2.0]], np.float32)
    ct = np.full((3, 33), 2.0, np.float32)
    r = triton.infer("piecewise_quadratic", [make_input("x", x, "FP32"), make_input("alpha", alpha, "FP32"),
                                             make_input("cotangent", ct, "FP32")], request_id="req-7")
    assert r.get_response().id == "req-7"
    assert [o.name for o in r.get_response().outputs] == ["spike", "grad", "fun", "vjp"]
    want = pq_grad(x, alpha)
    np.testing.assert_allclose(r.as_numpy("grad"), want, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("vjp"), 2.0 * want, rtol=1e-6)
    assert np.array_equal(r.as_numpy("spike"), np.broadcast_to(spike(x), (3, 33)))


def test_typed_contents_both_ways(server):
    with grpc.insecure_channel(server[1]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        x = np.linspace(-2, 2, 21)
        req = pb.ModelInferRequest(model_name="piecewise_quadratic")
        t = req.inputs.add(name="x", datatype="FP64", shape=[21])
        t.contents.fp64_contents.extend(x.tolist())
        req.parameters["alpha"].int64_param = 2
        out = req.outputs.add(name="grad")
        out.parameters["binary_data"].bool_param = False
        r = infer(req, timeout=30)
    assert not r.raw_output_contents
    assert r.outputs[0].datatype == "FP64"
    assert np.array_equal(np.array(r.outputs[0].contents.fp64_contents), pq_grad(x, 2.0))


def rest_error(base: str, path: str, doc: dict) -> str:
    r = httpx.post(f"{base}{path}", json=doc)
    assert r.status_code in (400, 404)
    return r.json()["error"]


@pytest.mark.parametrize(("model", "params", "outputs", "status"), [
    ("sigmoud", {}, None, "StatusCode.NOT_FOUND"),
    ("sigmoid", {"alpha": -1.0}, None, "StatusCode.INVALID_ARGUMENT"),
    ("sigmoid", {"alpah": 1.0}, None, "StatusCode.INVALID_ARGUMENT"),
    ("sigmoid", {}, ["vjp"], "StatusCode.INVALID_ARGUMENT"),
])
def test_errors_with_the_v2_message(server, triton, model, params, outputs, status):
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5], "data": SEED.tolist()}]}
    if params:
        doc["parameters"] = params
    if outputs:
        doc["outputs"] = [{"name": o} for o in outputs]
    message = rest_error(server[0], f"/v2/models/{model}/infer", doc)
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, [make_input("x", SEED, "FP32")], parameters=params or None,
                     outputs=[grpcclient.InferRequestedOutput(o) for o in outputs or ()] or None)
    assert (info.value.status(), info.value.message()) == (status, message)
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("sigmoid", "7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert info.value.message() == httpx.get(f"{server[0]}/v2/models/sigmoid/versions/7").json()["error"]


def test_asyncio_client(server):
    async def main():
        async with aioclient.InferenceServerClient(server[1]) as client:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("piecewise_quadratic")
            assert (await client.get_server_metadata()).name == "surrogate-serve"
            assert (await client.get_model_metadata("sigmoid")).platform == "jax"
            assert len((await client.get_model_repository_index()).models) == len(sc.names())
            calls = []
            for datatype, dtype in DTYPES.items():
                t = aioclient.InferInput("x", [X8.size], datatype)
                t.set_data_from_numpy(X8.astype(dtype))
                calls.append(client.infer("piecewise_quadratic", [t], parameters={"alpha": 2}))
            results = await asyncio.gather(*calls)  # concurrent calls, one channel
            for r, dtype in zip(results, DTYPES.values(), strict=True):
                assert r.as_numpy("grad").dtype == np.dtype(dtype)
                assert np.array_equal(r.as_numpy("grad").astype(np.float64), pq_grad(X8, 2.0))
            with pytest.raises(InferenceServerException) as info:
                await client.infer("sigmoud", [t])
            assert info.value.status() == "StatusCode.NOT_FOUND"

    asyncio.run(main())


def test_statistics_with_tritonclient(triton):
    pytest.importorskip("service.dataplane.stats", reason="the statistics extension is not on this branch")
    triton.infer("sigmoid", [make_input("x", SEED, "FP32")])
    stats = triton.get_inference_statistics("sigmoid", "1", as_json=True)["model_stats"]
    assert [s["name"] for s in stats] == ["sigmoid"]
    assert int(stats[0]["inference_stats"]["success"]["count"]) >= 1


# -- settings of their own -----------------------------------------------------------------------------

def infer_message(extra: int) -> bytes:
    """A 16-element ModelInfer message padded with an ignored parameter to ``extra`` more bytes."""
    req = pb.ModelInferRequest(model_name="piecewise_quadratic")
    req.inputs.add(name="x", datatype="FP32", shape=[16])
    req.raw_input_contents.append(np.linspace(-2, 2, 16, dtype=np.float32).tobytes())
    req.parameters["sequence_id"].string_param = "p" * extra
    return req.SerializeToString()


def sized(size: int) -> bytes:
    for extra in range(size):
        m = infer_message(extra)
        if len(m) == size:
            return m
    raise AssertionError(size)


def test_token_and_message_size_limit():
    port = free_port()
    limit = 4096
    with running_server(grpc_port=port, api_token=TOKEN, max_body_bytes=limit, log_level="warning") as (base, _):
        anon = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = make_input("x", SEED, "FP32")
        message = httpx.post(f"{base}/v2/models/sigmoid/infer", json={}).json()["error"]
        for call in (lambda: anon.infer("sigmoid", [x]), lambda: anon.get_server_metadata(),
                     lambda: anon.is_model_ready("sigmoid"), lambda: anon.get_model_repository_index()):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert (info.value.status(), info.value.message()) == ("StatusCode.UNAUTHENTICATED", message)
        assert anon.is_server_live()  # the probes stay open
        assert anon.is_server_ready()
        headers = {"authorization": f"Bearer {TOKEN}"}
        r = anon.infer("sigmoid", [x], headers=headers, outputs=[grpcclient.InferRequestedOutput("spike")])
        assert r.as_numpy("spike").tolist() == [0, 0, 1, 1, 1]
        anon.close()

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        response_deserializer=pb.ModelInferResponse.FromString)
            at, past = sized(limit), sized(limit + 1)
            assert (len(at), len(past)) == (limit, limit + 1)
            metadata = (("authorization", f"Bearer {TOKEN}"),)
            r = infer(at, metadata=metadata, timeout=30)  # exactly at the limit: taken
            np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[1], np.float32),
                                       pq_grad(np.linspace(-2, 2, 16, dtype=np.float32), 1.0), rtol=1e-6)
            with pytest.raises(grpc.RpcError) as info:
                infer(past, metadata=metadata, timeout=30)  # one byte past: refused by gRPC
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"{limit + 1} vs. {limit}" in info.value.details()


@pytest.mark.slow
def test_workers_share_the_port():
    port = free_port()
    with running_server(grpc_port=port, workers=2, log_level="warning") as (base, _):
        for _ in range(12):  # a new connection each time: the kernel spreads them over the workers
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            r = client.infer("sigmoid", [make_input("x", SEED, "FP32")], parameters={"alpha": 4.0},
                             outputs=[grpcclient.InferRequestedOutput("spike")])
            assert r.as_numpy("spike").tolist() == [0, 0, 1, 1, 1]
            client.close()
        # one scrape sees both workers' calls
        http_port = int(base.rsplit(":", 1)[1])
        assert metric(http_port, 'surrogate_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer"') == 12


@pytest.mark.slow
def test_kserve_grpc_client(server):
    """KServe's own InferenceGRPCClient, in the KServe peer's environment (made from
    bench/peers/kserve-requirements.txt on first use, as `make bench` makes it)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    venv, why = bench.peer_venv("kserve")
    assert venv is not None, f"KServe's environment could not be made: {why}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "bench" / "peers" / "kserve_grpc_client_check.py"),
                        server[1]], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("equal to the NumPy reference") == 12
    assert "infer of an unknown model: NOT_FOUND unknown model 'no_such_model'" in r.stdout


def test_shared_memory_with_tritonclient_grpc():
    """tritonclient.grpc with tritonclient.utils.shared_memory, unchanged: regions registered over
    gRPC (their status a map by name), x read from a region (no raw entry), grad written into one
    (an empty raw entry keeps the raw contents of the other outputs at their positions)."""
    from service.server.settings import Settings

    if "shared_memory" not in Settings.model_fields:
        pytest.skip("the shared-memory extension is not on this branch")
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    port = free_port()
    x = np.linspace(-2, 2, 1000, dtype=np.float32).reshape(10, 100)
    key_in, key_out = f"/surrogate_grpc_{os.getpid()}_in", f"/surrogate_grpc_{os.getpid()}_out"
    with running_server(grpc_port=port, shared_memory=True, log_level="warning"):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = shm.create_shared_memory_region("in", key_in, x.nbytes, create_only=True)
        out = shm.create_shared_memory_region("out", key_out, x.nbytes, create_only=True)
        try:
            shm.set_shared_memory_region(inp, [x])
            client.register_system_shared_memory("in", key_in, x.nbytes)
            client.register_system_shared_memory("out", key_out, x.nbytes)
            status = client.get_system_shared_memory_status(as_json=True)["regions"]
            assert {name: (r["key"], int(r.get("byte_size", 0))) for name, r in status.items()} == {
                "in": (key_in, x.nbytes), "out": (key_out, x.nbytes)}
            assert "system_shared_memory" in client.get_server_metadata().extensions
            tx = grpcclient.InferInput("x", list(x.shape), "FP32")
            tx.set_shared_memory("in", x.nbytes)
            grad = grpcclient.InferRequestedOutput("grad")
            grad.set_shared_memory("out", x.nbytes)
            r = client.infer("piecewise_quadratic", [tx], parameters={"alpha": 2},
                             outputs=[grpcclient.InferRequestedOutput("spike"), grad,
                                      grpcclient.InferRequestedOutput("fun")])
            assert [len(c) for c in r.get_response().raw_output_contents] == [x.nbytes, 0, x.nbytes]
            assert np.array_equal(r.as_numpy("spike"), spike(x))
            assert r.as_numpy("fun").shape == x.shape
            np.testing.assert_allclose(shm.get_contents_as_numpy(out, np.float32, list(x.shape)), pq_grad(x, 2.0),
                                       rtol=1e-6, atol=1e-7)
            client.unregister_system_shared_memory("in")
            assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
            client.unregister_system_shared_memory()
            assert not client.get_system_shared_memory_status(as_json=True).get("regions")
        finally:
            shm.destroy_shared_memory_region(inp)
            shm.destroy_shared_memory_region(out)
            client.close()
