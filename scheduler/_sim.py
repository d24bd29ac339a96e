"""A discrete-event simulator that drives a :class:`Scheduler` with modelled nodes.

The model, deliberately simple (it has no per-byte fluid sharing, so 10,000 nodes run
in seconds):

- A node's uplink is ``upload_slots`` lanes of ``node_up_bps / upload_slots`` each, and
  a peer transfer runs in one lane at ``min(lane, node_down_bps / download_slots)``; the
  scheduler never names a parent for more uploads than it has slots, so a transfer
  starts at once.  The registry's uplink is one FIFO stream at
  ``min(registry_bps, node_down_bps)``: a source run's pieces leave it back to back.
- A node asks (``Assign``) whenever it has free download slots and after each piece
  lands, fetches what it is told, reports each piece as it lands (``ReportPieces``,
  with its hash), and waits ``retry_after`` when told nothing.  When it holds every
  piece it sends ``CompleteTask`` and stays on as a seed.
- ``crash`` kills nodes silently at given times: transfers from them fail (the child
  reports ``error``), their heartbeats stop and the scheduler expires them.

It reports registry bytes ÷ blob size and completion times against a lower bound:
``max(size / registry, size / node_down, N·size / (registry + N·node_up))``.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._config import SchedulerConfig
from ._core import Scheduler
from ._events import (
    Assign,
    Assignment,
    CompleteTask,
    Event,
    Heartbeat,
    RegisterHost,
    ReportPieceFailure,
    ReportPieces,
    StartTask,
    Unknown,
)

__all__ = ["SimConfig", "SimResult", "simulate"]

MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    nodes: int = 8
    blob_size: int = 64 * MIB
    piece_size: int = 4 * MIB
    registry_bps: float = 100e6
    node_down_bps: float = 100e6
    node_up_bps: float = 100e6
    download_slots: int = 4
    upload_slots: int = 4
    zones: int = 1
    #: Per-node start times (default: everyone at 0).
    start_times: Sequence[float] | None = None
    #: Node index -> time it dies silently.
    crash: Mapping[int, float] = field(default_factory=dict)
    #: Heartbeat period (None: no heartbeats; then use a long heartbeat_timeout).
    heartbeat_interval: float | None = None
    seed: int = 0
    max_time: float = 3600.0


@dataclass(slots=True)
class SimResult:
    nodes: int
    blob_size: int
    registry_bytes: int
    #: Node index -> seconds from its start to holding the whole blob.
    completion: dict[int, float]
    makespan: float
    lower_bound: float
    scheduler_calls: int
    assign_calls: int
    peer_failures: int
    cross_zone_bytes: int
    wall_seconds: float
    unfinished: list[int]
    #: Registry bytes leased to nodes that crashed (lost with them unless copied first).
    crashed_lease_bytes: int = 0

    @property
    def registry_ratio(self) -> float:
        return self.registry_bytes / self.blob_size if self.blob_size else 0.0

    def summary(self) -> str:
        times = sorted(self.completion.values())
        median = times[len(times) // 2] if times else float("nan")
        return (
            f"N={self.nodes} registry={self.registry_ratio:.3f}x blob, "
            f"makespan={self.makespan:.3f}s (bound {self.lower_bound:.3f}s, "
            f"x{self.makespan / self.lower_bound:.2f}), median={median:.3f}s, "
            f"calls={self.scheduler_calls} (assign {self.assign_calls}), "
            f"failures={self.peer_failures}, wall={self.wall_seconds:.2f}s"
        )


@dataclass(slots=True, eq=False)
class _Node:
    idx: int
    hid: str
    zone: str
    start: float
    crash_at: float
    have: bytearray
    held: int = 0
    active: int = 0
    ask_at: float = float("inf")  # time of the pending ask (inf: none)
    ask_token: int = 0
    done_at: float | None = None
    started: bool = False
    leased_bytes: int = 0


# event kinds
_START, _ASK, _PEER_DONE, _SOURCE_DONE, _HEARTBEAT = range(5)


def simulate(cfg: SimConfig, sched_config: SchedulerConfig | None = None) -> SimResult:
    wall0 = time.perf_counter()
    sched = Scheduler(sched_config, seed=cfg.seed)
    digest = "sha256:" + hashlib.sha256(f"blob-{cfg.seed}".encode()).hexdigest()
    count = -(-cfg.blob_size // cfg.piece_size)
    hashes = [hashlib.sha256(f"{digest}/{i}".encode()).hexdigest() for i in range(count)]

    def plen(i: int) -> int:
        return min(cfg.piece_size, cfg.blob_size - i * cfg.piece_size)

    starts = list(cfg.start_times) if cfg.start_times is not None else [0.0] * cfg.nodes
    nodes = [
        _Node(
            i,
            f"n{i}",
            f"z{i % max(1, cfg.zones)}",
            starts[i],
            cfg.crash.get(i, float("inf")),
            bytearray(count),
        )
        for i in range(cfg.nodes)
    ]
    by_id = {n.hid: n for n in nodes}
    heap: list[tuple[float, int, int, int, int, int]] = []  # t, seq, kind, node, piece, parent
    seq = 0

    def push(t: float, kind: int, node: int, piece: int = -1, parent: int = -1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, node, piece, parent))

    calls = assigns = failures = cross = 0
    registry_bytes = 0
    reg_free = 0.0
    peer_rate = min(cfg.node_up_bps / cfg.upload_slots, cfg.node_down_bps / cfg.download_slots)
    remaining = sum(1 for n in nodes if n.crash_at == float("inf"))

    def call(ev: Event, t: float) -> object:
        nonlocal calls
        calls += 1
        ans = sched.handle(ev, t)
        if isinstance(ans, Unknown):
            raise AssertionError(f"simulated node got {ans} for {ev}")
        return ans

    def ask(n: _Node, t: float) -> None:
        """Schedule an ask at ``t`` unless one is due by then (a later one is superseded:
        like a daemon, a node asks again as soon as a piece lands)."""
        if n.ask_at <= t or n.done_at is not None or t >= n.crash_at:
            return
        n.ask_at = t
        n.ask_token += 1
        push(t, _ASK, n.idx, n.ask_token)

    def finish(n: _Node, t: float) -> None:
        nonlocal remaining
        if n.done_at is None:
            n.done_at = t
            call(CompleteTask(n.hid, digest), t)
            if n.crash_at == float("inf"):
                remaining -= 1

    for n in nodes:
        push(n.start, _START, n.idx)

    t = 0.0
    while heap and remaining > 0:
        t, _, kind, ni, piece, pi = heapq.heappop(heap)
        if t > cfg.max_time:
            break
        n = nodes[ni]
        if t >= n.crash_at:
            continue
        if kind == _START:
            n.started = True
            call(
                RegisterHost(
                    n.hid, f"node{ni}.sim:65002", zone=n.zone, upload_slots=cfg.upload_slots
                ),
                t,
            )
            call(StartTask(n.hid, digest, cfg.blob_size, cfg.piece_size), t)
            if cfg.heartbeat_interval is not None:
                push(t + cfg.heartbeat_interval, _HEARTBEAT, ni)
            ask(n, t)
        elif kind == _HEARTBEAT:
            call(Heartbeat(n.hid), t)
            assert cfg.heartbeat_interval is not None
            push(t + cfg.heartbeat_interval, _HEARTBEAT, ni)
        elif kind == _ASK:
            if piece != n.ask_token:
                continue  # superseded
            n.ask_at = float("inf")
            free = cfg.download_slots - n.active
            if n.done_at is not None or free <= 0:
                continue
            assigns += 1
            ans = call(Assign(n.hid, digest, free), t)
            assert isinstance(ans, Assignment)
            if ans.done:
                finish(n, t)
                continue
            for ps in ans.from_peers:
                p = by_id[ps.parent_id]
                assert ans.piece_hashes[ps.piece] == hashes[ps.piece]
                end = t + plen(ps.piece) / peer_rate
                n.active += 1
                push(end, _PEER_DONE, ni, ps.piece, p.idx)
            for i in ans.from_source:
                end = max(t, reg_free) + plen(i) / min(cfg.registry_bps, cfg.node_down_bps)
                reg_free = end
                registry_bytes += plen(i)
                n.leased_bytes += plen(i)
                n.active += 1
                push(end, _SOURCE_DONE, ni, i)
            if ans.from_peers or ans.from_source:
                if n.active < cfg.download_slots:
                    ask(n, t)
            else:
                ask(n, t + ans.retry_after)
        elif kind in (_PEER_DONE, _SOURCE_DONE):
            n.active -= 1
            if kind == _PEER_DONE and nodes[pi].crash_at <= t:
                failures += 1
                call(ReportPieceFailure(n.hid, digest, nodes[pi].hid, piece, "error"), t)
            else:
                if kind == _PEER_DONE and nodes[pi].zone != n.zone:
                    cross += plen(piece)
                source = kind == _SOURCE_DONE
                rep = ReportPieces(n.hid, digest, (piece,), {piece: hashes[piece]}, source)
                call(rep, t)
                if not n.have[piece]:
                    n.have[piece] = 1
                    n.held += 1
            if n.held == count:
                finish(n, t)
            else:
                ask(n, t)

    completion = {n.idx: n.done_at - n.start for n in nodes if n.done_at is not None}
    alive = [n for n in nodes if n.crash_at == float("inf")]
    unfinished = [n.idx for n in alive if n.done_at is None]
    first = min((n.start for n in nodes), default=0.0)
    ends = [n.done_at for n in alive if n.done_at is not None]
    makespan = (max(ends) - first) if ends else float("inf")
    size, big_n = cfg.blob_size, max(1, cfg.nodes)
    bound = max(
        size / cfg.registry_bps,
        size / cfg.node_down_bps,
        big_n * size / (cfg.registry_bps + big_n * cfg.node_up_bps),
    )
    return SimResult(
        nodes=cfg.nodes,
        blob_size=cfg.blob_size,
        registry_bytes=registry_bytes,
        completion=completion,
        makespan=makespan,
        lower_bound=bound,
        scheduler_calls=calls,
        assign_calls=assigns,
        peer_failures=failures,
        cross_zone_bytes=cross,
        wall_seconds=time.perf_counter() - wall0,
        unfinished=unfinished,
        crashed_lease_bytes=sum(n.leased_bytes for n in nodes if n.crash_at != float("inf")),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m scheduler._sim [N ...]``: print a rollout's figures for each N."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv) or ["3", "8", "100", "1000"]
    for arg in args:
        print(simulate(SimConfig(nodes=int(arg))).summary())


if __name__ == "__main__":
    main()
