"""uvicorn's httptools protocol with limits on request headers.

The httptools parser buffers a header line until it ends, however long it is, and uvicorn waits for
headers for ever: one request with a 50 MB header is read whole, and a few connections that send
an unfinished one hold as many megabytes as they like. This protocol counts the bytes of each
request's head (from the first byte of the request line to the blank line that ends the headers,
both included) and

- past ``max_header_bytes`` answers ``431 Request Header Fields Too Large`` and closes the
  connection, without handing the rest to the parser;
- when a request's head is not complete ``header_timeout`` seconds after its first byte (or after
  the connection opened) answers ``408 Request Timeout`` and closes (silently, when the client
  sent nothing at all).

Both answers have the service's error body. The connection is closed gracefully: the answer is
sent, the write side shut, and whatever the client still sends is read and dropped for a short
while, so that the client reads the answer instead of a connection reset.

Use it with ``uvicorn.Config(http="service.server.httpproto:LimitedHttpToolsProtocol")`` (a string, so
that ``--workers`` processes import it too). The limits come from :func:`configure`, or from the
``SURROGATE_*`` settings when it was not called (a worker process).

While the server shuts down (:mod:`service.server.lifecycle`), every new request is answered ``503``
with ``Connection: close`` instead of reaching the app, and idle connections are closed the same
graceful way after a short grace period (a request already on its way gets the 503, not a reset).

Requests pipelined behind one another within a single read are counted from the next read on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import lifecycle

__all__ = ["ABORT_KEY", "PROTOCOL", "REQUESTS_KEY", "LimitedHttpToolsProtocol", "configure"]

#: The import string for ``uvicorn.Config(http=...)``.
PROTOCOL = "service.server.httpproto:LimitedHttpToolsProtocol"

#: The scope key under which a request finds the set of the server's requests in progress.
REQUESTS_KEY = "surrogate.requests"
#: The scope key under which a request finds a callable that closes its connection at once, dropping
#: what is still queued to send (for a client that stopped reading).
ABORT_KEY = "surrogate.abort"

#: Seconds a refused connection keeps reading (and dropping) what the client still sends.
LINGER_SECONDS = 2.0
#: On shutdown, seconds an idle connection stays open for a request that may already be on its way.
IDLE_GRACE_SECONDS = 0.25

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def configure(*, max_header_bytes: int, header_timeout: float) -> None:
    """Set the limits of every connection opened from now on in this process."""
    LimitedHttpToolsProtocol.max_header_bytes = int(max_header_bytes)
    LimitedHttpToolsProtocol.header_timeout = float(header_timeout)


def _from_settings() -> None:
    from .settings import get_settings

    s = get_settings()
    configure(max_header_bytes=s.max_header_bytes, header_timeout=s.header_timeout)


def error_bytes(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with the service's error body that closes the connection."""
    body = orjson.dumps({"error": {"status": status, "code": code, "message": message, "job": None, "field": None}})
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"retry-after: 1\r\n" if status == 503 else b"",
        b"connection: close\r\n\r\n",
        body,
    ])


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with a size limit and a time limit on each request's head."""

    max_header_bytes: int | None = None
    header_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.max_header_bytes is None or self.header_timeout is None:
            _from_settings()
        self._in_head = True  # reading a request line and headers (or waiting for the first byte)
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far: the end marker may straddle two reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining what the client still sends after the answer
        if self._in_head:
            if self._head_timer is None:
                self._arm_head_timer()
            buf = self._tail + data
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                self._head_bytes += end + 4 - len(self._tail)
            else:
                self._head_bytes += len(data)
                self._tail = buf[-3:]
            if self._head_bytes > self.max_header_bytes:  # type: ignore[operator]
                self._refuse(
                    431,
                    "headers_too_large",
                    f"the request line and headers exceed {self.max_header_bytes} bytes",
                )
                return
        super().data_received(data)

    # -- parser callbacks ---------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._in_head = False
        self._tail = b""
        self._cancel_head_timer()
        if lifecycle.is_shutting_down():
            self._refuse(503, "shutting_down", "the server is shutting down; retry on another instance")
            return
        super().on_headers_complete()
        # the requests this server has in progress, started or about to start (uvicorn's own set of
        # their tasks): the data plane gathers concurrent requests into one device call only when
        # others are on their way, and a request alone computes at once
        cast(dict, self.scope)[REQUESTS_KEY] = self.server_state.tasks
        cast(dict, self.scope)[ABORT_KEY] = lambda: self.transport.abort()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0
        self._tail = b""

    # -- shutdown -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The server is shutting down. A request in progress finishes (then the connection closes);
        an idle connection gets a short grace period, in which a request that was already on its way
        is answered 503, then closes without a reset."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self._refused or self.transport.is_closing():
            return
        self.loop.call_later(IDLE_GRACE_SECONDS, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self._in_head and self._head_bytes > 0:
            return  # a request head is arriving: it gets its 503 (or 408 at the header timeout)
        self._refused = True
        self._cancel_head_timer()
        self._close_gracefully()

    # -- limits -------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._on_head_timeout)  # type: ignore[arg-type]

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            # nothing of a request arrived: close quietly (uvicorn's keep-alive timeout covers the
            # time between requests; this covers a connection that never sent anything)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()
            return
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        self._refuse(408, "request_timeout", message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._refused = True
        self._cancel_head_timer()
        level = logging.DEBUG if status == 503 else logging.INFO  # 503s come in crowds at shutdown
        self.logger.log(level, "refused a request from %s: %d %s", _peer(self.client), status, message)
        if self.cycle is not None and not self.cycle.response_complete:
            # an earlier pipelined request is still being answered: no room for another answer
            self.cycle.keep_alive = False
            self.transport.pause_reading()
            return
        self.transport.write(error_bytes(status, code, message))
        self._close_gracefully()

    def _close_gracefully(self) -> None:
        if self.transport.can_write_eof():
            # FIN after what was written; keep reading (and dropping) for a while so that the
            # client's unread bytes do not turn the close into a reset that discards the answer
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
