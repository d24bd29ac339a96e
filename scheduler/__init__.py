"""The p2pdist scheduler: the swarm's picture and its decisions.

The algorithm is a pure state machine (:class:`Scheduler`, rules in ``_core``'s
docstring): daemons' events in, answers out, time passed in.  ``_state`` holds the
resources (hosts, tasks, per-host piece records), ``_policy`` the piece and parent
selection, ``_sim`` a discrete-event simulator that drives a :class:`Scheduler` with
thousands of modelled nodes.  The HTTP service around it lives elsewhere.
"""

from ._config import SchedulerConfig, load_scheduler_config
from ._core import Scheduler
from ._events import (
    Ack,
    Announce,
    Answer,
    Assign,
    Assignment,
    BlobMismatch,
    CompleteTask,
    Event,
    FailureReason,
    Heartbeat,
    HostLoad,
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
    "RegisterHost",
    "Rejected",
    "ReportPieceFailure",
    "ReportPieces",
    "Scheduler",
    "SchedulerConfig",
    "StartTask",
    "Unknown",
    "load_scheduler_config",
]
