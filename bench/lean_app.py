"""The lean reference: what a 16-element ``spike`` costs when a handler does only what it must.

``POST /lean/spike`` and ``POST /lean/grad`` read the JSON body with orjson, make one float32 array,
call one cached ``jax.jit`` function and write the answer with orjson: no checks, no limits, no
metrics. They are raw ASGI routes inside a FastAPI application's router (with twenty other path
operations beside them), the same place the service's compute endpoints sit, so ``make bench`` can
show how far the service's request path is from a handler that does nothing else.
``POST /const`` answers a constant from the same router.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orjson
from fastapi import FastAPI
from starlette.routing import Route

CONST = b'{"ok":true}'
_HEADERS = [(b"content-type", b"application/json")]


@jax.jit
def _spike(x):
    return (x >= 0).astype(x.dtype)


@jax.jit
def _grad(x, alpha):
    return jnp.where(jnp.abs(x) > 1 / alpha, 0.0, alpha - alpha**2 * jnp.abs(x)).astype(x.dtype)


async def _body(receive) -> bytes:
    msg = await receive()
    body = msg.get("body", b"")
    while msg.get("more_body", False):
        msg = await receive()
        body += msg.get("body", b"")
    return body


async def _send(send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": _HEADERS + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def lean_spike(body: bytes) -> bytes:
    x = np.asarray(orjson.loads(body)["x"], np.float32)
    return orjson.dumps({"spike": np.asarray(_spike(x))}, option=orjson.OPT_SERIALIZE_NUMPY)


def lean_grad(body: bytes) -> bytes:
    doc = orjson.loads(body)
    x = np.asarray(doc["x"], np.float32)
    y = _grad(x, np.float32(doc.get("alpha", 1.0)))
    return orjson.dumps({"grad": np.asarray(y)}, option=orjson.OPT_SERIALIZE_NUMPY)


class _Raw:
    """A raw ASGI endpoint (Starlette calls an object that is not a function as an ASGI app)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    async def __call__(self, scope, receive, send) -> None:
        await _send(send, self.fn(await _body(receive)))


app = FastAPI()
for i in range(20):  # the other routes a real application has in its router
    app.add_api_route(f"/other/{i}", lambda: {"ok": True}, methods=["GET"])
app.router.routes[0:0] = [
    Route("/lean/spike", _Raw(lean_spike), methods=["POST"]),
    Route("/lean/grad", _Raw(lean_grad), methods=["POST"]),
    Route("/const", _Raw(lambda body: CONST), methods=["POST"]),
]
