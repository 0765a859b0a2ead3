"""The engine: fused, bucketed, ahead-of-time compiled evaluation of jobs.

Every op is elementwise, so any list of jobs with the same (op, surrogate, dtype) is broadcast,
flattened and concatenated into one 1-D buffer, padded up to a size bucket (a power of two or 1.5
times one, at least ``min_bucket``: at most 50% padding, 25% on average; the smallest jobs, up to
``small_bucket`` elements, have a bucket of their own), evaluated by ONE compiled
call, then cut back and reshaped. Parameters travel as traced arguments: 0-d when every job shares
one value ("scalar" layout), else one value per element ("elementwise" layout). So the compiled
variants per (surrogate, op, dtype) and layout are at most ``2 * log2(max elements / min_bucket) + 2``,
and a new alpha never compiles anything.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from . import _formulas, _registry
from ._dtypes import DTYPES
from ._jobs import Job

__all__ = ["Engine", "EngineStats", "device_info"]

log = logging.getLogger("surrogate_core.engine")

# (op, surrogate, dtype, bucket, layout); layout is a tuple of bools: is each extra arg per-element.
Key = tuple[str, str, str, int, tuple[bool, ...]]


def _x64() -> Any:
    """JAX's x64 mode for the current thread only.

    Every variant is lowered and compiled under it (so float64 variants exist at all, and the others
    are compiled exactly as before), and float64 variants are also called under it: an executable
    compiled with x64 refuses float64 arguments outside it. The global ``jax_enable_x64`` setting of
    the process is never changed.
    """
    return jax.enable_x64(True)


def device_info() -> dict[str, Any]:
    """The device the core computes on (JAX's default device: a GPU when JAX sees one)."""
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": getattr(d, "device_kind", d.platform),
        "device": str(d),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }


@dataclass
class EngineStats:
    compilations: int = 0
    compile_seconds: float = 0.0
    device_calls: int = 0
    jobs: int = 0
    elements: int = 0
    padded_elements: int = 0
    evictions: int = 0  # executables dropped from the full cache (least recently used first)
    variants: Counter = field(default_factory=Counter)  # (op, surrogate, dtype) -> variants in the cache


def _kernel(op: str, sur: _registry.Surrogate | None) -> Callable[..., Any]:
    if op == "spike":
        return _formulas.heaviside
    assert sur is not None
    names = sur.param_names
    k = len(names)
    if op == "grad":
        return lambda x, *ps: sur.grad(x, **dict(zip(names, ps, strict=True)))
    if op == "vjp":
        return lambda x, *ps: sur.grad(x, **dict(zip(names, ps[:k], strict=True))) * ps[k]
    if op == "fun":
        fun = sur.fun
        assert fun is not None
        return lambda x, *ps: fun(x, **dict(zip(names, ps, strict=True)))
    raise ValueError(op)


@dataclass
class _Group:
    """The plan for one device call: the jobs of one (op, surrogate, dtype), their bucket and layout."""

    op: str
    sname: str
    dtype: str
    idx: list[int]  # positions of the jobs in the caller's list
    jobs: list[Job]
    sizes: list[int]
    total: int
    bucket: int
    extras: list[list[np.ndarray]]  # per job: its parameters in order, then its cotangent (vjp)
    layout: tuple[bool, ...]  # per extra argument: one value per element (True) or one shared 0-d value

    @property
    def key(self) -> Key | None:
        """The executable this group needs (None: no device call, every job is empty)."""
        return None if self.total == 0 else (self.op, self.sname, self.dtype, self.bucket, self.layout)


class Engine:
    """Evaluates jobs with bounded compilation. Thread-safe.

    Compiled executables are kept in a least-recently-used cache of at most ``max_variants`` entries
    (None: unbounded). Their number per (op, surrogate, dtype) is small by construction, but every
    surrogate, dtype and parameter layout multiplies it, so a long-lived server that sees many of
    them would otherwise keep every executable it ever built; an evicted variant is simply compiled
    again when it is next needed.
    """

    def __init__(self, *, min_bucket: int = 1024, max_variants: int | None = 512, small_bucket: int = 64) -> None:
        if min_bucket < 1 or min_bucket & (min_bucket - 1):
            raise ValueError("min_bucket must be a power of two >= 1")
        if small_bucket < 1 or small_bucket & (small_bucket - 1):
            raise ValueError("small_bucket must be a power of two >= 1")
        if max_variants is not None and max_variants < 1:
            raise ValueError("max_variants must be >= 1 (or None for no limit)")
        self.min_bucket = min_bucket
        #: jobs of at most this many elements (16-element requests, say) are padded to it, not to
        #: ``min_bucket``: one more variant, and the smallest requests pad and compute 16 times less
        self.small_bucket = min(small_bucket, min_bucket)
        self.max_variants = max_variants
        self.device = jax.devices()[0]
        self._compiled: OrderedDict[Key, Any] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _compiled, _compile_locks and stats
        self._compile_locks: dict[Key, threading.Lock] = {}
        self._last_plan: tuple[Sequence[Job], list[_Group]] | None = None
        self.stats = EngineStats()

    # -- buckets and compilation -------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The padded size for ``n`` elements: ``small_bucket`` up to it, else the smallest power of
        two or 1.5 times a power of two that holds ``n``, at least ``min_bucket``."""
        if n <= self.min_bucket:
            return self.small_bucket if n <= self.small_bucket else self.min_bucket
        p = 1 << (n - 1).bit_length()  # the next power of two >= n
        h = 3 * p // 4  # 1.5 times the power of two below
        return h if h >= n and p // 2 >= self.min_bucket else p

    def _cached(self, key: Key) -> Any:
        with self._lock:
            exe = self._compiled.get(key)
            if exe is not None:
                self._compiled.move_to_end(key)
            return exe

    def _executable(self, key: Key) -> Any:
        return self._get_or_compile(key)[0]

    def _get_or_compile(self, key: Key) -> tuple[Any, bool]:
        """The executable for ``key``, and whether this call compiled it."""
        exe = self._cached(key)
        if exe is not None:
            return exe, False
        with self._lock:
            lock = self._compile_locks.setdefault(key, threading.Lock())
        with lock:
            exe = self._cached(key)
            if exe is not None:
                return exe, False
            op, sname, dtype, bucket, layout = key
            sur = None if op == "spike" else _registry.get(sname)
            dt = DTYPES[dtype]
            specs = [jax.ShapeDtypeStruct((bucket,), dt)]
            specs += [jax.ShapeDtypeStruct((bucket,) if full else (), dt) for full in layout]
            t0 = time.perf_counter()
            with _x64():
                exe = jax.jit(_kernel(op, sur)).lower(*specs).compile()
            dt_s = time.perf_counter() - t0
            evicted: list[Key] = []
            with self._lock:
                # (an evicted key's compile lock is dropped, so two threads may rarely compile the
                # same key at once; the cache then keeps one executable and counts one variant)
                if key not in self._compiled:
                    self.stats.variants[(op, sname, dtype)] += 1
                self._compiled[key] = exe
                self._compiled.move_to_end(key)
                self.stats.compilations += 1
                self.stats.compile_seconds += dt_s
                count = self.stats.variants[(op, sname, dtype)]
                while self.max_variants is not None and len(self._compiled) > self.max_variants:
                    old, _ = self._compiled.popitem(last=False)
                    self._compile_locks.pop(old, None)
                    group = old[:3]
                    self.stats.variants[group] -= 1
                    if self.stats.variants[group] <= 0:
                        del self.stats.variants[group]
                    self.stats.evictions += 1
                    evicted.append(old)
            log.debug(
                "compiled %s/%s/%s bucket=%d layout=%s in %.0f ms (%d variants of this op)",
                op, sname, dtype, bucket, _layout_text(layout), dt_s * 1e3, count,
            )
            for old in evicted:
                log.debug("evicted %s/%s/%s bucket=%d layout=%s (cache full: %d variants)",
                          *old[:4], _layout_text(old[4]), self.max_variants)
            return exe, True

    def variants(self) -> dict[str, int]:
        """Compiled variants per ``op/surrogate/dtype`` (those in the cache now)."""
        with self._lock:
            return {"/".join(k): v for k, v in sorted(self.stats.variants.items())}

    def warm_up(self, *, surrogate: str, dtype: str, ops: Sequence[str] = ("spike", "grad", "vjp", "fun"),
                max_elements: int = 1 << 16) -> int:
        """Compile the scalar-layout variants of ``ops`` for every bucket up to ``max_elements``.
        Returns how many variants that is (each is logged at DEBUG only: log one summary)."""
        sur = _registry.get(surrogate)
        _let_go()  # compiles its tiny executable now, not during the first large request
        n = 0
        b = self.small_bucket
        top = self.bucket(max_elements)
        while b <= top:
            for op in ops:
                if op == "fun" and sur.fun is None:
                    continue
                extra = 0 if op == "spike" else len(sur.params) + (op == "vjp")
                self._executable(self._key(op, surrogate, dtype, b, (False,) * extra))
                n += 1
            b = self.bucket(b + 1)
        return n

    @staticmethod
    def _key(op: str, surrogate: str, dtype: str, bucket: int, layout: tuple[bool, ...]) -> Key:
        return (op, "*" if op == "spike" else surrogate, dtype, bucket, layout)

    # -- planning -----------------------------------------------------------------------------
    def _plan(self, jobs: Sequence[Job]) -> list[_Group]:
        """Group jobs by (op, surrogate, dtype) and choose each group's bucket and layout: what
        :meth:`run` computes and :meth:`is_compiled` checks."""
        if len(jobs) == 1:  # the common case, planned without grouping
            job = jobs[0]
            n = job.size
            sname = "*" if job.op == "spike" else job.surrogate
            if n == 0:
                return [_Group(job.op, sname, job.dtype, [0], [job], [0], 0, 0, [], ())]
            one = self._extras(job)
            return [_Group(job.op, sname, job.dtype, [0], [job], [n], n, self.bucket(n), [one],
                           tuple(e.size != 1 for e in one))]
        by: dict[tuple[str, str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            sname = "*" if job.op == "spike" else job.surrogate
            by.setdefault((job.op, sname, job.dtype), []).append(i)
        plan = []
        for (op, sname, dtype), idx in by.items():
            group_jobs = [jobs[i] for i in idx]
            sizes = [j.size for j in group_jobs]
            total = sum(sizes)
            if total == 0:
                plan.append(_Group(op, sname, dtype, idx, group_jobs, sizes, 0, 0, [], ()))
                continue
            extras = [self._extras(j) for j in group_jobs]
            # An extra argument is passed as one 0-d value when every job has a single, shared value.
            layout = []
            for k in range(len(extras[0])):
                vals = [e[k] for e in extras]
                shared = all(v.size == 1 for v in vals) and all(
                    v.reshape(()).tobytes() == vals[0].reshape(()).tobytes() for v in vals[1:]
                )
                layout.append(not shared)
            plan.append(
                _Group(op, sname, dtype, idx, group_jobs, sizes, total, self.bucket(total), extras, tuple(layout))
            )
        return plan

    def is_compiled(self, jobs: Sequence[Job]) -> bool:
        """Whether every executable that ``run(jobs)`` needs is compiled already, so that running
        them compiles nothing (a caller can compile cold variants off its hot path first, with
        :meth:`compile`). Does not count as a use for the cache's recency."""
        plan = self._plan(jobs)
        self._last_plan = (jobs, plan)  # run(jobs) right after, with the same list, reuses it
        keys = [g.key for g in plan]
        with self._lock:
            return all(k is None or k in self._compiled for k in keys)

    def compile(self, jobs: Sequence[Job]) -> int:
        """Compile (or mark as recently used) every executable ``run(jobs)`` needs, without running
        anything. Returns how many were compiled now."""
        return sum(self._get_or_compile(g.key)[1] for g in self._plan(jobs) if g.key is not None)

    # -- evaluation ---------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        """Evaluate jobs; one device call per distinct (op, surrogate, dtype). Results in order."""
        last, self._last_plan = self._last_plan, None  # the engine keeps no request's jobs once run
        plan = last[1] if last is not None and last[0] is jobs else self._plan(jobs)
        if len(plan) == 1:  # one group holds every job, in order
            return self._run_group(plan[0])
        out: list[np.ndarray | None] = [None] * len(jobs)
        for g in plan:
            for i, r in zip(g.idx, self._run_group(g), strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def _extras(self, job: Job) -> list[np.ndarray]:
        if job.op == "spike":
            return []
        params = job.params
        extras = [params[p] for p in _registry.get(job.surrogate).param_names]
        if job.op == "vjp":
            assert job.cotangent is not None
            extras.append(job.cotangent)
        return extras

    def _run_group(self, g: _Group) -> list[np.ndarray]:
        dt = DTYPES[g.dtype]
        jobs, sizes, bucket = g.jobs, g.sizes, g.bucket
        if g.key is None:
            with self._lock:
                self.stats.jobs += len(jobs)
            return [np.zeros(j.shape, dt) for j in jobs]
        args = [_flat([j.x for j in jobs], jobs, sizes, bucket, dt, 0)]
        for k, full in enumerate(g.layout):
            if full:
                args.append(_flat([e[k] for e in g.extras], jobs, sizes, bucket, dt, 1))
            else:
                v = g.extras[0][k]
                args.append(v if v.ndim == 0 and v.dtype == dt else np.asarray(v, dt).reshape(()))
        exe = self._executable(g.key)
        if g.dtype == "float64":
            with _x64():
                result = np.asarray(exe(*args))
        else:
            result = np.asarray(exe(*args))
        if bucket * dt.itemsize >= LET_GO_BYTES:
            _let_go()
        with self._lock:
            st = self.stats
            st.jobs += len(jobs)
            st.device_calls += 1
            st.elements += g.total
            st.padded_elements += bucket
        if len(jobs) == 1:
            n = sizes[0]
            return [(result if n == bucket else result[:n]).reshape(jobs[0].shape)]
        outs = []
        o = 0
        for j, n in zip(jobs, sizes, strict=True):
            outs.append(result[o:o + n].reshape(j.shape))
            o += n
        return outs


#: Device calls whose arguments hold at least this many bytes are followed by :func:`_let_go`.
LET_GO_BYTES = 1 << 20

_ZERO = np.zeros((), np.float32)


@functools.cache
def _identity() -> Any:
    """A compiled scalar identity, the tiny call of :func:`_let_go` (made once)."""
    return jax.jit(lambda v: v).lower(jax.ShapeDtypeStruct((), np.float32)).compile()


def _let_go() -> None:
    """Let go of the arguments of the last device call. JAX keeps the NumPy arguments of its last
    dispatch (on the CPU it computes on them in place) until its next one: the padded buffer, or,
    when a request fills its bucket exactly, a view of the request's own body. One tiny call (a
    few microseconds) makes it let go, so a large request's memory does not outlive its answer."""
    _identity()(_ZERO)


def _flat(arrays: list[np.ndarray], jobs: list[Job], sizes: list[int], bucket: int, dt: np.dtype,
          fill: float) -> np.ndarray:
    """The arrays, each broadcast to its job's shape, one after the other in a buffer of ``bucket``
    elements, the rest ``fill`` (a value every formula takes without overflow)."""
    if len(jobs) == 1:
        a, shape, n = arrays[0], jobs[0].shape, sizes[0]
        if n == bucket and a.shape == shape and a.flags.c_contiguous:
            return a.reshape(-1)
        buf = np.empty(bucket, dt)
        if a.shape == shape:
            buf[:n] = a.reshape(-1)
        else:
            np.copyto(buf[:n].reshape(shape), a)
        buf[n:] = fill
        return buf
    buf = np.empty(bucket, dt)
    o = 0
    for a, j, n in zip(arrays, jobs, sizes, strict=True):
        if n:
            np.copyto(buf[o:o + n].reshape(j.shape), a)
        o += n
    buf[o:] = fill
    return buf


def _layout_text(layout: tuple[bool, ...]) -> str:
    return "".join("E" if f else "S" for f in layout) or "-"
