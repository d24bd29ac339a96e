"""The daemon's readiness: what ``GET /readyz`` checks and answers.

* **store**: every directory the store writes in (``blobs``, ``tasks``, ``tmp``) takes a
  new file (created, written, removed) — a full or read-only disk fails it;
* **listeners**: the peer server's and the registry proxy's sockets are open (the local
  API answering is its own proof);
* **scheduler**: the last exchange with it (heartbeats every few seconds) succeeded.

The answer is ``200 {"status": "ok"}`` when all hold; ``200 {"status": "degraded"}`` when
only the scheduler is unreachable — the daemon still serves, from the registry and its
local store, so it stays in rotation; ``503 {"status": "unavailable"}`` when the store is
not writable or a listener is closed.  The body always holds every check.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = ["DEGRADED_MESSAGE", "Readiness", "StoreProbe", "check_readiness", "probe_writable"]

DEGRADED_MESSAGE = "degraded: scheduler unreachable, serving from registry/local store"

STORE_DIRS = ("blobs", "tasks", "tmp")


def probe_writable(root: Path, subdirs: Iterable[str] = STORE_DIRS) -> str | None:
    """None when a file can be created, written and removed in each of ``root``'s
    ``subdirs``; otherwise why not (one line).  Blocking: run it in a worker thread."""
    for sub in subdirs:
        path = root / sub / f".readyz-{uuid.uuid4().hex}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            os.unlink(path)
        except OSError as exc:
            return f"{root / sub}: {exc.strerror or exc}"
    return None


class StoreProbe:
    """:func:`probe_writable` at most once per ``ttl`` seconds, however many ask at once
    (``/readyz`` answers on the peer port too, where anyone may call it)."""

    def __init__(self, root: Path, ttl: float = 2.0) -> None:
        self.root = root
        self.ttl = ttl
        self._lock = trio.Lock()
        self._at = float("-inf")
        self._problem: str | None = None

    async def check(self) -> str | None:
        async with self._lock:
            if trio.current_time() - self._at >= self.ttl:
                self._problem = await trio.to_thread.run_sync(probe_writable, self.root)
                self._at = trio.current_time()
            return self._problem


def _open(listeners: Sequence[trio.SocketListener]) -> bool:
    return bool(listeners) and all(lst.socket.fileno() >= 0 for lst in listeners)


@dataclass(frozen=True, slots=True)
class Readiness:
    status: int
    body: dict[str, Any]


async def check_readiness(
    *,
    host_id: str,
    probe: StoreProbe,
    listeners: Mapping[str, Sequence[trio.SocketListener] | None],
    scheduler: bool | None,
    scheduler_configured: bool,
) -> Readiness:
    """``probe``: the (cached) store check.  ``listeners``: name → its sockets (None: that
    listener is off).  ``scheduler``: whether the last exchange succeeded (None: none
    yet)."""
    problem = await probe.check()
    data_dir = probe.root
    store: dict[str, Any] = {"ok": problem is None, "path": str(data_dir)}
    if problem is not None:
        store["error"] = problem
    listening: dict[str, Any] = {"ok": True}
    for name, socks in listeners.items():
        if socks is None:
            listening[name] = "off"
            continue
        up = _open(socks)
        listening[name] = "up" if up else "down"
        listening["ok"] = listening["ok"] and up
    if not scheduler_configured:
        sched: dict[str, Any] = {"ok": True, "state": "none configured"}
    elif scheduler is None:
        sched = {"ok": True, "state": "connecting"}
    else:
        sched = {"ok": scheduler, "state": "reachable" if scheduler else "unreachable"}
    body: dict[str, Any] = {
        "host_id": host_id,
        "checks": {"store": store, "listeners": listening, "scheduler": sched},
    }
    if not (store["ok"] and listening["ok"]):
        body["status"] = "unavailable"
        reasons = [
            "store not writable" if not store["ok"] else "",
            "a listener is down" if not listening["ok"] else "",
        ]
        body["message"] = "; ".join(r for r in reasons if r)
        return Readiness(503, body)
    if not sched["ok"]:
        body["status"] = "degraded"
        body["message"] = DEGRADED_MESSAGE
        return Readiness(200, body)
    body["status"] = "ok"
    return Readiness(200, body)
