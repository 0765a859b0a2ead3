"""Helpers shared by the service, client and end-to-end tests."""

from __future__ import annotations

from liveserver import npy  # noqa: F401  (one .npy helper for every test)

from service.server.settings import Settings


def make_settings(**kw) -> Settings:
    """Test settings: no warm-up unless asked (tests compile what they use)."""
    kw.setdefault("warmup", False)
    return Settings(**kw)


def npz(**arrays) -> bytes:
    """Named arrays as the bytes of an ``.npz`` file."""
    import io

    import numpy as np

    b = io.BytesIO()
    np.savez(b, **{k: np.asarray(v) for k, v in arrays.items()})
    return b.getvalue()


class App:
    """The app in process, its lifespan run, with an httpx client over the ASGI transport:
    ``async with App(**settings) as a:`` gives ``a.app``, ``a.rt`` (the runtime) and ``a.client``."""

    def __init__(self, settings: Settings | None = None, **kw) -> None:
        from service.app import create_app

        self.app = create_app(settings if settings is not None else make_settings(**kw))
        self.rt = self.app.state.runtime
        self.budget = self.rt.dataplane.budget

    async def __aenter__(self):
        import httpx

        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False), base_url="http://t", timeout=30
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(*exc)


#: Open Inference Protocol datatype -> the dtype of its binary tensor data (little-endian)
async def asgi_post(app, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One POST straight through ``app`` as ASGI (no client objects that could keep the answer):
    the status and the answer's bytes."""
    import asyncio

    sent, status, out = False, 0, bytearray()

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.extend(message.get("body", b""))

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), *raw, (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return status, bytes(out)


def _wire() -> dict:
    import ml_dtypes

    return {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BF16": ml_dtypes.bfloat16}


WIRE = _wire()


def tensor(name, a, datatype="FP32", binary=False):
    """A /v2 input tensor of ``a``: JSON ``data``, or (binary) its parameters and raw bytes."""
    import numpy as np

    a = np.asarray(a)
    t = {"name": name, "shape": list(a.shape), "datatype": datatype}
    if binary:
        raw = np.ascontiguousarray(a, dtype=WIRE[datatype]).tobytes()
        t["parameters"] = {"binary_data_size": len(raw)}
        return t, raw
    t["data"] = a.ravel().tolist()
    return t, b""


def body(req, blobs=()):
    """(body, headers) of a /v2 request: JSON alone, or the JSON header then the binary tensors."""
    import orjson

    head = orjson.dumps(req)
    blobs = [b for b in blobs if b]
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"inference-header-content-length": str(len(head))}


def torch_local_spike(grad):
    """A spike function all in torch (no service): H(x) forward (1 where ``x >= 0``), and
    ``grad_output * grad(x)`` backward, ``grad(x)`` being the surrogate's g'(x) as a tensor."""
    import torch

    class LocalSpike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x >= 0).to(x.dtype)

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return grad_output * grad(x)

    return LocalSpike.apply


class LoopbackServer:
    """A test server on a loopback port, a thread per connection: ``handle(conn)`` (a subclass's)
    serves each accepted connection; ``connections`` counts them; ``close()`` stops accepting and
    waits for the threads. ``sndbuf`` sets the listening socket's send buffer (the connections'),
    so that little of what a handler sends is held in flight."""

    def __init__(self, sndbuf: int | None = None) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        if sndbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.settimeout(0.05)  # accept() looks at ``stop`` this often
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]

    def start(self) -> None:
        self.threads[0].start()

    def handle(self, conn) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self.handle, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(timeout=10)
