"""What goes into the scheduler (events, each from one daemon) and what comes out
(answers).  All frozen dataclasses; the rules that connect them are in ``_core``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Ack",
    "Announce",
    "Answer",
    "Assign",
    "Assignment",
    "BlobMismatch",
    "CompleteTask",
    "Event",
    "FailureReason",
    "Heartbeat",
    "HostLoad",
    "LeaveHost",
    "LeaveTask",
    "PieceSource",
    "PreheatOrder",
    "PreheatReport",
    "PreheatState",
    "RegisterHost",
    "Rejected",
    "ReportPieceFailure",
    "ReportPieces",
    "StartTask",
    "Unknown",
]

FailureReason = Literal["bad_hash", "error", "slow", "refused", "missing", "straggler", "declined"]
"""Why a piece did not come from its parent (the rules are in ``_core``):

- ``bad_hash``: the bytes did not match the piece-hash list;
- ``error``: no usable answer (unreachable, hung up, malformed, timed out mid-body);
- ``slow``: the piece did not arrive within the host's piece timeout: it gave up;
- ``refused``: the parent was full (503);
- ``missing``: the parent does not have the piece it was named for (404, 409);
- ``straggler``: the piece is taking far longer than the host's other pieces; the
  fetch goes on, but the host wants the piece from another parent too (endgame);
- ``declined``: the host did not start the fetch (an answer given before its straggler
  report named that parent again): the assignment is released, nothing else.
"""
PreheatState = Literal["pending", "running", "done", "failed"]
"""A node's part in a preheat job (``_preheat``)."""


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostLoad:
    """A daemon's load, as sent in its heartbeat."""

    upload_slots_in_use: int = 0
    up_bps: float = 0.0
    down_bps: float = 0.0
    cpu: float = 0.0  # 0..1 of the machine
    rss: int = 0
    free_disk: int = 0


@dataclass(frozen=True, slots=True)
class RegisterHost:
    """A daemon introduces itself (again: re-registering only updates the fields)."""

    host_id: str
    addr: str
    zone: str = ""
    version: str = ""
    upload_slots: int = 4
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreheatReport:
    """A daemon's progress on one preheat job (``scheduler._preheat``), sent in every
    heartbeat until the scheduler stops ordering the job.  ``manifest``: the digest the
    daemon resolved the image to; ``exit_code``: the CLI exit code of its error."""

    job_id: str
    state: PreheatState
    blobs_done: int = 0
    blobs_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    manifest: str = ""
    error: str = ""
    exit_code: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    host_id: str
    load: HostLoad = HostLoad()
    preheat: tuple[PreheatReport, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaveHost:
    """A daemon shuts down: its pieces stop being offered, its leases are released."""

    host_id: str


@dataclass(frozen=True, slots=True)
class StartTask:
    """The host wants blob ``digest`` (``size`` bytes cut into ``piece_size`` pieces)."""

    host_id: str
    digest: str
    size: int
    piece_size: int


@dataclass(frozen=True, slots=True)
class Announce:
    """The host holds ``pieces`` of the blob (or all of it, ``complete``): sent at daemon
    start and whenever the scheduler answers :class:`Unknown`.  ``hashes`` (sha256 hex per
    piece) let a restarted scheduler rebuild the task's piece-hash list."""

    host_id: str
    digest: str
    size: int
    piece_size: int
    pieces: tuple[int, ...] = ()
    complete: bool = False
    hashes: Mapping[int, str] | None = None


@dataclass(frozen=True, slots=True)
class ReportPieces:
    """The host now holds these verified pieces.  ``source=True``: fetched from the
    registry, and ``hashes`` is what the host computed, which publishes them to the hash
    list.  ``epoch`` is the :attr:`Assignment.epoch` the pieces were fetched under."""

    host_id: str
    digest: str
    pieces: tuple[int, ...]
    hashes: Mapping[int, str] | None = None
    source: bool = False
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class ReportPieceFailure:
    """Fetching ``piece`` from ``parent_id`` failed (``parent_id=None``: from the registry;
    this releases the source lease), or, for ``reason="straggler"``, is going on too
    slowly and the host asks for the piece from another parent as well."""

    host_id: str
    digest: str
    parent_id: str | None
    piece: int
    reason: FailureReason = "error"


@dataclass(frozen=True, slots=True)
class CompleteTask:
    """The host holds the whole blob and checked it against its digest: it is a seed."""

    host_id: str
    digest: str
    hashes: Mapping[int, str] | None = None


@dataclass(frozen=True, slots=True)
class BlobMismatch:
    """The whole-blob digest check failed although every piece matched the hash list,
    or passed with registry pieces the list rejected: the list is poisoned.  ``epoch``
    (from the assignments) makes repeats harmless."""

    host_id: str
    digest: str
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class LeaveTask:
    """The host dropped the blob (evicted, cancelled): it no longer offers its pieces."""

    host_id: str
    digest: str


@dataclass(frozen=True, slots=True)
class Assign:
    """Query: what should this host fetch next, and from whom (at most ``max_pieces``)?

    ``wait``: seconds the service may hold the question while nothing is assignable
    (a long poll: answered as soon as something is, else with ``retry_after`` when the
    wait ends).  The state machine ignores it; 0 answers at once."""

    host_id: str
    digest: str
    max_pieces: int = 16
    wait: float = 0.0


Event = (
    RegisterHost
    | Heartbeat
    | LeaveHost
    | StartTask
    | Announce
    | ReportPieces
    | ReportPieceFailure
    | CompleteTask
    | BlobMismatch
    | LeaveTask
    | Assign
)


# --- answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreheatOrder:
    """Warm ``image`` (``REGISTRY/REPO[:TAG][@DIGEST]``) for ``platform`` ("": the
    daemon's own) into the store: every blob of its manifest.  ``manifest``: the digest
    the job is pinned to once a node resolved the tag (fetch that, not the tag)."""

    job_id: str
    image: str
    platform: str = ""
    manifest: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """Done.  ``rejected``: reported pieces not accepted (hash unknown or different from the
    list, out of range, stale epoch); the daemon must drop and refetch them.  ``preheat``
    (answering a :class:`Heartbeat`): the preheat jobs this host is to run or go on
    running; a job no longer listed is finished (or forgotten) for the scheduler."""

    rejected: tuple[int, ...] = ()
    preheat: tuple[PreheatOrder, ...] = ()


@dataclass(frozen=True, slots=True)
class Unknown:
    """The scheduler does not know this host (re-register, then re-announce every task) or
    this task for this host (re-announce it: :class:`Announce` or :class:`StartTask`)."""

    kind: Literal["host", "task"]


@dataclass(frozen=True, slots=True)
class Rejected:
    """The event is malformed, or conflicts with the task's plan (``size``/``piece_size``
    then give the plan the swarm uses)."""

    reason: Literal["invalid", "plan_conflict"]
    message: str
    size: int | None = None
    piece_size: int | None = None


@dataclass(frozen=True, slots=True)
class PieceSource:
    piece: int
    parent_id: str
    parent_addr: str


@dataclass(frozen=True, slots=True)
class Assignment:
    """The answer to :class:`Assign`.

    - ``from_peers``: fetch these pieces from these parents and check each against
      ``piece_hashes`` (which holds the hash of every piece in ``from_peers``).
    - ``from_source``: fetch these pieces from the registry (contiguous, ascending: one
      Range request), hash them, and report them with ``source=True``.
    - nothing assigned and not ``done``: ask again after ``retry_after`` seconds.
    - ``done``: the host holds every piece; assemble, check the digest, then send
      :class:`CompleteTask` (or :class:`BlobMismatch`).
    """

    piece_hashes: dict[int, str] = field(default_factory=dict)
    from_peers: list[PieceSource] = field(default_factory=list)
    from_source: list[int] = field(default_factory=list)
    retry_after: float = 0.0
    done: bool = False
    epoch: int = 0


Answer = Ack | Unknown | Rejected | Assignment
