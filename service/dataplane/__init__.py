"""The data plane: jobs in, results out, under the service's limits. It knows no HTTP and no protocol.

It owns
- **admission**: at most ``max_concurrent`` requests at once (past it an immediate ``overloaded``
  error), each within ``request_timeout`` seconds from admission to its last byte, and each holding
  a **memory reservation** (a ``Ticket``) against the memory budget from before its body is read
  until its last byte is sent: the body first, then what decoding makes, then the working set of
  its jobs (inputs, padded buffers, results, the encoded answer). Past the budget an immediate
  ``overloaded`` error (``reason="memory"``); larger than the whole budget, ``too_large``;
- **the job checks** that do not depend on the protocol: the element limit over all jobs, zero-size
  dimensions counted (an answer of 100,000,000 empty lists is not small), and the cost limit (work
  per element grows with some parameters, e.g. the ``n`` terms of a Fourier series);
- **the batcher** (``batching.Batcher``): concurrent requests fused into one device call, a bounded
  queue (``overloaded`` past it), large batches and cold variants computed in a worker thread;
- **the error kinds** raised as ``ApiError`` with their code: ``overloaded``, ``timeout``,
  ``device_out_of_memory``, ``device_error``, ``not_representable``; the protocol adapters render
  them in their own shapes;
- the request-independent **metrics** (elements, rejections, in flight, device failures);
- the per-model **statistics** (``stats.Stats``, Triton's statistics extension) of every request
  it serves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread
import numpy as np

import surrogate_core as core

from ..errors import ApiError
from ..server.settings import Settings
from .batching import Batcher, DeviceError, Overloaded, Timing
from .limits import Limits
from .memory import MemoryBudget, budget_from_settings
from .metrics import Metrics
from .stats import Mark, Stats

__all__ = ["OFFLOAD_BYTES", "Admission", "DataPlane", "Deadlines", "Limits", "Ticket", "working_set"]

log = logging.getLogger("service.dataplane")

class DataPlane:
    def __init__(self, settings: Settings, engine: core.Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.batcher = Batcher(
            engine,
            max_delay=settings.batch_max_delay,
            max_batch_elements=settings.batch_max_elements,
            max_queue=settings.max_queue,
            offload_elements=settings.offload_elements,
            offload_seconds=settings.offload_seconds,
        )
        self.metrics = Metrics(engine, lambda: self.batcher.depth)
        self.batcher.on_batch = self.metrics.on_batch
        self.stats = Stats()
        self.batcher.on_execution = self.stats.executed
        self.in_flight = 0
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        capacity, self.budget_source = budget_from_settings(settings.memory_budget)
        self.budget = MemoryBudget(capacity)
        self.max_cost = settings.max_cost
        self.limits = Limits(max_rank=settings.max_rank, max_elements=settings.max_elements,
                             max_cost=settings.max_cost)
        self.max_concurrent = settings.max_concurrent
        self.offload_elements = settings.offload_elements
        self.deadlines = Deadlines(settings.request_timeout)

    def set_budget(self, capacity: int, source: str) -> None:
        """Resize the memory budget (after the warm-up, when the process's own footprint is known)."""
        self.budget.capacity = capacity
        self.budget_source = source

    # -- admission ---------------------------------------------------------------------------
    def admission(self) -> Admission:
        """``with dp.admission() as ticket:`` one admitted request: refused at once past the
        concurrency limit, cancelled (``timeout``) past the time limit; ``ticket`` holds its memory
        reservation, released when the block ends, whichever way."""
        return Admission(self)

    async def serve(self, codec: Any, request: Any, body: bytes, ticket: Ticket, *, alone: bool | None = None) -> Any:
        """One admitted request given its codec: decode -> the limits -> infer -> encode. Large
        bodies are decoded, and large answers encoded, in a worker thread (the event loop stays free);
        small ones inline, which is cheaper than a thread hop. ``alone``: whether the server has no
        other request in progress (started or about to start), where the server says; else the
        requests admitted here are counted.

        Each request is counted in the per-model statistics (``stats``): under the models of its
        jobs once decoded (each job an inference of its own where the codec's errors name job
        indices, ``/v1``; else the request one inference of its model), and before that, when it
        fails, under its request's ``model`` (a ``core.Surrogate``), where the codec's request has one."""
        mark = Mark(time.perf_counter_ns())
        try:
            answer = await self._serve(codec, request, body, ticket, alone, mark)
        except BaseException:  # (not bound to a name: the frame holds no exception)
            self.stats.failed(request, mark)
            raise
        self.stats.succeeded(mark, codec.job_index, time.perf_counter_ns())
        return answer

    async def _serve(self, codec: Any, request: Any, body: bytes, ticket: Ticket, alone: bool | None,
                     mark: Mark) -> Any:
        size = len(body)
        parsed = size + codec.parse_bytes(request, body)
        ticket.require(parsed, "decoding a body")
        if size > OFFLOAD_BYTES:
            decoded = await anyio.to_thread.run_sync(codec.decode, request, body)
        else:
            decoded = codec.decode(request, body)
        jobs = mark.jobs = decoded.jobs
        n = self.check(jobs, where=lambda i: codec.where(decoded, i), job_index=codec.job_index)
        answer = 0  # (small requests: small answers)
        if n <= SMALL_ELEMENTS:  # a cheap bound for small requests: padded buffers and answers are small
            ticket.require(parsed + SMALL_JOB_BYTES * len(jobs) + 96 * n + codec.extra_bytes(decoded), "this request")
        else:
            answer = codec.answer_bytes(decoded)
            ticket.require(parsed + working_set(jobs) + answer, "this request")
        mark.t1 = time.perf_counter_ns()
        results = await self.infer(jobs, codec.endpoint, alone=alone, timing=mark)
        mark.t2 = time.perf_counter_ns()
        # a large answer to write, or many numbers to write as text (a binary answer is a copy at most)
        if answer > OFFLOAD_BYTES or (n > self.offload_elements and not codec.binary_answer(decoded)):
            return await anyio.to_thread.run_sync(codec.encode, decoded, results)
        return codec.encode(decoded, results)

    def check(self, jobs: Sequence[core.Job], *, where: Callable[[int], str], job_index: bool = True) -> int:
        """The limits of a request's jobs (``Limits.jobs``). Returns the elements."""
        return self.limits.jobs(jobs, where=where, job_index=job_index)

    # -- compute -----------------------------------------------------------------------------
    async def infer(self, jobs: Sequence[core.Job], endpoint: str, *, alone: bool | None = None,
                    timing: Timing | None = None) -> list[np.ndarray]:
        """The results of ``jobs``, in order (through the batcher, which computes a request alone at
        once and gathers concurrent ones into one device call); ``timing`` learns the engine call's
        time."""
        # the errors are raised after their ``except`` blocks: a frame left by an exception raised
        # inside one holds the exception caught, whose traceback holds the frame (a cycle)
        overloaded: str | None = None
        failure: bool | None = None  # whether the device ran out of memory, when it failed
        try:
            results = await self.batcher.submit(jobs, alone=self.in_flight <= 1 if alone is None else alone,
                                                timing=timing)
        except Overloaded as exc:
            overloaded = str(exc)
        except DeviceError as exc:
            failure = exc.resource_exhausted
        if overloaded is not None:
            raise ApiError(
                503, f"overloaded: {overloaded}; retry shortly", code="overloaded", headers={"Retry-After": "1"},
                reason="queue",
            )
        if failure is not None:
            self.metrics.device_failures.inc()
            if failure:
                raise ApiError(
                    503, "the device ran out of memory for this batch; retry, or send smaller requests",
                    code="device_out_of_memory", headers={"Retry-After": "1"},
                )
            raise ApiError(
                500, "the computation failed for this batch; the server log has the details", code="device_error"
            )
        self.metrics.count_elements(endpoint, sum(j.size for j in jobs))
        return results


#: Request bodies larger than this are decoded in a worker thread, so the event loop stays free.
OFFLOAD_BYTES = 1 << 20


#: Requests of at most this many elements reserve ``SMALL_JOB_BYTES`` per job plus 96 bytes per element
#: (more than their padded buffers, results and answers take), without working out their working set.
SMALL_ELEMENTS = 1 << 14
SMALL_JOB_BYTES = 1 << 16


class Admission:
    """The admission of one request (``with dp.admission() as ticket:``): a concurrency slot, a
    deadline and a memory ``Ticket``, all given back when the block ends, whichever way.

    The deadline costs no timer per request: the running task is entered in the data plane's
    ``Deadlines``, whose one shared timer cancels the tasks past theirs; the block then ends with
    ``ApiError`` ``timeout`` (503). A cancellation from elsewhere passes through unchanged."""

    __slots__ = ("dp", "ticket", "task")

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp

    def __enter__(self) -> Ticket:
        dp = self.dp
        if dp.in_flight >= dp.max_concurrent:
            raise ApiError(
                503, f"{dp.in_flight} requests in progress (limit {dp.max_concurrent}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="concurrency",
            )
        dp.in_flight += 1
        dp.metrics.in_flight.inc()
        self.task = dp.deadlines.enter()
        self.ticket = ticket = Ticket(dp.budget)
        return ticket

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        dp = self.dp
        self.ticket.release()
        dp.in_flight -= 1
        dp.metrics.in_flight.dec()
        if dp.deadlines.leave(self.task) and kind is asyncio.CancelledError:
            raise ApiError(
                503, f"the request took longer than {dp.settings.request_timeout} s", code="timeout",
                headers={"Retry-After": "1"}, reason="timeout",
            ) from None


class Deadlines:
    """Request deadlines on the event loop with one timer for all: ``enter`` notes the running task
    with its deadline (``timeout`` seconds from now), ``leave`` forgets it and says whether it was
    cancelled for being late. The timer runs only while some request is admitted, every ``tick``
    seconds (a tenth of the timeout, at most 50 ms), so a late request is cancelled within
    ``timeout + tick``."""

    __slots__ = ("timeout", "tick", "_tasks", "_late", "_timer")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(0.05, timeout / 10)
        self._tasks: dict[asyncio.Task[Any], float] = {}
        self._late: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def enter(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._tasks[task] = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._check, loop)
        return task

    def leave(self, task: asyncio.Task[Any]) -> bool:
        self._tasks.pop(task, None)
        if task in self._late:
            self._late.discard(task)
            task.uncancel()
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._tasks.items()):
            if deadline <= now and task not in self._late:
                self._late.add(task)
                task.cancel()
        self._timer = loop.call_later(self.tick, self._check, loop) if self._tasks else None


class Ticket:
    """One request's memory reservation: grows (``require``) as the request learns what it will
    hold; released whole when the request ends."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def require(self, total: int, what: str, *, status: int = 422) -> None:
        """Hold at least ``total`` bytes for this request, or refuse it: 503 ``overloaded`` when the
        budget is in use by others, ``status`` (413 or 422) ``too_large`` when ``total`` is more
        than the whole budget."""
        extra = total - self.held
        if extra <= 0:
            return
        b = self.budget
        self.fits(total, what, status=status)
        if not b.try_acquire(extra):
            raise ApiError(
                503,
                f"the memory budget is in use by requests in flight ({b.in_use} of {b.capacity} bytes; this request "
                f"needs {total}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="memory",
            )
        self.held = total

    def fits(self, total: int, what: str, *, status: int = 422) -> None:
        """Refuse the request (as ``require`` does) when ``total`` is more than the whole budget;
        holds nothing."""
        b = self.budget
        if total > b.capacity:
            raise ApiError(
                status,
                f"{what} needs about {total} bytes of memory, more than the server's whole memory budget of "
                f"{b.capacity} bytes (SURROGATE_MEMORY_BUDGET); send a smaller request",
                code="body_too_large" if status == 413 else "too_large", reason="memory",
            )

    def release(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0


def working_set(jobs: Sequence[core.Job]) -> int:
    """An upper estimate of the bytes ``jobs`` hold from decoding to their results: their input
    arrays, the padded buffers and results of the engine (the encoded answer is the codec's to
    estimate)."""
    total = 0
    for job in jobs:
        item = core.DTYPES[job.dtype].itemsize
        n = job.size
        inputs = [job.x, *job.params.values()] + ([job.cotangent] if job.cotangent is not None else [])
        per_element = sum(1 for a in inputs if a.size > 1)
        total += sum(a.nbytes for a in inputs)
        total += int(n * item * (1.5 * max(per_element, 1) + 1))  # padded arguments, then the result
    return total
