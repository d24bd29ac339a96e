"""The swarm's endgame in one process: the real scheduler core as the link (no sockets),
piece fetches from parents faked with a delay per parent and piece, a real piece store.

What each test asserts is in its name; the end-to-end version, with daemons and a
rate-limited parent, is ``tests/test_swarm.py::test_slow_parent_...``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import p2pdist.swarm as swarm_mod
from p2pdist.digest import Digest
from p2pdist.peer import PeerError
from p2pdist.peerclient import PeerConnections
from p2pdist.pieces import PiecePlan
from p2pdist.source import SourceInfo
from p2pdist.store import PieceStore, Task
from p2pdist.swarm import FetchSlots, SwarmStats, swarm_download
from scheduler import (
    Ack,
    Announce,
    Assign,
    Assignment,
    BlobMismatch,
    CompleteTask,
    Event,
    FailureReason,
    LeaveTask,
    RegisterHost,
    ReportPieceFailure,
    ReportPieces,
    Scheduler,
    SchedulerConfig,
    StartTask,
)

PIECE = 64 * 1024
COUNT = 16
DATA = random.Random(5).randbytes(COUNT * PIECE)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
PLAN = PiecePlan(len(DATA), PIECE)
HASHES = {i: hashlib.sha256(DATA[i * PIECE : (i + 1) * PIECE]).hexdigest() for i in range(COUNT)}
HEDGE_MIN = 0.2  # instead of 1 s: these tests run on milliseconds


class LocalLink:
    """:class:`p2pdist.swarm.SchedulerLink` over an in-process :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, host_id: str) -> None:
        self.s = scheduler
        self.host_id = host_id
        self.failures: list[tuple[str, int, FailureReason]] = []

    async def _call(self, event: Event) -> Any:
        await trio.lowlevel.checkpoint()
        return self.s.handle(event, trio.current_time())

    async def start_task(self, digest: Digest, size: int, piece_size: int) -> None:
        assert await self._call(StartTask(self.host_id, str(digest), size, piece_size)) == Ack()

    async def assign(self, digest: Digest, max_pieces: int, *, wait: float = 0.0) -> Assignment:
        answer = await self._call(Assign(self.host_id, str(digest), max_pieces))
        assert isinstance(answer, Assignment), answer
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
        answer = await self._call(event)
        assert isinstance(answer, Ack), answer
        return answer.rejected

    async def report_failure(
        self, digest: Digest, parent_id: str, piece: int, reason: FailureReason
    ) -> None:
        self.failures.append((parent_id, piece, reason))
        await self._call(ReportPieceFailure(self.host_id, str(digest), parent_id, piece, reason))

    async def complete(self, digest: Digest, hashes: dict[int, str] | None) -> None:
        await self._call(CompleteTask(self.host_id, str(digest), hashes))

    async def mismatch(self, digest: Digest, epoch: int | None) -> None:
        await self._call(BlobMismatch(self.host_id, str(digest), epoch))

    async def leave_task(self, digest: Digest) -> None:
        await self._call(LeaveTask(self.host_id, str(digest)))


class BytesSource:
    """The registry: ``DATA``, counting the bytes it sends."""

    description = "test registry"

    def __init__(self) -> None:
        self.sent = 0

    async def probe(self) -> SourceInfo:
        return SourceInfo(len(DATA), True)

    @asynccontextmanager
    async def open_range(self, start: int, end: int | None) -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            stop = len(DATA) if end is None else end
            for at in range(start, stop, PIECE):
                await trio.lowlevel.checkpoint()
                chunk = DATA[at : min(stop, at + PIECE)]
                self.sent += len(chunk)
                yield chunk

        yield chunks()


Delay = Callable[[str, int], float]


class FakeParents:
    """Stands in for ``fetch_piece``: parent ``p`` sends piece ``i`` after ``delay(p, i)``
    seconds; records every fetch, and every fetch cancelled before it finished."""

    def __init__(self, delay: Delay, *, liars: Sequence[str] = (), status: int | None = None):
        self.delay = delay
        self.liars = set(liars)
        self.status = status
        self.fetched: list[tuple[str, int]] = []
        self.cancelled: list[tuple[str, int]] = []

    async def fetch_piece(
        self, conns: Any, parent_addr: str, digest: Digest, index: int, plan: PiecePlan, **_: Any
    ) -> tuple[bytes, int]:
        parent = parent_addr.split(":")[0]
        self.fetched.append((parent, index))
        try:
            await trio.sleep(self.delay(parent, index))
        except trio.Cancelled:
            self.cancelled.append((parent, index))
            raise
        if parent in self.liars:  # 404 (status 404), or hung up (status None)
            raise PeerError(f"parent {parent_addr}: answered {self.status}", status=self.status)
        start, end = plan.range(index)
        return DATA[start:end], end - start


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PieceStore]:
    s = PieceStore(tmp_path / "store")
    yield s
    s.close()


def scheduler_with(*parents: str, pieces: dict[str, Sequence[int]] | None = None) -> Scheduler:
    """A scheduler that knows ``me`` and ``parents``, each holding every piece (or
    ``pieces[parent]``), with the true hashes."""
    s = Scheduler(SchedulerConfig(heartbeat_timeout=1e9, max_pieces_per_parent=4), seed=1)
    for hid in ("me", *parents):
        s.handle(RegisterHost(hid, f"{hid}:7000", upload_slots=64), 0.0)
    for hid in parents:
        held = (pieces or {}).get(hid)
        if held is None:
            event = Announce(hid, str(DIGEST), len(DATA), PIECE, complete=True, hashes=HASHES)
        else:
            event = Announce(
                hid, str(DIGEST), len(DATA), PIECE, tuple(held), hashes={i: HASHES[i] for i in held}
            )
        assert s.handle(event, 0.0) == Ack()
    return s


async def download(
    store: PieceStore,
    link: LocalLink,
    parents: FakeParents,
    monkeypatch: pytest.MonkeyPatch,
    *,
    piece_timeout: float = 30.0,
) -> tuple[Task, SwarmStats, BytesSource, float]:
    monkeypatch.setattr(swarm_mod, "fetch_piece", parents.fetch_piece)
    monkeypatch.setattr(swarm_mod, "HEDGE_MIN", HEDGE_MIN)
    task = store.open_task(DIGEST, len(DATA), PIECE)
    source = BytesSource()
    started = trio.current_time()
    async with httpx.AsyncClient() as peers:
        _, stats = await swarm_download(
            task,
            source,  # type: ignore[arg-type]
            link,
            peers,
            concurrency=4,
            piece_timeout=piece_timeout,
            fetch_slots=FetchSlots(4),
            peer_conns=PeerConnections(),
        )
    return task, stats, source, trio.current_time() - started


def blob_ok(store: PieceStore) -> bool:
    path = store.blob_path(DIGEST)
    return path is not None and hashlib.sha256(path.read_bytes()).digest().hex() == DIGEST.hex


async def test_a_straggling_parents_pieces_are_fetched_again_elsewhere(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = scheduler_with("fast", "slow")
    link = LocalLink(s, "me")
    parents = FakeParents(lambda parent, i: 0.005 if parent == "fast" else 30.0)
    _, stats, source, took = await download(store, link, parents, monkeypatch)
    print(f"\n{took:.2f}s, {stats}, failures {link.failures}")
    assert blob_ok(store) and source.sent == 0
    assert stats.from_peers == len(DATA)  # every piece counted once
    assert took < 5.0, took  # not the 30 s of the slow parent (~0.3 s here)
    slow = [(p, i) for p, i in parents.fetched if p == "slow"]
    assert slow and stats.stragglers >= 1
    # Every straggler was fetched again from "fast", and every slow fetch was cancelled
    # (nothing left running), none of them reported as a failure of their own.
    assert sorted(parents.cancelled) == sorted(slow)
    reported = {(p, i) for p, i, reason in link.failures if reason == "straggler"}
    assert reported and reported <= set(slow)
    # Besides straggler reports only declines (answers asked for before a straggler
    # report named "slow" again: released, not started, not counted).
    assert {(p, i) for p, i, r in link.failures if r != "declined"} <= set(slow)
    assert {p for p, _, r in link.failures if r == "declined"} <= {"slow"}
    assert all(("fast", i) in parents.fetched for _, i in reported)
    # Straggling alone is no failure (busy seeds straggle too): not penalised, not
    # counted; the scheduler holds no straggler record any more.
    assert not s.hosts["slow"].failures
    assert s.tasks[str(DIGEST)].peers["me"].stragglers == {}


async def test_the_first_copy_wins_even_when_it_is_the_stragglers(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Piece 0: only "slow" has it at first (0.6 s); "fast" gets it a little later but
    # takes 10 s to send it.  Everything else comes from "fast" at once.
    s = scheduler_with("fast", "slow", pieces={"fast": range(1, COUNT)})
    link = LocalLink(s, "me")

    def delay(parent: str, i: int) -> float:
        if i == 0:
            return 0.6 if parent == "slow" else 10.0
        return 0.005 if parent == "fast" else 30.0

    parents = FakeParents(delay)

    async def fast_gets_piece_0() -> None:
        await trio.sleep(0.1)
        s.handle(ReportPieces("fast", str(DIGEST), (0,), None), trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fast_gets_piece_0)
        _, stats, source, took = await download(store, link, parents, monkeypatch)
    print(f"\n{took:.2f}s, {stats}, fetched {parents.fetched}, failures {link.failures}")
    assert blob_ok(store) and source.sent == 0
    assert stats.from_peers == len(DATA)
    assert ("slow", 0, "straggler") in link.failures
    assert ("fast", 0) in parents.fetched and ("fast", 0) in parents.cancelled
    assert ("slow", 0) not in parents.cancelled  # it won
    assert not [f for f in link.failures if f[0] == "fast"]  # the loser reports nothing
    assert took < 5.0, took  # not the 10 s of the second copy (~0.6 s here)


async def test_evenly_slow_parents_are_not_stragglers(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = scheduler_with("a", "b")
    link = LocalLink(s, "me")
    parents = FakeParents(lambda parent, i: 0.25)  # above HEDGE_MIN, but all the same
    _, stats, _, _ = await download(store, link, parents, monkeypatch)
    assert blob_ok(store)
    assert stats.stragglers == 0 and link.failures == [] and parents.cancelled == []


async def test_a_lone_slow_parent_with_no_other_holder_is_waited_for(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "slow" alone has piece 0; it is a straggler, nobody else can send it: the download
    # waits for it (no registry fetch: a serving parent is not failing) and finishes.
    s = scheduler_with("fast", "slow", pieces={"fast": range(1, COUNT), "slow": [0]})
    link = LocalLink(s, "me")
    parents = FakeParents(lambda parent, i: 1.0 if parent == "slow" else 0.005)
    _, stats, source, took = await download(store, link, parents, monkeypatch)
    assert blob_ok(store)
    assert stats.stragglers == 1 and ("slow", 0, "straggler") in link.failures
    assert source.sent == 0 and parents.cancelled == []
    assert 1.0 <= took < 5.0, took


async def test_a_straggling_sole_holders_piece_comes_from_the_registry_when_stuck(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "slow" holds everything, "fast" all but piece 0: "slow"'s pieces that "fast" holds
    # come from "fast"; piece 0, which only "slow" holds, is waited for (a straggling
    # sole holder is most often a busy seed) until the download has made no progress for
    # the stall timeout, then fetched from the registry: once.
    monkeypatch.setattr(swarm_mod, "STALL_TIMEOUT", 1.0)
    s = scheduler_with("fast", "slow", pieces={"fast": range(1, COUNT)})
    link = LocalLink(s, "me")
    parents = FakeParents(lambda parent, i: 30.0 if parent == "slow" else 0.005)
    _, stats, source, took = await download(store, link, parents, monkeypatch)
    assert blob_ok(store)
    assert stats.stragglers >= 1 and source.sent == PIECE, (stats, source.sent)
    assert took < 5.0, took  # the 1 s stall timeout and ~0.3 s


@pytest.mark.parametrize("status", [404, None])
@pytest.mark.parametrize("true_hashes", [True, False])
async def test_a_parent_without_the_pieces_it_announced_is_routed_around(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch, status: int | None, true_hashes: bool
) -> None:
    """The liar announces the whole blob (true hashes, or hashes of other bytes) and
    answers 404 / hangs up: the blob comes from the registry, once, intact; the list the
    scheduler ends with is the true one."""
    s = Scheduler(SchedulerConfig(heartbeat_timeout=1e9), seed=1)
    for hid in ("me", "liar"):
        s.handle(RegisterHost(hid, f"{hid}:7000", upload_slots=64), 0.0)
    lies = {i: hashlib.sha256(b"lie%d" % i).hexdigest() for i in range(COUNT)}
    announced = HASHES if true_hashes else lies
    s.handle(Announce("liar", str(DIGEST), len(DATA), PIECE, complete=True, hashes=announced), 0.0)
    link = LocalLink(s, "me")
    parents = FakeParents(lambda parent, i: 0.001, liars=["liar"], status=status)
    _, stats, source, took = await download(store, link, parents, monkeypatch)
    reason = "missing" if status == 404 else "error"
    print(f"\n{took:.2f}s {stats} registry sent {source.sent}, failures {link.failures}")
    assert blob_ok(store) and stats.from_source == len(DATA) == source.sent
    assert link.failures and all(f[0] == "liar" and f[2] == reason for f in link.failures)
    task = s.tasks[str(DIGEST)]
    assert task.hashes == [HASHES[i] for i in range(COUNT)]
    assert task.peers["me"].complete and s.hosts["liar"].penalised_until > trio.current_time()
    if status == 404:  # its claims are gone; hung up, it stays a (penalised) holder
        assert task.peers["liar"].held == 0
    assert took < 5.0, took  # not the stalls of a holder that never serves (~0.05 s here)


async def test_a_lease_over_pieces_already_here_fetches_only_the_rest(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resumed after a restart: pieces 1 and 2 are verified, but the scheduler (no parents
    # here) leases runs that cover them.  Each range asked of the registry must hold only
    # missing pieces (a run is fetched first to last): 1 and 2 never leave it again.
    with store.open_task(DIGEST, len(DATA), PIECE) as task:
        for i in (1, 2):
            task.write_piece(i, DATA[i * PIECE : (i + 1) * PIECE], HASHES[i])
    link = LocalLink(scheduler_with(), "me")
    parents = FakeParents(lambda parent, i: 0.001)
    _, stats, source, _ = await download(store, link, parents, monkeypatch)
    assert blob_ok(store)
    assert source.sent == len(DATA) - 2 * PIECE, (source.sent, stats)


async def test_pieces_from_parents_make_room_for_a_registry_run(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "p" holds pieces 8.. ; 0-7 need the registry.  While a registry run is in flight at
    # most SOURCE_PEER_FLOWS pieces come from parents at once (the registry's bytes are
    # the scarce ones); with no run in flight the download's full concurrency is used.
    s = scheduler_with("p", pieces={"p": range(8, COUNT)})
    link = LocalLink(s, "me")
    running = {"source": 0, "peers": 0}
    seen: list[tuple[int, int]] = []  # (runs, peer fetches) whenever a peer fetch starts

    class SlowSource(BytesSource):
        @asynccontextmanager
        async def open_range(
            self, start: int, end: int | None
        ) -> AsyncIterator[AsyncIterator[bytes]]:
            running["source"] += 1
            try:
                async with super().open_range(start, end) as chunks:

                    async def slow() -> AsyncIterator[bytes]:
                        async for chunk in chunks:
                            await trio.sleep(0.02)
                            yield chunk

                    yield slow()
            finally:
                running["source"] -= 1

    class CountingParents(FakeParents):
        async def fetch_piece(self, *args: Any, **kw: Any) -> tuple[bytes, int]:
            running["peers"] += 1
            seen.append((running["source"], running["peers"]))
            try:
                return await super().fetch_piece(*args, **kw)
            finally:
                running["peers"] -= 1

    parents = CountingParents(lambda parent, i: 0.02)
    monkeypatch.setattr(swarm_mod, "fetch_piece", parents.fetch_piece)
    monkeypatch.setattr(swarm_mod, "HEDGE_MIN", HEDGE_MIN)
    task = store.open_task(DIGEST, len(DATA), PIECE)
    source = SlowSource()
    async with httpx.AsyncClient() as peers:
        await swarm_download(
            task,
            source,  # type: ignore[arg-type]
            link,
            peers,
            concurrency=4,
            piece_timeout=30.0,
            fetch_slots=FetchSlots(4),
            peer_conns=PeerConnections(),
        )
    assert blob_ok(store) and source.sent == 8 * PIECE
    during = [n for runs, n in seen if runs]
    assert during and max(during) <= swarm_mod.SOURCE_PEER_FLOWS, seen
