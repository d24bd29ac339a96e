"""The daemon's side of the scheduler API: events as JSON over HTTP, failover between
scheduler URLs, and the re-registration dance after a scheduler restart.

A restarted scheduler knows nothing: it answers :class:`~scheduler.Unknown`.  The client
then registers the host again, re-announces every blob and partial task the node holds
(so the scheduler rebuilds its picture from the daemons), and repeats the request.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NoReturn, Protocol

import httpx
import trio

from scheduler import (
    Ack,
    Announce,
    Answer,
    Assign,
    Assignment,
    BlobMismatch,
    CompleteTask,
    Heartbeat,
    HostLoad,
    LeaveHost,
    LeaveTask,
    PreheatOrder,
    PreheatReport,
    RegisterHost,
    Rejected,
    ReportPieceFailure,
    ReportPieces,
    StartTask,
    Unknown,
)
from scheduler._codec import decode_answer, encode

from .digest import Digest
from .errors import NetworkError, P2PDistError, PlanConflict
from .peerclient import PeerConnections
from .swarm import FailureReason

__all__ = ["PreheatLink", "SchedulerClient"]

log = logging.getLogger("p2pdist.schedclient")

AnnounceFn = Callable[[], Awaitable[list[Announce]]]


ROUND_PAUSE = 0.5
"""Seconds between two rounds over the scheduler URLs (see ``SchedulerClient._post``)."""


NO_WAIT_RETRY = 300.0
"""Seconds a scheduler that refused ``Assign.wait`` (from before long polls) is asked
without it before trying again."""


class SchedulerUnavailable(NetworkError):
    pass


class PreheatLink(Protocol):
    """What the heartbeat carries for preheat (:class:`p2pdist.preheater.Preheater`)."""

    def reports(self) -> tuple[PreheatReport, ...]: ...

    def apply(self, orders: tuple[PreheatOrder, ...]) -> None: ...

    async def wait_changed(self) -> None: ...


class SchedulerClient:
    """Implements :class:`p2pdist.swarm.SchedulerLink` for one host."""

    def __init__(
        self,
        urls: Sequence[str],
        host: RegisterHost,
        *,
        http: httpx.AsyncClient,
        announcements: AnnounceFn,
        timeout: float = 5.0,
        lean: PeerConnections | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one scheduler URL is needed")
        self.urls = list(urls)
        self.host = host
        self.http = http
        self.lean = lean
        """Plain-HTTP schedulers are asked through this (pooled sockets, no HTTP library
        layers: each piece costs one or more round trips); https ones through ``http``."""
        self.announcements = announcements
        self.timeout = timeout
        self._current = 0
        self._no_wait_until = float("-inf")
        self._registered = False
        self._register_lock = trio.Lock()
        self._plans: dict[str, tuple[int, int]] = {}
        self._complete: set[str] = set()
        """Complete blobs the scheduler has been told of (announced or completed)."""
        self.reachable: bool | None = None
        """Whether the last exchange with a scheduler succeeded (None: none yet)."""
        self._leaves = 0
        self._left: dict[str, int] = {}
        """Blobs this host left (evicted) -> the count of leaves when it did: a listing of
        the store taken before that is stale for them."""

    @property
    def host_id(self) -> str:
        return self.host.host_id

    # -- transport ------------------------------------------------------------------------

    async def _post(self, event: Any) -> Answer:
        """Send ``event`` to the current scheduler, failing over to the others; every URL
        is tried twice (half a second apart) before the scheduler counts as unreachable:
        a download then goes on from the registry alone, so a single stall of a busy
        scheduler must not be taken for its death (seen at N=16 on 2 cores: 1.38x the
        registry's bytes)."""
        body = encode(event)
        last: Exception | None = None
        n = len(self.urls)
        for attempt in range(2 * n):
            if attempt == n:
                await trio.sleep(ROUND_PAUSE)
            url = self.urls[(self._current + attempt) % n]
            try:
                with trio.fail_after(self.timeout):
                    status, data = await self._send(url, body)
            except (httpx.HTTPError, NetworkError, trio.TooSlowError) as exc:
                last = exc
                continue
            if status >= 500:
                last = NetworkError(f"scheduler {url} answered {status}")
                continue
            self.reachable = True
            if status != 200:
                text = data[:200].decode("utf-8", "replace")
                raise NetworkError(
                    f"scheduler {url} refused {type(event).__name__}: {status} {text}"
                )
            self._current = (self._current + attempt) % n
            try:
                return decode_answer(json.loads(data))
            except (ValueError, RecursionError) as exc:
                raise NetworkError(f"scheduler {url}: malformed answer: {exc}") from None
        self.reachable = False
        raise SchedulerUnavailable(
            f"no scheduler reachable ({', '.join(self.urls)}): {type(last).__name__}"
        )

    async def _send(self, url: str, body: Any) -> tuple[int, bytes]:
        if self.lean is not None and url.startswith("http://"):
            data = json.dumps(body, separators=(",", ":")).encode()
            return await self.lean.post(url.removeprefix("http://"), "/api/v1/events", data)
        resp = await self.http.post(f"{url}/api/v1/events", json=body)
        return resp.status_code, resp.content

    async def call(self, event: Any) -> Answer:
        """Send ``event``; on ``Unknown`` re-register/re-announce and send it again."""
        if not self._registered:
            await self.register()
        answer = await self._post(event)
        if isinstance(answer, Unknown):
            if answer.kind == "host":
                self._registered = False
                await self.register()
            else:
                await self._reannounce_task(getattr(event, "digest", ""))
            answer = await self._post(event)
        return answer

    async def register(self) -> None:
        async with self._register_lock:
            if self._registered:
                return
            answer = await self._post(self.host)
            if not isinstance(answer, Ack):
                raise NetworkError(f"scheduler refused registration: {answer}")
            for ann in await self.announcements():
                await self._post(ann)
                if ann.complete:
                    self._complete.add(ann.digest)
            self._registered = True

    async def announce_new_blobs(self) -> int:
        """Announce complete blobs that appeared in the store without a download of ours
        (``p2pdist import``); how many were new."""
        if not self._registered:
            return 0
        new = 0
        leaves = self._leaves
        for ann in await self.announcements():
            if ann.complete and ann.digest not in self._complete:
                if self._left.get(ann.digest, 0) > leaves:
                    continue  # evicted since the store was listed: not ours to offer
                await self.call(ann)
                self._complete.add(ann.digest)
                new += 1
        self._left = {d: n for d, n in self._left.items() if n > leaves}
        return new

    async def _reannounce_task(self, digest: str) -> None:
        for ann in await self.announcements():
            if ann.digest == digest:
                await self._post(ann)
                return
        plan = self._plans.get(digest)
        if plan is not None:
            await self._post(StartTask(self.host_id, digest, *plan))

    async def heartbeat_forever(
        self,
        load: Callable[[], HostLoad],
        interval: float = 5.0,
        *,
        preheat: PreheatLink | None = None,
    ) -> NoReturn:
        """Heartbeat every ``interval`` seconds.  With ``preheat``: each beat carries its
        reports, the answer's orders go to it, and a job ending beats at once."""
        while True:
            try:
                reports = preheat.reports() if preheat is not None else ()
                answer = await self.call(Heartbeat(self.host_id, load(), reports))
                if preheat is not None and isinstance(answer, Ack):
                    preheat.apply(answer.preheat)
                await self.announce_new_blobs()
            except (P2PDistError, httpx.HTTPError) as exc:
                # Never let the heartbeat take the daemon down: try again next time.
                log.warning("heartbeat: %s", exc)
            with trio.move_on_after(interval):
                if preheat is not None:
                    await preheat.wait_changed()
                else:
                    await trio.sleep_forever()

    async def update_host(self, upload_slots: int) -> None:
        """Tell the scheduler this host's new upload slots (a config reload)."""
        self.host = replace(self.host, upload_slots=upload_slots)
        try:
            await self._post(self.host)
        except P2PDistError as exc:
            log.info("scheduler: %s", exc)

    async def leave(self) -> None:
        with contextlib.suppress(NetworkError):
            await self._post(LeaveHost(self.host_id))

    # -- SchedulerLink ----------------------------------------------------------------------

    async def start_task(self, digest: Digest, size: int, piece_size: int) -> None:
        self._plans[str(digest)] = (size, piece_size)
        answer = await self.call(StartTask(self.host_id, str(digest), size, piece_size))
        if isinstance(answer, Rejected):
            if answer.reason == "plan_conflict" and answer.piece_size and answer.size == size:
                raise PlanConflict(answer.message, piece_size=answer.piece_size)
            raise NetworkError(f"scheduler rejected task {digest}: {answer.message}")

    async def assign(self, digest: Digest, max_pieces: int, *, wait: float = 0.0) -> Assignment:
        if trio.current_time() < self._no_wait_until:
            wait = 0.0
        try:
            answer = await self.call(Assign(self.host_id, str(digest), max_pieces, wait))
        except NetworkError as exc:
            if not (wait and "unknown fields ['wait']" in str(exc)):
                raise
            # A scheduler from before long polls: ask it the old way for a while (it may
            # be upgraded, or another URL answer next).
            self._no_wait_until = trio.current_time() + NO_WAIT_RETRY
            answer = await self.call(Assign(self.host_id, str(digest), max_pieces))
        if not isinstance(answer, Assignment):
            raise NetworkError(f"scheduler answered {type(answer).__name__} to Assign")
        return answer

    async def report_pieces(
        self,
        digest: Digest,
        pieces: Sequence[int],
        hashes: dict[int, str] | None,
        *,
        source: bool,
        epoch: int | None,
    ) -> tuple[int, ...]:
        event = ReportPieces(self.host_id, str(digest), tuple(pieces), hashes, source, epoch)
        answer = await self.call(event)
        return answer.rejected if isinstance(answer, Ack) else ()

    async def report_failure(
        self, digest: Digest, parent_id: str, piece: int, reason: FailureReason
    ) -> None:
        await self.call(ReportPieceFailure(self.host_id, str(digest), parent_id, piece, reason))

    async def complete(self, digest: Digest, hashes: dict[int, str] | None) -> None:
        await self.call(CompleteTask(self.host_id, str(digest), hashes))
        self._complete.add(str(digest))

    async def leave_task(self, digest: Digest) -> None:
        """The blob is gone from this node (evicted, found corrupt): stop offering it."""
        self._complete.discard(str(digest))
        self._leaves += 1
        self._left[str(digest)] = self._leaves
        await self.call(LeaveTask(self.host_id, str(digest)))

    async def mismatch(self, digest: Digest, epoch: int | None) -> None:
        await self.call(BlobMismatch(self.host_id, str(digest), epoch))
