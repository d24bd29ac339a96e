"""The download engine: pull a blob from a :class:`~p2pdist.source.Source` as pieces, in
parallel, hashing each piece before it is stored, and commit the whole blob only when its
digest matches.

The engine is I/O glue; what to fetch is decided by :func:`plan_spans` (pure).  Bytes go
into a :class:`PieceSink` — a store task (:class:`p2pdist.store.Task`) for blobs named by a
digest, or a :class:`FileSink` for a URL fetched without one.  Piece hashing and writing
run in worker threads (hashlib releases the GIL) so that the event loop keeps receiving
while the other core hashes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from .digest import Digest
from .errors import DigestMismatch, NetworkError, StoreError, UpstreamError, collapse_groups
from .pieces import PiecePlan
from .source import Source, SourceInfo

if TYPE_CHECKING:
    from .store import PieceStore

__all__ = [
    "DownloadStats",
    "FileSink",
    "PieceSink",
    "download",
    "download_blob",
    "plan_spans",
]

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes received so far, total size or None)."""

SPAN_RETRIES = 4


class PieceSink(Protocol):
    @property
    def plan(self) -> PiecePlan: ...

    def missing(self) -> list[int]: ...

    def write_piece(
        self, index: int, data: bytes | bytearray | memoryview, expected_sha256: str | None = None
    ) -> str: ...

    def commit(self) -> Path: ...


@dataclass(slots=True)
class DownloadStats:
    size: int = 0
    received: int = 0
    reused: int = 0
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


def plan_spans(missing: Sequence[int], workers: int, max_span: int = 8) -> list[list[int]]:
    """Group the missing piece indices into runs of consecutive pieces, one range request
    each: runs short enough that ``workers`` requests keep busy until the end, and at most
    ``max_span`` pieces long.  Lower indices come first, so the blob fills roughly in order.
    """
    if not missing:
        return []
    per_worker = max(1, min(max_span, -(-len(missing) // max(1, workers * 2))))
    spans: list[list[int]] = []
    current: list[int] = []
    for index in missing:
        if current and (index != current[-1] + 1 or len(current) >= per_worker):
            spans.append(current)
            current = []
        current.append(index)
    spans.append(current)
    return spans


class FileSink:
    """A sink for a URL fetched without an expected digest: a temp file, hashed at the end.

    ``commit`` returns the temp file path; :attr:`digest` is the sha256 of what arrived.
    """

    def __init__(self, directory: Path, size: int, piece_size: int) -> None:
        self._plan = PiecePlan(size, piece_size)
        self._done: set[int] = set()
        fd, name = _mkstemp(directory)
        self.path = Path(name)
        self._fd = fd
        self.digest: Digest | None = None
        try:
            os.ftruncate(fd, size)
        except OSError:
            self.discard()
            raise

    @property
    def plan(self) -> PiecePlan:
        return self._plan

    def missing(self) -> list[int]:
        return [i for i in self._plan if i not in self._done]

    def write_piece(
        self, index: int, data: bytes | bytearray | memoryview, expected_sha256: str | None = None
    ) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and hexdigest != expected_sha256:
            raise DigestMismatch(f"piece {index} does not match its sha256")
        view = memoryview(data)
        offset = self._plan.start(index)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n
        self._done.add(index)
        return hexdigest

    def commit(self) -> Path:
        if self.missing():
            raise StoreError("internal: commit with missing pieces")
        h = hashlib.sha256()
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            while block := f.read(4 << 20):
                h.update(block)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.digest = Digest("sha256", h.hexdigest())
        return self.path

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=".p2pdist-", suffix=".part", dir=directory)


class _Engine:
    def __init__(
        self,
        source: Source,
        sink: PieceSink,
        *,
        concurrency: int,
        progress: ProgressFn | None,
        stats: DownloadStats,
    ) -> None:
        self.source = source
        self.sink = sink
        self.plan = sink.plan
        self.concurrency = concurrency
        self.progress = progress
        self.stats = stats
        # Bound the piece buffers waiting for (or in) a worker thread: memory stays at
        # about 2 × concurrency × piece size whatever the network and disk do.
        self.buffers = trio.Semaphore(max(2, 2 * concurrency))
        self.threads = trio.CapacityLimiter(max(2, min(concurrency, os.cpu_count() or 2)))
        self.received_in_flight = 0

    def _count(self, n: int) -> None:
        self.stats.received += n
        if self.progress is not None:
            self.progress(self.stats.received + self.stats.reused, self.plan.size)

    async def _store(self, index: int, data: bytes | bytearray) -> None:
        try:
            await trio.to_thread.run_sync(self.sink.write_piece, index, data, limiter=self.threads)
        finally:
            self.buffers.release()

    async def _fetch_span(self, span: list[int], writers: trio.Nursery) -> None:
        """Fetch consecutive pieces ``span`` with one range request, handing each complete
        piece to a writer task.  A broken stream is retried from the first unfinished piece."""
        pending = list(span)
        attempt = 0
        while pending:
            start = self.plan.start(pending[0])
            end = self.plan.range(pending[-1])[1]
            whole = start == 0 and end == self.plan.size
            got_this_attempt = 0
            try:
                self.stats.requests += 1
                async with self.source.open_range(start, None if whole else end) as stream:
                    buf = bytearray()
                    need = self.plan.length(pending[0])
                    async for chunk in stream:
                        got_this_attempt += len(chunk)
                        self._count(len(chunk))
                        view = memoryview(chunk)
                        while view:
                            take = min(need - len(buf), len(view))
                            buf += view[:take]
                            view = view[take:]
                            if len(buf) == need:
                                index = pending.pop(0)
                                await self.buffers.acquire()
                                writers.start_soon(self._store, index, buf)
                                buf = bytearray()
                                if pending:
                                    need = self.plan.length(pending[0])
                                elif view:
                                    raise NetworkError(
                                        f"{self.source.description}: more bytes than asked for"
                                    )
                    if pending:
                        raise NetworkError(
                            f"{self.source.description}: connection closed early "
                            f"({len(pending)} piece(s) short)"
                        )
            except (NetworkError, UpstreamError):
                # Bytes of a partial piece are thrown away: uncount them for the rate.
                attempt += 1
                self.stats.retries += 1
                if attempt > SPAN_RETRIES:
                    raise
                await trio.sleep(min(2.0, 0.1 * 2**attempt))

    async def run_ranged(self) -> None:
        spans = plan_spans(self.sink.missing(), self.concurrency)
        queue = iter(spans)

        async def worker(writers: trio.Nursery) -> None:
            for span in queue:
                await self._fetch_span(span, writers)

        with collapse_groups():
            async with trio.open_nursery() as writers, trio.open_nursery() as fetchers:
                for _ in range(min(self.concurrency, len(spans))):
                    fetchers.start_soon(worker, writers)

    async def run_stream(self) -> None:
        """One stream from byte 0 (origins without Range support): pieces are cut as they
        arrive; pieces the sink already has are read past."""
        missing = set(self.sink.missing())
        attempt = 0
        while True:
            try:
                with collapse_groups():
                    async with trio.open_nursery() as writers:
                        await self._stream_once(missing, writers)
                return
            except (NetworkError, UpstreamError):
                attempt += 1
                self.stats.retries += 1
                if attempt > SPAN_RETRIES:
                    raise
                missing = set(self.sink.missing())
                await trio.sleep(min(2.0, 0.1 * 2**attempt))

    async def _stream_once(self, missing: set[int], writers: trio.Nursery) -> None:
        index = 0
        buf = bytearray()
        self.stats.requests += 1
        async with self.source.open_range(0, None) as stream:
            async for chunk in stream:
                self._count(len(chunk))
                view = memoryview(chunk)
                while view:
                    if index >= self.plan.count:
                        raise NetworkError(f"{self.source.description}: longer than announced")
                    need = self.plan.length(index)
                    take = min(need - len(buf), len(view))
                    buf += view[:take]
                    view = view[take:]
                    if len(buf) == need:
                        if index in missing:
                            await self.buffers.acquire()
                            writers.start_soon(self._store, index, buf)
                        buf = bytearray()
                        index += 1
        if index < self.plan.count:
            raise NetworkError(f"{self.source.description}: connection closed early")


async def download(
    source: Source,
    sink: PieceSink,
    *,
    info: SourceInfo,
    concurrency: int = 8,
    progress: ProgressFn | None = None,
) -> tuple[Path, DownloadStats]:
    """Fill ``sink`` from ``source`` and commit it.  Returns the committed path."""
    stats = DownloadStats(size=sink.plan.size)
    missing = sink.missing()
    stats.reused = sink.plan.size - sum(sink.plan.length(i) for i in missing)
    engine = _Engine(source, sink, concurrency=concurrency, progress=progress, stats=stats)
    started = time.perf_counter()
    if missing:
        if info.accepts_ranges and concurrency > 1:
            await engine.run_ranged()
        else:
            await engine.run_stream()
    path = await trio.to_thread.run_sync(sink.commit)
    stats.seconds = time.perf_counter() - started
    return path, stats


async def download_blob(
    source: Source,
    store: PieceStore,
    digest: Digest,
    *,
    piece_size: int,
    concurrency: int = 8,
    progress: ProgressFn | None = None,
    size: int | None = None,
) -> tuple[Path, DownloadStats]:
    """Make ``digest`` complete in ``store``, fetching what is missing from ``source``.

    A blob already complete is returned at once; a partial task resumes from its verified
    pieces.  Raises :class:`DigestMismatch` when the assembled blob is not ``digest`` (the
    task's data is discarded then, so the next attempt starts clean).
    """
    existing = store.blob_path(digest)
    if existing is not None:
        return existing, DownloadStats(size=existing.stat().st_size, reused=existing.stat().st_size)
    info = await source.probe()
    if size is not None and info.size is not None and size != info.size:
        raise DigestMismatch(
            f"{source.description}: size {info.size} differs from the expected {size}"
        )
    total = info.size if info.size is not None else size
    if total is None:
        raise UpstreamError(f"{source.description}: origin did not announce a size")
    from .pieces import piece_size_for

    task = store.open_task(digest, total, piece_size_for(total, piece_size))
    try:
        return await download(source, task, info=info, concurrency=concurrency, progress=progress)
    finally:
        task.close()
