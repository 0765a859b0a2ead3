"""The element, rank and cost limits of a request: every check of them is a method of ``Limits``.

The decoders ask ``rank`` and ``shape`` as soon as a shape is known, before the array is made (a
``.npy`` header, a ``/v2`` tensor's declared shape, a nested JSON list being walked), and word the
answer in their protocol's shape; the data plane asks ``jobs`` of every request once its jobs are
decoded: elements over all jobs after broadcasting, a zero-size dimension counted as 1 (an answer of
100,000,000 empty lists is not small), and cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import surrogate_core as core

from ..errors import ApiError, shown

__all__ = ["Limits"]


class Limits:
    __slots__ = ("max_rank", "max_elements", "max_cost", "core")

    def __init__(self, *, max_rank: int, max_elements: int, max_cost: float) -> None:
        self.max_rank = max_rank
        self.max_elements = max_elements
        self.max_cost = max_cost
        #: what the core's ``make_job`` checks of each array: the rank (the elements are counted here,
        #: over the whole request, by ``jobs``)
        self.core = core.Limits(max_rank=max_rank, max_elements=None)

    def with_rank(self, max_rank: int) -> Limits:
        """These limits with another rank limit (for ``/v2``'s flat ``data`` of a scalar input)."""
        return Limits(max_rank=max_rank, max_elements=self.max_elements, max_cost=self.max_cost)

    def rank(self, ndim: int) -> str | None:
        """What is wrong with an array of ``ndim`` dimensions, or ``None``."""
        if ndim > self.max_rank:
            return f"rank {ndim} exceeds the limit of {self.max_rank}"
        return None

    def shape(self, shape: Sequence[int], max_elements: int | None = None) -> str | None:
        """What is wrong with an array of ``shape`` (its rank, its elements against ``max_elements``,
        by default the request's limit), or ``None``.

        A zero-size dimension counts as 1 here too, as ``jobs`` counts it: a shape such as
        ``(0, 2**62)`` holds no element, but NumPy cannot make it ("array is too big") and its
        answer would not be small, so it is refused before any array is made."""
        problem = self.rank(len(shape))
        if problem is not None:
            return problem
        limit = self.max_elements if max_elements is None else max_elements
        n = math.prod(shape)
        if n > limit:
            return f"shape {shown(list(shape))} has {n} elements, over the limit of {limit}"
        if math.prod(max(d, 1) for d in shape) > limit:
            return (f"shape {shown(list(shape))} is over the limit of {limit} elements "
                    "(a zero-size dimension counts as 1)")
        return None

    def jobs(self, jobs: Sequence[core.Job], *, where: Callable[[int], str], job_index: bool = True) -> int:
        """The limits of a request's jobs, all together: elements (a zero-size dimension counts as 1,
        so an answer's size is bounded too) and cost. Returns the elements."""
        total = cost = 0.0
        for i, job in enumerate(jobs):
            n = math.prod(max(d, 1) for d in job.shape)
            total += n
            if total > self.max_elements:
                raise ApiError(
                    422,
                    f"{where(i)}: the request has more than {self.max_elements} elements in all (after broadcasting; "
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
