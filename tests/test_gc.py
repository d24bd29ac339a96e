"""Cache GC without sockets: the pure policy (plain lists), its config keys, the store's
leases, last-use times and evictions (real files), and a rate limiter changed mid-wait."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pdist.config import load_node_config, parse_duration
from p2pdist.digest import Digest
from p2pdist.errors import ConfigError
from p2pdist.gc import CacheEntry, GCPolicy, plan_gc
from p2pdist.ratelimit import RateLimiter, Slots
from p2pdist.store import PieceStore

MiB = 1 << 20


def blob(name: str, size: int, last_used: float, in_use: bool = False) -> CacheEntry:
    return CacheEntry(name, size, last_used, in_use)


# -- the policy ------------------------------------------------------------------------------


def test_nothing_to_do_without_a_policy() -> None:
    plan = plan_gc([blob("a", 10, 0.0)], GCPolicy(), now=1e9)
    assert plan.evict == () and plan.held == plan.after == 10


def test_ttl_expires_blobs_unused_for_that_long_only() -> None:
    entries = [blob("old", 5, 100.0), blob("edge", 5, 140.0), blob("fresh", 5, 150.0)]
    plan = plan_gc(entries, GCPolicy(ttl=60), now=200.0)
    assert [(e.digest, e.reason) for e in plan.evict] == [("old", "expired"), ("edge", "expired")]
    assert plan.after == 5


def test_ttl_never_expires_a_blob_in_use_or_a_download_in_progress() -> None:
    entries = [
        blob("reading", 5, 0.0, in_use=True),
        CacheEntry("downloading", 5, 0.0, in_use=True, complete=False),
        CacheEntry("abandoned", 5, 0.0, in_use=False, complete=False),
        blob("idle", 5, 0.0),
    ]
    plan = plan_gc(entries, GCPolicy(ttl=1), now=1000.0)
    assert [(e.digest, e.complete) for e in plan.evict] == [
        ("abandoned", False),
        ("idle", True),
    ]


def test_below_the_high_watermark_nothing_is_evicted() -> None:
    # 90 of 100 held: at the high watermark, not above it (hysteresis)
    entries = [blob(f"b{i}", 10, float(i)) for i in range(9)]
    plan = plan_gc(entries, GCPolicy(quota=100, high=0.9, low=0.5), now=100.0)
    assert plan.evict == ()


def test_above_high_evicts_least_recently_used_down_to_low() -> None:
    # 100 held, quota 100: above 90 -> evict oldest first until <= 60
    entries = [blob(f"b{i}", 10, float(i)) for i in range(10)]
    entries.reverse()  # order of the input does not matter
    plan = plan_gc(entries, GCPolicy(quota=100, high=0.9, low=0.6), now=100.0)
    assert [e.digest for e in plan.evict] == ["b0", "b1", "b2", "b3"]
    assert {e.reason for e in plan.evict} == {"quota"}
    assert (plan.held, plan.after, plan.short) == (100, 60, 0)


def test_quota_skips_blobs_in_use_and_counts_partial_tasks() -> None:
    entries = [
        blob("lru-but-read", 30, 0.0, in_use=True),
        blob("b1", 20, 1.0),
        blob("b2", 20, 2.0),
        blob("newest", 20, 3.0),
        CacheEntry("downloading", 20, 0.0, in_use=True, complete=False),
    ]
    # held 110 > 90: evict b1 (90), b2 (70) -> <= 80 reached after b2
    plan = plan_gc(entries, GCPolicy(quota=100, high=0.9, low=0.8), now=10.0)
    assert [e.digest for e in plan.evict] == ["b1", "b2"]
    assert plan.after == 70


def test_quota_reports_what_it_cannot_free() -> None:
    entries = [blob("a", 60, 0.0, in_use=True), blob("b", 30, 1.0), blob("c", 20, 2.0)]
    plan = plan_gc(entries, GCPolicy(quota=100, high=0.9, low=0.5), now=10.0)
    assert [e.digest for e in plan.evict] == ["b", "c"]
    assert plan.after == 60 and plan.short == 10


def test_expired_blobs_count_towards_the_quota_first() -> None:
    entries = [blob("stale", 50, 0.0), blob("x", 30, 90.0), blob("y", 30, 95.0)]
    plan = plan_gc(entries, GCPolicy(ttl=50, quota=100, high=0.9, low=0.8), now=100.0)
    # stale expires (110 -> 60): below high, so the quota evicts nothing more
    assert [(e.digest, e.reason) for e in plan.evict] == [("stale", "expired")]
    assert plan.after == 60


def test_ties_in_last_use_are_broken_by_digest() -> None:
    entries = [blob("c", 10, 5.0), blob("a", 10, 5.0), blob("b", 10, 5.0)]
    plan = plan_gc(entries, GCPolicy(quota=20, high=0.9, low=0.5), now=10.0)
    assert [e.digest for e in plan.evict] == ["a", "b"]


@pytest.mark.parametrize(
    "kw", [{"ttl": 0}, {"quota": 0}, {"low": 0.9, "high": 0.8}, {"low": 0}, {"high": 1.5}]
)
def test_policy_refuses_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GCPolicy(**kw)  # type: ignore[arg-type]


# -- config keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400.0),
        ("30m", 1800.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("7d", 604800.0),
        (90, 90.0),
        (0.5, 0.5),
        ("0", None),
        ("off", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | float | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_cache_keys_from_file_env_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "p2pdist.toml"
    conf.write_text(
        'cache_ttl = "24h"\ncache_quota = "20GiB"\ncache_high_watermark = 0.95\n'
        'cache_low_watermark = 0.7\ngc_interval = 30\nlog_level = "debug"\n'
    )
    c = load_node_config(conf, env={})
    assert (c.cache_ttl, c.cache_quota, c.gc_interval, c.log_level) == (
        86400.0,
        20 << 30,
        30.0,
        "debug",
    )
    assert (c.cache_high_watermark, c.cache_low_watermark) == (0.95, 0.7)
    c = load_node_config(
        conf,
        env={"P2PDIST_CACHE_QUOTA": "1GiB", "P2PDIST_CACHE_TTL": "off"},
        overrides={"gc_interval": "2m", "log_level": "WARNING"},
    )
    assert (c.cache_ttl, c.cache_quota, c.gc_interval, c.log_level) == (
        None,
        1 << 30,
        120.0,
        "warning",
    )
    defaults = load_node_config(None, env={})
    assert (defaults.cache_ttl, defaults.cache_quota, defaults.gc_interval) == (None, None, 60.0)
    assert (defaults.cache_high_watermark, defaults.cache_low_watermark) == (0.9, 0.8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cache_low_watermark = 0.95", "must not be above cache_high_watermark"),
        ("cache_high_watermark = 1.5", "cache_high_watermark must be a fraction"),
        ('cache_high_watermark = "high"', "expected an integer or a number"),
        ('cache_ttl = "soon"', "invalid duration"),
        ("cache_ttl = true", "expected a string or an integer or a number"),
        ('cache_quota = "lots"', "invalid size"),
        ('gc_interval = "0"', "gc_interval must be more than 0"),
        ('log_level = "loud"', "invalid log_level"),
    ],
)
def test_bad_cache_keys_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "p2pdist.toml"
    conf.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_node_config(conf, env={})


# -- the store: leases, last use, eviction ------------------------------------------------------


def put_blob(store: PieceStore, data: bytes) -> Digest:
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    with store.open_task(digest, len(data), 64 << 10) as task:
        for i in range(task.plan.count):
            start, end = task.plan.range(i)
            task.write_piece(i, data[start:end])
        task.commit()
    return digest


def test_commit_and_reads_record_last_use_which_survives_a_reopen(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    before = time.time()
    d = put_blob(store, os.urandom(100_000))
    used = store.last_used(d)
    assert used is not None and used >= before - 1
    path = store.blob_path(d)
    assert path is not None
    old = used - 3600
    os.utime(path, (old, path.stat().st_mtime))
    mtime = path.stat().st_mtime_ns
    with store.lease(d):  # a read
        pass
    assert store.last_used(d) is not None and store.last_used(d) > old + 3000  # type: ignore[operator]
    assert path.stat().st_mtime_ns == mtime  # the seal (mtime) is untouched
    assert store.checked_blob_path(d) == path  # ... so the blob is not re-hashed or dropped
    reopened = PieceStore(tmp_path)
    assert reopened.last_used(d) == store.last_used(d)
    [entry] = reopened.cache_entries()
    assert entry.digest == str(d) and entry.size == 100_000 and not entry.in_use


def test_a_leased_blob_is_not_evicted_and_an_unleased_one_is(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    d = put_blob(store, os.urandom(70_000))
    path = store.blob_path(d)
    assert path is not None
    store.acquire(d)
    store.acquire(d)
    assert store.in_use(d)
    assert store.evict(d) is False and store.blob_path(d) == path
    store.release(d)
    assert store.evict(d) is False  # one lease still held
    with path.open("rb") as reader:  # a reader that opened it keeps its bytes
        store.release(d)
        assert not store.in_use(d)
        assert store.evict(d) is True
        assert store.blob_path(d) is None and store.blob_piece_hashes(d) is None
        assert hashlib.sha256(reader.read()).hexdigest() == d.hex
    assert store.evict(d) is False  # already gone


def test_a_partial_task_counts_and_goes_only_once_abandoned(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    data = os.urandom(200_000)
    d = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    task = store.open_task(d, len(data), 64 << 10)
    task.write_piece(0, data[: 64 << 10])
    [entry] = store.cache_entries()
    assert (entry.complete, entry.in_use, entry.size) == (False, True, 200_000)
    assert store.evict(d) is False and store.evict_task(d) is False  # being downloaded
    plan = plan_gc(store.cache_entries(), GCPolicy(ttl=1, quota=1), now=time.time() + 1e6)
    assert plan.evict == ()
    task.close()
    # Left on disk and open nowhere: an abandoned pull, which expires like a blob.
    [entry] = store.cache_entries()
    assert (entry.complete, entry.in_use) == (False, False)
    plan = plan_gc(store.cache_entries(), GCPolicy(ttl=1), now=time.time() + 1e6)
    assert [(e.digest, e.complete) for e in plan.evict] == [(str(d), False)]
    assert store.evict_task(d) is True
    assert store.list_tasks() == [] and store.cache_entries() == []


# -- limits that change while transfers wait ---------------------------------------------------


async def test_set_rate_retimes_a_waiting_taker(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1000, burst=1000)
    await limiter.take(1000)  # the burst
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            await limiter.take(10_000)  # owes 10 s at 1000 B/s
            done.append(trio.current_time() - start)

        done: list[float] = []
        nursery.start_soon(waiter)
        await trio.sleep(0.01)  # it is waiting now
        await trio.sleep(1.99)  # 2 s in: 2000 of 10000 bytes repaid
        limiter.set_rate(8000)  # the remaining 8000 bytes take 1 s more
    assert done == [pytest.approx(3.0, abs=0.01)]


async def test_set_rate_none_releases_waiters_and_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(100, burst=100)
    await limiter.take(100)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.take, 100_000)  # 1000 s at 100 B/s
        await trio.sleep(1)
        limiter.set_rate(None)
    assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
    assert not limiter.limited
    limiter.set_rate(1000)  # limited again
    t = trio.current_time()
    await limiter.take(100 + 2000)  # the burst, then 2000 bytes at 1000 B/s
    assert trio.current_time() - t == pytest.approx(2.0, abs=0.01)


def test_slots_limit_changes_while_held() -> None:
    slots = Slots(2)
    assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()
    slots.limit = 1  # lowered: no new taker until below the limit
    slots.release()
    assert not slots.try_acquire()
    slots.release()
    assert slots.try_acquire()
    slots.limit = 3
    assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()
