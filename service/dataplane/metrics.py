"""Prometheus metrics, served at ``GET /metrics`` (``generate_latest(metrics.registry)``).

Two implementations behind one interface (``observe_request``, ``reject``, ``count_elements``,
``on_batch``, ``in_flight.inc()/dec()``, ``device_failures.inc()``, ``registry``):

- **One process** (the default): every request updates plain Python numbers (an int per label set,
  a list of per-bucket counts per histogram, the bucket found by ``bisect``), without the lock that
  each prometheus-client value takes; a collector turns them into the usual metric families when
  ``/metrics`` is scraped. The text is what prometheus-client's own Counter, Gauge and Histogram
  would write (names, labels, HELP and TYPE, ``_bucket``/``_count``/``_sum``/``_created``). All
  updates come from the event loop's thread.
- **Several worker processes** (``PROMETHEUS_MULTIPROC_DIR`` set, as ``python -m service
  --workers N`` does): prometheus-client's multiprocess mode. Every worker writes its values to
  files in that directory, and a scrape, whichever worker answers it, reads them all, so one scrape
  sees the whole server. The engine's statistics (compilations, device calls, compiled variants)
  and the queue depth, which live in each worker, are published into those files after each
  batch, each request and each scrape. Counters and histograms add up over the workers (dead ones
  included), ``surrogate_requests_in_flight``, ``surrogate_queue_depth`` and
  ``surrogate_compiled_variants`` are summed over the live workers (``livesum``: the parent drops a
  dead worker's files of these, ``forget_dead_workers``, when it finds the worker gone); there are no
  ``_created`` series in this mode.
"""

from __future__ import annotations

import os
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

import surrogate_core as core

__all__ = ["Metrics", "forget_dead_workers", "multiprocess_dir"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_ELEMENT_BUCKETS = tuple(4**k for k in range(1, 13))

# name, help (and label names) of every metric, in the order they are written
REQUESTS = ("surrogate_requests", "HTTP requests by endpoint, protocol and status.", ("endpoint", "protocol", "status"))
LATENCY = ("surrogate_request_duration_seconds", "Request latency by endpoint.", ("endpoint", "protocol"))
IN_FLIGHT = ("surrogate_requests_in_flight", "Compute requests being handled.")
ELEMENTS = ("surrogate_elements", "Result elements computed, by endpoint.", ("endpoint",))
BATCH_REQUESTS = ("surrogate_batch_requests", "Requests fused into one engine call.")
BATCH_ELEMENTS = ("surrogate_batch_elements", "Elements in one engine call.")
BATCH_SECONDS = ("surrogate_batch_seconds", "Engine call time.")
REJECTIONS = ("surrogate_rejections", "Requests refused by a limit, by reason.", ("reason",))
DEVICE_FAILURES = ("surrogate_device_failures", "Engine calls that failed.")
COMPILATIONS = ("surrogate_compilations", "XLA compilations (bounded by the size buckets).")
COMPILE_SECONDS = ("surrogate_compile_seconds", "Seconds spent compiling.")
EVICTIONS = ("surrogate_compile_evictions", "Compiled variants dropped from the full cache (least recently used).")
DEVICE_CALLS = ("surrogate_device_calls", "Compiled calls to the device.")
JOBS = ("surrogate_jobs", "Jobs evaluated.")
PADDED = ("surrogate_padded_elements", "Elements computed including bucket padding.")
VARIANTS = (
    "surrogate_compiled_variants", "Compiled variants per op, surrogate and dtype.", ("op", "surrogate", "dtype")
)
QUEUE_DEPTH = ("surrogate_queue_depth", "Requests submitted to the batcher and not yet answered.")
DEVICE_INFO = ("surrogate_device_info", "The device the core computes on.", ("platform", "kind", "jax_version"))

#: engine statistics exported as counters: (metric, attribute of ``engine.stats``)
_ENGINE_COUNTERS = (
    (COMPILATIONS, "compilations"),
    (COMPILE_SECONDS, "compile_seconds"),
    (EVICTIONS, "evictions"),
    (DEVICE_CALLS, "device_calls"),
    (JOBS, "jobs"),
    (PADDED, "padded_elements"),
)


#: a live-only gauge's file in the multiprocess directory (``multiprocess_mode="livesum"``), by process id
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, if this process is in it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _created_series() -> bool:
    import prometheus_client.metrics as pm

    return bool(getattr(pm, "_use_created", True))


class _DeviceInfo(Collector):
    def collect(self) -> Iterator[Metric]:
        info = core.device_info()
        d = GaugeMetricFamily(DEVICE_INFO[0], DEVICE_INFO[1], labels=DEVICE_INFO[2])
        d.add_metric([info["platform"], str(info["device_kind"]), info["jax_version"]], 1)
        yield d


class Metrics:
    """The service's metrics; ``Metrics(engine, depth)`` is the one-process or the multiprocess
    implementation, by ``multiprocess_dir()``. ``depth()`` is the batcher's queue depth."""

    registry: CollectorRegistry
    in_flight: Any  # .inc() / .dec()
    device_failures: Any  # .inc()

    def __new__(cls, engine: core.Engine, depth: Callable[[], int]) -> Metrics:
        if cls is Metrics:
            cls = SharedMetrics if multiprocess_dir() else LocalMetrics
        return object.__new__(cls)

    def observe_request(self, endpoint: str, protocol: str, status: int, seconds: float) -> None:
        raise NotImplementedError

    def reject(self, reason: str) -> None:
        raise NotImplementedError

    def count_elements(self, endpoint: str, n: int) -> None:
        raise NotImplementedError

    def on_batch(self, requests: int, elements: int, seconds: float) -> None:
        raise NotImplementedError


# -- one process -----------------------------------------------------------------------------------

class _Value:
    """A counter or gauge value without a lock (updated from one thread)."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value: int | float = 0
        self.created = time.time()

    def inc(self, n: int | float = 1) -> None:
        self.value += n

    def dec(self, n: int | float = 1) -> None:
        self.value -= n


class _Hist:
    """A histogram's per-bucket counts (not cumulative; the last is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1  # le: v <= bound
        self.sum += v


class LocalMetrics(Metrics, Collector):
    """Plain-Python accumulation, exported by ``collect`` at scrape time."""

    def __init__(self, engine: core.Engine, depth: Callable[[], int]) -> None:
        self.engine = engine
        self.depth = depth
        self._requests: dict[tuple[str, str, int], _Value] = {}
        self._latency: dict[tuple[str, str], _Hist] = {}
        self.in_flight = _Value()
        self._elements: dict[str, _Value] = {}
        self._batch_requests = _Hist(tuple(float(b) for b in BATCH_REQUEST_BUCKETS))
        self._batch_elements = _Hist(tuple(float(b) for b in BATCH_ELEMENT_BUCKETS))
        self._batch_seconds = _Hist(LATENCY_BUCKETS)
        self._rejections: dict[str, _Value] = {}
        self.device_failures = _Value()
        self._latency_bounds = LATENCY_BUCKETS
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.registry.register(_EngineCollector(engine, depth))
        self.registry.register(_DeviceInfo())

    # -- updates (the request path) --------------------------------------------------------------
    def observe_request(self, endpoint: str, protocol: str, status: int, seconds: float) -> None:
        key = (endpoint, protocol, status)
        r = self._requests.get(key)
        if r is None:
            r = self._requests[key] = _Value()
        r.value += 1
        h = self._latency.get(key[:2])
        if h is None:
            h = self._latency[key[:2]] = _Hist(self._latency_bounds)
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.sum += seconds

    def reject(self, reason: str) -> None:
        r = self._rejections.get(reason)
        if r is None:
            r = self._rejections[reason] = _Value()
        r.value += 1

    def count_elements(self, endpoint: str, n: int) -> None:
        e = self._elements.get(endpoint)
        if e is None:
            e = self._elements[endpoint] = _Value()
        e.value += n

    def on_batch(self, requests: int, elements: int, seconds: float) -> None:
        self._batch_requests.observe(requests)
        self._batch_elements.observe(elements)
        self._batch_seconds.observe(seconds)

    # -- the scrape ----------------------------------------------------------------------------------
    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing to check at registration: the names are this module's own

    def collect(self) -> Iterator[Metric]:
        created = _created_series()
        yield _counter(REQUESTS, {(e, p, str(s)): v for (e, p, s), v in list(self._requests.items())}, created)
        yield _histogram(LATENCY, dict(list(self._latency.items())), created)
        g = GaugeMetricFamily(IN_FLIGHT[0], IN_FLIGHT[1])
        g.add_metric([], self.in_flight.value)
        yield g
        yield _counter(ELEMENTS, {(e,): v for e, v in list(self._elements.items())}, created)
        yield _histogram(BATCH_REQUESTS + ((),), {(): self._batch_requests}, created)
        yield _histogram(BATCH_ELEMENTS + ((),), {(): self._batch_elements}, created)
        yield _histogram(BATCH_SECONDS + ((),), {(): self._batch_seconds}, created)
        yield _counter(REJECTIONS, {(r,): v for r, v in list(self._rejections.items())}, created)
        yield _counter(DEVICE_FAILURES + ((),), {(): self.device_failures}, created)


def _counter(spec: tuple[Any, ...], values: dict[tuple[str, ...], _Value], created: bool) -> Metric:
    name, doc, labels = spec
    c = CounterMetricFamily(name, doc, labels=labels)
    for key, v in values.items():
        c.add_metric(list(key), v.value, created=v.created if created else None)
    return c


def _histogram(spec: tuple[Any, ...], values: dict[tuple[str, ...], _Hist], created: bool) -> Metric:
    name, doc, labels = spec
    h = HistogramMetricFamily(name, doc, labels=labels)
    for key, hist in values.items():
        acc = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip(hist.bounds, hist.counts, strict=False):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        buckets.append(("+Inf", acc + hist.counts[-1]))
        h.add_metric(list(key), buckets, hist.sum)
        if created:
            h.samples.append(Sample(name + "_created", dict(zip(labels, key, strict=True)), hist.created, None))
    return h


class _EngineCollector(Collector):
    """The engine's statistics and the queue depth, read at scrape time (one process)."""

    def __init__(self, engine: core.Engine, depth: Callable[[], int]) -> None:
        self.engine = engine
        self.depth = depth

    def collect(self) -> Iterator[Metric]:
        st = self.engine.stats
        for (name, doc), attr in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(st, attr))
        v = GaugeMetricFamily(VARIANTS[0], VARIANTS[1], labels=VARIANTS[2])
        for (op, sur, dt), n in sorted(st.variants.items()):
            v.add_metric([op, sur, dt], n)
        yield v
        yield GaugeMetricFamily(QUEUE_DEPTH[0], QUEUE_DEPTH[1], value=self.depth())


# -- several processes -----------------------------------------------------------------------------

class SharedMetrics(Metrics):
    """prometheus-client's multiprocess mode: values in files shared by the workers."""

    def __init__(self, engine: core.Engine, depth: Callable[[], int]) -> None:
        from prometheus_client import multiprocess

        self.engine = engine
        self.depth = depth
        # registry=None: the values live in the multiprocess files; the scrape reads those
        self.requests = Counter(*REQUESTS[:2], REQUESTS[2], registry=None)
        self.latency = Histogram(*LATENCY[:2], LATENCY[2], buckets=LATENCY_BUCKETS, registry=None)
        self.in_flight = Gauge(*IN_FLIGHT, registry=None, multiprocess_mode="livesum")
        self.elements = Counter(*ELEMENTS[:2], ELEMENTS[2], registry=None)
        self.batch_requests = Histogram(*BATCH_REQUESTS, buckets=BATCH_REQUEST_BUCKETS, registry=None)
        self.batch_elements = Histogram(*BATCH_ELEMENTS, buckets=BATCH_ELEMENT_BUCKETS, registry=None)
        self.batch_seconds = Histogram(*BATCH_SECONDS, buckets=LATENCY_BUCKETS, registry=None)
        self.rejections = Counter(*REJECTIONS[:2], REJECTIONS[2], registry=None)
        self.device_failures = Counter(*DEVICE_FAILURES, registry=None)
        self._engine_counters = [(Counter(name, doc, registry=None), attr) for (name, doc), attr in _ENGINE_COUNTERS]
        self._published = {attr: 0.0 for _, attr in _ENGINE_COUNTERS}
        self._variants = Gauge(*VARIANTS[:2], VARIANTS[2], registry=None, multiprocess_mode="livesum")
        self._variant_keys: set[tuple[str, str, str]] = set()
        self._queue_depth = Gauge(*QUEUE_DEPTH, registry=None, multiprocess_mode="livesum")
        self._lock = threading.Lock()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Publish(self))  # first: collectors are read in the order registered
        multiprocess.MultiProcessCollector(self.registry)
        self.registry.register(_DeviceInfo())

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, endpoint: str, protocol: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, protocol, str(status)).inc()
        self._child(self.latency, endpoint, protocol).observe(seconds)
        self.publish()

    def reject(self, reason: str) -> None:
        self._child(self.rejections, reason).inc()

    def count_elements(self, endpoint: str, n: int) -> None:
        self._child(self.elements, endpoint).inc(n)

    def on_batch(self, requests: int, elements: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_elements.observe(elements)
        self.batch_seconds.observe(seconds)
        self.publish()

    def publish(self) -> None:
        """Write this worker's engine statistics and queue depth into the shared files (the
        counters by what they grew since the last time)."""
        st = self.engine.stats
        with self._lock:
            for counter, attr in self._engine_counters:
                now = float(getattr(st, attr))
                grown = now - self._published[attr]
                if grown > 0:
                    counter.inc(grown)
                    self._published[attr] = now
            variants = dict(st.variants)
            for key in self._variant_keys - set(variants):
                self._child(self._variants, *key).set(0)  # evicted from the compile cache
            for key, n in variants.items():
                self._child(self._variants, *key).set(n)
            self._variant_keys = set(variants)
            self._queue_depth.set(self.depth())


class _Publish(Collector):
    """A scrape first publishes the answering worker's own engine statistics, so that they are
    current in the files the multiprocess collector then reads."""

    def __init__(self, metrics: SharedMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self.metrics.publish()
        return iter(())


def forget_dead_workers(live: set[int]) -> None:
    """In the parent of several workers: drop the live-only gauges (``surrogate_requests_in_flight``,
    ``surrogate_queue_depth``, ``surrogate_compiled_variants``) of every worker whose files are in
    the multiprocess directory but whose process id is not in ``live``: prometheus-client's
    ``mark_process_dead``, so that a scrape no longer adds up what a dead worker last held. Its
    counters and histograms stay (they count what it did)."""
    directory = multiprocess_dir()
    if directory is None:
        return
    from prometheus_client import multiprocess

    try:
        names = os.listdir(directory)
    except OSError:
        return
    dead = set()
    for name in names:
        m = _LIVE_GAUGE_FILE.fullmatch(name)
        if m is not None and int(m.group(1)) not in live:
            dead.add(int(m.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
