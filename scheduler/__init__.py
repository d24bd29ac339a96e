"""The p2pdist scheduler: the swarm's picture and its decisions.

The algorithm is a pure state machine (:class:`Scheduler`, rules in ``_core``'s
docstring): daemons' events in, answers out, time passed in.  ``_state`` holds the
resources (hosts, tasks, per-host piece records), ``_policy`` the piece and parent
selection, ``_sim`` a discrete-event simulator that drives a :class:`Scheduler` with
thousands of modelled nodes, ``_preheat`` the preheat jobs (node selection, progress).
The HTTP service around it lives elsewhere.
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
    PreheatOrder,
    PreheatReport,
    PreheatState,
    RegisterHost,
    Rejected,
    ReportPieceFailure,
    ReportPieces,
    StartTask,
    Unknown,
)
from ._preheat import (
    Candidate,
    NodeProgress,
    NotEnoughNodes,
    PreheatError,
    PreheatJob,
    Preheats,
    Selection,
    choose_nodes,
)

__all__ = [
    "Ack",
    "Announce",
    "Answer",
    "Assign",
    "Assignment",
    "BlobMismatch",
    "Candidate",
    "CompleteTask",
    "Event",
    "FailureReason",
    "Heartbeat",
    "HostLoad",
    "LeaveHost",
    "LeaveTask",
    "NodeProgress",
    "NotEnoughNodes",
    "PieceSource",
    "PreheatError",
    "PreheatJob",
    "PreheatOrder",
    "PreheatReport",
    "PreheatState",
    "Preheats",
    "RegisterHost",
    "Rejected",
    "ReportPieceFailure",
    "ReportPieces",
    "Scheduler",
    "SchedulerConfig",
    "Selection",
    "StartTask",
    "Unknown",
    "choose_nodes",
    "load_scheduler_config",
]
