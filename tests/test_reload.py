"""``SIGHUP`` reloads a running daemon's config file: a transfer held to a low download
rate speeds up when the file raises it, without being dropped; a bad file is one error
line and the daemon goes on with the config it had.  Also the same reload in process:
upload slots, GC and log level applied, restart-only settings reported."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import struct
import time
from pathlib import Path

import httpx
import pytest

from bench.cluster import Cluster, wait_until
from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import open_daemon
from tests.helpers import NO_DOCKER_CONFIG, requires_registry

MiB = 1 << 20
SIZE = 24 * MiB
PIECE = 256 << 10
SLOW = 2_000_000  # bytes/s before the reload
FAST = 50_000_000  # bytes/s after it

_RECORD = struct.calcsize("<Q32sI")  # a journal record: one verified piece


def _progress(data_dir: Path, blob: Path) -> int:
    """Bytes of the blob the daemon has verified so far."""
    if blob.exists():
        return SIZE
    return PIECE * sum(p.stat().st_size // _RECORD for p in data_dir.rglob("journal"))


def _rate_over(data_dir: Path, blob: Path, seconds: float) -> float:
    """Bytes/s verified over the next ``seconds``."""
    before, t0 = _progress(data_dir, blob), time.monotonic()
    time.sleep(seconds)
    return (_progress(data_dir, blob) - before) / (time.monotonic() - t0)


def _wait_log(c: Cluster, text: str, after: int) -> str:
    return wait_until(
        lambda: text in c.daemons[0].log_text()[after:] and c.daemons[0].log_text()[after:],
        timeout=15,
        what=f"{text!r} in the daemon's log",
    )


@requires_registry
@pytest.mark.integration
def test_sighup_speeds_up_a_running_transfer_and_a_bad_file_keeps_the_old_config(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    digest = push_blob(registry.url, "reload/blob", data)
    conf = tmp_path / "p2pdist.toml"
    conf.write_text(f"download_rate = {SLOW}\n")
    args = ["--config", str(conf)]
    with Cluster(tmp_path / "c", daemons=1, piece_size="256KiB", daemon_args=args) as c:
        d = c.daemons[0]
        blob = d.blob_file(digest)
        g = c.get(0, f"{registry.host}/reload/blob@{digest}", tmp_path / "out")
        wait_until(lambda: _progress(d.data_dir, blob) >= 4 * PIECE, timeout=30, what="4 pieces")
        slow = _rate_over(d.data_dir, blob, 2.5)
        assert slow <= SLOW * 1.5, f"{slow / 1e6:.2f} MB/s before the reload: not limited?"

        # A bad file (a fast rate, but watermarks the wrong way round): one error line,
        # the daemon up, the transfer still at the old rate (none of the file applied).
        conf.write_text(f"download_rate = {FAST}\ncache_low_watermark = 0.95\n")
        mark = len(d.log_text())
        os.kill(d.pid, signal.SIGHUP)  # type: ignore[arg-type]
        log = _wait_log(c, "config reload failed", mark)
        [line] = [ln for ln in log.splitlines() if "config reload" in ln]
        assert "keeping the running config" in line, line
        assert "must not be above cache_high_watermark" in line, line
        assert "Traceback" not in log
        assert d.running
        assert httpx.get(f"{d.api_url}/healthz", timeout=5, trust_env=False).status_code == 200
        still = _rate_over(d.data_dir, blob, 2.0)
        assert still <= SLOW * 2, f"{still / 1e6:.2f} MB/s after a refused reload"
        assert _progress(d.data_dir, blob) < SIZE, "finished before the reload: make it slower"

        # A good file: the same transfer (not restarted) goes faster; zone needs a restart.
        conf.write_text(f'download_rate = {FAST}\nzone = "rack-b"\n')
        mark = len(d.log_text())
        os.kill(d.pid, signal.SIGHUP)  # type: ignore[arg-type]
        reloaded_at, done_before = time.monotonic(), _progress(d.data_dir, blob)
        log = _wait_log(c, "config reloaded: applied download_rate", mark)
        assert "zone changed: restart the daemon to apply" in log, log
        wait_until(lambda: blob.exists(), timeout=60, what="the blob complete")
        fast = (SIZE - done_before) / (time.monotonic() - reloaded_at)
        assert g.wait(timeout=60) == 0, c.log_tails()
        print(f"reload: {slow / 1e6:.2f} / {still / 1e6:.2f} MB/s before, {fast / 1e6:.2f} after")
        assert fast >= 3 * max(slow, still), (
            f"{fast / 1e6:.2f} MB/s after the reload vs {slow / 1e6:.2f} MB/s before"
        )
        stats = c.stats(0, digest)
    out = (tmp_path / "out").read_bytes()
    assert hashlib.sha256(out).hexdigest() == digest.removeprefix("sha256:")
    # one download, not dropped and started over: every byte came from the registry once
    assert stats["from_source"] + stats["reused"] == SIZE, stats


async def test_reload_applies_live_settings_and_reports_the_rest(tmp_path: Path) -> None:
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen=None,
        docker_config=NO_DOCKER_CONFIG,
        upload_slots=4,
        upload_rate=1_000_000,
    )
    root = logging.getLogger()
    level = root.level
    async with open_daemon(config) as info:
        node = info.node
        assert info.apply_config is not None
        upload = node.bandwidth.upload
        assert upload is not None and upload.rate == 1_000_000
        new = NodeConfig(
            data_dir=tmp_path / "elsewhere",  # needs a restart
            peer_listen="127.0.0.1:0",
            api_listen="127.0.0.1:0",
            proxy_listen=None,
            docker_config=NO_DOCKER_CONFIG,
            upload_slots=9,
            upload_rate=None,  # unlimited now
            download_rate=5_000_000,
            cache_ttl=3600.0,
            log_level="debug",
            cluster_token="s3cret-token-value",  # needs a restart; never echoed
        )
        try:
            changes = info.apply_config(new)
            assert set(changes.applied) == {
                "upload_slots",
                "upload_rate",
                "download_rate",
                "cache_ttl",
                "log_level",
            }
            assert set(changes.restart) == {"data_dir", "cluster_token"}
            assert "s3cret" not in repr(changes)
            assert node.config.data_dir == tmp_path / "data"  # kept
            assert node.config.cluster_token is None  # kept
            assert node.config.upload_slots == 9 and node.config.cache_ttl == 3600.0
            assert node.bandwidth.upload is upload and not upload.limited  # same limiter
            assert node.bandwidth.download is not None
            assert node.bandwidth.download.rate == 5_000_000
            assert root.level == logging.DEBUG
        finally:
            root.setLevel(level)
