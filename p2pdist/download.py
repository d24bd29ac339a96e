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
from collections.abc import Awaitable, Callable, Sequence
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
    "SourceFetcher",
    "download",
    "download_blob",
    "plan_spans",
]

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes received so far, total size or None)."""
ThrottleFn = Callable[[int], Awaitable[None]]
"""Awaited with the size of each chunk received (a bandwidth limit paces the reads)."""

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


class SourceFetcher:
    """Fetches pieces of one blob from a :class:`Source` into a :class:`PieceSink`: runs of
    consecutive pieces, one range request each, ``concurrency`` at a time.  ``on_piece``
    is called with ``(index, sha256 hex)`` as each piece is stored (the swarm publishes
    these hashes to the scheduler)."""

    def __init__(
        self,
        source: Source,
        sink: PieceSink,
        *,
        concurrency: int,
        progress: ProgressFn | None = None,
        stats: DownloadStats | None = None,
        on_piece: Callable[[int, str], None] | None = None,
        throttle: ThrottleFn | None = None,
    ) -> None:
        self.on_piece = on_piece
        self.throttle = throttle
        self.source = source
        self.sink = sink
        self.plan = sink.plan
        self.concurrency = concurrency
        self.progress = progress
        self.stats = stats if stats is not None else DownloadStats(size=sink.plan.size)
        # Bound the piece buffers waiting for (or in) a worker thread: memory stays at
        # about 2 × concurrency × piece size at most whatever the network and disk do.
        self.buffers = trio.Semaphore(max(2, concurrency + 1))
        self.threads = trio.CapacityLimiter(max(2, min(concurrency, os.cpu_count() or 2)))
        self.pool = _BufferPool(self.plan.piece_size, limit=2 * max(2, concurrency) + 2)
        self.stored = 0

    def _count(self, n: int) -> None:
        self.stats.received += n

    async def _store(self, index: int, buf: bytearray) -> None:
        try:
            data = memoryview(buf)[: self.plan.length(index)]
            sha = await trio.to_thread.run_sync(
                self.sink.write_piece, index, data, limiter=self.threads
            )
            if self.on_piece is not None:
                self.on_piece(index, sha)
            self.stored += self.plan.length(index)
            if self.progress is not None:
                # After the piece is stored and verified: progress means readable bytes.
                self.progress(self.stats.reused + self.stored, self.plan.size)
        finally:
            # The sink only borrows the buffer for the call: it can be reused now.
            self.pool.give(buf)
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
            before = len(pending)
            try:
                self.stats.requests += 1
                pieces = _Assembler(self.plan, pending, self.pool)
                async with self.source.open_range(start, None if whole else end) as stream:
                    try:
                        async for chunk in stream:
                            self._count(len(chunk))
                            if self.throttle is not None:
                                await self.throttle(len(chunk))
                            for index, data in pieces.feed(chunk):
                                pending.remove(index)
                                await self.buffers.acquire()
                                writers.start_soon(self._store, index, data)
                    finally:
                        pieces.close()
                    if pending:
                        raise NetworkError(
                            f"{self.source.description}: connection closed early "
                            f"({len(pending)} piece(s) short)"
                        )
            except (NetworkError, UpstreamError):
                # Retries are counted per attempt that made no progress: a connection that
                # keeps breaking after some pieces still gets the range done.
                attempt = 1 if len(pending) < before else attempt + 1
                self.stats.retries += 1
                if attempt > SPAN_RETRIES:
                    raise
                await trio.sleep(min(2.0, 0.1 * 2**attempt))

    async def run_ranged(self) -> None:
        await self.fetch_spans(plan_spans(self.sink.missing(), self.concurrency))

    async def fetch_spans(self, spans: Sequence[list[int]]) -> None:
        """Fetch the given runs of consecutive pieces, ``concurrency`` requests at a time."""
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
        self.stats.requests += 1
        pieces = _Assembler(self.plan, list(self.plan), self.pool)
        async with self.source.open_range(0, None) as stream:
            try:
                async for chunk in stream:
                    self._count(len(chunk))
                    if self.throttle is not None:
                        await self.throttle(len(chunk))
                    for index, data in pieces.feed(chunk):
                        if index in missing:
                            await self.buffers.acquire()
                            writers.start_soon(self._store, index, data)
                        else:
                            self.pool.give(data)
            finally:
                pieces.close()
        if not pieces.done:
            raise NetworkError(f"{self.source.description}: connection closed early")


class _BufferPool:
    """Reuses piece-sized buffers: a fresh 4 MiB buffer per piece costs a thousand page
    faults (most of the kernel time of a download, measured), a reused one none."""

    __slots__ = ("_free", "_limit", "_size")

    def __init__(self, size: int, *, limit: int) -> None:
        self._size = size
        self._limit = limit
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self._size)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self._limit:
            self._free.append(buf)


class _Assembler:
    """Cuts a byte stream covering consecutive pieces ``indices`` into whole pieces.

    Each piece is filled into a pooled piece-sized buffer by slice assignment: one copy per
    byte, no reallocation.  Completed pieces are ``(index, buffer)``, the piece being the
    buffer's first ``plan.length(index)`` bytes.  A partial piece's buffer goes back to the
    pool when the stream ends early (:meth:`close`).  More bytes than the pieces hold is a
    :class:`NetworkError`."""

    __slots__ = ("_buf", "_fill", "_indices", "_need", "_next", "_plan", "_pool", "_view")

    def __init__(self, plan: PiecePlan, indices: Sequence[int], pool: _BufferPool) -> None:
        self._plan = plan
        self._pool = pool
        self._indices = list(indices)
        self._next = 0
        self._fill = 0
        self._need = 0
        self._buf: bytearray | None = None
        self._view = memoryview(b"")
        self._start_piece()

    @property
    def done(self) -> bool:
        return self._next >= len(self._indices)

    def _start_piece(self) -> None:
        if not self.done:
            self._buf = self._pool.take()
            self._view = memoryview(self._buf)
            self._need = self._plan.length(self._indices[self._next])
            self._fill = 0

    def close(self) -> None:
        if self._buf is not None:
            self._view.release()
            self._pool.give(self._buf)
            self._buf = None

    def feed(self, chunk: bytes) -> list[tuple[int, bytearray]]:
        out: list[tuple[int, bytearray]] = []
        src = memoryview(chunk)
        pos = 0
        total = len(src)
        while pos < total:
            if self._buf is None:
                raise NetworkError("origin sent more bytes than asked for")
            take = min(self._need - self._fill, total - pos)
            self._view[self._fill : self._fill + take] = src[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._need:
                self._view.release()
                out.append((self._indices[self._next], self._buf))
                self._buf = None
                self._next += 1
                self._start_piece()
        return out


async def download(
    source: Source,
    sink: PieceSink,
    *,
    info: SourceInfo,
    concurrency: int = 8,
    progress: ProgressFn | None = None,
    throttle: ThrottleFn | None = None,
) -> tuple[Path, DownloadStats]:
    """Fill ``sink`` from ``source`` and commit it.  Returns the committed path."""
    stats = DownloadStats(size=sink.plan.size)
    missing = sink.missing()
    stats.reused = sink.plan.size - sum(sink.plan.length(i) for i in missing)
    engine = SourceFetcher(
        source, sink, concurrency=concurrency, progress=progress, stats=stats, throttle=throttle
    )
    started = time.perf_counter()
    # Pieces found bad on disk after they were verified (a child's report, a re-check)
    # are un-verified while the download runs: fetch them again before the commit (a
    # couple of rounds: a disk that keeps corrupting them fails the commit).
    for _ in range(3):
        if not missing:
            break
        if info.accepts_ranges:
            await engine.run_ranged()
        else:
            await engine.run_stream()
        missing = sink.missing()
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
    existing = await trio.to_thread.run_sync(store.checked_blob_path, digest)
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
