"""The compute endpoints as raw ASGI routes inside FastAPI's router.

A path operation builds a ``Request``, resolves dependencies and serializes a return value, about
0.3 ms per request; a compute request is answered by ``ComputeEndpoint`` straight from the ASGI
scope instead (the route and its contract are still FastAPI's: see ``service.routes``). Per request:
the bearer token (when configured), the codec's ``prepare`` (media types, model), admission by the
data plane (concurrency, deadline, memory), the body read by one bounded loop, the data plane's
``serve`` (decode -> limits -> infer -> encode), the answer's ``send``; every error in between is
rendered by the codec's ``render_error`` and every request is counted once in the metrics.

What the codecs receive is read-only: a ``Head`` (headers, query, path parameters). What happens to
the request is told by return values and exceptions, not by flags on a shared object.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol
from urllib.parse import parse_qsl

import anyio.to_thread
from starlette.types import Receive, Scope, Send

from .errors import ApiError
from .server.httpproto import ABORT_KEY, REFUSED_KEY, REQUESTS_KEY
from .server.security import check_token

__all__ = ["CHUNK", "Answer", "ClientGone", "Codec", "ComputeEndpoint", "Head", "SendTimeout", "read_body",
           "release"]

log = logging.getLogger("service.errors")



class ClientGone(Exception):
    """The client disconnected before its request was read whole (answered by nothing; counted as 499)."""


class SendTimeout(Exception):
    """The client stopped reading the answer for longer than the send timeout (cut off; counted)."""


def release(exc: BaseException) -> None:
    """Let go of everything an exception keeps alive besides its message: the locals of the frames
    it passed through (a request body, the lists decoded from it, an answer being sent), for it and
    every exception it was raised from or during.

    A traceback holds its frames, and a frame that caught an exception (``except ... as exc``) or
    awaited a future holds that exception or future in turn: a reference cycle that only the cyclic
    garbage collector breaks, while the body it pins sits outside the memory budget. Clearing the
    frames breaks every such cycle at once, so the memory goes back as soon as the request ends.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # (a frame still running is skipped)
            e.__traceback__ = None
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        e.__cause__ = e.__context__ = None


#: Answers are handed to the server in pieces of at most this size: the server waits for a slow
#: reader between pieces, so a client that stops reading holds one piece, not the whole answer.
CHUNK = 1 << 20


class Head:
    """A request's head as the codecs see it: headers (lower-case names, latin-1 values; the last
    of a repeated header), the query string and the route's path parameters."""

    __slots__ = ("_headers", "_query", "params")

    def __init__(self, scope: Scope) -> None:
        self._headers: dict[bytes, bytes] = dict(scope["headers"])
        self._query: bytes = scope.get("query_string", b"")
        self.params: dict[str, str] = scope.get("path_params") or {}

    def header(self, name: bytes) -> str | None:
        v = self._headers.get(name)
        return None if v is None else v.decode("latin-1")

    @property
    def query(self) -> list[tuple[str, str]]:
        qs = self._query
        return parse_qsl(qs.decode("latin-1"), keep_blank_values=True) if qs else []


class Answer:
    """One answer: status, headers and the body as one or more byte chunks (sent without joining),
    or as a ``stream`` of pieces made while it is sent (a compressed answer: no Content-Length, the
    server sends it chunked; ``length`` is then what the stream is made from)."""

    __slots__ = ("status", "headers", "chunks", "length", "stream")

    def __init__(self, status: int, content_type: bytes, chunks: Iterable[bytes | memoryview],
                 headers: Iterable[tuple[bytes, bytes]] = (), *, stream: Iterator[bytes] | None = None,
                 length: int = 0) -> None:
        self.status = status
        self.stream = stream
        if stream is not None:
            self.chunks: list[bytes | memoryview] = []
            self.length = length
            self.headers = [(b"content-type", content_type), *headers]
            return
        self.chunks = list(chunks)
        self.length = sum(len(c) for c in self.chunks)
        self.headers = [(b"content-type", content_type), (b"content-length", str(self.length).encode()), *headers]

    async def send(self, send: Send, timeout: float | None = None) -> None:
        """Hand the answer to the server; ``SendTimeout`` when a piece waits on the reader longer
        than ``timeout`` (small answers are handed over at once and need no timer)."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if self.stream is not None:
            await self._send_stream(send, timeout)
            return
        pieces = [c for c in self.chunks if len(c)]
        if not pieces:
            await send({"type": "http.response.body", "body": b""})
            return
        if len(pieces) == 1 and self.length <= CHUNK:
            await send({"type": "http.response.body", "body": pieces[0]})
            return
        last = len(pieces) - 1
        for i, chunk in enumerate(pieces):
            if len(chunk) <= CHUNK:
                await _send_piece(send, chunk, i < last, timeout)
                continue
            view = memoryview(chunk)
            for o in range(0, len(view), CHUNK):
                await _send_piece(send, view[o:o + CHUNK], i < last or o + CHUNK < len(view), timeout)


    async def _send_stream(self, send: Send, timeout: float | None) -> None:
        """The stream's pieces, each made in a worker thread when the answer is large (compressing
        a megabyte takes milliseconds the event loop should not wait), and sent as it is made: one
        piece is held at a time."""
        stream = self.stream
        assert stream is not None
        offload = self.length > CHUNK
        while True:
            piece = await anyio.to_thread.run_sync(next, stream, None) if offload else next(stream, None)
            if piece is None:
                break
            if piece:
                await _send_piece(send, piece, True, timeout)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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


class Ticket(Protocol):
    def require(self, total: int, what: str, *, status: int = 422) -> None: ...
    def fits(self, total: int, what: str, *, status: int = 422) -> None: ...


def _gone(message: Any) -> Exception:
    """What an ``http.disconnect`` while reading means: the server refused the body (too slow, too
    large a trailer: the answer already went out, this counts it), or the client left."""
    refused = message.get(REFUSED_KEY)
    if refused is None:
        return ClientGone()
    status, code, text = refused
    return ApiError(status, text, code=code, reason=code, headers={"Connection": "close"})


async def read_body(receive: Receive, head: Head, limit: int, ticket: Ticket, *, inflate: bool = False,
                    into_buffer: bool = False) -> bytes:
    """The whole body, refusing (413) as soon as the declared, received or (with ``inflate``)
    inflated size passes ``limit``, and holding its bytes in ``ticket`` as they arrive, before
    they are kept (a declared size larger than the whole budget is refused at once; a declared
    size reserves nothing: a client that sends only a head holds no memory).
    ``Content-Encoding: gzip`` / ``deflate`` bodies are inflated incrementally, so a compression
    bomb costs at most ``limit`` bytes; data after the end of the compressed stream (a second gzip
    member, trailing bytes) is refused (400). With ``into_buffer``, a body of declared length
    arrives in one ``bytearray`` that grows as it arrives (no chunks joined after: half the peak
    memory of a large upload)."""
    raw = head.header(b"content-length")
    declared: int | None = None
    if raw is not None:
        try:
            declared = int(raw)
        except ValueError:
            raise ApiError(400, "Content-Length is not an integer") from None
        if declared > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", field="body")
        ticket.fits(declared, f"a request body of {declared} bytes", status=413)
    inflater = None
    enc = "identity"
    if inflate:
        enc = (head.header(b"content-encoding") or "identity").strip().lower()
        if enc == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            inflater = zlib.decompressobj()
        elif enc != "identity":
            raise ApiError(415, f"unsupported Content-Encoding {enc!r}; send gzip, deflate or identity")
    if inflater is None and declared is not None and declared <= 1 << 16:
        message = await receive()  # the common case: a small body in one message
        if message["type"] == "http.disconnect":
            raise _gone(message)
        if not message.get("more_body", False):
            body = message.get("body", b"")
            if len(body) > declared:
                raise ApiError(400, f"the body is longer than its Content-Length of {declared} bytes")
            ticket.require(len(body), f"a request body of {len(body)} bytes", status=413)
            return body
        chunks = [message.get("body", b"")]
        size = len(chunks[0])
        ticket.require(size, f"a request body of {size} bytes", status=413)
    else:
        chunks, size = [], 0
    # a declared body of some size is received into one buffer (no list of chunks joined after),
    # grown as its bytes arrive
    whole = bytearray() if into_buffer and declared is not None and inflater is None and declared > 1 << 16 else None
    received = 0  # bytes on the wire (compressed, when inflating)
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _gone(message)
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        received += len(chunk)
        if inflater is not None and chunk:
            if inflater.eof:
                raise _after_end(enc)
            try:
                chunk = inflater.decompress(chunk, limit - size + 1)
                if inflater.unconsumed_tail:
                    raise ApiError(413, f"the inflated request body is over the limit of {limit} bytes", field="body")
            except zlib.error as exc:
                encoding = head.header(b"content-encoding")
                raise ApiError(400, f"the body is not valid {encoding} data: {exc}") from None
            if inflater.unused_data:
                raise _after_end(enc)
        size += len(chunk)
        if size > limit:
            what = "inflated request body" if inflater is not None else "request body"
            raise ApiError(413, f"the {what} is over the limit of {limit} bytes", field="body")
        if declared is not None and inflater is None and size > declared:
            raise ApiError(400, f"the body is longer than its Content-Length of {declared} bytes")
        # what arrived is held before it is kept (with the compressed bytes, when inflating)
        ticket.require(size + (received if inflater is not None else 0), f"a request body of {size} bytes",
                       status=413)
        if whole is not None:
            whole += chunk
        elif chunk:
            chunks.append(chunk)
    if whole is not None:
        if size != declared:
            raise ApiError(400, f"the body ended after {size} of its {declared} declared bytes")
        return whole  # type: ignore[return-value]  # bytes-like: what the decoders read
    if inflater is not None and not inflater.eof:
        raise ApiError(400, f"the {head.header(b'content-encoding')} body is truncated")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _after_end(encoding: str) -> ApiError:
    return ApiError(400, f"the body goes on after the end of its Content-Encoding {encoding} data (a second "
                    "member, or trailing bytes); send one complete stream")


class Codec(Protocol):
    """A protocol's codec: bytes into jobs and results into bytes (LitServe's ``decode_request`` /
    ``encode_response``, KServe's decode -> infer -> encode). It knows no admission, limits or
    batching: those are the data plane's, which runs ``decode``, ``encode`` (and the rest) itself."""

    protocol: str  # "v1" or "v2": the error shape and the metrics' protocol label
    endpoint: str  # the metrics' elements label ("spike", "grad", "fun", "infer")
    job_index: bool  # whether errors name a job index

    def prepare(self, head: Head, limit: int) -> Any: ...
    def parse_bytes(self, request: Any, body: bytes) -> int: ...
    def decode(self, request: Any, body: bytes) -> Any: ...
    def where(self, decoded: Any, i: int) -> str: ...
    def answer_bytes(self, decoded: Any) -> int: ...
    def binary_answer(self, decoded: Any) -> bool: ...  # binary alone, not compressed: cheap to encode
    def extra_bytes(self, decoded: Any) -> int: ...
    def encode(self, decoded: Any, results: list[Any]) -> Answer: ...
    def render_error(self, err: ApiError) -> Answer: ...


class ComputeEndpoint:
    """The raw ASGI app of one compute route (a codec over the runtime's data plane)."""

    def __init__(self, codec: Codec, runtime: Any, label: str) -> None:
        self.codec = codec
        self.rt = runtime
        self.label = label  # the route template: the metrics' endpoint label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        rt, codec = self.rt, self.codec
        dp = rt.dataplane
        status = 500
        state = 0  # 0: nothing read yet, 1: the body read whole, 2: the answer started
        body: Any = None
        answer: Answer | None = None
        try:
            head = Head(scope)
            if rt.token_digests:
                check_token(rt.token_digests, head.header(b"authorization"))
            limit = rt.settings.max_body_bytes
            request = codec.prepare(head, limit)
            with dp.admission() as ticket:
                body = await read_body(receive, head, limit, ticket, inflate=request.inflate,
                                       into_buffer=request.into_buffer)
                state = 1
                requests = scope.get(REQUESTS_KEY)  # the server's requests in progress, where it says
                answer = await dp.serve(codec, request, body, ticket,
                                        alone=None if requests is None else len(requests) <= 1)
                body = None
                status = answer.status
                state = 2
                await answer.send(send, rt.settings.send_timeout if answer.length > CHUNK else None)
        except ApiError as err:
            body = answer = None  # nothing of the request is kept while its refusal is sent
            release(err)
            if err.code == "timeout" and state == 0:  # still uploading: a slow client, not a slow server
                err = ApiError(408, f"the request body did not arrive within {rt.settings.request_timeout} s",
                               code="request_timeout", headers={"Connection": "close"}, reason="request_timeout")
            if err.reason:
                dp.metrics.reject(err.reason)
            if state < 2:
                status = await self._refuse(scope, send, codec.render_error(err))
        except ClientGone as exc:  # gone mid-upload: nothing to answer; counted as 499 (as nginx does)
            release(exc)
            dp.metrics.reject("client_disconnect")
            status = 499
        except SendTimeout as exc:  # stopped reading the answer: cut off, its memory freed; counted as 499
            body = answer = None
            release(exc)
            dp.metrics.reject("send_timeout")
            status = 499
            await _abort(scope)
        except Exception as exc:
            body = answer = None
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            release(exc)
            if state < 2:
                internal = ApiError(500, "internal error; the server log has the details")
                await self._refuse(scope, send, codec.render_error(internal))
            status = 500
        finally:
            dp.metrics.observe_request(self.label, codec.protocol, status, time.perf_counter() - t0)

    async def _refuse(self, scope: Scope, send: Send, answer: Answer) -> int:
        """Send an error answer (a few hundred bytes) within the send timeout: its status, or 499
        when the client does not read it (counted as ``send_timeout``, the connection closed)."""
        try:
            async with asyncio.timeout(self.rt.settings.send_timeout):
                await answer.send(send)
        except TimeoutError:
            self.rt.dataplane.metrics.reject("send_timeout")
            await _abort(scope)
            return 499
        return answer.status


async def _abort(scope: Scope) -> None:
    """Close the connection of a client that stopped reading, dropping what is still queued for it
    (a graceful close would keep that until the client reads it, or for ever)."""
    abort = scope.get(ABORT_KEY)
    if abort is not None:
        abort()
        await asyncio.sleep(0)  # the server learns of the closed connection before the request ends
