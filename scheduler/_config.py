"""The scheduler's tunables: one frozen, keyword-only object with defaults."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Every number the scheduler's rules use.  Times are in seconds."""

    #: A host that sends nothing (no heartbeat, no event) for this long is expired.
    heartbeat_timeout: float = 30.0
    #: A source lease (the right to fetch a piece from the registry) lapses after this.
    lease_timeout: float = 30.0
    #: A piece assigned from a parent and not reported within this is offered again.
    piece_timeout: float = 15.0
    #: How many nodes may hold a source lease on the same piece at once.
    source_fanout: int = 1
    #: Longest contiguous run of pieces leased to one node in one answer (one Range
    #: request); a node asks again for more.
    source_run_pieces: int = 4
    #: Most outstanding source leases one node may hold on one task.
    max_source_leases_per_host: int = 8
    #: Cap on pieces (from peers and from the source together) in one answer.
    max_pieces_per_assignment: int = 16
    #: Cap on pieces one parent is named for in one answer.
    max_pieces_per_parent: int = 2
    #: Holders sampled per piece when choosing its parent (per zone pool).
    parent_candidates: int = 8
    #: Parent score weights (lower score wins): busy fraction, CPU (0..1), other zone.
    load_weight: float = 1.0
    cpu_weight: float = 0.25
    zone_weight: float = 1.0
    #: Penalties after a failure report: ``error`` (doubling per recent failure,
    #: capped at ``max_penalty``), ``slow``, ``refused`` (the parent was full).
    error_penalty: float = 5.0
    slow_penalty: float = 2.0
    refused_penalty: float = 0.5
    max_penalty: float = 60.0
    #: Failures older than this are forgotten; ``avoid_after_failures`` within the
    #: window bench the parent for ``avoid_duration``.
    failure_window: float = 60.0
    avoid_after_failures: int = 3
    avoid_duration: float = 120.0
    #: ``retry_after`` of an answer that assigns nothing (waiting for lessees/parents).
    retry_after: float = 0.1

    def __post_init__(self) -> None:
        ints = {
            "source_fanout": self.source_fanout,
            "source_run_pieces": self.source_run_pieces,
            "max_source_leases_per_host": self.max_source_leases_per_host,
            "max_pieces_per_assignment": self.max_pieces_per_assignment,
            "max_pieces_per_parent": self.max_pieces_per_parent,
            "parent_candidates": self.parent_candidates,
            "avoid_after_failures": self.avoid_after_failures,
        }
        for name, value in ints.items():
            if value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, not {value}")
        for name in ("heartbeat_timeout", "lease_timeout", "piece_timeout", "retry_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SchedulerConfig.{name} must be > 0")
