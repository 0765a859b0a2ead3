"""The bare-ASGI request context every endpoint handler receives, and the responses they send.

No Starlette ``Request`` per call: headers are looked up in the ASGI list, the body is read by one
bounded loop (``Call.body``), and a response is two ``send`` calls. This is what keeps a small
request close to the cost of the HTTP server itself.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

from .errors import ApiError

__all__ = ["Call", "ClientGone", "Response", "json_response", "qualities"]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before its request was read whole (answered by nothing; counted as 499)."""


class SendTimeout(Exception):
    """The client stopped reading the answer for longer than the send timeout (cut off; counted)."""


#: Answers are handed to the server in pieces of at most this size: the server waits for a slow
#: reader between pieces, so a client that stops reading holds one piece, not the whole answer.
CHUNK = 1 << 20


class Response:
    """One answer: status, headers and the body as one or more byte chunks (sent without joining)."""

    __slots__ = ("status", "headers", "chunks", "length")

    def __init__(self, status: int, content_type: bytes, chunks: Iterable[bytes | memoryview],
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.status = status
        self.chunks = list(chunks)
        self.length = sum(len(c) for c in self.chunks)
        self.headers = [(b"content-type", content_type), (b"content-length", str(self.length).encode()), *headers]

    async def send(self, send: Send, timeout: float | None = None) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        pieces = [c for c in self.chunks if len(c)]
        if not pieces:
            await send({"type": "http.response.body", "body": b""})
            return
        last = len(pieces) - 1
        if self.length <= CHUNK:  # small: handed over at once, no wait on the reader worth a timer
            timeout = None
        for i, chunk in enumerate(pieces):
            if len(chunk) <= CHUNK:
                await _send_piece(send, chunk, i < last, timeout)
                continue
            view = memoryview(chunk)
            for o in range(0, len(view), CHUNK):
                await _send_piece(send, view[o:o + CHUNK], i < last or o + CHUNK < len(view), timeout)


async def _send_piece(send: Send, piece: bytes | memoryview, more: bool, timeout: float | None) -> None:
    message = {"type": "http.response.body", "body": piece, "more_body": more}
    if timeout is None:
        await send(message)
        return
    try:
        async with asyncio.timeout(timeout):  # the server waits here while the client does not read
            await send(message)
    except TimeoutError:
        raise SendTimeout() from None


def qualities(header: str | None) -> dict[str, float]:
    """An ``Accept``-style header as ``{token: q}`` (tokens lower-cased; the best q of a repeated
    token; an unreadable q counts as 0)."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        token, q = fields[0].lower(), 1.0
        if not token:
            continue
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        out[token] = max(out.get(token, -1.0), q)
    return out


def json_response(body: bytes, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    return Response(status, b"application/json", (body,), headers)


class Call:
    """One HTTP request: the ASGI scope and channels, the matched path parameters, and what the
    limits and metrics need to know about it (body read whole, client gone, status sent)."""

    __slots__ = ("scope", "receive", "_send", "params", "status", "body_done", "disconnected", "_headers", "ticket",
                 "send_timeout")

    def __init__(self, scope: dict[str, Any], receive: Receive, send: Send, params: dict[str, str]) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self.params = params
        self.status = 0  # 0 until the response has started
        self.body_done = False
        self.disconnected = False
        self._headers: dict[bytes, bytes] | None = None
        self.ticket: Any = None  # the data plane's memory reservation, for admitted (compute) requests
        self.send_timeout: float | None = None

    # -- request ---------------------------------------------------------------------------------
    def header(self, name: bytes) -> str | None:
        """A request header (lower-case name), decoded as latin-1; the last one if repeated."""
        if self._headers is None:
            self._headers = dict(self.scope["headers"])
        v = self._headers.get(name)
        return None if v is None else v.decode("latin-1")

    @property
    def query(self) -> list[tuple[str, str]]:
        qs = self.scope.get("query_string", b"")
        return parse_qsl(qs.decode("latin-1"), keep_blank_values=True) if qs else []

    async def body(self, limit: int, *, decode_content: bool = False, into_buffer: bool = False) -> bytes:
        """The whole body, refusing (413) as soon as the declared, received or (with
        ``decode_content``) inflated size passes ``limit``. ``Content-Encoding: gzip`` / ``deflate``
        bodies are inflated incrementally, so a compression bomb costs at most ``limit`` bytes. With
        ``into_buffer``, a body of declared length arrives in one ``bytearray`` (no chunks joined after:
        half the peak memory of a large upload)."""
        raw = self.header(b"content-length")
        declared: int | None = None
        if raw is not None:
            try:
                declared = int(raw)
            except ValueError:
                raise ApiError(400, "Content-Length is not an integer") from None
            if declared > limit:
                raise ApiError(
                    413, f"request body of {declared} bytes is over the limit of {limit} bytes", field="body"
                )
            if self.ticket is not None:
                self.ticket.require(declared, f"a request body of {declared} bytes", status=413)
        inflater = None
        if decode_content:
            enc = (self.header(b"content-encoding") or "identity").strip().lower()
            if enc == "gzip":
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif enc == "deflate":
                inflater = zlib.decompressobj()
            elif enc != "identity":
                raise ApiError(415, f"unsupported Content-Encoding {enc!r}; send gzip, deflate or identity")
        chunks: list[bytes] = []
        # a declared body of some size is received into one buffer (no list of chunks joined after)
        whole = (bytearray(declared) if into_buffer and declared is not None and inflater is None
                 and declared > 1 << 16 else None)
        size = 0
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientGone()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if inflater is not None and chunk:
                try:
                    chunk = inflater.decompress(chunk, limit - size + 1)
                    if inflater.unconsumed_tail:
                        raise ApiError(
                            413, f"the inflated request body is over the limit of {limit} bytes", field="body"
                        )
                except zlib.error as exc:
                    encoding = self.header(b"content-encoding")
                    raise ApiError(400, f"the body is not valid {encoding} data: {exc}") from None
            size += len(chunk)
            if size > limit:
                what = "inflated request body" if inflater is not None else "request body"
                raise ApiError(413, f"the {what} is over the limit of {limit} bytes", field="body")
            if self.ticket is not None and (declared is None or inflater is not None):
                self.ticket.require(size + (declared if inflater is not None and declared else 0),
                                    f"a request body of {size} bytes", status=413)
            if whole is not None:
                if size > len(whole):
                    raise ApiError(400, f"the body is longer than its Content-Length of {len(whole)} bytes")
                whole[size - len(chunk):size] = chunk
            elif chunk:
                chunks.append(chunk)
        if whole is not None:
            if size != len(whole):
                raise ApiError(400, f"the body ended after {size} of its {len(whole)} declared bytes")
            self.body_done = True
            return whole  # type: ignore[return-value]  # bytes-like: what the decoders read
        if inflater is not None and not inflater.eof:
            raise ApiError(400, f"the {self.header(b'content-encoding')} body is truncated")
        self.body_done = True
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- response --------------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    async def respond(self, response: Response) -> None:
        await response.send(self.send, self.send_timeout)
