"""Tests of the verified piece store (p2pdist.store)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pdist.digest import Digest, sha256_digest
from p2pdist.errors import (
    DigestMismatch,
    PieceMismatch,
    StoreError,
    StoreFull,
    StorePermission,
)
from p2pdist.store import BlobComplete, PieceStore, Task, TaskBusy
from tests.helpers import tmpfs

RECORD_SIZE = 44


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def piece(data: bytes, task: Task, index: int) -> bytes:
    start, end = task.plan.range(index)
    return data[start:end]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_all(task: Task, data: bytes, order: list[int] | None = None) -> None:
    for i in order if order is not None else range(task.plan.count):
        p = piece(data, task, i)
        task.write_piece(i, p, sha(p))


def task_dir(root: Path, digest: Digest) -> Path:
    return root / "tasks" / digest.algorithm / digest.hex


# -- basics ---------------------------------------------------------------------------------


def test_layout_created(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "data")
    for sub in ("blobs", "tasks", "tmp"):
        assert (tmp_path / "data" / sub).is_dir()
    assert store.root == tmp_path / "data"


def test_out_of_order_threaded_writes_then_commit(tmp_path: Path) -> None:
    data = blob(64 * 1024 * 10 + 123, seed=1)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    task = store.open_task(digest, len(data), 64 * 1024)
    assert task.plan.count == 11
    order = list(range(task.plan.count)) * 2  # every piece twice, concurrently
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(8) as ex:
        hashes = list(ex.map(lambda i: task.write_piece(i, piece(data, task, i)), order))
    assert hashes == [sha(piece(data, task, i)) for i in order]
    assert task.complete_pieces
    assert task.missing() == []
    assert task.verified_bytes == len(data)
    # the blob is not visible before commit
    assert store.blob_path(digest) is None
    assert not (tmp_path / "blobs" / "sha256" / digest.hex).exists()
    path = task.commit()
    assert path == tmp_path / "blobs" / "sha256" / digest.hex
    assert store.blob_path(digest) == path
    assert path.read_bytes() == data
    assert not task_dir(tmp_path, digest).exists()
    assert store.list_tasks() == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_incremental_hash_covers_prefix_before_commit(tmp_path: Path) -> None:
    """After all pieces are written (in any order, from threads), the whole-blob hasher
    has already consumed every piece, so commit does not re-read the file."""
    data = blob(4096 * 40, seed=2)
    store = PieceStore(tmp_path)
    task = store.open_task(sha256_digest(data), len(data), 4096)
    order = list(range(40))
    random.Random(3).shuffle(order)
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: task.write_piece(i, piece(data, task, i)), order))
    assert task._hashed == 40
    assert task.commit().read_bytes() == data


def test_write_piece_accepts_views_and_returns_hash(tmp_path: Path) -> None:
    data = blob(300, seed=3)
    task = PieceStore(tmp_path).open_task(sha256_digest(data), 300, 100)
    assert task.write_piece(0, bytearray(data[:100])) == sha(data[:100])
    assert task.write_piece(1, memoryview(data)[100:200], sha(data[100:200]).upper()) == sha(
        data[100:200]
    )
    assert task.piece_hashes() == [sha(data[:100]), sha(data[100:200]), None]
    assert task.is_verified(1) and not task.is_verified(2)
    assert task.missing() == [2]
    assert task.verified_count == 2 and task.verified_bytes == 200


def test_wrong_expected_hash_writes_nothing(tmp_path: Path) -> None:
    data = blob(1000, seed=4)
    store = PieceStore(tmp_path)
    digest = sha256_digest(data)
    task = store.open_task(digest, 1000, 250)
    bad = b"x" * 250
    with pytest.raises(PieceMismatch) as info:
        task.write_piece(1, bad, sha(piece(data, task, 1)))
    assert info.value.index == 1
    assert not task.is_verified(1)
    assert task.piece_hashes()[1] is None
    with pytest.raises(StoreError):
        task.read_piece(1)
    # nothing recorded, nothing written to the data file
    assert (task_dir(tmp_path, digest) / "journal").stat().st_size == 0
    assert bad not in (task_dir(tmp_path, digest) / "data").read_bytes()
    task.close()
    assert store.open_task(digest, 1000, 250).missing() == [0, 1, 2, 3]


def test_wrong_length_is_piece_mismatch(tmp_path: Path) -> None:
    data = blob(1000, seed=5)
    task = PieceStore(tmp_path).open_task(sha256_digest(data), 1000, 300)
    with pytest.raises(PieceMismatch) as info:
        task.write_piece(0, data[:299])
    assert info.value.index == 0
    with pytest.raises(PieceMismatch):
        task.write_piece(3, data[900:1000] + b"!")  # last piece is 100 bytes
    assert task.verified_count == 0
    with pytest.raises(IndexError):
        task.write_piece(4, b"")


def test_rewrite_verified_piece_is_noop_and_checks_expected(tmp_path: Path) -> None:
    data = blob(200, seed=6)
    task = PieceStore(tmp_path).open_task(sha256_digest(data), 200, 100)
    h = task.write_piece(0, data[:100])
    journal = task.path / "journal"
    assert journal.stat().st_size == RECORD_SIZE
    assert task.write_piece(0, data[:100], h) == h
    assert journal.stat().st_size == RECORD_SIZE
    with pytest.raises(PieceMismatch):
        task.write_piece(0, data[:100], sha(b"other"))
    assert task.read_piece(0) == data[:100]


def test_read_unverified_piece_and_ranges(tmp_path: Path) -> None:
    data = blob(1000, seed=7)
    task = PieceStore(tmp_path).open_task(sha256_digest(data), 1000, 100)
    with pytest.raises(StoreError):
        task.read_piece(0)
    write_all(task, data, [0, 1, 2, 5])
    assert task.read_piece(2) == data[200:300]
    assert task.read_range(50, 250) == data[50:250]
    assert task.read_range(0, 300) == data[:300]
    assert task.read_range(500, 600) == data[500:600]
    assert task.read_range(10, 10) == b""
    with pytest.raises(StoreError):
        task.read_range(250, 301)  # touches piece 3
    with pytest.raises(StoreError):
        task.read_range(450, 550)  # touches piece 4
    with pytest.raises(ValueError):
        task.read_range(900, 1001)


def test_commit_requires_all_pieces(tmp_path: Path) -> None:
    data = blob(300, seed=8)
    store = PieceStore(tmp_path)
    task = store.open_task(sha256_digest(data), 300, 100)
    write_all(task, data, [0, 2])
    with pytest.raises(StoreError, match="1 of 3 pieces"):
        task.commit()
    write_all(task, data, [1])
    assert task.commit().read_bytes() == data


def test_whole_blob_mismatch_discards_task(tmp_path: Path) -> None:
    data = blob(500, seed=9)
    wrong = Digest("sha256", sha(b"something else"))
    store = PieceStore(tmp_path)
    task = store.open_task(wrong, 500, 100)
    write_all(task, data)  # every piece matches its (poisoned) piece hash
    with pytest.raises(DigestMismatch):
        task.commit()
    assert store.blob_path(wrong) is None
    assert not (tmp_path / "blobs" / "sha256" / wrong.hex).exists()
    assert not task_dir(tmp_path, wrong).exists()
    assert not (tmp_path / "tasks" / "sha256" / f"{wrong.hex}.lock").exists()
    assert store.list_tasks() == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert task.closed
    with pytest.raises(StoreError):
        task.read_piece(0)
    fresh = store.open_task(wrong, 500, 100)
    assert fresh.verified_count == 0


def test_empty_blob(tmp_path: Path) -> None:
    digest = sha256_digest(b"")
    store = PieceStore(tmp_path)
    task = store.open_task(digest, 0, 4096)
    assert task.plan.count == 0 and task.complete_pieces
    assert task.commit().read_bytes() == b""
    assert store.blob_path(digest) is not None


# -- resume, locking ------------------------------------------------------------------------


def test_resume_keeps_recorded_piece_size(tmp_path: Path) -> None:
    data = blob(1000, seed=10)
    digest = sha256_digest(data)
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        write_all(task, data, [0, 3, 9])
    store = PieceStore(tmp_path)  # "restart"
    assert store.list_tasks() == [digest]
    task = store.open_task(digest, 1000, 400)
    assert task.plan.piece_size == 100
    assert task.plan.count == 10
    assert [i for i in range(10) if task.is_verified(i)] == [0, 3, 9]
    assert task.read_piece(3) == data[300:400]
    write_all(task, data, task.missing())
    assert task.commit().read_bytes() == data


def test_resume_with_other_size_starts_fresh(tmp_path: Path) -> None:
    data = blob(1000, seed=11)
    digest = sha256_digest(data)
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        write_all(task, data, [0, 1])
    task = PieceStore(tmp_path).open_task(digest, 1200, 400)
    assert task.plan.size == 1200 and task.plan.piece_size == 400
    assert task.verified_count == 0
    assert (task.path / "data").stat().st_size == 1200


def test_complete_blob_survives_reopen(tmp_path: Path) -> None:
    data = blob(700, seed=12)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    with store.open_task(digest, 700, 100) as task:
        write_all(task, data)
        path = task.commit()
    store2 = PieceStore(tmp_path)
    assert store2.blob_path(digest) == path
    assert path.read_bytes() == data
    assert store2.list_tasks() == []
    with pytest.raises(BlobComplete) as info:
        store2.open_task(digest, 700, 100)
    assert info.value.path == path


def test_kill_between_rename_and_cleanup(tmp_path: Path) -> None:
    """Commit killed after the rename: the blob is complete and the stale task dir is
    ignored by list_tasks and dropped by open_task."""
    data = blob(300, seed=13)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    task = store.open_task(digest, 300, 100)
    write_all(task, data)
    dest = tmp_path / "blobs" / "sha256" / digest.hex
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(task.path / "data", dest)  # what commit does, then "dies"
    task.close()
    store2 = PieceStore(tmp_path)
    assert store2.list_tasks() == []
    assert store2.blob_path(digest) == dest
    with pytest.raises(BlobComplete):
        store2.open_task(digest, 300, 100)
    assert not task_dir(tmp_path, digest).exists()


def test_task_dir_without_meta_is_discarded(tmp_path: Path) -> None:
    """Killed during creation, before meta.json was renamed into place."""
    data = blob(300, seed=14)
    digest = sha256_digest(data)
    d = task_dir(tmp_path, digest)
    d.mkdir(parents=True)
    (d / "data").write_bytes(b"\0" * 300)
    (d / "journal").write_bytes(b"")
    (d / "meta.json.tmp").write_text("{")
    task = PieceStore(tmp_path).open_task(digest, 300, 100)
    assert task.verified_count == 0
    assert (d / "meta.json").exists()
    assert not (d / "meta.json.tmp").exists()


def test_corrupt_meta_is_discarded(tmp_path: Path) -> None:
    data = blob(300, seed=15)
    digest = sha256_digest(data)
    with PieceStore(tmp_path).open_task(digest, 300, 100) as task:
        write_all(task, data, [0])
    (task_dir(tmp_path, digest) / "meta.json").write_text("not json")
    task = PieceStore(tmp_path).open_task(digest, 300, 100)
    assert task.verified_count == 0


def test_torn_journal_tail_is_ignored(tmp_path: Path) -> None:
    data = blob(1000, seed=16)
    digest = sha256_digest(data)
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        write_all(task, data, [4, 1, 7])
    journal = task_dir(tmp_path, digest) / "journal"
    assert journal.stat().st_size == 3 * RECORD_SIZE
    rng = random.Random(17)
    # plausible records (index in range) with a wrong checksum, and a torn partial record
    plausible = struct.pack("<Q32sI", 2, rng.randbytes(32), 12345)
    for garbage in (rng.randbytes(17), plausible, plausible + rng.randbytes(30)):
        with open(journal, "ab") as f:
            f.write(garbage)
        store = PieceStore(tmp_path)
        with store.open_task(digest, 1000, 100) as task:
            assert [i for i in range(10) if task.is_verified(i)] == [1, 4, 7]
            assert journal.stat().st_size == 3 * RECORD_SIZE  # truncated away
            assert task.read_piece(7) == data[700:800]
    # a record with a flipped bit in its hash ends the valid prefix too
    raw = bytearray(journal.read_bytes())
    raw[2 * RECORD_SIZE + 20] ^= 0x01
    journal.write_bytes(bytes(raw))
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        assert [i for i in range(10) if task.is_verified(i)] == [1, 4]
        assert task.piece_hashes()[4] == sha(data[400:500])
        write_all(task, data, task.missing())
        assert task.commit().read_bytes() == data


def test_failed_partial_journal_append_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal append that writes part of a record and then fails (disk full) is
    truncated back, so records appended later are not lost behind a torn one."""
    data = blob(1000, seed=21)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    task = store.open_task(digest, 1000, 100)
    write_all(task, data, [0, 1])
    real_write = os.write

    def torn_write(fd: int, buf: bytes) -> int:
        if fd == task._journal_fd:
            real_write(fd, buf[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", torn_write)
    with pytest.raises(StoreFull, match="journal"):
        task.write_piece(2, data[200:300])
    monkeypatch.undo()
    assert not task.is_verified(2)
    assert (task.path / "journal").stat().st_size == 2 * RECORD_SIZE
    write_all(task, data, [2, 5])
    task.close()
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as again:
        assert [i for i in range(10) if again.is_verified(i)] == [0, 1, 2, 5]


def test_second_opener_is_refused(tmp_path: Path) -> None:
    data = blob(300, seed=18)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    task = store.open_task(digest, 300, 100)
    with pytest.raises(TaskBusy, match="in use"):
        store.open_task(digest, 300, 100)
    with pytest.raises(TaskBusy):
        PieceStore(tmp_path).open_task(digest, 300, 100)
    code = (
        "import sys\n"
        "from p2pdist.store import PieceStore, TaskBusy\n"
        "from p2pdist.digest import Digest\n"
        "try:\n"
        f"    PieceStore({str(tmp_path)!r}).open_task(Digest.parse({str(digest)!r}), 300, 100)\n"
        "except TaskBusy as e:\n"
        "    print('busy', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("busy task sha256:")
    task.close()
    again = store.open_task(digest, 300, 100)  # free after close
    again.close()


def test_remove_task(tmp_path: Path) -> None:
    data = blob(300, seed=19)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    task = store.open_task(digest, 300, 100)
    write_all(task, data, [0])
    assert store.list_tasks() == [digest]
    store.remove_task(digest)  # closes our own open Task first
    assert task.closed
    assert store.list_tasks() == []
    assert not task_dir(tmp_path, digest).exists()
    store.remove_task(digest)  # no-op
    assert store.open_task(digest, 300, 100).verified_count == 0


def test_verify_pieces_drops_corrupted(tmp_path: Path) -> None:
    data = blob(1000, seed=20)
    digest = sha256_digest(data)
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        write_all(task, data)
    with open(task_dir(tmp_path, digest) / "data", "r+b") as f:  # bit rot in piece 6
        f.seek(650)
        f.write(b"\xff")
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        assert task.complete_pieces  # trusted from the journal
        assert task.verify_pieces() == [6]
        assert task.missing() == [6]
    with PieceStore(tmp_path).open_task(digest, 1000, 100) as task:
        assert task.missing() == [6]  # the tombstone is durable
        write_all(task, data, [6])
        assert task.commit().read_bytes() == data


# -- SIGKILL at random moments --------------------------------------------------------------

_CHILD = r"""
import hashlib, random, sys, threading
from concurrent.futures import ThreadPoolExecutor
from p2pdist.digest import Digest
from p2pdist.store import PieceStore

root, seed, size, piece_size, digest, round_ = sys.argv[1:7]
size, piece_size = int(size), int(piece_size)
data = random.Random(int(seed)).randbytes(size)
task = PieceStore(root).open_task(Digest.parse(digest), size, piece_size)
order = task.missing()
random.Random(int(seed) * 1000 + int(round_)).shuffle(order)
out = threading.Lock()

def write(i):
    start, end = task.plan.range(i)
    p = data[start:end]
    task.write_piece(i, p, hashlib.sha256(p).hexdigest())
    with out:
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()

with ThreadPoolExecutor(4) as ex:
    list(ex.map(write, order))
print("commit", flush=True)
task.commit()
print("done", flush=True)
"""


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_random_moments(tmp_path: Path, seed: int) -> None:
    size, piece_size = 8 * 1024 * 1024 + 1234, 64 * 1024
    data = blob(size, seed)
    digest = sha256_digest(data)
    count = -(-size // piece_size)
    rng = random.Random(seed)
    saw_partial = False
    for round_ in range(30):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                *map(str, (tmp_path, seed, size, piece_size, digest, round_)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        # kill once the child reported k more pieces; at commit, kill half the time after
        # a short random delay (during or after the commit)
        k = rng.randint(1, max(1, count // 4))
        reported: set[int] = set()
        finished = False
        for line in proc.stdout:
            word = line.strip()
            if word == "done":
                finished = True
                break
            if word == "commit":
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.02))
                    proc.send_signal(signal.SIGKILL)
                    break
                continue
            reported.add(int(word))
            if len(reported) >= k:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL)
        assert proc.returncode == 0 or not finished

        store = PieceStore(tmp_path)
        path = store.blob_path(digest)
        if path is not None:
            assert path.read_bytes() == data
            assert store.list_tasks() == []
            break
        journal = task_dir(tmp_path, digest) / "journal"
        with store.open_task(digest, size, piece_size) as task:
            verified = {i for i in range(count) if task.is_verified(i)}
            # every piece the child saw written is recorded ...
            assert reported <= verified
            # ... and every piece the journal claims holds the right bytes
            for i in verified:
                assert task.read_piece(i) == piece(data, task, i)
            assert set(task.missing()) == set(range(count)) - verified
            assert journal.stat().st_size % RECORD_SIZE == 0
            if 0 < len(verified) < count:
                saw_partial = True
            if round_ == 29:  # finish in-process
                write_all(task, data, task.missing())
                assert task.commit().read_bytes() == data
                break
    assert store.blob_path(digest) is not None
    assert Path(store.blob_path(digest) or "").read_bytes() == data
    assert saw_partial, "no kill landed in the middle of the writes"


# -- ENOSPC and permissions (need root for tmpfs mounts) ------------------------------------


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full."""
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == 28


def test_enospc_at_open_with_preallocation(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        data = blob(4 * 1024 * 1024, seed=30)
        digest = sha256_digest(data)
        store = PieceStore(mnt / "store")
        with pytest.raises(StoreFull, match=str(mnt / "store")):
            store.open_task(digest, len(data), 1024 * 1024)
        assert store.list_tasks() == []
        assert not task_dir(mnt / "store", digest).exists()
        assert list((mnt / "store" / "tasks" / "sha256").iterdir()) == []
        # still usable for what fits
        small = blob(100_000, seed=31)
        with store.open_task(sha256_digest(small), len(small), 10_000) as task:
            write_all(task, small)
            assert task.commit().read_bytes() == small


def test_enospc_during_piece_writes_then_resume(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "6m") as mnt:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (3 * 1024 * 1024))
        data = blob(4 * 1024 * 1024, seed=32)
        digest = sha256_digest(data)
        store = PieceStore(mnt / "store", preallocate=False)  # sparse: ENOSPC comes late
        task = store.open_task(digest, len(data), 64 * 1024)
        full_at = None
        for i in range(task.plan.count):
            try:
                task.write_piece(i, piece(data, task, i), sha(piece(data, task, i)))
            except StoreFull as exc:
                assert "data" in str(exc) or "journal" in str(exc)
                full_at = i
                break
        assert full_at is not None and 0 < full_at < task.plan.count
        assert not task.is_verified(full_at)
        assert task.missing() == list(range(full_at, task.plan.count))
        assert task.read_piece(full_at - 1) == piece(data, task, full_at - 1)
        task.close()
        filler.unlink()  # free space, "restart"
        store2 = PieceStore(mnt / "store", preallocate=False)
        assert store2.list_tasks() == [digest]
        with store2.open_task(digest, len(data), 64 * 1024) as task:
            assert task.missing() == list(range(full_at, task.plan.count))
            write_all(task, data, task.missing())
            assert task.commit().read_bytes() == data


def test_enospc_on_journal_append_is_rolled_back(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        data = blob(512 * 1024, seed=33)
        digest = sha256_digest(data)
        store = PieceStore(mnt / "store")
        task = store.open_task(digest, len(data), 64 * 1024)  # data is preallocated
        fill(mnt / "filler")
        with pytest.raises(StoreFull, match="journal"):
            task.write_piece(0, data[: 64 * 1024])
        assert not task.is_verified(0)
        assert (task.path / "journal").stat().st_size == 0
        (mnt / "filler").unlink()
        write_all(task, data)
        assert task.commit().read_bytes() == data


def test_read_only_filesystem_gives_store_permission(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        done, partial = blob(1000, seed=34), blob(1000, seed=35)
        store = PieceStore(mnt / "store")
        with store.open_task(sha256_digest(done), 1000, 100) as task:
            write_all(task, done)
            task.commit()
        with store.open_task(sha256_digest(partial), 1000, 100) as task:
            write_all(task, partial, [0])
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        try:
            ro = PieceStore(mnt / "store")  # existing store: blobs still served
            path = ro.blob_path(sha256_digest(done))
            assert path is not None and path.read_bytes() == done
            with pytest.raises(StorePermission, match=str(mnt)):
                ro.open_task(sha256_digest(partial), 1000, 100)
            with pytest.raises(StorePermission):
                ro.open_task(sha256_digest(b"new"), 3, 1)
            with pytest.raises(StorePermission, match=str(mnt / "fresh")):
                PieceStore(mnt / "fresh")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=False)


def test_permission_denied_as_unprivileged_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    parent = Path(tempfile.mkdtemp())
    try:
        os.chmod(parent, 0o755)  # root-owned: others may enter but not create
        # the interpreter lives under /root, so start as root and drop privileges after
        # the imports
        code = (
            "import os, sys\n"
            "from p2pdist.errors import StorePermission\n"
            "from p2pdist.store import PieceStore\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    PieceStore(sys.argv[1])\n"
            "except StorePermission as e:\n"
            "    print('denied', e)\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code, str(parent / "store")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert res.stdout.startswith("denied cannot create directory ")
        assert str(parent / "store") in res.stdout
    finally:
        shutil.rmtree(parent)


# -- property: any order and duplication gives the same blob --------------------------------


@st.composite
def write_plans(draw: st.DrawFn) -> tuple[bytes, int, list[tuple[int, bool]]]:
    size = draw(st.integers(0, 3000))
    piece_size = draw(st.integers(max(1, size // 30), max(1, size)))
    data = draw(st.binary(min_size=size, max_size=size))
    count = -(-size // piece_size)
    order = draw(st.permutations(range(count)))
    writes: list[tuple[int, bool]] = [(i, False) for i in order]
    extra = draw(
        st.lists(st.tuples(st.integers(0, max(0, count - 1)), st.booleans()), max_size=20)
        if count
        else st.just([])
    )
    for item in extra:  # duplicates and corrupt writes at random positions
        writes.insert(draw(st.integers(0, len(writes))), item)
    return data, piece_size, writes


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(write_plans())
def test_any_write_order_gives_same_blob(plan: tuple[bytes, int, list[tuple[int, bool]]]) -> None:
    data, piece_size, writes = plan
    digest = sha256_digest(data)
    with tempfile.TemporaryDirectory() as root:
        store = PieceStore(root)
        with store.open_task(digest, len(data), piece_size) as task:
            for index, corrupt in writes:
                good = piece(data, task, index)
                if corrupt:
                    bad = bytes(b ^ 0x5A for b in good)
                    if task.is_verified(index):  # a verified piece is never rewritten
                        assert task.write_piece(index, bad, sha(good)) == sha(good)
                    else:
                        with pytest.raises(PieceMismatch):
                            task.write_piece(index, bad, sha(good))
                        assert not task.is_verified(index)
                else:
                    assert task.write_piece(index, good, sha(good)) == sha(good)
            assert task.piece_hashes() == [sha(piece(data, task, i)) for i in task.plan]
            path = task.commit()
        assert path == Path(root) / "blobs" / "sha256" / digest.hex
        assert path.read_bytes() == data
        assert store.list_tasks() == []


def test_close_waits_for_concurrent_writers(tmp_path: Path) -> None:
    data = blob(64 * 1024 * 32, seed=40)
    task = PieceStore(tmp_path).open_task(sha256_digest(data), len(data), 64 * 1024)
    errors: list[BaseException] = []

    def writer(indices: list[int]) -> None:
        for i in indices:
            try:
                task.write_piece(i, piece(data, task, i))
            except StoreError as exc:  # closed under us: a clean error, never EBADF garbage
                assert "closed" in str(exc)
                return
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(list(range(k, 32, 4)),)) for k in range(4)]
    for t in threads:
        t.start()
    task.close()
    for t in threads:
        t.join()
    assert errors == []
    with PieceStore(tmp_path).open_task(sha256_digest(data), len(data), 64 * 1024) as again:
        for i in range(32):
            if again.is_verified(i):
                assert again.read_piece(i) == piece(data, again, i)


def test_durable_mode_round_trip(tmp_path: Path) -> None:
    data = blob(5000, seed=41)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path, durable=True)
    with store.open_task(digest, len(data), 1000) as task:
        write_all(task, data, [4, 0, 2])
    with PieceStore(tmp_path, durable=True).open_task(digest, len(data), 1000) as task:
        assert task.missing() == [1, 3]
        write_all(task, data, [3, 1])
        assert task.commit().read_bytes() == data


def test_drop_pieces_unverifies_durably(tmp_path: Path) -> None:
    data = os.urandom(4 * 65536)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    store = PieceStore(tmp_path)
    task = store.open_task(digest, len(data), 65536)
    for i in range(4):
        task.write_piece(i, data[i * 65536 : (i + 1) * 65536])
    assert task.drop_pieces([1, 3, 99]) == [1, 3]
    assert task.missing() == [1, 3]
    with pytest.raises(StoreError):
        task.read_piece(1)
    task.close()
    task = store.open_task(digest, len(data), 65536)  # the tombstones survive a reopen
    assert task.missing() == [1, 3]
    for i in (1, 3):
        task.write_piece(i, data[i * 65536 : (i + 1) * 65536])
    assert task.commit().read_bytes() == data
