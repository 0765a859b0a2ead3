"""The transport floor: bare ASGI endpoints on the same server stack (uvicorn, uvloop, httptools).

``POST /echo`` returns its request body unchanged (same bytes in and out) and ``POST /const`` a
constant, so the service's cost can be compared with what moving the bytes alone costs.
``POST /json`` is the JSON codec floor: orjson body -> float32 NumPy array -> orjson answer
``{"y": [...]}``, no arithmetic and no checks, what decoding and encoding the numbers alone cost.
"""

from __future__ import annotations

import numpy as np
import orjson

CONST = b'{"ok":true}'


def json_codec(body: bytes) -> bytes:
    arr = np.asarray(orjson.loads(body)["x"], np.float32)
    return orjson.dumps({"y": arr}, option=orjson.OPT_SERIALIZE_NUMPY)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    chunks = []
    more = True
    while more:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    if scope["path"] == "/echo":
        body = b"".join(chunks)
        ctype = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
    elif scope["path"] == "/json":
        body = json_codec(b"".join(chunks))
        ctype = b"application/json"
    else:
        body = CONST
        ctype = b"application/json"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
