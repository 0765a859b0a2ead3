"""The HTTP protocol with limits on request heads (service/server/httpproto.py), in process.

``LimitedHttpToolsProtocol`` subclasses uvicorn's *private* ``HttpToolsProtocol``, so its first tests
pin what it relies on there (read off httpproto.py's source, so that the list cannot go stale): a
uvicorn release that renames, removes or re-signs any of it fails here with a message naming what
changed, rather than in production. pyproject.toml caps uvicorn to the tested minor release for
the same reason.

The rest drive the protocol itself as uvicorn's server builds it (``Config(http=...)``, then
``config.http_protocol_class(config=, server_state=, app_state=, _loop=)``) over a fake transport
on the test's event loop, bytes in through ``data_received``: no server, no socket. The real server
is exercised in tests/e2e/test_headers_e2e.py and tests/e2e/test_shutdown_e2e.py (slow).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from service.server import httpproto, lifecycle
from service.server.httpproto import LimitedHttpToolsProtocol

pytestmark = pytest.mark.anyio

# ---------------------------------------------------------------------------------------------------
# What httpproto.py relies on in uvicorn's private httptools protocol
# ---------------------------------------------------------------------------------------------------

#: Names httpproto.py imports from uvicorn: (module, name).
UVICORN_IMPORTS = {("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")}

#: Keyword parameters of HttpToolsProtocol.__init__ that callers pass through the subclass's
#: ``(*args, **kwargs)``: uvicorn.Server passes all four, service.server.lifecycle.GracefulServer the first three.
INIT_PARAMETERS = ("config", "server_state", "app_state", "_loop")

#: Methods of HttpToolsProtocol that the subclass overrides, with their parameters. All but
#: ``shutdown`` are called through ``super()``; asyncio calls the connection methods, the httptools
#: parser the ``on_*`` callbacks, and uvicorn.Server.shutdown calls ``shutdown()``.
OVERRIDDEN = {
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "exc"),
    "data_received": ("self", "data"),
    "on_header": ("self", "name", "value"),
    "on_headers_complete": ("self",),
    "on_body": ("self", "body"),
    "on_message_complete": ("self",),
    "on_response_complete": ("self",),
    "shutdown": ("self",),
}

#: Instance attributes that HttpToolsProtocol sets and the subclass reads (never methods).
INHERITED_ATTRIBUTES = {
    "cycle", "transport", "loop", "logger", "client", "scope", "server_state", "parser", "flow", "pipeline",
}

#: Attributes of HttpToolsProtocol's RequestResponseCycle (``self.cycle``) that the subclass reads or sets.
CYCLE_ATTRIBUTES = {
    "response_complete", "keep_alive", "response_started", "disconnected", "waiting_for_100_continue", "scope",
    "message_event", "receive",
}
#: What each of them is (``receive`` is a method, which the subclass wraps per request).
CYCLE_TYPES = {"scope": dict, "message_event": asyncio.Event}

PARENT = httptools_impl.HttpToolsProtocol
SOURCE = Path(httpproto.__file__)


def _uses() -> dict[str, set]:
    """What LimitedHttpToolsProtocol's source touches, by kind."""
    tree = ast.parse(SOURCE.read_text())
    imports = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "uvicorn"
        for alias in node.names
    }
    imports |= {
        (alias.name, "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] == "uvicorn"
    }
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LimitedHttpToolsProtocol"]
    defined = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    defined |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    defined |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    read, assigned, via_super, on_cycle = set(), set(), set(), set()
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            (assigned if isinstance(node.ctx, ast.Store) else read).add(node.attr)
        elif (
            isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and node.value.func.id == "super"
        ):
            via_super.add(node.attr)
        elif (
            isinstance(node.value, ast.Attribute)
            and node.value.attr == "cycle"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            on_cycle.add(node.attr)
    # read off the source alone, so that these say what httpproto.py does whatever uvicorn is installed
    return {
        "imports": imports,
        "defined": defined,
        "via_super": via_super,
        "inherited": read - defined - assigned,
        "own": (defined | assigned) - set(OVERRIDDEN) - {"__init__"},
        "cycle": on_cycle,
    }


USES = _uses()


def test_the_contract_lists_exactly_what_httpproto_uses():
    """If this fails, httpproto.py changed what it takes from uvicorn: update the lists above (and
    check the new names against the installed uvicorn's source)."""
    assert USES["imports"] == UVICORN_IMPORTS, "httpproto.py's imports from uvicorn changed"
    assert set(OVERRIDDEN) <= USES["defined"], "httpproto.py no longer overrides some methods listed in OVERRIDDEN"
    assert USES["via_super"] == (set(OVERRIDDEN) - {"shutdown"}) | {"__init__"}, "the super() calls changed"
    assert USES["inherited"] == INHERITED_ATTRIBUTES, "the inherited attributes httpproto.py reads changed"
    assert USES["cycle"] == CYCLE_ATTRIBUTES, "the attributes of self.cycle httpproto.py uses changed"
    assert set(CYCLE_TYPES) < CYCLE_ATTRIBUTES


def test_uvicorn_still_has_the_private_names_httpproto_imports():
    import importlib

    for module, name in sorted(UVICORN_IMPORTS):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # pragma: no cover - only with another uvicorn
            pytest.fail(f"uvicorn {uvicorn.__version__} has no module {module} (httpproto.py imports it): {exc}")
        assert hasattr(mod, name), f"uvicorn {uvicorn.__version__}: {module} no longer defines {name}"
        assert inspect.isclass(getattr(mod, name)), (
            f"uvicorn {uvicorn.__version__}: {module}.{name} is no longer a class"
        )
    assert issubclass(LimitedHttpToolsProtocol, PARENT)


def test_the_constructor_still_takes_what_the_callers_pass():
    params = inspect.signature(PARENT.__init__).parameters
    missing = [p for p in INIT_PARAMETERS if p not in params]
    assert not missing, (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.__init__ lost the parameters {missing} "
        f"(it takes {list(params)}); uvicorn.Server and service.server.lifecycle pass them by keyword"
    )
    kinds = {p: params[p].kind for p in INIT_PARAMETERS}
    positional_only = [p for p, k in kinds.items() if k is inspect.Parameter.POSITIONAL_ONLY]
    assert not positional_only, f"HttpToolsProtocol.__init__: {positional_only} became positional-only"


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_every_overridden_method_is_still_a_method_with_the_same_parameters(name):
    version = uvicorn.__version__
    assert hasattr(PARENT, name), f"uvicorn {version}: HttpToolsProtocol.{name} is gone (httpproto.py overrides it)"
    parent = getattr(PARENT, name)
    assert inspect.isfunction(parent), (
        f"uvicorn {version}: HttpToolsProtocol.{name} is no longer a plain method but {type(parent).__name__}"
    )
    got = tuple(inspect.signature(parent).parameters)
    assert got == OVERRIDDEN[name], (
        f"uvicorn {version}: HttpToolsProtocol.{name}{got} changed its parameters from {OVERRIDDEN[name]}"
    )
    ours = tuple(inspect.signature(getattr(LimitedHttpToolsProtocol, name)).parameters)
    assert ours == got, f"LimitedHttpToolsProtocol.{name}{ours} does not match HttpToolsProtocol.{name}{got}"


def test_uvicorn_server_still_calls_shutdown_on_every_connection():
    """The subclass's shutdown() (graceful close of idle connections) is a hook uvicorn.Server calls."""
    source = inspect.getsource(uvicorn.Server.shutdown)
    assert "connection.shutdown()" in source, (
        f"uvicorn {uvicorn.__version__}: Server.shutdown no longer calls connection.shutdown() on each "
        "connection; LimitedHttpToolsProtocol.shutdown would never run"
    )


def test_the_subclass_shadows_nothing_of_the_parent():
    """The subclass's own names (limits, timers, state) must not be names uvicorn uses too: the
    subclass would silently replace uvicorn's, or uvicorn overwrite the subclass's."""

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    instance = PARENT(config=_config(app), server_state=ServerState(), app_state={}, _loop=asyncio.new_event_loop())
    instance.loop.close()
    clashes = sorted(n for n in USES["own"] if hasattr(PARENT, n) or n in vars(instance))
    assert not clashes, (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol has {clashes}, which httpproto.py also defines "
        "(rename them in httpproto.py, or, if they are meant as overrides, list them in OVERRIDDEN)"
    )


async def test_the_inherited_attributes_are_still_attributes(connect):
    version = uvicorn.__version__
    conn = connect()
    for name in sorted(INHERITED_ATTRIBUTES):
        assert not inspect.isroutine(getattr(PARENT, name, None)), (
            f"uvicorn {version}: HttpToolsProtocol.{name} is now a method"
        )
        assert name in vars(conn.protocol), f"uvicorn {version}: HttpToolsProtocol no longer sets self.{name}"
    assert conn.protocol.transport is conn.transport
    assert conn.protocol.loop is asyncio.get_running_loop()
    assert conn.protocol.client == PEER
    assert conn.protocol.logger.name == "uvicorn.error"
    assert conn.protocol.cycle is None, f"uvicorn {version}: self.cycle is not None before the first request"
    assert conn.protocol in conn.state.connections, "connection_made no longer registers the connection"
    conn.send(head_of(100))
    await conn.served()
    cycle = conn.protocol.cycle
    assert isinstance(cycle, httptools_impl.RequestResponseCycle), f"uvicorn {version}: self.cycle is a {type(cycle)}"
    for name in sorted(CYCLE_ATTRIBUTES - {"receive"}):
        kind = CYCLE_TYPES.get(name, bool)
        assert isinstance(vars(cycle).get(name), kind), (
            f"uvicorn {version}: RequestResponseCycle.{name} is not a {kind.__name__}"
        )
    receive = httptools_impl.RequestResponseCycle.receive
    assert inspect.iscoroutinefunction(receive) and tuple(inspect.signature(receive).parameters) == ("self",), (
        f"uvicorn {version}: RequestResponseCycle.receive is no longer the ASGI receive the app is given"
    )
    assert cycle.scope is conn.protocol.scope
    assert cycle.response_complete is True
    assert cycle.keep_alive is True


# ---------------------------------------------------------------------------------------------------
# The protocol, driven in process
# ---------------------------------------------------------------------------------------------------

LIMIT = 1024
PEER = ("127.0.0.1", 50123)


class FakeTransport:
    """The parts of a TCP transport the protocols use, recording what is written."""

    def __init__(self, *, can_eof: bool = True) -> None:
        self.written = bytearray()
        self.closed = False
        self.eof = False
        self.read_paused = False
        self.writes_after_close = 0
        self._can_eof = can_eof

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": PEER, "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's transports do
        if self.closed:
            self.writes_after_close += 1  # asyncio drops these
            return
        self.written += data

    def can_write_eof(self) -> bool:
        return self._can_eof

    def write_eof(self) -> None:
        assert self._can_eof
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False


class App:
    """Answers every request 200 with what it received: ``{"path": ..., "body": <length>}``; with
    ``reads`` False without reading the body, after ``delay`` seconds before reading it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.reads = True
        self.delay = 0.0
        self.last: dict = {}  # the last message received
        self.headers: list = []  # the last request's headers (uvicorn's list, as it stands after the request)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        assert scope["type"] == "http"
        self.calls.append(scope["path"])
        self.headers = scope["headers"]
        self.in_progress = len(scope[httpproto.REQUESTS_KEY])
        size = 0
        if self.delay:
            await asyncio.sleep(self.delay)
        while self.reads:
            message = self.last = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        payload = json.dumps({"path": scope["path"], "body": size}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _config(app: Any) -> Config:
    return Config(
        app=app, http=httpproto.PROTOCOL, interface="asgi3", lifespan="off", log_config=None, proxy_headers=False
    )


class Conn:
    def __init__(self, *, can_eof: bool = True) -> None:
        self.app = App()
        config = _config(self.app)
        config.load()
        assert config.http_protocol_class is LimitedHttpToolsProtocol  # the import string resolves
        self.state = ServerState()
        # as uvicorn.Server's protocol factory does (asyncio calls it without a loop)
        self.protocol = config.http_protocol_class(config=config, server_state=self.state, app_state={}, _loop=None)
        self.transport = FakeTransport(can_eof=can_eof)
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def served(self, timeout: float = 2.0) -> None:
        """Wait until the app tasks started so far are done."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.state.tasks:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, "the app did not finish its request (is the protocol still feeding it?)"
            await asyncio.wait(list(self.state.tasks), timeout=left)

    def answers(self) -> list[tuple[int, dict[str, str], bytes]]:
        return parse(bytes(self.transport.written))


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Conn]]:
    """Open fake connections with a head limit of LIMIT bytes, a long header timeout (tests that
    need it shorten it), and short lingering and grace periods; lose them all at the end."""
    monkeypatch.setattr(LimitedHttpToolsProtocol, "max_header_bytes", LIMIT)
    monkeypatch.setattr(LimitedHttpToolsProtocol, "header_timeout", 30.0)
    monkeypatch.setattr(httpproto, "LINGER_SECONDS", 0.02)
    monkeypatch.setattr(httpproto, "IDLE_GRACE_SECONDS", 0.02)
    lifecycle.reset()
    opened: list[Conn] = []

    def open_(**kwargs: Any) -> Conn:
        conn = Conn(**kwargs)
        opened.append(conn)
        return conn

    try:
        yield open_
    finally:
        lifecycle.reset()
        for conn in opened:
            if conn.protocol.parser is not None:
                conn.protocol.connection_lost(None)  # cancels the head and keep-alive timers


@pytest.fixture
def parent_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the reads the subclass hands on to HttpToolsProtocol.data_received (the parser)."""
    sizes: list[int] = []
    original = PARENT.data_received

    def spy(self: Any, data: bytes) -> None:
        sizes.append(len(data))
        original(self, data)

    monkeypatch.setattr(PARENT, "data_received", spy)
    return sizes


def head_of(size: int, path: str = "/healthz", method: str = "GET", extra: bytes = b"") -> bytes:
    """A request head of exactly ``size`` bytes, request line to blank line included."""
    start = f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"X-Pad: "
    head = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


def parse(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers in ``data`` (with Content-Length bodies), in order."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete answer: {data!r}"
        lines = head.decode("latin1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        size = int(headers["content-length"])
        assert len(rest) >= size, f"a short body: {data!r}"
        answers.append((int(lines[0].split()[1]), headers, rest[:size]))
        data = rest[size:]
    return answers


def error_of(body: bytes) -> tuple[int, str]:
    error = json.loads(body)["error"]
    return error["status"], error["code"]


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def pieces(data: bytes, how: str) -> list[bytes]:
    if how == "one read":
        return [data]
    if how.startswith("end marker split "):  # the blank line's \r\n\r\n straddles two reads
        cut = int(how.rsplit(" ", 1)[1])
        return [data[:-cut], data[-cut:]]
    if how == "byte by byte":
        return [data[i : i + 1] for i in range(len(data))]
    raise AssertionError(how)  # pragma: no cover


DELIVERIES = ["one read", "end marker split 1", "end marker split 2", "end marker split 3", "byte by byte"]


async def test_a_head_within_the_limit_reaches_the_app_and_is_answered(connect):
    conn = connect()
    conn.send(b"GET /v1/spec?x=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n")
    await conn.served()
    assert conn.app.calls == ["/v1/spec"]
    [(status, headers, body)] = conn.answers()
    assert status == 200
    assert json.loads(body) == {"path": "/v1/spec", "body": 0}
    assert "connection" not in headers  # kept alive
    assert not conn.transport.closed
    assert not conn.transport.eof


@pytest.mark.parametrize("how", DELIVERIES)
async def test_a_head_of_exactly_the_limit_is_served(connect, how):
    conn = connect()
    for piece in pieces(head_of(LIMIT), how):
        conn.send(piece)
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200]
    assert conn.app.calls == ["/healthz"]


@pytest.mark.parametrize("how", DELIVERIES)
async def test_one_byte_past_the_limit_is_431_and_the_connection_closes(connect, how):
    conn = connect()
    for piece in pieces(head_of(LIMIT + 1), how):
        conn.send(piece)
    await conn.served()
    assert conn.app.calls == []
    [(status, headers, body)] = conn.answers()
    assert status == 431
    assert bytes(conn.transport.written).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "error": {
            "status": 431,
            "code": "headers_too_large",
            "message": f"the request line and headers exceed {LIMIT} bytes",
            "job": None,
            "field": None,
        }
    }
    assert conn.transport.eof  # the answer, then FIN
    await until(lambda: conn.transport.closed)  # and closed after lingering


@pytest.mark.parametrize("how", DELIVERIES)
async def test_the_body_does_not_count_towards_the_head(connect, how):
    """The body arrives with the end of the head (in the read that completes it)."""
    conn = connect()
    body = b"b" * (5 * LIMIT)
    head = head_of(LIMIT, "/upload", "POST", b"Content-Length: %d\r\n" % len(body))
    *first, last = pieces(head, how)
    for piece in first:
        conn.send(piece)
    conn.send(last + body)
    await conn.served()
    [(status, _, answer)] = conn.answers()
    assert status == 200
    assert json.loads(answer) == {"path": "/upload", "body": len(body)}


async def test_each_request_on_a_kept_alive_connection_has_a_limit_of_its_own(connect):
    conn = connect()
    for _ in range(3):
        conn.send(head_of(LIMIT))
        await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200, 200]
    conn.send(head_of(LIMIT + 1))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200, 200, 431]
    assert conn.transport.eof


async def test_an_unfinished_head_is_refused_as_soon_as_it_passes_the_limit(connect, parent_reads):
    """A header line that never ends: the read that crosses the limit never reaches the parser."""
    conn = connect()
    conn.send(b"GET /healthz HTTP/1.1\r\nX-Flood: ")
    first = len(b"GET /healthz HTTP/1.1\r\nX-Flood: ")
    conn.send(b"f" * (LIMIT - first))  # exactly the limit so far: still reading
    assert conn.transport.written == b""
    conn.send(b"f")
    assert [status for status, _, _ in conn.answers()] == [431]
    conn.send(b"f" * (1 << 20))  # what the client still sends is dropped
    conn.send(b"\r\n\r\n")
    assert parent_reads == [first, LIMIT - first]
    assert [status for status, _, _ in conn.answers()] == [431]
    assert conn.app.calls == []


@pytest.mark.parametrize("can_eof", [True, False], ids=["tcp", "no-half-close"])
async def test_a_refused_connection_drops_what_follows_and_closes(connect, parent_reads, can_eof):
    conn = connect(can_eof=can_eof)
    conn.send(head_of(4 * LIMIT))
    assert parent_reads == []
    assert conn.transport.eof is can_eof
    assert conn.transport.closed is not can_eof  # without a half-close: closed at once
    conn.send(head_of(100))  # a pipelined request after the refusal
    await conn.served()
    assert parent_reads == []
    assert conn.app.calls == []
    assert [status for status, _, _ in conn.answers()] == [431]
    await until(lambda: conn.transport.closed)


# -- shutting down --------------------------------------------------------------------------------


async def test_while_shutting_down_a_new_request_is_503_with_connection_close(connect):
    conn = connect()
    lifecycle.begin_shutdown()
    body = b'{"x": [1.0]}'
    conn.send(head_of(200, "/v1/grad", "POST", b"Content-Length: %d\r\n" % len(body)) + body)
    await conn.served()
    assert conn.app.calls == []
    [(status, headers, answer)] = conn.answers()
    assert status == 503
    assert bytes(conn.transport.written).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert headers["connection"] == "close"
    assert headers["retry-after"] == "1"
    assert error_of(answer) == (503, "shutting_down")
    assert conn.transport.eof
    await until(lambda: conn.transport.closed)


async def test_the_flag_is_read_per_request(connect):
    conn = connect()
    conn.send(head_of(100))
    await conn.served()
    lifecycle.begin_shutdown()
    conn.send(head_of(100))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 503]
    lifecycle.reset()
    again = connect()
    again.send(head_of(100))
    await again.served()
    assert [status for status, _, _ in again.answers()] == [200]


async def test_a_head_arriving_when_shutdown_begins_is_answered_503_not_cut(connect):
    conn = connect()
    head = head_of(300)
    conn.send(head[:100])
    lifecycle.begin_shutdown()
    conn.protocol.shutdown()  # what uvicorn.Server does to every connection
    await asyncio.sleep(5 * httpproto.IDLE_GRACE_SECONDS)
    assert not conn.transport.eof
    assert not conn.transport.closed
    conn.send(head[100:])
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [503]
    assert conn.app.calls == []


async def test_shutdown_closes_an_idle_connection_gracefully_after_the_grace_period(connect):
    conn = connect()
    conn.send(head_of(100))
    await conn.served()
    lifecycle.begin_shutdown()
    conn.protocol.shutdown()
    assert not conn.transport.eof  # not at once: a request may be on its way
    await until(lambda: conn.transport.eof)
    assert [status for status, _, _ in conn.answers()] == [200]  # nothing more written
    await until(lambda: conn.transport.closed)


# -- the header timeout ---------------------------------------------------------------------------

TIMEOUT = 0.05


async def test_a_head_that_never_completes_is_408_after_the_timeout(connect, monkeypatch):
    monkeypatch.setattr(LimitedHttpToolsProtocol, "header_timeout", TIMEOUT)
    loop = asyncio.get_running_loop()
    start = loop.time()
    conn = connect()
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    assert conn.transport.written == b""
    await until(lambda: conn.transport.written != b"")
    assert loop.time() - start >= 0.9 * TIMEOUT  # not before the timeout
    [(status, headers, body)] = conn.answers()
    assert status == 408
    assert bytes(conn.transport.written).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert headers["connection"] == "close"
    assert error_of(body) == (408, "request_timeout")
    assert conn.transport.eof
    await until(lambda: conn.transport.closed)
    assert conn.app.calls == []


async def test_a_connection_that_sends_nothing_is_closed_quietly(connect, monkeypatch):
    monkeypatch.setattr(LimitedHttpToolsProtocol, "header_timeout", TIMEOUT)
    conn = connect()
    await until(lambda: conn.transport.closed)
    assert conn.transport.written == b""


async def test_a_head_completed_in_time_is_not_timed_out(connect, monkeypatch):
    monkeypatch.setattr(LimitedHttpToolsProtocol, "header_timeout", TIMEOUT)
    conn = connect()
    head = head_of(200)
    conn.send(head[:50])  # in two reads, at once: a stall of the test's loop cannot make it late
    conn.send(head[50:])
    await conn.served()
    await asyncio.sleep(3 * TIMEOUT)  # between requests uvicorn's keep-alive timeout applies, not this one
    assert [status for status, _, _ in conn.answers()] == [200]
    assert not conn.transport.closed
    assert not conn.transport.eof


async def test_the_next_request_on_the_connection_has_its_own_timeout(connect, monkeypatch):
    monkeypatch.setattr(LimitedHttpToolsProtocol, "header_timeout", TIMEOUT)
    conn = connect()
    conn.send(head_of(200))
    await conn.served()
    await asyncio.sleep(2 * TIMEOUT)
    conn.send(b"GET /healthz HTTP/1.1\r\n")  # the second head starts, and stalls
    await until(lambda: len(conn.answers()) == 2)
    assert [status for status, _, _ in conn.answers()] == [200, 408]
    assert conn.transport.eof


async def test_a_request_sees_how_many_requests_the_server_has_in_progress(connect):
    """The data plane computes a request alone at once and gathers concurrent ones: it learns which
    from the set of uvicorn's request tasks, which every request's scope carries."""
    alone = connect()
    alone.send(head_of(100))
    await alone.served()
    assert alone.app.in_progress == 1
    shared, other = connect(), connect()  # two connections of one server (uvicorn shares its state)
    other.protocol.server_state = shared.protocol.server_state
    other.protocol.tasks = shared.protocol.tasks
    shared.send(head_of(100))
    other.send(head_of(100))  # both arrive before either runs
    await shared.served()
    assert shared.app.in_progress == 2 and other.app.in_progress == 2


# -- chunked trailers -----------------------------------------------------------------------------


def chunked(body: bytes, trailer: bytes, path: str = "/upload") -> tuple[bytes, bytes]:
    """A chunked POST of ``body`` (in chunks of 100 bytes), and its trailer section: ``trailer`` is
    the whole section after the last chunk's line, blank line included."""
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100]) for i in range(0, len(body), 100))
    return head + chunks + b"0\r\n", trailer


def trailer_of(size: int) -> bytes:
    """A trailer section of exactly ``size`` bytes: one field, then the blank line."""
    section = b"X-Trailer: " + b"t" * (size - 15) + b"\r\n\r\n"
    assert len(section) == size
    return section


def send_chunked(conn, message: bytes, trailer: bytes, how: str) -> None:
    """A chunked message and its trailer section in one read, byte by byte, or with the trailer
    split after its first 500 bytes ("trailer split")."""
    split = [message + trailer[:500], trailer[500:]] if how == "trailer split" else None
    for piece in split or pieces(message + trailer, how):
        conn.send(piece)


@pytest.mark.parametrize("how", ["one read", "byte by byte", "trailer split"])
async def test_a_trailer_section_of_exactly_the_limit_is_served_and_dropped(connect, how):
    conn = connect()
    message, trailer = chunked(b"b" * 250, trailer_of(LIMIT))
    send_chunked(conn, message, trailer, how)
    await conn.served()
    [(status, _, answer)] = conn.answers()
    assert status == 200
    assert json.loads(answer) == {"path": "/upload", "body": 250}
    assert [name for name, _ in conn.app.headers] == [b"host", b"transfer-encoding"]  # the trailer is not in them
    assert not conn.transport.eof  # kept alive


@pytest.mark.parametrize("how", ["one read", "byte by byte", "trailer split"])
async def test_one_trailer_byte_past_the_limit_is_431_before_the_parser_sees_it(connect, parent_reads, how):
    conn = connect()
    message, trailer = chunked(b"b" * 250, trailer_of(LIMIT + 1))
    send_chunked(conn, message, trailer, how)
    await conn.served()
    assert sum(parent_reads) <= len(message) + LIMIT  # no trailer byte past the limit reached the parser
    [(status, headers, answer)] = conn.answers()
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(answer)["error"]["message"] == f"the trailer fields exceed {LIMIT} bytes"
    assert error_of(answer) == (431, "headers_too_large")
    refusal = (431, "headers_too_large", f"the trailer fields exceed {LIMIT} bytes")
    assert conn.app.last == {"type": "http.disconnect", httpproto.REFUSED_KEY: refusal}
    assert conn.transport.eof
    await until(lambda: conn.transport.closed)


async def test_a_64_mib_trailer_is_refused_after_the_limit_and_the_rest_dropped(connect, parent_reads):
    conn = connect()
    message, _ = chunked(b"b" * 10, b"")
    conn.send(message + b"X-Flood: ")
    piece = b"f" * (1 << 20)
    for _ in range(64):
        conn.send(piece)
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [431]
    assert sum(parent_reads) < len(message) + LIMIT  # the parser never buffered more than the limit
    assert conn.transport.eof


async def test_a_request_pipelined_after_a_chunked_body_has_a_head_limit_of_its_own(connect):
    """Counted exactly, even within the read that ends the chunked body (a head past the limit
    behind an answer in progress ends the connection after that answer)."""
    conn = connect()
    message, trailer = chunked(b"b" * 10, b"\r\n")
    conn.send(message + trailer + head_of(LIMIT))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200]
    conn.send(message + trailer + head_of(LIMIT + 1))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200, 200]
    assert conn.transport.closed and conn.app.calls == ["/upload", "/healthz", "/upload"]


@pytest.mark.parametrize("line", [b"0;ext=1\r\n", b"000\r\n"])
async def test_the_last_chunk_is_found_with_extensions_and_leading_zeros(connect, line):
    conn = connect()
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    conn.send(head + b"5;a=b\r\nhello\r\n" + line + trailer_of(LIMIT))
    await conn.served()
    conn.send(head + b"5\r\nhello\r\n" + line + trailer_of(LIMIT + 1))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 431]


# -- request bodies: the timeout, the minimum rate, the close after an early answer -------------------


@pytest.fixture
def body_limits(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def set_(timeout: float, rate: int) -> None:
        monkeypatch.setattr(LimitedHttpToolsProtocol, "body_timeout", timeout)
        monkeypatch.setattr(LimitedHttpToolsProtocol, "body_min_rate", rate)

    return set_


def post_head(length: int, path: str = "/upload") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


async def test_a_body_that_stops_arriving_is_408_after_the_body_timeout(connect, body_limits):
    body_limits(0.2, 0)
    loop = asyncio.get_running_loop()
    conn = connect()
    start = loop.time()
    conn.send(post_head(10) + b"12345")  # half of it, then nothing
    await until(lambda: conn.transport.written != b"")
    assert loop.time() - start >= 0.2  # not before the timeout
    [(status, headers, answer)] = conn.answers()
    assert status == 408 and headers["connection"] == "close"
    message = "no byte of the request body arrived for 0.2 s (SURROGATE_BODY_TIMEOUT)"
    assert json.loads(answer)["error"]["message"] == message
    await conn.served()  # the app's receive ended, telling it why
    assert conn.app.last == {"type": "http.disconnect", httpproto.REFUSED_KEY: (408, "request_timeout", message)}
    assert conn.transport.eof
    await until(lambda: conn.transport.closed)


async def test_a_body_that_trickles_under_the_minimum_rate_is_408(connect, body_limits):
    body_limits(0.2, 1000)
    conn = connect()
    conn.send(post_head(1000))
    for _ in range(200):  # a byte every 20 ms: never idle for the timeout, but 50 bytes/s
        if conn.transport.written:
            break
        conn.send(b"x")
        await asyncio.sleep(0.02)
    [(status, _, answer)] = conn.answers()
    assert status == 408
    assert "fewer than 1000 bytes per second" in json.loads(answer)["error"]["message"]
    assert conn.protocol._body_bytes < 200  # cut after about 0.2 s, not when the body ended


async def test_a_slow_but_steady_body_is_served(connect, body_limits):
    body_limits(0.5, 1000)
    conn = connect()
    conn.send(post_head(4000))
    for _ in range(20):  # 200 bytes every 50 ms: 4000 bytes/s, four times the minimum
        conn.send(b"y" * 200)
        await asyncio.sleep(0.05)
    await conn.served()
    [(status, _, answer)] = conn.answers()
    assert status == 200 and json.loads(answer)["body"] == 4000


async def test_the_clock_stops_while_the_app_does_not_take_the_body(connect, body_limits):
    """Reading is paused once 64 KiB wait for the app: the client is not blamed for that."""
    body_limits(0.1, 1000)
    conn = connect()
    conn.app.delay = 0.5  # the app takes five body timeouts before it reads
    conn.send(post_head(200_000) + b"z" * 100_000)
    await asyncio.sleep(0.3)
    assert conn.transport.read_paused and conn.transport.written == b""
    await until(lambda: not conn.transport.read_paused)
    conn.send(b"z" * 100_000)
    await conn.served()
    [(status, _, answer)] = conn.answers()
    assert status == 200 and json.loads(answer)["body"] == 200_000


async def test_an_answer_before_the_body_reads_and_drops_the_rest_then_keeps_the_connection(connect, body_limits):
    """A 401, a 503 or a route that reads no body answers before the body arrived: the rest is read
    and dropped (clients write a whole body before they read the answer: closing would cut their
    upload and lose the answer), and the connection serves the next request."""
    body_limits(30.0, 0)
    conn = connect()
    conn.app.reads = False
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200]
    assert not conn.transport.eof and not conn.transport.closed
    conn.send(b"x" * 1000)  # the rest of the body: dropped
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    await until(lambda: len(conn.answers()) == 2)
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200]
    assert not conn.transport.eof and not conn.transport.closed


async def test_the_rest_of_an_answered_body_is_still_watched(connect, body_limits):
    """A body that stops arriving after its answer is ended by the body timeout, as any body."""
    body_limits(0.2, 0)
    conn = connect()
    conn.app.reads = False
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10)
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200]
    assert not conn.transport.eof
    await until(lambda: conn.transport.eof)  # FIN at the body timeout, no second answer
    assert [status for status, _, _ in conn.answers()] == [200]
    await until(lambda: conn.transport.closed)


@pytest.mark.parametrize("extra", [0, 1])
async def test_an_answered_body_is_dropped_up_to_the_body_limit(connect, body_limits, monkeypatch, extra):
    """Declared past the body limit: the connection ends after the answer; at the limit, the rest
    is read (and a body that goes on past its declared length is not a body: the parser refuses it)."""
    body_limits(30.0, 0)
    monkeypatch.setattr(LimitedHttpToolsProtocol, "max_discard_bytes", 5000)
    conn = connect()
    conn.app.reads = False
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (5000 + extra))
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200]
    if extra:
        assert conn.transport.eof  # FIN after the answer
        conn.send(b"x" * 1000)  # dropped while lingering
        await until(lambda: conn.transport.closed)
    else:
        conn.send(b"x" * 5000)
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        await until(lambda: len(conn.answers()) == 2)
        assert not conn.transport.eof


async def test_a_chunked_body_dropped_after_its_answer_ends_at_the_body_limit(connect, body_limits, monkeypatch):
    body_limits(30.0, 0)
    monkeypatch.setattr(LimitedHttpToolsProtocol, "max_discard_bytes", 5000)
    conn = connect()
    conn.app.reads = False
    conn.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200]
    conn.send(b"fa0\r\n" + b"x" * 4000 + b"\r\n")  # 4000 bytes: still read
    assert not conn.transport.eof
    conn.send(b"7d0\r\n" + b"x" * 2000 + b"\r\n")  # 6000 bytes in all: past the limit
    await until(lambda: conn.transport.eof)
    assert [status for status, _, _ in conn.answers()] == [200]


async def test_an_answer_after_the_whole_body_keeps_the_connection(connect, body_limits):
    body_limits(30.0, 0)
    conn = connect()
    conn.send(post_head(5) + b"hello")
    await conn.served()
    conn.send(post_head(5) + b"hello")
    await conn.served()
    assert [status for status, _, _ in conn.answers()] == [200, 200]
    assert not conn.transport.eof and not conn.transport.closed


async def test_the_body_watch_runs_only_while_bodies_arrive(connect, body_limits):
    body_limits(0.2, 0)
    conn = connect()
    conn.send(post_head(10) + b"12345")
    await asyncio.sleep(0)
    watch = httpproto._WATCHES[asyncio.get_running_loop()]
    assert conn.protocol in watch.members and watch._timer is not None
    conn.send(b"67890")
    await conn.served()
    await until(lambda: watch._timer is None)
    assert not watch.members
