"""Process lifecycle: whether the server is shutting down.

Set once, on SIGTERM, before the listener closes (``service.__main__``). While it is set the HTTP
protocol (``service.server.httpproto``) answers every new request ``503`` with ``Connection: close``, so
that load balancers and clients move on while in-flight requests finish; the app may read it too
(for instance to report not-ready). A threading.Event, so that it can be read from any thread.
"""

from __future__ import annotations

import threading

__all__ = ["begin_shutdown", "is_shutting_down", "reset"]

_shutting_down = threading.Event()


def begin_shutdown() -> None:
    """Mark the process as shutting down (idempotent)."""
    _shutting_down.set()


def is_shutting_down() -> bool:
    return _shutting_down.is_set()


def reset() -> None:
    """Clear the flag (for tests that run an app in-process more than once)."""
    _shutting_down.clear()
