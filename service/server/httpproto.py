"""uvicorn's httptools protocol with limits on request heads and bodies.

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

Its body is bounded as well, whatever the route and whether or not the app reads it:

- a body must keep arriving: no byte for ``body_timeout`` seconds, or fewer than ``body_min_rate``
  bytes per second on average once its first ``body_timeout`` seconds are over (as Apache's
  ``mod_reqtimeout`` ``MinRate``: each byte received adds ``1 / body_min_rate`` seconds to the
  body's allowance), is answered ``408 Request Timeout`` and closed. The clock stops while the
  server itself holds the body up: reading paused because the app has not taken what arrived, a
  request queued behind another, a client waiting for ``100 Continue``. All bodies on their way
  share one timer, as the data plane's request deadlines do;
- the trailer section of a chunked body (its fields after the last chunk, and the blank line that
  ends them) is counted as the head is, against ``max_header_bytes``: past it ``431``, before the
  parser buffers it. Trailer fields are read and dropped (they never reach the request's headers);
- after an answer sent before its request's body has arrived whole (a 401, a 503, a route that
  ignores the body), the rest of the body is read and dropped, under the same body watch and up to
  ``max_discard_bytes`` (the body limit), since most clients write a whole body before they read
  the answer; past that (or a declared length past it) the connection ends.

When the app is still reading the refused body, its ``receive`` returns ``http.disconnect`` with
the refusal under :data:`REFUSED_KEY` (``(status, code, message)``), so that it can count it.

Every refusal has the service's error body. The connection is closed gracefully: the answer is
sent, the write side shut, and whatever the client still sends is read and dropped for a short
while, so that the client reads the answer instead of a connection reset.

Use it with ``uvicorn.Config(http="service.server.httpproto:LimitedHttpToolsProtocol")`` (a string, so
that ``--workers`` processes import it too). The limits come from :func:`configure`, or from the
``SURROGATE_*`` settings when it was not called (a worker process).

While the server shuts down (:mod:`service.server.lifecycle`), every new request is answered ``503``
with ``Connection: close`` instead of reaching the app, and idle connections are closed the same
graceful way after a short grace period (a request already on its way gets the 503, not a reset).

A request pipelined behind a body with ``Content-Length`` within a single read is counted from the
next read on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import lifecycle

__all__ = ["ABORT_KEY", "PROTOCOL", "REFUSED_KEY", "REQUESTS_KEY", "LimitedHttpToolsProtocol", "configure"]

#: The import string for ``uvicorn.Config(http=...)``.
PROTOCOL = "service.server.httpproto:LimitedHttpToolsProtocol"

#: The scope key under which a request finds the set of the server's requests in progress.
REQUESTS_KEY = "surrogate.requests"
#: The scope key under which a request finds a callable that closes its connection at once, dropping
#: what is still queued to send (for a client that stopped reading).
ABORT_KEY = "surrogate.abort"

#: The key of an ``http.disconnect`` message (and of the scope) that tells the app why the
#: protocol ended its request: ``(status, code, message)``, the answer the client was sent.
REFUSED_KEY = "surrogate.refused"

#: Seconds a refused connection keeps reading (and dropping) what the client still sends.
LINGER_SECONDS = 2.0
#: On shutdown, seconds an idle connection stays open for a request that may already be on its way.
IDLE_GRACE_SECONDS = 0.25

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def configure(*, max_header_bytes: int, header_timeout: float, body_timeout: float, body_min_rate: int,
              max_body_bytes: int | None = None) -> None:
    """Set the limits of every connection opened from now on in this process."""
    if max_body_bytes is not None:
        LimitedHttpToolsProtocol.max_discard_bytes = int(max_body_bytes)
    LimitedHttpToolsProtocol.max_header_bytes = int(max_header_bytes)
    LimitedHttpToolsProtocol.header_timeout = float(header_timeout)
    LimitedHttpToolsProtocol.body_timeout = float(body_timeout)
    LimitedHttpToolsProtocol.body_min_rate = int(body_min_rate)


def _from_settings() -> None:
    from .settings import get_settings

    s = get_settings()
    configure(max_header_bytes=s.max_header_bytes, header_timeout=s.header_timeout, body_timeout=s.body_timeout,
              body_min_rate=s.body_min_rate, max_body_bytes=s.max_body_bytes)


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
    """:class:`HttpToolsProtocol` with size and time limits on each request's head and body."""

    max_header_bytes: int | None = None
    header_timeout: float | None = None
    body_timeout: float = 10.0
    body_min_rate: int = 1024
    #: The most body bytes read and dropped after an early answer (``SURROGATE_MAX_BODY_BYTES``).
    max_discard_bytes: int = 64 << 20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.max_header_bytes is None or self.header_timeout is None:
            _from_settings()
        self._in_head = True  # reading a request line and headers (or waiting for the first byte)
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far: the end marker may straddle two reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        # the body of the latest request: whether it is still arriving, its framing when chunked,
        # and the watch's view of it (bytes so far, when it started, when bytes last came)
        self._body_pending = False
        self._chunked: _Chunked | None = None
        self._body_bytes = 0
        self._body_start = 0.0
        self._body_last = 0.0
        self._body_checked = 0.0
        self._watched: _BodyWatch | None = None

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._unwatch()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # the head and a chunked body's framing are followed here, before the parser sees them:
        # each read is handed on in pieces that end where a head, or a chunked message, ends
        while data and not self._refused:
            if self._in_head:
                if self._head_timer is None:
                    self._arm_head_timer()
                buf = self._tail + data
                end = buf.find(b"\r\n\r\n")
                used = len(data) if end < 0 else end + 4 - len(self._tail)
                self._head_bytes += used
                self._tail = buf[-3:] if end < 0 else b""
                if self._head_bytes > self.max_header_bytes:  # type: ignore[operator]
                    self._refuse(
                        431,
                        "headers_too_large",
                        f"the request line and headers exceed {self.max_header_bytes} bytes",
                    )
                    return
                piece, data = data[:used], data[used:]
                super().data_received(piece)
                if self.parser is None or self.transport.is_closing() or self.parser.should_upgrade():
                    return  # a 400, a lost connection, an upgrade: nothing more for this parser
            elif self._chunked is not None:
                end = self._chunked.scan(data)
                if self._chunked.trailer > self.max_header_bytes:  # type: ignore[operator]
                    message = f"the trailer fields exceed {self.max_header_bytes} bytes"
                    self._refuse_body(431, "headers_too_large", message)
                    return
                piece, data = (data, b"") if end < 0 else (data[:end], data[end:])
                super().data_received(piece)
                if self.parser is None or self.transport.is_closing():
                    return
            else:
                super().data_received(data)
                break
        if self._body_pending and self._watched is None and not self._refused:
            self._watched = _watch(self.loop, self.body_timeout)
            self._watched.add(self)

    # -- parser callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # after the head: a trailer field, dropped
            super().on_header(name, value)

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
        scope = cast(dict, self.scope)
        scope[REQUESTS_KEY] = self.server_state.tasks
        scope[ABORT_KEY] = lambda: self.transport.abort()
        if self.cycle is not None and self.cycle.scope is self.scope:  # not an upgrade
            self.cycle.receive = _telling_refusals(self.cycle.receive, scope)  # type: ignore[method-assign,assignment]
            self._body_pending = True  # until the parser says the message is complete
            self._chunked = _Chunked() if _is_chunked(scope["headers"]) else None
            self._body_bytes = 0
            self._body_start = self._body_last = self._body_checked = self.loop.time()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            self._body_bytes += len(body)
            self._body_last = self.loop.time()
            if self.cycle is not None and self.cycle.response_complete and self._body_bytes > self.max_discard_bytes:
                self._end_discarding()  # an early answer's body goes on past what any request may send
                return
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._body_pending = False
        self._chunked = None
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0
        self._tail = b""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._refused:
            self._unwatch()
            self._close_gracefully()
        elif self._body_pending and self.cycle is not None and self.cycle.response_complete:
            # answered before its body arrived whole (a 401, a 503, a route that reads no body): the
            # rest is read and dropped, since most clients write a whole body before they read the
            # answer, still under the body watch (a stall or a trickle ends the connection), and up
            # to the body limit: a declared length past it ends the connection now
            declared = _content_length(cast(dict, self.scope)["headers"])
            if declared is not None and declared > self.max_discard_bytes:
                self._end_discarding()

    def _end_discarding(self) -> None:
        self._refused = True
        self._unwatch()
        self._close_gracefully()

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

    def _check_body(self, now: float) -> bool:
        """The body watch's look at this connection's body (every tick): refuses it when it stalls
        or falls under the minimum rate. False once there is nothing left to watch."""
        if not self._body_pending or self._refused or self.cycle is None or self.transport.is_closing():
            self._watched = None
            return False
        held = self.flow.read_paused or self.cycle.waiting_for_100_continue
        if held:  # the server holds the body up: its clock stops
            self._body_start += now - self._body_checked
            self._body_last = now
        self._body_checked = now
        timeout, rate = self.body_timeout, self.body_min_rate
        if now - self._body_last > timeout:
            message = f"no byte of the request body arrived for {timeout:g} s (SURROGATE_BODY_TIMEOUT)"
        elif rate and self._body_bytes < rate * (now - self._body_start - timeout):
            message = (f"the request body arrived at fewer than {rate} bytes per second after its first {timeout:g} s "
                       "(SURROGATE_BODY_MIN_RATE)")
        else:
            return True
        self._watched = None
        self._refuse_body(408, "request_timeout", message)
        return False

    def _unwatch(self) -> None:
        if self._watched is not None:
            self._watched.discard(self)
            self._watched = None

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

    def _refuse_body(self, status: int, code: str, message: str) -> None:
        """Refuse the request whose body is arriving (``self.cycle``): the answer, when the app has
        not started one, and the end of the connection; the app's ``receive`` then tells it."""
        self._refused = True
        self._unwatch()
        self.logger.info("refused a request body from %s: %d %s", _peer(self.client), status, message)
        cast(dict, self.cycle.scope)[REFUSED_KEY] = (status, code, message)
        if self.pipeline:
            # queued behind an answer in progress: dropped, and the connection ends after that answer
            self.pipeline.clear()
            self.transport.pause_reading()
            return
        started = self.cycle.response_started
        self.cycle.disconnected = True  # the app reads no more of it, and what it sends is dropped
        self.cycle.message_event.set()
        if not started:
            self.transport.write(error_bytes(status, code, message))
            self._close_gracefully()
        elif not self.cycle.response_complete:
            self.transport.close()  # an answer is half sent: it is cut
        else:
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        if self.transport.can_write_eof():
            # FIN after what was written; keep reading (and dropping) for a while so that the
            # client's unread bytes do not turn the close into a reset that discards the answer
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def _telling_refusals(receive: Callable[[], Awaitable[Any]], scope: dict) -> Callable[[], Awaitable[Any]]:
    """``receive`` whose ``http.disconnect`` carries the protocol's refusal of the request, if any."""

    async def receive_() -> Any:
        message = await receive()
        if message["type"] == "http.disconnect" and REFUSED_KEY in scope:
            return {"type": "http.disconnect", REFUSED_KEY: scope[REFUSED_KEY]}
        return message

    return receive_


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _is_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's body is chunked (as the parser decides: the last transfer coding)."""
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    return bool(codings) and codings[-1].rsplit(b",", 1)[-1].strip().lower() == b"chunked"


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Chunked:
    """A chunked body's framing, followed just far enough to count the bytes of its trailer section
    (after the last chunk's size line, up to and including the blank line that ends the section).
    Malformed framing is the parser's to refuse: the count then stops."""

    __slots__ = ("state", "left", "line", "trailer", "tail")
    SIZE, DATA, TRAILER, DONE = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.left = 0  # DATA: the chunk's bytes still to come, and its CRLF
        self.line = b""  # SIZE: the start of the size line (a size is at most 16 hex digits)
        self.trailer = 0  # TRAILER: its bytes so far
        self.tail = b""  # TRAILER: its last bytes (the blank line may straddle two reads)

    def scan(self, data: bytes) -> int:
        """Follow ``data``; the offset just past the message's end in it, or -1 (not in it)."""
        i, n = 0, len(data)
        while i < n:
            if self.state == self.SIZE:
                j = data.find(b"\n", i)
                if len(self.line) < 40:
                    self.line += data[i : n if j < 0 else j][: 40 - len(self.line)]
                if j < 0:
                    return -1
                i = j + 1
                size = self.line.split(b";", 1)[0].rstrip(b"\r")
                self.line = b""
                if not _HEX.fullmatch(size):
                    self.state = self.DONE
                    return -1
                if int(size, 16):
                    self.state, self.left = self.DATA, int(size, 16) + 2
                else:  # the last chunk; the CRLF that ended its line starts the search for the blank line
                    self.state, self.tail = self.TRAILER, b"\r\n"
            elif self.state == self.DATA:
                k = min(self.left, n - i)
                i += k
                self.left -= k
                if not self.left:
                    self.state = self.SIZE
            elif self.state == self.TRAILER:
                buf = self.tail + data[i:]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.trailer += n - i
                    self.tail = buf[-3:]
                    return -1
                used = end + 4 - len(self.tail)
                self.trailer += used
                self.state = self.DONE
                return i + used
            else:
                return -1
        return -1


class _BodyWatch:
    """The request bodies on their way on one event loop, with one timer for all (as the data
    plane's ``Deadlines``): it runs only while some body is arriving, every ``tick`` seconds (a
    tenth of the body timeout, at most 250 ms), and asks each connection to check its body."""

    __slots__ = ("loop", "tick", "members", "_timer", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.tick = min(0.25, timeout / 10)
        self.members: set[LimitedHttpToolsProtocol] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: LimitedHttpToolsProtocol) -> None:
        self.members.add(conn)
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._check)

    def discard(self, conn: LimitedHttpToolsProtocol) -> None:
        self.members.discard(conn)

    def _check(self) -> None:
        now = self.loop.time()
        for conn in list(self.members):
            if not conn._check_body(now):
                self.members.discard(conn)
        self._timer = self.loop.call_later(self.tick, self._check) if self.members else None


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BodyWatch] = weakref.WeakKeyDictionary()


def _watch(loop: asyncio.AbstractEventLoop, timeout: float) -> _BodyWatch:
    """The body watch of ``loop`` (one per loop, made when first needed)."""
    watch = _WATCHES.get(loop)
    if watch is None or watch.tick != min(0.25, timeout / 10):
        watch = _WATCHES[loop] = _BodyWatch(loop, timeout)
    return watch


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
