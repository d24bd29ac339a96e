"""The node: what a daemon owns and shares between its servers.

* the piece store and the tasks open in it (the peer server reads verified pieces of a
  task while the downloader is still writing others);
* one download per blob: every local request for the same digest (CLI, proxy, preheat)
  joins the job already running instead of starting another;
* registry clients, pooled per registry host (connections and tokens are reused);
* the link to the scheduler, and the HTTP client that fetches pieces from parents;
* the cache GC (:meth:`Node.collect_garbage`, policy in :mod:`p2pdist.gc`): periodic and
  after each completed download; every running download holds a lease on its blob, and an
  evicted blob is no longer announced to the scheduler.

Open it with :func:`open_node`; jobs run in the node's own nursery, so a client that goes
away does not cancel a download others are waiting for.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import httpx
import trio

from .clusterauth import token_headers
from .config import NodeConfig
from .digest import Digest
from .errors import DigestMismatch, P2PDistError, PlanConflict, StoreError, UsageError
from .gc import GCPlan, GCPolicy, plan_gc
from .logs import log_context
from .metrics import NodeMetrics
from .peer import PieceLocation
from .peerclient import PeerConnections
from .pieces import PiecePlan, piece_size_for
from .ratelimit import Bandwidth
from .registry import RegistryClient
from .source import Source
from .store import BlobComplete, PieceStore, Task
from .swarm import FetchSlots, SchedulerLink, SwarmStats, swarm_download
from .urlsource import UrlSource, make_http_client

__all__ = ["BlobOrigin", "Job", "Node", "open_node"]

log = logging.getLogger("p2pdist.node")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobOrigin:
    """Where a blob comes from when no peer has it: a registry repository, or a URL."""

    registry: str | None = None
    repository: str | None = None
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.url is None) == (self.registry is None or self.repository is None):
            raise UsageError("a blob origin is a registry and repository, or a URL")


@dataclass(eq=False)
class Job:
    """One blob being made complete on this node; any number of requests wait on it."""

    digest: Digest
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    task: Task | None = None
    plan: PiecePlan | None = None
    path: Path | None = None
    error: BaseException | None = None
    stats: SwarmStats | None = None
    attempt: int = 0
    """Bumped each time the download starts over (a poisoned hash list): bytes streamed
    from an earlier attempt may not be the blob."""
    seq: int = 0
    """Order of arrival on the node: older downloads get piece slots first."""
    digest_ok: bool = False
    """The whole blob matched its digest (set before it is synced and moved into place)."""
    changes: int = 0
    """Bumped whenever bytes this job had verified may no longer be its bytes: pieces
    un-verified (found bad on disk), or the task replaced (a restart under another piece
    plan).  Only grows, also after the blob is complete: a stream that sent bytes before
    a change must not finish (see :func:`p2pdist.proxy.stream_job`)."""

    def notify(self, *_: object) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def adopt(self, task: Task, attempt: int) -> None:
        """``task`` is now where this job's bytes go (its first, or a new attempt's)."""
        if self.task is not None and self.task is not task:
            self.changes += 1  # what the old task verified is gone
        self.task, self.plan, self.attempt = task, task.plan, attempt
        self.digest_ok = False

        def dropped(n: int) -> None:  # any thread; a lost race still changes the count
            self.changes += n

        task.on_drop = dropped

    def verified_prefix(self) -> int:
        """Bytes from the start of the blob that are verified (all of them once done)."""
        if self.path is not None and self.plan is not None:
            return self.plan.size
        task, plan = self.task, self.plan
        if task is None or plan is None or task.closed:
            return 0
        return _prefix(task, plan)

    def open_verified(self, beyond: int = 0) -> tuple[int, int] | None:
        """``(fd, n)``: an open file whose first ``n`` bytes (``n > beyond``) are verified
        bytes of this attempt (the complete blob, or the task's data file, duplicated under
        the task's lock so that it cannot be the next attempt's); None if no more than
        ``beyond`` bytes are verified, or neither file is there now.  The caller closes
        ``fd``."""
        if self.path is not None and self.plan is not None:
            if self.plan.size <= beyond:
                return None
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), self.plan.size
            except FileNotFoundError:
                return None
        task, plan = self.task, self.plan
        if task is None or plan is None:
            return None
        n = _prefix(task, plan)  # only grows while the task is open
        if n <= beyond:
            return None
        fd = task.dup_data_fd()
        return None if fd is None else (fd, n)


def _prefix(task: Task, plan: PiecePlan) -> int:
    n = 0
    for index in range(plan.count):
        if not task.is_verified(index):
            break
        n = plan.range(index)[1]
    return n


class Node:
    def __init__(
        self,
        config: NodeConfig,
        store: PieceStore,
        *,
        nursery: trio.Nursery,
        link: SchedulerLink | None,
        peers: httpx.AsyncClient,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or NodeMetrics()
        self.store = store
        self.link = link
        self.peers = peers
        # Adjustable: a config reload (SIGHUP) changes the rates of running transfers.
        self.bandwidth = Bandwidth.adjustable(
            download=config.download_rate, upload=config.upload_rate, source=config.source_rate
        )
        self._gc_wanted = trio.Event()
        self._gc_lock = trio.Lock()
        self.evicted = 0
        """Blobs the cache GC has evicted since start."""
        self.fetch_slots = FetchSlots(config.concurrency)
        self.peer_conns = PeerConnections(token_headers(config.cluster_token))
        self._seq = itertools.count()
        self.nursery = nursery
        self._jobs: dict[Digest, Job] = {}
        self._piece_hashes: dict[Digest, tuple[int, list[str]]] = {}
        self.stats: dict[Digest, SwarmStats] = {}
        """Where the bytes of each blob downloaded by this node came from."""
        self._tasks: dict[Digest, Task] = {}
        self._registries: dict[tuple[str, bool], RegistryClient] = {}
        self._urls: dict[bool, httpx.AsyncClient] = {}
        self._exit = contextlib.AsyncExitStack()

    # -- sources --------------------------------------------------------------------------

    async def registry_client(self, host: str, *, insecure: bool = False) -> RegistryClient:
        key = (host, insecure)
        client = self._registries.get(key)
        if client is None:
            reg = self.config.registry(host)
            if insecure:
                reg = replace(reg, insecure=True)
            client = RegistryClient(
                reg,
                platform=self.config.platform,
                docker_config=self.config.docker_config,
                max_connections=max(8, self.config.concurrency * 2),
            )
            self._registries[key] = await self._exit.enter_async_context(client)
        return client

    async def source_for(self, digest: Digest, origin: BlobOrigin) -> Source:
        if origin.url is not None:
            http = self._urls.get(origin.insecure)
            if http is None:
                http = make_http_client(insecure=origin.insecure)
                self._urls[origin.insecure] = await self._exit.enter_async_context(http)
            return UrlSource(http, origin.url, headers=dict(origin.headers))
        assert origin.registry is not None and origin.repository is not None
        client = await self.registry_client(origin.registry, insecure=origin.insecure)
        return client.blob_source(origin.repository, digest)

    # -- what the peer server serves -------------------------------------------------------

    def piece_location(
        self, digest: Digest, index: int, piece_size: int, *, blob_only: bool = False
    ) -> PieceLocation | None:
        """Where verified piece ``index`` (cut at ``piece_size``) is, or None.
        ``blob_only``: look only in the complete blob (the task's data file was just
        renamed into place and the task is not closed yet)."""
        task = None if blob_only else self._tasks.get(digest)
        if task is not None and not task.closed:
            if task.plan.piece_size != piece_size:
                return None
            if 0 <= index < task.plan.count and task.is_verified(index):
                start, end = task.plan.range(index)
                return PieceLocation(task.data_path, start, end - start)
        path = self.store.blob_path(digest)
        if path is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # evicted meanwhile
            return None
        # Only the blob's own piece plan: a peer must not choose how much we read at once.
        recorded = self.blob_piece_hashes(digest)
        allowed = {piece_size_for(size, self.config.piece_size)}
        if recorded is not None:
            allowed.add(recorded[0])
        if piece_size not in allowed:
            return None
        plan = PiecePlan(size, piece_size)
        if not 0 <= index < plan.count:
            return None
        start, end = plan.range(index)
        return PieceLocation(path, start, end - start)

    async def forget_blob(self, digest: Digest) -> None:
        """The blob is gone from the store (found corrupt, or evicted): stop offering it."""
        self.stats.pop(digest, None)
        self._piece_hashes.pop(digest, None)
        if self.link is not None:
            try:
                await self.link.leave_task(digest)
            except P2PDistError as exc:
                log.info("scheduler: %s", exc)

    def open_tasks(self) -> dict[Digest, Task]:
        return {d: t for d, t in self._tasks.items() if not t.closed}

    def blob_piece_hashes(self, digest: Digest) -> tuple[int, list[str]] | None:
        """The store's recorded piece plan and hashes of a complete blob, remembered: the
        peer server asks on every piece request.  A digest fixes the bytes, so a
        remembered answer never goes stale (only absent ones are not remembered)."""
        cached = self._piece_hashes.get(digest)
        if cached is None:
            cached = self.store.blob_piece_hashes(digest)
            if cached is not None:
                if len(self._piece_hashes) >= 4096:
                    self._piece_hashes.pop(next(iter(self._piece_hashes)))
                self._piece_hashes[digest] = cached
        return cached

    def piece_hash(self, digest: Digest, index: int, piece_size: int) -> str | None:
        """The recorded sha256 of a verified piece (what identifies its content)."""
        task = self._tasks.get(digest)
        if task is not None and not task.closed and task.plan.piece_size == piece_size:
            hashes = task.piece_hashes()
            return hashes[index] if 0 <= index < len(hashes) else None
        recorded = self.blob_piece_hashes(digest)
        if recorded is not None and recorded[0] == piece_size and 0 <= index < len(recorded[1]):
            return recorded[1][index]
        return None

    # -- downloads --------------------------------------------------------------------------

    def job(self, digest: Digest) -> Job | None:
        return self._jobs.get(digest)

    def fetch(self, digest: Digest, origin: BlobOrigin, *, size: int | None = None) -> Job:
        """The job that makes ``digest`` complete here: the running one, or a new one."""
        job = self._jobs.get(digest)
        if job is None or (job.done.is_set() and job.error is not None):
            job = Job(digest, seq=next(self._seq))
            self._jobs[digest] = job
            self.nursery.start_soon(self._run, job, origin, size)
        return job

    def active_downloads(self) -> int:
        """Downloads in progress (read by metrics scrapes, from a worker thread: the
        ``list`` copy is one step under the GIL, safe while the event loop adds jobs)."""
        return sum(1 for job in list(self._jobs.values()) if not job.done.is_set())

    async def _run(self, job: Job, origin: BlobOrigin, size: int | None) -> None:
        timer = self.metrics.time_task()
        # A blob being downloaded (and, once complete, until the job is over) is never
        # evicted; readers that stream it hold their own lease.
        self.store.acquire(job.digest)
        try:
            with log_context(task=str(job.digest)):
                job.path = await self._complete(job, origin, size)
            self.request_gc()
        except P2PDistError as exc:
            job.error = exc
        except Exception as exc:  # a bug: keep the daemon up, tell the waiters
            log.exception("download of %s failed", job.digest)
            job.error = exc
        finally:
            self.store.release(job.digest)
            timer.done(ok=job.error is None and job.path is not None)
            job.done.set()
            job.notify()
            # Successful jobs are forgotten (the store has the blob); failed ones too,
            # after the waiters saw the error, so that the next request retries.
            if self._jobs.get(job.digest) is job:
                del self._jobs[job.digest]

    async def _complete(self, job: Job, origin: BlobOrigin, size: int | None) -> Path:
        digest = job.digest
        existing = await trio.to_thread.run_sync(self.store.checked_blob_path, digest)
        if existing is not None:
            job.plan = PiecePlan(existing.stat().st_size, self.config.piece_size)
            self.metrics.record_received("local", job.plan.size)
            return existing
        source = await self.source_for(digest, origin)
        ranges = True
        if size is None:
            info = await source.probe()
            if info.size is None:
                raise UsageError(f"{source.description}: origin announces no size")
            size, ranges = info.size, info.accepts_ranges
        attempt = 0
        piece_size: int | None = None  # the swarm's, after a plan conflict
        while True:
            task = await self._open_task(digest, size, piece_size)
            if task is None:  # completed by someone else meanwhile
                path = self.store.blob_path(digest)
                assert path is not None
                job.plan = PiecePlan(path.stat().st_size, self.config.piece_size)
                return path
            job.adopt(task, attempt)
            self._tasks[digest] = task

            def verified(job: Job = job) -> None:  # in commit's worker thread
                job.digest_ok = True
                trio.from_thread.run_sync(job.notify)

            task.on_verified = verified
            discard = False
            try:
                # The swarm leases byte ranges of the origin: without Range support the
                # node fetches the blob as one stream, alone.
                link = self.link if attempt == 0 and ranges else None
                path, stats = await swarm_download(
                    task,
                    source,
                    link,
                    self.peers,
                    concurrency=self.config.concurrency,
                    piece_timeout=self.config.piece_timeout,
                    progress=job.notify,
                    accepts_ranges=ranges,
                    bandwidth=self.bandwidth,
                    fetch_slots=self.fetch_slots,
                    priority=job.seq,
                    peer_conns=self.peer_conns,
                    metrics=self.metrics,
                )
                job.stats = stats
                self.stats[digest] = stats
                return path
            except DigestMismatch:
                if attempt:
                    raise
                # Poisoned piece-hash list: the store discarded the task; start over from
                # the registry alone.
                attempt += 1
            except PlanConflict as exc:
                # Other nodes cut this blob at another piece size (a different config, or
                # an imported blob): start over with theirs, once, to share pieces.
                if piece_size is not None or exc.piece_size == task.plan.piece_size:
                    raise
                log.info("%s: the swarm uses %d-byte pieces: adopting", digest, exc.piece_size)
                piece_size, discard = exc.piece_size, True
            finally:
                self._tasks.pop(digest, None)
                # close() waits for a re-verification pass that may be running: not on
                # the event loop.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(task.close)
                    if discard:
                        await trio.to_thread.run_sync(self.store.remove_task, digest)

    async def _open_task(
        self, digest: Digest, size: int, piece_size: int | None = None
    ) -> Task | None:
        if piece_size is None:
            piece_size = piece_size_for(size, self.config.piece_size)
        try:
            return await trio.to_thread.run_sync(self.store.open_task, digest, size, piece_size)
        except BlobComplete:
            return None

    # -- cache GC ----------------------------------------------------------------------------

    def request_gc(self) -> None:
        """Run a GC pass soon (after a download completed)."""
        self._gc_wanted.set()

    async def collect_garbage(self, now: float | None = None) -> GCPlan:
        """One GC pass under the current config: evict what the policy says, skipping
        blobs that became in use since it looked; the scheduler is told of each eviction."""
        policy = GCPolicy.from_config(self.config)
        async with self._gc_lock:
            if not policy.enabled:
                return GCPlan((), 0, 0)
            entries = await trio.to_thread.run_sync(self.store.cache_entries)
            plan = plan_gc(entries, policy, now=time.time() if now is None else now)
            for ev in plan.evict:
                digest = Digest.parse(ev.digest)
                evict = self.store.evict if ev.complete else self.store.evict_task
                try:
                    gone = await trio.to_thread.run_sync(evict, digest)
                except StoreError as exc:
                    log.warning("cache GC: %s", exc)
                    continue
                if not gone:
                    log.info("cache GC: %s is in use now: kept", digest)
                    continue
                self.evicted += 1
                what = "blob" if ev.complete else "abandoned partial download"
                log.info("cache GC: evicted %s %s (%d bytes, %s)", what, digest, ev.size, ev.reason)
                await self.forget_blob(digest)
            if plan.short:
                log.warning(
                    "cache GC: %d bytes over the low watermark are in use or downloading",
                    plan.short,
                )
            return plan

    async def gc_forever(self) -> None:
        """Every ``gc_interval`` seconds (read anew each time: a reload changes it), and
        whenever :meth:`request_gc` asks."""
        while True:
            with trio.move_on_after(self.config.gc_interval):
                await self._gc_wanted.wait()
            self._gc_wanted = trio.Event()
            try:
                await self.collect_garbage()
            except StoreError as exc:
                log.warning("cache GC: %s", exc)

    async def aclose(self) -> None:
        await self.peer_conns.aclose()
        await self._exit.aclose()
        self._registries.clear()
        self._urls.clear()


@contextlib.asynccontextmanager
async def open_node(
    config: NodeConfig, *, link: SchedulerLink | None = None
) -> AsyncIterator[Node]:
    metrics = NodeMetrics()
    store = await trio.to_thread.run_sync(partial(PieceStore, config.data_dir, observer=metrics))
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(
            limits=limits,
            timeout=httpx.Timeout(30.0, connect=5.0),
            trust_env=False,
            headers=token_headers(config.cluster_token),
        ) as peers,
        trio.open_nursery() as nursery,
    ):
        node = Node(config, store, nursery=nursery, link=link, peers=peers, metrics=metrics)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await node.aclose()
                store.close()
