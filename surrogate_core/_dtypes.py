"""The floating-point dtypes the core computes in, by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "DEFAULT_DTYPE", "resolve_dtype"]

#: dtype name -> NumPy dtype. bfloat16 comes from ``ml_dtypes`` (the same type JAX uses).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

DEFAULT_DTYPE = "float32"


def resolve_dtype(dtype: str | np.dtype | type) -> tuple[str, np.dtype]:
    """Return ``(name, numpy dtype)`` for a supported dtype name or dtype object.

    Raises ``ValueError`` naming the supported dtypes for anything else.
    """
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return dtype, DTYPES[dtype]
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        for name, known in DTYPES.items():
            if dt == known:
                return name, known
    raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
