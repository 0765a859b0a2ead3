"""Per-model statistics, as Triton's statistics extension reports them
(``GET /v2/models[/{model}[/versions/{version}]]/stats``, gRPC ``ModelStatistics``).

Counted in the data plane (``DataPlane.serve``), so every protocol's compute requests are counted
alike. What counts, per model (surrogate) and version (``"1"``, the only one):

- **which requests**: every compute request on a model, ``/v1`` and ``/v2`` (and any protocol served
  through ``DataPlane.serve``). A request counts under the model it names once that model is known:
  a ``/v2`` request from its path on (so a ``/v2`` request with a bad input is a failure of its
  model), a ``/v1`` request once its body is decoded (a ``/v1`` body that does not decode names no
  model and is not counted). A ``/v1`` list of jobs on several surrogates counts once for each.
  Requests refused before the data plane holds them (a bad token, an unknown model, a body over the
  byte limit, past the concurrency limit) are not counted, as Triton counts only what reaches a model;
- **success** / **fail**: count and ns from the start of decoding to the end of encoding (reading
  the body from the network and sending the answer are not in it); a request fails when anything
  in between raises (invalid input, a limit, the queue or memory budget full, the device, its
  deadline);
- **queue**, **compute_input**, **compute_infer**, **compute_output** (successes only, one count each,
  as Triton has it): waiting for the device (in the batcher's queue, behind a batch), decoding and
  checking the request, the engine call that computed it (for a request fused into a batch with
  others, the whole batch's call, as Triton reports a dynamic batch; for a batch computed in a worker
  thread, from its dispatch to the thread), and encoding the answer. The four add up to the success
  time;
- **inference_count**: successful inferences, one per ``x`` computed: one per ``/v2`` request
  (its outputs come from one ``x``; the models declare no batch dimension, as a Triton model with
  ``max_batch_size: 0``, whose requests count one inference each), one per ``/v1`` job;
- **execution_count**: engine calls that computed the model's jobs: requests fused by the batcher
  into one call are one execution, as Triton counts a dynamic batch;
- **last_inference**: when the last successful request ended, in ms since the epoch (0: never).

``batch_stats`` is empty and ``cache_hit``/``cache_miss`` zero (no response cache). The cost is a
few clock reads and integer additions per request, all on the event loop's thread (no lock). With
several worker processes each counts its own requests: the answer is the answering worker's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import surrogate_core as core

from ..errors import ApiError
from .batching import Timing

__all__ = ["Mark", "Stats"]


class Mark(Timing):
    """One request as ``DataPlane.serve`` times it (``time.perf_counter_ns``): started at ``t0``,
    decoded and checked at ``t1``, its results back from the batcher at ``t2``; ``jobs`` once
    decoded; ``seconds`` (``Timing``) the engine call's time, told by the batcher."""

    __slots__ = ("t0", "t1", "t2", "jobs")

    def __init__(self, t0: int) -> None:
        self.seconds = 0.0
        self.t0 = self.t1 = self.t2 = t0
        self.jobs: Sequence[core.Job] | None = None


class _Model:
    """One model's counters (ns are integer nanoseconds)."""

    __slots__ = ("success", "fail", "fail_ns", "queue_ns", "input_ns", "infer_ns", "output_ns",
                 "inferences", "executions", "last")

    def __init__(self) -> None:
        self.success = self.fail = self.fail_ns = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.inferences = self.executions = 0
        self.last = 0  # time.perf_counter_ns() at the end of the last success; 0: never


class Stats:
    """The statistics of one process's data plane."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        # perf_counter_ns() + this = nanoseconds since the epoch (read once: a request reads one clock)
        self._epoch_ns = time.time_ns() - time.perf_counter_ns()

    def _model(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = _Model()
        return m

    # -- updates (the request path) ---------------------------------------------------------------
    def succeeded(self, mark: Mark, per_job: bool, t3: int) -> None:
        """A request that succeeded, encoded at ``t3``. ``per_job``: each job is an inference of
        its own (``/v1``), else the request is one inference of its first job's model."""
        jobs = mark.jobs
        if not jobs:
            return
        if per_job and len(jobs) > 1:
            counts: dict[str, int] = {}
            for j in jobs:
                counts[j.surrogate] = counts.get(j.surrogate, 0) + 1
            for name, n in counts.items():
                self._success(self._model(name), n, mark, t3)
            return
        name = jobs[0].surrogate
        self._success(self._model(name), 1, mark, t3)

    @staticmethod
    def _success(m: _Model, n: int, mark: Mark, t3: int) -> None:
        t0, t1, t2 = mark.t0, mark.t1, mark.t2
        device = int(mark.seconds * 1e9)
        if device > t2 - t1:  # (the batcher's clock in float seconds: a nanosecond of rounding)
            device = t2 - t1
        m.success += 1  # (its time is the sum of the four parts)
        m.input_ns += t1 - t0
        m.infer_ns += device
        m.queue_ns += t2 - t1 - device
        m.output_ns += t3 - t2
        m.inferences += n
        m.last = t3

    def failed(self, request: Any, mark: Mark) -> None:
        """A request that failed: counted under the models of its jobs when it was decoded, else
        under its request's ``model`` (a ``core.Surrogate``) when it names one."""
        ns = time.perf_counter_ns() - mark.t0
        jobs = mark.jobs
        if jobs:
            names = {j.surrogate for j in jobs} if len(jobs) > 1 else (jobs[0].surrogate,)
        else:
            model = getattr(request, "model", None)
            if model is None:
                return
            names = (model.name,)
        for name in names:
            m = self._model(name)
            m.fail += 1
            m.fail_ns += ns

    def executed(self, jobs: Sequence[core.Job]) -> None:
        """One engine call computed ``jobs``: an execution of each model among them."""
        if not jobs:
            return
        first = jobs[0].surrogate
        if len(jobs) == 1 or all(j.surrogate == first for j in jobs):
            m = self._model(first)
            m.executions += 1
            return
        for name in {j.surrogate for j in jobs}:
            self._model(name).executions += 1

    # -- the answer --------------------------------------------------------------------------------
    def snapshot(self, model: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics JSON (``{"model_stats": [...]}``): every model (``model`` None or
        empty), or one model, in every version (``version`` None or empty) or one. An unknown
        model or version is a 404 as the other ``/v2`` routes answer it; a version without a model,
        a 400. A model never called is there with zero counts."""
        from ..protocols.v2.codec import VERSION
        from ..protocols.v2.codec import model as find_model

        if not model:
            if version:
                raise ApiError(400, "statistics of a model version need the model's name", field="version")
            names = [s.name for s in core.all_surrogates()]
        else:
            names = [find_model(model, version or None).name]
        return {"model_stats": [self._describe(name, VERSION) for name in names]}

    def _describe(self, name: str, version: str) -> dict[str, Any]:
        m = self._models.get(name) or _Model()
        n = m.success
        return {
            "name": name,
            "version": version,
            "last_inference": (m.last + self._epoch_ns) // 1_000_000 if m.last else 0,
            "inference_count": m.inferences,
            "execution_count": m.executions,
            "inference_stats": {
                "success": {"count": n, "ns": m.input_ns + m.queue_ns + m.infer_ns + m.output_ns},
                "fail": {"count": m.fail, "ns": m.fail_ns},
                "queue": {"count": n, "ns": m.queue_ns},
                "compute_input": {"count": n, "ns": m.input_ns},
                "compute_infer": {"count": n, "ns": m.infer_ns},
                "compute_output": {"count": n, "ns": m.output_ns},
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [],
        }
