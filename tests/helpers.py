"""Helpers shared by the service, client and end-to-end tests."""

from __future__ import annotations

from liveserver import npy  # noqa: F401  (one .npy helper for every test)
from service.server.settings import Settings


def make_settings(**kw) -> Settings:
    """Test settings: no warm-up unless asked (tests compile what they use)."""
    kw.setdefault("warmup", False)
    return Settings(**kw)


def npz(**arrays) -> bytes:
    """Named arrays as the bytes of an ``.npz`` file."""
    import io

    import numpy as np

    b = io.BytesIO()
    np.savez(b, **{k: np.asarray(v) for k, v in arrays.items()})
    return b.getvalue()
