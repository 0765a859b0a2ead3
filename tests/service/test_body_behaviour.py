"""The request body reader and the ``.npz`` decoder under hostile input: how much they inflate,
read and reserve, measured by spies on zlib and zipfile, not only the status they answer with.

* ``read_body`` inflates a gzip/deflate body in bounded steps, so a compression bomb costs at most
  the byte limit (plus one byte) before it is refused;
* the inflated bytes of a compressed body are held in the memory budget while they are read, with
  or without Content-Length;
* an ``.npz`` member is read no further than its header declares (plus one byte);
* an ``.npz`` of more than ``MAX_NPZ_MEMBERS`` members is refused before ``zipfile`` parses it.

Each test builds what it needs (its own app or its own reader); nothing is shared between tests.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from helpers import make_settings

from service import compute
from service.app import create_app
from service.compute import Head, read_body
from service.dataplane import Ticket
from service.dataplane.limits import Limits
from service.dataplane.memory import MemoryBudget
from service.errors import ApiError
from service.protocols.tensors import npy as npy_module
from service.protocols.tensors.npy import MAX_NPZ_MEMBERS, decode_npz
from service.server import httpproto

pytestmark = pytest.mark.anyio
INFER = "/v2/models/piecewise_quadratic/infer"
NPZ = "application/x-npz"
GZIP_JSON = {"content-encoding": "gzip", "content-type": "application/json"}


def grad_ref(x: Any, alpha: float = 1.0) -> np.ndarray:
    """piecewise_quadratic's g'(x), by hand: alpha - alpha**2 |x| where |x| <= 1/alpha, else 0."""
    x = np.abs(np.asarray(x, np.float64))
    return np.where(x <= 1.0 / alpha, alpha - alpha * alpha * x, 0.0)


# -- spies ------------------------------------------------------------------------------------------

class _SpyInflater:
    """A zlib decompressor that records every piece it hands out (and the bound it was asked for)."""

    def __init__(self, real: Any, log: list[tuple[int, int]]) -> None:
        self._real = real
        self._log = log

    def decompress(self, data: Any, max_length: int = 0) -> bytes:
        out = self._real.decompress(data, max_length)
        self._log.append((max_length, len(out)))
        return out

    def __getattr__(self, name: str) -> Any:  # unconsumed_tail, eof, unused_data, flush ...
        return getattr(self._real, name)


class SpyZlib:
    """Stands in for the ``zlib`` module inside ``service.compute`` only (httpx and gzip keep the real
    one): its decompressors record what they inflate."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, int]] = []  # (max_length asked, bytes returned)
        self.inflaters = 0

    def decompressobj(self, *args: Any, **kwargs: Any) -> _SpyInflater:
        self.inflaters += 1
        return _SpyInflater(zlib.decompressobj(*args, **kwargs), self.pieces)

    def __getattr__(self, name: str) -> Any:
        return getattr(zlib, name)

    @property
    def inflated(self) -> int:
        return sum(n for _, n in self.pieces)


@pytest.fixture
def spy_zlib(monkeypatch: pytest.MonkeyPatch) -> SpyZlib:
    spy = SpyZlib()
    monkeypatch.setattr(compute, "zlib", spy)
    return spy


class RecordingTicket:
    """A ticket that grants everything and remembers every total it was asked to hold."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def require(self, total: int, what: str, *, status: int = 422) -> None:
        self.asked.append(total)

    def fits(self, total: int, what: str, *, status: int = 422) -> None:
        pass


def _compress(raw: bytes, encoding: str) -> bytes:
    return gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)


async def _read(body: bytes, headers: dict[str, str], limit: int, ticket: Any, *, piece: int | None = None,
                inflate: bool = True) -> bytes:
    """``read_body`` over a fake ASGI ``receive`` that delivers ``body`` whole or in pieces."""
    pieces = [body] if piece is None else [body[i:i + piece] for i in range(0, len(body), piece)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    head = Head({"headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})
    return bytes(await read_body(receive, head, limit, ticket, inflate=inflate))


# -- 1. a compression bomb is inflated no further than the limit -------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("piece", [None, 4096], ids=["one-message", "4KiB-messages"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-content-length"])
async def test_a_compression_bomb_is_inflated_no_further_than_the_limit(spy_zlib, encoding, piece, declared):
    limit = 100_000
    raw = b"\0" * (16 << 20)  # 16 MiB of zeros: about 16 KiB compressed
    bomb = _compress(raw, encoding)
    assert len(bomb) < limit
    headers = {"content-encoding": encoding}
    if declared:
        headers["content-length"] = str(len(bomb))
    with pytest.raises(ApiError) as info:
        await _read(bomb, headers, limit, RecordingTicket(), piece=piece)
    assert info.value.status == 413 and "inflated" in info.value.message
    assert spy_zlib.inflaters == 1
    # what counts: the bytes actually inflated, not only the status
    assert 0 < spy_zlib.inflated <= limit + 1, spy_zlib.inflated
    assert all(0 < bound <= limit + 1 for bound, _ in spy_zlib.pieces), spy_zlib.pieces


async def test_a_body_at_the_limit_inflates_whole_and_one_byte_more_is_refused(spy_zlib):
    limit = 50_000
    at = b"[" + b" " * (limit - 2) + b"]"
    got = await _read(gzip.compress(at), {"content-encoding": "gzip"}, limit, RecordingTicket(), piece=1000)
    assert got == at
    spy_zlib.pieces.clear()
    over = b"[" + b" " * (limit - 1) + b"]"
    with pytest.raises(ApiError) as info:
        await _read(gzip.compress(over), {"content-encoding": "gzip"}, limit, RecordingTicket(), piece=1000)
    assert info.value.status == 413
    assert spy_zlib.inflated <= limit + 1


async def test_a_bomb_sent_to_v2_is_413_after_inflating_at_most_the_limit(spy_zlib):
    limit = 100_000
    app = create_app(make_settings(max_body_bytes=limit))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            bomb = gzip.compress(b"[" + b" " * (32 << 20) + b"]")
            r = await c.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
            assert r.status_code == 413 and "inflated" in r.json()["error"]
            assert spy_zlib.inflated <= limit + 1, spy_zlib.inflated
            # and the server is fine after
            x = [-2.0, -0.5, 0.0, 0.5, 2.0]
            ok = gzip.compress(orjson.dumps({"inputs": [{"name": "x", "shape": [5], "datatype": "FP64", "data": x}],
                                             "outputs": [{"name": "grad"}]}))
            r = await c.post(INFER, content=ok, headers={"content-encoding": "gzip"})
            assert r.status_code == 200
            assert r.json()["outputs"][0]["data"] == grad_ref(x).tolist()


# -- 2. the inflated bytes are held in the memory budget -----------------------------------------------

@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-content-length"])
async def test_the_ticket_holds_the_inflated_size_of_a_compressed_body(declared):
    raw = b"[" + b" " * 1_500_000 + b"]"
    packed = gzip.compress(raw)
    headers = {"content-encoding": "gzip"}
    if declared:
        headers["content-length"] = str(len(packed))
    ticket = RecordingTicket()
    got = await _read(packed, headers, 8 << 20, ticket, piece=8192)
    assert got == raw
    # while inflating, the ticket was asked for the inflated bytes (and the compressed ones, when
    # they were declared and reserved up front)
    assert max(ticket.asked) >= len(raw) + (len(packed) if declared else 0), (max(ticket.asked), len(raw))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-content-length"])
async def test_a_compressed_body_that_inflates_past_the_whole_budget_is_refused_while_reading(declared):
    budget = MemoryBudget(1 << 20)
    ticket = Ticket(budget)
    packed = gzip.compress(b"[" + b" " * (3 << 20) + b"]")  # 3 MiB inflated, a few KiB on the wire
    headers = {"content-encoding": "gzip"}
    if declared:
        headers["content-length"] = str(len(packed))
    with pytest.raises(ApiError) as info:
        await _read(packed, headers, 8 << 20, ticket, piece=4096)
    err = info.value
    assert err.status == 413 and err.reason == "memory" and "memory budget" in err.message
    assert ticket.held <= budget.capacity and budget.peak <= budget.capacity
    ticket.release()
    assert budget.in_use == 0


async def test_a_compressed_body_that_does_not_fit_beside_others_is_503():
    budget = MemoryBudget(4 << 20)
    assert budget.try_acquire(3 << 20)  # another request holds 3 MiB
    ticket = Ticket(budget)
    raw = b"[" + b" " * (2 << 20) + b"]"
    packed = gzip.compress(raw)
    with pytest.raises(ApiError) as info:
        await _read(packed, {"content-encoding": "gzip", "content-length": str(len(packed))}, 8 << 20, ticket,
                    piece=4096)
    assert info.value.status == 503 and info.value.reason == "memory"
    assert budget.in_use == (3 << 20) + ticket.held and budget.in_use <= budget.capacity
    ticket.release()
    budget.release(3 << 20)
    # alone, the same body fits, and the reservation holds its inflated size
    ticket = Ticket(budget)
    assert await _read(packed, {"content-encoding": "gzip", "content-length": str(len(packed))}, 8 << 20, ticket,
                       piece=4096) == raw
    assert ticket.held >= len(raw) + len(packed) and budget.peak >= len(raw) + len(packed)
    ticket.release()


def _padded_request(pad: int) -> tuple[bytes, list[float]]:
    x = [-1.5, -0.25, 0.0, 0.75]
    req = orjson.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": "FP64", "data": x}],
                        "outputs": [{"name": "grad"}]})
    return req[:-1] + b" " * pad + b"}", x


async def test_v2_refuses_a_gzip_body_with_content_length_that_inflates_past_the_budget():
    app = create_app(make_settings(memory_budget=1 << 20, max_body_bytes=8 << 20))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            raw, _ = _padded_request(3 << 20)
            packed = gzip.compress(raw)
            r = await c.post(INFER, content=packed, headers=GZIP_JSON)
            assert r.request.headers["content-length"] == str(len(packed))
            assert r.status_code == 413, r.text
            msg = r.json()["error"]
            # refused by the reader, while inflating: the request body is what did not fit
            assert "a request body of" in msg and "memory budget" in msg
            metrics = (await c.get("/metrics")).text
            assert 'surrogate_rejections_total{reason="memory"} 1.0' in metrics
            assert app.state.runtime.dataplane.budget.in_use == 0


async def test_v2_holds_the_inflated_size_of_a_gzip_body_with_content_length(monkeypatch):
    held: list[int] = []
    real = compute.read_body

    async def spy(receive, head, limit, ticket, **kw):
        body = await real(receive, head, limit, ticket, **kw)
        held.append(ticket.held)  # what the reservation holds once the body is read
        return body

    monkeypatch.setattr(compute, "read_body", spy)
    app = create_app(make_settings(memory_budget=32 << 20, max_body_bytes=8 << 20))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            raw, x = _padded_request(1 << 20)
            packed = gzip.compress(raw)
            r = await c.post(INFER, content=packed, headers=GZIP_JSON)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == grad_ref(x).tolist()
            assert len(held) == 1 and held[0] >= len(raw) + len(packed), (held, len(raw), len(packed))
            assert app.state.runtime.dataplane.budget.peak >= len(raw) + len(packed)
            assert app.state.runtime.dataplane.budget.in_use == 0


# -- 3. an .npz member is read no further than it declares ---------------------------------------------

def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue()


def _member_bomb(declared: int = 10, inflated: int = 8 << 20) -> bytes:
    """An .npz whose x.npy declares ``declared`` float64s but whose data inflates to ``inflated`` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w") as f:
            f.write(_npy_header((declared,)))
            chunk = b"\0" * (1 << 20)
            for o in range(0, inflated, len(chunk)):
                f.write(chunk[: inflated - o])
    return buf.getvalue()


class ZipReads:
    """Every ``ZipExtFile.read`` call: (member name, size asked, bytes returned)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any, int]] = []
        real = zipfile.ZipExtFile.read

        def read(this: zipfile.ZipExtFile, n: Any = -1) -> bytes:
            data = real(this, n)
            self.calls.append((this.name, n, len(data)))
            return data

        monkeypatch.setattr(zipfile.ZipExtFile, "read", read)

    def returned(self, name: str) -> int:
        return sum(got for member, _, got in self.calls if member == name)


@pytest.fixture
def zip_reads(monkeypatch: pytest.MonkeyPatch) -> ZipReads:
    return ZipReads(monkeypatch)


def _limits(max_elements: int = 100_000) -> Limits:
    return Limits(max_rank=8, max_elements=max_elements, max_cost=float("inf"))


async def test_an_npz_member_bomb_is_read_only_to_its_declared_size(zip_reads):
    bomb = _member_bomb(declared=10, inflated=8 << 20)
    with pytest.raises(ApiError) as info:
        decode_npz(bomb, limits=_limits())
    assert info.value.status == 422 and info.value.field == "x" and "more" in info.value.message
    header = len(_npy_header((10,)))
    assert zip_reads.calls, "the spy saw no read"
    assert all(n is not None and n >= 0 for _, n, _ in zip_reads.calls), zip_reads.calls  # no unbounded read
    # the header, then the data: 80 declared bytes and the one byte that shows there is more
    assert zip_reads.returned("x.npy") <= header + 80 + 1, zip_reads.calls


async def test_an_npz_member_bomb_sent_to_v1_is_422_after_a_bounded_read(zip_reads):
    app = create_app(make_settings(max_body_bytes=2_000_000))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/grad", content=_member_bomb(), headers={"content-type": NPZ})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_binary"
            assert r.json()["error"]["field"] == "x"
            assert zip_reads.returned("x.npy") <= len(_npy_header((10,))) + 81
            assert all(n is not None and n >= 0 for _, n, _ in zip_reads.calls)


async def test_well_formed_npz_members_are_read_whole_and_right(zip_reads):
    """The bounded read is not short: members are read exactly, the compressed one included (stored
    members are read in place, without zipfile)."""
    x = np.linspace(-2, 2, 1001)
    alpha = np.array([[0.5], [2.0]])
    for saver, through_zipfile in ((np.savez, 0), (np.savez_compressed, len(_npy_header((1001,))) + x.nbytes)):
        b = io.BytesIO()
        saver(b, x=x, alpha=alpha)
        arrays = decode_npz(b.getvalue(), limits=_limits())
        np.testing.assert_array_equal(arrays["x"], x)
        np.testing.assert_array_equal(arrays["alpha"], alpha)
        assert zip_reads.returned("x.npy") == through_zipfile
        zip_reads.calls.clear()


# -- 4. too many members: refused before zipfile parses the archive ------------------------------------

class ZipFileSpy:
    """Stands in for ``zipfile`` inside the npy module only: counts the archives it opens."""

    def __init__(self) -> None:
        self.opened = 0

    def ZipFile(self, *args: Any, **kwargs: Any) -> zipfile.ZipFile:  # (zipfile's name)
        self.opened += 1
        return zipfile.ZipFile(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(zipfile, name)


@pytest.fixture
def zip_spy(monkeypatch: pytest.MonkeyPatch) -> ZipFileSpy:
    spy = ZipFileSpy()
    monkeypatch.setattr(npy_module, "zipfile", spy)
    return spy


def _npz_of(members: int, compressed: bool = False) -> bytes:
    arrays = {"x": np.zeros(2), **{f"m{i}": np.zeros(1) for i in range(members - 1)}}
    b = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(b, **arrays)
    return b.getvalue()


@pytest.mark.parametrize("members", [MAX_NPZ_MEMBERS + 1, 200])
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
async def test_too_many_npz_members_are_refused_before_zipfile_parses_them(zip_spy, members, compressed):
    body = _npz_of(members, compressed)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:  # (the real module: the spy sees only the decoder's use)
        assert len(zf.infolist()) == members
    with pytest.raises(ApiError) as info:
        decode_npz(body, limits=_limits())
    assert info.value.status == 422 and info.value.code == "too_large"
    assert f"{members} members" in info.value.message and str(MAX_NPZ_MEMBERS) in info.value.message
    assert zip_spy.opened == 0  # refused from the end-of-central-directory record alone


@pytest.mark.parametrize(("compressed", "opened"), [(False, 0), (True, 1)], ids=["stored-in-place", "deflated"])
async def test_exactly_max_npz_members_are_parsed_and_decoded(zip_spy, compressed, opened):
    arrays = decode_npz(_npz_of(MAX_NPZ_MEMBERS, compressed), limits=_limits())
    assert len(arrays) == MAX_NPZ_MEMBERS and zip_spy.opened == opened
    np.testing.assert_array_equal(arrays["x"], np.zeros(2))


async def test_too_many_npz_members_sent_to_v1_are_422_without_parsing(zip_spy):
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/grad", content=_npz_of(MAX_NPZ_MEMBERS + 1), headers={"content-type": NPZ})
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_large"
            assert zip_spy.opened == 0
            x = np.array([-1.5, -0.5, 0.0, 0.25])
            b = io.BytesIO()
            np.savez_compressed(b, x=x)
            r = await c.post("/v1/grad", content=b.getvalue(), headers={"content-type": NPZ})
            assert r.status_code == 200 and zip_spy.opened == 1
            assert r.json()["grad"] == grad_ref(x).tolist()


# -- data after the end of a compressed body ---------------------------------------------------------

@pytest.mark.parametrize("piece", [None, 7], ids=["one-message", "7-byte-messages"])
@pytest.mark.parametrize(("encoding", "tail"), [
    ("gzip", b"trailing garbage"),
    ("gzip", gzip.compress(b"[1.0]")),  # a second member
    ("gzip", b"\0"),  # one byte is enough
    ("deflate", b"trailing garbage"),
])
async def test_data_after_the_end_of_a_compressed_body_is_400_naming_content_encoding(encoding, tail, piece):
    raw = b'{"x": [1.0, 2.0]}'
    packed = _compress(raw, encoding)
    assert await _read(packed, {"content-encoding": encoding}, 1 << 20, RecordingTicket(), piece=piece) == raw
    with pytest.raises(ApiError) as info:
        await _read(packed + tail, {"content-encoding": encoding}, 1 << 20, RecordingTicket(), piece=piece)
    assert info.value.status == 400
    assert f"Content-Encoding {encoding}" in info.value.message
    assert "after the end" in info.value.message


# -- a declared length reserves nothing; bytes are held as they arrive --------------------------------

async def _read_until_gone(pieces: list[bytes], declared: int, ticket: Any, *, tail: dict | None = None) -> Exception:
    """``read_body`` of a body declared ``declared`` bytes long that sends ``pieces``, then
    disconnects (with ``tail`` as the disconnect message); what it raised."""
    messages = [{"type": "http.request", "body": p, "more_body": True} for p in pieces]
    messages.append(tail or {"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    head = Head({"headers": [(b"content-length", str(declared).encode())]})
    with pytest.raises(Exception) as info:
        await read_body(receive, head, 64 << 20, ticket, into_buffer=True)
    return info.value


@pytest.mark.parametrize("declared", [10, 60 << 20], ids=["10-bytes", "60-MiB"])
async def test_a_declared_length_reserves_nothing_before_its_bytes_arrive(declared):
    budget = MemoryBudget(64 << 20)
    assert budget.try_acquire(32 << 20)  # others hold half the budget: a 60 MiB body still starts
    ticket = Ticket(budget)
    assert isinstance(await _read_until_gone([], declared, ticket), compute.ClientGone)
    assert ticket.held == 0 and budget.peak == 32 << 20


async def test_the_reservation_grows_with_what_arrived():
    budget = MemoryBudget(64 << 20)
    held = []

    class Watching(Ticket):
        def require(self, total: int, what: str, *, status: int = 422) -> None:
            super().require(total, what, status=status)
            held.append(self.held)

    ticket = Watching(budget)
    err = await _read_until_gone([b"a" * (1 << 20)] * 3, 60 << 20, ticket)
    assert isinstance(err, compute.ClientGone)
    assert held == [1 << 20, 2 << 20, 3 << 20]  # what arrived, never the declared 60 MiB
    assert budget.peak == 3 << 20


async def test_a_body_that_does_not_fit_beside_others_is_503_once_its_bytes_pass_what_is_free():
    budget = MemoryBudget(4 << 20)
    assert budget.try_acquire(3 << 20)
    ticket = Ticket(budget)
    err = await _read_until_gone([b"a" * (512 << 10), b"a" * (512 << 10), b"a" * 1], 3 << 20, ticket)
    assert isinstance(err, ApiError)
    assert err.status == 503 and err.reason == "memory"
    assert ticket.held == 1 << 20  # the first MiB fitted
    ticket.release()


async def test_a_declared_length_larger_than_the_whole_budget_is_refused_at_once():
    budget = MemoryBudget(4 << 20)
    ticket = Ticket(budget)
    err = await _read_until_gone([], (4 << 20) + 1, ticket)
    assert isinstance(err, ApiError)
    assert err.status == 413 and "memory budget" in err.message
    assert budget.peak == 0


async def test_a_body_the_server_refused_while_it_was_read_is_counted_under_its_reason():
    """The HTTP protocol ends a body that stalls (408) or whose trailers are too large (431): the
    disconnect it hands the app says so."""
    refusal = (408, "request_timeout", "no byte of the request body arrived for 10 s (SURROGATE_BODY_TIMEOUT)")
    tail = {"type": "http.disconnect", httpproto.REFUSED_KEY: refusal}
    err = await _read_until_gone([b"a" * 100], 1000, RecordingTicket(), tail=tail)
    assert isinstance(err, ApiError)
    assert (err.status, err.code, err.reason, err.message) == (408, "request_timeout", "request_timeout", refusal[2])
    assert err.headers == {"Connection": "close"}
