"""Piece selection and parent evaluation: pure functions over the state, no mutation.

- :func:`pick_from_peers`: the asker's missing pieces that some parent can serve (hash
  known, at least one holder), rarest first (ties broken by a random rotation so that
  simultaneous askers spread), each given the best of a bounded random sample of its
  holders: same zone sampled first, then everyone; a candidate must not be the asker,
  excluded, penalised, at its upload slots, already sending that piece to
  ``max_uploads_per_piece`` children, already named ``max_pieces_per_parent`` times in
  this answer, or the parent the asker is still fetching that piece from as a straggler
  (``PeerTask.stragglers``); the lowest :func:`parent_score` wins.
- :func:`pick_source_run`: the first contiguous run of pieces that need the registry
  (:func:`needs_source`: hash unknown, no holder, or every holder failing), are not
  held, assigned or leased to the asker, and have the fewest leases below
  ``source_fanout`` (so a second lessee is only added to a range once every range has
  its first).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from ._config import SchedulerConfig
from ._state import Host, PeerTask, Task

__all__ = ["needs_source", "parent_score", "pick_from_peers", "pick_source_run"]


def parent_score(host: Host, extra: int, same_zone: bool, cfg: SchedulerConfig) -> float:
    """Lower is better: busy fraction of upload slots (counting ``extra`` uploads already
    given to it in this answer), CPU, and a penalty for another zone."""
    busy = (host.busy() + extra) / max(1, host.upload_slots)
    score = cfg.load_weight * busy + cfg.cpu_weight * host.load.cpu
    if not same_zone:
        score += cfg.zone_weight
    return score


def _usable(
    hid: str,
    asker: Host,
    task: Task,
    hosts: Mapping[str, Host],
    per_parent: Mapping[str, int],
    now: float,
    cfg: SchedulerConfig,
    avoid: str | None = None,
    piece: int | None = None,
) -> Host | None:
    if hid == asker.host_id or hid == avoid or hid in task.excluded:
        return None
    h = hosts.get(hid)
    if h is None or h.penalised_until > now:
        return None
    given = per_parent.get(hid, 0)
    if given >= cfg.max_pieces_per_parent or h.busy() + given >= h.upload_slots:
        return None
    if piece is not None and h.uploads_of(task.digest, piece) >= cfg.max_uploads_per_piece:
        return None
    return h


def choose_parent(
    task: Task,
    piece: int,
    asker: Host,
    hosts: Mapping[str, Host],
    per_parent: Mapping[str, int],
    now: float,
    cfg: SchedulerConfig,
    rng: random.Random,
    avoid: str | None = None,
) -> Host | None:
    """The best usable holder of ``piece`` for ``asker`` (never ``avoid``), or None."""
    k = cfg.parent_candidates
    best: Host | None = None
    best_score = float("inf")
    local = task.zone_holders[piece].get(asker.zone)
    pools = []
    if local:
        pools.append(local)
    if local is None or len(local) < len(task.holders[piece]):
        pools.append(task.holders[piece])
    for pool in pools:
        for hid in pool.sample(rng, k):
            h = _usable(hid, asker, task, hosts, per_parent, now, cfg, avoid, piece)
            if h is None:
                continue
            s = parent_score(h, per_parent.get(hid, 0), h.zone == asker.zone, cfg)
            if s < best_score:
                best, best_score = h, s
        if best is not None and best.zone == asker.zone:
            break  # a same-zone parent beats anything sampled from other zones
    return best


def pick_from_peers(
    task: Task,
    pt: PeerTask,
    hosts: Mapping[str, Host],
    limit: int,
    now: float,
    cfg: SchedulerConfig,
    rng: random.Random,
) -> list[tuple[int, Host]]:
    """Up to ``limit`` (piece, parent) pairs for the asker ``pt``."""
    n = task.count
    if limit <= 0 or n == 0:
        return []
    have, inflight, leases = pt.have, pt.inflight, pt.leases
    hashes, holders = task.hashes, task.holders
    offset = rng.randrange(n)
    wanted: list[tuple[int, int, int]] = []
    for i in range(n):
        if have[i] or i in inflight or i in leases or hashes[i] is None:
            continue
        c = len(holders[i])
        if c:
            wanted.append((c, (i - offset) % n, i))
    wanted.sort()
    out: list[tuple[int, Host]] = []
    per_parent: dict[str, int] = {}
    stragglers = pt.stragglers
    for _, _, i in wanted:
        avoid = stragglers.get(i) if stragglers else None
        parent = choose_parent(task, i, pt.host, hosts, per_parent, now, cfg, rng, avoid)
        if parent is None:
            continue
        per_parent[parent.host_id] = per_parent.get(parent.host_id, 0) + 1
        out.append((i, parent))
        if len(out) >= limit:
            break
    return out


def needs_source(
    task: Task, piece: int, hosts: Mapping[str, Host], now: float, cfg: SchedulerConfig
) -> bool:
    """No peer can serve ``piece`` now: its hash is unknown, nobody holds it, or each of
    its (few) holders is failing — penalised after a counted failure (unreachable, hung
    up, too slow, did not have what it announced).  Waiting for a failing holder could
    take as long as its penalty, and a hostile one never serves: the registry can.  Only
    checked for a piece with at most ``parent_candidates`` holders (a piece many hold is
    never stranded in practice, and this stays O(1) per piece)."""
    if task.needs_source(piece):
        return True
    holders = task.holders[piece]
    if len(holders) > cfg.parent_candidates:
        return False
    for hid in holders:
        h = hosts.get(hid)
        if h is not None and h.failing_until <= now:
            return False
    return True


def pick_source_run(
    task: Task,
    pt: PeerTask,
    hosts: Mapping[str, Host],
    limit: int,
    now: float,
    cfg: SchedulerConfig,
) -> list[int]:
    """One contiguous run (at most ``limit`` pieces) for the asker to fetch from the
    registry, or ``[]``."""
    if limit <= 0:
        return []
    have, inflight, leases = pt.have, pt.inflight, pt.leases
    task_leases = task.leases
    n = task.count

    def eligible(i: int, level: int) -> bool:
        return (
            not have[i]
            and i not in inflight
            and i not in leases
            and len(task_leases[i]) <= level
            and needs_source(task, i, hosts, now, cfg)
        )

    for level in range(cfg.source_fanout):
        for start in range(n):
            if eligible(start, level):
                run = [start]
                i = start + 1
                while i < n and len(run) < limit and eligible(i, level):
                    run.append(i)
                    i += 1
                return run
    return []
