"""Memory and probe latency under heavy load: bursts of 1, 8 and 48 concurrent 57 MiB `.npy` gradient
requests against a real server, with the peak resident memory (VmHWM after a reset) over the warm
resident size, the bytes held per body byte, the statuses and the worst `/healthz` round trip.

Then the ways memory could escape the budget, each with the peak resident growth against the most
the budget had reserved meanwhile (``in_use`` of ``/v1/info``, polled with the probe):

1. refused large bodies: JSON bodies ending in ``null`` to ``/v1/grad`` (422) and ``/v2`` (400), and
   ``"dtype": "aaa..."`` bodies (422), one after another (held after 1 s: what the refusals kept);
2. a zero-size ``.npy`` answered as JSON: shape ``(16777216, 0)`` to ``/v1/grad``;
3. 16 connections that send only the head of a 64 MiB ``.npy`` POST, then a normal request;
4. 8 large ``dtype`` values on sockets that never read their refusal;
5. 8 concurrent ``/v2`` requests with a large ``id`` (``Accept-Encoding: gzip``).

    python bench/hostile.py [--repo PATH] [--budget BYTES] [--sizes 1,8,48] [--cases bursts,escapes]
                            [--scale 1.0] [--repeat 20]

``--repo`` serves the service from another checkout (to compare with an earlier version); ``--scale``
multiplies the escape cases' sizes (0.25 for a short run), ``--repeat`` is the number of refused
bodies of each kind in case 1.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
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


def info(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/v1/info")
    doc = json.loads(c.getresponse().read())
    c.close()
    return doc


def request(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", path, body, headers)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def raw(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A connection that sends ``head`` (and ``body``) and never reads."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(head.encode() + body)
    return s


def null_array(size: int) -> bytes:
    return b"[" + b"0.5," * max(1, (size - 8) // 4) + b"null]"


def escape(port: int, pid: int, name: str, run) -> None:
    """One escape case: ``run()`` returns the statuses seen; printed with the peak resident growth over
    the warm size, what is still held 1 s after, the largest reservation seen and the worst probe."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    base = status_kb(pid, "VmRSS")
    seen = {"worst": 0.0, "reserved": 0}
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                c.request("GET", "/healthz")
                c.getresponse().read()
                c.close()
                seen["worst"] = max(seen["worst"], time.perf_counter() - t)
                seen["reserved"] = max(seen["reserved"], info(port)["memory"]["in_use"])
            except OSError:
                pass
            stop.wait(0.02)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    t0 = time.perf_counter()
    statuses = run()
    took = time.perf_counter() - t0
    stop.set()
    th.join()
    peak = status_kb(pid, "VmHWM") - base
    time.sleep(1)
    held = status_kb(pid, "VmRSS") - base
    counts = ", ".join(f"{n} x {s}" for s, n in sorted(Counter(statuses).items(), key=lambda kv: str(kv[0])))
    print(f"| {name} | {counts} | {peak / MiB:.0f} MiB | {held / MiB:.0f} MiB | {seen['reserved'] / MiB:.0f} MiB | "
          f"{seen['worst'] * 1e3:.0f} ms | {took:.1f} |")


def escapes(port: int, pid: int, scale: float, repeat: int) -> None:
    json_ = {"content-type": "application/json"}
    size = int(16 * MiB * scale)
    print(f"\nmemory escapes (scale {scale}); budget {info(port)['memory']['budget'] / MiB:.0f} MiB")
    print("| case | statuses | peak RSS over warm | held after 1 s | most reserved | worst /healthz | s |")
    print("|---|---|---|---|---|---|---|")

    v1 = b'{"x":' + null_array(size) + b"}"
    data = null_array(size)
    v2 = b'{"inputs":[{"name":"x","shape":[%d],"datatype":"FP64","data":' % (data.count(b",") + 1) + data + b"}]}"
    dtype = b'{"x":[1.0],"dtype":"' + b"a" * size + b'"}'
    for label, path, body in (("1. refused: /v1 null", "/v1/grad", v1),
                              ("1. refused: /v2 null", "/v2/models/sigmoid/infer", v2),
                              ("1. refused: /v1 dtype", "/v1/grad", dtype)):
        escape(port, pid, f"{label}, {repeat} x {len(body) / MiB:.0f} MiB",
               lambda path=path, body=body: [request(port, path, body, json_) for _ in range(repeat)])

    from numpy.lib import format as npformat

    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (16777216, 0)})
    escape(port, pid, "2. (16777216, 0) .npy answered as JSON", lambda: [request(
        port, "/v1/grad", header.getvalue(), {"content-type": "application/x-npy", "accept": "application/json"})])

    def heads():
        declared = int(64 * MiB * scale)
        socks = [raw(port, f"POST /v1/grad HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-npy\r\n"
                           f"content-length: {declared}\r\n\r\n") for _ in range(16)]
        time.sleep(0.5)
        try:
            return [request(port, "/v1/grad", b'{"x":[0.5]}', json_)]
        finally:
            for s in socks:
                s.close()

    escape(port, pid, f"3. 16 heads of {64 * scale:g} MiB bodies, then a request", heads)

    def unread_dtypes():
        big = b'{"x":[1.0],"dtype":"' + b"a" * int(60 * MiB * scale) + b'"}'
        socks = [raw(port, f"POST /v1/grad HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                           f"content-length: {len(big)}\r\n\r\n", big) for _ in range(8)]
        time.sleep(2)
        try:
            return [request(port, "/v1/grad", b'{"x":[0.5]}', json_)]
        finally:
            for s in socks:
                s.close()

    escape(port, pid, f"4. 8 x {60 * scale:g} MiB dtype values, unread (then a request)", unread_dtypes)

    rid = (b'{"id":"' + b"i" * int(56 * MiB * scale)
           + b'","inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[0.5]}]}')
    with ThreadPoolExecutor(8) as pool:
        escape(port, pid, f"5. 8 x {56 * scale:g} MiB ids, gzip", lambda: list(pool.map(lambda _: request(
            port, "/v2/models/sigmoid/infer", rid, {**json_, "accept-encoding": "gzip"}), range(8))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=str(ROOT))
    p.add_argument("--budget", type=int, default=2 << 30)
    p.add_argument("--sizes", default="1,8,48")
    p.add_argument("--cases", default="bursts,escapes")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    cases = set(args.cases.split(","))
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
        if "bursts" in cases:
            x = np.linspace(-2, 2, 15_000_000, dtype=np.float32)
            buf = io.BytesIO()
            np.save(buf, x)
            body = buf.getvalue()
            post(port, body)  # compile the bucket first
            print(f"server from {args.repo}; body {len(body) / MiB:.1f} MiB; budget {args.budget / MiB:.0f} MiB "
                  "(if supported)")
            print("| concurrent | 200 | 503 | other | peak RSS over warm | held after 1 s | peak per body byte sent "
                  "| worst /healthz | s |")
            print("|---|---|---|---|---|---|---|---|---|")
            for n in (int(v) for v in args.sizes.split(",")):
                r = burst(port, proc.pid, body, n)
                print(f"| {n} | {r['ok']} | {r['shed']} | {r['other']} | {r['peak_mib']:.0f} MiB | "
                      f"{r['after_mib']:.0f} MiB | {r['per_body_byte']:.2f} | {r['worst_healthz_ms']:.0f} ms | "
                      f"{r['seconds']:.1f} |")
        if "escapes" in cases:
            escapes(port, proc.pid, args.scale, args.repeat)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
