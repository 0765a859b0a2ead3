"""Against a real server with two worker processes: one scrape of /metrics sees the whole server.

``python -m service --workers 2`` puts its workers in prometheus-client's multiprocess mode (a
directory of metric files made before they start, removed at exit), so that every scrape, whichever
worker answers it, counts every request, not the answering worker's share.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from liveserver import running_server
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 48
X = [-1.5, -0.5, 0.0, 0.25, 2.0]
GRAD = [0.0, 0.5, 1.0, 0.75, 0.0]  # piecewise_quadratic, alpha 1: max(0, 1 - |x|), by hand
LABELS = {"endpoint": "/v1/grad", "protocol": "v1", "status": "200"}


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    return None


def fresh(base: str, method: str, path: str, **kw) -> httpx.Response:
    """One request on a connection of its own, so that either worker may accept it."""
    with httpx.Client(base_url=base, timeout=60, headers={"connection": "close"}) as c:
        return c.request(method, path, **kw)


def worker_requests(directory: str, pid: int) -> float:
    """The /v1/grad requests one worker counted, from its own metric files alone."""
    with tempfile.TemporaryDirectory() as own:
        for f in Path(directory).glob(f"*_{pid}.db"):
            shutil.copy(f, own)
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=own)
        return reg.get_sample_value("surrogate_requests_total", LABELS) or 0.0


def test_every_scrape_counts_the_requests_of_both_workers():
    with running_server(workers=2) as (base, proc):
        workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        directory = workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
        assert workers[1].environ()["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert Path(directory).is_dir()
        # both workers serve (the one that was not asked for readiness may still be warming up)
        for _ in range(600):
            if all(fresh(base, "GET", "/readyz").status_code == 200 for _ in range(4)):
                break
            time.sleep(0.1)

        def one(i: int) -> None:
            r = fresh(base, "POST", "/v1/grad", json={"x": X})
            assert r.status_code == 200, r.text
            assert r.json()["grad"] == GRAD

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(N)))

        served = {w.pid: worker_requests(directory, w.pid) for w in workers}
        assert sum(served.values()) == N, served
        if min(served.values()) == 0:
            pytest.skip(f"the kernel gave every connection to one worker ({served}); nothing to add up")

        for _ in range(8):
            text = fresh(base, "GET", "/metrics").text
            assert sample(text, "surrogate_requests_total", LABELS) == N
            assert sample(text, "surrogate_request_duration_seconds_count",
                          {"endpoint": "/v1/grad", "protocol": "v1"}) == N
            assert sample(text, "surrogate_elements_total", {"endpoint": "grad"}) == N * len(X)
            assert sample(text, "surrogate_requests_in_flight") == 0
            assert sample(text, "surrogate_queue_depth") == 0
            # the engines' statistics are those of both workers: at least one device call per batch
            assert sample(text, "surrogate_device_calls_total") >= sample(text, "surrogate_batch_requests_count")
            assert sample(text, "surrogate_batch_requests_sum") == N

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not Path(directory).exists()  # the metric files go with the server


def workers_of(proc) -> list[psutil.Process]:
    """The live worker processes of the server ``proc``."""
    workers = []
    for p in psutil.Process(proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                workers.append(p)
        except psutil.Error:  # gone meanwhile
            pass
    return workers


def own_values(directory: str, pids: set[int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples that the metric files of the workers ``pids`` alone add up to: what a scrape
    must show when those are the live workers."""
    with tempfile.TemporaryDirectory() as own:
        for pid in pids:
            for f in Path(directory).glob(f"*_{pid}.db"):
                shutil.copy(f, own)
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=own)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in reg.collect() for s in m.samples}


def held_request(port: int) -> socket.socket:
    """A /v1/grad request whose body stops half-way: admitted, in flight, until it is cut."""
    body = json.dumps({"x": X}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/grad HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body[: len(body) // 2]))
    return s


def all_ready(base: str, proc, old: set[int], n: int = 2) -> list[psutil.Process]:
    """Wait for ``n`` workers, none of them in ``old``, each answering /readyz 200."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        workers = workers_of(proc)
        if len(workers) == n and not old & {w.pid for w in workers}:
            try:
                if all(fresh(base, "GET", "/readyz").status_code == 200 for _ in range(12)):
                    return workers
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the workers did not come back: {workers_of(proc)}")


def test_the_gauges_of_killed_workers_vanish_when_they_are_restarted():
    with running_server(workers=2) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        workers = all_ready(base, proc, set())
        directory = workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
        for _ in range(N):
            assert fresh(base, "POST", "/v1/grad", json={"x": X}).json()["grad"] == GRAD
        held = [held_request(port) for _ in range(3)]
        try:
            deadline = time.monotonic() + 30
            while sample(fresh(base, "GET", "/metrics").text, "surrogate_requests_in_flight") != len(held):
                assert time.monotonic() < deadline, "the held requests were not admitted"
                time.sleep(0.1)
            old = {w.pid for w in workers}
            before = own_values(directory, old)
            # the dead workers' values are in the files: each compiled variants, and between them
            # they held the requests in flight
            assert sum(v for (name, _), v in before.items() if name == "surrogate_compiled_variants") > 0
            assert before[("surrogate_requests_in_flight", ())] == len(held)
            for w in workers:
                w.send_signal(signal.SIGKILL)
        finally:
            for s in held:
                s.close()
        workers = all_ready(base, proc, old)
        live = {w.pid for w in workers}
        for _ in range(4):
            text = fresh(base, "GET", "/metrics").text
            # idle, after the scrape published its worker's statistics: the live workers' own values
            expected = own_values(directory, live)
            variants = {k: v for k, v in expected.items() if k[0] == "surrogate_compiled_variants"}
            assert sum(variants.values()) > 0, expected
            for (name, labels), value in variants.items():
                assert sample(text, name, dict(labels)) == value, (name, labels)
            assert sample(text, "surrogate_requests_in_flight") == 0
            assert sample(text, "surrogate_queue_depth") == 0
            # counters still count what the dead workers did
            assert sample(text, "surrogate_requests_total", LABELS) == N
