"""The daemon's side of preheat: run the jobs the scheduler orders, report progress.

The scheduler names an image (and, once a node resolved its tag, the digest it is pinned
to) in the answer to a heartbeat (:class:`~scheduler.PreheatOrder`).  The daemon resolves
the manifest itself, with its own registry client and credentials, for the platform
asked for (else its own), and makes every blob of it (config and layers) complete in its
store through the swarm, exactly as a pull through the daemon does (``Node.fetch``: one
download per blob however many requests want it, pieces from peers first, each piece and
the whole blob checked).  Nothing is loaded into Docker.  Its heartbeats report each
job's progress (:class:`~scheduler.PreheatReport`); a job ending wakes the heartbeat at
once, so the operator sees ``done`` without waiting for the next beat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import trio

from scheduler import PreheatOrder, PreheatReport

from .digest import Digest
from .errors import EXIT_NETWORK, P2PDistError, collapse_groups
from .node import BlobOrigin, Job, Node
from .reference import parse_reference
from .registry import Descriptor

__all__ = ["Preheater"]

log = logging.getLogger("p2pdist.preheat")

#: Blobs of one job fetched at once (the node's fetch slots bound the pieces in flight).
PARALLEL_BLOBS = 4


@dataclass(eq=False)
class _Run:
    order: PreheatOrder
    state: Literal["running", "done", "failed"] = "running"
    manifest: str = ""
    blobs: list[Descriptor] = field(default_factory=list)
    done: set[Digest] = field(default_factory=set)
    jobs: dict[Digest, Job] = field(default_factory=dict)
    error: str = ""
    exit_code: int = 0

    def report(self) -> PreheatReport:
        done_bytes = sum(d.size for d in self.blobs if d.digest in self.done)
        for digest, job in self.jobs.items():
            task = job.task
            if digest not in self.done and task is not None and not task.closed:
                done_bytes += task.verified_bytes
        total = sum(d.size for d in self.blobs)
        return PreheatReport(
            self.order.job_id,
            self.state,
            blobs_done=len(self.done),
            blobs_total=len(self.blobs),
            bytes_done=min(done_bytes, total),
            bytes_total=total,
            manifest=self.manifest,
            error=self.error,
            exit_code=self.exit_code,
        )


class Preheater:
    """The preheat jobs of one daemon (one run per job id)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._runs: dict[str, _Run] = {}
        self._changed = trio.Event()

    def reports(self) -> tuple[PreheatReport, ...]:
        return tuple(run.report() for run in self._runs.values())

    def apply(self, orders: tuple[PreheatOrder, ...]) -> None:
        """The scheduler's current orders: start the new ones; forget finished runs it
        no longer orders (it has seen their last report)."""
        ordered = {o.job_id for o in orders}
        for job_id, run in list(self._runs.items()):
            if job_id not in ordered and run.state != "running":
                del self._runs[job_id]
        for order in orders:
            if order.job_id not in self._runs:
                run = self._runs[order.job_id] = _Run(order)
                log.info("preheat %s: %s", order.job_id, order.manifest or order.image)
                self.node.nursery.start_soon(self._run, run)

    async def wait_changed(self) -> None:
        """Until a job finishes (at once if one did since the last call)."""
        await self._changed.wait()
        self._changed = trio.Event()

    async def _run(self, run: _Run) -> None:
        try:
            await self._warm(run)
            run.state = "done"
            log.info(
                "preheat %s: %d blobs complete (%s)",
                run.order.job_id,
                len(run.blobs),
                run.manifest,
            )
        except P2PDistError as exc:
            run.state, run.error, run.exit_code = "failed", _one_line(str(exc)), exc.exit_code
            log.warning("preheat %s failed: %s", run.order.job_id, run.error)
        except Exception as exc:  # a bug: report it, keep the daemon up
            log.exception("preheat %s failed", run.order.job_id)
            run.state, run.exit_code = "failed", EXIT_NETWORK
            run.error = _one_line(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            run.jobs.clear()
            self._changed.set()

    async def _warm(self, run: _Run) -> None:
        order = run.order
        ref = parse_reference(order.image)
        client = await self.node.registry_client(ref.api_host)
        image = await client.resolve_image(
            ref.repository,
            order.manifest or ref.reference,
            platform=order.platform or self.node.config.platform,
        )
        run.manifest = str(image.index_digest or image.digest)
        seen: set[Digest] = set()
        for desc in [image.config, *image.layers]:
            if desc.digest not in seen:
                seen.add(desc.digest)
                run.blobs.append(desc)
        origin = BlobOrigin(registry=ref.api_host, repository=ref.repository)
        limit = trio.CapacityLimiter(PARALLEL_BLOBS)

        async def one(desc: Descriptor) -> None:
            async with limit:
                # A failed download is retried once (a cut connection, a poisoned hash
                # list the node already started over from): the node's job is new then.
                for attempt in (1, 2):
                    job = run.jobs[desc.digest] = self.node.fetch(
                        desc.digest, origin, size=desc.size
                    )
                    await job.done.wait()
                    if job.error is None:
                        break
                    if attempt == 2 or not isinstance(job.error, P2PDistError):
                        raise job.error
                run.done.add(desc.digest)

        with collapse_groups():
            async with trio.open_nursery() as nursery:
                for desc in run.blobs:
                    nursery.start_soon(one, desc)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
