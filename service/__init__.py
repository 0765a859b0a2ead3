"""surrogate-serve's HTTP layer: FastAPI app over ``surrogate_core``. Knows nothing of formulas."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]


def __getattr__(name: str):  # lazy, so `import service` does not import JAX
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
