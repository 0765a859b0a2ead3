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
- the request-independent **metrics** (elements, rejections, in flight, device failures).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np

import surrogate_core as core

from ..errors import ApiError
from ..server.settings import Settings
from .batching import Batcher, DeviceError, Overloaded
from .memory import MemoryBudget, budget_from_settings
from .metrics import Metrics

__all__ = ["OFFLOAD_BYTES", "Admission", "DataPlane", "Ticket", "off_loop_if", "working_set"]

log = logging.getLogger("service.dataplane")

T = TypeVar("T")


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
        )
        self.metrics = Metrics(engine, lambda: self.batcher.depth)
        self.batcher.on_batch = self.metrics.on_batch
        self.in_flight = 0
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        capacity, self.budget_source = budget_from_settings(settings.memory_budget)
        self.budget = MemoryBudget(capacity)
        self.max_cost = settings.max_cost

    def set_budget(self, capacity: int, source: str) -> None:
        """Resize the memory budget (after the warm-up, when the process's own footprint is known)."""
        self.budget.capacity = capacity
        self.budget_source = source

    # -- admission ---------------------------------------------------------------------------
    def admission(self) -> Admission:
        """``async with dp.admission() as ticket:`` one admitted request: refused at once past the
        concurrency limit, cancelled (``timeout``) past the time limit; ``ticket`` holds its memory
        reservation, released when the block ends, whichever way."""
        return Admission(self)

    async def serve(self, codec: Any, request: Any, body: bytes, ticket: Ticket) -> Any:
        """One admitted request given its codec: decode -> the limits -> infer -> encode. Large
        bodies are decoded, and large answers encoded, in a worker thread (the event loop stays free);
        small ones inline, which is cheaper than a thread hop."""
        parsed = len(body) + codec.parse_bytes(request, body)
        ticket.require(parsed, f"decoding a {len(body)}-byte body")
        decoded = await off_loop_if(len(body) > OFFLOAD_BYTES, codec.decode, request, body)
        jobs = decoded.jobs
        n = self.check(jobs, where=lambda i: codec.where(decoded, i), job_index=codec.job_index)
        if n <= SMALL_ELEMENTS:  # a cheap bound for small requests: padded buffers and answers are small
            ticket.require(parsed + SMALL_JOB_BYTES * len(jobs) + 96 * n, "this request")
        else:
            ticket.require(parsed + working_set(jobs) + codec.answer_bytes(decoded), "this request")
        results = await self.infer(jobs, codec.endpoint)
        return await off_loop_if(n > self.settings.offload_elements, codec.encode, decoded, results)

    def check(self, jobs: Sequence[core.Job], *, where: Callable[[int], str], job_index: bool = True) -> int:
        """The protocol-neutral limits of a request's jobs, all together: elements (a zero-size
        dimension counts as 1, so an answer's size is bounded too) and cost. Returns the elements."""
        s = self.settings
        total = cost = 0.0
        for i, job in enumerate(jobs):
            n = math.prod(max(d, 1) for d in job.shape)
            total += n
            if total > s.max_elements:
                raise ApiError(
                    422,
                    f"{where(i)}: the request has more than {s.max_elements} elements in all (after broadcasting; "
                    "a zero-size dimension counts as 1), over the limit",
                    job=i if job_index else None, field="x", code="too_large",
                )
            if job.op != "spike":
                c = core.get(job.surrogate).cost_per_element(job.params)
                cost += n * c
                if cost > self.max_cost:
                    raise ApiError(
                        422,
                        f"{where(i)}: {job.surrogate} costs {c:g} units per element here, {cost:.3g} for the request, "
                        f"over the limit of {self.max_cost:.3g} (SURROGATE_MAX_COST); send fewer elements or cheaper "
                        "parameters",
                        job=i if job_index else None, field="x", code="too_large",
                    )
        return int(total)

    # -- compute -----------------------------------------------------------------------------
    async def infer(self, jobs: Sequence[core.Job], endpoint: str) -> list[np.ndarray]:
        """The results of ``jobs``, in order (through the batcher)."""
        try:
            results = await self.batcher.submit(jobs, alone=self.in_flight <= 1)
        except Overloaded as exc:
            raise ApiError(
                503, f"overloaded: {exc}; retry shortly", code="overloaded", headers={"Retry-After": "1"},
                reason="queue",
            ) from None
        except DeviceError as exc:
            self.metrics.device_failures.inc()
            if exc.resource_exhausted:
                raise ApiError(
                    503, "the device ran out of memory for this batch; retry, or send smaller requests",
                    code="device_out_of_memory", headers={"Retry-After": "1"},
                ) from None
            raise ApiError(
                500, "the computation failed for this batch; the server log has the details", code="device_error"
            ) from None
        self.metrics.count_elements(endpoint, sum(j.size for j in jobs))
        return results


#: Request bodies larger than this are decoded in a worker thread, so the event loop stays free.
OFFLOAD_BYTES = 1 << 20


async def off_loop_if(large: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: in a worker thread when ``large`` (so the event loop stays free), else inline
    (cheaper than a thread hop)."""
    if large:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


#: Requests of at most this many elements reserve ``SMALL_JOB_BYTES`` per job plus 96 bytes per element
#: (more than their padded buffers, results and answers take), without working out their working set.
SMALL_ELEMENTS = 1 << 14
SMALL_JOB_BYTES = 1 << 16


class Admission:
    """The admission of one request (``DataPlane.admission``): a concurrency slot, a deadline and a
    memory ``Ticket``."""

    __slots__ = ("dp", "ticket", "timeout")

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp

    async def __aenter__(self) -> Ticket:
        dp = self.dp
        s = dp.settings
        if dp.in_flight >= s.max_concurrent:
            raise ApiError(
                503, f"{dp.in_flight} requests in progress (limit {s.max_concurrent}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="concurrency",
            )
        dp.in_flight += 1
        dp.metrics.in_flight.inc()
        self.ticket = Ticket(dp.budget)
        self.timeout = asyncio.timeout(s.request_timeout)
        await self.timeout.__aenter__()
        return self.ticket

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        dp = self.dp
        self.ticket.release()
        dp.in_flight -= 1
        dp.metrics.in_flight.dec()
        try:
            await self.timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise ApiError(
                503, f"the request took longer than {dp.settings.request_timeout} s", code="timeout",
                headers={"Retry-After": "1"}, reason="timeout",
            ) from None


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
        if total > b.capacity:
            raise ApiError(
                status,
                f"{what} needs about {total} bytes of memory, more than the server's whole memory budget of "
                f"{b.capacity} bytes (SURROGATE_MEMORY_BUDGET); send a smaller request",
                code="body_too_large" if status == 413 else "too_large", reason="memory",
            )
        if not b.try_acquire(extra):
            raise ApiError(
                503,
                f"the memory budget is in use by requests in flight ({b.in_use} of {b.capacity} bytes; this request "
                f"needs {total}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="memory",
            )
        self.held = total

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
