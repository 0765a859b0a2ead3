"""The engine: fused, bucketed, ahead-of-time compiled evaluation of jobs.

Every op is elementwise, so any list of jobs with the same (op, surrogate, dtype) is broadcast,
flattened and concatenated into one 1-D buffer, padded up to a size bucket (a power of two or 1.5
times one, at least ``min_bucket``: at most 50% padding, 25% on average), evaluated by ONE compiled
call, then cut back and reshaped. Parameters travel as traced arguments: 0-d when every job shares
one value ("scalar" layout), else one value per element ("elementwise" layout). So the compiled
variants per (surrogate, op, dtype) and layout are at most ``2 * log2(max elements / min_bucket) + 1``,
and a new alpha never compiles anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
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
    variants: Counter = field(default_factory=Counter)  # (op, surrogate, dtype) -> compiled variants


def _kernel(op: str, sur: _registry.Surrogate | None) -> Callable[..., Any]:
    if op == "spike":
        return _formulas.heaviside
    assert sur is not None
    names = sur.param_names
    k = len(names)
    if op == "grad":
        return lambda x, *ps: sur.grad(x, **dict(zip(names, ps)))
    if op == "vjp":
        return lambda x, *ps: sur.grad(x, **dict(zip(names, ps[:k]))) * ps[k]
    if op == "fun":
        assert sur.fun is not None
        return lambda x, *ps: sur.fun(x, **dict(zip(names, ps)))
    raise ValueError(op)


class Engine:
    """Evaluates jobs with bounded compilation. Thread-safe; compiled variants are cached forever
    (their number is bounded by construction)."""

    def __init__(self, *, min_bucket: int = 1024) -> None:
        if min_bucket < 1 or min_bucket & (min_bucket - 1):
            raise ValueError("min_bucket must be a power of two >= 1")
        self.min_bucket = min_bucket
        self.device = jax.devices()[0]
        self._compiled: dict[Key, Any] = {}
        self._lock = threading.Lock()
        self._compile_locks: dict[Key, threading.Lock] = {}
        self.stats = EngineStats()

    # -- buckets and compilation -------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The padded size for ``n`` elements: the smallest power of two or 1.5 times a power of two
        that holds ``n``, at least ``min_bucket``."""
        if n <= self.min_bucket:
            return self.min_bucket
        p = 1 << (n - 1).bit_length()  # the next power of two >= n
        h = 3 * p // 4  # 1.5 times the power of two below
        return h if h >= n and p // 2 >= self.min_bucket else p

    def _executable(self, key: Key) -> Any:
        exe = self._compiled.get(key)
        if exe is not None:
            return exe
        with self._lock:
            lock = self._compile_locks.setdefault(key, threading.Lock())
        with lock:
            exe = self._compiled.get(key)
            if exe is not None:
                return exe
            op, sname, dtype, bucket, layout = key
            sur = None if op == "spike" else _registry.get(sname)
            dt = DTYPES[dtype]
            specs = [jax.ShapeDtypeStruct((bucket,), dt)]
            specs += [jax.ShapeDtypeStruct((bucket,) if full else (), dt) for full in layout]
            t0 = time.perf_counter()
            with _x64():
                exe = jax.jit(_kernel(op, sur)).lower(*specs).compile()
            dt_s = time.perf_counter() - t0
            with self._lock:
                self._compiled[key] = exe
                self.stats.compilations += 1
                self.stats.compile_seconds += dt_s
                self.stats.variants[(op, sname, dtype)] += 1
                count = self.stats.variants[(op, sname, dtype)]
            log.info(
                "compiled %s/%s/%s bucket=%d layout=%s in %.0f ms (%d variants of this op)",
                op, sname, dtype, bucket, "".join("E" if f else "S" for f in layout) or "-",
                dt_s * 1e3, count,
            )
            return exe

    def variants(self) -> dict[str, int]:
        """Compiled variants per ``op/surrogate/dtype``."""
        with self._lock:
            return {"/".join(k): v for k, v in sorted(self.stats.variants.items())}

    def warm_up(self, *, surrogate: str, dtype: str, ops: Sequence[str] = ("spike", "grad", "vjp", "fun"),
                max_elements: int = 1 << 16) -> int:
        """Compile the scalar-layout variants of ``ops`` for every bucket up to ``max_elements``."""
        sur = _registry.get(surrogate)
        n = 0
        b = self.min_bucket
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

    # -- evaluation ---------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        """Evaluate jobs; one device call per distinct (op, surrogate, dtype). Results in order."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            sname = "*" if job.op == "spike" else job.surrogate
            groups.setdefault((job.op, sname, job.dtype), []).append(i)
        out: list[np.ndarray | None] = [None] * len(jobs)
        for (op, sname, dtype), idx in groups.items():
            results = self._run_group(op, sname, dtype, [jobs[i] for i in idx])
            for i, r in zip(idx, results):
                out[i] = r
        return out  # type: ignore[return-value]

    def _extras(self, job: Job) -> list[np.ndarray]:
        if job.op == "spike":
            return []
        sur = _registry.get(job.surrogate)
        extras = [job.params[p] for p in sur.param_names]
        if job.op == "vjp":
            assert job.cotangent is not None
            extras.append(job.cotangent)
        return extras

    def _run_group(self, op: str, sname: str, dtype: str, jobs: list[Job]) -> list[np.ndarray]:
        dt = DTYPES[dtype]
        sizes = [j.size for j in jobs]
        total = sum(sizes)
        with self._lock:
            self.stats.jobs += len(jobs)
        if total == 0:
            return [np.zeros(j.shape, dt) for j in jobs]
        bucket = self.bucket(total)
        extras = [self._extras(j) for j in jobs]
        n_extra = len(extras[0])
        # An extra argument is passed as one 0-d value when every job has a single, shared value.
        layout = []
        for k in range(n_extra):
            vals = [e[k] for e in extras]
            shared = all(v.size == 1 for v in vals) and all(
                v.reshape(()).tobytes() == vals[0].reshape(()).tobytes() for v in vals[1:]
            )
            layout.append(not shared)
        layout_t = tuple(layout)

        def flat(arrays: list[np.ndarray], fill: float) -> np.ndarray:
            if len(jobs) == 1 and arrays[0].shape == (bucket,) and arrays[0].flags.c_contiguous:
                return arrays[0]
            buf = np.empty(bucket, dt)
            o = 0
            for a, j, n in zip(arrays, jobs, sizes):
                if n:
                    np.copyto(buf[o:o + n].reshape(j.shape), a)
                o += n
            buf[o:] = fill
            return buf

        args = [flat([j.x for j in jobs], 0)]
        for k, full in enumerate(layout_t):
            if full:
                args.append(flat([e[k] for e in extras], 1))
            else:
                args.append(np.asarray(extras[0][k], dt).reshape(()))
        exe = self._executable(self._key(op, sname, dtype, bucket, layout_t))
        if dtype == "float64":
            with _x64():
                result = np.asarray(exe(*args))
        else:
            result = np.asarray(exe(*args))
        with self._lock:
            self.stats.device_calls += 1
            self.stats.elements += total
            self.stats.padded_elements += bucket
        outs = []
        o = 0
        for j, n in zip(jobs, sizes):
            outs.append(result[o:o + n].reshape(j.shape))
            o += n
        return outs
