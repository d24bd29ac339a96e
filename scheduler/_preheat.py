"""Preheat: warm an image on chosen nodes before a rollout.  Pure state, no I/O.

An operator asks the scheduler (``POST /api/v1/preheat``) to warm an image on one node,
N nodes, a percentage of the nodes or all of them.  The scheduler holds no registry
credentials and does not look at the image: it only picks the nodes and keeps the score.

The rules, in one place
-----------------------

Selection (:class:`Selection`, :func:`choose_nodes`)
    ``one`` = 1 node, ``nodes`` = N, ``percent`` = ceil(P% of the registered hosts), at
    least 1, ``all`` = every host registered when the job is created.  N must be 1..hosts
    and P in (0, 100]; asking for more nodes than are registered is refused
    (:class:`PreheatError`), not silently shrunk.  Nodes are spread across zones (round
    robin over the zones, so a 2-node preheat in 2 racks lands in both) and, within a
    zone, the least loaded go first: fewest active tasks + preheat jobs, then the
    smallest fraction of upload slots in use, then CPU, then host id (deterministic).
    The scheduler does not know which blobs an image is made of (only the daemons resolve
    manifests), so it cannot prefer hosts that already hold some: a node that does simply
    finishes at once.

Delivery
    A chosen host learns of its job in the answer to its next heartbeat
    (:class:`PreheatOrder` in :attr:`Ack.preheat`), and is told again in every answer
    until it reports the job ``done`` or ``failed``; the daemon runs each job id once.
    Its heartbeats carry a :class:`PreheatReport` per job (blobs and bytes done / total).

Pinning
    The first node that reports the digest it resolved a tag to pins the job to it: later
    orders name that digest, so every node warms the same image even if the tag moves
    meanwhile.  A node that reports another digest is marked ``failed``.

Failures
    A chosen host that leaves the swarm or expires (no heartbeat) before it is done is
    marked ``failed`` ("left the swarm"); the job is not reassigned (a preheat asked for
    specific coverage; the operator sees which node failed and can preheat again).
    ``done`` and ``failed`` are final for a node.  The job is ``running`` while a node is
    ``pending`` or ``running``, then ``done`` if every node is, else ``failed``.

Memory
    At most ``max_jobs`` jobs are kept; the oldest finished jobs are dropped first.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._events import PreheatOrder, PreheatReport, PreheatState

__all__ = [
    "Candidate",
    "NodeProgress",
    "NotEnoughNodes",
    "PreheatError",
    "PreheatJob",
    "Preheats",
    "Selection",
    "choose_nodes",
]

SelectionMode = Literal["one", "nodes", "percent", "all"]
JobState = Literal["running", "done", "failed"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_FINAL: frozenset[str] = frozenset({"done", "failed"})
MAX_ERROR = 300


class PreheatError(ValueError):
    """A preheat request that cannot be served: a bad selection (``NotEnoughNodes``:
    one the swarm cannot fill now)."""


class NotEnoughNodes(PreheatError):
    """More nodes asked for than are registered (or none is)."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which nodes: ``one``, ``nodes`` (``value`` = N), ``percent`` (``value`` = P) or
    ``all``."""

    mode: SelectionMode = "one"
    value: float = 1

    def __post_init__(self) -> None:
        if self.mode == "nodes":
            if self.value != int(self.value) or self.value < 1:
                raise PreheatError(f"nodes must be a whole number >= 1, not {self.value:g}")
        elif self.mode == "percent":
            if not 0 < self.value <= 100:
                raise PreheatError(
                    f"percent must be more than 0 and at most 100, not {self.value:g}"
                )
        elif self.mode not in ("one", "all"):
            raise PreheatError(f"unknown selection {self.mode!r}")

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Selection:
        """From a request body: at most one of ``"nodes": N``, ``"percent": P``,
        ``"all": true``; none of them = one node."""
        given = [k for k in ("nodes", "percent") if body.get(k) is not None]
        if body.get("all") is not None and body.get("all") is not False:
            given.append("all")
        if len(given) > 1:
            raise PreheatError(f"give at most one of nodes, percent, all (got {', '.join(given)})")
        if not given:
            return cls("one")
        key = given[0]
        value = body[key]
        if key == "all":
            if value is not True:
                raise PreheatError("all must be true or false")
            return cls("all")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PreheatError(f"{key} must be a number")
        if not math.isfinite(value):
            raise PreheatError(f"{key} must be a number")
        if key == "nodes" and not isinstance(value, int):
            raise PreheatError("nodes must be a whole number")
        return cls("nodes" if key == "nodes" else "percent", value)

    def count(self, hosts: int) -> int:
        """How many of ``hosts`` registered hosts this selects (PreheatError if none or
        not enough are registered)."""
        if hosts < 1:
            raise NotEnoughNodes("no nodes are registered with the scheduler")
        if self.mode == "one":
            return 1
        if self.mode == "all":
            return hosts
        if self.mode == "percent":
            return max(1, math.ceil(self.value * hosts / 100 - 1e-9))
        n = int(self.value)
        if n > hosts:
            raise NotEnoughNodes(f"{n} nodes asked for, only {hosts} registered")
        return n

    def describe(self) -> str:
        if self.mode == "nodes":
            return f"{int(self.value)} nodes"
        if self.mode == "percent":
            return f"{self.value:g}% of the nodes"
        return "all nodes" if self.mode == "all" else "one node"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A registered host as the selection sees it."""

    host_id: str
    zone: str = ""
    active: int = 0
    """Tasks it is downloading plus preheat jobs it is running."""
    busy: float = 0.0
    """Fraction of its upload slots in use."""
    cpu: float = 0.0


def choose_nodes(candidates: Sequence[Candidate], count: int) -> list[str]:
    """``count`` host ids: round robin over the zones (the zone whose best host is least
    loaded first), least loaded first within each zone."""

    def key(c: Candidate) -> tuple[int, float, float, str]:
        return (c.active, c.busy, c.cpu, c.host_id)

    zones: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=key):
        zones.setdefault(c.zone, []).append(c)
    queues = sorted(zones.values(), key=lambda q: (key(q[0]), q[0].zone))
    chosen: list[str] = []
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(chosen) < count:
                chosen.append(q[depth].host_id)
        depth += 1
    return chosen


@dataclass(slots=True)
class NodeProgress:
    state: PreheatState = "pending"
    blobs_done: int = 0
    blobs_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    manifest: str = ""
    error: str = ""
    exit_code: int = 0
    updated: float = 0.0

    def to_json(self, host_id: str) -> dict[str, Any]:
        return {
            "host_id": host_id,
            "state": self.state,
            "blobs_done": self.blobs_done,
            "blobs_total": self.blobs_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "manifest": self.manifest,
            "error": self.error,
            "exit_code": self.exit_code,
        }


@dataclass(slots=True, eq=False)
class PreheatJob:
    job_id: str
    image: str
    platform: str
    selection: Selection
    created: float
    nodes: dict[str, NodeProgress] = field(default_factory=dict)
    manifest: str = ""
    """The digest the job is pinned to ("" until a node resolved the image)."""
    finished: float | None = None

    @property
    def state(self) -> JobState:
        states = [p.state for p in self.nodes.values()]
        if any(s not in _FINAL for s in states):
            return "running"
        return "done" if all(s == "done" for s in states) else "failed"

    def order(self) -> PreheatOrder:
        return PreheatOrder(self.job_id, self.image, self.platform, self.manifest)

    def to_json(self, now: float) -> dict[str, Any]:
        progress = list(self.nodes.values())
        end = self.finished if self.finished is not None else now
        return {
            "id": self.job_id,
            "image": self.image,
            "platform": self.platform,
            "selection": self.selection.describe(),
            "manifest": self.manifest,
            "state": self.state,
            "nodes_total": len(progress),
            "nodes_done": sum(1 for p in progress if p.state == "done"),
            "nodes_failed": sum(1 for p in progress if p.state == "failed"),
            "seconds": round(max(0.0, end - self.created), 3),
            "nodes": [p.to_json(h) for h, p in self.nodes.items()],
        }

    def _fail(self, host_id: str, message: str, now: float, exit_code: int = 4) -> None:
        p = self.nodes[host_id]
        if p.state in _FINAL:
            return
        p.state, p.error, p.exit_code, p.updated = "failed", message[:MAX_ERROR], exit_code, now
        self._check_finished(now)

    def _check_finished(self, now: float) -> None:
        if self.finished is None and self.state != "running":
            self.finished = now


class Preheats:
    """Every preheat job the scheduler knows (see the module docstring for the rules)."""

    def __init__(self, *, max_jobs: int = 256) -> None:
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, PreheatJob] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> PreheatJob | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[PreheatJob]:
        return list(self._jobs.values())

    def create(
        self,
        job_id: str,
        image: str,
        platform: str,
        selection: Selection,
        candidates: Sequence[Candidate],
        now: float,
    ) -> PreheatJob:
        if job_id in self._jobs:
            raise PreheatError(f"preheat job {job_id} exists")
        chosen = choose_nodes(candidates, selection.count(len(candidates)))
        manifest = image.rpartition("@")[2] if _DIGEST.fullmatch(image.rpartition("@")[2]) else ""
        job = PreheatJob(job_id, image, platform, selection, now, manifest=manifest)
        for hid in chosen:
            job.nodes[hid] = NodeProgress(updated=now)
        self._jobs[job_id] = job
        self._prune()
        return job

    def _prune(self) -> None:
        if len(self._jobs) <= self.max_jobs:
            return
        for jid in [j.job_id for j in self._jobs.values() if j.state != "running"]:
            if len(self._jobs) <= self.max_jobs:
                return
            del self._jobs[jid]
        while len(self._jobs) > self.max_jobs:  # all running: the oldest go anyway
            self._jobs.popitem(last=False)

    def active_count(self, host_id: str) -> int:
        return sum(
            1
            for j in self._jobs.values()
            if (p := j.nodes.get(host_id)) is not None and p.state not in _FINAL
        )

    def orders_for(self, host_id: str) -> tuple[PreheatOrder, ...]:
        """The jobs ``host_id`` is to run: chosen, not yet done or failed."""
        return tuple(
            j.order()
            for j in self._jobs.values()
            if (p := j.nodes.get(host_id)) is not None and p.state not in _FINAL
        )

    def report(self, host_id: str, reports: Iterable[PreheatReport], now: float) -> None:
        """Apply a heartbeat's reports.  Reports for jobs the host was not chosen for, or
        for nodes already done or failed, change nothing."""
        for r in reports:
            job = self._jobs.get(r.job_id)
            p = job.nodes.get(host_id) if job is not None else None
            if job is None or p is None or p.state in _FINAL:
                continue
            manifest = r.manifest if _DIGEST.fullmatch(r.manifest) else ""
            if manifest and job.manifest and manifest != job.manifest:
                job._fail(
                    host_id,
                    f"resolved {job.image} to {manifest}, but the job is pinned to "
                    f"{job.manifest} (the tag moved?)",
                    now,
                )
                continue
            if manifest and not job.manifest:
                job.manifest = manifest
            p.blobs_total = max(0, r.blobs_total)
            p.blobs_done = min(max(0, r.blobs_done), p.blobs_total)
            p.bytes_total = max(0, r.bytes_total)
            p.bytes_done = min(max(0, r.bytes_done), p.bytes_total)
            p.manifest = manifest or p.manifest
            p.updated = now
            if r.state == "failed":
                job._fail(host_id, r.error or "failed", now, r.exit_code or 4)
            elif r.state in ("running", "done"):
                p.state = r.state
                job._check_finished(now)

    def host_gone(self, host_id: str, now: float) -> None:
        """The host left the swarm or expired: every job it had not finished fails there."""
        for job in self._jobs.values():
            if host_id in job.nodes:
                job._fail(host_id, "the node left the swarm (stopped or stopped heartbeating)", now)
