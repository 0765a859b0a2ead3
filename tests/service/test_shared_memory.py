"""Triton's system shared-memory extension over /v2, in process: register, status and unregister;
infer inputs read from regions and outputs written into them; every hostile case (a key that does
not exist, bounds past the object's or the region's end, a region smaller than the tensor, an
unknown or unregistered region, too many regions, the memory budget, a region unregistered while a
request uses it, an object shrunk after registering), each refused with a 400 naming the field,
nothing read or written out of bounds (sentinel bytes around every window stay as they were) and
nothing left mapped (``/proc/self/maps`` and the registry). The test process writes and reads the
objects through their file descriptors only, so every mapping of them in ``/proc/self/maps`` is
the server's."""

from __future__ import annotations

import asyncio
import itertools
import os

import ml_dtypes
import numpy as np
import orjson
import pytest

from reference import pq_grad, spike

from helpers import App

_posixshmem = pytest.importorskip("_posixshmem")

pytestmark = pytest.mark.anyio
INFER = "/v2/models/piecewise_quadratic/infer"
SHM = "/v2/systemsharedmemory"
X = np.array([-2.0, -0.5, 0.0, 0.5, 2.0, -0.25, 0.75, 1.5], np.float32)
SENTINEL = 0xA5
_serial = itertools.count()


class Obj:
    """A POSIX shared-memory object of ``size`` bytes, every byte ``SENTINEL``, written and read
    through its descriptor (never mapped by the test)."""

    def __init__(self, size: int) -> None:
        self.key = f"/surrogate_test_{os.getpid()}_{next(_serial)}"
        self.fd = _posixshmem.shm_open(self.key, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        os.ftruncate(self.fd, size)
        os.pwrite(self.fd, bytes([SENTINEL]) * size, 0)
        self.size = size

    def write(self, offset: int, a: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(a).tobytes(), offset)

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        return os.pread(self.fd, self.size - offset if n is None else n, offset)

    def close(self) -> None:
        os.close(self.fd)
        _posixshmem.shm_unlink(self.key)


@pytest.fixture
def objs():
    made: list[Obj] = []

    def make(size: int) -> Obj:
        made.append(Obj(size))
        return made[-1]

    yield make
    for o in made:
        o.close()


def mapped(key: str) -> list[str]:
    """The mappings of ``key`` in this process (``/dev/shm/<name>`` lines of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip().endswith("/dev/shm/" + key.lstrip("/"))]


async def unmapped(a, *objs: Obj) -> bool:
    """Whether the server holds no region mapped (none of ``objs`` in /proc/self/maps), waiting up
    to 5 s: a worker thread that computed a request lets go of its arrays just after answering."""
    for _ in range(500):
        if a.rt.shm.mapped == 0 and not any(mapped(o.key) for o in objs):
            return True
        await asyncio.sleep(0.01)
    return False


def untouched(obj: Obj, start: int = 0, end: int | None = None) -> bool:
    """Whether the object's bytes outside ``[start, end)`` are all still the sentinel."""
    raw = obj.read()
    end = len(raw) if end is None else end
    return set(raw[:start] + raw[end:]) <= {SENTINEL}


def shm_input(name, shape, region, byte_size, offset=None, datatype="FP32"):
    p = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset is not None:
        p["shared_memory_offset"] = offset
    return {"name": name, "shape": list(shape), "datatype": datatype, "parameters": p}


def shm_output(name, region, byte_size, offset=None):
    p = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset is not None:
        p["shared_memory_offset"] = offset
    return {"name": name, "parameters": p}


async def register(a, name, key, byte_size, offset=0):
    return await a.client.post(f"{SHM}/region/{name}/register",
                               json={"key": key, "offset": offset, "byte_size": byte_size})


async def infer(a, inputs, outputs=None, **params):
    req = {"inputs": inputs}
    if outputs is not None:
        req["outputs"] = outputs
    if params:
        req["parameters"] = params
    return await a.client.post(INFER, content=orjson.dumps(req), headers={"content-type": "application/json"})


def error(r, status=400) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- register, status, unregister ------------------------------------------------------------------

async def test_register_status_and_unregister(objs):
    o = objs(4096 + 64)
    async with App(shared_memory=True) as a:
        r = await register(a, "in0", o.key, 64, offset=4096)
        assert r.status_code == 200 and r.json() == {}
        assert len(mapped(o.key)) == 1 and a.budget.in_use == 64
        region = {"name": "in0", "key": o.key, "offset": 4096, "byte_size": 64}
        assert (await a.client.get(f"{SHM}/status")).json() == [region]
        assert (await a.client.get(f"{SHM}/region/in0/status")).json() == [region]
        assert "system_shared_memory" in (await a.client.get("/v2")).json()["extensions"]
        r = await a.client.get(f"{SHM}/region/nope/status")
        assert error(r, 404) == "no shared memory region 'nope' is registered"
        assert (await a.client.post(f"{SHM}/region/in0/unregister")).status_code == 200
        assert (await a.client.get(f"{SHM}/status")).json() == []
        assert mapped(o.key) == [] and a.budget.in_use == 0 and a.rt.shm.mapped == 0
        # unregistering a name that is not registered is no error (as in Triton)
        assert (await a.client.post(f"{SHM}/region/in0/unregister")).status_code == 200
        # the name is free again; the key without its leading slash names the same object
        assert (await register(a, "in0", o.key.lstrip("/"), 16)).status_code == 200
        assert (await a.client.post(f"{SHM}/unregister")).status_code == 200
        assert mapped(o.key) == [] and a.budget.in_use == 0


async def test_the_lifespan_unmaps_every_region_at_shutdown(objs):
    o1, o2 = objs(64), objs(64)
    async with App(shared_memory=True) as a:
        assert (await register(a, "a", o1.key, 64)).status_code == 200
        assert (await register(a, "b", o2.key, 32, offset=32)).status_code == 200
        assert len(mapped(o1.key)) == len(mapped(o2.key)) == 1
    assert mapped(o1.key) == mapped(o2.key) == [] and a.rt.shm.mapped == 0 and a.budget.in_use == 0


async def test_a_key_that_does_not_exist_is_a_400_naming_it():
    async with App(shared_memory=True) as a:
        r = await register(a, "r", "/surrogate_test_no_such_object", 16)
        msg = error(r)
        assert msg.startswith("key '/surrogate_test_no_such_object': no shared memory object of that key exists")
        assert a.rt.shm.mapped == 0 and a.budget.in_use == 0


@pytest.mark.parametrize("key", ["", "/", "a/b", "/dev/shm/x", "..", "/.", "x" * 256, "a\x00b", 5])
async def test_a_key_that_is_not_one_shared_memory_name_is_refused(key):
    async with App(shared_memory=True) as a:
        r = await register(a, "r", key, 16)
        if not isinstance(key, str):
            assert error(r) == "key: Input should be a valid string"
        else:
            assert "is not a shared-memory key" in error(r)
        assert a.rt.shm.mapped == 0


async def test_bounds_past_the_objects_end_are_refused_at_the_edge(objs):
    """offset + byte_size exactly at the object's end is taken; one byte past it is a 400."""
    o = objs(10_000)
    async with App(shared_memory=True) as a:
        for offset, size in ((0, 10_001), (9_999, 2), (10_000, 1), (1 << 62, 1)):
            msg = error(await register(a, "r", o.key, size, offset=offset))
            assert msg == (f"offset {offset} + byte_size {size} is past the end of the shared memory object "
                           f"'{o.key}' (10000 bytes)")
            assert mapped(o.key) == [] and a.budget.in_use == 0
        assert (await register(a, "r", o.key, 1, offset=9_999)).status_code == 200
        assert (await register(a, "whole", o.key, 10_000)).status_code == 200
        assert len(mapped(o.key)) == 2


@pytest.mark.parametrize("body, field", [
    ({"key": "/k", "byte_size": 0}, "byte_size"),
    ({"key": "/k", "byte_size": -1}, "byte_size"),
    ({"key": "/k", "byte_size": 16, "offset": -1}, "offset"),
    ({"key": "/k", "byte_size": "16"}, "byte_size"),
    ({"key": "/k", "byte_size": 16.0}, "byte_size"),
    ({"key": "/k", "byte_size": True}, "byte_size"),
    ({"key": "/k"}, "byte_size"),
    ({"byte_size": 16}, "key"),
    ({"key": "/k", "byte_size": 16, "extra": 1}, "extra"),
])
async def test_a_malformed_register_body_is_a_400_naming_the_field(body, field):
    async with App(shared_memory=True) as a:
        r = await a.client.post(f"{SHM}/region/r/register", json=body)
        assert error(r).startswith(f"{field}: ")
        assert a.rt.shm.mapped == 0


async def test_a_name_is_registered_once(objs):
    o = objs(64)
    async with App(shared_memory=True) as a:
        assert (await register(a, "r", o.key, 64)).status_code == 200
        msg = error(await register(a, "r", o.key, 32))
        assert msg == "shared memory region 'r' is already registered; unregister it first"
        assert len(mapped(o.key)) == 1 and a.budget.in_use == 64
        long = "n" * 257
        assert error(await register(a, long, o.key, 8)).startswith("region name 'nnnn")
        assert (await register(a, "n" * 256, o.key, 8)).status_code == 200


async def test_too_many_regions_are_refused_at_the_limit(objs):
    o = objs(64)
    async with App(shared_memory=True, shared_memory_max_regions=3) as a:
        for i in range(3):
            assert (await register(a, f"r{i}", o.key, 8, offset=8 * i)).status_code == 200
        msg = error(await register(a, "r3", o.key, 8))
        assert msg == ("3 shared memory regions are registered, the most this server takes "
                       "(SURROGATE_SHARED_MEMORY_MAX_REGIONS); unregister one first")
        assert len(mapped(o.key)) == 3 and a.rt.shm.mapped == 3 and a.budget.in_use == 24
        assert (await a.client.post(f"{SHM}/region/r0/unregister")).status_code == 200
        assert (await register(a, "r3", o.key, 8)).status_code == 200


async def test_regions_count_against_the_memory_budget(objs):
    budget = 4 << 20
    o = objs(budget)
    async with App(shared_memory=True, memory_budget=budget) as a:
        assert (await register(a, "a", o.key, 3_000_000)).status_code == 200
        assert a.budget.in_use == 3_000_000
        msg = error(await register(a, "b", o.key, budget - 3_000_000 + 1))
        assert msg == (f"byte_size {budget - 3_000_000 + 1}: with the 3000000 bytes of the regions registered, more "
                       f"than the server's memory budget of {budget} bytes (SURROGATE_MEMORY_BUDGET); register a "
                       "smaller region or unregister one")
        assert len(mapped(o.key)) == 1 and a.budget.in_use == 3_000_000
        assert (await register(a, "b", o.key, budget - 3_000_000)).status_code == 200  # exactly the budget
        assert a.budget.in_use == budget
        # a request now finds the budget full: refused at once (503), not a hang
        o.write(0, X)
        r = await infer(a, [shm_input("x", X.shape, "a", X.nbytes)])
        assert r.status_code == 503 and "memory budget" in r.json()["error"]
        assert (await a.client.post(f"{SHM}/region/b/unregister")).status_code == 200
        r = await infer(a, [shm_input("x", X.shape, "a", X.nbytes)])
        assert r.status_code == 200, r.text
        # the budget in use by requests in flight: 503 with Retry-After, nothing mapped
        assert a.budget.try_acquire(a.budget.available)
        r = await register(a, "c", o.key, 16)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "in use by requests in flight" in r.json()["error"]
        assert len(mapped(o.key)) == 1


async def test_with_shared_memory_off_every_endpoint_and_region_tensor_is_a_400(objs):
    o = objs(64)
    off = ("system shared memory is off on this server (start it with SURROGATE_SHARED_MEMORY=true to use "
           "shared-memory regions)")
    async with App() as a:
        assert a.rt.shm is None
        assert "system_shared_memory" not in (await a.client.get("/v2")).json()["extensions"]
        for method, path in (("GET", "/status"), ("GET", "/region/r/status"), ("POST", "/region/r/unregister"),
                             ("POST", "/unregister")):
            assert error(await a.client.request(method, SHM + path)) == off
        assert error(await register(a, "r", o.key, 64)) == off
        assert mapped(o.key) == []
        msg = error(await infer(a, [shm_input("x", X.shape, "r", X.nbytes)]))
        assert msg == ("input 'x': names a shared memory region, but system shared memory is off on this server "
                       "(SURROGATE_SHARED_MEMORY=true turns it on)")
        msg = error(await infer(a, [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}],
                                [shm_output("grad", "r", 4)]))
        assert msg.startswith("output 'grad': names a shared memory region, but system shared memory is off")


# -- infer -------------------------------------------------------------------------------------------

async def test_inputs_read_from_and_outputs_written_into_regions(objs):
    """x and alpha from one region (x at an odd offset), cotangent from another; grad and vjp into
    a third at offsets, spike in binary and fun as JSON in the same answer: values against NumPy,
    and no byte of any object outside the tensors' windows written."""
    inp, ct_obj, out = objs(256), objs(64), objs(256)
    alpha = np.array([[0.5], [2.0]], np.float32)
    ct = np.full((2, 8), 2.0, np.float32)
    inp.write(3, X)
    inp.write(64, alpha)
    ct_obj.write(0, ct)
    async with App(shared_memory=True) as a:
        assert (await register(a, "in", inp.key, 256)).status_code == 200
        assert (await register(a, "ct", ct_obj.key, 64)).status_code == 200
        assert (await register(a, "out", out.key, 200, offset=16)).status_code == 200
        inputs = [shm_input("x", X.shape, "in", 32, offset=3), shm_input("alpha", alpha.shape, "in", 8, 64),
                  shm_input("cotangent", ct.shape, "ct", 64)]
        outputs = [shm_output("grad", "out", 64, offset=8), {"name": "spike", "parameters": {"binary_data": True}},
                   shm_output("vjp", "out", 100, offset=100), {"name": "fun"}]
        r = await infer(a, inputs, outputs)
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        head = orjson.loads(r.content[:n])
        assert head["outputs"] == [
            {"name": "grad", "datatype": "FP32", "shape": [2, 8],
             "parameters": {"shared_memory_region": "out", "shared_memory_offset": 8, "shared_memory_byte_size": 64,
                            "binary_data": False}},
            {"name": "spike", "datatype": "FP32", "shape": [2, 8], "parameters": {"binary_data_size": 64}},
            {"name": "vjp", "datatype": "FP32", "shape": [2, 8],
             "parameters": {"shared_memory_region": "out", "shared_memory_offset": 100,
                            "shared_memory_byte_size": 100, "binary_data": False}},
            {"name": "fun", "datatype": "FP32", "shape": [2, 8], "data": head["outputs"][3]["data"]},
        ]
        np.testing.assert_array_equal(np.frombuffer(r.content[n:], np.float32), np.tile(spike(X), 2))
        expected = pq_grad(X, alpha).astype(np.float32)
        # region "out" starts at byte 16 of its object: grad at 16 + 8, vjp at 16 + 100
        raw = out.read()
        np.testing.assert_allclose(np.frombuffer(raw, np.float32, 16, 24).reshape(2, 8), expected, rtol=1e-6)
        np.testing.assert_allclose(np.frombuffer(raw, np.float32, 16, 116).reshape(2, 8), 2 * expected, rtol=1e-6)
        assert set(raw[:24] + raw[88:116]) == {SENTINEL} and set(raw[180:]) == {SENTINEL}
        assert a.rt.shm.mapped == 3 and a.budget.in_use == 256 + 64 + 200  # the request's own ticket is back
    assert await unmapped(a, inp, ct_obj, out)


async def test_a_request_naming_no_outputs_honours_binary_data_output(objs):
    o = objs(64)
    o.write(0, X)
    async with App(shared_memory=True) as a:
        await register(a, "in", o.key, 64)
        r = await infer(a, [shm_input("x", X.shape, "in", 32)], binary_data_output=True)
        n = int(r.headers["inference-header-content-length"])
        head = orjson.loads(r.content[:n])
        assert [(t["name"], t["parameters"]) for t in head["outputs"]] == [
            (name, {"binary_data_size": 32}) for name in ("spike", "grad", "fun")]
        np.testing.assert_allclose(np.frombuffer(r.content[n + 32:n + 64], np.float32), pq_grad(X, 1.0), rtol=1e-6)
        r = await infer(a, [shm_input("x", X.shape, "in", 32)])  # without it: JSON data
        assert [("data" in t) for t in r.json()["outputs"]] == [True, True, True]


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "BF16"])
async def test_every_datatype_through_regions(objs, datatype):
    wire = {"FP16": np.float16, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}[datatype]
    x = X.astype(wire)
    o = objs(192)
    o.write(0, x)
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 192)
        r = await infer(a, [shm_input("x", x.shape, "r", x.nbytes, datatype=datatype)],
                        [shm_output("grad", "r", x.nbytes, offset=96)])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["datatype"] == datatype
        got = np.frombuffer(o.read(96, x.nbytes), wire)
        np.testing.assert_array_equal(got, pq_grad(x, 1.0).astype(wire))
        assert set(o.read(x.nbytes, 96 - x.nbytes) + o.read(96 + x.nbytes)) == {SENTINEL}


async def test_an_output_region_larger_than_the_output_is_written_at_its_start_only(objs):
    o = objs(64)
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 64)
        r = await infer(a, [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0.5, -0.5]}],
                        [shm_output("grad", "r", 40, offset=4)])
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.frombuffer(o.read(4, 8), np.float32), [0.5, 0.5])
        assert untouched(o, 4, 12)


# -- infer: the hostile cases -----------------------------------------------------------------------

async def test_an_unknown_or_unregistered_region_is_a_400_naming_the_tensor(objs):
    o = objs(64)
    o.write(0, X)
    async with App(shared_memory=True) as a:
        msg = error(await infer(a, [shm_input("x", X.shape, "nope", 32)]))
        assert msg == "input 'x': no shared memory region 'nope' is registered"
        await register(a, "in", o.key, 64)
        await a.client.post(f"{SHM}/region/in/unregister")
        assert error(await infer(a, [shm_input("x", X.shape, "in", 32)])) == (
            "input 'x': no shared memory region 'in' is registered")
        msg = error(await infer(a, [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
                                [shm_output("grad", "in", 4)]))
        assert msg == "output 'grad': no shared memory region 'in' is registered"
        assert mapped(o.key) == [] and untouched(o, 0, 32)


async def test_bounds_past_the_regions_end_are_refused_at_the_edge(objs):
    """A tensor's window exactly at the region's end is read; one byte past it is a 400, for inputs
    and outputs, and the bytes after the region (inside the object) are never read or written."""
    o = objs(4096 * 2)
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 40, offset=4090)  # the region straddles a page boundary
        o.write(4090 + 8, X)
        r = await infer(a, [shm_input("x", X.shape, "r", 32, offset=8)], [{"name": "grad"}])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], pq_grad(X, 1.0), rtol=1e-6)
        msg = error(await infer(a, [shm_input("x", X.shape, "r", 32, offset=9)]))
        assert msg == ("input 'x': shared_memory_offset 9 + shared_memory_byte_size 32 is past the end of region "
                       "'r' (40 bytes)")
        msg = error(await infer(a, [shm_input("x", X.shape, "r", 32, offset=1 << 62)]))
        assert "is past the end of region 'r' (40 bytes)" in msg
        before = o.read()
        x1 = [{"name": "x", "shape": [8], "datatype": "FP32", "data": X.tolist()}]
        msg = error(await infer(a, x1, [shm_output("grad", "r", 32, offset=9)]))
        assert msg == ("output 'grad': shared_memory_offset 9 + shared_memory_byte_size 32 is past the end of region "
                       "'r' (40 bytes)")
        assert o.read() == before
        assert (await infer(a, x1, [shm_output("grad", "r", 32, offset=8)])).status_code == 200
        after = o.read()
        assert after[:4098] == before[:4098] and after[4130:] == before[4130:]


async def test_a_region_smaller_than_the_tensor_is_refused_before_computing(objs):
    o = objs(64)
    o.write(0, X)
    async with App(shared_memory=True) as a:
        await register(a, "small", o.key, 16)
        msg = error(await infer(a, [shm_input("x", X.shape, "small", 32)]))
        assert msg == ("input 'x': shared_memory_offset 0 + shared_memory_byte_size 32 is past the end of region "
                       "'small' (16 bytes)")
        msg = error(await infer(a, [shm_input("x", X.shape, "small", 16)]))
        assert msg == "input 'x': shared_memory_byte_size 16 does not match shape [8] (32 bytes)"
        await register(a, "out", o.key, 28, offset=32)
        calls = a.rt.engine.stats.device_calls
        x = [{"name": "x", "shape": [8], "datatype": "FP32", "data": X.tolist()}]
        msg = error(await infer(a, x, [shm_output("grad", "out", 28)]))
        assert msg == "output 'grad': shared_memory_byte_size 28 cannot hold the output (32 bytes)"
        assert a.rt.engine.stats.device_calls == calls and set(o.read(32)) == {SENTINEL}
        assert (await infer(a, x, [shm_output("grad", "out", 28, offset=28)])).status_code == 400


@pytest.mark.parametrize("params, message", [
    ({"shared_memory_region": 5, "shared_memory_byte_size": 32}, "shared_memory_region must be a region's name"),
    ({"shared_memory_region": "r"}, "shared_memory_byte_size is required with shared_memory_region"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": -32}, "shared_memory_byte_size must be a non-negative"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 32.0}, "shared_memory_byte_size must be a non-negative"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 32, "shared_memory_offset": -1},
     "shared_memory_offset must be a non-negative integer"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 32, "shared_memory_offset": "0"},
     "shared_memory_offset must be a non-negative integer"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 32, "binary_data_size": 32},
     "has shared_memory_region and also binary_data_size; send one"),
])
async def test_malformed_region_parameters_are_a_400_naming_the_input(objs, params, message):
    o = objs(64)
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 64)
        r = await infer(a, [{"name": "x", "shape": [8], "datatype": "FP32", "parameters": params}])
        assert error(r).startswith("input 'x': ") and message in error(r)
        r = await infer(a, [{"name": "x", "shape": [8], "datatype": "FP32", "data": X.tolist(),
                             "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 32}}])
        assert error(r) == "input 'x': has shared_memory_region and also data; send one"
        r = await infer(a, [{"name": "x", "shape": [8], "datatype": "FP32", "data": X.tolist()}],
                        [{"name": "grad", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 32,
                                                         "binary_data": True}}])
        assert error(r) == "output 'grad': has shared_memory_region and binary_data true; ask for one"
        assert set(o.read()) == {SENTINEL}


async def test_an_object_shrunk_after_registering_is_refused_not_read(objs):
    """The object's size is checked as each request takes its lease: a client that shrinks its own
    object gets a 400, where reading the mapping past the object's end would kill the server."""
    o = objs(8192)
    o.write(4096, X)
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 32, offset=4096)
        assert (await infer(a, [shm_input("x", X.shape, "r", 32)])).status_code == 200
        os.ftruncate(o.fd, 4096)
        msg = error(await infer(a, [shm_input("x", X.shape, "r", 32)]))
        assert msg == (f"input 'x': the shared memory object '{o.key}' of region 'r' is smaller than the region now; "
                       "register it again")


class Held:
    """Holds every request in the data plane, after decoding and before computing, until ``go`` is
    set: what a slow computation looks like from the regions' side."""

    def __init__(self, a) -> None:
        self.dp = a.rt.dataplane
        self.infer = self.dp.infer
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.dp.infer = self

    async def __call__(self, *args, **kw):
        self.entered.set()
        await self.go.wait()
        return await self.infer(*args, **kw)


async def test_an_input_region_unregistered_while_a_request_reads_it(objs):
    """The region leaves the registry at once (its name free, its bytes off the budget) but stays
    mapped until the request that reads it is done, which answers from the bytes it read; then it
    is unmapped."""
    o = objs(64)
    o.write(0, X)
    async with App(shared_memory=True) as a:
        await register(a, "in", o.key, 64)
        held = Held(a)
        task = asyncio.create_task(infer(a, [shm_input("x", X.shape, "in", 32)], [{"name": "grad"}]))
        await asyncio.wait_for(held.entered.wait(), 10)
        assert (await a.client.post(f"{SHM}/region/in/unregister")).status_code == 200
        assert (await a.client.get(f"{SHM}/status")).json() == [] and a.budget.in_use < 64 + 1 << 16
        assert len(mapped(o.key)) == 1 and a.rt.shm.mapped == 1  # still read by the request
        assert error(await infer(a, [shm_input("x", X.shape, "in", 32)])) == (
            "input 'x': no shared memory region 'in' is registered")
        held.go.set()
        r = await asyncio.wait_for(task, 10)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], pq_grad(X, 1.0), rtol=1e-6)
        assert await unmapped(a, o) and a.budget.in_use == 0


async def test_an_output_region_unregistered_while_a_request_would_write_it(objs):
    """The request that was to write into a region unregistered meanwhile is a 400 and writes
    nothing; the region is unmapped when it is done."""
    o = objs(64)
    async with App(shared_memory=True) as a:
        await register(a, "out", o.key, 64)
        held = Held(a)
        x = [{"name": "x", "shape": [8], "datatype": "FP32", "data": X.tolist()}]
        task = asyncio.create_task(infer(a, x, [shm_output("grad", "out", 32)]))
        await asyncio.wait_for(held.entered.wait(), 10)
        assert (await a.client.post(f"{SHM}/unregister")).status_code == 200
        assert len(mapped(o.key)) == 1
        held.go.set()
        msg = error(await asyncio.wait_for(task, 10))
        assert msg == ("output 'grad': shared memory region 'out' was unregistered while this request used it; the "
                       "output was not written")
        assert set(o.read()) == {SENTINEL}
        assert await unmapped(a, o) and a.budget.in_use == 0


async def test_a_request_cut_off_by_its_deadline_gives_its_leases_back(objs):
    o = objs(64)
    o.write(0, X)
    async with App(shared_memory=True, request_timeout=0.2) as a:
        await register(a, "in", o.key, 64)
        held = Held(a)
        r = await infer(a, [shm_input("x", X.shape, "in", 32)])
        assert r.status_code == 503 and "took longer" in r.json()["error"]
        await a.client.post(f"{SHM}/unregister")
        held.go.set()
        assert await unmapped(a, o)


async def test_zero_size_and_scalar_tensors_in_regions(objs):
    """A zero-size input or output takes 0 bytes (at the region's very end too); a scalar its 4."""
    o = objs(16)
    o.write(12, np.float32([0.5]))
    async with App(shared_memory=True) as a:
        await register(a, "r", o.key, 16)
        r = await infer(a, [shm_input("x", (0, 3), "r", 0, offset=16)], [shm_output("grad", "r", 0, offset=16)])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [0, 3]
        r = await infer(a, [shm_input("x", (), "r", 4, offset=12)], [shm_output("grad", "r", 4, offset=0)])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == []
        assert np.frombuffer(o.read(0, 4), np.float32)[0] == np.float32(pq_grad(np.float32(0.5), 1.0))
        assert set(o.read(4, 8)) == {SENTINEL}


async def test_the_endpoints_need_the_token_when_one_is_set(objs):
    o = objs(64)
    token = "t" * 24
    async with App(shared_memory=True, api_token=token) as a:
        for method, path in (("GET", "/status"), ("GET", "/region/r/status"), ("POST", "/region/r/unregister"),
                             ("POST", "/unregister")):
            assert (await a.client.request(method, SHM + path)).status_code == 401
        r = await register(a, "r", o.key, 64)
        assert r.status_code == 401
        assert mapped(o.key) == []
        r = await a.client.post(f"{SHM}/region/r/register", json={"key": o.key, "byte_size": 64},
                                headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert len(mapped(o.key)) == 1
