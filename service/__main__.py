"""``python -m service``: serve with uvicorn, configured by ``SURROGATE_*`` settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

import surrogate_core

from .server import lifecycle
from .server.settings import Settings, load_settings

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m service", description="Serve surrogate-serve with uvicorn.")
    p.add_argument("--host", help="bind address (default SURROGATE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default SURROGATE_PORT or 8000)")
    p.add_argument("--workers", type=int, help="worker processes (default SURROGATE_WORKERS or 1)")
    p.add_argument("--root-path", help="path prefix a proxy strips before forwarding (default SURROGATE_ROOT_PATH)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = load_settings(**overrides)
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
        # The rest of the settings already come from the environment, which the workers inherit.
        for k, v in overrides.items():
            os.environ[f"SURROGATE_{k.upper()}"] = str(v)
        with _shared_metrics_dir():
            uvicorn.run("service.__main__:create_worker_app", factory=True, workers=settings.workers, **options)
        return
    from .app import create_app

    surrogate_core.configure_for_serving()
    _GracefulServer(uvicorn.Config(create_app(settings), **options), drain=settings.shutdown_drain).run()


@contextlib.contextmanager
def _shared_metrics_dir() -> Iterator[None]:
    """prometheus-client's multiprocess mode for the workers, so that one scrape of /metrics sees
    the whole server: a fresh directory for their metric files, made before they are spawned (they
    inherit PROMETHEUS_MULTIPROC_DIR) and removed at exit. A directory the environment already
    names is used as it is."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    path = tempfile.mkdtemp(prefix="surrogate-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


def _http_protocol(settings: Settings) -> str:
    """uvicorn's httptools protocol with limits on request heads (service.server.httpproto); without
    httptools, h11, whose own limit on an incomplete event covers the header size."""
    try:
        from .server import httpproto
    except ImportError:  # httptools is not installed
        return "h11"
    httpproto.configure(max_header_bytes=settings.max_header_bytes, header_timeout=settings.header_timeout,
                        body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate)
    return httpproto.PROTOCOL


def create_worker_app() -> Any:
    """The app of one ``--workers`` process (uvicorn's factory): serving set-up, then the app."""
    from .app import create_app

    surrogate_core.configure_for_serving()
    return create_app(load_settings())


class _GracefulServer(uvicorn.Server):
    """uvicorn's server with a clean stop on SIGTERM.

    - Draining: first the process is marked as shutting down (:mod:`service.server.lifecycle`), and for
      ``drain`` seconds the listener stays open: every new request, readiness probes included, is
      answered 503 with ``Connection: close`` (by the protocol, service.server.httpproto), so load
      balancers take the instance out and clients retry elsewhere, while requests in flight go on.
      Then the connections still waiting in the listen queue are accepted (so that they are
      answered rather than reset when the listener closes), and uvicorn's shutdown runs: the
      listener closes (later clients are refused), in-flight requests finish.
    - uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies with 143; a SIGTERM
      that was handled gracefully is a clean stop here, and the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, *, drain: float = 0.0) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            lifecycle.begin_shutdown()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        lifecycle.begin_shutdown()
        if self.drain > 0 and not self.force_exit:
            log.info("shutting down: new requests get 503 for %.1f s, then the listener closes", self.drain)
            await asyncio.sleep(self.drain)
        if not self.force_exit:
            await self._accept_queued_connections()
        await super().shutdown(sockets)

    async def _accept_queued_connections(self) -> None:
        """Accept what waits in the listen queue and hand it to the protocol (which answers 503):
        closing a listener resets the connections still queued on it."""
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for server in getattr(self, "servers", []):
            for listener in server.sockets or ():
                with socket.socket(fileno=os.dup(listener.fileno())) as sock:
                    sock.setblocking(False)
                    while True:
                        try:
                            conn, _ = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break
                        conn.setblocking(False)
                        try:
                            await loop.connect_accepted_socket(protocol, conn)
                        except OSError:
                            conn.close()


if __name__ == "__main__":
    main()
