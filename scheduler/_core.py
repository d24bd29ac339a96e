"""The scheduler's state machine: events in, answers out, the clock passed in.

``Scheduler.handle(event, now)`` applies one daemon's event and returns one answer; no
I/O, no clock reads, no exceptions for anything a daemon can send.  Every handle first
advances time to ``now`` (:meth:`Scheduler.tick`): hosts silent for
``heartbeat_timeout`` are expired, lapsed source leases and parent assignments released.
A seeded ``random.Random`` breaks ties, so a run is reproducible.

The rules, in one place
-----------------------

Hosts
    ``RegisterHost`` creates or updates a host; every event from a host counts as a
    heartbeat.  An expired host, or one that sent ``LeaveHost``, is forgotten: its pieces
    are no longer offered, its source leases and the uploads assigned to it are released
    (their pieces are offered again, the leases re-leased to whoever asks next).

Unknown, and restarts
    An event from a host the scheduler does not know is answered ``Unknown("host")``:
    re-register and re-announce every task.  An event about a task the host is not known
    to take part in is answered ``Unknown("task")``: ``Announce`` it (or ``StartTask``).
    A restarted scheduler therefore rebuilds its picture from re-announcements: the
    pieces, seeds and (through ``Announce.hashes``) the piece-hash list.  Every event is
    idempotent: a repeat changes nothing (``BlobMismatch`` carries the epoch for this).

The piece-hash list (integrity)
    A piece's hash is learned from the first host that reports it with ``source=True``
    (it fetched the bytes from the registry and hashed them), from ``Announce`` or from
    a seed's ``CompleteTask`` - whichever comes first; it is never replaced (only
    withdrawn: ``missing``, ``BlobMismatch``).  A report whose hash differs from the
    list, or that has no hash while the list has none, is rejected (``Ack.rejected``):
    the daemon drops those pieces - except pieces it fetched from the registry (a
    ``source=True`` report whose hash differs from the list): it keeps those for its
    whole-blob check to judge (``BlobMismatch``), and they are recorded as its own, for
    itself only: never assigned to it again, never offered from it (a refetch would
    bring the same bytes, and children would find them "bad").  A piece is offered from a
    peer only when its hash is known, and the answer carries that hash.  An excluded
    host's reports count for itself only: they never publish a hash nor make it a parent,
    and its source leases do not keep anyone else from leasing the same pieces.

Tasks
    ``StartTask`` joins a task (or restarts a download of it: the host's source leases
    and assignments on it from an earlier run are released).

Assignments (``Assign`` -> ``Assignment``)
    1. From peers first: the asker's missing pieces that are not already assigned or
       leased to it and have a known hash and a holder, rarest first; each from the best
       of a sample of its holders (same zone first, least busy, below its upload slots,
       not penalised, not excluded, never the asker, never the parent the asker still
       fetches that piece from as a straggler, not already sending that piece to
       ``max_uploads_per_piece`` children), at most ``max_pieces_per_parent`` per
       parent.  Assigned pieces count as uploads of the parent until the asker reports
       them, reports a failure, or ``piece_timeout`` passes.
    2. Then, with the room left, one contiguous run (``source_run_pieces``) of pieces that
       need the registry - hash unknown, nobody holds them, or every one of their (at
       most ``parent_candidates``) holders is *failing* (penalised after a counted
       failure, below) - and are leased to fewer than ``source_fanout`` hosts: a source
       lease, lapsing after ``lease_timeout``, released when reported or failed.  A
       host holds at most ``max_source_leases_per_host``.
       So hosts that start together are given different ranges, each range leaves the
       registry once, and the others fetch those pieces from the lessees as they report.
    3. Nothing assignable: ``retry_after`` (short).  Holding every piece: ``done``.

Failures (``ReportPieceFailure``)
    ``bad_hash``: the parent served bytes that do not match the list: it is excluded from
    the task for every host, its record of the piece dropped.  ``error``/``slow``: the
    parent is penalised (``error_penalty``/``slow_penalty`` doubling with each failure in
    ``failure_window``; ``avoid_after_failures`` of them bench it for ``avoid_duration``).
    ``missing``: the parent does not have a piece it is recorded holding (it lied, or
    lost it): penalised as for ``error``, and all its records of the task are dropped -
    it is no longer offered for the task until it reports or announces pieces again -
    and the hashes only it vouched for (it published them, nobody holds them now) are
    withdrawn, so those pieces go back to the registry and are published afresh (only
    for a report matching an assignment: a late or stray 404 changes no records).
    ``declined``: the host did not start the fetch; the assignment is released.
    ``refused``: the parent was full, a short ``refused_penalty``.  A parent benched for
    ``error``s (peers cannot reach it: perhaps dead) also loses its source leases, so
    its ranges are re-leased now rather than when it expires.  ``parent_id=None``:
    the registry fetch failed; the lease is released.  Only a failure matching an
    outstanding assignment counts towards the doubling, so repeats are harmless.  A
    parent penalised after a counted failure is *failing* until that penalty ends (after
    a ``slow`` only when benched, after a ``straggler`` never: it is serving, slowly, and on a
    congested link every parent is slow now and then): a piece only failing parents
    hold is leased to the registry (rule 2 above).

Endgame (``straggler``)
    A host whose piece has been in flight from its parent far longer than its other
    pieces (its own judgement: the node's rule is in ``p2pdist/swarm.py``) reports
    ``straggler`` and keeps fetching: the assignment is released, the parent neither
    penalised nor counted (the seeds everyone asks in a rollout are busy, not broken: a
    penalty hides their rare pieces, a bench sends them to the registry again; how the
    slow fetch ends - a piece timeout, an error - counts instead), and the piece is
    offered to the host again at once, from another holder - never from
    that parent (``PeerTask.stragglers``) until the host reports the piece (the first
    copy to arrive wins; the host cancels the other) or another failure of it from that
    parent (that fetch ended).  Nothing else changes: the second assignment is an
    ordinary one, and with no other holder the host simply waits for the first copy (a
    parent that misses the piece timeout reports ``slow``, which counts).

Preheat
    ``start_preheat`` (the service's ``POST /api/v1/preheat``) picks hosts for a preheat
    job; each chosen host finds its orders in the ``Ack`` to its heartbeats and reports
    progress in them; a removed host fails its unfinished jobs.  The rules are in
    ``_preheat``'s docstring.

Whole-blob mismatch (``BlobMismatch``)
    Every piece matched the list but the blob does not match its digest - or the blob
    matched its digest with pieces from the registry that the list rejected: the list is
    poisoned.  The task's epoch is bumped, its hash list, exclusions, leases, assignments
    and every non-seed's piece records are dropped: everyone fetches from the registry
    again.  Seeds (``CompleteTask``: digest-verified) keep their records and are offered
    again as soon as the registry-fetched hashes are republished.  A report or mismatch
    carrying an older epoch is stale: its peer-fetched pieces are rejected, and the
    mismatch is ignored.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import OrderedDict, deque
from collections.abc import Mapping
from types import MappingProxyType

from . import _policy
from ._config import SchedulerConfig
from ._events import (
    Ack,
    Announce,
    Answer,
    Assign,
    Assignment,
    BlobMismatch,
    CompleteTask,
    Event,
    Heartbeat,
    LeaveHost,
    LeaveTask,
    PieceSource,
    RegisterHost,
    Rejected,
    ReportPieceFailure,
    ReportPieces,
    StartTask,
    Unknown,
)
from ._preheat import Candidate, PreheatJob, Preheats, Selection
from ._state import Host, PeerTask, Task

__all__ = ["Scheduler"]

#: Smallest piece size and most pieces a task may have (the node uses 64 KiB..1 GiB pieces
#: and at most ~1,000 per blob; this leaves room without letting one event allocate GBs).
MIN_PIECE_SIZE = 16 * 1024
MAX_TASK_PIECES = 100_000
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_ADDR = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_LEASE = 0
_INFLIGHT = 1
# (deadline, seq, kind, host_id, digest, piece, epoch)
_Timer = tuple[float, int, int, str, str, int, int]


def _recent(times: deque[float], now: float, window: float) -> int:
    """Record an event at ``now`` in ``times``; how many fell within the last ``window``."""
    times.append(now)
    while times and times[0] <= now - window:
        times.popleft()
    return len(times)


class Scheduler:
    """The pure scheduler.  Not thread-safe; the service layer serialises calls."""

    def __init__(self, config: SchedulerConfig | None = None, *, seed: int = 0) -> None:
        self.config = config if config is not None else SchedulerConfig()
        self._rng = random.Random(seed)
        self._hosts: dict[str, Host] = {}
        self._tasks: dict[str, Task] = {}
        # Hosts in order of last_seen (touch = move to end): expiry pops from the front.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._timers: list[_Timer] = []
        self._seq = 0
        self._now = float("-inf")
        self.preheats = Preheats()
        """Preheat jobs (``_preheat``): created by :meth:`start_preheat`, delivered and
        reported through heartbeats."""

    # --- read-only views (for the service layer, metrics and tests) -------------------

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    @property
    def tasks(self) -> Mapping[str, Task]:
        return MappingProxyType(self._tasks)

    # --- time ----------------------------------------------------------------------

    def tick(self, now: float) -> list[str]:
        """Advance the clock: expire silent hosts (returned), release lapsed leases and
        assignments.  Time never goes backwards: an earlier ``now`` is ignored."""
        if now < self._now:
            return []
        self._now = now
        expired: list[str] = []
        timeout = self.config.heartbeat_timeout
        while self._seen:
            hid = next(iter(self._seen))
            if self._hosts[hid].last_seen + timeout > now:
                break
            self._remove_host(hid)
            expired.append(hid)
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, kind, hid, digest, piece, epoch = heapq.heappop(timers)
            task = self._tasks.get(digest)
            if task is None or task.epoch != epoch:
                continue
            pt = task.peers.get(hid)
            if pt is None:
                continue
            if kind == _LEASE:
                if pt.leases.get(piece) == deadline:
                    self._release_lease(task, pt, piece)
            else:
                entry = pt.inflight.get(piece)
                if entry is not None and entry[1] == deadline:
                    self._release_inflight(task, pt, piece)
        return expired

    def _timer(self, deadline: float, kind: int, hid: str, task: Task, piece: int) -> None:
        self._seq += 1
        entry = (deadline, self._seq, kind, hid, task.digest, piece, task.epoch)
        heapq.heappush(self._timers, entry)

    # --- the one entry point ---------------------------------------------------------

    def handle(self, event: Event, now: float) -> Answer:
        """Apply ``event`` (from ``event.host_id``) at time ``now``; return the answer."""
        self.tick(now)
        now = max(now, self._now)
        if isinstance(event, RegisterHost):
            return self._register(event, now)
        host = self._hosts.get(event.host_id)
        if isinstance(event, LeaveHost):
            if host is not None:
                self._remove_host(host.host_id)
            return Ack()
        if host is None:
            return Unknown("host")
        self._touch(host, now)
        if isinstance(event, Heartbeat):
            host.load = event.load
            if event.preheat:
                self.preheats.report(host.host_id, event.preheat, now)
            return Ack(preheat=self.preheats.orders_for(host.host_id))
        if isinstance(event, StartTask | Announce):
            return self._start(host, event, now)
        task = self._tasks.get(event.digest)
        pt = task.peers.get(host.host_id) if task is not None else None
        if task is None or pt is None:
            if isinstance(event, LeaveTask):
                return Ack()
            return Unknown("task")
        if isinstance(event, Assign):
            return self._assign(task, pt, event.max_pieces, now)
        if isinstance(event, ReportPieces):
            return self._report(task, pt, event, now)
        if isinstance(event, ReportPieceFailure):
            return self._failure(task, pt, event, now)
        if isinstance(event, CompleteTask):
            self._complete(task, pt, event.hashes)
            return Ack()
        if isinstance(event, BlobMismatch):
            if event.epoch is None or event.epoch == task.epoch:
                self._reset(task)
            return Ack()
        if isinstance(event, LeaveTask):
            self._drop_peer(task, host.host_id)
            return Ack()
        return Rejected("invalid", f"unsupported event {type(event).__name__}")

    # --- hosts ---------------------------------------------------------------------

    def _touch(self, host: Host, now: float) -> None:
        host.last_seen = now
        self._seen.move_to_end(host.host_id)

    def _register(self, ev: RegisterHost, now: float) -> Answer:
        if not ev.host_id or ev.upload_slots < 0:
            return Rejected("invalid", "host_id must be non-empty and upload_slots >= 0")
        if not _ADDR.fullmatch(ev.addr):
            return Rejected("invalid", "addr must be HOST:PORT")
        host = self._hosts.get(ev.host_id)
        if host is None:
            host = Host(
                ev.host_id, ev.addr, ev.zone, ev.version, ev.upload_slots, dict(ev.labels), now
            )
            self._hosts[ev.host_id] = host
            self._seen[ev.host_id] = None
        else:
            if ev.zone != host.zone:  # re-index its pieces under the new zone
                for digest in host.tasks:
                    task = self._tasks[digest]
                    for i in self._offered(task, host):
                        task.remove_holder(host, i)
                host.zone = ev.zone
                for digest in host.tasks:
                    task = self._tasks[digest]
                    for i in self._offered(task, host):
                        task.add_holder(host, i)
            host.addr, host.version = ev.addr, ev.version
            host.upload_slots, host.labels = ev.upload_slots, dict(ev.labels)
        self._touch(host, now)
        return Ack()

    def _offered(self, task: Task, host: Host) -> list[int]:
        if host.host_id in task.excluded:
            return []
        return [i for i in task.peers[host.host_id].pieces() if host.host_id in task.holders[i]]

    def _remove_host(self, hid: str) -> None:
        host = self._hosts.pop(hid, None)
        self._seen.pop(hid, None)
        if host is None:
            return
        self.preheats.host_gone(hid, self._now)
        for digest in list(host.tasks):
            task = self._tasks.get(digest)
            if task is not None:
                self._drop_peer(task, hid)
        # Children that were assigned pieces from it may ask for them again.
        for child, digest, piece in list(host.serving):
            task = self._tasks.get(digest)
            pt = task.peers.get(child) if task is not None else None
            if task is not None and pt is not None:
                self._release_inflight(task, pt, piece)
        host.stop_serving()

    # --- preheat -------------------------------------------------------------------

    def start_preheat(
        self, job_id: str, image: str, platform: str, selection: Selection, now: float
    ) -> PreheatJob:
        """Create preheat job ``job_id`` for ``image`` on the hosts ``selection`` picks
        among those registered (rules in ``_preheat``).  Raises
        :class:`~scheduler._preheat.PreheatError` for a selection it cannot serve."""
        self.tick(now)
        now = max(now, self._now)
        candidates = []
        for host in self._hosts.values():
            downloading = 0
            for digest in host.tasks:
                task = self._tasks.get(digest)
                pt = task.peers.get(host.host_id) if task is not None else None
                downloading += pt is not None and not pt.complete
            candidates.append(
                Candidate(
                    host.host_id,
                    host.zone,
                    downloading + self.preheats.active_count(host.host_id),
                    host.busy() / max(1, host.upload_slots),
                    host.load.cpu,
                )
            )
        return self.preheats.create(job_id, image, platform, selection, candidates, now)

    # --- tasks ---------------------------------------------------------------------

    def _start(self, host: Host, ev: StartTask | Announce, now: float) -> Answer:
        if not _DIGEST.fullmatch(ev.digest):
            return Rejected("invalid", "digest must be sha256:<64 hex> or sha512:<128 hex>")
        if ev.size < 0 or ev.piece_size < MIN_PIECE_SIZE:
            return Rejected("invalid", f"need size >= 0 and piece_size >= {MIN_PIECE_SIZE}")
        if -(-ev.size // ev.piece_size) > MAX_TASK_PIECES:
            # A task's state is O(pieces): one event must not be able to make it huge.
            return Rejected("invalid", f"more than {MAX_TASK_PIECES} pieces")
        task = self._tasks.get(ev.digest)
        if task is None:
            count = -(-ev.size // ev.piece_size)
            task = Task(ev.digest, ev.size, ev.piece_size, count)
            self._tasks[ev.digest] = task
        elif (task.size, task.piece_size) != (ev.size, ev.piece_size):
            if not task.peers:  # a plan nobody uses any more: replace it
                del self._tasks[ev.digest]
                return self._start(host, ev, now)
            return Rejected(
                "plan_conflict",
                f"task {ev.digest} is planned as size={task.size} piece_size={task.piece_size}",
                size=task.size,
                piece_size=task.piece_size,
            )
        pt = task.peers.get(host.host_id)
        if pt is None:
            pt = task.peers[host.host_id] = PeerTask(host, task.count)
            host.tasks.add(task.digest)
        if isinstance(ev, StartTask):
            # The host (re)starts its download: nothing of an earlier run is in flight any
            # more (a daemon restarted under the same id must not wait out its own leases).
            for piece in list(pt.leases):
                self._release_lease(task, pt, piece)
            for piece in list(pt.inflight):
                self._release_inflight(task, pt, piece)
            return Ack()
        if ev.complete:
            self._complete(task, pt, ev.hashes)
            return Ack()
        return self._accept(task, pt, ev.pieces, ev.hashes, publish=True, stale=False)

    def _drop_peer(self, task: Task, hid: str) -> None:
        pt = task.peers.pop(hid, None)
        if pt is None:
            return
        host = pt.host
        host.tasks.discard(task.digest)
        for i in pt.pieces():
            task.remove_holder(host, i)
        for i in list(pt.leases):
            self._release_lease(task, pt, i)
        for i in list(pt.inflight):
            self._release_inflight(task, pt, i)
        if not task.peers:
            del self._tasks[task.digest]

    def _release_lease(self, task: Task, pt: PeerTask, piece: int) -> None:
        if pt.leases.pop(piece, None) is not None:
            task.leases[piece].pop(pt.host.host_id, None)
            task.leased_now -= 1

    def _release_all_leases(self, host: Host) -> None:
        for digest in host.tasks:
            task = self._tasks.get(digest)
            pt = task.peers.get(host.host_id) if task is not None else None
            if task is not None and pt is not None:
                for piece in list(pt.leases):
                    self._release_lease(task, pt, piece)

    def _release_inflight(self, task: Task, pt: PeerTask, piece: int) -> None:
        entry = pt.inflight.pop(piece, None)
        if entry is not None:
            parent = self._hosts.get(entry[0])
            if parent is not None:
                parent.unserve(pt.host.host_id, task.digest, piece)

    def _set_held(self, task: Task, pt: PeerTask, i: int) -> None:
        if not pt.have[i]:
            pt.have[i] = 1
            pt.held += 1
        if pt.host.host_id not in task.excluded:
            task.add_holder(pt.host, i)

    def _accept(
        self,
        task: Task,
        pt: PeerTask,
        pieces: tuple[int, ...],
        hashes: Mapping[int, str] | None,
        *,
        publish: bool,
        stale: bool,
        keep_disputed: bool = False,
    ) -> Ack:
        """Record ``pieces`` as held by ``pt``'s host; the answer lists the rejected.
        ``keep_disputed``: pieces it hashed from the registry itself whose hash differs
        from the list are rejected yet recorded as its own (never offered from it, never
        assigned to it again): it keeps them for its whole-blob check."""
        rejected: list[int] = []
        disputed: list[int] = []
        excluded = pt.host.host_id in task.excluded
        for i in pieces:
            if not (isinstance(i, int) and 0 <= i < task.count):
                rejected.append(i)
                continue
            self._release_lease(task, pt, i)
            self._release_inflight(task, pt, i)
            pt.stragglers.pop(i, None)
            h = hashes.get(i) if hashes is not None else None
            if h is not None and _HEX64.fullmatch(h) is None:
                rejected.append(i)
                continue
            known = task.hashes[i]
            if known is None:
                if h is None or not publish:
                    rejected.append(i)
                    continue
                if not excluded:
                    task.hashes[i] = h
                    task.publishers[i] = pt.host.host_id
            elif (h is not None and h != known) or (stale and not publish):
                rejected.append(i)
                if keep_disputed and h is not None and h != known:
                    disputed.append(i)
                continue
            self._set_held(task, pt, i)
        if rejected:  # a record the host just disowned must not be offered
            for i in rejected:
                if isinstance(i, int) and 0 <= i < task.count and pt.have[i]:
                    self._unset_held(task, pt, i)
        for i in disputed:  # its own, for itself only
            if not pt.have[i]:
                pt.have[i] = 1
                pt.held += 1
        return Ack(tuple(rejected))

    def _unset_held(self, task: Task, pt: PeerTask, i: int) -> None:
        if pt.have[i]:
            pt.have[i] = 0
            pt.held -= 1
            pt.complete = False
        task.remove_holder(pt.host, i)

    def _report(self, task: Task, pt: PeerTask, ev: ReportPieces, now: float) -> Answer:
        stale = ev.epoch is not None and ev.epoch != task.epoch
        return self._accept(
            task, pt, ev.pieces, ev.hashes, publish=ev.source, stale=stale, keep_disputed=ev.source
        )

    def _complete(self, task: Task, pt: PeerTask, hashes: Mapping[int, str] | None) -> None:
        if hashes is not None and pt.host.host_id not in task.excluded:
            for i, h in hashes.items():
                if (
                    isinstance(i, int)
                    and 0 <= i < task.count
                    and task.hashes[i] is None
                    and _HEX64.fullmatch(h) is not None
                ):
                    task.hashes[i] = h
                    task.publishers[i] = pt.host.host_id
        pt.complete = True
        pt.stragglers.clear()
        for i in list(pt.leases):
            self._release_lease(task, pt, i)
        for i in list(pt.inflight):
            self._release_inflight(task, pt, i)
        for i in range(task.count):
            self._set_held(task, pt, i)

    def _reset(self, task: Task) -> None:
        """The hash list is poisoned: start the task over from the registry."""
        task.epoch += 1
        task.hashes = [None] * task.count
        task.publishers = [None] * task.count
        readmit = [task.peers[h] for h in task.excluded if h in task.peers]
        task.excluded.clear()
        for pt in task.peers.values():
            pt.stragglers.clear()
            for i in list(pt.leases):
                self._release_lease(task, pt, i)
            for i in list(pt.inflight):
                self._release_inflight(task, pt, i)
            if not pt.complete:
                for i in pt.pieces():
                    self._unset_held(task, pt, i)
        for pt in readmit:  # excluded seeds: exclusion was judged against a bad list
            for i in pt.pieces():
                task.add_holder(pt.host, i)

    # --- failures ------------------------------------------------------------------

    def _failure(self, task: Task, pt: PeerTask, ev: ReportPieceFailure, now: float) -> Answer:
        cfg = self.config
        piece = ev.piece
        if not 0 <= piece < task.count:
            return Rejected("invalid", f"piece {piece} out of range 0..{task.count - 1}")
        if ev.parent_id is None:
            self._release_lease(task, pt, piece)
            return Ack()
        entry = pt.inflight.get(piece)
        matched = entry is not None and entry[0] == ev.parent_id
        if matched:
            self._release_inflight(task, pt, piece)
        if ev.reason == "straggler":
            if not pt.have[piece]:
                pt.stragglers[piece] = ev.parent_id
        elif ev.reason != "declined" and pt.stragglers.get(piece) == ev.parent_id:
            del pt.stragglers[piece]  # that fetch is over
            # The straggler report released its assignment without counting: how the
            # fetch ended (a piece timeout, an error) counts instead.
            matched = matched or ev.reason != "refused"
        parent = self._hosts.get(ev.parent_id)
        if ev.reason == "bad_hash":
            self._exclude(task, ev.parent_id, piece)
            if parent is not None and matched:
                self._penalise(parent, now, cfg.error_penalty, counted=True)
        elif parent is None:
            pass
        elif ev.reason == "error":
            self._penalise(parent, now, cfg.error_penalty, counted=matched)
            if matched:
                _recent(parent.errors, now, cfg.failure_window)
            if matched and len(parent.errors) >= cfg.avoid_after_failures:
                # Peers cannot reach it: it may be dead, and a dead host's source leases
                # would hold its ranges back until it expires.  Re-lease them now (if it
                # is alive after all, those ranges leave the registry twice).
                self._release_all_leases(parent)
        elif ev.reason == "slow":  # serving, slowly: failing only once benched
            # On a congested link every parent is slow now and then: treating that as
            # failing would send its pieces to the registry (needs_source).
            self._penalise(parent, now, cfg.slow_penalty, counted=matched, failing=False)
        elif ev.reason == "straggler":
            # Slower than the host's other pieces: most often merely busy (the seeds
            # everyone asks in a rollout serve several children at once).  Neither
            # penalised nor counted: a penalty would hide its rare pieces from everyone,
            # and a bench would send them to the registry again (measured: 1.1-1.3x the
            # image's egress).  The piece is offered from another holder; how the slow
            # fetch ends (a piece timeout, an error) counts instead.
            pass
        elif ev.reason == "missing":
            self._penalise(parent, now, cfg.error_penalty, counted=matched)
            ppt = task.peers.get(parent.host_id)
            # Only for a fetch we assigned: a late or stray 404 must not wipe a seed.
            if matched and ppt is not None and ppt.have[piece]:
                self._disown(task, ppt)
        elif ev.reason == "declined":
            pass  # the assignment is released (above): nothing happened to count
        else:  # refused: the parent was full
            parent.penalised_until = max(parent.penalised_until, now + cfg.refused_penalty)
        return Ack()

    def _exclude(self, task: Task, hid: str, piece: int) -> None:
        task.excluded.add(hid)
        ppt = task.peers.get(hid)
        if ppt is None:
            return
        for i in ppt.pieces():
            task.remove_holder(ppt.host, i)
        if ppt.have[piece]:
            ppt.have[piece] = 0
            ppt.held -= 1
            ppt.complete = False

    def _disown(self, task: Task, ppt: PeerTask) -> None:
        """``ppt``'s host does not have a piece it claimed: none of its records for the
        task can be trusted.  They are dropped, and the hashes only it vouched for
        (published by it, held by nobody now) withdrawn: the registry settles them."""
        hid = ppt.host.host_id
        pieces = ppt.pieces()
        for i in pieces:
            self._unset_held(task, ppt, i)
        for i in pieces:
            if task.publishers[i] == hid and not task.holders[i]:
                task.hashes[i] = None
                task.publishers[i] = None

    def _penalise(
        self, host: Host, now: float, base: float, *, counted: bool, failing: bool = True
    ) -> None:
        cfg = self.config
        duration = base
        if counted:
            n = _recent(host.failures, now, cfg.failure_window)
            benched = n >= cfg.avoid_after_failures
            duration = cfg.avoid_duration if benched else min(base * 2 ** (n - 1), cfg.max_penalty)
            if failing or benched:
                host.failing_until = max(host.failing_until, now + duration)
        host.penalised_until = max(host.penalised_until, now + duration)

    # --- assignment ----------------------------------------------------------------

    def _assign(self, task: Task, pt: PeerTask, max_pieces: int, now: float) -> Assignment:
        cfg = self.config
        if pt.complete or pt.held >= task.count:
            return Assignment(done=True, epoch=task.epoch)
        limit = min(max_pieces, cfg.max_pieces_per_assignment)
        hid = pt.host.host_id
        picked = _policy.pick_from_peers(task, pt, self._hosts, limit, now, cfg, self._rng)
        from_peers: list[PieceSource] = []
        piece_hashes: dict[int, str] = {}
        deadline = now + cfg.piece_timeout
        for i, parent in picked:
            pt.inflight[i] = (parent.host_id, deadline)
            parent.serve(hid, task.digest, i)
            self._timer(deadline, _INFLIGHT, hid, task, i)
            from_peers.append(PieceSource(i, parent.host_id, parent.addr))
            h = task.hashes[i]
            assert h is not None
            piece_hashes[i] = h
        room = min(
            limit - len(picked),
            cfg.source_run_pieces,
            cfg.max_source_leases_per_host - len(pt.leases),
            cfg.max_source_leases_per_task - task.leased_now,
        )
        run = _policy.pick_source_run(task, pt, self._hosts, room, now, cfg)
        lease_end = now + cfg.lease_timeout
        shared = hid not in task.excluded  # an excluded host's fetch publishes nothing
        task.leased_now += len(run)
        for i in run:
            pt.leases[i] = lease_end
            if shared:
                task.leases[i][hid] = lease_end
            self._timer(lease_end, _LEASE, hid, task, i)
        retry = 0.0 if (from_peers or run) else cfg.retry_after
        return Assignment(piece_hashes, from_peers, run, retry, False, task.epoch)
