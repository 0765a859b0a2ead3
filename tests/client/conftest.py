"""Client test fixtures: a real uvicorn server (session-wide) and the app in process (ASGI)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import surrogate_client

if getattr(surrogate_client, "__file__", None) is None:  # the bare folder ./surrogate_client as a namespace
    raise ImportError(
        "surrogate_client is not installed (found only the folder ./surrogate_client); run "
        "`.venv/bin/python -m pip install --no-deps -e ./surrogate_client`"
    )

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """``python -m service`` on a free loopback port, ready; its base URL."""
    port = free_port()
    env = dict(
        os.environ,
        SURROGATE_PORT=str(port),
        SURROGATE_HOST="127.0.0.1",
        SURROGATE_WARMUP_MAX_ELEMENTS="4096",
        SURROGATE_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        with httpx.Client(base_url=base, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready within 90 s")
                time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def asgi_app():
    """The service app (no warm-up), to be driven in process through ``httpx.ASGITransport``."""
    from helpers import make_settings
    from service.app import create_app

    return create_app(make_settings(max_elements=200_000, max_body_bytes=4_000_000, max_jobs=16))


@pytest.fixture
async def aclient(asgi_app) -> AsyncIterator[surrogate_client.AsyncSurrogateClient]:
    """An AsyncSurrogateClient talking to the app in process."""
    async with asgi_app.router.lifespan_context(asgi_app):
        async with surrogate_client.AsyncSurrogateClient(
            "http://testserver", http_transport=httpx.ASGITransport(app=asgi_app), retries=0
        ) as c:
            yield c
