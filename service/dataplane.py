"""The data plane: jobs in, results out, under the service's limits. It knows no HTTP and no protocol.

It owns
- **admission**: at most ``max_concurrent`` requests at once (past it an immediate ``overloaded``
  error), each within ``request_timeout`` seconds from admission to its last byte;
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
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

import surrogate_core as core

from .batching import Batcher, DeviceError, Overloaded
from .errors import ApiError
from .metrics import Metrics
from .settings import Settings

__all__ = ["DataPlane", "check_finite", "is_finite"]

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

    # -- admission ---------------------------------------------------------------------------
    async def admitted(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``work(*args)`` as one admitted request: refused at once past the concurrency
        limit, cancelled (``timeout``) past the time limit."""
        s = self.settings
        if self.in_flight >= s.max_concurrent:
            raise ApiError(
                503, f"{self.in_flight} requests in progress (limit {s.max_concurrent}); retry shortly",
                code="overloaded", headers={"Retry-After": "1"}, reason="concurrency",
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            async with asyncio.timeout(s.request_timeout):
                return await work(*args)
        except TimeoutError:
            raise ApiError(
                503, f"the request took longer than {s.request_timeout} s", code="timeout",
                headers={"Retry-After": "1"}, reason="timeout",
            ) from None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    # -- compute -----------------------------------------------------------------------------
    async def infer(self, jobs: Sequence[core.Job], endpoint: str) -> list[np.ndarray]:
        """The results of ``jobs``, in order (through the batcher)."""
        try:
            results = await self.batcher.submit(jobs)
        except Overloaded as exc:
            raise ApiError(
                503, f"overloaded: {exc}; retry shortly", code="overloaded", headers={"Retry-After": "1"}, reason="queue"
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


def _isfinite(a: np.ndarray) -> np.ndarray:
    # bfloat16 (ml_dtypes) is not a NumPy float kind: widen it (exactly) to float32 first
    return np.isfinite(a if a.dtype.kind == "f" else a.astype(np.float32))


def is_finite(a: np.ndarray) -> bool:
    return a.size == 0 or bool(_isfinite(a).all())


def check_finite(job: core.Job, result: np.ndarray, *, text: bool, where: str, job_index: int | None, hint: str) -> None:
    """Raise ``not_representable`` when ``result`` overflowed (non-finite where every input was
    finite), or, for a text answer (JSON cannot carry them), holds NaN or infinity at all."""
    if is_finite(result):
        return
    finite = np.ones(result.shape, bool)
    for a in (job.x, job.cotangent, *job.params.values()):
        if a is not None:
            finite &= _isfinite(a)
    if bool((~_isfinite(result) & finite).any()):
        raise ApiError(
            422,
            f"{where}: the result is not finite in {job.dtype} (overflow for these values); "
            "use a wider dtype or smaller values",
            job=job_index, field="dtype", code="not_representable",
        )
    if text:
        raise ApiError(
            422,
            f"{where}: the result holds NaN or infinity (from NaN/inf in the input), which JSON cannot carry; {hint}",
            job=job_index, field="x", code="not_representable",
        )
