"""Independent NumPy transcriptions of the PiecewiseQuadratic formulas (the test oracle).

Written from the seed document and braintools' definitions, element by element in float64 and then
rounded once to the target dtype, so they share no code with ``surrogate_core``.
"""

from __future__ import annotations

import numpy as np


def spike(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return np.where(x >= 0, 1.0, 0.0).astype(x.dtype)


def pq_grad(x, alpha) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    a = np.asarray(alpha, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.abs(x64) > 1.0 / a, 0.0, a - a * a * np.abs(x64))


def pq_fun(x, alpha) -> np.ndarray:
    x = np.asarray(x, np.float64)
    a = np.asarray(alpha, np.float64)
    inner = (-a * np.abs(x) / 2.0 + 1.0) * a * x + 0.5
    return np.where(x < -1.0 / a, 0.0, np.where(x > 1.0 / a, 1.0, inner))
