"""Triton's system shared-memory extension against a real server, with NVIDIA's tritonclient
unchanged (``tritonclient.http`` and ``tritonclient.utils.shared_memory``): inputs read from and
outputs written into regions, values against the NumPy transcription; the hostile cases as
tritonclient sees them (its exception carries the server's message); regions registered and
unregistered while requests use them, from several threads, answered 200 or a 400 and never a 500
or a dead server; and nothing the server mapped left in its ``/proc/<pid>/maps``."""

from __future__ import annotations

import itertools
import os
import threading
import time

import numpy as np
import pytest

from liveserver import running_server
from reference import pq_grad, spike

httpclient = pytest.importorskip("tritonclient.http")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.e2e
MODEL = "piecewise_quadratic"
_serial = itertools.count()


def key() -> str:
    return f"/surrogate_e2e_{os.getpid()}_{next(_serial)}"


def server_maps(pid: int, k: str) -> list[str]:
    """The server's mappings of the shared-memory object ``k``."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if line.rstrip().endswith("/dev/shm/" + k.lstrip("/"))]


def settled(pid: int, *keys: str) -> bool:
    """Whether the server maps none of ``keys``, waiting up to 5 s (a request computed in a worker
    thread lets go of its arrays just after it is answered)."""
    deadline = time.monotonic() + 5
    while any(server_maps(pid, k) for k in keys):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def server():
    with running_server(shared_memory=True, shared_memory_max_regions=4, log_level="warning") as (base, proc):
        url = base.removeprefix("http://")
        client = httpclient.InferenceServerClient(url=url)
        try:
            yield client, proc.pid, url
        finally:
            client.unregister_system_shared_memory()
            client.close()


@pytest.fixture
def regions():
    """Creates tritonclient shared-memory regions (``make(name, byte_size)``), destroyed after."""
    made = []

    def make(name: str, byte_size: int):
        h = shm.create_shared_memory_region(name, key(), byte_size, create_only=True)
        made.append(h)
        return h

    yield make
    for h in made:
        shm.destroy_shared_memory_region(h)


def test_tritonclient_reads_inputs_from_and_writes_outputs_into_regions(server, regions):
    client, pid, _ = server
    x = np.linspace(-2, 2, 1000, dtype=np.float32).reshape(10, 100)
    alpha = np.array([[0.5], [1.0], [2.0], [4.0], [1.5], [1.0], [0.75], [3.0], [2.5], [1.25]], np.float32)
    inp = regions("in", x.nbytes + alpha.nbytes)
    out = regions("out", 2 * x.nbytes)
    shm.set_shared_memory_region(inp, [x, alpha])
    client.register_system_shared_memory("in", inp._shm_key, x.nbytes + alpha.nbytes)
    client.register_system_shared_memory("out", out._shm_key, 2 * x.nbytes)
    assert client.get_system_shared_memory_status() == [
        {"name": "in", "key": inp._shm_key, "offset": 0, "byte_size": x.nbytes + alpha.nbytes},
        {"name": "out", "key": out._shm_key, "offset": 0, "byte_size": 2 * x.nbytes},
    ]
    assert client.get_system_shared_memory_status("out") == [
        {"name": "out", "key": out._shm_key, "offset": 0, "byte_size": 2 * x.nbytes}]
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]

    tx = httpclient.InferInput("x", list(x.shape), "FP32")
    tx.set_shared_memory("in", x.nbytes)
    ta = httpclient.InferInput("alpha", list(alpha.shape), "FP32")
    ta.set_shared_memory("in", alpha.nbytes, offset=x.nbytes)
    grad = httpclient.InferRequestedOutput("grad", binary_data=True)
    grad.set_shared_memory("out", x.nbytes)
    fun = httpclient.InferRequestedOutput("spike", binary_data=True)
    fun.set_shared_memory("out", x.nbytes, offset=x.nbytes)
    result = client.infer(MODEL, [tx, ta], outputs=[grad, fun, httpclient.InferRequestedOutput("fun")])
    g = result.get_output("grad")
    assert g == {"name": "grad", "datatype": "FP32", "shape": [10, 100],
                 "parameters": {"shared_memory_region": "out", "shared_memory_offset": 0,
                                "shared_memory_byte_size": x.nbytes, "binary_data": False}}
    got = shm.get_contents_as_numpy(out, np.float32, g["shape"])
    np.testing.assert_allclose(got, pq_grad(x, alpha), rtol=1e-6, atol=1e-7)
    s = result.get_output("spike")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, s["shape"], offset=x.nbytes), spike(x))
    assert result.as_numpy("fun").shape == (10, 100)  # the binary output beside them, read as usual

    client.unregister_system_shared_memory("in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert settled(pid, inp._shm_key, out._shm_key)


def test_a_request_naming_no_outputs_still_gets_binary_outputs(server, regions):
    """tritonclient asks binary_data_output when no outputs are named: honoured for inputs in shared memory."""
    client, _, _ = server
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)
    h = regions("x5", x.nbytes)
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("x5", h._shm_key, x.nbytes)
    try:
        t = httpclient.InferInput("x", [5], "FP32")
        t.set_shared_memory("x5", x.nbytes)
        result = client.infer(MODEL, [t])
        assert result.get_output("grad")["parameters"] == {"binary_data_size": 20}
        np.testing.assert_array_equal(result.as_numpy("grad"), np.float32([0, 0.5, 1, 0.5, 0]))
    finally:
        client.unregister_system_shared_memory("x5")


def test_the_hostile_cases_are_400s_that_tritonclient_reports(server, regions):
    client, pid, _ = server
    x = np.arange(8, dtype=np.float32) - 4
    h = regions("small", 64)
    shm.set_shared_memory_region(h, [x])

    def refused(call, message):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert exc.value.status() == "400" and message in exc.value.message()

    refused(lambda: client.register_system_shared_memory("r", "/surrogate_e2e_no_such_key", 16),
            "key '/surrogate_e2e_no_such_key': no shared memory object of that key exists")
    refused(lambda: client.register_system_shared_memory("r", h._shm_key, 65),
            f"offset 0 + byte_size 65 is past the end of the shared memory object '{h._shm_key}' (64 bytes)")
    refused(lambda: client.register_system_shared_memory("r", h._shm_key, 8, offset=60),
            "offset 60 + byte_size 8 is past the end")
    client.register_system_shared_memory("r", h._shm_key, 16)
    refused(lambda: client.register_system_shared_memory("r", h._shm_key, 16), "is already registered")
    for i in range(3):  # the server takes 4 regions
        client.register_system_shared_memory(f"r{i}", h._shm_key, 8, offset=8 * i)
    refused(lambda: client.register_system_shared_memory("r4", h._shm_key, 8),
            "4 shared memory regions are registered, the most this server takes")
    assert len(server_maps(pid, h._shm_key)) == 4

    def infer_from(region, byte_size, offset=0):
        t = httpclient.InferInput("x", [8], "FP32")
        t.set_shared_memory(region, byte_size, offset=offset)
        return lambda: client.infer(MODEL, [t])

    refused(infer_from("r", 32), "input 'x': shared_memory_offset 0 + shared_memory_byte_size 32 is past the end of "
                                 "region 'r' (16 bytes)")
    refused(infer_from("nope", 32), "input 'x': no shared memory region 'nope' is registered")
    refused(infer_from("r", 16), "input 'x': shared_memory_byte_size 16 does not match shape [8] (32 bytes)")
    client.unregister_system_shared_memory("r")
    refused(infer_from("r", 32), "input 'x': no shared memory region 'r' is registered")
    client.register_system_shared_memory("whole", h._shm_key, 64)
    out = httpclient.InferRequestedOutput("grad")
    out.set_shared_memory("r0", 8)
    t = httpclient.InferInput("x", [8], "FP32")
    t.set_shared_memory("whole", 32)
    refused(lambda: client.infer(MODEL, [t], outputs=[out]),
            "output 'grad': shared_memory_byte_size 8 cannot hold the output (32 bytes)")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [8]), x)  # nothing written
    client.unregister_system_shared_memory()
    assert settled(pid, h._shm_key)


def test_regions_unregistered_while_requests_use_them(server, regions):
    """Four threads infer 100,000 elements from a region and into another while a fifth registers
    and unregisters both as fast as it can: every answer is a 200 with the right values or a 400
    saying the region is not registered (or was unregistered meanwhile); the server lives on and
    maps nothing after."""
    client, pid, url = server
    n = 100_000
    x = np.linspace(-2, 2, n, dtype=np.float32)
    inp = regions("churn_in", x.nbytes)
    outs = [regions(f"churn_out{i}", x.nbytes) for i in range(2)]
    shm.set_shared_memory_region(inp, [x])
    expected = pq_grad(x, 1.0)
    stop = threading.Event()
    seen: dict[str, int] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def churn() -> None:  # (a tritonclient client is used by the thread that made it only)
        c = httpclient.InferenceServerClient(url=url)
        try:
            while not stop.is_set():
                try:
                    c.register_system_shared_memory("churn_in", inp._shm_key, x.nbytes)
                    for i, o in enumerate(outs[:2]):
                        c.register_system_shared_memory(f"churn_out{i}", o._shm_key, x.nbytes)
                    time.sleep(0.005)
                except InferenceServerException as e:
                    with lock:
                        problems.append(f"register: {e.message()}")
                c.unregister_system_shared_memory()
        finally:
            c.close()

    def work(i: int) -> None:
        c = httpclient.InferenceServerClient(url=url)
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                t = httpclient.InferInput("x", [n], "FP32")
                t.set_shared_memory("churn_in", x.nbytes)
                o = httpclient.InferRequestedOutput("grad")
                o.set_shared_memory(f"churn_out{i % 2}", x.nbytes)
                try:
                    c.infer(MODEL, [t], outputs=[o])
                    kind = "200"
                except InferenceServerException as e:
                    msg = e.message()
                    kind = f"{e.status()} {msg}"
                    if e.status() == "400" and "is registered" in msg:
                        kind = "400 not registered"
                    elif e.status() == "400" and "was unregistered while this request used it" in msg:
                        kind = "400 unregistered while used"
                with lock:
                    seen[kind] = seen.get(kind, 0) + 1
        finally:
            c.close()

    churner = threading.Thread(target=churn)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    churner.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    stop.set()
    churner.join(30)
    assert problems == []
    assert set(seen) <= {"200", "400 not registered", "400 unregistered while used"}, seen
    assert sum(seen.values()) > 0
    client.unregister_system_shared_memory()
    # the server answers as before, with shared memory too
    client.register_system_shared_memory("churn_in", inp._shm_key, x.nbytes)
    client.register_system_shared_memory("churn_out0", outs[0]._shm_key, x.nbytes)
    t = httpclient.InferInput("x", [n], "FP32")
    t.set_shared_memory("churn_in", x.nbytes)
    o = httpclient.InferRequestedOutput("grad")
    o.set_shared_memory("churn_out0", x.nbytes)
    client.infer(MODEL, [t], outputs=[o])
    np.testing.assert_allclose(shm.get_contents_as_numpy(outs[0], np.float32, [n]), expected, rtol=1e-6, atol=1e-7)
    client.unregister_system_shared_memory()
    assert settled(pid, inp._shm_key, *(o._shm_key for o in outs))


def test_with_shared_memory_off_tritonclient_gets_a_400_naming_the_setting(regions):
    h = regions("off", 64)
    with running_server(warmup=False, log_level="warning") as (base, _):
        client = httpclient.InferenceServerClient(url=base.removeprefix("http://"))
        try:
            for call in (lambda: client.register_system_shared_memory("off", h._shm_key, 64),
                         client.get_system_shared_memory_status, client.unregister_system_shared_memory):
                with pytest.raises(InferenceServerException) as exc:
                    call()
                assert exc.value.status() == "400"
                assert "system shared memory is off on this server" in exc.value.message()
                assert "SURROGATE_SHARED_MEMORY=true" in exc.value.message()
            t = httpclient.InferInput("x", [8], "FP32")
            t.set_shared_memory("off", 32)
            with pytest.raises(InferenceServerException) as exc:
                client.infer(MODEL, [t])
            assert exc.value.status() == "400"
            assert "input 'x': names a shared memory region, but system shared memory is off" in exc.value.message()
        finally:
            client.close()
