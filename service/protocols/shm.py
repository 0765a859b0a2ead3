"""Triton's system shared-memory extension: regions of POSIX shared-memory objects that requests
read their inputs from and write their outputs into, on the same host, without the bytes crossing
the socket.

A client creates a shared-memory object (``shm_open``; ``tritonclient.utils.shared_memory`` does
it), writes its inputs there and registers a window of it as a named **region** (``key``, ``offset``,
``byte_size``). ``Regions.register`` opens the object by its key, checks that the window lies within
it and maps the window (``mmap``, shared, read-write); the region's bytes count against the memory
budget while it is registered. An infer request then names a region, an offset into it and a byte
size in a tensor's parameters (``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``): an input is read from the mapping in place (``np.frombuffer``, no copy),
an output written into it.

Each use is a **lease**: an array over the mapping (a request's input, or its output's target);
while it or any view of it lives, the region stays mapped. ``unregister`` takes the name away at
once (the name is free, the region's bytes leave the budget, a request that names it is refused)
and unmaps it when its last lease is gone, so that a request under way never reads or writes
memory that was unmapped. Every mapping is gone after ``unregister()`` once the requests in flight
are: the app's lifespan calls it at shutdown.

One hazard is outside what a mapping can guard: a client that shrinks (``ftruncate``) its own object
while a request reads it. The object's size is checked each time a request takes a lease, which
refuses (400) every request after the shrink.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import stat
import threading
import weakref
from typing import Any

import numpy as np

from ..dataplane.memory import MemoryBudget
from ..errors import ApiError, shown, shown_field

__all__ = ["MAX_NAME_BYTES", "Regions", "Target", "off_error"]

#: The longest region name (UTF-8 bytes): it is echoed in status answers and error messages.
MAX_NAME_BYTES = 256
#: A shared-memory key: one name under the host's shared-memory folder, with or without the leading
#: ``/`` (``shm_open`` reads both alike): no other ``/``, no NUL, not ``.`` or ``..``, at most 255 bytes.
_KEY = re.compile(r"/?[^/\x00]{1,255}")


def _bad(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, message, field=shown_field(field) if field else field, code="invalid_value")


def off_error(code: str = "invalid_value") -> ApiError:
    """The 400 for any use of shared memory on a server that has it off (``code``: gRPC answers its
    ``shared_memory_off`` as UNIMPLEMENTED)."""
    return ApiError(400, "system shared memory is off on this server (start it with SURROGATE_SHARED_MEMORY=true to "
                    "use shared-memory regions)", field="shared_memory_region", code=code)


class _Region:
    """One registered window of a shared-memory object, mapped."""

    __slots__ = ("name", "key", "offset", "byte_size", "mm", "start", "uses", "retired", "held", "__weakref__")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mm: mmap.mmap, start: int) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self.mm = mm  # maps the object from ``offset - start`` (a page boundary) to ``offset + byte_size``
        self.start = start  # where the region starts in the mapping
        self.uses = 0  # leases alive
        self.retired = False  # unregistered (unmapped once ``uses`` is 0)
        self.held = 0  # bytes of the memory budget held for it

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class Target:
    """Where an output goes: ``byte_size`` bytes at ``offset`` in region ``region`` (leased: the
    mapping stays while this lives). ``write(result, dtype, name)`` puts the result there."""

    __slots__ = ("region", "offset", "byte_size", "_owner", "_bytes")

    def __init__(self, owner: _Region, offset: int, byte_size: int, leased: np.ndarray) -> None:
        self.region = owner.name
        self.offset = offset
        self.byte_size = byte_size
        self._owner = owner
        self._bytes = leased  # the target's bytes (uint8), leased

    def parameters(self) -> dict[str, Any]:
        """The output's parameters in the answer (its data is in the region, none in the answer)."""
        return {"shared_memory_region": self.region, "shared_memory_offset": self.offset,
                "shared_memory_byte_size": self.byte_size, "binary_data": False}

    def write(self, result: np.ndarray, dtype: np.dtype, name: str) -> None:
        """``result`` as ``dtype`` (row-major) at the start of the target; 400 when the region was
        unregistered since the request began (nothing is written then)."""
        if self._owner.retired:
            raise _bad(f"output {shown(name)}: shared memory region {shown(self.region)} was unregistered while "
                       "this request used it; the output was not written", name)
        out = self._bytes[:result.size * dtype.itemsize].view(dtype).reshape(result.shape)
        np.copyto(out, result, casting="unsafe")


class Regions:
    """The registered regions of one server (``runtime.shm``; None when shared memory is off).

    ``register``/``unregister``/``status`` run on the event loop (the memory budget is the loop's);
    leases (``input_array``, ``output_target``) may be taken and dropped in any thread."""

    def __init__(self, budget: MemoryBudget, max_regions: int) -> None:
        self.budget = budget
        self.max_regions = max_regions
        self._regions: dict[str, _Region] = {}
        self._retired: set[_Region] = set()  # unregistered, still leased
        self._lock = threading.RLock()  # (a lease may be given back by the collector inside a locked block)

    # -- the extension's operations ------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the shared-memory object ``key`` as region ``name``.
        400 naming the field for a bad or taken name, a key with no object, a window past the
        object's end or too many regions; the bytes must fit the memory budget (400 past the whole
        budget, 503 while requests in flight hold it). Nothing stays mapped when it fails."""
        _check_name(name)
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise _bad(f"key {shown(key)} is not a shared-memory key: one name of 1 to 255 characters, with or "
                       "without a leading '/', and no other '/'", "key")
        for field, v, least in (("offset", offset, 0), ("byte_size", byte_size, 1)):
            if type(v) is not int or v < least:
                raise _bad(f"{field} must be an integer >= {least}, got {shown(v)}", field)
        with self._lock:
            if name in self._regions:
                raise _bad(f"shared memory region {shown(name)} is already registered; unregister it first", "name")
            if len(self._regions) >= self.max_regions:
                raise _bad(f"{len(self._regions)} shared memory regions are registered, the most this server takes "
                           f"(SURROGATE_SHARED_MEMORY_MAX_REGIONS); unregister one first", "name")
        held = self._hold(name, byte_size)
        try:
            mm, start = _map(key, offset, byte_size)
        except BaseException:
            self.budget.release(held)
            raise
        region = _Region(name, key, offset, byte_size, mm, start)
        region.held = held
        with self._lock:
            taken = name in self._regions
            if not taken:
                self._regions[name] = region
        if taken:  # (registered meanwhile under the same name)
            _unmap(region)
            self.budget.release(held)
            raise _bad(f"shared memory region {shown(name)} is already registered; unregister it first", "name")

    def _hold(self, name: str, byte_size: int) -> int:
        """Hold ``byte_size`` bytes of the memory budget for region ``name``, or refuse it."""
        b = self.budget
        with self._lock:
            regions = sum(r.held for r in self._regions.values())
        if regions + byte_size > b.capacity:
            raise _bad(f"byte_size {byte_size}: with the {regions} bytes of the regions registered, more than the "
                       f"server's memory budget of {b.capacity} bytes (SURROGATE_MEMORY_BUDGET); register a smaller "
                       "region or unregister one", "byte_size")
        if not b.try_acquire(byte_size):
            raise ApiError(
                503, f"the memory budget is in use by requests in flight ({b.in_use} of {b.capacity} bytes; region "
                f"{shown(name)} needs {byte_size}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="memory",
            )
        return byte_size

    def unregister(self, name: str | None = None) -> None:
        """Take region ``name`` (every region for None) away: its name is free at once, its bytes
        leave the budget, and it is unmapped as soon as no request uses it. A name that is not
        registered is no error (as Triton has it)."""
        with self._lock:
            if name is None:
                gone = list(self._regions.values())
                self._regions.clear()
            else:
                region = self._regions.pop(name, None)
                gone = [region] if region is not None else []
            for region in gone:
                region.retired = True
                if region.uses:
                    self._retired.add(region)
                else:
                    _unmap(region)
        for region in gone:
            if region.held:
                self.budget.release(region.held)
                region.held = 0

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """``[{"name", "key", "offset", "byte_size"}]`` of region ``name`` (404 when it is not
        registered), or of every region (by name) for None."""
        with self._lock:
            if name is None:
                return [self._regions[n].describe() for n in sorted(self._regions)]
            region = self._regions.get(name)
            if region is None:
                raise ApiError(404, f"no shared memory region {shown(name)} is registered", field=shown_field(name))
            return [region.describe()]

    # -- what requests use ---------------------------------------------------------------------------
    def input_array(self, what: str, params: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The input ``what`` (its name) of ``shape`` and ``dtype`` read in place from the region its
        parameters name (a read-only view: the region stays mapped while it lives). 400 naming the
        input when the region is not registered, or the bytes are past its end or are not the
        tensor's size."""
        region_name, offset, size = _tensor_params(what, params, "input")
        need = math.prod(shape) * dtype.itemsize
        if size != need:
            raise _bad(f"input {shown(what)}: shared_memory_byte_size {size} does not match shape {list(shape)} "
                       f"({need} bytes)", what)
        a, _ = self._lease(region_name, offset, size, "input", what, dtype)
        a.flags.writeable = False
        return a.reshape(shape)

    def output_target(self, what: str, params: dict[str, Any], need: int) -> Target:
        """Where output ``what`` of ``need`` bytes goes, leased; 400 naming the output when the
        region is not registered, or ``shared_memory_byte_size`` cannot hold it or is past its end."""
        region_name, offset, size = _tensor_params(what, params, "output")
        if size < need:
            raise _bad(f"output {shown(what)}: shared_memory_byte_size {size} cannot hold the output ({need} bytes)",
                       what)
        leased, region = self._lease(region_name, offset, size, "output", what, np.dtype(np.uint8))
        return Target(region, offset, size, leased)

    def _lease(self, region_name: str, offset: int, size: int, kind: str, what: str, dtype: np.dtype
               ) -> tuple[np.ndarray, _Region]:
        """The ``size`` bytes at ``offset`` of the region as a flat array of ``dtype``, and the
        region: one use, given back when the array and every view of it are gone."""
        with self._lock:
            region = self._regions.get(region_name)
            if region is None:
                raise _bad(f"{kind} {shown(what)}: no shared memory region {shown(region_name)} is registered", what)
            if offset + size > region.byte_size:
                raise _bad(f"{kind} {shown(what)}: shared_memory_offset {offset} + shared_memory_byte_size {size} is "
                           f"past the end of region {shown(region_name)} ({region.byte_size} bytes)", what)
            try:
                have = region.mm.size()
            except OSError:
                have = -1
            if have < region.offset + region.byte_size:
                raise _bad(f"{kind} {shown(what)}: the shared memory object {shown(region.key)} of region "
                           f"{shown(region_name)} is smaller than the region now; register it again", what)
            a = np.frombuffer(region.mm, dtype=dtype, count=size // dtype.itemsize, offset=region.start + offset)
            region.uses += 1
            weakref.finalize(a, self._settle, region)
        return a, region

    def _settle(self, region: _Region) -> None:
        with self._lock:
            region.uses -= 1
            if region.uses == 0 and region.retired:
                self._retired.discard(region)
                _unmap(region)

    # -- what tests and metrics read ---------------------------------------------------------------
    @property
    def mapped(self) -> int:
        """Regions mapped now: registered, or unregistered and still in use."""
        with self._lock:
            return len(self._regions) + len(self._retired)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise _bad("a region's name must be a non-empty string", "name")
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _bad(f"region name {shown(name)} is longer than {MAX_NAME_BYTES} bytes (UTF-8)", "name")


def _tensor_params(what: str, params: dict[str, Any], kind: str) -> tuple[str, int, int]:
    """A tensor's ``shared_memory_region``, ``shared_memory_offset`` (0 when absent) and
    ``shared_memory_byte_size``, checked."""
    region = params.get("shared_memory_region")
    if not isinstance(region, str) or not region:
        raise _bad(f"{kind} {shown(what)}: shared_memory_region must be a region's name, got {shown(region)}", what)
    offset = params.get("shared_memory_offset", 0)
    size = params.get("shared_memory_byte_size")
    if size is None:
        raise _bad(f"{kind} {shown(what)}: shared_memory_byte_size is required with shared_memory_region", what)
    for field, v in (("shared_memory_offset", offset), ("shared_memory_byte_size", size)):
        if type(v) is not int or v < 0:
            raise _bad(f"{kind} {shown(what)}: {field} must be a non-negative integer, got {shown(v)}", what)
    return region, offset, size


def _map(key: str, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
    """Open the shared-memory object ``key`` and map ``byte_size`` bytes at ``offset`` of it (from
    the page boundary below ``offset``): the mapping and where ``offset`` is in it. The object's
    descriptor is closed either way (the mapping keeps its own)."""
    import _posixshmem  # type: ignore[import-not-found]  # (what multiprocessing.shared_memory opens with)

    try:
        fd = _posixshmem.shm_open("/" + key.lstrip("/"), os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise _bad(f"key {shown(key)}: no shared memory object of that key exists (create it first, e.g. with "
                   "tritonclient.utils.shared_memory.create_shared_memory_region)", "key") from None
    except OSError as exc:
        raise _bad(f"key {shown(key)}: the shared memory object cannot be opened ({exc.strerror})", "key") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(f"key {shown(key)} is not a shared memory object", "key")
        if offset + byte_size > st.st_size:
            raise _bad(f"offset {offset} + byte_size {byte_size} is past the end of the shared memory object "
                       f"{shown(key)} ({st.st_size} bytes)", "byte_size")
        start = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, start + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=offset - start)
        except OSError as exc:
            raise _bad(f"key {shown(key)}: the shared memory object cannot be mapped ({exc.strerror})", "key") from None
        return mm, start
    finally:
        os.close(fd)


def _unmap(region: _Region) -> None:
    with contextlib.suppress(BufferError):  # a view outlives its lease: the mapping goes with the last view
        region.mm.close()
