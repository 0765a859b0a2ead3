"""Start the real service (`python -m service`) on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(**settings):
    port = free_port()
    env = dict(os.environ, SURROGATE_HOST="127.0.0.1", SURROGATE_PORT=str(port), SURROGATE_WARMUP_MAX_ELEMENTS="4096")
    env.update({f"SURROGATE_{k.upper()}": str(v) for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the gRPC server's host:port, where the settings give it one (the tests' default is 0: off)
    proc.grpc_address = f"127.0.0.1:{settings['grpc_port']}" if settings.get("grpc_port") else None
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=base, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {proc.stdout.read()}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def npy(a) -> bytes:
    """``a`` as the bytes of a ``.npy`` file."""
    import io

    import numpy as np

    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def proc_status_bytes(pid: int, key: str) -> int:
    """A size from ``/proc/<pid>/status`` in bytes (``VmRSS``, ``VmHWM``, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key}")


def rss_bytes(pid: int) -> int:
    return proc_status_bytes(pid, "VmRSS")


def _get(port: int, path: str) -> bytes:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        return c.getresponse().read()
    finally:
        c.close()


def info(port: int) -> dict:
    """``GET /v1/info`` of the server on ``port``."""
    import json

    return json.loads(_get(port, "/v1/info"))


def metric(port: int, name: str) -> float:
    """The sum of the ``/metrics`` samples whose line starts with ``name`` (labels included)."""
    text = _get(port, "/metrics").decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
