"""``python -m service``: serve with uvicorn, configured by ``SURROGATE_*`` settings."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

import surrogate_core

from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m service", description="Serve surrogate-serve with uvicorn.")
    p.add_argument("--host", help="bind address (default SURROGATE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default SURROGATE_PORT or 8000)")
    p.add_argument("--workers", type=int, help="worker processes (default SURROGATE_WORKERS or 1)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("jax").setLevel(logging.WARNING)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "loop": "auto",
        "http": _http_protocol(settings),
        "timeout_graceful_shutdown": settings.graceful_timeout,
        "access_log": settings.access_log,
    }
    if options["http"] == "h11":
        options["h11_max_incomplete_event_size"] = settings.max_header_bytes
    if settings.workers > 1:
        # Workers are spawned processes that each build the app from the environment.
        import os

        # The rest of the settings already come from the environment, which the workers inherit.
        for k, v in overrides.items():
            os.environ[f"SURROGATE_{k.upper()}"] = str(v)
        uvicorn.run("service.__main__:create_worker_app", factory=True, workers=settings.workers, **options)
        return
    from .app import create_app

    surrogate_core.configure_for_serving()
    _GracefulServer(uvicorn.Config(create_app(settings), **options)).run()


def _http_protocol(settings: Settings) -> str:
    """uvicorn's httptools protocol with limits on request heads (service.httpproto); without
    httptools, h11, whose own limit on an incomplete event covers the header size."""
    try:
        from . import httpproto
    except ImportError:  # httptools is not installed
        return "h11"
    httpproto.configure(max_header_bytes=settings.max_header_bytes, header_timeout=settings.header_timeout)
    return httpproto.PROTOCOL


def create_worker_app() -> Any:
    """The app of one ``--workers`` process (uvicorn's factory): serving set-up, then the app."""
    from .app import create_app

    surrogate_core.configure_for_serving()
    return create_app(Settings())


class _GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies with 143; a
    SIGTERM that was handled gracefully is a clean stop here, and the process exits 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)


if __name__ == "__main__":
    main()
