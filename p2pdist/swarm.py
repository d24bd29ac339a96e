"""The swarm download: one blob, pieces from parents and from the registry, as the
scheduler assigns them.

The loop, for one task:

1. tell the scheduler we start (digest, size, piece size);
2. ask for an assignment: pieces to fetch from named parents (with their sha256 from the
   task's piece-hash list) and runs of pieces to fetch from the registry ourselves;
3. fetch them in parallel — a parent's piece is checked against its hash **before** it is
   stored (a mismatch reports the parent as bad and the piece goes back to the pool);
   a registry piece is hashed as it is stored and its hash published;
4. report completed pieces in batches; ask again; repeat until nothing is missing;
5. check the whole blob's digest (``Task.commit``).  A mismatch means the piece-hash list
   was poisoned: report it, and refetch the blob from the registry alone.

Endgame: a slow parent must not hold the download back.  When the download cannot start
anything new (the scheduler has nothing more for it, or every slot is taken) and a piece
has been coming from its parent for more than ``HEDGE_FACTOR`` times the median time of
its recent pieces (and at least ``HEDGE_MIN`` seconds), the piece is a *straggler*: its
slots are handed back, the scheduler is told (``straggler``: it penalises the parent and
offers the piece again, from another holder) and the piece is fetched a second time.
The first copy to arrive wins and the other fetch is cancelled.  At most two fetches of a
piece run at once, and the straggler's own ``piece_timeout`` still applies.

If the scheduler cannot be reached the download falls back to the registry, so a pull
never fails because the scheduler is down.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx
import trio

from scheduler import Assignment, FailureReason, PieceSource

from .digest import Digest
from .download import DownloadStats, ProgressFn, SourceFetcher, download
from .errors import DigestMismatch, NetworkError, PieceMismatch, PlanConflict, collapse_groups
from .logs import log_context
from .peer import PeerError, fetch_piece, report_bad_piece
from .peerclient import PeerConnections
from .ratelimit import UNLIMITED, Bandwidth
from .source import Source, SourceInfo

if TYPE_CHECKING:
    from .metrics import NodeMetrics
    from .store import Task

__all__ = ["FailureReason", "SchedulerLink", "SwarmStats", "swarm_download"]

log = logging.getLogger("p2pdist.swarm")


class SchedulerLink(Protocol):
    """What the swarm needs from the scheduler (see :mod:`p2pdist.schedclient`).  Every
    method may raise :class:`NetworkError` when the scheduler is unreachable."""

    async def start_task(self, digest: Digest, size: int, piece_size: int) -> None: ...

    async def assign(self, digest: Digest, max_pieces: int, *, wait: float = 0.0) -> Assignment:
        """``wait``: the scheduler may hold the question that long while it has
        nothing to give (a long poll; a scheduler that does not hold answers at once)."""
        ...

    async def report_pieces(
        self,
        digest: Digest,
        pieces: Sequence[int],
        hashes: dict[int, str] | None,
        *,
        source: bool,
        epoch: int | None,
    ) -> tuple[int, ...]:
        """Returns the pieces the scheduler rejected (to drop and refetch)."""
        ...

    async def report_failure(
        self, digest: Digest, parent_id: str, piece: int, reason: FailureReason
    ) -> None: ...

    async def complete(self, digest: Digest, hashes: dict[int, str] | None) -> None: ...

    async def mismatch(self, digest: Digest, epoch: int | None) -> None: ...

    async def leave_task(self, digest: Digest) -> None: ...


@dataclass(slots=True)
class SwarmStats:
    size: int = 0
    from_peers: int = 0
    """Bytes of pieces received from parents (decompressed)."""
    peer_wire: int = 0
    """Bytes on the wire for those (smaller when zstd paid)."""
    from_source: int = 0
    """Bytes received from the registry."""
    reused: int = 0
    seconds: float = 0.0
    bad_pieces: int = 0
    fallback: bool = False
    stragglers: int = 0
    """Pieces asked for again elsewhere because their parent was far too slow (endgame)."""


STALL_TIMEOUT = 10.0
"""Seconds with nothing in flight and nothing arriving before a swarm download fetches a
piece from the registry on its own (:meth:`_Swarm._unstick`)."""

HEDGE_FACTOR = 8.0
"""A piece in flight from a parent for more than this many times the median time of the
download's recent pieces is a straggler (see the module docstring) ...  Not less: the
seed everyone asks at the start of a rollout serves several children at once and takes
3-4x the median, and three straggler reports bench it (its pieces then go to the
registry a second time)."""
SOURCE_PEER_FLOWS = 1
"""Pieces fetched from parents at once while this download has a registry run in flight.
The registry's bytes are the scarce ones (the origin serves every node; a range leased
here comes from nowhere else), and on a node's downlink TCP shares per flow: with three
peer flows beside it a registry run got a quarter of the link and the origin sat idle
(measured: one node leased 80 MiB of a 256 MiB image and took the whole rollout to get
them).  One peer flow still takes whatever the registry run leaves of the link.  Side by
side at N=8 (4 runs each): the image left the registry at 22-24 s instead of 23-26 s
(T_min 21.5 s), max / T_min 1.30-1.35x against 1.32-1.41x."""

ASSIGN_WAIT = 1.0
"""Seconds the scheduler may hold an ``Assign`` that has nothing for us yet: it answers
as soon as a piece we can take is reported.  Asking again every ``retry_after`` (0.1 s)
instead was three quarters of the scheduler's events at N=8, and at N=16 on 2 cores the
scheduler fell seconds behind, daemons took it for dead and fetched the rest of their
blobs from the registry (1.4-2.9x the image's bytes)."""

HELD_AFTER = 0.2
"""An ``Assign`` unanswered this long is being held: the scheduler has nothing for us
now, as good as an empty answer for the endgame (see ``stragglers``)."""

HEDGE_MIN = 1.0
"""... and for at least this many seconds (a fast swarm's median is milliseconds)."""
HEDGE_SAMPLES = 3
"""Pieces received before a median means anything: until then nothing is a straggler."""
HEDGE_WINDOW = 32
"""How many recent piece times the median is taken over."""
HEDGE_CHECK = 0.1
"""Seconds between two looks for stragglers."""


class FetchSlots:
    """A node's slots for piece fetches (a piece from a peer, or a run of pieces from the
    registry), shared by all its downloads and granted to the oldest download first
    (lowest ``priority``).  Blobs then complete one after another instead of all at once
    at the end: a runtime that unpacks layers in order (dockerd) starts on the first one
    sooner, and a streamed blob's last byte leaves sooner.  And the piece buffers in
    memory are bounded per node, not per download."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("FetchSlots needs at least one slot")
        self._free = n
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[Callable[[], None]]:
        """Hold a slot for the block; the block may hand it back early by calling what
        this yields (a straggler gives its slot up and goes on)."""
        await self._acquire(priority)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._release()

        try:
            yield release
        finally:
            release()

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            await trio.lowlevel.checkpoint()  # before taking it: a cancellation here loses nothing
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
        item = (priority, next(self._seq), trio.Event())
        heapq.heappush(self._waiters, item)
        try:
            await item[2].wait()
        except BaseException:
            if item[2].is_set():  # granted as we were cancelled: pass it on
                self._release()
            else:
                self._waiters.remove(item)
                heapq.heapify(self._waiters)
            raise

    def _release(self) -> None:
        if self._waiters:
            heapq.heappop(self._waiters)[2].set()  # the slot goes straight to the waiter
        else:
            self._free += 1


@dataclass(slots=True, eq=False)
class _PeerFetch:
    """One piece being fetched from one parent."""

    source: PieceSource
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started: float | None = None
    """When it got its node fetch slot (trio's clock); None while it waits for one."""
    holds_slot: bool = True
    """It holds one of the download's slots (and the piece is in ``_Swarm.inflight``)."""
    release_node_slot: Callable[[], None] | None = None
    straggler: bool = False
    """Reported as a straggler: its slots are handed back, a second copy may be fetched."""
    lost: bool = False
    """Another copy of the piece arrived first: it is cancelled and reports nothing."""


class _Swarm:
    def __init__(
        self,
        task: Task,
        source: Source,
        link: SchedulerLink,
        peers: httpx.AsyncClient,
        *,
        concurrency: int,
        piece_timeout: float,
        progress: ProgressFn | None,
        stats: SwarmStats,
        bandwidth: Bandwidth = UNLIMITED,
        fetch_slots: FetchSlots | None = None,
        priority: int = 0,
        peer_conns: PeerConnections | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.bandwidth = bandwidth
        self.peer_conns = peer_conns or PeerConnections()
        self.fetch_slots = fetch_slots or FetchSlots(concurrency)
        self.priority = priority
        self.task = task
        self.plan = task.plan
        self.digest = task.digest
        self.source = source
        self.link = link
        self.peers = peers
        self.concurrency = concurrency
        self.piece_timeout = piece_timeout
        self.progress = progress
        self.stats = stats
        self.hashes: dict[int, str] = {}
        # Pieces holding one of the download's slots: a fetch from a parent (not a
        # straggler) or a registry run.  At most one holder per piece.
        self.inflight: set[int] = set()
        # Every fetch from a parent, by piece: one, or two once the first is a straggler.
        self.fetches: dict[int, list[_PeerFetch]] = {}
        self.piece_times: deque[float] = deque(maxlen=HEDGE_WINDOW)
        self.waiting = False  # the last answer started nothing: waiting for a change
        # Parent id -> when the scheduler last heard from us that one of its pieces is a
        # straggler (inf while we tell it): pieces from it in answers asked for before
        # that are declined, not started.
        self.straggled: dict[str, float] = {}
        # Registry pieces whose hash the scheduler's list contradicts (kept: see
        # _flush_reports).
        self.disputed: set[int] = set()
        self.slots = trio.Semaphore(concurrency)
        self.source_runs = 0  # registry runs in flight
        self.room = trio.Event()  # set when either goes down
        self.changed = trio.Event()
        self.asking = trio.CancelScope()  # the Assign in flight
        self.asked: float | None = None  # when it was sent
        self.pending_peer: list[int] = []
        self.pending_source: dict[int, str] = {}
        self.report_wanted = trio.Event()
        self.epoch: int | None = None
        self.last_progress = trio.current_time()
        self.stall_timeout = STALL_TIMEOUT

    async def _throttle_peer(self, n: int) -> None:
        await self.bandwidth.received(n, from_source=False)

    async def _throttle_source(self, n: int) -> None:
        await self.bandwidth.received(n, from_source=True)

    def _progressed(self) -> None:
        self.last_progress = trio.current_time()
        if self.progress is not None:
            self.progress(self.task.verified_bytes, self.plan.size)
        self.changed.set()
        if self.task.complete_pieces:
            self.asking.cancel()  # a held Assign: nothing more to ask for

    # -- reporting ------------------------------------------------------------------------

    def _record(self, index: int, sha: str | None) -> None:
        if sha is None:
            self.pending_peer.append(index)
        else:
            self.pending_source[index] = sha
        self.report_wanted.set()

    async def _flush_reports(self) -> None:
        rejected: tuple[int, ...] = ()
        if self.pending_source:
            hashes, self.pending_source = self.pending_source, {}
            disputed = await self.link.report_pieces(
                self.digest, sorted(hashes), hashes, source=True, epoch=self.epoch
            )
            if disputed:
                # The list holds other hashes for bytes we had from the registry itself.
                # Refetching them would only bring the same bytes again (forever): keep
                # them; the whole-blob check decides whether the list was poisoned.
                log.warning(
                    "the piece-hash list disagrees with the registry's bytes for pieces %s of "
                    "%s: keeping the registry's, the whole-blob check decides",
                    list(disputed)[:8],
                    self.digest,
                )
                self.disputed.update(disputed)
        if self.pending_peer:
            pieces, self.pending_peer = self.pending_peer, []
            rejected += await self.link.report_pieces(
                self.digest, pieces, None, source=False, epoch=self.epoch
            )
        if rejected:
            # The scheduler's hash list disagrees with what we stored: those pieces must
            # not be served or kept; the whole-blob check settles who was right.
            log.warning("scheduler rejected pieces %s of %s", list(rejected)[:8], self.digest)
            if self.metrics is not None:
                self.metrics.piece_rejected("scheduler", len(rejected))
            await trio.to_thread.run_sync(self.task.drop_pieces, rejected)

    async def _reporter(self) -> None:
        """Batches completed pieces: at most one report in flight, sent as soon as the
        previous one returned (so a busy swarm sends big batches, an idle one small)."""
        while True:
            await self.report_wanted.wait()
            self.report_wanted = trio.Event()
            await self._flush_reports()

    # -- fetching -------------------------------------------------------------------------

    async def _from_parent(self, fetch: _PeerFetch) -> None:
        pp = fetch.source
        index = pp.piece
        reason: FailureReason | None = None
        try:
            expected = self.hashes.get(index)
            if expected is None:  # the scheduler never assigns these; be safe anyway
                return
            with fetch.scope, log_context(peer=pp.parent_id):
                async with self.fetch_slots.slot(self.priority) as release:
                    fetch.release_node_slot = release
                    fetch.started = trio.current_time()
                    reason = await self._fetch_from_parent(fetch, expected)
        finally:
            # Free the piece *before* telling the scheduler: its next answer may hand the
            # piece straight back (to another parent, or as a source lease).
            self._fetch_ended(fetch)
            self._progressed()
        if fetch.lost or reason is None:
            return
        # A straggler's end is reported too (even "slow": it was reported "straggler"
        # before): the scheduler then knows that fetch is over.
        await self.link.report_failure(self.digest, pp.parent_id, index, reason)
        if reason == "bad_hash":
            await report_bad_piece(self.peers, pp.parent_addr, self.digest, index)

    async def _fetch_from_parent(self, fetch: _PeerFetch, expected: str) -> FailureReason | None:
        """One piece from its parent, verified and stored; why it failed, or None."""
        pp = fetch.source
        index = pp.piece
        reason: FailureReason | None = None
        with trio.move_on_after(self.piece_timeout) as scope:
            try:
                data, wire = await fetch_piece(
                    self.peer_conns,
                    pp.parent_addr,
                    self.digest,
                    index,
                    self.plan,
                    throttle=self._throttle_peer,
                )
                if fetch.lost:  # the other copy won while the last bytes came in
                    return None
                if fetch.started is not None:
                    self.piece_times.append(trio.current_time() - fetch.started)
                await trio.to_thread.run_sync(self.task.write_piece, index, data, expected)
                if not self._won(index, fetch):
                    return None
                log.debug("piece %d of %s from %s: %d B", index, self.digest, pp.parent_id, wire)
                self.stats.from_peers += len(data)
                self.stats.peer_wire += wire
                if self.metrics is not None:
                    self.metrics.record_received("peer", len(data))
                self._record(index, None)
            except PieceMismatch:
                self.stats.bad_pieces += 1
                reason = "bad_hash"
                log.warning(
                    "piece %d of %s from %s failed its sha256", index, self.digest, pp.parent_id
                )
            except PeerError as exc:
                if exc.status in (404, 409):
                    reason = "missing"  # it was named for a piece it does not have
                    log.warning(
                        "parent %s does not have piece %d of %s it was named for (%s)",
                        pp.parent_id,
                        index,
                        self.digest,
                        exc.status,
                    )
                elif exc.status == 503:
                    reason = "refused"
                else:
                    reason = "error"
                    log.info(
                        "piece %d of %s from %s failed: %s", index, self.digest, pp.parent_id, exc
                    )
        if scope.cancelled_caught:
            reason = "slow"
        return reason

    def _won(self, index: int, fetch: _PeerFetch | None) -> bool:
        """The copy of piece ``index`` from ``fetch`` (None: from the registry) is in and
        verified: the first one wins, every other fetch of the piece is cancelled."""
        if fetch is not None and fetch.lost:
            return False
        for other in self.fetches.get(index, ()):
            if other is not fetch and not other.lost:
                other.lost = True
                other.scope.cancel()
        return True

    def _room_changed(self) -> None:
        self.room.set()
        self.room = trio.Event()

    async def _peer_room(self) -> None:
        """Wait until another piece may come from a parent (see SOURCE_PEER_FLOWS)."""
        while self.source_runs and self.peer_flows >= SOURCE_PEER_FLOWS:
            await self.room.wait()

    @property
    def peer_flows(self) -> int:
        """Piece fetches from parents in flight (stragglers too)."""
        return sum(map(len, self.fetches.values()))

    def _fetch_ended(self, fetch: _PeerFetch) -> None:
        index = fetch.source.piece
        running = self.fetches.get(index)
        if running is not None and fetch in running:
            running.remove(fetch)
            if not running:
                del self.fetches[index]
        self._hand_back(fetch)
        self._room_changed()

    def _hand_back(self, fetch: _PeerFetch) -> None:
        """Give back the fetch's slots (once)."""
        if fetch.release_node_slot is not None:
            fetch.release_node_slot()
        if fetch.holds_slot:
            fetch.holds_slot = False
            self.inflight.discard(fetch.source.piece)
            self.slots.release()

    # -- endgame --------------------------------------------------------------------------

    def straggler_after(self) -> float | None:
        """Seconds in flight after which a piece from a parent is a straggler (None: not
        enough pieces in yet to tell)."""
        if len(self.piece_times) < HEDGE_SAMPLES:
            return None
        return max(HEDGE_MIN, HEDGE_FACTOR * statistics.median(self.piece_times))

    def stragglers(self, now: float) -> list[_PeerFetch]:
        """Fetches to hedge now: only when the download cannot start anything new (the
        scheduler had nothing or holds our question, or every slot is taken), and only
        pieces with one fetch."""
        held = self.asked is not None and now - self.asked > HELD_AFTER
        if not (self.waiting or held or self.slots.value == 0):
            return []
        limit = self.straggler_after()
        if limit is None:
            return []
        out = []
        for running in self.fetches.values():
            if len(running) != 1:
                continue
            f = running[0]
            if f.straggler or f.lost or f.started is None:
                continue
            if now - f.started > limit:
                out.append(f)
        return out

    async def _watch_stragglers(self) -> None:
        while True:
            await trio.sleep(HEDGE_CHECK)
            now = trio.current_time()
            for fetch in self.stragglers(now):
                await self._hedge(fetch, now)

    async def _hedge(self, fetch: _PeerFetch, now: float) -> None:
        if fetch.lost or fetch not in self.fetches.get(fetch.source.piece, ()):
            return  # it ended meanwhile
        pp = fetch.source
        fetch.straggler = True
        self.straggled[pp.parent_id] = float("inf")  # until the scheduler has been told
        self.stats.stragglers += 1
        log.info(
            "piece %d of %s: %.1fs from %s (median piece %.2fs): asking for it elsewhere",
            pp.piece,
            self.digest,
            now - (fetch.started or now),
            pp.parent_id,
            statistics.median(self.piece_times),
        )
        self._hand_back(fetch)  # the main loop may start a second copy now
        await self.link.report_failure(self.digest, pp.parent_id, pp.piece, "straggler")
        # Answers asked for from now on know it; earlier ones may still name the parent.
        self.straggled[pp.parent_id] = trio.current_time()
        self.changed.set()  # ask the scheduler again: it offers the piece elsewhere

    async def _decline(self, pp: PieceSource) -> None:
        """An answer given before we reported its parent as a straggler names it again:
        do not pile more on it; the scheduler releases the piece and offers it again."""
        await self.link.report_failure(self.digest, pp.parent_id, pp.piece, "declined")
        self.changed.set()

    async def _from_source(self, run: list[int]) -> None:
        fetcher = SourceFetcher(
            self.source,
            self.task,
            concurrency=1,
            on_piece=self._source_piece,
            throttle=self._throttle_source,
        )
        try:
            async with self.fetch_slots.slot(self.priority):
                await fetcher.fetch_spans([run])
        finally:
            self.stats.from_source += fetcher.stats.received
            if self.metrics is not None:
                self.metrics.record_received("registry", fetcher.stats.received)
                self.metrics.record_back_to_source(fetcher.stats.requests)
            for index in run:
                self.inflight.discard(index)
            self.slots.release()
            self.source_runs -= 1
            self._room_changed()
            self._progressed()

    def _source_piece(self, index: int, sha: str) -> None:
        self.hashes[index] = sha
        self._won(index, None)  # a straggler of the piece from a parent: cancelled
        self._record(index, sha)
        self._progressed()

    async def run(self) -> None:
        await self.link.start_task(self.digest, self.plan.size, self.plan.piece_size)
        async with trio.open_nursery() as reporter:
            reporter.start_soon(self._reporter)
            reporter.start_soon(self._watch_stragglers)
            async with trio.open_nursery() as workers:
                while self.task.missing():
                    self.changed = trio.Event()
                    if self.source_runs:  # pieces from parents wait for room
                        want = max(1, 2 * SOURCE_PEER_FLOWS - self.peer_flows)
                    else:
                        want = max(1, self.concurrency * 2 - len(self.inflight))
                    asked = trio.current_time()
                    assignment = await self._ask(want, asked)
                    if assignment is None:
                        continue  # every piece came in while the question was held
                    self.epoch = assignment.epoch
                    self.hashes.update(assignment.piece_hashes)
                    started = await self._start(assignment, workers, asked)
                    if not started and not self.inflight:
                        started = await self._unstick(workers)
                    # Until an answer starts something, we are waiting (also while the
                    # next Assign is held by the scheduler): stragglers may be hedged.
                    self.waiting = not started
                    if not started:
                        with trio.move_on_after(max(0.01, assignment.retry_after)):
                            await self.changed.wait()
            await self._flush_reports()
            reporter.cancel_scope.cancel()

    async def _ask(self, want: int, asked: float) -> Assignment | None:
        """The scheduler's next assignment (it may hold the question up to
        ``ASSIGN_WAIT``); None when every piece came in meanwhile (``_progressed`` ends
        the question)."""
        with trio.CancelScope() as self.asking:
            self.asked = asked
            try:
                return await self.link.assign(self.digest, want, wait=ASSIGN_WAIT)
            finally:
                self.asked = None
        return None

    async def _unstick(self, workers: trio.Nursery) -> int:
        """Liveness: when nothing has arrived for ``stall_timeout`` and the scheduler
        keeps saying "wait" (every holder of what we miss penalised, a lost lease...),
        fetch one missing piece from the registry ourselves.  Its hash is published like
        any source piece; the whole-blob check still has the last word.  One piece, not a
        run: on a slow, shared origin waiting is normal (others hold the leases and are
        fetching), and every byte fetched around the scheduler is a byte the origin sends
        twice."""
        if trio.current_time() - self.last_progress < self.stall_timeout:
            return 0
        missing = [i for i in self.task.missing() if i not in self.inflight]
        if not missing:
            return 0
        run = missing[:1]
        log.info(
            "no progress on %s for %.0fs: fetching piece %d from the registry",
            self.digest,
            self.stall_timeout,
            run[0],
        )
        await self._start_run(run, workers)
        self.last_progress = trio.current_time()
        return 1

    async def _start_run(self, run: list[int], workers: trio.Nursery) -> None:
        """Fetch ``run`` from the registry, in one of the download's slots."""
        await self.slots.acquire()
        self.inflight.update(run)
        self.source_runs += 1
        workers.start_soon(self._from_source, run)

    def _startable(self, pp: PieceSource) -> bool:
        """Not in and not being fetched (a straggler's piece may be, from another parent)."""
        index = pp.piece
        if index in self.inflight or index not in self.hashes or self.task.is_verified(index):
            return False
        return all(f.source.parent_id != pp.parent_id for f in self.fetches.get(index, ()))

    def _straggled_since(self, pp: PieceSource, asked: float) -> bool:
        return self.straggled.get(pp.parent_id, float("-inf")) >= asked

    async def _start(self, a: Assignment, workers: trio.Nursery, asked: float) -> int:
        """Start what answer ``a`` (asked for at ``asked``) assigns; how many started.
        Registry runs first: while one is in flight, pieces from parents wait for room
        (:data:`SOURCE_PEER_FLOWS`)."""
        started = 0
        # Runs of what is still missing: a leased range may hold pieces verified since
        # (resumed after a restart), and a run is fetched as one range, first to last.
        wanted = [i for i in a.from_source if i not in self.inflight]
        for run in _runs([i for i in wanted if not self.task.is_verified(i)]):
            await self._start_run(run, workers)
            started += 1
        for pp in a.from_peers:
            if not self._startable(pp):
                continue
            if self._straggled_since(pp, asked):
                workers.start_soon(self._decline, pp)
                continue
            await self._peer_room()
            await self.slots.acquire()
            if self._straggled_since(pp, asked):  # while we waited for the slot
                self.slots.release()
                workers.start_soon(self._decline, pp)
                continue
            if not self._startable(pp):
                self.slots.release()
                continue
            fetch = _PeerFetch(pp)
            self.fetches.setdefault(pp.piece, []).append(fetch)
            self.inflight.add(pp.piece)
            workers.start_soon(self._from_parent, fetch)
            started += 1
        return started


def _runs(pieces: Sequence[int], max_run: int = 16) -> list[list[int]]:
    out: list[list[int]] = []
    for index in sorted(pieces):
        if out and out[-1][-1] == index - 1 and len(out[-1]) < max_run:
            out[-1].append(index)
        else:
            out.append([index])
    return out


async def swarm_download(
    task: Task,
    source: Source,
    link: SchedulerLink | None,
    peers: httpx.AsyncClient,
    *,
    concurrency: int = 8,
    piece_timeout: float = 30.0,
    progress: ProgressFn | None = None,
    accepts_ranges: bool = True,
    bandwidth: Bandwidth = UNLIMITED,
    fetch_slots: FetchSlots | None = None,
    priority: int = 0,
    peer_conns: PeerConnections | None = None,
    metrics: NodeMetrics | None = None,
) -> tuple[Path, SwarmStats]:
    """Complete ``task`` through the swarm (or from ``source`` alone when ``link`` is
    None or the scheduler is unreachable) and commit it.  Returns the blob's path.
    ``metrics`` counts the bytes by source as they arrive."""
    stats = SwarmStats(size=task.plan.size)
    stats.reused = task.verified_bytes
    if metrics is not None:
        metrics.record_received("local", stats.reused)
    started = time.perf_counter()
    epoch: int | None = None
    disputed = False  # registry pieces contradicted the list (see _Swarm._flush_reports)
    if link is not None and task.missing():
        swarm = _Swarm(
            task,
            source,
            link,
            peers,
            concurrency=concurrency,
            piece_timeout=piece_timeout,
            progress=progress,
            stats=stats,
            bandwidth=bandwidth,
            fetch_slots=fetch_slots,
            priority=priority,
            peer_conns=peer_conns,
            metrics=metrics,
        )
        try:
            with collapse_groups():
                await swarm.run()
            epoch = swarm.epoch
            disputed = bool(swarm.disputed)
        except NetworkError as exc:
            if isinstance(exc, PeerError | PlanConflict):
                raise
            log.warning(
                "scheduler unreachable (%s): fetching %s from the registry", exc, task.digest
            )
            stats.fallback = True
            link = None
    try:
        path, dstats = await _finish_from_source(
            task, source, concurrency, progress, accepts_ranges, bandwidth
        )
    except DigestMismatch:
        if link is None:
            raise
        log.warning(
            "blob %s failed its digest after the swarm: refetching from the registry", task.digest
        )
        if not disputed:
            # The piece-hash list was poisoned (every piece matched it, the blob did not).
            # (With disputed pieces it was our registry bytes that disagreed with the list:
            # the list is not proven wrong.)
            await _quietly(link.mismatch(task.digest, epoch))
        raise
    stats.from_source += dstats.received
    if metrics is not None:
        metrics.record_received("registry", dstats.received)
        metrics.record_back_to_source(dstats.requests)
    stats.seconds = time.perf_counter() - started
    if link is not None:
        if disputed:
            # The registry's bytes passed the digest and the list disagreed with them: it
            # was poisoned.  Have it dropped, then publish ours with CompleteTask.
            log.warning("the piece-hash list of %s was poisoned: reporting it", task.digest)
            await _quietly(link.mismatch(task.digest, epoch))
        hashes = {i: h for i, h in enumerate(task.piece_hashes()) if h is not None}
        await _quietly(link.complete(task.digest, hashes or None))
    return path, stats


async def _finish_from_source(
    task: Task,
    source: Source,
    concurrency: int,
    progress: ProgressFn | None,
    accepts_ranges: bool,
    bandwidth: Bandwidth,
) -> tuple[Path, DownloadStats]:
    """Fetch whatever is still missing from the registry, then commit (whole-blob check)."""
    info = SourceInfo(task.plan.size, accepts_ranges)

    async def throttle(n: int) -> None:
        await bandwidth.received(n, from_source=True)

    return await download(
        source,
        task,
        info=info,
        concurrency=concurrency,
        progress=progress,
        throttle=None if bandwidth == UNLIMITED else throttle,
    )


async def _quietly(call: Awaitable[None]) -> None:
    try:
        await call
    except NetworkError as exc:
        log.info("scheduler: %s", exc)
