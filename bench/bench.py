"""`make bench`: where the time goes, measured in one run.

Starts the real service (`python -m service`, the same settings as `make serve`), a transport floor
(bare ASGI echo and constant endpoints on the same uvicorn stack) and a straightforward FastAPI +
Pydantic baseline, each on a loopback port, and prints one table per section; every figure is a
median of repeated runs and every comparison a ratio measured in this run. The tables, the targets
and the machine's description go to ``bench/results/`` (Markdown and JSON).

    python bench/bench.py [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
NPY, JSON = "application/x-npy", "application/json"


# -- helpers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], port: int, ready_path: str, env: dict[str, str] | None = None):
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                c = HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", ready_path)
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} did not become ready")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


def npy_bytes(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def paired_medians(fns: list, repeats: int, warmup: int = 2) -> list[float]:
    """Medians of several functions timed round-robin (one call of each per round), so that drifts
    in the machine's load hit every contender alike: the ratios are what this reports best."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


class Http:
    """A kept-alive http.client connection: the thinnest sequential client."""

    def __init__(self, port: int) -> None:
        self.conn = HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: bytes, ctype: str, accept: str = JSON) -> bytes:
        self.conn.request("POST", path, body=body, headers={"content-type": ctype, "accept": accept})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return data

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.read()


def repeats_for(n: int, quick: bool) -> int:
    r = 300 if n <= 1000 else 40 if n <= 100_000 else 10 if n <= 1_000_000 else 5
    return max(3, r // 4) if quick else r


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import jax

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# -- 1. in-process ------------------------------------------------------------------------------

def bench_inprocess(quick: bool) -> tuple[list[list], dict]:
    import jax
    import jax.numpy as jnp

    import surrogate_core as sc

    @jax.jit
    def hand(x, alpha):
        return jnp.where(jnp.abs(x) > 1 / alpha, 0.0, alpha - alpha**2 * jnp.abs(x))

    rows, data = [], {}
    rng = np.random.default_rng(0)
    sizes = [1_000, 100_000, 1_000_000, 10_000_000]
    on_gpu = jax.devices()[0].platform != "cpu"
    if on_gpu:
        sizes.append(100_000_000)
    for n in sizes:
        x = rng.uniform(-2, 2, n).astype(np.float32)
        a = np.float32(1.0)
        reps = repeats_for(n, quick)
        t_core, t_hand = paired_medians([lambda: sc.grad(x, alpha=1.0), lambda: np.asarray(hand(x, a))], reps * 2)
        np.testing.assert_allclose(sc.grad(x, alpha=1.0), np.asarray(hand(x, a)), rtol=1e-6, atol=1e-6)
        row = [f"{n:,}", fmt_ms(t_core), fmt_ms(t_hand), f"{t_core / t_hand:.2f}"]
        entry = {"core_s": t_core, "hand_s": t_hand, "ratio": t_core / t_hand}
        if on_gpu:  # device-resident: the kernel alone against the memory roofline
            xd = jax.device_put(x)
            t_dev = median_time(lambda: hand(xd, a).block_until_ready(), reps)
            gbps = 8 * n / t_dev / 1e9  # 4 bytes read + 4 bytes written per element
            entry.update(device_s=t_dev, gbps=gbps)
            row += [fmt_ms(t_dev), f"{gbps:,.0f}"]
        rows.append(row)
        data[n] = entry
    return rows, data


# -- 2-4. sequential requests -------------------------------------------------------------------

def bench_sequential(svc: int, floor: int, naive: int, quick: bool) -> tuple[list[list], list[list], dict]:
    rng = np.random.default_rng(1)
    s, f, nv = Http(svc), Http(floor), Http(naive)
    b16 = orjson.dumps({"x": np.linspace(-2, 2, 16).tolist(), "alpha": 1.0})
    t_const, t_16 = paired_medians([lambda: f.post("/const", b16, JSON), lambda: s.post("/v1/grad", b16, JSON)],
                                   repeats_for(16, quick))
    rows, base_rows, data = [], [], {"const_s": t_const, "grad16_paired_s": t_16}
    for n in [16, 1_000, 100_000, 1_000_000]:
        x = rng.uniform(-2, 2, n).astype(np.float32)
        jbody = orjson.dumps({"x": x, "alpha": 1.0}, option=orjson.OPT_SERIALIZE_NUMPY)
        nbody = npy_bytes(x)
        reps = repeats_for(n, quick)
        t_json, t_echo_json = paired_medians([lambda: s.post("/v1/grad", jbody, JSON), lambda: f.post("/echo", jbody, JSON)], reps)
        t_npy, t_echo_npy = paired_medians(
            [lambda: s.post("/v1/grad?alpha=1.0", nbody, NPY, NPY), lambda: f.post("/echo", nbody, NPY)], reps
        )
        # the answers are right (and the same over both transports)
        gj = np.asarray(orjson.loads(s.post("/v1/grad", jbody, JSON))["grad"], np.float32)
        gn = np.load(io.BytesIO(s.post("/v1/grad?alpha=1.0", nbody, NPY, NPY)))
        assert np.array_equal(gj, gn)
        naive_reps = max(3, reps // 4)
        t_naive = median_time(lambda: nv.post("/v1/grad", jbody, JSON), naive_reps, warmup=1)
        rows.append([
            f"{n:,}", fmt_ms(t_json), fmt_ms(t_echo_json), f"{t_json / t_echo_json:.2f}",
            fmt_ms(t_npy), fmt_ms(t_echo_npy), f"{t_npy / t_echo_npy:.2f}", f"{t_json / t_npy:.1f}",
        ])
        base_rows.append([f"{n:,}", fmt_ms(t_naive), fmt_ms(t_json), f"{t_naive / t_json:.1f}", fmt_ms(t_npy), f"{t_naive / t_npy:.0f}"])
        data[n] = {"json_s": t_json, "npy_s": t_npy, "echo_json_s": t_echo_json, "echo_npy_s": t_echo_npy, "naive_s": t_naive,
                   "json_bytes": len(jbody), "npy_bytes": len(nbody)}
    return rows, base_rows, data


# -- 5. concurrency ----------------------------------------------------------------------------

async def _load(port: int, path: str, body: bytes, ctype: str, clients: int, seconds: float) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = shed = 0
    stop = time.monotonic() + seconds
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            nonlocal errors, shed
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"content-type": ctype}) as r:
                        await r.read()
                        if r.status == 503:  # refused at once by the queue or concurrency limit
                            shed += 1
                            continue
                        if r.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - t0
    lat.sort()
    return {"rps": len(lat) / elapsed, "p50_s": lat[len(lat) // 2] if lat else None,
            "p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None, "errors": errors, "shed_503": shed,
            "requests": len(lat)}


def _device_calls(port: int) -> tuple[float, float]:
    text = Http(port).get("/metrics").decode()
    calls = float(re.search(r"^surrogate_device_calls_total (\S+)", text, re.M).group(1))
    reqs = sum(float(v) for v in re.findall(r'^surrogate_requests_total\{endpoint="/v1/grad",status="200"\} (\S+)', text, re.M))
    return calls, reqs


def bench_concurrency(svc: int, floor: int, quick: bool) -> tuple[list[list], dict]:
    seconds = 1.5 if quick else 4.0
    rows, data = [], {}
    b16 = orjson.dumps({"x": np.linspace(-2, 2, 16).tolist(), "alpha": 1.0})
    b1k = orjson.dumps({"x": np.linspace(-2, 2, 1000).tolist(), "alpha": 1.0})
    for clients in [1, 8, 32, 128]:
        for label, port, path, body in [("constant endpoint", floor, "/const", b16), ("/v1/grad 16", svc, "/v1/grad", b16),
                                        ("/v1/grad 1k", svc, "/v1/grad", b1k)]:
            before = _device_calls(svc) if port == svc else None
            r = asyncio.run(_load(port, path, body, JSON, clients, seconds))
            per = ""
            if before is not None:
                after = _device_calls(svc)
                dreq = after[1] - before[1]
                per = f"{(after[0] - before[0]) / dreq:.2f}" if dreq else ""
                r["device_calls_per_request"] = per
            rows.append([clients, label, f"{r['rps']:,.0f}", fmt_ms(r["p50_s"]), fmt_ms(r["p99_s"]), r["shed_503"], r["errors"], per])
            data[f"{clients}/{label}"] = r
    return rows, data


def bench_workers(quick: bool) -> tuple[list[list], dict]:
    """The same load against `--workers 2` (each worker its own process and JAX runtime)."""
    seconds = 1.5 if quick else 4.0
    port = free_port()
    rows, data = [], {}
    b16 = orjson.dumps({"x": np.linspace(-2, 2, 16).tolist(), "alpha": 1.0})
    b1k = orjson.dumps({"x": np.linspace(-2, 2, 1000).tolist(), "alpha": 1.0})
    with server([sys.executable, "-m", "service", "--port", str(port), "--workers", "2"], port, "/readyz",
                {"SURROGATE_LOG_LEVEL": "warning"}):
        time.sleep(3)  # /readyz answered by one worker; give the other its warm-up too
        for clients in [8, 32]:
            for label, body in [("/v1/grad 16", b16), ("/v1/grad 1k", b1k)]:
                r = asyncio.run(_load(port, "/v1/grad", body, JSON, clients, seconds))
                rows.append([2, clients, label, f"{r['rps']:,.0f}", fmt_ms(r["p50_s"]), fmt_ms(r["p99_s"]), r["shed_503"], r["errors"]])
                data[f"{clients}/{label}"] = r
    return rows, data


# -- 6. compilation ----------------------------------------------------------------------------

def bench_compilation(quick: bool) -> tuple[list[list], dict]:
    port = free_port()
    count = 200 if quick else 1000
    rng = random.Random(6)
    first = rng.sample(range(1, 1_000_001), count)
    second = rng.sample(range(1, 1_000_001), count)
    env = {"SURROGATE_PORT": str(port), "SURROGATE_LOG_LEVEL": "warning"}
    with server([sys.executable, "-m", "service"], port, "/readyz", env):
        h = Http(port)
        key = "grad/piecewise_quadratic/float32"
        v0 = json.loads(h.get("/v1/info"))["variants"].get(key, 0)
        xs = np.random.default_rng(2).uniform(-2, 2, 1_000_000).astype(np.float32)

        def run(lengths: list[int]) -> list[float]:
            ts = []
            for n in lengths:
                body = npy_bytes(xs[:n])
                t0 = time.perf_counter()
                out = np.load(io.BytesIO(h.post("/v1/grad?alpha=1.0", body, NPY, NPY)))
                ts.append(time.perf_counter() - t0)
                assert out.shape == (n,)
            return sorted(ts)

        cold = run(first)
        v1 = json.loads(h.get("/v1/info"))["variants"].get(key, 0)
        warm = run(second)
        v2 = json.loads(h.get("/v1/info"))["variants"].get(key, 0)
    p = lambda ts, q: ts[int(q * (len(ts) - 1))]  # noqa: E731
    rows = [
        ["first pass (compiles)", count, v1, fmt_ms(p(cold, 0.5)), fmt_ms(p(cold, 0.99)), f"{p(cold, 0.99) / p(cold, 0.5):.2f}"],
        ["second pass (warm)", count, v2, fmt_ms(p(warm, 0.5)), fmt_ms(p(warm, 0.99)), f"{p(warm, 0.99) / p(warm, 0.5):.2f}"],
    ]
    return rows, {"variants_after_warmup": v0, "variants_first": v1, "variants_second": v2,
                  "warm_p50_s": p(warm, 0.5), "warm_p99_s": p(warm, 0.99), "cold_p99_s": p(cold, 0.99)}


# -- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and shorter load phases (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    info = machine()
    results: dict = {"machine": info, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    md = [f"## surrogate-serve benchmark ({results['date']})", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]

    def emit(text: str) -> None:
        print(text, flush=True)
        md.append(text)

    print("\n".join(md), flush=True)
    rows, results["inprocess"] = bench_inprocess(args.quick)
    header = ["elements", "core grad ms", "hand-written jit ms", "ratio"]
    if len(rows[0]) > 4:
        header += ["kernel alone ms (device-resident)", "GB/s"]
    emit(table("1. In-process: core grad (validated, bucketed) vs hand-written jax.jit, float32", header, rows))

    sp, fp, npt = free_port(), free_port(), free_port()
    with ExitStack() as stack:
        stack.enter_context(server([sys.executable, "-m", "service", "--port", str(sp)], sp, "/readyz",
                                   {"SURROGATE_LOG_LEVEL": "warning"}))
        uv = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "--log-level", "warning", "--no-access-log"]
        stack.enter_context(server(uv + ["floor_app:app", "--port", str(fp)], fp, "/const"))
        stack.enter_context(server(uv + ["naive_app:app", "--port", str(npt)], npt, "/docs"))
        rows, base_rows, results["sequential"] = bench_sequential(sp, fp, npt, args.quick)
        emit(table(
            "2-3. The service vs the transport floor (same request bytes echoed), one kept-alive connection; "
            f"constant endpoint {fmt_ms(results['sequential']['const_s'])} ms",
            ["elements", "JSON ms", "echo JSON ms", "ratio", ".npy ms", "echo .npy ms", "ratio", "JSON / .npy"], rows))
        emit(table("4. Baseline: straightforward FastAPI + Pydantic list[float] endpoint",
                   ["elements", "baseline JSON ms", "service JSON ms", "speed-up", "service .npy ms", "speed-up"], base_rows))
        rows, results["concurrency"] = bench_concurrency(sp, fp, args.quick)
        emit(table("5. Concurrency (aiohttp clients, fixed time each)",
                   ["clients", "endpoint", "requests/s (200)", "p50 ms", "p99 ms", "shed (503)", "errors", "device calls / request"], rows))
    rows, results["workers"] = bench_workers(args.quick)
    emit(table("5b. Workers: the same load against `--workers 2`",
               ["workers", "clients", "endpoint", "requests/s (200)", "p50 ms", "p99 ms", "shed (503)", "errors"], rows))
    rows, results["compilation"] = bench_compilation(args.quick)
    emit(table("6. Compilation: requests of distinct random lengths in [1, 1,000,000] (.npy)",
               ["pass", "requests", "compiled grad/float32 variants", "p50 ms", "p99 ms", "p99/p50"], rows))

    seq, conc, comp, inp = results["sequential"], results["concurrency"], results["compilation"], results["inprocess"]
    targets = [
        (".npy /v1/grad at 1M <= 1.5x the floor for the same bytes", seq[1_000_000]["npy_s"] / seq[1_000_000]["echo_npy_s"], "<=", 1.5),
        ("JSON /v1/grad at 100k >= 15x faster than the baseline", seq[100_000]["naive_s"] / seq[100_000]["json_s"], ">=", 15),
        ("16-element median latency <= 1.5x the constant endpoint", seq["grad16_paired_s"] / seq["const_s"], "<=", 1.5),
        ("32 clients, 16 elements: throughput >= 0.6x the constant endpoint",
         conc["32//v1/grad 16"]["rps"] / conc["32/constant endpoint"]["rps"], ">=", 0.6),
        ("In-process at 1M <= 1.3x the hand-written jit", inp[1_000_000]["ratio"], "<=", 1.3),
        ("Compiled variants over the lengths <= 25", comp["variants_second"], "<=", 25),
        ("Warm p99 <= 3x p50", comp["warm_p99_s"] / comp["warm_p50_s"], "<=", 3),
    ]
    trows = []
    for name, value, op, goal in targets:
        ok = value <= goal if op == "<=" else value >= goal
        trows.append([name, f"{value:.2f}", f"{op} {goal}", "met" if ok else "MISSED"])
    results["targets"] = [dict(zip(["target", "value", "goal", "status"], r)) for r in trows]
    emit(table("Targets", ["target", "measured", "goal", "status"], trows))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if info["device"].split(":")[0] != "cpu" else "cpu"
    (out / f"{tag}-latest.md").write_text("\n".join(md) + "\n")
    (out / f"{tag}-latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written: {out / f'{tag}-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
