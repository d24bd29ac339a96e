"""Prometheus metrics: the daemon's and the scheduler's ``/metrics`` after a real transfer.

A real ``docker-registry``, a scheduler and two daemons in this trio run, on loopback: node
A fetches a blob (from the registry), node B fetches it through its registry proxy (from
A), each ``/metrics`` is scraped over HTTP and parsed with prometheus_client's own parser,
and the counters must add up to the blob: bytes by source, pieces verified, uploads,
proxy requests by status and cache result, the scheduler's hosts, tasks and decisions.
Unit tests (no sockets) cover the pieces of counting the transfer cannot reach (rejected
pieces) and the Grafana dashboard's metric names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.errors import PieceMismatch
from p2pdist.httpserver import ServerInfo
from p2pdist.metrics import NODE_METRIC_NAMES, NodeMetrics
from p2pdist.pieces import PiecePlan
from p2pdist.store import PieceStore
from scheduler import Assignment, PieceSource, Rejected, Unknown
from scheduler._metrics import SCHEDULER_METRIC_NAMES, SchedulerMetrics
from scheduler.service import serve_scheduler
from tests.helpers import NO_DOCKER_CONFIG, blob_stored, requires_registry

PIECE = 256 * 1024
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "p2pdist-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a ``/metrics`` answer: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported: {sorted(k[0] for k in samples)}"
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(client: httpx.AsyncClient, url: str) -> Samples:
    r = await client.get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def _node_config(root: Path, name: str, sched: str) -> NodeConfig:
    return NodeConfig(
        data_dir=root / name,
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        piece_size=PIECE,
        host_id=name,
        docker_config=NO_DOCKER_CONFIG,
        schedulers=(sched,),
    )


@dataclass
class Swarm:
    scheduler: ServerInfo
    a: DaemonInfo
    b: DaemonInfo


@asynccontextmanager
async def swarm(root: Path) -> AsyncIterator[Swarm]:
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        async with (
            open_daemon(_node_config(root, "node-a", sched.url)) as a,
            open_daemon(_node_config(root, "node-b", sched.url)) as b,
        ):
            yield Swarm(sched, a, b)
        nursery.cancel_scope.cancel()


@requires_registry
async def test_metrics_after_a_transfer_add_up_to_the_blob(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    data = os.urandom(12 * PIECE + 1234)  # incompressible: pieces travel raw (no zstd)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await trio.to_thread.run_sync(partial(push_blob, registry.url, "metrics/blob", data))
    count = PiecePlan(len(data), PIECE).count
    async with swarm(tmp_path) as s, httpx.AsyncClient(trust_env=False, timeout=30) as c:
        # Node A: through its local API, from the registry (nobody else has it).
        q = {"registry": registry.host, "repository": "metrics/blob"}
        r = await c.get(f"{s.a.api_url}/api/v1/blobs/{digest}", params=q)
        assert r.status_code == 200 and r.content == data
        assert await blob_stored(s.a.node, Digest.parse(digest)) is not None
        # Node B: through its registry proxy (a miss), from A; then again (a hit), and a
        # blob nobody has (404).
        proxied = f"{s.b.proxy_url}/v2/metrics/blob/blobs/{digest}"
        r = await c.get(proxied, params={"ns": registry.host})
        assert r.status_code == 200 and r.content == data
        assert await blob_stored(s.b.node, Digest.parse(digest)) is not None
        r = await c.get(proxied, params={"ns": registry.host})
        assert r.status_code == 200 and r.content == data
        missing = f"{s.b.proxy_url}/v2/metrics/blob/blobs/sha256:{'0' * 64}"
        assert (await c.get(missing, params={"ns": registry.host})).status_code == 404
        # Node A again: the blob is in its store (local bytes).
        r = await c.get(f"{s.a.api_url}/api/v1/blobs/{digest}", params=q)
        assert r.status_code == 200 and r.content == data

        ma = await scrape(c, s.a.api_url)
        mb = await scrape(c, s.b.api_url)
        ms = await scrape(c, s.scheduler.url)
        b_stats = (await c.get(f"{s.b.api_url}/api/v1/blobs/{digest}/stats")).json()

    size = len(data)
    print(f"\nnode B's stats: {b_stats}")
    # A: every byte from the registry once, then from its store; every piece verified.
    assert value(ma, "p2pdist_received_bytes_total", source="registry") == size
    assert value(ma, "p2pdist_received_bytes_total", source="peer") == 0
    assert value(ma, "p2pdist_received_bytes_total", source="local") == size
    assert value(ma, "p2pdist_pieces_verified_total") == count
    assert value(ma, "p2pdist_back_to_source_total") >= 1
    assert value(ma, "p2pdist_task_duration_seconds_count", result="ok") == 2
    assert value(ma, "p2pdist_store_blobs") == 1
    assert value(ma, "p2pdist_store_bytes") == size
    # B: the bytes from peers (A), as its own stats say, the rest from the registry.
    peer = value(mb, "p2pdist_received_bytes_total", source="peer")
    from_registry = value(mb, "p2pdist_received_bytes_total", source="registry")
    assert peer == b_stats["from_peers"] and from_registry == b_stats["from_source"]
    assert peer + from_registry == size
    assert peer >= size - 2 * PIECE, "B should have fetched (nearly) everything from A"
    assert value(mb, "p2pdist_pieces_verified_total") == count
    assert total(mb, "p2pdist_pieces_rejected_total") == 0
    # What A uploaded is what B received from peers (raw pieces: random data).
    assert value(ma, "p2pdist_uploaded_bytes_total") == peer
    assert value(mb, "p2pdist_uploaded_bytes_total") == 0
    # The proxy: a miss then a hit, both 200, and the 404; none on A (separate registries).
    assert value(mb, "p2pdist_proxy_requests_total", code="200", cache="miss") == 1
    assert value(mb, "p2pdist_proxy_requests_total", code="200", cache="hit") == 1
    assert value(mb, "p2pdist_proxy_requests_total", code="404", cache="miss") == 1
    assert total(ma, "p2pdist_proxy_requests_total") == 0
    for m in (ma, mb):
        assert value(m, "p2pdist_active_downloads") == 0
        assert value(m, "p2pdist_active_uploads") == 0
        assert value(m, "p2pdist_scheduler_reachable") == 1
    # The scheduler: both hosts, the one task, and its decisions.
    assert value(ms, "p2pdist_scheduler_hosts") == 2
    assert value(ms, "p2pdist_scheduler_tasks") == 1
    assert value(ms, "p2pdist_scheduler_decisions_total", kind="source") >= count - peer // PIECE
    assert value(ms, "p2pdist_scheduler_decisions_total", kind="parent") >= peer // PIECE
    assert value(ms, "p2pdist_scheduler_events_total", type="RegisterHost") >= 2
    assert value(ms, "p2pdist_scheduler_decision_duration_seconds_count", type="Assign") >= 2


async def test_metrics_endpoint_refuses_other_methods(tmp_path: Path) -> None:
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen=None,
        host_id="m",
    )
    async with open_daemon(config) as info, httpx.AsyncClient(trust_env=False) as c:
        r = await c.post(f"{info.api_url}/metrics", content=b"x")
        assert r.status_code == 405
        assert r.json()["errors"][0]["code"]
        # An idle daemon exports every series from the start (zeros), no scheduler: 0.
        m = parse_metrics((await c.get(f"{info.api_url}/metrics")).text)
        assert value(m, "p2pdist_received_bytes_total", source="peer") == 0
        assert value(m, "p2pdist_scheduler_reachable") == 0
        assert value(m, "p2pdist_store_blobs") == 0


# -- unit tests (no sockets) ------------------------------------------------------------------


def test_store_counts_verified_and_rejected_pieces(tmp_path: Path) -> None:
    data = os.urandom(3 * PIECE)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    metrics = NodeMetrics()
    other = NodeMetrics()
    with PieceStore(tmp_path, observer=metrics) as store:
        task = store.open_task(digest, len(data), PIECE)
        plan = task.plan
        good = hashlib.sha256(data[: plan.range(0)[1]]).hexdigest()
        with pytest.raises(PieceMismatch):
            task.write_piece(0, b"x" * PIECE, good)  # wrong bytes
        with pytest.raises(PieceMismatch):
            task.write_piece(0, b"short", good)  # wrong length
        task.write_piece(0, data[: plan.range(0)[1]], good)
        with pytest.raises(PieceMismatch):
            task.write_piece(0, data[: plan.range(0)[1]], "0" * 64)  # conflicts with record
        task.write_piece(1, data[slice(*plan.range(1))])
        task.close()
    m = metrics.registry
    assert m.get_sample_value("p2pdist_pieces_verified_total") == 2
    for reason in ("sha256", "length", "conflict"):
        assert m.get_sample_value("p2pdist_pieces_rejected_total", {"reason": reason}) == 1
    assert m.get_sample_value("p2pdist_pieces_rejected_total", {"reason": "scheduler"}) == 0
    # Another daemon's metrics (its own registry) saw nothing.
    assert other.registry.get_sample_value("p2pdist_pieces_verified_total") == 0


def test_scheduler_decisions_by_kind() -> None:
    m = SchedulerMetrics()
    peers = [PieceSource(i, "p", "127.0.0.1:1") for i in range(3)]
    m.record("Assign", Assignment({}, peers, [7, 8], 0.0), 0.001)
    m.record("Assign", Assignment(retry_after=0.1), 0.0001)
    m.record("Assign", Assignment(done=True), 0.0001)
    m.record("StartTask", Rejected("plan_conflict", "no"), 0.0001)
    m.record("Heartbeat", Unknown("host"), 0.0001)
    r = m.registry
    got = {
        kind: r.get_sample_value("p2pdist_scheduler_decisions_total", {"kind": kind})
        for kind in ("parent", "source", "wait", "done", "rejected", "unknown")
    }
    assert got == {"parent": 3, "source": 2, "wait": 1, "done": 1, "rejected": 1, "unknown": 1}
    assert r.get_sample_value("p2pdist_scheduler_events_total", {"type": "Assign"}) == 3
    latency = "p2pdist_scheduler_decision_duration_seconds_count"
    assert r.get_sample_value(latency, {"type": "Assign"}) == 3


def test_metric_names_follow_the_conventions() -> None:
    for name in NODE_METRIC_NAMES | SCHEDULER_METRIC_NAMES:
        assert name.startswith("p2pdist_"), name
    counters = {n for n in NODE_METRIC_NAMES | SCHEDULER_METRIC_NAMES if n.endswith("_total")}
    assert "p2pdist_received_bytes_total" in counters
    assert "p2pdist_uploaded_bytes_total" in counters
    assert "p2pdist_task_duration_seconds_bucket" in NODE_METRIC_NAMES
    assert "p2pdist_scheduler_decision_duration_seconds_bucket" in SCHEDULER_METRIC_NAMES


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for key, v in obj.items():
                if key == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(dashboard)
    assert len(exprs) >= 10, "the dashboard should chart the metrics"
    used = {name for e in exprs for name in re.findall(r"\bp2pdist_[a-z0-9_]+", e)}
    known = NODE_METRIC_NAMES | SCHEDULER_METRIC_NAMES
    assert used, exprs
    assert used <= known, f"not exported by any metric: {sorted(used - known)}"
    # Every metric is on the dashboard (by its family name).
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in known}
    charted = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in used}
    assert families <= charted, f"not on the dashboard: {sorted(families - charted)}"
