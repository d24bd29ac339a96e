"""Cache GC policy (pure): which blobs of a node's store to evict, and why.

::

    plan = plan_gc(entries, GCPolicy.from_config(config), now=time.time())
    for e in plan.evict: ...             # the caller deletes them (re-checking leases)

Two rules, over :class:`CacheEntry` rows (one per complete blob or partial task):

* **TTL** — a blob not used for ``ttl`` seconds (``now - last_used >= ttl``) expires;
* **quota** — when the bytes held (complete blobs *and* partial tasks) are above
  ``high × quota``, the least-recently-used entries are evicted until the bytes held are
  at most ``low × quota`` (between the two watermarks nothing happens: hysteresis).

An entry that is ``in_use`` (being read: served to a client or a peer, streamed by the
proxy, hashed; or being downloaded) is never evicted; when such entries alone hold more
than the low watermark the plan says so (``short``).  A partial task no download has open
is an abandoned pull (its last use is its last piece written): it goes like a blob.  No
I/O, no clock: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import NodeConfig

__all__ = ["CacheEntry", "Eviction", "GCPlan", "GCPolicy", "plan_gc"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One blob (or partial task) in the store."""

    digest: str
    size: int
    last_used: float
    """Seconds since the epoch of the last read or completion."""
    in_use: bool = False
    """Read, or being downloaded, here now: never evicted."""
    complete: bool = True
    """False for a partial task (its last use: its last piece written).  One no download
    has open is an abandoned pull: it expires and is evicted like a blob."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GCPolicy:
    ttl: float | None = None
    """Seconds since last use after which a blob expires (None: never)."""
    quota: int | None = None
    """Bytes the store may hold (None: no quota)."""
    high: float = 0.9
    low: float = 0.8

    def __post_init__(self) -> None:
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("ttl must be positive (or None)")
        if self.quota is not None and self.quota <= 0:
            raise ValueError("quota must be positive (or None)")
        if not 0 < self.low <= self.high <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")

    @classmethod
    def from_config(cls, config: NodeConfig) -> GCPolicy:
        """From a node's ``cache_*`` settings."""
        return cls(
            ttl=config.cache_ttl,
            quota=config.cache_quota,
            high=config.cache_high_watermark,
            low=config.cache_low_watermark,
        )

    @property
    def enabled(self) -> bool:
        return self.ttl is not None or self.quota is not None


@dataclass(frozen=True, slots=True)
class Eviction:
    digest: str
    size: int
    reason: Literal["expired", "quota"]
    complete: bool = True
    """False: an abandoned partial task."""


@dataclass(frozen=True, slots=True)
class GCPlan:
    evict: tuple[Eviction, ...]
    held: int
    """Bytes held before the evictions."""
    after: int
    """Bytes held after them."""
    short: int = 0
    """Bytes still above the low watermark because what is left is in use."""


def plan_gc(entries: Iterable[CacheEntry], policy: GCPolicy, *, now: float) -> GCPlan:
    """What to evict from ``entries`` under ``policy`` at time ``now`` (see the module
    docstring).  Evictions come in the order they should happen: expired blobs, then the
    quota's, least recently used first (ties broken by digest, so the plan is stable)."""
    rows = list(entries)
    held = sum(e.size for e in rows)
    evict: list[Eviction] = []
    gone: set[str] = set()
    candidates = sorted((e for e in rows if not e.in_use), key=lambda e: (e.last_used, e.digest))
    if policy.ttl is not None:
        for e in candidates:
            if now - e.last_used >= policy.ttl:
                evict.append(Eviction(e.digest, e.size, "expired", e.complete))
                gone.add(e.digest)
    after = held - sum(e.size for e in evict)
    short = 0
    if policy.quota is not None and after > policy.high * policy.quota:
        target = policy.low * policy.quota
        for e in candidates:
            if after <= target:
                break
            if e.digest in gone:
                continue
            evict.append(Eviction(e.digest, e.size, "quota", e.complete))
            gone.add(e.digest)
            after -= e.size
        short = max(0, int(after - target))
    return GCPlan(tuple(evict), held, after, short)
