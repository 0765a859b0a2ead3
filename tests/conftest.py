"""Shared test set-up: strict JAX, and one real server for the whole session."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator

import jax
import pytest

import surrogate_core  # noqa: F401  (enables x64 before any test builds arrays)

jax.config.update("jax_numpy_rank_promotion", "raise")

# The apps and servers the tests start serve gRPC only where a test gives them a port (SURROGATE_GRPC_PORT,
# 8001 by default, would be one port for every server at once).
os.environ.setdefault("SURROGATE_GRPC_PORT", "0")


@pytest.fixture(scope="session")
def shared_server() -> Iterator[tuple[str, object]]:
    """``python -m service`` with the default settings (log level warning; system shared memory on, for the
    documentation's snippets) on a free loopback port (and gRPC on another: ``process.grpc_address``), started
    when a test first asks for it and shared by the whole session: ``(base_url, process)``.

    For tests that send requests and read the answers. A test that needs settings of its own, stops or
    signals the server, measures its memory, or reads a counter as a total (not as a difference) starts
    a server of its own with ``liveserver.running_server(**settings)``."""
    from liveserver import free_port, running_server

    with running_server(log_level="warning", shared_memory=True, grpc_port=free_port()) as (base, proc):
        # read its output as it comes, so that a long session's log lines never fill the pipe and block it
        tail: deque[str] = deque(maxlen=200)
        reader = threading.Thread(target=lambda: tail.extend(proc.stdout), name="shared-server-output", daemon=True)
        reader.start()
        try:
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=10)


@pytest.fixture(scope="session")
def server_url(shared_server) -> str:
    """The base URL of the session's shared server."""
    return shared_server[0]
