"""Where a compute request's time goes, in process: the cost of each stage of ``POST /v1/grad`` and
``POST /v1/spike`` (JSON) beside a lean reference handler on the same stack.

Every figure is a median over repeated calls on this process's event loop, with no network:

- **whole request**: the FastAPI app called as ASGI (the router, the raw compute route, auth,
  admission, body, decode, limits, batcher, engine, encode, send, metrics);
- **decode + validate**: the codec's ``prepare`` and ``decode`` (media types, JSON, the job);
- **limits + reservation**: the data plane's checks of the jobs and the memory ticket;
- **engine**: ``Engine.run`` (plan, pad, the compiled call, slice);
- **compiled call alone**: the cached executable on the padded buffer;
- **encode**: the codec's ``encode`` (the answer's bytes);
- **dispatch + auth + admission + metrics**: the whole request less the stages above;
- **lean reference, bare ASGI** and **as a raw route in a FastAPI app**: ``bench/lean_app.py``'s
  handler (orjson in, one cached ``jax.jit`` call, orjson out), called the same way.

    python bench/stages.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }


async def _call(app: Any, path: str, body: bytes) -> bytes:
    sent = False
    out: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message["type"] == "http.response.body":
            out.append(message.get("body", b""))

    await app(_scope(path, body), receive, send)
    return b"".join(out)


def _median_async(loop: asyncio.AbstractEventLoop, fn: Any, repeats: int) -> float:
    async def run() -> float:
        for _ in range(50):
            await fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return loop.run_until_complete(run())


def _median(fn: Any, repeats: int) -> float:
    from bench import median_time

    return median_time(fn, repeats, warmup=50)


def measure(quick: bool = False) -> dict[str, dict[str, float]]:
    """Per endpoint-and-size label, seconds per stage (medians)."""
    import lean_app

    from service.app import create_app
    from service.compute import Head
    from service.dataplane import Ticket
    from service.server.settings import Settings

    repeats = 400 if quick else 3000
    app = create_app(Settings(warmup=False, log_level="warning"))
    rt = app.state.runtime
    loop = asyncio.new_event_loop()
    results: dict[str, dict[str, float]] = {}
    cm = app.router.lifespan_context(app)
    loop.run_until_complete(cm.__aenter__())
    try:
        for endpoint, n in (("spike", 16), ("grad", 16), ("grad", 1000)):
            x = np.linspace(-2, 2, n).tolist()
            doc: dict[str, Any] = {"x": x} if endpoint == "spike" else {"x": x, "alpha": 1.0}
            body = orjson.dumps(doc)
            path = f"/v1/{endpoint}"
            route = next(r for r in app.router.routes if getattr(r, "path", None) == path)
            codec = route.compute.codec
            head = Head(_scope(path, body))
            answer = loop.run_until_complete(_call(app, path, body))
            assert orjson.loads(answer)["shape"] == [n]
            request = codec.prepare(head, rt.settings.max_body_bytes)
            decoded = codec.decode(request, body)
            jobs = decoded.jobs
            results_ = rt.engine.run(jobs)
            rt.engine._plan(jobs)
            g = rt.engine._plan(jobs)[0]
            exe = rt.engine._executable(g.key)
            buf = np.zeros(g.bucket, np.float32)
            extra = [np.float32(1.0)] * len(g.layout)
            dp = rt.dataplane

            def limits() -> None:
                t = Ticket(dp.budget)
                m = dp.check(jobs, where=str, job_index=True)
                t.require(len(body) + 96 * m, "bench")
                t.release()

            lean = lean_app.lean_spike if endpoint == "spike" else lean_app.lean_grad
            raw_lean = lean_app._Raw(lean)

            async def bare() -> None:
                await _call(raw_lean, "/", body)

            t = {
                "whole request": _median_async(loop, lambda: _call(app, path, body), repeats),
                "decode + validate": _median(lambda: codec.decode(codec.prepare(head, 1 << 30), body), repeats),
                "limits + reservation": _median(limits, repeats),
                "engine (plan, pad, call, slice)": _median(lambda: rt.engine.run(jobs), repeats),
                "compiled call alone": _median(lambda: np.asarray(exe(buf, *extra)), repeats),
                "encode": _median(lambda: codec.encode(decoded, results_), repeats),
                "lean reference, bare ASGI": _median_async(loop, bare, repeats),
                "lean reference, raw route in a FastAPI app": _median_async(
                    loop, lambda: _call(lean_app.app, f"/lean/{endpoint}", body), repeats),
            }
            t["dispatch + auth + admission + metrics"] = t["whole request"] - sum(
                t[k] for k in ("decode + validate", "limits + reservation", "engine (plan, pad, call, slice)", "encode"))
            results[f"/v1/{endpoint} {n}"] = t
    finally:
        loop.run_until_complete(cm.__aexit__(None, None, None))
        loop.close()
    return results


STAGES = ["dispatch + auth + admission + metrics", "decode + validate", "limits + reservation",
          "engine (plan, pad, call, slice)", "compiled call alone", "encode", "whole request",
          "lean reference, raw route in a FastAPI app", "lean reference, bare ASGI"]


def rows(results: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    labels = list(results)
    header = ["stage"] + [f"{label} µs" for label in labels]
    out = [[stage] + [f"{results[label][stage] * 1e6:.1f}" for label in labels] for stage in STAGES]
    out.append(["whole request ÷ lean reference (FastAPI raw route)"] + [
        f"{results[label]['whole request'] / results[label]['lean reference, raw route in a FastAPI app']:.2f}"
        for label in labels])
    return header, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    header, body = rows(measure(args.quick))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in body:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
