"""Bandwidth limits: the token bucket (pure), rate parsing, and a daemon's download,
upload and back-to-source limits holding over real transfers."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from bench.cluster import Cluster
from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import load_node_config, parse_rate
from p2pdist.errors import ConfigError
from p2pdist.ratelimit import TokenBucket
from tests.helpers import requires_registry

MiB = 1 << 20


# -- pure ------------------------------------------------------------------------------------


def test_bucket_grants_the_burst_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(1000, burst=100)
    assert bucket.reserve(100, now=0.0) == 0.0  # the saved-up burst
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.05)  # lent: wait for the debt
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.10)  # the next waits longer
    assert bucket.reserve(0, now=0.10) == pytest.approx(0.0)  # debt repaid by t=0.1
    assert bucket.reserve(0, now=100.0) == 0.0
    assert bucket.reserve(100, now=100.0) == 0.0  # refilled, but only up to the burst
    assert bucket.reserve(1, now=100.0) == pytest.approx(0.001)


def test_bucket_holds_the_rate_over_a_long_run_of_uneven_takes() -> None:
    bucket = TokenBucket(10_000, burst=1_000)
    now, sent = 0.0, 0
    for i in range(2000):
        n = 100 + (i * 37) % 900
        now += bucket.reserve(n, now)  # the taker waits as told, then sends
        sent += n
    assert sent / now == pytest.approx(10_000, rel=0.01)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100Mbit", 12_500_000),
        ("100Mbit/s", 12_500_000),
        ("100mbps", 12_500_000),
        ("1Gbit", 125_000_000),
        ("12MiB", 12 * MiB),
        ("12MB/s", 12_000_000),
        ("4096", 4096),
        (4096, 4096),
        ("0", None),
        ("off", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rate(text: str | int | None, rate: int | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", "-5", "1.5.5Mbit"])
def test_parse_rate_refuses_nonsense(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid rate"):
        parse_rate(bad)


def test_rates_from_env_and_flags() -> None:
    conf = load_node_config(
        None,
        env={"P2PDIST_UPLOAD_RATE": "80Mbit"},
        overrides={"download_rate": "100Mbit", "source_rate": None},
    )
    assert (conf.download_rate, conf.upload_rate, conf.source_rate) == (
        12_500_000,
        10_000_000,
        None,
    )


# -- daemons ------------------------------------------------------------------------------------

RATE = 40_000_000 // 8  # 40 Mbit/s = 5 MB/s: far below what loopback does here
SIZE = 12 * MiB


def _push(registry: LocalRegistry, repo: str) -> str:
    data = os.urandom(SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, repo, data, digest=digest)
    return digest


def _check_rate(seconds: float, nbytes: int, what: str) -> None:
    rate = nbytes / seconds
    # Never faster than the limit (plus its burst); a slow machine may be slower, within reason.
    assert rate <= RATE * 1.1, f"{what}: {rate / 1e6:.2f} MB/s over a {RATE / 1e6:.2f} MB/s limit"
    assert rate >= RATE * 0.6, f"{what}: {rate / 1e6:.2f} MB/s, far under the limit"


def _get(c: Cluster, i: int, target: str, out: Path) -> float:
    started = time.monotonic()
    g = c.get(i, target, out)
    assert g.wait(timeout=60) == 0, c.log_tails()
    return time.monotonic() - started


@requires_registry
@pytest.mark.integration
@pytest.mark.parametrize("flag", ["--download-rate", "--source-rate"])
def test_download_and_source_rates_hold(registry: LocalRegistry, tmp_path: Path, flag: str) -> None:
    digest = _push(registry, f"rate/{flag.strip('-')}")
    with Cluster(tmp_path / "c", daemons=1, daemon_args=[flag, str(RATE)]) as c:
        seconds = _get(c, 0, f"{registry.host}/rate/{flag.strip('-')}@{digest}", tmp_path / "o")
        stats = c.stats(0, digest)
    assert stats["from_source"] == SIZE
    _check_rate(seconds, SIZE, flag)


@requires_registry
@pytest.mark.integration
def test_upload_rate_holds(registry: LocalRegistry, tmp_path: Path) -> None:
    digest = _push(registry, "rate/upload")
    target = f"{registry.host}/rate/upload@{digest}"
    with Cluster(tmp_path / "c", daemons=2, daemon_args=["--upload-rate", "40Mbit"]) as c:
        _get(c, 0, target, tmp_path / "o0")  # from the registry: not an upload
        seconds = _get(c, 1, target, tmp_path / "o1")  # from node 0, paced by its upload
        stats = c.stats(1, digest)
    assert stats["from_peers"] == SIZE, stats
    _check_rate(seconds, SIZE, "--upload-rate")
