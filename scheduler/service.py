"""The scheduler's thin I/O layer: HTTP/JSON around the pure :class:`Scheduler`.

Endpoints (all JSON):

* ``POST /api/v1/events`` — one event (``{"type": "Assign", ...}``, see ``_events``);
  answers the :class:`Answer` as JSON (``{"type": "Assignment", ...}``).  400 for a
  malformed event.  An ``Assign`` with ``wait`` that has nothing yet is held (a long
  poll, at most ``MAX_ASSIGN_WAIT``) until its task changes: a report, failure or other
  event about the task, a host leaving, or the tick.  A second ``Assign`` from the same
  host about the same task ends the held one with nothing.
* ``POST /api/v1/preheat`` — ``{"image": "REGISTRY/REPO[:TAG|@DIGEST]", "platform":
  "os/arch" (optional), and at most one of "nodes": N, "percent": P, "all": true}``
  (none of them: one node) creates a preheat job (``_preheat``) and answers ``201`` with
  its status; ``400`` for a bad image, platform or selection, ``409`` when fewer nodes
  are registered than asked for.
* ``GET /api/v1/preheat/<id>`` — a job's status and progress per node (404 if unknown);
  ``GET /api/v1/preheat`` — every job kept.  The preheat endpoints, like events, need
  the cluster token when one is set.
* ``GET /healthz`` (alive), ``GET /readyz`` (serving), ``GET /api/v1/stats``.
* ``GET /metrics``: Prometheus metrics (``scheduler._metrics``).

The clock is trio's (monotonic); a background loop calls :meth:`Scheduler.tick` so hosts
that stop sending heartbeats expire even when nobody asks.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn

import trio

from p2pdist.clusterauth import check_token
from p2pdist.errors import InvalidReference
from p2pdist.httpserver import (
    HTTPError,
    Request,
    Response,
    ServerConfig,
    ServerInfo,
    raise_open_file_limit,
    serve_http,
)
from p2pdist.metrics import metrics_response

from ._codec import decode_event, encode
from ._config import SchedulerConfig
from ._core import Scheduler
from ._events import Answer, Assign, Assignment, Event, Heartbeat, RegisterHost
from ._metrics import SchedulerMetrics
from ._preheat import NotEnoughNodes, PreheatError, Selection

__all__ = ["SchedulerService", "run_scheduler", "serve_scheduler"]


def _nothing(answer: Answer) -> bool:
    """An assignment of nothing yet (not done): worth holding the question."""
    return (
        isinstance(answer, Assignment)
        and not answer.done
        and not answer.from_peers
        and not answer.from_source
    )


log = logging.getLogger("p2pdist.scheduler")

MAX_EVENT_BYTES = 8 << 20
MAX_ASSIGN_WAIT = 2.0
"""Longest an ``Assign`` is held (its ``wait``, capped): well inside a daemon's 5 s
request timeout."""
MAX_PREHEAT_BYTES = 64 << 10
_PREHEAT_KEYS = frozenset({"image", "platform", "nodes", "percent", "all"})
_JOB_ID = re.compile(r"ph-[0-9a-f]{16}")


@dataclass
class SchedulerService:
    scheduler: Scheduler
    started: float = 0.0
    events: int = 0
    token: str | None = field(default=None, repr=False)
    """The cluster token events must carry (None: no cluster auth)."""
    metrics: SchedulerMetrics = field(default_factory=SchedulerMetrics)
    _change: dict[str, trio.Event] = field(default_factory=dict, repr=False)
    """Per task digest: set (and dropped) when the task changes; held Assigns wait on it."""
    _held: dict[tuple[str, str], trio.CancelScope] = field(default_factory=dict, repr=False)
    """The Assign held per (host, digest)."""

    def __post_init__(self) -> None:
        self.metrics.watch(
            hosts=lambda: len(self.scheduler.hosts), tasks=lambda: len(self.scheduler.tasks)
        )

    def now(self) -> float:
        return trio.current_time()

    def _decide(self, event: Event) -> Answer:
        started = time.perf_counter()
        answer = self.scheduler.handle(event, self.now())
        self.metrics.record(type(event).__name__, answer, time.perf_counter() - started)
        return answer

    async def _long_poll(self, event: Assign, deadline: float, answer: Answer) -> Answer:
        """Hold an Assign that got nothing until its task changes (a report, a failure,
        a host leaving, a tick) or ``deadline``; then decide again.  One change wakes
        every held Assign of the task: most find the new piece taken (rarest first, at
        most ``max_uploads_per_piece`` at once) and wait again."""
        key = (event.host_id, event.digest)
        with trio.CancelScope() as scope:
            self._held[key] = scope
            try:
                while _nothing(answer):
                    changed = self._change.get(event.digest)
                    if changed is None:
                        changed = self._change[event.digest] = trio.Event()
                    with trio.move_on_at(deadline):
                        await changed.wait()
                    answer = self._decide(event)
                    if trio.current_time() >= deadline:
                        break
            finally:
                if self._held.get(key) is scope:
                    del self._held[key]
        return answer

    def _supersede(self, event: Assign) -> None:
        """A host asking again about a task ends the Assign of its still held (its
        client gave up on it: a timeout): that one answers nothing and decides nothing
        more, so no piece is assigned to an answer nobody reads."""
        held = self._held.pop((event.host_id, event.digest), None)
        if held is not None:
            held.cancel()

    def _changed(self, digest: str | None) -> None:
        """Wake the Assigns held on ``digest`` (None: on every task)."""
        if digest is None:
            changes, self._change = list(self._change.values()), {}
            for changed in changes:
                changed.set()
        else:
            if digest in self._change:
                self._change.pop(digest).set()

    async def handle(self, request: Request) -> Response:
        if request.path == "/api/v1/events":
            if request.method != "POST":
                raise HTTPError(405, "use POST", headers=[("Allow", "POST")])
            check_token(request, self.token)
            body = await request.read_body(MAX_EVENT_BYTES)
            try:
                event = decode_event(json.loads(body))
            except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nesting
                raise HTTPError(400, f"invalid event: {str(exc)[:200]}") from None
            self.events += 1
            if isinstance(event, Assign):
                self._supersede(event)
                answer = self._decide(event)
                if event.wait > 0 and _nothing(answer):
                    deadline = trio.current_time() + min(event.wait, MAX_ASSIGN_WAIT)
                    answer = await self._long_poll(event, deadline, answer)
            else:
                answer = self._decide(event)
                if not isinstance(event, Heartbeat | RegisterHost):  # the tick covers those
                    self._changed(getattr(event, "digest", None))  # LeaveHost: every task
            return Response.json(encode(answer))
        if request.path == "/api/v1/preheat" or request.path.startswith("/api/v1/preheat/"):
            return await self._preheat(request)
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "method not allowed")
        if request.path == "/healthz":
            return Response.json({"status": "ok"})
        if request.path == "/readyz":  # serving: it answers, and decides from what it knows
            return Response.json({"status": "ok", "hosts": len(self.scheduler.hosts)})
        if request.path == "/metrics":
            return await metrics_response([self.metrics.registry])
        if request.path == "/api/v1/stats":
            now = self.now()
            return Response.json(
                {
                    "hosts": len(self.scheduler.hosts),
                    "tasks": len(self.scheduler.tasks),
                    "events": self.events,
                    "preheat_jobs": len(self.scheduler.preheats),
                    "uptime_seconds": round(time.monotonic() - self.started, 1),
                    # Parents not offered now after failures (ids, sorted; at most 100).
                    "penalised": sorted(
                        h.host_id for h in self.scheduler.hosts.values() if h.penalised_until > now
                    )[:100],
                }
            )
        raise HTTPError(404, "not found")

    async def _preheat(self, request: Request) -> Response:
        check_token(request, self.token)
        if request.path == "/api/v1/preheat":
            if request.method == "POST":
                return await self._create_preheat(request)
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, "use GET or POST", headers=[("Allow", "GET, POST")])
            now = self.now()
            return Response.json({"jobs": [j.to_json(now) for j in self.scheduler.preheats.jobs()]})
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "use GET", headers=[("Allow", "GET")])
        job_id = request.path.removeprefix("/api/v1/preheat/")
        job = self.scheduler.preheats.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise HTTPError(404, f"no preheat job {job_id[:40]!r}", code="PREHEAT_UNKNOWN")
        return Response.json(job.to_json(self.now()))

    async def _create_preheat(self, request: Request) -> Response:
        from p2pdist.reference import parse_reference
        from p2pdist.registry import parse_platform

        raw = await request.read_body(MAX_PREHEAT_BYTES)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise HTTPError(400, "the body must be a JSON object", code="PREHEAT_INVALID") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object", code="PREHEAT_INVALID")
        unknown = sorted(set(body) - _PREHEAT_KEYS)
        if unknown:
            raise HTTPError(
                400, f"unknown fields {', '.join(unknown)[:200]}", code="PREHEAT_INVALID"
            )
        image = body.get("image")
        if not isinstance(image, str):
            raise HTTPError(400, "image (a string) is required", code="NAME_INVALID")
        try:
            ref = parse_reference(image)
        except InvalidReference as exc:
            raise HTTPError(400, str(exc), code="NAME_INVALID") from None
        platform = body.get("platform") or ""
        try:
            if not isinstance(platform, str):
                raise ValueError("platform must be a string such as linux/amd64")
            if platform:
                parse_platform(platform)
        except ValueError as exc:
            raise HTTPError(400, str(exc)[:200], code="PLATFORM_INVALID") from None
        try:
            selection = Selection.from_json(body)
            job = self.scheduler.start_preheat(
                f"ph-{secrets.token_hex(8)}", str(ref), platform, selection, self.now()
            )
        except NotEnoughNodes as exc:
            raise HTTPError(409, str(exc), code="NOT_ENOUGH_NODES") from None
        except PreheatError as exc:
            raise HTTPError(400, str(exc), code="PREHEAT_INVALID") from None
        log.info(
            "preheat %s: %s on %s: %s",
            job.job_id,
            job.image,
            selection.describe(),
            ", ".join(job.nodes),
        )
        return Response.json(job.to_json(self.now()), status=201)

    async def tick_forever(self, interval: float = 1.0) -> NoReturn:
        while True:
            await trio.sleep(interval)
            expired = self.scheduler.tick(self.now())
            self._changed(None)  # lapsed leases and assignments may be offered again
            for host_id in expired:
                log.info("host %s expired (no heartbeat)", host_id)


async def serve_scheduler(
    host: str,
    port: int,
    *,
    config: SchedulerConfig | None = None,
    token: str | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a scheduler on ``host:port`` forever (``port=0``: an ephemeral port); with
    ``token``, events must carry it (:mod:`p2pdist.clusterauth`)."""
    service = SchedulerService(Scheduler(config), started=time.monotonic(), token=token)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.tick_forever)
        serve = partial(serve_http, config=ServerConfig(keepalive_timeout=300.0))
        info = await nursery.start(serve, service.handle, host, port)
        log.info("scheduler listening on %s", info.url)
        task_status.started(info)
    raise AssertionError("unreachable")


async def run_scheduler(
    host: str, port: int, token: str | None = None, config: SchedulerConfig | None = None
) -> NoReturn:
    """``p2pdist scheduler``: serve until SIGTERM/SIGINT."""
    import signal

    raise_open_file_limit()  # up to 1024 daemons connected at once, and then some
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            serve = partial(serve_scheduler, host, port, token=token, config=config)
            info = await nursery.start(serve)
            print(f"p2pdist scheduler listening on {info.url}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    raise SystemExit(0)
