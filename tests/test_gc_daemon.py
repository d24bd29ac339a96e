"""Cache GC in a real daemon: blobs fetched from a real registry through the daemon's local
API, a small quota, a slow client holding a blob open over HTTP, a real scheduler (its
service on a socket) that must stop hearing of evicted blobs, and TTL expiry."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.httpserver import ServerConfig, serve_http
from scheduler import Scheduler
from scheduler.service import SchedulerService
from tests.helpers import NO_DOCKER_CONFIG, blob_stored, requires_registry

pytestmark = [pytest.mark.integration, requires_registry]

MiB = 1 << 20
REPO = "gc/blobs"


def _push(registry: LocalRegistry, size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    digest = push_blob(registry.url, REPO, data)
    return Digest.parse(digest), data


def _query(registry: LocalRegistry) -> str:
    return f"registry={registry.host}&repository={REPO}"


@asynccontextmanager
async def _daemon(
    tmp_path: Path, *, scheduler_url: str | None = None, **kw: object
) -> AsyncIterator[DaemonInfo]:
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen=None,
        piece_size=256 << 10,
        host_id="gc-node",
        docker_config=NO_DOCKER_CONFIG,
        schedulers=(scheduler_url,) if scheduler_url else (),
        **kw,  # type: ignore[arg-type]
    )
    async with open_daemon(config) as info:
        yield info


async def _fetch(info: DaemonInfo, registry: LocalRegistry, digest: Digest, data: bytes) -> None:
    """GET the blob through the daemon's API; check the bytes; wait until it is stored."""
    url = f"{info.api_url}/api/v1/blobs/{digest}?{_query(registry)}"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        resp = await client.get(url)
    assert resp.status_code == 200, resp.text
    assert resp.content == data
    assert await blob_stored(info.node, digest) is not None


async def _until(cond: Callable[[], bool]) -> None:
    """Poll the daemon's state (it changes in tasks of its own) until ``cond()`` holds, for
    at most 15 s."""
    with trio.fail_after(15):
        while not cond():  # noqa: ASYNC110 (polling state owned by the daemon's tasks)
            await trio.sleep(0.05)


class SlowReader:
    """A client that asks for a blob over HTTP and reads it only when told: a small
    receive buffer, so the daemon is still sending it (and holds it) meanwhile."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.raw = b""

    @classmethod
    async def open(cls, url: str, path: str) -> SlowReader:
        host, port = url.removeprefix("http://").split(":")
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        await sock.connect((host, int(port)))
        await sock.send(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reader = cls(sock)
        while b"\r\n\r\n" not in reader.raw:  # the head and the first bytes, then stop
            reader.raw += await sock.recv(16 << 10)
        assert reader.raw.startswith(b"HTTP/1.1 200"), reader.raw[:200]
        return reader

    async def read_rest(self) -> bytes:
        while chunk := await self.sock.recv(1 << 20):
            self.raw += chunk
        self.sock.close()
        return self.raw.split(b"\r\n\r\n", 1)[1]


async def test_quota_evicts_lru_blobs_to_the_low_watermark_but_not_one_being_read(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    a = _push(registry, 8 * MiB)  # read slowly while the GC runs: must survive
    b, c, d, e = (_push(registry, 2 * MiB) for _ in range(4))
    service = SchedulerService(Scheduler(), started=time.monotonic())
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(
            partial(serve_http, config=ServerConfig()), service.handle, "127.0.0.1", 0
        )
        # quota 16 MiB: GC above 14.4 MiB (0.9), down to 12 MiB (0.75); only after downloads
        async with _daemon(
            tmp_path,
            scheduler_url=sched.url,
            cache_quota=16 * MiB,
            cache_high_watermark=0.9,
            cache_low_watermark=0.75,
            gc_interval=3600.0,
        ) as info:
            store = info.node.store
            for blob in (a, b, c, d):  # 14 MiB: under the high watermark
                await _fetch(info, registry, *blob)
                await trio.sleep(0.05)  # distinct last-use times
            assert {dg for dg, _ in store.list_blobs()} == {a[0], b[0], c[0], d[0]}
            await _fetch(info, registry, *b)  # B used again: now more recent than C, D
            await trio.sleep(0.05)
            reader = await SlowReader.open(info.api_url, f"/api/v1/blobs/{a[0]}?{_query(registry)}")
            assert store.in_use(a[0])  # the daemon is still sending A
            # A's last use is older than C's and D's had the reader not touched it; make
            # it the least recently used outright: only its lease can save it now.
            path_a = store.blob_path(a[0])
            assert path_a is not None
            os.utime(path_a, ns=(0, path_a.stat().st_mtime_ns))

            await _fetch(info, registry, *e)  # 16 MiB > 14.4: GC after it completed
            await _until(lambda: store.blob_path(d[0]) is None)
            held = {dg for dg, _ in store.list_blobs()}
            assert held == {a[0], b[0], e[0]}, "C and D (least recently used) go; A is read"
            assert sum(size for _, size in store.list_blobs()) <= 12 * MiB
            assert info.node.evicted == 2
            # the scheduler no longer counts this node as holding C or D
            tasks = service.scheduler.tasks
            await _until(
                lambda: (
                    not any(
                        str(x) in tasks and "gc-node" in tasks[str(x)].peers for x in (c[0], d[0])
                    )
                )
            )
            for kept in (a[0], b[0], e[0]):
                assert "gc-node" in service.scheduler.tasks[str(kept)].peers

            body = await reader.read_rest()  # the slow client gets all of A, intact
            assert len(body) == len(a[1]) and hashlib.sha256(body).digest() == (
                hashlib.sha256(a[1]).digest()
            )
            await _fetch(info, registry, *c)  # an evicted blob comes back on demand
            assert store.blob_path(c[0]) is not None
            assert "gc-node" in service.scheduler.tasks[str(c[0])].peers
            assert {dg for dg, _ in store.list_blobs()} == {a[0], b[0], c[0], e[0]}
        nursery.cancel_scope.cancel()


async def test_ttl_expires_unused_blobs_but_not_one_being_read(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    idle = _push(registry, 1 * MiB)
    busy = _push(registry, 8 * MiB)
    async with _daemon(tmp_path, cache_ttl=1.0, gc_interval=0.2) as info:
        store = info.node.store
        await _fetch(info, registry, *idle)
        await _fetch(info, registry, *busy)
        reader = await SlowReader.open(info.api_url, f"/api/v1/blobs/{busy[0]}?{_query(registry)}")
        await _until(lambda: store.blob_path(idle[0]) is None)
        await trio.sleep(2.0)  # two TTLs, several GC passes, while the client reads slowly
        assert store.blob_path(busy[0]) is not None, "a blob being read was evicted"
        body = await reader.read_rest()
        assert hashlib.sha256(body).digest() == hashlib.sha256(busy[1]).digest()
        await _until(lambda: store.blob_path(busy[0]) is None)  # unread now: expires too
        await _fetch(info, registry, *idle)  # and comes back on demand
