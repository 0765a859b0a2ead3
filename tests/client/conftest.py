"""Client test fixtures: the app in process (ASGI). The real server is the session's (``server_url``,
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
