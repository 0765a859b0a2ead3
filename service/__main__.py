"""``python -m service``: serve with uvicorn, configured by ``SURROGATE_*`` settings."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
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
    settings = load_settings({k: "--" + k.replace("_", "-") for k in overrides}, **overrides)
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
        from .dataplane.metrics import forget_dead_workers

        config = uvicorn.Config(
            "service.__main__:create_worker_app", factory=True, workers=settings.workers, **options
        )
        with _shared_metrics_dir():
            code = lifecycle.Supervisor(
                config, drain=settings.shutdown_drain, on_worker_gone=forget_dead_workers
            ).run()
        if code:
            sys.exit(code)
        return
    from .app import create_app

    surrogate_core.configure_for_serving()
    lifecycle.GracefulServer(uvicorn.Config(create_app(settings), **options), drain=settings.shutdown_drain).run()


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
                        body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate,
                        max_body_bytes=settings.max_body_bytes)
    return httpproto.PROTOCOL


def create_worker_app() -> Any:
    """The app of one ``--workers`` process (uvicorn's factory): serving set-up, then the app."""
    from .app import create_app

    surrogate_core.configure_for_serving()
    return create_app(load_settings())


if __name__ == "__main__":
    main()
