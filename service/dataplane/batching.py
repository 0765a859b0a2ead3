"""Cross-request dynamic batching in front of the engine.

Requests submit their jobs; jobs that arrive close together are concatenated into one engine call
(one device call per op, surrogate and dtype) and the results split back, like Triton's dynamic
batcher. A request alone in the service is dispatched at once (no added latency); while others are in
progress, the requests that reach the batcher in the same turn of the event loop are gathered into
one batch (and, while a batch computes in a worker thread, the arrivals within ``max_delay``
seconds). The queue is bounded:
past ``max_queue`` waiting requests, ``submit`` refuses at once with ``Overloaded`` (503 with
Retry-After) instead of letting latency grow without bound. Batches that need a variant not compiled
yet, and batches above ``offload_elements`` whose device time is unknown or expected over
``offload_seconds``, compute in a worker thread, so neither long computations nor compilations block
the event loop; the others compute inline, which is cheaper than a thread hop (a hop there and back
costs about as much as computing a few hundred thousand elements of a cheap surrogate). The expected
time comes from the batches computed so far: per op, surrogate and dtype, seconds per element.
A failure in a device call fails only the requests of that batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np

import surrogate_core as core

__all__ = ["Batcher", "Overloaded", "BatchStats", "Timing"]

log = logging.getLogger("service.batching")


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    failures: int = 0
    rejected: int = 0
    skipped: int = 0  # batches not computed: every request had gone before their turn


class DeviceTimes:
    """Seconds per element of each kind of job (op, surrogate, dtype), measured on the batches of
    one kind with at least ``min_elements`` elements (where the per-call overhead no longer counts)
    and averaged with the earlier ones: a slow or a fast outlier is corrected by the next batch."""

    def __init__(self, min_elements: int = 4096) -> None:
        self.min_elements = min_elements
        self._per_element: dict[tuple[str, str, str], float] = {}

    @staticmethod
    def _kind(job: core.Job) -> tuple[str, str, str]:
        return job.op, job.surrogate, job.dtype

    def expected(self, jobs: Sequence[core.Job]) -> float | None:
        """The seconds ``jobs`` are expected to take on the device; None if a kind was never measured."""
        total = 0.0
        for j in jobs:
            per = self._per_element.get(self._kind(j))
            if per is None:
                return None
            total += per * j.size
        return total

    def record(self, jobs: Sequence[core.Job], elements: int, seconds: float) -> None:
        if elements < self.min_elements:
            return
        kind = self._kind(jobs[0])
        if any(self._kind(j) != kind for j in jobs):
            return  # a mixed batch says nothing of one kind alone
        per = seconds / elements
        old = self._per_element.get(kind)
        self._per_element[kind] = per if old is None else (old + per) / 2


@dataclass
class _Item:
    jobs: Sequence[core.Job]
    elements: int
    future: asyncio.Future = field(repr=False)
    seconds: float = 0.0  # its batch's time, once computed


class Timing:
    """What ``Batcher.submit`` tells of a request's computation: ``seconds``, the time of the engine
    call that computed it (with the other requests of its batch; for a batch in a worker thread,
    from its dispatch)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


class Batcher:
    def __init__(
        self,
        engine: core.Engine,
        *,
        max_delay: float = 0.0002,
        max_batch_elements: int = 1 << 20,
        max_queue: int = 256,
        offload_elements: int = 16384,
        offload_seconds: float = 0.0003,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_execution: Callable[[Sequence[core.Job]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_delay = max_delay
        self.max_batch_elements = max_batch_elements
        self.max_queue = max_queue
        self.offload_elements = offload_elements
        self.offload_seconds = offload_seconds
        self.times = DeviceTimes()
        self.on_batch = on_batch
        self.on_execution = on_execution  # each engine call's jobs (the per-model statistics)
        self.stats = BatchStats()
        self._pending: list[_Item] = []
        self._pending_elements = 0
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._in_flight = 0  # batches computing in worker threads
        self._waiting = 0  # requests submitted and not yet answered
        self._tasks: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        """Requests submitted and not yet answered (queued or computing)."""
        return self._waiting

    async def submit(self, jobs: Sequence[core.Job], *, alone: bool = False,
                     timing: Timing | None = None) -> list[np.ndarray]:
        """The results of ``jobs``. ``alone``: no other request is in progress, so there is nothing
        to gather with (a warm, small batch then computes at once, inline). Otherwise the request
        joins the next batch: every request that reaches the batcher in the same turn of the event
        loop (or, while a batch computes in a worker thread, within ``max_delay``) is computed in
        the same device call. ``timing``, when given, learns the engine call's time."""
        if self._waiting >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"{self._waiting} requests in the queue (limit {self.max_queue})")
        elements = sum(j.size for j in jobs)
        if alone and not self._pending and not self._in_flight and self._inline(jobs, elements):
            # Nothing to gather with: answer at once, inline (no future, no extra turn of the event loop).
            t0 = time.perf_counter()
            try:
                results = self.engine.run(jobs)
            except Exception as exc:
                self._count_failure(1, exc)
                raise DeviceError(exc) from exc
            seconds = time.perf_counter() - t0
            self._computed(1, jobs, elements, seconds, seconds)
            if timing is not None:
                timing.seconds = seconds
            return results
        loop = asyncio.get_running_loop()
        item = _Item(jobs, elements, loop.create_future())
        self._waiting += 1
        try:
            if item.elements >= self.max_batch_elements:
                self._dispatch([item])  # a big request is a batch of its own
            else:
                self._pending.append(item)
                self._pending_elements += item.elements
                if self._pending_elements >= self.max_batch_elements:
                    self._flush()
                elif self._handle is None:
                    if self.max_delay <= 0 or not self._in_flight:
                        # the device is free: gather what arrives in this turn of the loop, no more
                        self._handle = loop.call_soon(self._flush)
                    else:  # the device is busy anyway: gather arrivals for a while
                        self._handle = loop.call_later(self.max_delay, self._flush)
            results = await item.future
            if timing is not None:
                timing.seconds = item.seconds
            return results
        finally:
            self._waiting -= 1
            # a failure's traceback holds this frame: the future (which holds the failure) is
            # not kept in it, or the three would make a cycle that pins the jobs
            item = None  # type: ignore[assignment]

    def _inline(self, jobs: Sequence[core.Job], elements: int) -> bool:
        """Whether a batch computes on the event loop: compiled, and small or measured to be quick."""
        if elements > self.offload_elements:
            expected = self.times.expected(jobs)
            if expected is None or expected >= self.offload_seconds:
                return False  # (asked first: a batch bound for a thread is not planned here, nor kept in a plan)
        return self.engine.is_compiled(jobs)

    def _computed(self, requests: int, jobs: Sequence[core.Job], elements: int, seconds: float,
                  device: float | None) -> None:
        """A batch of ``requests`` computed in ``seconds``: counted, its jobs reported to
        ``on_execution``, and ``device`` (the engine call alone; None when it compiled) measured for
        where later batches of its kind compute."""
        self.stats.batches += 1
        self.stats.requests += requests
        if self.on_batch is not None:
            self.on_batch(requests, elements, seconds)
        if self.on_execution is not None:
            self.on_execution(jobs)
        if device is not None:
            self.times.record(jobs, elements, device)

    def _count_failure(self, requests: int, exc: Exception) -> None:
        self.stats.failures += 1
        log.error("device call failed for a batch of %d request(s): %r", requests, exc)

    def _flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        items, self._pending, self._pending_elements = self._pending, [], 0
        items = [it for it in items if not it.future.done()]  # cancelled while waiting
        if items:
            self._dispatch(items)

    def _dispatch(self, items: list[_Item]) -> None:
        jobs = [j for it in items for j in it.jobs]
        total = sum(it.elements for it in items)
        if not self._inline(jobs, total):
            # long, or needs a compilation first: either would hold the event loop too long
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run_thread(items, jobs, total))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            t0 = time.perf_counter()
            try:
                results = self.engine.run(jobs)
            except Exception as exc:
                self._fail(items, exc)
            else:
                seconds = time.perf_counter() - t0
                self._deliver(items, jobs, results, total, seconds, seconds)

    async def _run_thread(self, items: list[_Item], jobs: list[core.Job], total: int) -> None:
        t0 = time.perf_counter()
        device: list[float] = []  # the engine call's own time, unless it compiled

        def run() -> list[np.ndarray] | None:
            # a worker thread may start this long after it was queued: if every request of the
            # batch has gone (timed out, disconnected) meanwhile, its work is not done at all
            if all(it.future.done() for it in items):
                self.stats.skipped += 1
                return None
            compiled = self.engine.stats.compilations
            start = time.perf_counter()
            results = self.engine.run(jobs)
            if self.engine.stats.compilations == compiled:  # a call that compiled says nothing of its device time
                device.append(time.perf_counter() - start)
            return results

        try:
            results = await anyio.to_thread.run_sync(run)
        except Exception as exc:
            self._fail(items, exc)
        else:
            if results is not None:
                self._deliver(items, jobs, results, total, time.perf_counter() - t0, device[0] if device else None)
        finally:
            self._in_flight -= 1

    def _deliver(self, items: list[_Item], jobs: list[core.Job], results: list[np.ndarray], total: int,
                 seconds: float, device: float | None) -> None:
        self._computed(len(items), jobs, total, seconds, device)
        o = 0
        for it in items:
            k = len(it.jobs)
            if not it.future.done():
                it.seconds = seconds
                it.future.set_result(results[o:o + k])
            o += k

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        self._count_failure(len(items), exc)
        for it in items:
            if not it.future.done():
                it.future.set_exception(DeviceError(exc))

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for every submitted request to be answered."""
        deadline = time.monotonic() + timeout
        if self._pending:
            self._flush()
        while (self._waiting or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class DeviceError(Exception):
    """A device call failed; ``cause`` is the original exception."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        # the cause is kept for its type and message only: its traceback (the frames of the device
        # call, which hold the jobs of every request of the batch) is let go
        if cause.__traceback__ is not None:
            traceback.clear_frames(cause.__traceback__)
        self.cause = cause.with_traceback(None)
        cause.__context__ = cause.__cause__ = None

    @property
    def resource_exhausted(self) -> bool:
        text = f"{type(self.cause).__name__} {self.cause}".lower()
        return isinstance(self.cause, MemoryError) or any(
            s in text for s in ("resource_exhausted", "resource exhausted", "out of memory", "oom when allocating"))
