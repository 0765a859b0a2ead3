"""Bounded soak: mixed requests from many concurrent clients against a real server on loopback.

    python bench/soak.py --duration 60 --clients 32        # starts its own server
    python bench/soak.py --url http://127.0.0.1:8000 ...    # or soaks a running one (no RSS figures)

Loopback only; it stops by itself after ``--duration`` seconds. It reports requests, statuses,
unexpected errors (any 5xx, transport error or wrong answer; deliberate 4xx are counted apart),
p50/p99 latency and the server's resident memory after a warm-up phase and at the end. Exit status
1 if there was an unexpected error or memory grew by more than ``--max-growth`` (default 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from liveserver import rss_bytes  # noqa: E402

NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def pq(x: np.ndarray, a: float) -> np.ndarray:
    x = x.astype(np.float64)
    return np.where(np.abs(x) > 1 / a, 0.0, a - a * a * np.abs(x))


def make_cases(rng: random.Random) -> list[dict]:
    """(method, path, body, headers, expected status, checker) templates."""
    xs = np.linspace(-2, 2, 10_000, dtype=np.float32)
    alphas = np.array([[0.5], [1.0], [2.0]], np.float32)
    cases = [
        dict(name="json-spike", path="/v1/spike", body=json.dumps({"x": [-2, -0.5, 0, 0.5, 2]}).encode(), ctype=JSON,
             status=200, check=lambda d: json.loads(d)["spike"] == [0, 0, 1, 1, 1]),
        dict(name="json-grad", path="/v1/grad", body=json.dumps({"x": [-0.5, 0.0, 0.25], "alpha": 2.0}).encode(), ctype=JSON,
             status=200, check=lambda d: json.loads(d)["grad"] == [0.0, 2.0, 1.0]),
        dict(name="json-batch", path="/v1/grad",
             body=json.dumps([{"x": [0.5], "alpha": 1.0}, {"x": [0.25], "cotangent": 2.0}, {"x": 0.0, "dtype": "float64"}]).encode(),
             ctype=JSON, status=200, check=lambda d: [r["grad"] for r in json.loads(d)] == [[0.5], [1.5], 1.0]),
        dict(name="json-fun", path="/v1/fun", body=json.dumps({"x": [0.5], "alpha": 1.0}).encode(), ctype=JSON,
             status=200, check=lambda d: json.loads(d)["fun"] == [0.875]),
        dict(name="npy-grad-10k", path="/v1/grad?alpha=1.5", body=_npy(xs), ctype=NPY, accept=NPY, status=200,
             check=lambda d: np.allclose(np.load(io.BytesIO(d)), pq(xs, 1.5), rtol=2e-6, atol=1e-6)),
        dict(name="npz-sweep", path="/v1/grad", body=_npz(x=xs[:1000], alpha=alphas), ctype=NPZ, accept=NPY, status=200,
             check=lambda d: np.allclose(np.load(io.BytesIO(d)), np.stack([pq(xs[:1000], a) for a in (0.5, 1.0, 2.0)]),
                                         rtol=2e-6, atol=1e-6)),
        dict(name="bad-alpha", path="/v1/grad", body=b'{"x": [1], "alpha": -1}', ctype=JSON, status=422,
             check=lambda d: json.loads(d)["error"]["field"] == "alpha"),
        dict(name="bad-npy", path="/v1/grad", body=b"\x93NUMPY garbage", ctype=NPY, status=422, check=lambda d: True),
        dict(name="bad-json", path="/v1/spike", body=b'{"x": [1, 2', ctype=JSON, status=400, check=lambda d: True),
    ]
    return cases


async def soak(base: str, duration: float, clients: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    cases = make_cases(rng)
    weights = [20, 20, 8, 8, 6, 4, 3, 2, 2]
    stats: dict = {"requests": 0, "by_status": {}, "unexpected": [], "latency": [], "deliberate_4xx": 0}
    stop = time.monotonic() + duration

    async def client(i: int) -> None:
        r = random.Random(seed * 1000 + i)
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < stop:
                case = r.choices(cases, weights)[0]
                headers = {"content-type": case["ctype"], "accept": case.get("accept", JSON)}
                t0 = time.perf_counter()
                try:
                    async with s.post(base + case["path"], data=case["body"], headers=headers) as resp:
                        data = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    stats["unexpected"].append(f"{case['name']}: {exc!r}")
                    continue
                stats["latency"].append(time.perf_counter() - t0)
                stats["requests"] += 1
                stats["by_status"][status] = stats["by_status"].get(status, 0) + 1
                if status != case["status"]:
                    if status != 503:  # shedding under load is allowed, anything else is not
                        stats["unexpected"].append(f"{case['name']}: status {status}: {data[:200]!r}")
                elif not case["check"](data):
                    stats["unexpected"].append(f"{case['name']}: wrong answer")
                elif status >= 400:
                    stats["deliberate_4xx"] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    lat = sorted(stats["latency"])
    stats["p50_ms"] = statistics.median(lat) * 1e3 if lat else None
    stats["p99_ms"] = lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else None
    del stats["latency"]
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first memory reading")
    p.add_argument("--url", help="soak a running server instead of starting one")
    p.add_argument("--max-growth", type=float, default=0.10)
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)

    def run(base: str, pid: int | None) -> dict:
        if args.warmup:
            asyncio.run(soak(base, args.warmup, args.clients, seed=1))
        rss0 = rss_bytes(pid) if pid else None
        t0 = time.monotonic()
        report = asyncio.run(soak(base, args.duration, args.clients))
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["clients"] = args.clients
        report["requests_per_s"] = round(report["requests"] / report["seconds"], 1)
        if pid:
            rss1 = rss_bytes(pid)
            report["rss_start_mb"] = round(rss0 / 2**20, 1)
            report["rss_end_mb"] = round(rss1 / 2**20, 1)
            report["rss_growth"] = round(rss1 / rss0 - 1, 4)
        return report

    if args.url:
        report = run(args.url.rstrip("/"), None)
    else:
        from liveserver import running_server

        with running_server() as (base, proc):
            report = run(base, proc.pid)
    report["unexpected_count"] = len(report["unexpected"])
    report["unexpected"] = report["unexpected"][:20]
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    failed = report["unexpected_count"] > 0 or report.get("rss_growth", 0) > args.max_growth
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
