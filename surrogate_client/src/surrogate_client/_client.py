"""``SurrogateClient`` (blocking) and ``AsyncSurrogateClient``: one httpx client each, retries,
typed errors, a deadline per call and a cap on the size of each answer. The request and response
formats are in ``_wire``; this module only sends and reads."""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import http.client
import io
import ipaddress
import os
import queue
import socket
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import anyio
import httpx
import numpy as np

from . import _wire
from ._exceptions import (
    ApiError,
    ServerError,
    ServiceUnavailable,
    Timeout,
    TransportError,
    UnsupportedMediaType,
    api_error_from_response,
)
from ._version import __version__

__all__ = ["AsyncSurrogateClient", "SurrogateClient"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

#: Seconds one call may take in all (every attempt, the pauses between them, reading the answer)
#: when neither ``deadline`` nor a longer ``timeout`` is given.
DEFAULT_DEADLINE = 60.0

#: Bytes an answer may hold beyond the most a correct answer to its request can (``answer_margin``).
DEFAULT_ANSWER_MARGIN = 1 << 16

#: The most bytes of a metadata answer (``info``, ``surrogates``, ``health``...), before the margin.
METADATA_ANSWER_BYTES = 1 << 20

#: The bytes of an error answer (4xx, 5xx) that are read; the rest is dropped (and the connection).
ERROR_ANSWER_BYTES = 1 << 16

T = TypeVar("T")


class _Default:
    def __repr__(self) -> str:
        return "<default>"


#: ``deadline`` not given: :func:`default_deadline` of the ``timeout``.
_DEFAULT: Any = _Default()

#: Statuses answered again after a pause (the server asks to come back later).
RETRY_STATUSES = frozenset({429, 503})

#: Transport errors after which a request is sent again: the connection failed or broke before
#: an answer (every compute request is a pure function of its body, so resending is safe).
#: Read and write timeouts are not retried: the server may just be busy with the same request.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.NetworkError,  # ConnectError, ReadError, WriteError, CloseError
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,  # e.g. a kept-alive connection closed by the server
)


def default_deadline(timeout: httpx.Timeout) -> float | None:
    """The deadline of a call when none is given: :data:`DEFAULT_DEADLINE`, or twice the longest of
    ``timeout``'s limits where that is longer (so a longer ``timeout`` still gets its waits); none
    when ``timeout`` leaves reads or writes unbounded."""
    if timeout.read is None or timeout.write is None:
        return None
    longest = max(t for t in (timeout.connect, timeout.read, timeout.write, timeout.pool) if t is not None)
    return max(DEFAULT_DEADLINE, 2.0 * longest)


class _Call:
    """The deadline of one call (``seconds`` None: none)."""

    def __init__(self, seconds: float | None, url: str) -> None:
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds
        self.url = url
        self.cancelled = False  # the caller has given up (it raised the deadline's Timeout)

    def left(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> Timeout:
        return Timeout(f"no complete answer from {self.url} within the deadline of {self.seconds} s")

    def check(self) -> None:
        left = self.left()
        if self.cancelled or (left is not None and left <= 0):
            raise self.expired()

    def fits(self, pause: float) -> bool:
        """Whether a pause of ``pause`` seconds ends before the deadline."""
        left = self.left()
        return left is None or pause < left

    def timeout(self, base: httpx.Timeout) -> httpx.Timeout:
        """``base`` with no wait longer than what is left of the deadline."""
        left = self.left()
        if left is None:
            return base
        left = max(left, 0.001)

        def cut(t: float | None) -> float:
            return left if t is None else min(t, left)

        return httpx.Timeout(connect=cut(base.connect), read=cut(base.read), write=cut(base.write),
                             pool=cut(base.pool))


class _Expired(Exception):
    """The call's deadline passed while it waited: on a socket of the direct connection, or for a
    worker thread."""


class _Workers:
    """Daemon threads that run the blocking client's calls while their callers wait, at most until
    the deadline; a thread is reused once its call ends (up to ``keep`` idle ones are kept)."""

    def __init__(self, keep: int = 32) -> None:
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._keep = keep

    def run(self, job: Callable[[], None]) -> None:
        """Start ``job`` (which handles its own exceptions) in an idle thread, or a new one."""
        with self._lock:
            jobs = self._idle.pop() if self._idle else None
        if jobs is None:
            jobs = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(jobs,), name="surrogate-client-call", daemon=True).start()
        jobs.put(job)

    def call(self, fn: Callable[[], T], seconds: float, *, abandoned: Callable[[], None] | None = None) -> T:
        """``fn()`` in a worker thread, waited for at most ``seconds``: its result, or its exception
        raised here. Not done by then: ``_Expired`` (``fn`` goes on in its thread), after
        ``abandoned()``, which is also called if the wait itself is interrupted."""
        box: list[tuple[bool, Any]] = []
        done = threading.Event()

        def work() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            finally:
                done.set()

        self.run(work)
        try:
            finished = done.wait(max(seconds, 0.0))
        finally:
            if not done.is_set() and abandoned is not None:
                abandoned()
        if not finished:
            raise _Expired
        ok, value = box.pop()
        if ok:
            return value
        try:
            raise value
        finally:
            del value

    def _serve(self, jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            job = jobs.get()
            job()
            del job  # keep nothing of the call (its result) while idle
            with self._lock:
                if len(self._idle) >= self._keep:
                    return
                self._idle.append(jobs)

    def forget(self) -> None:
        """In a forked child: the parent's threads are not there."""
        self._idle = []
        self._lock = threading.Lock()


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_WORKERS.forget)


# -- the blocking client's own HTTP/1.1 ----------------------------------------------------------


def _wait(base: float | None, call: _Call) -> float | None:
    """The longest a socket may wait: ``base`` (a timeout, None for none), cut to the deadline."""
    left = call.left()
    if left is None:
        return base
    if left <= 0:
        raise _Expired
    return left if base is None else min(base, left)


def _timed_out(call: _Call, exc: type[httpx.TimeoutException]) -> Exception:
    left = call.left()
    return _Expired() if left is not None and left <= 0 else exc("timed out")


class _DeadlineIO(io.RawIOBase):
    """The receiving side of a socket, for :class:`http.client.HTTPResponse`: each read waits at most
    the read timeout and never past the call's deadline, so a trickle of bytes cannot stretch a call."""

    def __init__(self, sock: socket.socket, timeout: float | None, call: _Call) -> None:
        self._sock, self._timeout, self._call = sock, timeout, call

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self._sock.settimeout(_wait(self._timeout, self._call))
        try:
            return self._sock.recv_into(b)
        except TimeoutError:
            raise _timed_out(self._call, httpx.ReadTimeout) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None


class _Conn:
    """One kept-alive connection; :meth:`makefile` gives ``HTTPResponse`` the deadline-bound reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw: _DeadlineIO | None = None

    def makefile(self, mode: str) -> io.BufferedReader:
        assert self.raw is not None
        return io.BufferedReader(self.raw, 1 << 16)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int, call: _Call) -> list[Any]:
    """The addresses of ``host``. ``getaddrinfo`` cannot be interrupted, so with a deadline it runs in
    a worker thread and the caller waits for it at most until the deadline."""
    def lookup() -> list[Any]:
        try:
            return [info[4] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None

    if call.at is None:
        return lookup()
    return _WORKERS.call(lookup, call.left() or 0.0)


def _direct_ok(url: httpx.URL, headers: Mapping[str, str]) -> bool:
    """Whether :class:`_Direct` can serve ``url``: plain ``http://``, no proxy configured (httpx would
    use it), headers without line breaks (httpx refuses those)."""
    if url.scheme != "http" or not url.host or url.query:
        return False
    proxies = urllib.request.getproxies()
    if proxies.get("http") or proxies.get("all"):
        return False
    return all("\r" not in k + v and "\n" not in k + v for k, v in headers.items())


def _finished(response: http.client.HTTPResponse) -> bool:
    """Whether the whole answer has been read (so the connection can carry the next request)."""
    return response.isclosed() if response.chunked else response.length == 0


def _read_exactly(response: http.client.HTTPResponse, n: int) -> bytearray:
    """The next ``n`` bytes of a body of known length, read straight into their buffer (less if the
    server closes first: the caller sees ``response.length`` left over)."""
    body = bytearray(n)
    view = memoryview(body)
    got = 0
    while got < n:
        more = response.readinto(view[got:])
        if not more:
            break
        got += more
    view.release()
    del body[got:]
    return body


class _Direct:
    """The blocking client's own HTTP/1.1 client, for ``http://`` without a proxy: a call costs about
    half of what it does through httpx. The request head and a small body go in one ``send``; the
    answer's head is parsed by :mod:`http.client` and its body read in raw pieces (inflated by the
    caller); every socket wait is cut to what is left of the call's deadline, so calls run on the
    caller's thread. Failures are raised as the httpx exceptions the client handles either way."""

    #: bodies up to this size are sent in one piece with the head
    JOIN = 1 << 16

    def __init__(self, url: httpx.URL, headers: Mapping[str, str], timeout: httpx.Timeout, keep: int = 20) -> None:
        self.host = url.host
        self.port = url.port or 80
        self.prefix = url.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        self.literal = _is_ip(self.host)
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self._host = netloc if url.port is None else f"{netloc}:{url.port}"
        self._base = {k.lower(): (k, v) for k, v in headers.items()}
        self._timeout = timeout
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._keep = keep
        self._pid = os.getpid()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self, call: _Call) -> _Conn:
        addresses = [(self.host, self.port)] if self.literal else _resolve(self.host, self.port, call)
        error: Exception = httpx.ConnectError(f"no address for {self.host}")
        for address in addresses:
            try:
                sock = socket.create_connection(address[:2], timeout=_wait(self._timeout.connect, call))
            except TimeoutError:
                error = _timed_out(call, httpx.ConnectTimeout)
                if isinstance(error, _Expired):
                    break
            except OSError as exc:
                error = httpx.ConnectError(str(exc) or type(exc).__name__)
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return _Conn(sock)
        raise error

    def _idle_connection(self) -> _Conn | None:
        """A kept-alive connection the server has not closed in the meantime (it would be readable:
        at its end, or holding bytes no request asked for), if there is one."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections are the parent's
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                try:
                    conn.sock.setblocking(False)
                    conn.sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:  # nothing to read: still open
                    return conn
                except OSError:
                    pass
                conn.close()
        return None

    def _head(self, spec: _wire.RequestSpec) -> bytes:
        target = self.prefix + spec.path
        if spec.params:
            target += "?" + urlencode(spec.params, quote_via=quote)
        headers = dict(self._base)
        for k, v in spec.headers.items():
            headers[k.lower()] = (k, v)
        lines = [f"{spec.method} {target} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{k}: {v}" for k, v in headers.values()]
        if spec.content is not None or spec.method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(spec.content or b'')}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @contextlib.contextmanager
    def exchange(self, spec: _wire.RequestSpec, call: _Call) -> Iterator[http.client.HTTPResponse]:
        """Send ``spec`` and yield the answer, its head read; the caller reads the body (``read1``).
        The connection carries the next request only if the whole answer was read."""
        head, body = self._head(spec), spec.content or b""
        conn = self._idle_connection()
        if conn is None:
            conn = self._connect(call)
        keep = False
        try:
            conn.sock.settimeout(_wait(self._timeout.write, call))
            try:
                if len(body) <= self.JOIN:
                    conn.sock.sendall(head + body)
                else:
                    conn.sock.sendall(head)
                    conn.sock.sendall(body)
            except TimeoutError:
                raise _timed_out(call, httpx.WriteTimeout) from None
            except OSError as exc:  # the server may have answered (413, say) and closed: that answer is read
                unsent: Exception | None = httpx.WriteError(str(exc) or type(exc).__name__)
            else:
                unsent = None
            conn.raw = _DeadlineIO(conn.sock, self._timeout.read, call)
            response = http.client.HTTPResponse(conn, method=spec.method)  # type: ignore[arg-type]
            try:
                response.begin()
            except (http.client.HTTPException, httpx.TransportError) as exc:
                if unsent is not None:
                    raise unsent from None
                if isinstance(exc, httpx.TransportError):
                    raise
                # RemoteDisconnected, BadStatusLine, LineTooLong...
                raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
            yield response
            keep = not response.will_close and _finished(response)
        finally:
            conn.raw = None
            if keep:
                with self._lock:
                    if len(self._idle) < self._keep:
                        self._idle.append(conn)
                        conn = None
            if conn is not None:
                conn.close()


@dataclass
class _Answer:
    """A whole answer: its status, headers and (decoded, size-capped) body; ``error`` for >= 400."""

    status: int
    headers: httpx.Headers
    content: bytearray
    error: ApiError | None = None


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if any."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Base:
    """Configuration and the parts shared by the blocking and the async client."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(
        self,
        base_url: str,
        *,
        transport: str,
        timeout: float | httpx.Timeout | None,
        deadline: float | None,
        answer_margin: int,
        retries: int,
        backoff: float,
        max_backoff: float,
        token: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        if transport not in _wire.TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(map(repr, _wire.TRANSPORTS))}, got {transport!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        if answer_margin < 0:
            raise ValueError("answer_margin must be >= 0")
        self.base_url = str(base_url).rstrip("/")
        self.transport = transport
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if deadline is _DEFAULT:
            deadline = default_deadline(self._timeout)
        elif deadline is not None and not deadline > 0:
            raise ValueError("deadline must be > 0 seconds, or None for no deadline")
        self.deadline: float | None = deadline
        self.answer_margin = answer_margin
        self._headers = {"User-Agent": f"surrogate-client/{__version__}", "Accept": _wire.JSON,
                         "Accept-Encoding": _wire.ACCEPT_ENCODING}
        if headers:
            self._headers.update(headers)
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        # Set to False when the server answers a binary request with 415 (it predates the binary
        # transport): transport="auto" then uses JSON for the rest of this client's life.
        self._binary_ok = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, transport={self.transport!r})"

    # -- pieces shared by both clients ---------------------------------------------------------

    def _delay(self, attempt: int, answer: _Answer | None) -> float:
        """Pause before retry number ``attempt`` (0-based): the server's Retry-After if it sent
        one, else exponential backoff; at most ``max_backoff`` either way."""
        wait = _retry_after(answer.headers) if answer is not None else None
        if wait is None:
            wait = self.backoff * (2.0**attempt)
        return min(wait, self.max_backoff)

    def _compute_spec(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any,
                      surrogate: str | None, dtype: Any, transport: str | None) -> _wire.RequestSpec:
        mode = transport or self.transport
        if mode == "auto" and not self._binary_ok:
            mode = "json"
        return _wire.build_compute(
            op, x, params=params, cotangent=cotangent, surrogate=surrogate, dtype=dtype, transport=mode
        )

    def _fallback(self, spec: _wire.RequestSpec, err: Exception, transport: str | None) -> bool:
        """Whether to resend a refused binary request as JSON (``auto`` against an older server)."""
        if (transport or self.transport) != "auto" or not spec.binary:
            return False
        if isinstance(err, UnsupportedMediaType):
            self._binary_ok = False
            return True
        return False

    def _call(self, path: str) -> _Call:
        return _Call(self.deadline, self.base_url + path)

    def _request(self, spec: _wire.RequestSpec, call: _Call) -> httpx.Request:
        content = spec.content if spec.content is None or isinstance(spec.content, bytes) else bytes(spec.content)
        return self._http.build_request(
            spec.method, spec.path, params=spec.params or None, headers=spec.headers, content=content,
            timeout=call.timeout(self._timeout),
        )

    def _reader(self, spec: _wire.RequestSpec, status: int, headers: httpx.Headers, *,
                inflated: bool = False) -> _wire.BodyReader:
        """The reader of an answer's body: an error's is cut at :data:`ERROR_ANSWER_BYTES`, others are
        refused past the most a correct answer to ``spec`` can hold, plus ``answer_margin``.
        ``inflated``: the body was already decoded (an answer httpx holds in memory, e.g. from
        httpx.MockTransport)."""
        error = status >= 400
        if error:
            cap = ERROR_ANSWER_BYTES
        else:
            cap = (METADATA_ANSWER_BYTES if spec.answer_bytes is None else spec.answer_bytes) + self.answer_margin
        encoding = None if inflated else headers.get("content-encoding")
        return _wire.BodyReader(encoding, cap, what=f"the answer to {spec.path}", truncate=error)

    def _answer(self, status: int, headers: httpx.Headers, reader: _wire.BodyReader,
                request: httpx.Request | None, spec: _wire.RequestSpec) -> _Answer:
        answer = _Answer(status, headers, reader.body())
        if answer.status >= 400:  # the typed error, with the body as read (inflated, maybe cut)
            kept = [(k, v) for k, v in headers.multi_items()
                    if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
            if request is None:
                request = self._http.build_request(spec.method, spec.path, params=spec.params or None,
                                                   headers=spec.headers)
            whole = httpx.Response(answer.status, headers=kept, content=bytes(answer.content), request=request)
            answer.error = api_error_from_response(whole)
        return answer

    @staticmethod
    def _check(answer: _Answer) -> _Answer:
        if answer.error is not None:
            raise answer.error
        return answer

    @staticmethod
    def _json(answer: _Answer, path: str) -> Any:
        return _wire.parse_json(answer.content, f"the answer to {path}")

    @staticmethod
    def _decode(op: str, answer: _Answer, spec: _wire.RequestSpec) -> np.ndarray:
        return _wire.decode_compute(
            op, answer.headers.get("content-type"), answer.headers, answer.content, spec.dtype, spec.shape
        )


def _wrap_transport_error(exc: httpx.TransportError, url: str) -> TransportError:
    cls = Timeout if isinstance(exc, httpx.TimeoutException) else TransportError
    return cls(f"{type(exc).__name__} on {url}: {exc}")


class SurrogateClient(_Base):
    """Blocking client of a surrogate-serve server.

    >>> with SurrogateClient("http://127.0.0.1:8000") as c:      # doctest: +SKIP
    ...     c.grad([-2.0, -0.5, 0.0, 0.5, 2.0], alpha=1.0)
    array([0. , 0.5, 1. , 0.5, 0. ], dtype=float32)

    Arguments (all but ``base_url`` keyword-only):

    - ``transport``: how arrays travel: ``"auto"`` (binary .npy/.npz from 16 result elements on,
      JSON below), ``"json"``, ``"npy"`` (always binary: .npy, or .npz when a parameter or the
      cotangent is an array) or ``"npz"`` (always an .npz archive). Each call can override it.
    - ``timeout``: seconds or an :class:`httpx.Timeout`, for each connect, read or write (default
      30 s, 5 s to connect).
    - ``deadline``: seconds one call may take in all: every attempt, the pauses between retries and
      reading the answer (a server that trickles its answer cannot stretch it); past it,
      :class:`Timeout`. Default :data:`DEFAULT_DEADLINE` (60 s), or twice the longest ``timeout``
      where that is longer; ``None`` for no deadline (also the default with ``timeout=None``).
    - ``answer_margin``: bytes an answer may have beyond the most a correct answer to its request
      holds (its elements at their dtype's size, or their longest JSON text); past it,
      :class:`DecodingError`, however the answer is compressed. Default 64 KiB.
    - ``retries``, ``backoff``, ``max_backoff``: a request that fails to connect (or whose
      connection breaks) or is answered 503/429 is sent again up to ``retries`` times, after
      ``backoff * 2**n`` seconds or the server's ``Retry-After``, at most ``max_backoff`` seconds.
    - ``token``: sent as ``Authorization: Bearer <token>``. ``headers``: extra headers.
    - ``http_transport``: an :class:`httpx.BaseTransport` (e.g. :class:`httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: _wire.Transport = "auto",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        deadline: float | None = _DEFAULT,
        answer_margin: int = DEFAULT_ANSWER_MARGIN,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, transport=transport, timeout=timeout, deadline=deadline, answer_margin=answer_margin,
            retries=retries, backoff=backoff, max_backoff=max_backoff, token=token, headers=headers,
        )
        self._http: httpx.Client = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=http_transport
        )
        # plain http:// without a proxy: the client's own HTTP/1.1 (no worker thread, half the cost)
        self._direct = (_Direct(self._http.base_url, self._http.headers, self._timeout)
                        if http_transport is None and _direct_ok(self._http.base_url, self._http.headers) else None)
        self._sleep: Callable[[float], None] = time.sleep

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> SurrogateClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def _run(self, path: str, fn: Callable[[_Call], T]) -> T:
        """``fn(call)`` within the deadline. Over the client's own HTTP/1.1 (:class:`_Direct`) every
        socket wait is cut to the deadline, so the call runs on the caller's thread. httpx's blocking
        reads cannot be interrupted, so through httpx the call runs in a worker thread and the caller
        waits for it until the deadline; a call past it stops at its next chunk, or at its next read's
        timeout (cut to the deadline)."""
        call = self._call(path)
        if call.seconds is None or self._direct is not None:
            return fn(call)
        context = contextvars.copy_context()

        def abandoned() -> None:
            call.cancelled = True

        try:
            return _WORKERS.call(lambda: context.run(fn, call), call.left() or 0.0, abandoned=abandoned)
        except _Expired:
            raise call.expired() from None

    def _attempt(self, spec: _wire.RequestSpec, call: _Call) -> _Answer:
        """Send once and read the whole answer, within the answer cap and the deadline."""
        if self._direct is not None:
            return self._attempt_direct(self._direct, spec, call)
        response = self._http.send(self._request(spec, call), stream=True)
        try:
            consumed = response.is_stream_consumed
            reader = self._reader(spec, response.status_code, response.headers, inflated=consumed)
            if consumed:
                reader.feed(response.content)
            else:
                for chunk in response.iter_raw():
                    call.check()
                    reader.feed(chunk)
                    if reader.full:
                        break
        finally:
            response.close()
        return self._answer(response.status_code, response.headers, reader, response.request, spec)

    def _attempt_direct(self, direct: _Direct, spec: _wire.RequestSpec, call: _Call) -> _Answer:
        try:
            with direct.exchange(spec, call) as response:
                headers = httpx.Headers(response.getheaders())
                reader = self._reader(spec, response.status, headers)
                try:
                    if response.length and response.length <= reader.cap and "content-encoding" not in headers:
                        reader.take(_read_exactly(response, response.length))  # read in place, no copy
                    while not reader.full:
                        chunk = response.read1(_wire.PIECE)
                        if not chunk:
                            break
                        reader.feed(chunk)
                except http.client.HTTPException as exc:  # IncompleteRead, a bad chunk size...
                    raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
                if not reader.full and response.length:  # the server closed before the announced end
                    raise httpx.RemoteProtocolError(f"the answer ended {response.length} bytes short of its "
                                                    "Content-Length")
        except _Expired:
            raise call.expired() from None
        return self._answer(response.status, headers, reader, None, spec)

    def _send(self, spec: _wire.RequestSpec, call: _Call, *,
              retry_statuses: frozenset[int] = RETRY_STATUSES) -> _Answer:
        attempt = 0
        while True:
            call.check()
            try:
                answer = self._attempt(spec, call)
            except RETRY_EXCEPTIONS as exc:
                pause = self._delay(attempt, None)
                if attempt >= self.retries or not call.fits(pause):
                    raise _wrap_transport_error(exc, self.base_url + spec.path) from exc  # type: ignore[arg-type]
                self._sleep(pause)
            except httpx.TransportError as exc:
                raise _wrap_transport_error(exc, self.base_url + spec.path) from exc
            else:
                if answer.status not in retry_statuses or attempt >= self.retries:
                    return self._check(answer)
                pause = self._delay(attempt, answer)
                if not call.fits(pause):
                    return self._check(answer)
                self._sleep(pause)
            attempt += 1

    def _get(self, path: str) -> Any:
        return self._run(path, lambda call: self._json(self._send(_wire.RequestSpec("GET", path), call), path))

    def _compute(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any, surrogate: str | None,
                 dtype: Any, transport: str | None) -> np.ndarray:
        spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, transport)

        def call_(call: _Call) -> np.ndarray:
            nonlocal spec
            try:
                answer = self._send(spec, call)
            except UnsupportedMediaType as err:
                if not self._fallback(spec, err, transport):
                    raise
                spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, "json")
                answer = self._send(spec, call)
            return self._decode(op, answer, spec)

        return self._run(spec.path, call_)

    # -- compute -------------------------------------------------------------------------------

    def spike(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
              transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """Spikes of ``x``: 1 where ``x >= 0``, else 0, with the broadcast shape of x and params.

        ``dtype`` defaults to x's dtype when x is a float16/32/64 or bfloat16 array, else float32.
        """
        return self._compute("spike", x, params, None, surrogate, dtype, transport)

    def grad(self, x: Any, *, cotangent: Any = None, surrogate: str | None = None, dtype: Any = None,
             transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """Surrogate gradient ``g'(x)``, or ``cotangent * g'(x)``; parameters (e.g. ``alpha``) and
        the cotangent broadcast against ``x`` by NumPy's rules."""
        return self._compute("grad", x, params, cotangent, surrogate, dtype, transport)

    def fun(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
            transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """The smooth surrogate function ``g(x)`` (braintools' ``surrogate_fun``)."""
        return self._compute("fun", x, params, None, surrogate, dtype, transport)

    def batch(self, op: str, jobs: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Several jobs of one op (``"spike"``, ``"grad"`` or ``"fun"``) in one request (JSON).

        Each job is a mapping like the service's job object: ``{"x": ..., "alpha": ...,
        "dtype": ..., "surrogate": ..., "cotangent": ...}``; the results come back in order.
        """
        spec, dtypes = _wire.build_batch(op, list(jobs))
        return self._run(spec.path, lambda call: _wire.decode_batch(op, self._send(spec, call).content, dtypes,
                                                                    spec.shapes))

    # -- metadata and health ---------------------------------------------------------------------

    def surrogates(self) -> dict[str, Any]:
        """``GET /v1/surrogates``: ``{"default": name, "surrogates": [{"name", "parameters", ...}]}``."""
        return self._get("/v1/surrogates")

    def surrogate(self, name: str) -> dict[str, Any]:
        """``GET /v1/surrogates/{name}``: one surrogate (raises :class:`NotFound` if unknown)."""
        return self._get(f"/v1/surrogates/{quote(name, safe='')}")

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: version, JAX version, device, limits, compiled variants."""
        return self._get("/v1/info")

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` while the server process answers."""
        return self._get("/healthz")

    def ready(self) -> bool:
        """``GET /readyz``: True once the server has warmed up, False while it answers 503."""
        try:
            self._run("/readyz", lambda call: self._send(_wire.RequestSpec("GET", "/readyz"), call,
                                                         retry_statuses=frozenset()))
        except ServiceUnavailable:
            return False
        return True

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Wait until :meth:`ready`, tolerating refused connections; :class:`Timeout` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except (TransportError, ServerError):  # not up yet, or not answering
                pass
            if time.monotonic() >= deadline:
                raise Timeout(f"{self.base_url} was not ready within {timeout} s")
            self._sleep(interval)


class AsyncSurrogateClient(_Base):
    """The asynchronous twin of :class:`SurrogateClient` (same arguments and methods, awaited).

    ``http_transport`` is an :class:`httpx.AsyncBaseTransport`, e.g.
    ``httpx.ASGITransport(app=create_app())`` to call the service in process.

    >>> async with AsyncSurrogateClient("http://127.0.0.1:8000") as c:   # doctest: +SKIP
    ...     g = await c.grad(x, alpha=2.0)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: _wire.Transport = "auto",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        deadline: float | None = _DEFAULT,
        answer_margin: int = DEFAULT_ANSWER_MARGIN,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, transport=transport, timeout=timeout, deadline=deadline, answer_margin=answer_margin,
            retries=retries, backoff=backoff, max_backoff=max_backoff, token=token, headers=headers,
        )
        self._http: httpx.AsyncClient = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=http_transport
        )
        self._sleep: Callable[[float], Any] = anyio.sleep

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSurrogateClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, path: str, fn: Callable[[_Call], Awaitable[T]]) -> T:
        """``await fn(call)`` within the deadline (cancelled at it)."""
        call = self._call(path)
        if call.seconds is None:
            return await fn(call)
        with anyio.move_on_after(call.seconds):
            return await fn(call)
        call.cancelled = True
        raise call.expired()

    async def _attempt(self, spec: _wire.RequestSpec, call: _Call) -> _Answer:
        """Send once and read the whole answer, within the answer cap."""
        response = await self._http.send(self._request(spec, call), stream=True)
        try:
            consumed = response.is_stream_consumed
            reader = self._reader(spec, response.status_code, response.headers, inflated=consumed)
            if consumed:
                reader.feed(response.content)
            else:
                async for chunk in response.aiter_raw():
                    reader.feed(chunk)
                    if reader.full:
                        break
        finally:
            await response.aclose()
        return self._answer(response.status_code, response.headers, reader, response.request, spec)

    async def _send(self, spec: _wire.RequestSpec, call: _Call, *,
                    retry_statuses: frozenset[int] = RETRY_STATUSES) -> _Answer:
        attempt = 0
        while True:
            try:
                answer = await self._attempt(spec, call)
            except RETRY_EXCEPTIONS as exc:
                pause = self._delay(attempt, None)
                if attempt >= self.retries or not call.fits(pause):
                    raise _wrap_transport_error(exc, self.base_url + spec.path) from exc  # type: ignore[arg-type]
                await self._sleep(pause)
            except httpx.TransportError as exc:
                raise _wrap_transport_error(exc, self.base_url + spec.path) from exc
            else:
                if answer.status not in retry_statuses or attempt >= self.retries:
                    return self._check(answer)
                pause = self._delay(attempt, answer)
                if not call.fits(pause):
                    return self._check(answer)
                await self._sleep(pause)
            attempt += 1

    async def _get(self, path: str) -> Any:
        async def call_(call: _Call) -> Any:
            return self._json(await self._send(_wire.RequestSpec("GET", path), call), path)

        return await self._run(path, call_)

    async def _compute(self, op: str, x: Any, params: Mapping[str, Any], cotangent: Any, surrogate: str | None,
                       dtype: Any, transport: str | None) -> np.ndarray:
        spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, transport)

        async def call_(call: _Call) -> np.ndarray:
            nonlocal spec
            try:
                answer = await self._send(spec, call)
            except UnsupportedMediaType as err:
                if not self._fallback(spec, err, transport):
                    raise
                spec = self._compute_spec(op, x, params, cotangent, surrogate, dtype, "json")
                answer = await self._send(spec, call)
            return self._decode(op, answer, spec)

        return await self._run(spec.path, call_)

    async def spike(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
                    transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.spike`."""
        return await self._compute("spike", x, params, None, surrogate, dtype, transport)

    async def grad(self, x: Any, *, cotangent: Any = None, surrogate: str | None = None, dtype: Any = None,
                   transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.grad`."""
        return await self._compute("grad", x, params, cotangent, surrogate, dtype, transport)

    async def fun(self, x: Any, *, surrogate: str | None = None, dtype: Any = None,
                  transport: _wire.Transport | None = None, **params: Any) -> np.ndarray:
        """See :meth:`SurrogateClient.fun`."""
        return await self._compute("fun", x, params, None, surrogate, dtype, transport)

    async def batch(self, op: str, jobs: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """See :meth:`SurrogateClient.batch`."""
        spec, dtypes = _wire.build_batch(op, list(jobs))

        async def call_(call: _Call) -> list[np.ndarray]:
            return _wire.decode_batch(op, (await self._send(spec, call)).content, dtypes, spec.shapes)

        return await self._run(spec.path, call_)

    async def surrogates(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.surrogates`."""
        return await self._get("/v1/surrogates")

    async def surrogate(self, name: str) -> dict[str, Any]:
        """See :meth:`SurrogateClient.surrogate`."""
        return await self._get(f"/v1/surrogates/{quote(name, safe='')}")

    async def info(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.info`."""
        return await self._get("/v1/info")

    async def health(self) -> dict[str, Any]:
        """See :meth:`SurrogateClient.health`."""
        return await self._get("/healthz")

    async def ready(self) -> bool:
        """See :meth:`SurrogateClient.ready`."""
        async def call_(call: _Call) -> _Answer:
            return await self._send(_wire.RequestSpec("GET", "/readyz"), call, retry_statuses=frozenset())

        try:
            await self._run("/readyz", call_)
        except ServiceUnavailable:
            return False
        return True

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """See :meth:`SurrogateClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except (TransportError, ServerError):
                pass
            if time.monotonic() >= deadline:
                raise Timeout(f"{self.base_url} was not ready within {timeout} s")
            await self._sleep(interval)
