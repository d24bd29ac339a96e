"""A daemon SIGKILLed in the middle of a download and restarted: it resumes from the
pieces it had verified (the registry is not asked for them again) and serves nothing it
has not verified."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from pathlib import Path

import httpx
import pytest

from bench.cluster import Cluster, wait_until
from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.digest import Digest
from p2pdist.peer import piece_url
from tests.faultproxy import FaultProxy
from tests.helpers import requires_registry
from tests.test_swarm import registry_bytes

pytestmark = [pytest.mark.integration, requires_registry]

MiB = 1 << 20
SIZE = 24 * MiB
PIECE = MiB


_RECORD = struct.calcsize("<Q32sI")  # a journal record: index, sha256, crc32


def _journal_records(data_dir: Path) -> int:
    """Verified pieces recorded in the data dir's task journals."""
    return sum(p.stat().st_size // _RECORD for p in data_dir.rglob("journal"))


def test_daemon_killed_mid_download_resumes_from_verified_pieces(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, "restart/blob", data, digest=digest)
    with FaultProxy(registry.url) as front:
        target = f"{front.host}/restart/blob@{digest}"
        # slow enough (8 MB/s) to be killed in the middle
        args = ["--download-rate", "64Mbit"]
        with Cluster(tmp_path / "c", daemons=1, piece_size="1MiB", daemon_args=args) as c:
            d = c.daemons[0]
            g = c.get(0, target, tmp_path / "first")
            wait_until(
                lambda: _journal_records(d.data_dir) >= 8, timeout=30, what="8 verified pieces"
            )
            c.kill_daemon(0)  # SIGKILL mid-download
            g.wait(timeout=30)  # the client sees the daemon go away
            had = _journal_records(d.data_dir)
            assert 8 <= had < SIZE // PIECE, had

            d.start()
            c.wait_daemon(d)
            # nothing it has not verified is served: a piece beyond what it holds is 404
            url = piece_url(d.peer_addr, Digest.parse(digest), SIZE // PIECE - 1, PIECE)
            assert httpx.get(url, timeout=10, trust_env=False).status_code == 404
            started = time.monotonic()
            g = c.get(0, target, tmp_path / "second")
            assert g.wait(timeout=60) == 0, c.log_tails()
            # no waiting out leases of its earlier life (the scheduler never saw it go)
            assert time.monotonic() - started < 15, time.monotonic() - started
            stats = c.stats(0, digest)
        out = tmp_path / "second"
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
        # the verified pieces were kept: the second run fetched only the rest
        assert stats["reused"] >= had * PIECE, stats
        assert stats["from_source"] <= SIZE - had * PIECE, stats
        sent = registry_bytes(front, digest, SIZE)
        assert sent < SIZE + (had + 8) * PIECE, f"registry sent {sent / MiB:.1f} MiB"
