"""Prometheus metrics (prometheus-client), one registry per app, served at ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import surrogate_core as core

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector(Collector):
    def __init__(self, engine: core.Engine, depth: Callable[[], int]) -> None:
        self.engine = engine
        self.depth = depth

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        st = self.engine.stats
        yield CounterMetricFamily("surrogate_compilations", "XLA compilations (bounded by the size buckets).", value=st.compilations)
        yield CounterMetricFamily("surrogate_compile_seconds", "Seconds spent compiling.", value=st.compile_seconds)
        yield CounterMetricFamily("surrogate_device_calls", "Compiled calls to the device.", value=st.device_calls)
        yield CounterMetricFamily("surrogate_jobs", "Jobs evaluated.", value=st.jobs)
        yield CounterMetricFamily("surrogate_padded_elements", "Elements computed including bucket padding.", value=st.padded_elements)
        v = GaugeMetricFamily("surrogate_compiled_variants", "Compiled variants per op, surrogate and dtype.", labels=["op", "surrogate", "dtype"])
        for (op, sur, dt), n in sorted(st.variants.items()):
            v.add_metric([op, sur, dt], n)
        yield v
        yield GaugeMetricFamily("surrogate_queue_depth", "Requests submitted to the batcher and not yet answered.", value=self.depth())
        info = core.device_info()
        d = GaugeMetricFamily("surrogate_device_info", "The device the core computes on.", labels=["platform", "kind", "jax_version"])
        d.add_metric([info["platform"], str(info["device_kind"]), info["jax_version"]], 1)
        yield d


class Metrics:
    def __init__(self, engine: core.Engine, depth: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "surrogate_requests", "HTTP requests by endpoint, protocol and status.", ["endpoint", "protocol", "status"], registry=r
        )
        self.latency = Histogram(
            "surrogate_request_duration_seconds", "Request latency by endpoint.", ["endpoint", "protocol"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("surrogate_requests_in_flight", "Compute requests being handled.", registry=r)
        self.elements = Counter("surrogate_elements", "Result elements computed, by endpoint.", ["endpoint"], registry=r)
        self.batch_requests = Histogram(
            "surrogate_batch_requests", "Requests fused into one engine call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_elements = Histogram(
            "surrogate_batch_elements", "Elements in one engine call.", buckets=tuple(4**k for k in range(1, 13)), registry=r
        )
        self.batch_seconds = Histogram("surrogate_batch_seconds", "Engine call time.", buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter(
            "surrogate_rejections", "Requests refused by a limit, by reason.", ["reason"], registry=r
        )
        self.device_failures = Counter("surrogate_device_failures", "Engine calls that failed.", registry=r)
        r.register(_EngineCollector(engine, depth))

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: labels() costs more than the increment itself."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, endpoint: str, protocol: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, protocol, str(status)).inc()
        self._child(self.latency, endpoint, protocol).observe(seconds)

    def reject(self, reason: str) -> None:
        self._child(self.rejections, reason).inc()

    def count_elements(self, endpoint: str, n: int) -> None:
        self._child(self.elements, endpoint).inc(n)

    def on_batch(self, requests: int, elements: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_elements.observe(elements)
        self.batch_seconds.observe(seconds)
