"""The scheduler's Prometheus metrics (``GET /metrics`` on its HTTP listener).

One :class:`SchedulerMetrics` per :class:`~scheduler.service.SchedulerService`, with its own
:class:`~prometheus_client.CollectorRegistry` (never the process-wide default one).  The
service counts around :meth:`Scheduler.handle`; the pure core is not touched.

Decisions (``p2pdist_scheduler_decisions_total{kind}``), one per:

* ``parent``: a piece assigned to be fetched from a parent;
* ``source``: a piece leased back-to-source (the asker fetches it from the registry);
* ``wait``: an ``Assign`` answered with nothing to do yet (``retry_after``);
* ``done``: an ``Assign`` answered "you hold every piece";
* ``rejected``: an event refused (a plan conflict, a malformed report, ...);
* ``unknown``: an event from a host or about a task the scheduler does not know (the
  daemon re-registers and re-announces: many of these follow a scheduler restart).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ._events import Answer, Assignment, Rejected, Unknown

__all__ = ["DECISION_KINDS", "SCHEDULER_METRIC_NAMES", "SchedulerMetrics"]

DECISION_KINDS = ("parent", "source", "wait", "done", "rejected", "unknown")

#: Handling one event takes microseconds to milliseconds (an Assign over a large swarm).
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.hosts = Gauge("p2pdist_scheduler_hosts", "Hosts registered and alive", registry=r)
        self.tasks = Gauge("p2pdist_scheduler_tasks", "Tasks (blobs) in the swarm", registry=r)
        self.events = Counter(
            "p2pdist_scheduler_events",
            "Events received from daemons, by type",
            ["type"],
            registry=r,
        )
        self.decisions = Counter(
            "p2pdist_scheduler_decisions",
            "Decisions made: pieces assigned from a parent or leased back-to-source, Assigns "
            "answered wait or done, events rejected or about unknown hosts/tasks",
            ["kind"],
            registry=r,
        )
        self.latency = Histogram(
            "p2pdist_scheduler_decision_duration_seconds",
            "Time to handle one event (decide and answer), by event type",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for kind in DECISION_KINDS:
            self.decisions.labels(kind)
        self.latency.labels("Assign")

    def watch(self, *, hosts: Callable[[], float], tasks: Callable[[], float]) -> None:
        """Read the host and task counts at scrape time."""
        self.hosts.set_function(hosts)
        self.tasks.set_function(tasks)

    def record(self, event_type: str, answer: Answer, seconds: float) -> None:
        self.events.labels(event_type).inc()
        self.latency.labels(event_type).observe(seconds)
        if isinstance(answer, Assignment):
            if answer.from_peers:
                self.decisions.labels("parent").inc(len(answer.from_peers))
            if answer.from_source:
                self.decisions.labels("source").inc(len(answer.from_source))
            if answer.done:
                self.decisions.labels("done").inc()
            elif not answer.from_peers and not answer.from_source:
                self.decisions.labels("wait").inc()
        elif isinstance(answer, Rejected):
            self.decisions.labels("rejected").inc()
        elif isinstance(answer, Unknown):
            self.decisions.labels("unknown").inc()


def _names() -> frozenset[str]:
    m = SchedulerMetrics()
    m.watch(hosts=lambda: 0, tasks=lambda: 0)
    m.record("Assign", Assignment(), 0.0)
    names: set[str] = set()
    for family in m.registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return frozenset(names)


SCHEDULER_METRIC_NAMES: frozenset[str] = _names()
"""Every sample name the scheduler's ``/metrics`` can hold."""
