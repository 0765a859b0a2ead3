"""``.npz`` bodies of stored (uncompressed) members, as ``np.savez`` and the client write them, are read
in place from the body through the zip's central directory: no copy, each member's CRC-32 checked.
Anything else about a zip (a compressed member, a CRC or a name that does not match, data outside
the body...) goes through ``zipfile``, which refuses what is wrong with a 422."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from helpers import App, npz

from service.dataplane.limits import Limits
from service.errors import ApiError
from service.protocols.tensors.npy import decode_npz
from surrogate_client._wire import _npz_bytes

NPZ = "application/x-npz"
pytestmark = pytest.mark.anyio


def limits(max_elements: int = 1_000_000) -> Limits:
    return Limits(max_rank=32, max_elements=max_elements, max_cost=1e15)


def grad_ref(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The piecewise-quadratic surrogate gradient, by hand: alpha - alpha^2 |x| where |x| <= 1/alpha."""
    a = x.dtype.type(alpha)
    return np.where(np.abs(x) <= 1 / a, a - a * a * np.abs(x), 0).astype(x.dtype)


ARRAYS = {
    "x": np.linspace(-2, 2, 60, dtype=np.float32).reshape(3, 4, 5),
    "cotangent": np.arange(20, dtype=">f8").reshape(4, 5),  # big-endian
    "alpha": np.asfortranarray(np.array([[0.5, 1.0], [2.0, 4.0]], np.float16)),
}


@pytest.mark.parametrize("writer", ["np.savez", "client"])
def test_stored_members_are_read_in_place_and_exactly(writer):
    body = npz(**ARRAYS) if writer == "np.savez" else bytes(_npz_bytes(ARRAYS))
    got = decode_npz(body, limits=limits())
    assert list(got) == list(ARRAYS)
    raw = np.frombuffer(body, np.uint8)
    for name, want in ARRAYS.items():
        assert got[name].shape == want.shape
        assert np.array_equal(got[name], want)
        assert got[name].astype(want.dtype).tobytes() == want.tobytes()  # bit for bit
    assert np.shares_memory(got["x"], raw)  # native and C-ordered: a view of the body, not a copy


def test_members_of_every_size_and_dtype_are_read_as_numpy_reads_them():
    rng = np.random.default_rng(5)
    for shape in [(), (0,), (1,), (0, 3), (7,), (2, 3, 4)]:
        for dtype in ["<f2", "<f4", "<f8", ">f4"]:
            x = rng.standard_normal(shape).astype(dtype)
            body = npz(x=x, cotangent=-x)
            got = decode_npz(body, limits=limits())
            with np.load(io.BytesIO(body)) as ref:
                for k in ("x", "cotangent"):
                    assert got[k].shape == ref[k].shape and got[k].tobytes() == ref[k].astype(got[k].dtype).tobytes()


def test_the_element_limit_counts_all_members_together_at_its_edge():
    body = npz(x=np.zeros(600, np.float32), cotangent=np.zeros(400, np.float32))
    assert sum(a.size for a in decode_npz(body, limits=limits(1000)).values()) == 1000
    with pytest.raises(ApiError) as info:
        decode_npz(body, limits=limits(999))
    assert info.value.status == 422 and info.value.code == "too_large" and info.value.field == "cotangent"


def _stored(**arrays: np.ndarray) -> bytearray:
    return bytearray(npz(**arrays))


def _central(body: bytearray) -> int:
    """Where the first central directory entry starts."""
    return struct.unpack_from("<I", body, len(body) - 22 + 16)[0]


def _bad_crc(body: bytearray) -> None:
    body[_central(body) - 1] ^= 0x01  # the last data byte of the last member


def _other_name(body: bytearray) -> None:
    at = body.index(b"x.npy")  # in the first local header
    body[at:at + 1] = b"y"


def _past_the_end(body: bytearray) -> None:
    at = _central(body)
    struct.pack_into("<I", body, at + 42, len(body))  # the local header's offset: past the body


def _longer(body: bytearray) -> None:
    at = _central(body)
    size = struct.unpack_from("<I", body, at + 20)[0]
    struct.pack_into("<II", body, at + 20, size + 64, size + 64)  # runs into the central directory


def _encrypted(body: bytearray) -> None:
    at = _central(body)
    struct.pack_into("<H", body, at + 8, 1)
    struct.pack_into("<H", body, 6, 1)


def _deflated(body: bytearray) -> None:  # says deflated, holds stored bytes
    at = _central(body)
    struct.pack_into("<H", body, at + 10, 8)
    struct.pack_into("<H", body, 8, 8)


def _truncated(body: bytearray) -> None:
    del body[len(body) // 2:len(body) // 2 + 5]


def _short_member(body: bytearray) -> None:
    """A stored member whose data is one byte short of its .npy header, CRC and sizes made consistent."""
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data[:-1] if name == "x.npy" else data)
    body[:] = out.getvalue()


@pytest.mark.parametrize("damage", [_bad_crc, _other_name, _past_the_end, _longer, _encrypted, _deflated, _truncated,
                                    _short_member])
async def test_damaged_stored_archives_are_refused_with_422(damage):
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    body = _stored(x=x, cotangent=np.ones_like(x))
    damage(body)
    with pytest.raises(ApiError) as info:
        decode_npz(bytes(body), limits=limits())
    assert info.value.status == 422
    async with App() as a:
        r = await a.client.post("/v1/grad", content=bytes(body), headers={"content-type": NPZ})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] in ("invalid_binary", "too_large")


async def test_the_app_answers_a_stored_npz_as_it_answers_npy():
    x = np.linspace(-2, 2, 1001, dtype=np.float32)
    ct = np.linspace(3, -3, 1001, dtype=np.float32)
    async with App() as a:
        for body in (npz(x=x, cotangent=ct), bytes(_npz_bytes({"x": x, "cotangent": ct}))):
            r = await a.client.post("/v1/grad?dtype=float32", content=body,
                                    headers={"content-type": NPZ, "accept": "application/x-npy"})
            assert r.status_code == 200, r.text
            assert np.load(io.BytesIO(r.content)).tobytes() == (ct * grad_ref(x)).tobytes()
