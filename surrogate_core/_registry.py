"""The registry of surrogates: one ``Surrogate`` definition per function, nothing else to touch.

A ``Surrogate`` carries its name, its named parameters (default, constraint, description), its
gradient formula as a jnp function of ``x`` and the parameters, and (where braintools defines one)
the smooth surrogate function whose derivative the gradient is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Constraint",
    "Param",
    "Surrogate",
    "Check",
    "register",
    "get",
    "names",
    "all_surrogates",
    "suggest",
    "unknown_message",
    "DEFAULT_SURROGATE",
    "POSITIVE",
    "NONNEGATIVE",
    "REAL",
    "INTEGER_GE1",
    "integer_between",
]

DEFAULT_SURROGATE = "piecewise_quadratic"


@dataclass(frozen=True)
class Constraint:
    """A constraint on a parameter's values (every element of an array parameter must satisfy it).

    ``ok`` takes a NumPy array (already cast to the request's dtype) and returns a boolean mask of
    the elements that satisfy it. ``text`` is the human-readable form used in error messages and
    listings; ``schema`` is its JSON-Schema form for the contract.
    """

    name: str
    text: str
    ok: Callable[[np.ndarray], np.ndarray]
    schema: Mapping[str, Any] = field(default_factory=dict)


POSITIVE = Constraint(
    "positive", "finite and > 0", lambda a: np.isfinite(a) & (a > 0), {"exclusiveMinimum": 0}
)
NONNEGATIVE = Constraint(
    "nonnegative", "finite and >= 0", lambda a: np.isfinite(a) & (a >= 0), {"minimum": 0}
)
REAL = Constraint("real", "finite", lambda a: np.isfinite(a), {})
INTEGER_GE1 = Constraint(
    "integer_ge1",
    "an integer >= 1",
    lambda a: np.isfinite(a) & (a >= 1) & (np.floor(a) == a),
    {"minimum": 1, "multipleOf": 1},
)


def integer_between(lo: int, hi: int) -> Constraint:
    """An integer in ``[lo, hi]``: a count that drives a loop, bounded so that no request can make
    the loop run for ever (e.g. SquarewaveFourierSeries' number of terms ``n``)."""
    return Constraint(
        f"integer_{lo}_to_{hi}",
        f"an integer >= {lo} and <= {hi}",
        lambda a: np.isfinite(a) & (a >= lo) & (a <= hi) & (np.floor(a) == a),
        {"minimum": lo, "maximum": hi, "multipleOf": 1},
    )


@dataclass(frozen=True)
class Param:
    """A named surrogate parameter, named as in braintools."""

    name: str
    default: float | int
    constraint: Constraint
    description: str

    @property
    def integer(self) -> bool:
        """Whether the parameter takes integers only (its constraint says ``multipleOf: 1``)."""
        return self.constraint.schema.get("multipleOf") == 1

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: ``type`` is the JSON-Schema type (``"integer"`` or
        ``"number"``), and the default is written as that type (``2``, not ``2.0``)."""
        return {
            "name": self.name,
            "type": "integer" if self.integer else "number",
            "default": int(self.default) if self.integer else float(self.default),
            "constraint": self.constraint.text,
            "description": self.description,
        }


@dataclass(frozen=True)
class Check:
    """A quantity derived from the parameters that must be representable in the request's dtype.

    For example PiecewiseQuadratic computes ``alpha**2``: in float16 that overflows for
    ``alpha >= 256``, which would silently turn the gradient into ``-inf``/NaN.
    """

    text: str  # e.g. "alpha**2"
    fields: tuple[str, ...]
    value: Callable[..., np.ndarray]  # NumPy, evaluated in the request's dtype


@dataclass(frozen=True)
class Surrogate:
    """One surrogate-gradient function.

    ``grad(x, **params)`` and ``fun(x, **params)`` are pure jnp functions, elementwise in ``x`` and
    in every parameter (each parameter may be a scalar or an array of ``x``'s shape). Constants in
    them must be Python scalars (weakly typed) so the result keeps ``x``'s dtype.
    """

    name: str
    braintools_name: str
    description: str
    params: tuple[Param, ...]
    grad: Callable[..., Any]
    grad_formula: str
    fun: Callable[..., Any] | None = None
    fun_formula: str | None = None
    checks: tuple[Check, ...] = ()
    #: Work per element relative to a plain formula (1), from the validated parameters: e.g. the
    #: number of terms of a series. Lets a server refuse up front what could not finish in time.
    cost: Callable[[Mapping[str, Any]], float] | None = None

    def cost_per_element(self, params: Mapping[str, Any]) -> float:
        return 1.0 if self.cost is None else max(1.0, float(self.cost(params)))

    @functools.cached_property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (used by ``GET /v1/surrogates``)."""
        return {
            "name": self.name,
            "braintools": f"braintools.surrogate.{self.braintools_name}",
            "description": self.description,
            "parameters": [p.describe() for p in self.params],
            "grad_formula": self.grad_formula,
            "has_fun": self.fun is not None,
            "fun_formula": self.fun_formula,
        }



_REGISTRY: dict[str, Surrogate] = {}


def register(surrogate: Surrogate) -> Surrogate:
    """Add a surrogate to the registry (its name must be new)."""
    if surrogate.name in _REGISTRY:
        raise ValueError(f"surrogate {surrogate.name!r} is already registered")
    seen = set()
    for p in surrogate.params:
        if p.name in seen or p.name in RESERVED_NAMES:
            raise ValueError(f"{surrogate.name}: bad or duplicate parameter name {p.name!r}")
        if not math.isfinite(p.default) or not p.constraint.ok(np.asarray(p.default)).all():
            raise ValueError(f"{surrogate.name}: default of {p.name!r} violates its constraint")
        if p.integer and not isinstance(p.default, int):
            raise ValueError(f"{surrogate.name}: integer parameter {p.name!r} needs an int default")
        seen.add(p.name)
    _REGISTRY[surrogate.name] = surrogate
    return surrogate


#: Field names of a job that no parameter may take.
RESERVED_NAMES = frozenset({"x", "surrogate", "dtype", "cotangent"})


def get(name: str) -> Surrogate:
    """Return the registered surrogate ``name``; ``KeyError`` suggests a name and lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(unknown_message(name)) from None


#: braintools' module path, which ``GET /v1/surrogates`` shows before each class name
_BRAINTOOLS_PREFIX = "braintools.surrogate."
#: Names longer than this are compared with nothing (no name comes near; difflib's cost stays bounded).
_LONGEST = 100


def _folded(name: str) -> str:
    """``name`` lower-cased without ``_``, ``-``, ``.``, spaces: ``PiecewiseQuadratic`` and
    ``piecewise_quadratic`` fold alike."""
    return "".join(c for c in name.lower() if c.isalnum())


def suggest(name: object) -> str | None:
    """The registered surrogate a client most likely meant by ``name``, which is not one.

    braintools' class name (``Sigmoid``, ``braintools.surrogate.PiecewiseQuadratic``) gives its
    surrogate; so does a name that differs only in case, ``_``, ``-`` or spaces
    (``Piecewise-Quadratic``); otherwise the closest name by ``difflib`` (``sigmod``), or ``None``
    when none is close. The one rule for every protocol's "did you mean ...?".
    """
    if not isinstance(name, str) or len(name) > _LONGEST:
        return None
    bare = name.removeprefix(_BRAINTOOLS_PREFIX)
    for sur in _REGISTRY.values():
        if bare == sur.braintools_name:
            return sur.name
    folded = {_folded(s.name): s.name for s in _REGISTRY.values()}
    folded.update({_folded(s.braintools_name): s.name for s in _REGISTRY.values()})
    key = _folded(bare)
    if key in folded:
        return folded[key]
    import difflib

    close = difflib.get_close_matches(key, list(folded), n=1)
    return folded[close[0]] if close else None


def unknown_message(name: object, show: Callable[[object], str] = repr) -> str:
    """The message for an unknown surrogate ``name`` (written by ``show``: a server passes its own
    bounded echo): the suggestion, if any, and the known names."""
    close = suggest(name)
    hint = f"did you mean {close!r}? " if close is not None else ""
    return f"unknown surrogate {show(name)}; {hint}known: {', '.join(sorted(_REGISTRY))}"


def names() -> list[str]:
    """The registered surrogate names, sorted."""
    return sorted(_REGISTRY)


def all_surrogates() -> list[Surrogate]:
    return [_REGISTRY[n] for n in names()]
