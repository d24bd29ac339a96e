"""The verified piece store: blobs on local disk, content-addressed by digest.

Layout under the data dir ``root``::

    root/blobs/<alg>/<hex>                  complete blobs, whole-blob hash verified
    root/tasks/<alg>/<hex>/meta.json        {"version", "digest", "size", "piece_size",
                                             "piece_hash"}  (written via tmp + rename)
    root/tasks/<alg>/<hex>/data             the blob's bytes, preallocated to ``size``
    root/tasks/<alg>/<hex>/journal          append-only records of verified pieces
    root/tasks/<alg>/<hex>.lock             flock(2)ed by the one Task that owns the task
                                            (kept while the task is partial, removed
                                            with the task)
    root/tmp/                               task dirs being discarded (renamed here, then
                                            deleted; leftovers are removed at start-up)

A *task* is a partial blob.  Its journal is a sequence of fixed-size records
``struct.pack("<Q32sI", index, sha256_raw, crc32(index || sha256_raw))``; a record whose
hash is 32 zero bytes is a tombstone (the piece is no longer verified); the last record of
an index wins.  On open the journal is replayed up to the first torn or corrupt record and
truncated there.

Integrity
---------
* ``write_piece`` hashes the bytes first; with an expected hash that differs, nothing is
  written.  The bytes are ``pwrite``-n into ``data`` **before** the journal record is
  appended, and the piece becomes readable (``read_piece``/``read_range``) only once its
  record is appended.  Two writers of the same piece are serialised, and a verified piece is
  never written again, so a verified piece's bytes never change.
* ``commit`` checks the whole blob against its digest.  The hash is computed incrementally
  over the contiguous verified prefix while pieces arrive (from the caller's buffer when the
  piece extends the prefix, otherwise read back from the page cache), so commit normally only
  finishes the hash.  On a match the data is fsynced, renamed to ``blobs/`` and the blob dir
  fsynced; a file under ``blobs/`` only ever appears through that rename.  On a mismatch the
  task is discarded and :class:`DigestMismatch` raised.

Crash safety
------------
Target: SIGKILL at any instant (the page cache survives a process kill).

* Creation writes ``data`` and an empty ``journal`` first and ``meta.json`` last (tmp +
  rename).  A task dir without a valid ``meta.json`` (or without ``data``/``journal``) is
  discarded on the next open.
* A journal record is appended (one ``write`` of one record on an ``O_APPEND`` fd) only
  after the piece's ``pwrite`` returned, so every record names bytes that are in the file.
  A torn record (killed mid-append) fails its CRC and is truncated away with anything after
  it.  A failed append (ENOSPC) is truncated back before the error is raised, so later
  records never follow a torn one.
* Commit renames ``data`` into ``blobs/`` and only then removes the task dir.  Killed in
  between, the blob is complete and the stale task dir is dropped on the next ``open_task``
  / ``list_tasks``.
* Discarding renames the task dir into ``tmp/`` (atomic) before deleting it.

With ``PieceStore(durable=True)`` ``data`` is fdatasynced before each journal record and
``meta.json`` is fsynced, which extends the argument to power loss (a record never reaches
disk before its bytes).  Commit always fsyncs.

Resume policy: on reopen the journal is **trusted** without re-reading the pieces (that would
cost a full read of the partial blob).  That is sound for a process kill, since a record is
only written after its bytes.  Anything else (power loss without ``durable``, bit rot) is
caught by the whole-blob check at commit, and pieces served to peers are checked by the
receiving peer against the piece-hash list.  A caller that wants more can call
:meth:`Task.verify_pieces`, which re-hashes every verified piece and tombstones bad ones.

Cache GC support
----------------
A reader of a blob (the peer server, the proxy streaming it, a re-hash) or a download of it
holds a *lease* (:meth:`PieceStore.lease`, counted per digest in this process); the blob's
*last use* is its file's access time, set by :meth:`PieceStore.touch` (at commit, and when
a lease is taken and given back), so it survives a restart without an index.  Setting the
atime leaves the mtime (the seal) alone.  :meth:`PieceStore.evict` deletes a complete blob
only while nobody holds a lease on it and no ``Task`` of it is open, under the same lock
that :meth:`PieceStore.acquire` takes: a reader either holds its lease before the check
(and the blob stays) or finds the blob gone and fetches it again.  Bytes already opened
stay readable after an eviction (an open fd keeps the inode).
:meth:`PieceStore.cache_entries` is what the GC policy (:mod:`p2pdist.gc`) looks at.

Errors: ``OSError`` maps to :class:`StoreFull` (ENOSPC, EDQUOT), :class:`StorePermission`
(EACCES, EPERM, EROFS) or :class:`StoreError`, with a one-line message naming the path.
After such an error the piece is not recorded and the task stays usable and resumable.
``open_task`` of a blob that is already complete raises :class:`BlobComplete` (a
:class:`StoreError`); callers check :meth:`PieceStore.blob_path` first.  Another owner of a
task (another process, or another open ``Task`` in this process) gives :class:`TaskBusy`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Protocol, Self, cast

from .digest import Digest
from .errors import (
    DigestMismatch,
    InvalidDigest,
    PieceMismatch,
    StoreError,
    StoreFull,
    StorePermission,
)
from .gc import CacheEntry
from .pieces import PiecePlan

__all__ = [
    "FORMAT_VERSION",
    "BlobComplete",
    "PieceObserver",
    "PieceStore",
    "Task",
    "TaskBusy",
]

FORMAT_VERSION = 1

_RECORD = struct.Struct("<Q32sI")
_BODY = struct.Struct("<Q32s")
_TOMBSTONE = bytes(32)
_READ_CHUNK = 8 << 20


class BlobComplete(StoreError):
    """``open_task`` of a blob that is already complete; ``path`` is where it is."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class TaskBusy(StoreError):
    """The task is owned by another ``Task`` (in this process or another one)."""


_FULL = {errno.ENOSPC, errno.EDQUOT}
_PERM = {errno.EACCES, errno.EPERM, errno.EROFS}


def _store_error(exc: OSError, action: str, path: str | os.PathLike[str]) -> StoreError:
    """The :class:`StoreError` for ``exc``, raised while doing ``action`` on ``path``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    msg = f"cannot {action} {os.fspath(path)}: {reason}" + (f" ({code})" if code else "")
    if exc.errno in _FULL:
        return StoreFull(msg)
    if exc.errno in _PERM:
        return StorePermission(msg)
    return StoreError(msg)


@contextlib.contextmanager
def _mapped(action: str, path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _store_error(exc, action, path) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITE_CHUNK = 256 << 10


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # In chunks: on this kernel one 4 MiB buffered write into fresh page cache cost up
    # to 10x the kernel time of the same bytes in 256 KiB writes (measured, ext4).
    while data:
        n = os.pwrite(fd, data[:_WRITE_CHUNK], offset)
        data = data[n:]
        offset += n


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        buf = buf[n:]
        offset += n


def _record(index: int, sha: bytes) -> bytes:
    body = _BODY.pack(index, sha)
    return body + struct.pack("<I", zlib.crc32(body))


def _replay(raw: bytes, count: int) -> tuple[list[bytes | None], int]:
    """The per-piece hashes claimed by journal bytes ``raw``, and the length of its valid
    prefix (records up to the first torn or corrupt one)."""
    hashes: list[bytes | None] = [None] * count
    good = 0
    while good + _RECORD.size <= len(raw):
        index, sha, crc = _RECORD.unpack_from(raw, good)
        if zlib.crc32(raw[good : good + _BODY.size]) != crc or index >= count:
            break
        hashes[index] = None if sha == _TOMBSTONE else sha
        good += _RECORD.size
    return hashes, good


class _TaskLock:
    """An exclusive, non-blocking flock on ``path``, robust against the file being
    unlinked and re-created by the previous owner."""

    def __init__(self, path: Path, digest: Digest) -> None:
        self.path = path
        while True:
            with _mapped("open lock file", path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TaskBusy(f"task {digest} is in use by another writer (lock {path})") from None
            except OSError as exc:
                os.close(fd)
                raise _store_error(exc, "lock", path) from exc
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd: int | None = fd
                return
            os.close(fd)  # the previous owner unlinked it; lock the new one

    def release(self, *, unlink: bool = False) -> None:
        if self.fd is None:
            return
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class PieceObserver(Protocol):
    """Told of every piece the store verifies or refuses (the daemon's metrics); called
    from the writing thread."""

    def piece_verified(self) -> None: ...

    def piece_rejected(
        self, reason: Literal["sha256", "length", "conflict", "scheduler"], n: int = 1
    ) -> None: ...


class PieceStore:
    """Blobs and partial tasks under ``root``.  See the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durable: bool = False,
        preallocate: bool = True,
        observer: PieceObserver | None = None,
    ) -> None:
        self.root = Path(root)
        self.observer = observer
        self.durable = durable
        self.preallocate = preallocate
        self._open: weakref.WeakValueDictionary[Digest, Task] = weakref.WeakValueDictionary()
        self._open_lock = threading.Lock()
        self._leases: dict[Digest, int] = {}
        for sub in ("blobs", "tasks", "tmp"):
            with _mapped("create directory", self.root / sub):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    # -- paths ---------------------------------------------------------------------------

    def _blob_file(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def _task_dir(self, digest: Digest) -> Path:
        return self.root / "tasks" / digest.algorithm / digest.hex

    def _lock_file(self, digest: Digest) -> Path:
        return self.root / "tasks" / digest.algorithm / f"{digest.hex}.lock"

    def blob_path(self, digest: Digest) -> Path | None:
        """Path of the complete, verified blob, or ``None``."""
        path = self._blob_file(digest)
        return path if path.is_file() else None

    def checked_blob_path(self, digest: Digest) -> Path | None:
        """Like :meth:`blob_path`, but a blob whose bytes may have changed since they were
        verified is re-hashed first, and removed (``None`` returned) if they no longer
        match.  "May have changed": its modification time differs from the one sealed at
        commit (a write through an exported hard link), or it shares its inode and carries
        no seal."""
        path = self._blob_file(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(exc, "stat", path) from None
        sealed = _sealed_mtime(path)
        if sealed == st.st_mtime_ns or (sealed is None and st.st_nlink <= 1):
            return path
        with self.lease(digest):  # not evicted while we hash it
            try:
                return self._recheck(digest, path)
            except StoreError:
                if not path.exists():
                    return None  # evicted before we took the lease
                raise

    def _recheck(self, digest: Digest, path: Path) -> Path | None:
        for _ in range(2):
            with _mapped("read", path), open(path, "rb") as f:
                before = os.fstat(f.fileno()).st_mtime_ns
                matches = _file_matches(f, digest)
                after = os.fstat(f.fileno()).st_mtime_ns
                if not matches:
                    break
                if before == after:
                    # Seal the mtime the hashed bytes had: a write during the hash
                    # changes it, and the next check hashes again.
                    _seal(f.fileno(), after)
                    return path
            # Written to while we hashed: what we read proves nothing; look again.
        # Corrupt, or still being written by someone else: not trustworthy either way.
        with _mapped("remove corrupt blob", path):
            path.unlink(missing_ok=True)
            _pieces_file(path).unlink(missing_ok=True)
        return None

    def verify_blob(self, digest: Digest) -> bool | None:
        """Re-hash a complete blob now; remove it if it no longer matches its digest.
        True: intact; False: was corrupt and is gone; None: not in the store."""
        path = self._blob_file(digest)
        if not path.is_file():
            return None
        try:
            with self.lease(digest), _mapped("read", path), open(path, "rb") as f:
                matches = _file_matches(f, digest)
        except StoreError:
            if not path.is_file():
                return None  # evicted before we took the lease
            raise
        if matches:
            return True
        with _mapped("remove corrupt blob", path):
            path.unlink(missing_ok=True)
            _pieces_file(path).unlink(missing_ok=True)
        return False

    def blob_piece_hashes(self, digest: Digest) -> tuple[int, list[str]] | None:
        """``(piece_size, sha256 hex per piece)`` recorded when the blob was committed."""
        try:
            raw = json.loads(_pieces_file(self._blob_file(digest)).read_text())
            piece_size, hashes = int(raw["piece_size"]), [str(h) for h in raw["hashes"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return piece_size, hashes

    def export(self, digest: Digest, dest: Path) -> None:
        """Put the complete blob at the new path ``dest``: a hard link when ``dest`` is on
        the store's filesystem (no second copy of the bytes), else a copy (in-kernel where
        possible).  ``dest`` must not exist.  The link is read-only like the blob; a later
        :meth:`checked_blob_path` re-verifies a blob whose inode is shared."""
        src = self._blob_file(digest)
        try:
            if _sealed_mtime(src) is None:
                raise OSError(errno.ENOTSUP, "blob carries no seal: copy, not link")
            os.link(src, dest)
            return
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store at {src}") from None
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise _store_error(exc, "link", dest) from None
        with _mapped("copy blob to", dest):
            _copy_file(src, dest)

    # -- leases, last use and eviction (cache GC) ----------------------------------------

    def acquire(self, digest: Digest) -> None:
        """Take a lease on ``digest``: :meth:`evict` leaves it alone until it is released.
        Marks the blob used (if it is complete)."""
        with self._open_lock:
            self._leases[digest] = self._leases.get(digest, 0) + 1
        self.touch(digest)

    def release(self, digest: Digest) -> None:
        """Give back a lease taken with :meth:`acquire`; marks the blob used."""
        with self._open_lock:
            n = self._leases.get(digest, 0) - 1
            if n > 0:
                self._leases[digest] = n
            else:
                self._leases.pop(digest, None)
        self.touch(digest)

    @contextlib.contextmanager
    def lease(self, digest: Digest) -> Iterator[None]:
        """``with store.lease(digest):`` the blob is not evicted inside the block."""
        self.acquire(digest)
        try:
            yield
        finally:
            self.release(digest)

    def in_use(self, digest: Digest) -> bool:
        """Leased, or a ``Task`` of it is open in this process."""
        with self._open_lock:
            return self._busy_locked(digest)

    def _busy_locked(self, digest: Digest) -> bool:
        """:meth:`in_use`, the caller holding ``_open_lock``."""
        return self._leases.get(digest, 0) > 0 or digest in self._open

    def touch(self, digest: Digest) -> None:
        """Record that the complete blob was used now (its atime; the mtime, which seals
        the verified bytes, is kept).  No-op if it is not complete; best effort."""
        path = self._blob_file(digest)
        with contextlib.suppress(OSError):
            st = path.stat()
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))

    def last_used(self, digest: Digest) -> float | None:
        """Seconds since the epoch of the complete blob's last use, or None."""
        try:
            return self._blob_file(digest).stat().st_atime
        except OSError:
            return None

    def evict(self, digest: Digest) -> bool:
        """Delete the complete blob (and its piece-hash list) unless it is leased or being
        downloaded here.  True if it was deleted."""
        path = self._blob_file(digest)
        with self._open_lock:
            if self._busy_locked(digest):
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise _store_error(exc, "evict", path) from exc
            # Under the lock: a commit of the same digest right after must keep its own.
            with contextlib.suppress(OSError):
                _pieces_file(path).unlink()
        return True

    def cache_entries(self) -> list[CacheEntry]:
        """What the cache GC looks at: every complete blob (size, last use, whether it is
        leased or downloading) and every partial task on disk (size, last piece written,
        whether a download has it open)."""
        out: list[CacheEntry] = []
        blobs = self.root / "blobs"
        with _mapped("list", blobs):
            for alg_dir in sorted(p for p in blobs.iterdir() if p.is_dir()):
                for entry in sorted(alg_dir.iterdir()):
                    try:
                        digest = Digest.parse(f"{alg_dir.name}:{entry.name}")
                        st = entry.stat()
                    except (InvalidDigest, OSError):
                        continue
                    out.append(
                        CacheEntry(str(digest), st.st_size, st.st_atime, self.in_use(digest))
                    )
        for digest in self.list_tasks():
            try:
                st = (self._task_dir(digest) / "data").stat()
            except OSError:
                continue
            with self._open_lock:
                busy = self._busy_locked(digest)
            out.append(CacheEntry(str(digest), st.st_size, st.st_mtime, busy, complete=False))
        return out

    def evict_task(self, digest: Digest) -> bool:
        """Delete an abandoned partial task (no ``Task`` of this store has it open, no
        other process holds its lock).  True if it was deleted."""
        with self._open_lock:
            if self._busy_locked(digest):
                return False
            if not self._task_dir(digest).is_dir():
                return False
            try:
                lock = _TaskLock(self._lock_file(digest), digest)
            except TaskBusy:
                return False
            try:
                self._discard_dir(self._task_dir(digest))
            finally:
                lock.release(unlink=True)
        return True

    # -- tasks ---------------------------------------------------------------------------

    def open_task(self, digest: Digest, size: int, piece_size: int) -> Task:
        """Open (resume or create) the partial task for ``digest``.

        An existing task whose recorded size equals ``size`` is resumed with its
        *recorded* piece size; any other existing task state is discarded.  Raises
        :class:`BlobComplete` if the blob is already complete, :class:`TaskBusy` if
        another ``Task`` owns it, and StoreFull/StorePermission/StoreError on I/O errors.
        """
        plan = PiecePlan(size, piece_size)  # validates
        if self.blob_path(digest) is not None:
            self._drop_stale_task(digest)
            raise BlobComplete(
                f"blob {digest} is already complete at {self._blob_file(digest)}",
                path=self._blob_file(digest),
            )
        parent = self._task_dir(digest).parent
        with _mapped("create directory", parent):
            parent.mkdir(parents=True, exist_ok=True)
        lock = _TaskLock(self._lock_file(digest), digest)
        try:
            if self.blob_path(digest) is not None:  # completed while we took the lock
                self._discard_dir(self._task_dir(digest))
                raise BlobComplete(
                    f"blob {digest} is already complete at {self._blob_file(digest)}",
                    path=self._blob_file(digest),
                )
            task = Task(self, digest, plan, lock)
        except BaseException:
            lock.release(unlink=not self._task_dir(digest).exists())
            raise
        with self._open_lock:
            self._open[digest] = task
        return task

    def remove_task(self, digest: Digest) -> None:
        """Delete the partial task for ``digest`` (no-op if there is none).  A ``Task``
        of this store that has it open is closed first; one owned by another process
        gives :class:`TaskBusy`."""
        with self._open_lock:
            task = self._open.get(digest)
        if task is not None:
            task.close()
        parent = self._task_dir(digest).parent
        if not parent.is_dir():
            return
        lock = _TaskLock(self._lock_file(digest), digest)
        try:
            self._discard_dir(self._task_dir(digest))
        finally:
            lock.release(unlink=True)

    def list_tasks(self) -> list[Digest]:
        """Digests of the partial tasks on disk (sorted), ignoring leftovers of tasks
        whose blob is already complete."""
        out: list[Digest] = []
        tasks = self.root / "tasks"
        with _mapped("list", tasks):
            algs = sorted(p for p in tasks.iterdir() if p.is_dir())
            for alg_dir in algs:
                for entry in sorted(alg_dir.iterdir()):
                    if not entry.is_dir():
                        continue
                    try:
                        digest = Digest.parse(f"{alg_dir.name}:{entry.name}")
                    except InvalidDigest:
                        continue
                    if self.blob_path(digest) is None:
                        out.append(digest)
        return out

    def list_blobs(self) -> list[tuple[Digest, int]]:
        """``(digest, size)`` of every complete blob (sorted by digest)."""
        out: list[tuple[Digest, int]] = []
        blobs = self.root / "blobs"
        with _mapped("list", blobs):
            for alg_dir in sorted(p for p in blobs.iterdir() if p.is_dir()):
                for entry in sorted(alg_dir.iterdir()):
                    try:
                        digest = Digest.parse(f"{alg_dir.name}:{entry.name}")
                        size = entry.stat().st_size
                    except (InvalidDigest, OSError):
                        continue
                    out.append((digest, size))
        return out

    def close(self) -> None:
        """Close every ``Task`` of this store that is still open."""
        with self._open_lock:
            tasks = list(self._open.values())
        for task in tasks:
            task.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _forget(self, task: Task) -> None:
        with self._open_lock:
            if self._open.get(task.digest) is task:
                del self._open[task.digest]

    def _discard_dir(self, path: Path) -> None:
        """Atomically remove a task dir: rename it into tmp/, then delete it."""
        grave = self.root / "tmp" / f"{path.name}.{uuid.uuid4().hex}.discard"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _store_error(exc, "discard task directory", path) from exc
        shutil.rmtree(grave, ignore_errors=True)

    def _drop_stale_task(self, digest: Digest) -> None:
        if not self._task_dir(digest).exists():
            return
        with contextlib.suppress(StoreError):
            lock = _TaskLock(self._lock_file(digest), digest)
            try:
                self._discard_dir(self._task_dir(digest))
            finally:
                lock.release(unlink=True)

    def _clean_tmp(self) -> None:
        tmp = self.root / "tmp"
        with contextlib.suppress(OSError):
            for entry in tmp.iterdir():
                if entry.name.endswith(".discard"):
                    shutil.rmtree(entry, ignore_errors=True)


class Task:
    """One partial blob being written piece by piece.  Thread-safe.

    Obtain it from :meth:`PieceStore.open_task`; close it (or use ``with``) when done.
    """

    digest: Digest
    plan: PiecePlan

    def __init__(self, store: PieceStore, digest: Digest, plan: PiecePlan, lock: _TaskLock) -> None:
        """Internal: use :meth:`PieceStore.open_task`, which takes ``lock`` first."""
        self._store = store
        self.digest = digest
        self._lock_file = lock
        self._dir = store._task_dir(digest)
        self._data_fd: int | None = None
        self.on_verified: Callable[[], None] | None = None
        #: Called with how many verified pieces were just un-verified (any thread).
        self.on_drop: Callable[[int], None] | None = None
        """Called by :meth:`commit` (in its thread) once the whole blob matched its digest,
        before it is synced and moved into place."""
        self._journal_fd: int | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writing: set[int] = set()
        self._busy = 0
        self._closed = False
        self._hash_lock = threading.Lock()
        # Buffered writes to one file serialise on the inode lock in the kernel anyway,
        # where the waiter spins (9% of a download's CPU, measured); waiting here sleeps.
        self._write_lock = threading.Lock()
        self._hasher = digest.hasher()
        self._hashed = 0  # pieces [0, _hashed) are in _hasher
        self._hash_buf: bytearray | None = None

        if self._try_resume(plan) is None:
            store._discard_dir(self._dir)
            self._create(plan)

    # -- opening -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The task's directory."""
        return self._dir

    @property
    def data_path(self) -> Path:
        """The task's data file (for ``os.sendfile`` of verified ranges)."""
        return self._dir / "data"

    def _try_resume(self, plan: PiecePlan) -> PiecePlan | None:
        meta_path = self._dir / "meta.json"
        try:
            with open(meta_path, "rb") as f:
                meta: Any = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        except OSError as exc:
            raise _store_error(exc, "read", meta_path) from exc
        try:
            ok = (
                meta["version"] == FORMAT_VERSION
                and meta["digest"] == str(self.digest)
                and meta["piece_hash"] == "sha256"
                and meta["size"] == plan.size
            )
            recorded = PiecePlan(int(meta["size"]), int(meta["piece_size"])) if ok else None
        except (KeyError, TypeError, ValueError):
            return None
        if recorded is None:
            return None
        data_path, journal_path = self._dir / "data", self._dir / "journal"
        try:
            data_fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(exc, "open", data_path) from exc
        try:
            with _mapped("open", data_path):
                if os.fstat(data_fd).st_size != recorded.size:
                    os.close(data_fd)
                    return None
            try:
                journal_fd = os.open(journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                os.close(data_fd)
                return None
            except OSError as exc:
                raise _store_error(exc, "open", journal_path) from exc
            try:
                with _mapped("replay", journal_path):
                    size = os.fstat(journal_fd).st_size
                    raw = os.pread(journal_fd, size, 0) if size else b""
                    hashes, good = _replay(raw, recorded.count)
                    if good != len(raw):
                        os.ftruncate(journal_fd, good)
                if self._store.preallocate:
                    self._preallocate(data_fd, recorded.size)
            except BaseException:
                os.close(journal_fd)
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(data_fd)
            raise
        self.plan = recorded
        self._data_fd, self._journal_fd = data_fd, journal_fd
        self._journal_len = good
        self._set_hashes(hashes)
        return recorded

    def _create(self, plan: PiecePlan) -> None:
        d = self._dir
        fds: list[int] = []
        try:
            with _mapped("create directory", d):
                d.mkdir(parents=True, exist_ok=False)
            with _mapped("create", d / "data"):
                data_fd = os.open(d / "data", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
                fds.append(data_fd)
                if self._store.preallocate:
                    self._preallocate(data_fd, plan.size)
                os.ftruncate(data_fd, plan.size)
            with _mapped("create", d / "journal"):
                journal_fd = os.open(
                    d / "journal",
                    os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                )
                fds.append(journal_fd)
            meta = {
                "version": FORMAT_VERSION,
                "digest": str(self.digest),
                "size": plan.size,
                "piece_size": plan.piece_size,
                "piece_hash": "sha256",
            }
            tmp = d / "meta.json.tmp"
            with _mapped("write", tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(meta, f)
                    f.flush()
                    if self._store.durable:
                        os.fsync(f.fileno())
                os.rename(tmp, d / "meta.json")
                if self._store.durable:
                    _fsync_dir(d)
                    _fsync_dir(d.parent)
        except BaseException:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(StoreError):
                self._store._discard_dir(d)
            raise
        self.plan = plan
        self._data_fd, self._journal_fd = data_fd, journal_fd
        self._journal_len = 0
        self._set_hashes([None] * plan.count)

    @staticmethod
    def _preallocate(fd: int, size: int) -> None:
        if size <= 0:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def _set_hashes(self, hashes: list[bytes | None]) -> None:
        self._hashes = hashes
        self._verified_count = sum(1 for h in hashes if h is not None)
        self._verified_bytes = sum(
            self.plan.length(i) for i, h in enumerate(hashes) if h is not None
        )

    # -- state ---------------------------------------------------------------------------

    def is_verified(self, index: int) -> bool:
        self.plan._check(index)
        return self._hashes[index] is not None

    def missing(self) -> list[int]:
        """Indices of the pieces not yet verified, ascending."""
        with self._lock:
            return [i for i, h in enumerate(self._hashes) if h is None]

    @property
    def verified_count(self) -> int:
        return self._verified_count

    @property
    def verified_bytes(self) -> int:
        return self._verified_bytes

    @property
    def complete_pieces(self) -> bool:
        """All pieces are verified (the blob may still fail its whole-blob check)."""
        return self._verified_count == self.plan.count

    @property
    def closed(self) -> bool:
        return self._closed

    def piece_hashes(self) -> list[str | None]:
        """sha256 hex of each piece, ``None`` where it is missing."""
        with self._lock:
            return [None if h is None else h.hex() for h in self._hashes]

    # -- writing -------------------------------------------------------------------------

    def write_piece(
        self,
        index: int,
        data: bytes | bytearray | memoryview,
        expected_sha256: str | None = None,
    ) -> str:
        """Verify and store piece ``index``; return its sha256 hex.

        Raises :class:`PieceMismatch` if ``data`` has the wrong length or does not match
        ``expected_sha256`` (nothing is written then), ``IndexError`` for an index out of
        range, and StoreFull/StorePermission/StoreError on I/O errors (the piece is then
        not recorded).  Rewriting a verified piece is a no-op returning its recorded hash
        (or PieceMismatch if ``expected_sha256`` differs from it); its data is then only
        checked for length, never hashed or written.

        Blocking (hashing, ``pwrite``): call it from a worker thread
        (``trio.to_thread.run_sync``); several threads may write pieces at once.
        """
        length = self.plan.length(index)
        mv = memoryview(data).cast("B")
        observer = self._store.observer
        if mv.nbytes != length:
            if observer is not None:
                observer.piece_rejected("length")
            raise PieceMismatch(
                f"piece {index} of {self.digest}: got {mv.nbytes} bytes, expected {length}",
                index=index,
            )
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.lower()
        recorded = self._hashes[index]
        if recorded is not None:  # fast path, no need to hash
            return self._check_recorded(index, recorded, expected_sha256)
        sha = hashlib.sha256(mv).digest()
        if expected_sha256 is not None and sha.hex() != expected_sha256:
            if observer is not None:
                observer.piece_rejected("sha256")
            raise PieceMismatch(
                f"piece {index} of {self.digest}: sha256 {sha.hex()} != expected {expected_sha256}",
                index=index,
            )
        with self._cond:
            while index in self._writing:
                self._cond.wait()
            self._check_open()
            recorded = self._hashes[index]
            if recorded is not None:
                return self._check_recorded(index, recorded, expected_sha256)
            self._writing.add(index)
        try:
            data_fd = self._data_fd
            assert data_fd is not None
            with self._write_lock, _mapped(f"write piece {index} to", self.data_path):
                _pwrite_all(data_fd, mv, self.plan.start(index))
                _start_writeback(data_fd, self.plan.start(index), length)
                if self._store.durable:
                    os.fdatasync(data_fd)
            with self._lock:
                self._append_record(index, sha)
                self._hashes[index] = sha
                self._verified_count += 1
                self._verified_bytes += length
            if observer is not None:
                observer.piece_verified()
        finally:
            with self._cond:
                self._writing.discard(index)
                self._cond.notify_all()
        self._pump(index, mv)
        return sha.hex()

    def _check_recorded(self, index: int, recorded: bytes, expected: str | None) -> str:
        if expected is not None and recorded.hex() != expected:
            if self._store.observer is not None:
                self._store.observer.piece_rejected("conflict")
            raise PieceMismatch(
                f"piece {index} of {self.digest} is already verified with sha256 "
                f"{recorded.hex()}, not {expected}",
                index=index,
            )
        return recorded.hex()

    def _append_record(self, index: int, sha: bytes) -> None:
        """Append one journal record (caller holds ``_lock``).  On failure the journal is
        truncated back to its last good length and the error raised."""
        fd = self._journal_fd
        assert fd is not None
        rec = _record(index, sha)
        path = self._dir / "journal"
        try:
            n = os.write(fd, rec)
            if n != len(rec):
                raise OSError(errno.ENOSPC, "short write to journal")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._journal_len)
            raise _store_error(exc, f"record piece {index} in", path) from exc
        self._journal_len += len(rec)

    # -- whole-blob hash -----------------------------------------------------------------

    def _pump(self, index: int | None, data: memoryview | None) -> None:
        """Feed the whole-blob hasher the contiguous verified prefix, without waiting for
        another thread that is already doing so (it will pick up what we recorded)."""
        while True:
            if not self._hash_lock.acquire(blocking=False):
                return
            try:
                self._advance(index, data)
            except StoreError:
                return  # commit catches up (and reports the error)
            finally:
                self._hash_lock.release()
            # A writer that recorded the next piece while we held the lock gave up on
            # acquiring it: look again now that it is free.
            n = self._hashed
            if self._closed or n >= self.plan.count or self._hashes[n] is None:
                return
            index = data = None

    def _advance(self, index: int | None, data: memoryview | None) -> None:
        """Caller holds ``_hash_lock``."""
        while True:
            n = self._hashed
            with self._lock:
                if self._closed or n >= self.plan.count or self._hashes[n] is None:
                    return
                self._busy += 1
            try:
                if n == index and data is not None:
                    self._hasher.update(data)
                else:
                    try:
                        self._hash_from_file(*self.plan.range(n))
                    except BaseException:
                        # the hasher may hold part of the piece: start over next time
                        self._hasher = self.digest.hasher()
                        self._hashed = 0
                        raise
                self._hashed = n + 1
            finally:
                self._release_busy()

    def _hash_from_file(self, start: int, end: int) -> None:
        fd = self._data_fd
        assert fd is not None
        if self._hash_buf is None:
            self._hash_buf = bytearray(min(_READ_CHUNK, max(self.plan.piece_size, 1)))
        buf = memoryview(self._hash_buf)
        with _mapped("read", self.data_path):
            while start < end:
                chunk = buf[: min(len(buf), end - start)]
                _pread_into(fd, chunk, start)
                self._hasher.update(chunk)
                start += len(chunk)

    def _release_busy(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    # -- reading -------------------------------------------------------------------------

    def read_piece(self, index: int) -> bytes:
        """The bytes of a verified piece; StoreError if it is not verified."""
        start, end = self.plan.range(index)
        return self.read_range(start, end)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; StoreError unless every piece they overlap is verified."""
        if not 0 <= start <= end <= self.plan.size:
            raise ValueError(f"range [{start}, {end}) outside blob of {self.plan.size} bytes")
        with self._lock:
            self._check_open()
            for i in self.plan.pieces_in(start, end):
                if self._hashes[i] is None:
                    raise StoreError(
                        f"piece {i} of {self.digest} is not verified; cannot read "
                        f"[{start}, {end}) of {self.data_path}"
                    )
            self._busy += 1
        try:
            buf = bytearray(end - start)
            fd = self._data_fd
            assert fd is not None
            with _mapped("read", self.data_path):
                _pread_into(fd, memoryview(buf), start)
            return bytes(buf)
        finally:
            self._release_busy()

    # -- verification on demand ----------------------------------------------------------

    def drop_pieces(self, indices: Iterable[int]) -> list[int]:
        """Un-verify these pieces (durably, with tombstones): they will be refetched and
        are no longer readable or served.  Returns the ones that were verified."""
        dropped: list[int] = []
        with self._hash_lock:
            with self._lock:
                self._check_open()
                for i in sorted(set(indices)):
                    if not 0 <= i < self.plan.count or self._hashes[i] is None:
                        continue
                    if i in self._writing:
                        continue
                    self._append_record(i, _TOMBSTONE)
                    self._hashes[i] = None
                    self._verified_count -= 1
                    self._verified_bytes -= self.plan.length(i)
                    dropped.append(i)
            if dropped and min(dropped) < self._hashed:
                self._hasher = self.digest.hasher()
                self._hashed = 0
        if dropped and self.on_drop is not None:
            self.on_drop(len(dropped))
        return dropped

    def verify_pieces(self) -> list[int]:
        """Re-hash every verified piece from disk; tombstone (un-verify) those whose bytes
        no longer match their recorded hash.  Returns the indices dropped."""
        bad: list[int] = []
        with self._hash_lock:
            for i in range(self.plan.count):
                with self._lock:
                    self._check_open()
                    sha = self._hashes[i]
                    if sha is None or i in self._writing:
                        continue
                    self._busy += 1
                try:
                    start, end = self.plan.range(i)
                    h = hashlib.sha256()
                    buf = bytearray(min(_READ_CHUNK, end - start) or 1)
                    fd = self._data_fd
                    assert fd is not None
                    with _mapped("read", self.data_path):
                        pos = start
                        while pos < end:
                            chunk = memoryview(buf)[: min(len(buf), end - pos)]
                            _pread_into(fd, chunk, pos)
                            h.update(chunk)
                            pos += len(chunk)
                finally:
                    self._release_busy()
                if h.digest() != sha:
                    with self._lock:
                        self._append_record(i, _TOMBSTONE)
                        self._hashes[i] = None
                        self._verified_count -= 1
                        self._verified_bytes -= end - start
                    bad.append(i)
            if bad and min(bad) < self._hashed:
                self._hasher = self.digest.hasher()
                self._hashed = 0
        if bad and self.on_drop is not None:
            self.on_drop(len(bad))
        return bad

    # -- commit / close ------------------------------------------------------------------

    def commit(self) -> Path:
        """Finish the whole-blob check and move the blob into place; return its path.

        StoreError unless every piece is verified.  On a digest mismatch the task's data
        is discarded, the task closed and :class:`DigestMismatch` raised.
        """
        with self._hash_lock:
            with self._lock:
                self._check_open()
                if self._verified_count != self.plan.count or self._writing:
                    raise StoreError(
                        f"cannot commit {self.digest}: {self.plan.count - self._verified_count}"
                        f" of {self.plan.count} pieces are not verified"
                    )
            self._advance(None, None)
            assert self._hashed == self.plan.count
            got = self._hasher.hexdigest()
        store = self._store
        if got != self.digest.hex:
            self._close_fds()
            try:
                store._discard_dir(self._dir)
            finally:
                self._finish()
            raise DigestMismatch(
                f"blob {self.digest}: content hashes to {self.digest.algorithm}:{got}; "
                "task data discarded"
            )
        if self.on_verified is not None:
            # The bytes are the blob: a reader streaming it may have the last byte now,
            # before the sync and the rename (which do not change them).
            self.on_verified()
        dest = store._blob_file(self.digest)
        data_fd = self._data_fd
        assert data_fd is not None
        try:
            with _mapped("sync", self.data_path):
                os.fsync(data_fd)
            with _mapped("create directory", dest.parent):
                dest.parent.mkdir(parents=True, exist_ok=True)
            with _mapped("move blob into place at", dest):
                # Read-only: a blob's bytes never change once verified (exports may be
                # hard links, see PieceStore.export).
                os.fchmod(data_fd, 0o444)
                _seal(data_fd)
                # The piece-hash list goes with the blob, so that after a restart (of the
                # daemon or the scheduler) peers can still check what this node serves.
                _write_pieces_file(dest, self.plan.piece_size, self._hashes)
                os.rename(self.data_path, dest)
                _fsync_dir(dest.parent)
            store.touch(self.digest)  # completed: its first use, for the cache GC
        except StoreError:
            raise  # the task is intact and stays open; commit can be retried
        self._close_fds()
        try:
            store._discard_dir(self._dir)
        finally:
            self._finish()
        return dest

    def dup_data_fd(self) -> int | None:
        """A duplicate of the open data file (the caller closes it), or None once the task
        is closed: the inode stays this task's even if its data is later discarded."""
        with self._lock:
            if self._closed or self._data_fd is None:
                return None
            return os.dup(self._data_fd)

    def close(self) -> None:
        """Release the task (waiting for in-flight writes and reads); idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._writing or self._busy:
                self._cond.wait()
        with self._hash_lock:
            self._close_fds()
        self._finish(unlink_lock=False)

    def _close_fds(self) -> None:
        with self._cond:
            self._closed = True
            while self._writing or self._busy:
                self._cond.wait()
            for fd in (self._data_fd, self._journal_fd):
                if fd is not None:
                    os.close(fd)
            self._data_fd = self._journal_fd = None

    def _finish(self, *, unlink_lock: bool = True) -> None:
        self._lock_file.release(unlink=unlink_lock)
        self._store._forget(self)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"task {self.digest} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self.close()

    def __repr__(self) -> str:
        return (
            f"<Task {self.digest} {self._verified_count}/{self.plan.count} pieces"
            f"{' closed' if self._closed else ''}>"
        )


def _copy_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to the new file ``dest`` (copy_file_range, falling back to read/write)."""
    with open(src, "rb") as inp, open(dest, "xb") as out:
        size = os.fstat(inp.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(inp.fileno(), out.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        if done < size:
            inp.seek(done)
            out.seek(done)
            shutil.copyfileobj(inp, out, 4 << 20)


_SEAL = "user.p2pdist.mtime"


def _seal(fd: int, mtime_ns: int | None = None) -> None:
    """Record a verified blob's modification time in an xattr: any later write to the
    bytes (through an exported hard link) changes the mtime and breaks the seal.  On a
    filesystem without user xattrs nothing is recorded, and exports are copies."""
    with contextlib.suppress(OSError):
        mtime = os.fstat(fd).st_mtime_ns if mtime_ns is None else mtime_ns
        os.setxattr(fd, _SEAL, str(mtime).encode())


def _sealed_mtime(path: Path) -> int | None:
    try:
        return int(os.getxattr(path, _SEAL))
    except (OSError, ValueError):
        return None


def _file_matches(f: BinaryIO, digest: Digest) -> bool:
    """Whether the rest of ``f`` hashes to ``digest`` (read in 4 MiB blocks)."""
    h = digest.hasher()
    while block := f.read(4 << 20):
        h.update(block)
    return h.hexdigest() == digest.hex


def _pieces_file(blob: Path) -> Path:
    return blob.with_name(blob.name + ".pieces")


def _write_pieces_file(blob: Path, piece_size: int, hashes: list[bytes | None]) -> None:
    if any(h is None for h in hashes):
        return
    side = _pieces_file(blob)
    tmp = side.with_name(side.name + ".tmp")
    body = {"piece_size": piece_size, "hashes": [h.hex() for h in hashes if h is not None]}
    tmp.write_text(json.dumps(body, separators=(",", ":")))
    os.replace(tmp, side)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a piece to disk now (asynchronously), so that the
    fsync at commit has little left to do: measured here, it takes commit's fsync of a
    1 GiB blob from ~0.27 s to ~0 without slowing the writes.  Best effort."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
