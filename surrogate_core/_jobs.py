"""Checked, typed units of work: ``make_job`` turns array-likes into a ``Job`` or raises ``JobError``.

All validation that does not depend on the wire format lives here, so the in-process API and the
HTTP service refuse exactly the same things with the same messages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _registry
from ._dtypes import DEFAULT_DTYPE, resolve_dtype

__all__ = ["OPS", "Job", "JobError", "Limits", "make_job"]

#: The elementwise operations. ``vjp`` is ``cotangent * grad``.
OPS = ("spike", "grad", "vjp", "fun")


class JobError(ValueError):
    """A job is invalid. ``field`` names the offending field (``x``, ``alpha``, ``dtype``...)."""

    def __init__(self, field: str | None, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Size limits applied to every job (``None``: unlimited)."""

    max_rank: int = 8
    max_elements: int | None = None


@dataclass(frozen=True)
class Job:
    """One validated request: arrays already in ``dtype`` and known to broadcast to ``shape``."""

    op: str
    surrogate: str
    dtype: str
    x: np.ndarray
    params: Mapping[str, np.ndarray]
    cotangent: np.ndarray | None
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _cast(field: str, value: Any, dt: np.dtype, dtype_name: str) -> np.ndarray:
    """Cast to ``dt``; a finite value that overflows to inf is an error, NaN/inf given as such pass."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise JobError(field, f"not a rectangular array of numbers ({exc})") from None
    if a.dtype == dt:
        return a
    if a.dtype.kind not in "iuf" and a.dtype != np.dtype(bool) and a.dtype.name != "bfloat16":
        raise JobError(field, f"must be numbers, got array of dtype {a.dtype}", code="invalid_type")
    if a.dtype == np.dtype(bool):
        raise JobError(field, "must be numbers, got booleans", code="invalid_type")
    with np.errstate(over="ignore", invalid="ignore"):
        y = a.astype(dt)
    if y.size and not np.isfinite(y).all():
        bad = ~np.isfinite(y) & np.isfinite(a)
        if bad.any():
            first = a[bad].flat[0]
            raise JobError(
                field,
                f"value {first!r} is not representable in {dtype_name} (it overflows); "
                "use a wider dtype",
                code="not_representable",
            )
    return y


def make_job(
    op: str,
    x: Any,
    *,
    surrogate: str = _registry.DEFAULT_SURROGATE,
    dtype: str | None = None,
    params: Mapping[str, Any] | None = None,
    cotangent: Any = None,
    limits: Limits = Limits(),
) -> Job:
    """Validate and normalise one job.

    ``dtype=None`` keeps a floating ``x``'s own dtype (float16/32/64, bfloat16) and otherwise uses
    float32. Parameters not given take the surrogate's defaults. Raises ``JobError``.
    """
    if cotangent is None and dtype is not None and type(x) is np.ndarray and limits.max_elements is None:
        # the common case (an array already in its dtype, scalar parameters seen before): the
        # validated parameters of an earlier, identical job, and x's own shape
        key = (op, surrogate, dtype, tuple(params.items()) if params else ())
        try:
            known = _KNOWN.get(key)
        except TypeError:  # unhashable parameter values: the general path
            known = None
        if known is not None and x.dtype == known[0] and x.ndim <= limits.max_rank:
            return Job(op, surrogate, dtype, x, known[1], None, x.shape)
    job = _make_job(op, x, surrogate=surrogate, dtype=dtype, params=params, cotangent=cotangent, limits=limits)
    if cotangent is None and dtype is not None and type(x) is np.ndarray and limits.max_elements is None \
            and job.shape == x.shape and all(p.ndim == 0 for p in job.params.values()):
        try:
            key = (op, surrogate, dtype, tuple(params.items()) if params else ())
            if key not in _KNOWN and all(type(v) is float or type(v) is int for _, v in key[3]):
                if len(_KNOWN) >= 4096:
                    _KNOWN.clear()
                _KNOWN[key] = (job.x.dtype, job.params)
        except TypeError:
            pass
    return job


#: (op, surrogate, dtype, scalar parameters as given) -> (x's dtype, the validated parameters) of
#: jobs made before: an identical job needs no validation again
_KNOWN: dict[tuple[Any, ...], tuple[np.dtype, Mapping[str, np.ndarray]]] = {}


def _make_job(
    op: str,
    x: Any,
    *,
    surrogate: str,
    dtype: str | None,
    params: Mapping[str, Any] | None,
    cotangent: Any,
    limits: Limits,
) -> Job:
    if op not in OPS:
        raise JobError("op", f"unknown op {op!r}; known: {', '.join(OPS)}")
    if not isinstance(surrogate, str):
        raise JobError("surrogate", f"must be a string, got {type(surrogate).__name__}", code="invalid_type")
    try:
        sur = _registry.get(surrogate)
    except KeyError as exc:
        raise JobError("surrogate", exc.args[0], code="unknown_surrogate") from None
    if op == "fun" and sur.fun is None:
        raise JobError(
            "surrogate",
            f"{surrogate!r} is gradient-only: braintools defines no smooth function for it",
            code="no_smooth_function",
        )

    if dtype is None:
        xd = getattr(x, "dtype", None)
        try:
            dtype_name, dt = resolve_dtype(xd) if xd is not None else resolve_dtype(DEFAULT_DTYPE)
        except ValueError:
            dtype_name, dt = resolve_dtype(DEFAULT_DTYPE)
    else:
        try:
            dtype_name, dt = resolve_dtype(dtype)
        except ValueError as exc:
            raise JobError("dtype", str(exc), code="unknown_dtype") from None

    params = dict(params or {})
    unknown = [k for k in params if k not in sur.param_names]
    if unknown:
        raise JobError(unknown[0], unknown_param_message(unknown[0], sur), code="unknown_field")

    xa = _cast("x", x, dt, dtype_name)
    scalars = _scalar_key(sur, params)
    if scalars is not None:  # the common case: scalar parameters, validated once per distinct value
        cast_params = _scalar_params(sur.name, dtype_name, scalars)
    else:
        cast_params = _validate_params(sur, params, dt, dtype_name)
    arrays: list[tuple[str, np.ndarray]] = [("x", xa)]
    arrays += [(p.name, cast_params[p.name]) for p in sur.params]
    ct = None
    if cotangent is not None:
        if op != "vjp":
            raise JobError("cotangent", "only /grad takes a cotangent", code="unknown_field")
        ct = _cast("cotangent", cotangent, dt, dtype_name)
        arrays.append(("cotangent", ct))
    elif op == "vjp":
        raise JobError("cotangent", "vjp needs a cotangent", code="missing_field")

    shape: tuple[int, ...] = ()
    for name, a in arrays:
        if a.ndim > limits.max_rank:
            raise JobError(name, f"rank {a.ndim} exceeds the limit of {limits.max_rank}", code="too_large")
        if a.shape == shape or not a.ndim:  # the common cases: nothing to broadcast
            continue
        if not shape:
            shape = a.shape
            continue
        try:
            shape = np.broadcast_shapes(shape, a.shape)
        except ValueError:
            raise JobError(
                name,
                f"shape {list(a.shape)} does not broadcast against shape {list(shape)} "
                "(NumPy broadcasting rules)",
                code="shape_mismatch",
            ) from None
    if len(shape) > limits.max_rank:
        raise JobError("x", f"broadcast rank {len(shape)} exceeds the limit of {limits.max_rank}", code="too_large")
    n = math.prod(shape)
    if limits.max_elements is not None and n > limits.max_elements:
        raise JobError(
            "x",
            f"broadcast shape {list(shape)} has {n} elements, over the limit of {limits.max_elements}",
            code="too_large",
        )
    return Job(op, surrogate, dtype_name, xa, cast_params, ct, shape)


def _validate_params(
    sur: _registry.Surrogate, params: Mapping[str, Any], dt: np.dtype, dtype_name: str
) -> dict[str, np.ndarray]:
    cast_params: dict[str, np.ndarray] = {}
    for p in sur.params:
        v = _cast(p.name, params.get(p.name, p.default), dt, dtype_name)
        ok = p.constraint.ok(v)
        if not np.all(ok):
            bad = v[~ok].flat[0] if v.ndim else v.item()
            note = _cast_note(params.get(p.name), v, dtype_name)
            raise JobError(p.name, f"must be {p.constraint.text}, got {_show(bad)}" + note)
        cast_params[p.name] = v
    for check in sur.checks:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            val = np.asarray(check.value(*(cast_params[f] for f in check.fields)))
        if not np.isfinite(val).all():
            raise JobError(
                check.fields[0],
                f"{check.text} is not representable in {dtype_name} for these values; use a wider dtype",
                code="not_representable",
            )
    return cast_params


def _scalar_key(sur: _registry.Surrogate, params: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The parameters as a tuple of Python floats when every one is a plain scalar, else None."""
    out = []
    for p in sur.params:
        v = params.get(p.name, p.default)
        plain = type(v) is float or (type(v) is int and abs(v) <= 2**53)  # ints exactly representable
        zero_d = isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "if" and v.dtype.itemsize >= 4
        if not (plain or zero_d):
            return None
        out.append(float(v))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _scalar_params(name: str, dtype_name: str, values: tuple[float, ...]) -> dict[str, np.ndarray]:
    sur = _registry.get(name)
    dt = resolve_dtype(dtype_name)[1]
    cast = _validate_params(sur, dict(zip(sur.param_names, values, strict=True)), dt, dtype_name)
    for v in cast.values():
        v.flags.writeable = False  # shared between jobs
    return cast


def _show(v: Any) -> str:
    return repr(float(v))


def _cast_note(given: Any, cast: np.ndarray, dtype_name: str) -> str:
    if given is None or isinstance(given, np.ndarray):
        return ""
    try:
        g = np.asarray(given, dtype=np.float64)
    except (ValueError, TypeError):
        return ""
    if g.shape == cast.shape and np.all(np.isfinite(g)) and not np.array_equal(g, cast.astype(np.float64)):
        return f" (after conversion to {dtype_name})"
    return ""


def unknown_param_message(name: str, sur: _registry.Surrogate) -> str:
    import difflib

    known = list(sur.param_names)
    msg = f"unknown parameter for surrogate {sur.name!r} (its parameters: {', '.join(known) or 'none'})"
    close = difflib.get_close_matches(name, known + ["x", "dtype", "surrogate", "cotangent"], n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    return msg
