"""The daemon's servers, in-process on loopback: the peer protocol (pieces, blob ranges,
zstd, refusals) and the local API (streaming a blob from a real registry)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
import zstandard

from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.peer import PeerError, compress_if_worth_it, decompress_piece, fetch_piece
from p2pdist.peerclient import PeerConnections
from p2pdist.pieces import PiecePlan
from p2pdist.store import PieceStore
from tests.helpers import blob_stored, tmpfs

PIECE = 64 * 1024


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        piece_size=PIECE,
        host_id="test-node",
    )


def _put_blob(root: Path, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    store = PieceStore(root)
    task = store.open_task(digest, len(data), PIECE)
    plan = task.plan
    for i in plan:
        task.write_piece(i, data[slice(*plan.range(i))])
    task.commit()
    store.close()
    return digest


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonInfo]:
    async with open_daemon(_config(tmp_path)) as info:
        yield info


async def test_peer_serves_verified_pieces_and_refuses_unknown(
    tmp_path: Path, daemon: DaemonInfo
) -> None:
    data = os.urandom(5 * PIECE + 123)
    digest = _put_blob(tmp_path / "data", data)
    plan = PiecePlan(len(data), PIECE)
    addr = daemon.peer_url.removeprefix("http://")
    conns = PeerConnections()
    async with httpx.AsyncClient() as client:
        for i in (0, 3, plan.count - 1, 0):  # the last over a pooled connection
            got, wire = await fetch_piece(conns, addr, digest, i, plan)
            assert got == data[slice(*plan.range(i))]
            assert wire == len(got)  # random bytes: sent raw
        other = Digest("sha256", "0" * 64)
        with pytest.raises(PeerError, match="answered 404") as exc:
            await fetch_piece(conns, addr, other, 0, plan)
        assert exc.value.status == 404
        r = await client.get(f"{daemon.peer_url}/peer/v1/blobs/{other}/pieces/0?piece_size={PIECE}")
        assert r.status_code == 404
        r = await client.get(f"{daemon.peer_url}/peer/v1/blobs/sha256:xyz/pieces/0?piece_size=1")
        assert r.status_code == 400
        # another piece plan than the one the blob is cut with
        r = await client.get(
            f"{daemon.peer_url}/peer/v1/blobs/{digest}/pieces/99?piece_size={PIECE}"
        )
        assert r.status_code == 404


async def test_peer_sends_compressible_pieces_with_zstd(tmp_path: Path, daemon: DaemonInfo) -> None:
    data = (b"usr/lib/x86_64-linux-gnu/libfoo.so.1 " * 20000)[: 3 * PIECE]
    digest = _put_blob(tmp_path / "data", data)
    plan = PiecePlan(len(data), PIECE)
    addr = daemon.peer_url.removeprefix("http://")
    conns = PeerConnections()
    got, wire = await fetch_piece(conns, addr, digest, 1, plan)
    assert got == data[slice(*plan.range(1))]
    assert wire < len(got) // 4
    got, wire = await fetch_piece(conns, addr, digest, 1, plan, accept_zstd=False)
    assert got == data[slice(*plan.range(1))] and wire == len(got)
    await conns.aclose()


async def test_peer_serves_blob_ranges(tmp_path: Path, daemon: DaemonInfo) -> None:
    data = os.urandom(3 * PIECE)
    digest = _put_blob(tmp_path / "data", data)
    url = f"{daemon.peer_url}/peer/v1/blobs/{digest}"
    async with httpx.AsyncClient() as client:
        r = await client.get(url, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206
        assert r.content == data[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
        r = await client.get(url)
        assert r.status_code == 200 and r.content == data
        r = await client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416


def test_zstd_decompression_is_bounded() -> None:
    data = b"a" * 100_000
    frame = compress_if_worth_it(data)
    assert frame is not None
    assert decompress_piece(frame, len(data)) == data
    with pytest.raises(Exception, match=r"zstd|expected"):
        decompress_piece(frame, 1000)  # a parent cannot inflate a piece past its length
    with pytest.raises(Exception, match="zstd"):
        decompress_piece(b"not zstd at all", 10)
    assert compress_if_worth_it(os.urandom(100_000)) is None
    assert zstandard.ZstdDecompressor().decompress(frame) == data


def test_zstd_bomb_is_refused_without_inflating() -> None:
    piece = 4 << 20
    # 64 MiB of zeros in a few KiB, with the size declared in the frame header ...
    declared = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    assert len(declared) < 64 * 1024
    with pytest.raises(PeerError, match="declares"):
        decompress_piece(declared, piece)
    # ... and without it (a streamed frame): the reader stops at piece + 1 bytes.
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(b"\0" * (64 << 20)) + cobj.flush()
    assert zstandard.frame_content_size(streamed) == -1
    with pytest.raises(PeerError, match="expected"):
        decompress_piece(streamed, piece)


async def test_local_api_streams_a_registry_blob(
    registry: LocalRegistry, daemon: DaemonInfo
) -> None:
    data = os.urandom(10 * PIECE + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, "daemon/api", data, digest=digest)
    url = f"{daemon.api_url}/api/v1/blobs/{digest}"
    params = {"registry": registry.host, "repository": "daemon/api"}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(url, params=params)
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == digest
        assert r.content == data
        stats = (await client.get(f"{url}/stats")).json()
        assert stats["from_source"] == len(data) and stats["from_peers"] == 0
        # unknown blob in the registry -> 404, malformed digest -> 400
        r = await client.get(f"{daemon.api_url}/api/v1/blobs/sha256:{'1' * 64}", params=params)
        assert r.status_code == 404
        r = await client.get(f"{daemon.api_url}/api/v1/blobs/sha256:nope", params=params)
        assert r.status_code == 400
        r = await client.get(url, params={"registry": registry.host})
        assert r.status_code == 400


async def test_disk_full_fails_that_blob_and_other_downloads_go_on(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """The data dir is a 12 MiB disk.  A 24 MiB blob cannot fit: its request gets a clear
    507 with an OCI error body, while a 2 MiB blob asked for at the same moment arrives
    intact; the store holds the small blob complete and nothing of the big one, and asking
    for the big one again gives the same clear answer (no hang, no half blob)."""
    big, small = os.urandom(24 << 20), os.urandom(2 << 20)
    digests = {}
    for name, data in (("big", big), ("small", small)):
        digests[name] = "sha256:" + hashlib.sha256(data).hexdigest()
        push_blob(registry.url, "daemon/full", data, digest=digests[name])
    with tmpfs(tmp_path / "disk", "12m") as disk:
        config = replace(_config(disk), host_id="full-node")
        async with open_daemon(config) as info, httpx.AsyncClient(timeout=60) as client:
            params = {"registry": registry.host, "repository": "daemon/full"}
            answers: dict[str, httpx.Response] = {}

            async def fetch(name: str) -> None:
                url = f"{info.api_url}/api/v1/blobs/{digests[name]}"
                answers[name] = await client.get(url, params=params)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, "big")
                nursery.start_soon(fetch, "small")
            assert answers["small"].status_code == 200
            assert answers["small"].content == small
            r = answers["big"]
            assert r.status_code == 507, (r.status_code, r.text[:300])
            error = r.json()["errors"][0]
            assert "no space" in error["message"].lower(), error
            store = info.node.store
            assert (await blob_stored(info.node, Digest.parse(digests["small"]))) is not None
            assert store.blob_path(Digest.parse(digests["big"])) is None
            assert str(Digest.parse(digests["big"])) not in map(str, store.list_tasks())
            # Again: the same clear answer, and the small blob is still served, from disk.
            url = f"{info.api_url}/api/v1/blobs/{digests['big']}"
            with trio.fail_after(30):
                again = await client.get(url, params=params)
            assert again.status_code == 507
            r = await client.get(f"{info.api_url}/api/v1/blobs/{digests['small']}", params=params)
            assert r.status_code == 200 and r.content == small


async def test_stream_is_cut_when_a_piece_it_sent_is_unverified(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """A piece already streamed to a client is then found bad on disk and un-verified
    (``drop_pieces``, as after a child's bad-piece report): the refetched blob will pass its
    digest, but the client got the old bytes, so its stream must end short, never whole."""
    data = os.urandom(48 * PIECE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, "daemon/drop", data, digest=digest)
    # About 3 s for the blob at 1 MB/s: time to drop a piece mid-way.
    config = replace(_config(tmp_path), host_id="drop-node", download_rate=1_000_000)
    async with open_daemon(config) as info, httpx.AsyncClient(timeout=60) as client:
        params = {"registry": registry.host, "repository": "daemon/drop"}
        url = f"{info.api_url}/api/v1/blobs/{digest}"
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", url, params=params) as r:
                assert r.status_code == 200
                dropped = False
                async for chunk in r.aiter_raw():
                    got += chunk
                    if not dropped and len(got) >= 2 * PIECE:
                        job = info.node.job(Digest.parse(digest))
                        assert job is not None and job.task is not None
                        assert job.task.drop_pieces([0]) == [0]
                        dropped = True
        assert 2 * PIECE <= len(got) < len(data)
        # The node itself refetches the piece and completes the blob intact.
        path = await blob_stored(info.node, Digest.parse(digest))
        assert path is not None and path.read_bytes() == data


async def test_scheduler_events_over_the_lean_client_keep_one_connection() -> None:
    """The daemon asks the scheduler through pooled sockets (one or more round trips per
    piece): answers decode, one connection serves many events, a stale pooled socket is
    retried on a fresh one, and a refusal keeps its status."""
    import json

    from scheduler import RegisterHost
    from scheduler._codec import encode
    from scheduler.service import serve_scheduler

    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_scheduler, "127.0.0.1", 0)
        addr = info.url.removeprefix("http://")
        conns = PeerConnections()
        body = json.dumps(encode(RegisterHost("lean", "127.0.0.1:1", "", "t", 4))).encode()
        for _ in range(5):
            status, data = await conns.post(addr, "/api/v1/events", body)
            assert status == 200 and json.loads(data)["type"] == "Ack", data
        assert len(conns._idle[addr]) == 1  # one socket, reused
        # The pooled socket dies (as after a scheduler restart): a fresh one is used.
        await conns._idle[addr][0].aclose()
        status, data = await conns.post(addr, "/api/v1/events", body)
        assert status == 200
        status, data = await conns.post(addr, "/api/v1/events", b"{not json")
        assert status == 400 and b"errors" in data
        await conns.aclose()
        nursery.cancel_scope.cancel()
