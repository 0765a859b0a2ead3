"""The pieces of the shutdown and of the workers' supervision, in-process: the listener that stops
completing handshakes before its last accept, and the dead workers' gauges that the parent drops."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from service.dataplane import metrics
from service.server import lifecycle


def test_a_listener_that_refuses_new_handshakes_keeps_its_queue_and_refuses_later_clients():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=5)  # in the queue, not accepted
        if not lifecycle._refuse_new_handshakes(listener):
            queued.close()
            pytest.skip("no socket filters here")
        # the connection queued before is still accepted, and works
        conn, _ = listener.accept()
        with queued, conn:
            queued.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        # a new client's SYN is dropped: no handshake completes into the queue
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.3)
        # a client that retries finds the listener closed: refused, not reset
        outcome = []

        def client():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
                outcome.append("connected")
            except OSError as exc:
                outcome.append(type(exc).__name__)

        t = threading.Thread(target=client)
        t.start()
        time.sleep(0.2)
        listener.close()
        t.join(timeout=15)
    assert outcome == ["ConnectionRefusedError"]


def write_gauge(directory: Path, mode: str, pid: int, name: str, value: float) -> None:
    """A gauge's value as worker ``pid`` writes it in prometheus-client's multiprocess mode."""
    d = MmapedDict(str(directory / f"gauge_{mode}_{pid}.db"))
    d.write_value(mmap_key(name, name, [], [], "help"), value, 0.0)
    d.close()


def write_counter(directory: Path, pid: int, name: str, value: float) -> None:
    d = MmapedDict(str(directory / f"counter_{pid}.db"))
    d.write_value(mmap_key(name, name + "_total", [], [], "help"), value, 0.0)
    d.close()


def scrape(directory: Path) -> dict[str, float]:
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(directory))
    return {s.name: s.value for m in reg.collect() for s in m.samples}


def test_the_parent_drops_the_live_gauges_of_dead_workers_and_keeps_their_counters(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for pid, in_flight, requests in ((101, 2, 5), (202, 3, 7), (303, 4, 11)):
        write_gauge(tmp_path, "livesum", pid, "surrogate_requests_in_flight", in_flight)
        write_counter(tmp_path, pid, "surrogate_requests", requests)
    assert scrape(tmp_path)["surrogate_requests_in_flight"] == 2 + 3 + 4
    metrics.forget_dead_workers({202})  # 101 and 303 died
    got = scrape(tmp_path)
    assert got["surrogate_requests_in_flight"] == 3
    assert got["surrogate_requests_total"] == 5 + 7 + 11
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_101.db", "counter_202.db", "counter_303.db", "gauge_livesum_202.db",
    ]
    metrics.forget_dead_workers({202})  # nothing more to drop
    assert scrape(tmp_path)["surrogate_requests_in_flight"] == 3


def test_without_a_multiprocess_directory_nothing_is_dropped(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    write_gauge(tmp_path, "livesum", 101, "surrogate_requests_in_flight", 1)
    metrics.forget_dead_workers(set())
    assert [p.name for p in tmp_path.iterdir()] == ["gauge_livesum_101.db"]
