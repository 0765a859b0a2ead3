"""Memory and probe latency under heavy load: bursts of 1, 8 and 48 concurrent 57 MiB `.npy` gradient
requests against a real server, with the peak resident memory (VmHWM after a reset) over the warm
resident size, the bytes held per body byte, the statuses and the worst `/healthz` round trip.

    python bench/hostile.py [--repo PATH] [--budget BYTES] [--sizes 1,8,48]

``--repo`` serves the service from another checkout (to compare with an earlier version).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def post(port: int, body: bytes) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/grad", body, {"content-type": "application/x-npy", "accept": "application/x-npy"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def burst(port: int, pid: int, body: bytes, n: int) -> dict:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status_kb(pid, "VmRSS")
    worst, stop = [0.0], threading.Event()

    def probe():
        while not stop.is_set():
            t = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", "/healthz")
            c.getresponse().read()
            c.close()
            worst[0] = max(worst[0], time.perf_counter() - t)
            stop.wait(0.02)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda _: post(port, body), range(n)))
    took = time.perf_counter() - t0
    stop.set()
    th.join()
    peak = status_kb(pid, "VmHWM") - base
    time.sleep(1)
    after = status_kb(pid, "VmRSS") - base
    return {"n": n, "ok": statuses.count(200), "shed": statuses.count(503), "other": n - statuses.count(200) - statuses.count(503),
            "peak_mib": peak / MiB, "after_mib": after / MiB, "per_body_byte": peak / (len(body) * n),
            "worst_healthz_ms": worst[0] * 1e3, "seconds": took}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=str(ROOT))
    p.add_argument("--budget", type=int, default=2 << 30)
    p.add_argument("--sizes", default="1,8,48")
    args = p.parse_args()
    port = free_port()
    env = dict(os.environ, SURROGATE_PORT=str(port), SURROGATE_MEMORY_BUDGET=str(args.budget), SURROGATE_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=args.repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        x = np.linspace(-2, 2, 15_000_000, dtype=np.float32)
        buf = io.BytesIO()
        np.save(buf, x)
        body = buf.getvalue()
        post(port, body)  # compile the bucket first
        print(f"server from {args.repo}; body {len(body) / MiB:.1f} MiB; budget {args.budget / MiB:.0f} MiB (if supported)")
        print("| concurrent | 200 | 503 | other | peak RSS over warm | held after 1 s | peak per body byte sent | worst /healthz | s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in (int(v) for v in args.sizes.split(",")):
            r = burst(port, proc.pid, body, n)
            print(f"| {n} | {r['ok']} | {r['shed']} | {r['other']} | {r['peak_mib']:.0f} MiB | {r['after_mib']:.0f} MiB | "
                  f"{r['per_body_byte']:.2f} | {r['worst_healthz_ms']:.0f} ms | {r['seconds']:.1f} |")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
