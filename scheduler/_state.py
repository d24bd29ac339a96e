"""The scheduler's resources: hosts, tasks, and each host's part in a task (PeerTask).

Plain mutable records plus the indexes that keep assignment cheap at 10,000 hosts:
for every piece of a task, the holders (all zones, and per zone) in an
:class:`IndexedSet` (O(1) add, remove and random sample), so rarity is ``len`` and a
parent is chosen from a bounded sample, never by scanning the swarm.  Only the core
(``_core``) mutates these; it keeps the indexes and the per-host records in step.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ._events import HostLoad

__all__ = ["Host", "IndexedSet", "PeerTask", "Task"]

T = TypeVar("T")


class IndexedSet(Generic[T]):
    """A set with O(1) ``add``/``discard``/``len`` and an O(k) random sample of k."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._pos: dict[T, int] = {}

    def add(self, item: T) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._pos[last] = i

    def sample(self, rng: random.Random, k: int) -> list[T]:
        if len(self._items) <= k:
            out = list(self._items)
            rng.shuffle(out)
            return out
        return rng.sample(self._items, k)

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))


@dataclass(slots=True, eq=False)
class Host:
    """A registered daemon."""

    host_id: str
    addr: str
    zone: str
    version: str
    upload_slots: int
    labels: Mapping[str, str]
    last_seen: float
    load: HostLoad = field(default_factory=HostLoad)
    #: Digests of the tasks this host takes part in.
    tasks: set[str] = field(default_factory=set)
    #: Uploads assigned to this host as parent and not yet reported: (child, digest, piece).
    serving: set[tuple[str, str, int]] = field(default_factory=set)
    #: The same uploads counted per piece: (digest, piece) -> children.
    piece_uploads: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Times of recent counted failures as a parent (for the doubling penalty).
    failures: deque[float] = field(default_factory=deque)
    #: Times of recent counted ``error``s among them (peers could not reach it).
    errors: deque[float] = field(default_factory=deque)
    penalised_until: float = float("-inf")
    #: End of the penalty for its last counted failure (``error``, ``slow``, ...): until
    #: then it has recently failed to serve, not merely been full.
    failing_until: float = float("-inf")

    def busy(self) -> int:
        """Upload slots in use: what the scheduler assigned, or what the host said."""
        return max(len(self.serving), self.load.upload_slots_in_use)

    def serve(self, child: str, digest: str, piece: int) -> None:
        """Count an upload of ``piece`` to ``child`` (once)."""
        key = (child, digest, piece)
        if key not in self.serving:
            self.serving.add(key)
            self.piece_uploads[digest, piece] = self.piece_uploads.get((digest, piece), 0) + 1

    def unserve(self, child: str, digest: str, piece: int) -> None:
        key = (child, digest, piece)
        if key in self.serving:
            self.serving.remove(key)
            left = self.piece_uploads.pop((digest, piece)) - 1
            if left:
                self.piece_uploads[digest, piece] = left

    def stop_serving(self) -> None:
        """Forget every upload (the host is gone)."""
        self.serving.clear()
        self.piece_uploads.clear()

    def uploads_of(self, digest: str, piece: int) -> int:
        """Children this host is assigned to send ``piece`` to right now."""
        return self.piece_uploads.get((digest, piece), 0)


@dataclass(slots=True, eq=False)
class PeerTask:
    """One host's part in one task."""

    host: Host
    count: int
    have: bytearray = field(init=False)
    held: int = 0
    complete: bool = False
    #: Source leases: piece -> expiry.
    leases: dict[int, float] = field(default_factory=dict)
    #: Pieces assigned from a parent, not yet reported: piece -> (parent id, expiry).
    inflight: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: Pieces the host reported as stragglers and is still fetching from that parent
    #: (endgame): piece -> parent id, never named again for that piece to this host.
    stragglers: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.have = bytearray(self.count)

    def pieces(self) -> list[int]:
        return [i for i, b in enumerate(self.have) if b]


@dataclass(slots=True, eq=False)
class Task:
    """One blob being distributed, keyed by digest."""

    digest: str
    size: int
    piece_size: int
    count: int
    #: Bumped when a whole-blob mismatch discards the hash list and the piece records.
    epoch: int = 0
    #: The piece-hash list (sha256 hex per piece; ``None`` = not known yet) and who
    #: published each entry.
    hashes: list[str | None] = field(init=False)
    publishers: list[str | None] = field(init=False)
    #: Holders of each piece that may be offered as parents (not excluded), all zones
    #: and per zone.
    holders: list[IndexedSet[str]] = field(init=False)
    zone_holders: list[dict[str, IndexedSet[str]]] = field(init=False)
    #: Source leases per piece: host id -> expiry.
    leases: list[dict[str, float]] = field(init=False)
    peers: dict[str, PeerTask] = field(default_factory=dict)
    #: Hosts that served a piece not matching the hash list: never offered again here.
    excluded: set[str] = field(default_factory=set)
    #: Source leases outstanding on the task, all hosts together.
    leased_now: int = 0

    def __post_init__(self) -> None:
        n = self.count
        self.hashes = [None] * n
        self.publishers = [None] * n
        self.holders = [IndexedSet() for _ in range(n)]
        self.zone_holders = [{} for _ in range(n)]
        self.leases = [{} for _ in range(n)]

    def add_holder(self, host: Host, piece: int) -> None:
        self.holders[piece].add(host.host_id)
        zh = self.zone_holders[piece]
        pool = zh.get(host.zone)
        if pool is None:
            pool = zh[host.zone] = IndexedSet()
        pool.add(host.host_id)

    def remove_holder(self, host: Host, piece: int) -> None:
        self.holders[piece].discard(host.host_id)
        pool = self.zone_holders[piece].get(host.zone)
        if pool is not None:
            pool.discard(host.host_id)
            if not pool:
                del self.zone_holders[piece][host.zone]

    def needs_source(self, piece: int) -> bool:
        """Nobody can serve this piece to a peer: its hash is unknown, or no holder.
        (``_policy.needs_source`` adds: every holder is failing.)"""
        return self.hashes[piece] is None or not self.holders[piece]
