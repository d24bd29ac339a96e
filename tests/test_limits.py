"""Limits under load (issue 6, part 3): idle and slow clients time out while good clients
are served, the defaults the daemon and the scheduler run with are sane, and the registry
proxy holds 200 concurrent blob requests - one download per blob, the right bytes for
every client, no file descriptor left behind.

The daemon's servers (registry proxy, peer server, local API) and the scheduler run
in-process on loopback.  The timeouts are shortened for the slow-client tests by wrapping
the ``ServerConfig`` that ``open_daemon`` and ``serve_scheduler`` build (everything else
about the servers is the real thing); the defaults test records the configs they pass
without changing them.  The memory bound (RSS while serving a 1 GiB blob to 8 peers) is
measured by ``python -m bench memory`` (see the README).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import p2pdist.daemon as daemon_module
import scheduler.service as scheduler_service
from bench.cluster import wait_until
from bench.image import push_blob
from bench.localregistry import LocalRegistry, free_port
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.httpserver import ServerConfig
from p2pdist.store import PieceStore
from scheduler.service import serve_scheduler
from tests.faultproxy import FaultProxy
from tests.helpers import blob_stored
from tests.test_swarm import registry_bytes

PIECE = 256 * 1024
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")

#: What the slow-client tests run with (the real defaults are checked separately).
SHORT = {
    "header_timeout": 0.5,
    "keepalive_timeout": 0.5,
    "read_timeout": 0.5,
    "send_timeout": 1.0,
    "max_connections": 16,
}
SLACK = 1.5  # seconds of scheduling slack on a busy 2-core machine


@dataclass
class Servers:
    info: DaemonInfo
    addrs: dict[str, tuple[str, int]]


def _addr(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _node_config(root: Path, **kw: Any) -> NodeConfig:
    defaults: dict[str, Any] = {
        "data_dir": root / "data",
        "peer_listen": "127.0.0.1:0",
        "api_listen": "127.0.0.1:0",
        "proxy_listen": "127.0.0.1:0",
        "piece_size": PIECE,
        "host_id": f"limits-{root.name}",
        "docker_config": NO_DOCKER_CONFIG,
    }
    return NodeConfig(**{**defaults, **kw})


@asynccontextmanager
async def servers(root: Path, **kw: Any) -> AsyncIterator[Servers]:
    """A scheduler and a daemon (proxy, peer server, local API) in this trio run."""
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        async with open_daemon(_node_config(root, schedulers=(sched.url,), **kw)) as info:
            assert info.proxy_url is not None
            yield Servers(
                info,
                {
                    "proxy": _addr(info.proxy_url),
                    "peer": _addr(info.peer_url),
                    "api": _addr(info.api_url),
                    "scheduler": _addr(sched.url),
                },
            )
        nursery.cancel_scope.cancel()


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's and the scheduler's servers run with ``SHORT`` limits."""

    def short_config(**kw: Any) -> ServerConfig:
        return ServerConfig(**{**kw, **SHORT})

    monkeypatch.setattr(daemon_module, "ServerConfig", short_config)
    monkeypatch.setattr(scheduler_service, "ServerConfig", short_config)


async def open_closed_after(addr: tuple[str, int], send: bytes) -> float:
    """Connect, send ``send``, then nothing: seconds until the server closes."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        started = trio.current_time()
        if send:
            await stream.send_all(send)
        with trio.fail_after(10):
            while True:
                try:
                    if not await stream.receive_some(65536):
                        break
                except trio.BrokenResourceError:
                    break
        return trio.current_time() - started


async def good_request(addr: tuple[str, int]) -> float:
    """Seconds a fresh client takes to get ``200`` for ``GET /healthz``."""
    started = trio.current_time()
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        r = await c.get(f"http://{addr[0]}:{addr[1]}/healthz")
    assert r.status_code == 200
    return trio.current_time() - started


# -- slow and idle clients --------------------------------------------------------------


async def test_half_a_request_line_is_cut_after_header_timeout(
    tmp_path: Path, short_timeouts: None
) -> None:
    async with servers(tmp_path) as s:
        for name, addr in s.addrs.items():
            async with trio.open_nursery() as nursery:
                cut: list[float] = []

                async def slow(addr: tuple[str, int] = addr, cut: list[float] = cut) -> None:
                    cut.append(await open_closed_after(addr, b"GET /heal"))

                nursery.start_soon(slow)
                await trio.sleep(0.1)
                # a good client is served at once, while the slow one is still hanging
                assert await good_request(addr) < 0.4, name
            assert SHORT["header_timeout"] - 0.05 <= cut[0] < SHORT["header_timeout"] + SLACK, (
                name,
                cut,
            )


async def test_a_header_trickled_byte_by_byte_is_cut(tmp_path: Path, short_timeouts: None) -> None:
    """The header deadline runs from the first byte: more bytes do not extend it."""
    async with servers(tmp_path) as s:
        for name, addr in s.addrs.items():
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                sent = 0
                with trio.fail_after(10):
                    while True:
                        try:
                            await stream.send_all(b"X")
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                        sent += 1
                        with trio.move_on_after(0.05):
                            try:
                                if await stream.receive_some(100) == b"":
                                    break
                            except trio.BrokenResourceError:
                                break
                elapsed = trio.current_time() - started
            assert sent >= 3, (name, sent)  # it did trickle for a while
            assert elapsed < SHORT["header_timeout"] + SLACK, (name, elapsed)
            assert await good_request(addr) < 1.0, name


async def test_silent_connections_are_closed_and_good_clients_still_served(
    tmp_path: Path, short_timeouts: None
) -> None:
    """Connections that send nothing, up to the servers' connection limit each, are
    closed after ``header_timeout``; a good client arriving meanwhile is served as soon as
    a slot frees (it waits at most about one header_timeout)."""
    limit = int(SHORT["max_connections"])
    async with servers(tmp_path) as s:
        for name, addr in s.addrs.items():
            closed: list[float] = []
            async with trio.open_nursery() as nursery:

                async def silent(
                    addr: tuple[str, int] = addr, closed: list[float] = closed
                ) -> None:
                    closed.append(await open_closed_after(addr, b""))

                for _ in range(limit + 4):  # more than the server takes at once
                    nursery.start_soon(silent)
                await trio.sleep(0.05)
                waited = await good_request(addr)
            assert waited < 2 * SHORT["header_timeout"] + SLACK, (name, waited)
            assert len(closed) == limit + 4
            # the ones beyond the limit waited for a slot, then for their own timeout
            assert max(closed) < 2 * SHORT["header_timeout"] + SLACK, (name, max(closed))
            assert min(closed) >= SHORT["header_timeout"] - 0.05, (name, min(closed))


async def test_idle_keepalive_connection_is_closed(tmp_path: Path, short_timeouts: None) -> None:
    async with servers(tmp_path) as s:
        for name, addr in s.addrs.items():
            elapsed = await open_closed_after(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert elapsed < SHORT["keepalive_timeout"] + SLACK, (name, elapsed)


async def test_stalled_request_body_is_408(tmp_path: Path, short_timeouts: None) -> None:
    async with servers(tmp_path) as s:
        stream = await trio.open_tcp_stream(*s.addrs["scheduler"])
        async with stream:
            started = trio.current_time()
            await stream.send_all(
                b'POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"type'
            )
            out = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    out += chunk
            elapsed = trio.current_time() - started
        assert out.startswith(b"HTTP/1.1 408 "), out[:100]
        assert b"connection: close" in out.lower()
        assert elapsed < SHORT["read_timeout"] + SLACK, elapsed
        assert await good_request(s.addrs["scheduler"]) < 1.0


def _put_blob(data_dir: Path, data: bytes, piece_size: int) -> str:
    """A complete, verified blob in a node's store, as a download leaves it."""
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    store = PieceStore(data_dir)
    task = store.open_task(digest, len(data), piece_size)
    for i in task.plan:
        task.write_piece(i, data[slice(*task.plan.range(i))])
    task.commit()
    store.close()
    return str(digest)


async def test_a_client_that_stops_reading_is_dropped_and_its_upload_slot_freed(
    tmp_path: Path, short_timeouts: None
) -> None:
    """Peers that ask for a piece and never read it hold an upload slot only until
    ``send_timeout``: then their connections are dropped and the slots serve others."""
    piece = 32 << 20  # more than the loopback socket buffers hold
    data = random.Random(5).randbytes(piece)
    digest = _put_blob(tmp_path / "data", data, piece)
    async with servers(tmp_path, upload_slots=2, piece_size=piece) as s:
        host, port = s.addrs["peer"]
        path = f"/peer/v1/blobs/{digest}/pieces/0?piece_size={piece}"
        stuck = []
        for _ in range(2):  # every upload slot
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            stuck.append(stream)
        await trio.sleep(0.3)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
            r = await c.get(f"http://{host}:{port}{path}")
            assert r.status_code == 503  # every slot is held by a reader that stopped
            started = trio.current_time()
            with trio.fail_after(SHORT["send_timeout"] + 10):
                while (r := await c.get(f"http://{host}:{port}{path}")).status_code == 503:  # noqa: ASYNC110 (polling a server)
                    await trio.sleep(0.1)
            freed = trio.current_time() - started
            assert (
                r.status_code == 200
                and hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()
            )
        assert freed < SHORT["send_timeout"] + SLACK + 1, freed
        for stream in stuck:
            await stream.aclose()


# -- defaults ---------------------------------------------------------------------------


async def test_default_server_limits_are_sane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the daemon's three servers and the scheduler are given, recorded as they
    start (not changed): a slowloris is cut within 30 s, idle keep-alive connections go
    within minutes, a head is capped at 64 KiB, connections at 1024 per server."""
    seen: dict[str, ServerConfig] = {}

    def recording(name_of: Callable[[Any], str], real: Any) -> Any:
        async def serve(handler: Any, *args: Any, config: ServerConfig, **kw: Any) -> Any:
            seen[name_of(handler)] = config
            return await real(handler, *args, config=config, **kw)

        return serve

    def daemon_server(handler: Any) -> str:
        return {"peer": "peer", "api": "api", "proxy": "proxy"}[handler.__name__]

    monkeypatch.setattr(
        daemon_module, "serve_http", recording(daemon_server, daemon_module.serve_http)
    )
    monkeypatch.setattr(
        daemon_module,
        "serve_http_listeners",
        recording(daemon_server, daemon_module.serve_http_listeners),
    )
    monkeypatch.setattr(
        scheduler_service,
        "serve_http",
        recording(lambda h: "scheduler", scheduler_service.serve_http),
    )
    async with servers(tmp_path):
        pass
    assert set(seen) == {"peer", "api", "proxy", "scheduler"}
    for name, cfg in seen.items():
        assert 1 <= cfg.header_timeout <= 30, (name, cfg)
        assert cfg.header_timeout <= cfg.keepalive_timeout <= 300, (name, cfg)
        assert 1 <= cfg.read_timeout <= 60, (name, cfg)
        assert 1 <= cfg.send_timeout <= 120, (name, cfg)
        assert 8 << 10 <= cfg.max_header_bytes <= 64 << 10, (name, cfg)
        assert 64 <= cfg.max_connections <= 4096, (name, cfg)


def _fd_soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)", text, re.MULTILINE)
    assert m is not None, text
    return int(m.group(1))


def test_daemon_raises_its_file_limit_to_cover_its_connections(tmp_path: Path) -> None:
    """Started with the common soft limit of 1024 open files (systemd's default), a daemon
    whose servers accept 1024 connections each would run out of descriptors - its store
    and upstream connections failing with EMFILE - long before its connection limits hold.
    It raises the soft limit (up to the hard one) at start."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = 3 * ServerConfig().max_connections + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit here ({hard}) is below what the test needs ({need})")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pdist",
            "daemon",
            "--data-dir",
            str(tmp_path / "data"),
            "--peer-listen",
            f"127.0.0.1:{free_port()}",
            "--api-listen",
            f"127.0.0.1:{port}",
            "--proxy-listen",
            f"127.0.0.1:{free_port()}",
            "--log-level",
            "warning",
        ],
        preexec_fn=low_limit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: (
                proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/healthz").is_success
            ),
            timeout=20,
            what="daemon /healthz",
        )
        assert _fd_soft_limit(proc.pid) >= need
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- 200 concurrent blob requests through the proxy ---------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _fetch_all(
    base: str,
    targets: list[tuple[str, str]],
    *,
    timeout: float,  # noqa: ASYNC109 (one deadline for the whole batch)
) -> list[tuple[int, str]]:
    """GET every (path, digest) at once on its own connection; (status, sha256 of the body)."""
    results: list[tuple[int, str]] = [(0, "")] * len(targets)
    limits = httpx.Limits(max_connections=len(targets), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, trust_env=False) as c:

        async def one(i: int, path: str) -> None:
            h = hashlib.sha256()
            async with c.stream("GET", path) as r:
                async for chunk in r.aiter_raw():
                    h.update(chunk)
            results[i] = (r.status_code, "sha256:" + h.hexdigest())

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for i, (path, _) in enumerate(targets):
                    nursery.start_soon(one, i, path)
    return results


async def test_proxy_holds_200_concurrent_blob_requests(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    rnd = random.Random(200)
    same = rnd.randbytes(3 << 20)
    others = [rnd.randbytes((1 << 20) + i * 4099) for i in range(4)]
    repo = "limits/blobs"
    same_digest = push_blob(registry.url, repo, same)
    other_digests = [push_blob(registry.url, repo, data) for data in others]
    warm = rnd.randbytes(4096)
    warm_digest = push_blob(registry.url, repo, warm)
    with FaultProxy(registry.url) as upstream:
        async with servers(tmp_path, upstream=upstream.url) as s:
            base = str(s.info.proxy_url)
            # warm up (pooled connections to the upstream exist), then the baseline
            assert await _fetch_all(
                base, [(f"/v2/{repo}/blobs/{warm_digest}", warm_digest)], timeout=30
            ) == [(200, warm_digest)]
            await trio.sleep(0.5)
            baseline = _open_fds()

            # 1. the same blob, 200 times at once
            started = time.monotonic()
            targets = [(f"/v2/{repo}/blobs/{same_digest}", same_digest)] * 200
            results = await _fetch_all(base, targets, timeout=60)
            same_seconds = time.monotonic() - started
            assert results == [(200, same_digest)] * 200
            assert registry_bytes(upstream, same_digest, len(same)) == len(same)  # once
            await blob_stored(s.info.node, Digest.parse(same_digest))
            stats = s.info.node.stats[Digest.parse(same_digest)]
            assert stats.from_source == len(same)

            # 2. four other blobs, 50 requests each, interleaved, at once
            started = time.monotonic()
            targets = [(f"/v2/{repo}/blobs/{d}", d) for _ in range(50) for d in other_digests]
            results = await _fetch_all(base, targets, timeout=60)
            mixed_seconds = time.monotonic() - started
            assert results == [(200, d) for _, d in targets]
            for data, digest in zip(others, other_digests, strict=True):
                assert registry_bytes(upstream, digest, len(data)) == len(data), digest

            # 3. every connection and file the requests used is released
            # Kept-alive sockets that may stay: to the upstream (the daemon's pool) and to
            # the scheduler (4 idle ones).  Both servers run in this process, so each
            # connection is two descriptors here.  A leak of the 200 requests' sockets
            # or files would be far above this.
            pool = 2 * (max(8, s.info.node.config.concurrency * 2) + 4)
            # (polled with trio.sleep: the servers run on this event loop and must be
            # able to close their connections meanwhile)
            for _ in range(400):  # 20 s at most
                fds = _open_fds()
                if fds <= baseline + pool:
                    break
                await trio.sleep(0.05)
            assert fds <= baseline + pool, f"open fds {fds}, baseline {baseline}"
            heads = upstream.count("HEAD", f"/blobs/{same_digest}")
    print(
        f"\n200 concurrent GETs of one 3 MiB blob: {same_seconds:.2f}s; 4 blobs x 50: "
        f"{mixed_seconds:.2f}s; upstream HEADs for the first blob: {heads}; "
        f"fds {baseline} -> {fds}"
    )
    assert same_seconds < 30 and mixed_seconds < 30
