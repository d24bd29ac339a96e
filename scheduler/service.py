"""The scheduler's thin I/O layer: HTTP/JSON around the pure :class:`Scheduler`.

Endpoints (all JSON):

* ``POST /api/v1/events`` — one event (``{"type": "Assign", ...}``, see ``_events``);
  answers the :class:`Answer` as JSON (``{"type": "Assignment", ...}``).  400 for a
  malformed event.
* ``GET /healthz`` (alive), ``GET /readyz`` (serving), ``GET /api/v1/stats``.
* ``GET /metrics``: Prometheus metrics (``scheduler._metrics``).

The clock is trio's (monotonic); a background loop calls :meth:`Scheduler.tick` so hosts
that stop sending heartbeats expire even when nobody asks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn

import trio

from p2pdist.clusterauth import check_token
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
from ._metrics import SchedulerMetrics

__all__ = ["SchedulerService", "run_scheduler", "serve_scheduler"]

log = logging.getLogger("p2pdist.scheduler")

MAX_EVENT_BYTES = 8 << 20


@dataclass
class SchedulerService:
    scheduler: Scheduler
    started: float = 0.0
    events: int = 0
    token: str | None = field(default=None, repr=False)
    """The cluster token events must carry (None: no cluster auth)."""
    metrics: SchedulerMetrics = field(default_factory=SchedulerMetrics)

    def __post_init__(self) -> None:
        self.metrics.watch(
            hosts=lambda: len(self.scheduler.hosts), tasks=lambda: len(self.scheduler.tasks)
        )

    def now(self) -> float:
        return trio.current_time()

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
            started = time.perf_counter()
            answer = self.scheduler.handle(event, self.now())
            self.metrics.record(type(event).__name__, answer, time.perf_counter() - started)
            return Response.json(encode(answer))
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
                    "uptime_seconds": round(time.monotonic() - self.started, 1),
                    # Parents not offered now after failures (ids, sorted; at most 100).
                    "penalised": sorted(
                        h.host_id for h in self.scheduler.hosts.values() if h.penalised_until > now
                    )[:100],
                }
            )
        raise HTTPError(404, "not found")

    async def tick_forever(self, interval: float = 1.0) -> NoReturn:
        while True:
            await trio.sleep(interval)
            expired = self.scheduler.tick(self.now())
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


async def run_scheduler(host: str, port: int, token: str | None = None) -> NoReturn:
    """``p2pdist scheduler``: serve until SIGTERM/SIGINT."""
    import signal

    raise_open_file_limit()  # up to 1024 daemons connected at once, and then some
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(serve_scheduler, host, port, token=token))
            print(f"p2pdist scheduler listening on {info.url}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    raise SystemExit(0)
