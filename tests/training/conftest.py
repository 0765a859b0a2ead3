"""Training test fixtures: a client of the session's real server (``server_url``, tests/conftest.py), and
one whose requests are counted and whose connection can be cut (the server "going away" during a
backward pass)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import surrogate_client


class CountingTransport(httpx.HTTPTransport):
    """Counts the requests per path; while ``down`` is set, fails them as a refused connection."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.down = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.paths.append(request.url.path)
        return super().handle_request(request)

    def count(self, path: str = "/v1/grad") -> int:
        return self.paths.count(path)


@pytest.fixture(scope="module")
def client(server_url) -> Iterator[surrogate_client.SurrogateClient]:
    with surrogate_client.SurrogateClient(server_url) as c:
        yield c


@pytest.fixture
def counted(server_url) -> Iterator[tuple[surrogate_client.SurrogateClient, CountingTransport]]:
    """A client (no retries) whose requests are counted by path."""
    transport = CountingTransport()
    with surrogate_client.SurrogateClient(server_url, http_transport=transport, retries=0) as c:
        yield c, transport
