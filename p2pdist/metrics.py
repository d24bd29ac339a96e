"""The node daemon's Prometheus metrics (``GET /metrics`` on the local API).

Each daemon owns one :class:`NodeMetrics`, and with it its own
:class:`~prometheus_client.CollectorRegistry` (never the process-wide default one), so
several daemons in one process (the tests) count apart.  The code that moves bytes calls
the small ``record_*`` methods; what is cheaper to read than to count (active uploads and
downloads, the store's size) is read when Prometheus scrapes.

Metric names are listed in :data:`NODE_METRIC_NAMES` (the Grafana dashboard in
``deploy/grafana/`` is checked against them by a test); the README's Operations section
says what each one means.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .errors import P2PDistError
from .httpserver import Response

__all__ = [
    "NODE_METRIC_NAMES",
    "ByteSource",
    "NodeMetrics",
    "RejectReason",
    "metric_names",
    "metrics_response",
]

ByteSource = Literal["peer", "registry", "local"]
RejectReason = Literal["sha256", "length", "conflict", "scheduler"]

#: Task durations run from a second (a cached blob) to many minutes (a large layer on a
#: slow link).
_TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class NodeMetrics:
    """Every metric one daemon exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received_bytes = Counter(
            "p2pdist_received_bytes",
            "Bytes of blobs this node obtained, by where they came from (peer: pieces from "
            "other nodes; registry: back-to-source; local: already in the store)",
            ["source"],
            registry=r,
        )
        self.uploaded_bytes = Counter(
            "p2pdist_uploaded_bytes",
            "Bytes of pieces sent to other nodes (on the wire: zstd frames when compressed)",
            registry=r,
        )
        self.pieces_verified = Counter(
            "p2pdist_pieces_verified",
            "Pieces whose sha256 was checked and stored",
            registry=r,
        )
        self.pieces_rejected = Counter(
            "p2pdist_pieces_rejected",
            "Pieces refused: sha256 or length mismatch, conflict with a recorded hash, or "
            "rejected by the scheduler",
            ["reason"],
            registry=r,
        )
        self.task_duration = Histogram(
            "p2pdist_task_duration_seconds",
            "Time to make a blob complete on this node (a download), by result",
            ["result"],
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        self.proxy_requests = Counter(
            "p2pdist_proxy_requests",
            "Registry-proxy requests by HTTP status and cache result (hit: answered from "
            "this node's store or manifest cache)",
            ["code", "cache"],
            registry=r,
        )
        self.back_to_source = Counter(
            "p2pdist_back_to_source",
            "Requests sent to the origin registry or URL (each a range of pieces, or a whole blob)",
            registry=r,
        )
        self.scheduler_reachable = Gauge(
            "p2pdist_scheduler_reachable",
            "1 when the last exchange with the scheduler succeeded; 0 when it failed "
            "(degraded: blobs come from the registry and the local store) or there is none",
            registry=r,
        )
        self.active_uploads = Gauge(
            "p2pdist_active_uploads", "Uploads to peers in progress", registry=r
        )
        self.active_downloads = Gauge(
            "p2pdist_active_downloads", "Downloads (blobs being completed) in progress", registry=r
        )
        # Created (not counted) so that every series a dashboard uses exists from the start.
        for source in ("peer", "registry", "local"):
            self.received_bytes.labels(source)
        for reason in ("sha256", "length", "conflict", "scheduler"):
            self.pieces_rejected.labels(reason)
        for result in ("ok", "error"):
            self.task_duration.labels(result)

    # -- what the daemon's code calls ------------------------------------------------------

    def record_received(self, source: ByteSource, n: int) -> None:
        if n > 0:
            self.received_bytes.labels(source).inc(n)

    def record_uploaded(self, n: int) -> None:
        if n > 0:
            self.uploaded_bytes.inc(n)

    def record_back_to_source(self, requests: int) -> None:
        if requests > 0:
            self.back_to_source.inc(requests)

    # The store calls these (from worker threads: prometheus_client is thread-safe).
    def piece_verified(self) -> None:
        self.pieces_verified.inc()

    def piece_rejected(self, reason: RejectReason, n: int = 1) -> None:
        self.pieces_rejected.labels(reason).inc(n)

    def record_proxy(self, status: int, hit: bool) -> None:
        self.proxy_requests.labels(str(status), "hit" if hit else "miss").inc()

    def time_task(self) -> _TaskTimer:
        return _TaskTimer(self.task_duration)

    def watch(
        self,
        *,
        uploads: Callable[[], float],
        downloads: Callable[[], float],
        store: Callable[[], tuple[int, int]],
        scheduler: Callable[[], bool] = lambda: False,
    ) -> None:
        """Read these at scrape time: uploads and downloads in progress, the store's
        ``(blobs, bytes)`` (a directory scan: scrapes run in a worker thread), and whether
        the scheduler answered last time."""
        self.scheduler_reachable.set_function(lambda: 1.0 if scheduler() else 0.0)
        self.active_uploads.set_function(uploads)
        self.active_downloads.set_function(downloads)
        self.registry.register(_StoreCollector(store))


class _TaskTimer:
    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = time.monotonic()

    def done(self, ok: bool) -> None:
        self._histogram.labels("ok" if ok else "error").observe(time.monotonic() - self._started)


class _StoreCollector(Collector):
    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            blobs, size = self._read()
        except (OSError, P2PDistError):  # the store unreadable: /readyz says so
            return
        yield GaugeMetricFamily("p2pdist_store_blobs", "Complete blobs in the store", value=blobs)
        yield GaugeMetricFamily(
            "p2pdist_store_bytes", "Bytes of complete blobs in the store", value=size
        )

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("p2pdist_store_blobs", "Complete blobs in the store")
        yield GaugeMetricFamily("p2pdist_store_bytes", "Bytes of complete blobs in the store")


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exposes (``foo_total``, ``foo_bucket``, ...)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    return names


def _node_metric_names() -> frozenset[str]:
    m = NodeMetrics()
    m.watch(uploads=lambda: 0, downloads=lambda: 0, store=lambda: (0, 0))
    m.record_proxy(200, True)
    return frozenset(metric_names(m.registry))


NODE_METRIC_NAMES: frozenset[str] = _node_metric_names()
"""Every sample name a daemon's ``/metrics`` can hold."""


async def metrics_response(registries: Iterable[CollectorRegistry]) -> Response:
    """``GET /metrics``: the registries in Prometheus' text format (rendered in a worker
    thread: collectors may read the disk)."""

    def render() -> bytes:
        return b"".join(generate_latest(r) for r in registries)

    body = await trio.to_thread.run_sync(render)
    return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
