"""The scheduler's state machine, fed events directly: no sockets, no clock."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    Ack,
    Announce,
    Assign,
    Assignment,
    BlobMismatch,
    CompleteTask,
    FailureReason,
    Heartbeat,
    HostLoad,
    LeaveHost,
    LeaveTask,
    RegisterHost,
    Rejected,
    ReportPieceFailure,
    ReportPieces,
    Scheduler,
    SchedulerConfig,
    StartTask,
    Unknown,
)
from scheduler._policy import needs_source

D = "sha256:" + "d" * 64
PIECE = 1 << 20
COUNT = 12
SIZE = COUNT * PIECE - 1000  # last piece short
H = {i: hashlib.sha256(f"piece{i}".encode()).hexdigest() for i in range(COUNT)}


def join(s: Scheduler, hid: str, now: float = 0.0, zone: str = "", slots: int = 4) -> None:
    assert s.handle(RegisterHost(hid, f"{hid}:7000", zone=zone, upload_slots=slots), now) == Ack()
    assert s.handle(StartTask(hid, D, SIZE, PIECE), now) == Ack()


def assign(s: Scheduler, hid: str, now: float = 0.0, n: int = 16) -> Assignment:
    a = s.handle(Assign(hid, D, n), now)
    assert isinstance(a, Assignment), a
    return a


def report_source(s: Scheduler, hid: str, pieces: list[int], now: float = 0.0) -> Ack:
    ans = s.handle(ReportPieces(hid, D, tuple(pieces), {i: H[i] for i in pieces}, True), now)
    assert isinstance(ans, Ack)
    return ans


def seed_with(s: Scheduler, hid: str, now: float = 0.0) -> None:
    """``hid`` fetches the whole blob from the registry (all the leases it is given)."""
    while True:
        a = assign(s, hid, now)
        if a.done:
            break
        assert a.from_source, a
        report_source(s, hid, a.from_source, now)
    assert s.handle(CompleteTask(hid, D), now) == Ack()


# --- back-to-source spread ---------------------------------------------------------------


def test_simultaneous_start_leases_each_piece_once_in_contiguous_runs() -> None:
    s = Scheduler(SchedulerConfig(source_run_pieces=4, max_source_leases_per_task=COUNT))
    for h in ("a", "b", "c"):
        join(s, h)
    runs = {h: assign(s, h).from_source for h in ("a", "b", "c")}
    assert runs == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "c": [8, 9, 10, 11]}
    for run in runs.values():
        assert run == list(range(run[0], run[0] + len(run)))
    # Nobody else is sent to the registry for a leased piece: they wait.
    join(s, "d")
    a = assign(s, "d")
    assert (a.from_peers, a.from_source, a.done) == ([], [], False)
    assert 0 < a.retry_after <= 0.2


def test_reported_source_pieces_are_offered_with_their_hashes() -> None:
    s = Scheduler(SchedulerConfig(max_pieces_per_parent=4))
    for h in ("a", "b", "c"):
        join(s, h)
    leased = {h: assign(s, h).from_source for h in ("a", "b", "c")}
    report_source(s, "a", leased["a"], 1.0)
    a = assign(s, "b", 1.0)
    got = {p.piece: p.parent_id for p in a.from_peers}
    assert set(got) == set(leased["a"]) and set(got.values()) == {"a"}
    assert a.piece_hashes == {i: H[i] for i in leased["a"]}
    assert all(p.parent_addr == "a:7000" for p in a.from_peers)


def test_source_fanout_two_leases_each_range_twice_but_new_ranges_first() -> None:
    s = Scheduler(
        SchedulerConfig(source_fanout=2, source_run_pieces=6, max_source_leases_per_task=2 * COUNT)
    )
    for h in ("a", "b", "c", "d"):
        join(s, h)
    got = [assign(s, h).from_source for h in ("a", "b", "c", "d")]
    assert got[:2] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert sorted(got[2] + got[3]) == list(range(12))


def test_lease_expires_and_is_released_to_another() -> None:
    s = Scheduler(SchedulerConfig(lease_timeout=10.0, heartbeat_timeout=1000.0))
    join(s, "a")
    join(s, "b")
    first = assign(s, "a").from_source
    s.handle(Heartbeat("a"), 5.0)
    assert first[0] not in assign(s, "b", 5.0).from_source
    assert assign(s, "b", 11.0).from_source[: len(first)] == first


def test_source_failure_releases_the_lease() -> None:
    s = Scheduler()
    join(s, "a")
    join(s, "b")
    run = assign(s, "a").from_source
    assert s.handle(ReportPieceFailure("a", D, None, run[0]), 0.0) == Ack()
    assert assign(s, "b").from_source == [run[0]]


# --- parents: choice, load, zones -----------------------------------------------------------


def test_late_joiner_gets_everything_from_peers() -> None:
    s = Scheduler(SchedulerConfig(max_pieces_per_parent=4))
    for h in ("s1", "s2", "s3"):
        join(s, h)
    seed_with(s, "s1")
    for h in ("s2", "s3"):
        s.handle(Announce(h, D, SIZE, PIECE, complete=True), 0.0)
    join(s, "late", 10.0)  # within the heartbeat timeout
    a = assign(s, "late", 10.0)
    assert not a.from_source and len(a.from_peers) == COUNT
    per_parent: dict[str, int] = {}
    for p in a.from_peers:
        per_parent[p.parent_id] = per_parent.get(p.parent_id, 0) + 1
    assert set(per_parent) == {"s1", "s2", "s3"} and max(per_parent.values()) <= 4


def test_a_fresh_piece_goes_to_at_most_max_uploads_per_piece_children_at_once() -> None:
    s = Scheduler(SchedulerConfig(max_uploads_per_piece=2, heartbeat_timeout=1e9))
    join(s, "a", slots=16)
    assert 0 in assign(s, "a").from_source
    report_source(s, "a", [0])  # piece 0: one holder, with slots to spare
    for h in ("b", "c", "d"):
        join(s, h)
    given = {h: {p.piece: p.parent_id for p in assign(s, h).from_peers} for h in ("b", "c", "d")}
    assert given["b"].get(0) == "a" and given["c"].get(0) == "a"
    assert 0 not in given["d"]  # a already sends it to two children
    s.handle(ReportPieces("b", D, (0,), None), 1.0)  # b has it: a's upload of it ended
    assert assign(s, "d", 1.0).from_peers[0].piece == 0  # now from a or b
    assert s.hosts["a"].uploads_of(D, 0) + s.hosts["b"].uploads_of(D, 0) == 2


def test_parent_upload_slots_and_per_parent_cap_respected() -> None:
    s = Scheduler(SchedulerConfig(max_pieces_per_parent=2))
    join(s, "seed", slots=3)
    seed_with(s, "seed")
    total = 0
    for i in range(4):
        join(s, f"c{i}")
        a = assign(s, f"c{i}")
        assert len(a.from_peers) <= 2
        total += len(a.from_peers)
    assert total == 3  # the seed's three slots, then everyone waits
    assert assign(s, "c3").retry_after > 0
    s.handle(ReportPieces("c0", D, tuple(range(COUNT)), None), 1.0)  # c0 reports: a slot frees


def test_same_zone_parent_preferred() -> None:
    s = Scheduler()
    join(s, "far", zone="z2")
    join(s, "near", zone="z1")
    seed_with(s, "far")
    s.handle(Announce("near", D, SIZE, PIECE, complete=True), 0.0)
    join(s, "me", zone="z1")
    a = assign(s, "me", n=2)
    assert {p.parent_id for p in a.from_peers} == {"near"}


def test_rarest_piece_first() -> None:
    s = Scheduler()
    for h in ("a", "b", "me"):
        join(s, h)
    report_source(s, "a", list(range(COUNT)))
    s.handle(ReportPieces("b", D, tuple(range(COUNT - 1)), None), 0.0)  # b lacks the last
    a = assign(s, "me", n=1)
    assert [p.piece for p in a.from_peers] == [COUNT - 1]


def test_busy_parent_from_heartbeat_is_avoided() -> None:
    s = Scheduler()
    join(s, "a")
    join(s, "b")
    join(s, "me")
    report_source(s, "a", list(range(COUNT)))
    s.handle(ReportPieces("b", D, tuple(range(COUNT)), None), 0.0)
    s.handle(Heartbeat("a", HostLoad(upload_slots_in_use=4)), 0.0)
    a = assign(s, "me")
    assert {p.parent_id for p in a.from_peers} == {"b"}


# --- failures ---------------------------------------------------------------------------------


def test_bad_hash_excludes_the_parent_for_the_task() -> None:
    s = Scheduler()
    for h in ("bad", "good", "me", "other"):
        join(s, h)
    report_source(s, "good", [0])
    s.handle(ReportPieces("bad", D, tuple(range(COUNT)), {i: H[i] for i in range(COUNT)}, True), 0)
    s.handle(ReportPieceFailure("good", D, None, 0), 0.0)
    a = assign(s, "me")
    bad_pieces = [p.piece for p in a.from_peers if p.parent_id == "bad"]
    assert bad_pieces
    ans = s.handle(ReportPieceFailure("me", D, "bad", bad_pieces[0], "bad_hash"), 1.0)
    assert ans == Ack()
    assert "bad" in s.tasks[D].excluded
    assert not s.tasks[D].peers["bad"].have[bad_pieces[0]]
    for who in ("me", "other"):
        b = assign(s, who, 2.0)
        assert all(p.parent_id != "bad" for p in b.from_peers)
    # Its own later reports never make it a parent again.
    s.handle(ReportPieces("bad", D, (bad_pieces[0],), {bad_pieces[0]: H[bad_pieces[0]]}), 3.0)
    assert all(p.parent_id != "bad" for p in assign(s, "other", 3.0).from_peers)


def test_error_penalises_then_forgives() -> None:
    cfg = SchedulerConfig(error_penalty=5.0, heartbeat_timeout=1000.0)
    s = Scheduler(cfg)
    join(s, "p")
    join(s, "me")
    report_source(s, "p", list(range(COUNT)))
    a = assign(s, "me", n=1)
    piece = a.from_peers[0].piece
    s.handle(ReportPieceFailure("me", D, "p", piece, "error"), 1.0)
    assert assign(s, "me", 2.0).from_peers == []
    assert [p.piece for p in assign(s, "me", 7.0, n=20).from_peers]


def test_repeated_failures_bench_the_parent() -> None:
    cfg = SchedulerConfig(
        error_penalty=1.0, avoid_after_failures=3, avoid_duration=100.0, heartbeat_timeout=1e9
    )
    s = Scheduler(cfg)
    join(s, "p")
    join(s, "me")
    report_source(s, "p", list(range(COUNT)))
    t = 0.0
    for _ in range(3):
        t += 10.0
        a = assign(s, "me", t, n=1)
        assert a.from_peers, t
        s.handle(ReportPieceFailure("me", D, "p", a.from_peers[0].piece, "error"), t)
    assert assign(s, "me", t + 50.0).from_peers == []
    assert assign(s, "me", t + 101.0).from_peers


def test_restarting_a_task_releases_the_hosts_earlier_leases() -> None:
    """A daemon restarted under the same id (the scheduler never saw it go) starts the
    task again: its earlier run's leases must not hold it back until they lapse."""
    s = Scheduler(SchedulerConfig(lease_timeout=1e9, heartbeat_timeout=1e9))
    join(s, "n0")
    first = assign(s, "n0").from_source
    assert first and assign(s, "n0", 1.0).from_source != first  # leased: not offered again
    assert s.handle(StartTask("n0", D, SIZE, PIECE), 2.0) == Ack()  # restarted
    assert assign(s, "n0", 2.0).from_source == first


def test_unreachable_parent_loses_its_source_leases_before_it_expires() -> None:
    cfg = SchedulerConfig(
        source_run_pieces=4,
        error_penalty=1.0,
        avoid_after_failures=3,
        avoid_duration=100.0,
        heartbeat_timeout=1e9,
        lease_timeout=1e9,
    )
    s = Scheduler(cfg)
    for h in ("dies", "me"):
        join(s, h)
    run = assign(s, "dies").from_source
    report_source(s, "dies", run[:3])  # three pieces in, then it becomes unreachable
    leased = set(run[3:])
    assert leased
    t = 0.0
    for _ in range(3):  # "me" cannot reach it, three times
        t += 10.0
        a = assign(s, "me", t, n=1)
        assert not leased & set(a.from_source)
        assert a.from_peers and a.from_peers[0].parent_id == "dies", a
        s.handle(ReportPieceFailure("me", D, "dies", a.from_peers[0].piece, "error"), t)
    # long before "dies" expires, the rest of its run is leased to someone else
    assert leased <= set(assign(s, "me", t + 1.0).from_source)


def test_a_slow_parent_keeps_its_source_leases() -> None:
    # Slow pieces bench a parent (it is serving, slowly) but do not mean it is dead: its
    # source leases stay, or their ranges would leave the registry twice.  Only errors
    # (peers cannot reach it) count towards losing them.
    cfg = SchedulerConfig(
        error_penalty=1.0,
        slow_penalty=1.0,
        avoid_after_failures=3,
        avoid_duration=5.0,
        heartbeat_timeout=1e9,
        lease_timeout=1e9,
    )
    s = Scheduler(cfg)
    for h in ("slow", "me"):
        join(s, h)
    run = assign(s, "slow").from_source
    report_source(s, "slow", run[:3])
    leased = set(run[3:])
    t = 0.0
    for reason in ("slow", "slow", "error"):
        t += 10.0
        a = assign(s, "me", t, n=1)
        assert a.from_peers and a.from_peers[0].parent_id == "slow", a
        s.handle(ReportPieceFailure("me", D, "slow", a.from_peers[0].piece, reason), t)
    assert len(s.hosts["slow"].failures) == 3  # benched ...
    assert s.tasks[D].peers["slow"].leases.keys() >= leased  # ... but keeps its leases
    assert not leased & set(assign(s, "me", t + 1.0).from_source)


def test_parent_dying_releases_leases_and_stops_offering_pieces() -> None:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=10.0, max_source_leases_per_task=COUNT))
    for h in ("dies", "b", "c"):
        join(s, h)
    run = assign(s, "dies").from_source
    report_source(s, "dies", run[:2])  # half its run in, then it dies
    assert {p.piece for p in assign(s, "b").from_peers} == set(run[:2])
    s.handle(Heartbeat("b"), 8.0)
    s.handle(Heartbeat("c"), 8.0)
    assert s.tick(12.0) == ["dies"]
    assert "dies" not in s.hosts and "dies" not in s.tasks[D].peers
    a = assign(s, "c", 12.0)
    assert all(p.parent_id != "dies" for p in a.from_peers)
    # Its unreported pieces are leased again; b's assignment from it was released too.
    assert set(run[2:]) <= set(a.from_source)
    assert s.hosts["b"].serving == set() and not s.tasks[D].peers["b"].inflight
    assert s.handle(Assign("dies", D), 12.0) == Unknown("host")


def test_leave_host_releases_everything() -> None:
    s = Scheduler()
    join(s, "a")
    join(s, "b")
    run = assign(s, "a").from_source
    assert s.handle(LeaveHost("a"), 1.0) == Ack()
    assert assign(s, "b", 1.0).from_source == run
    assert s.handle(LeaveHost("a"), 1.0) == Ack()  # repeat: harmless


# --- endgame: a straggling parent --------------------------------------------------------------


def two_seeds_and_me(cfg: SchedulerConfig | None = None) -> Scheduler:
    """``fast`` and ``slow`` hold every piece (and have slots for all); ``me`` holds none."""
    s = Scheduler(cfg or SchedulerConfig(heartbeat_timeout=1e9, max_pieces_per_parent=COUNT))
    for h in ("fast", "slow"):
        join(s, h, slots=2 * COUNT)
    join(s, "me")
    report_source(s, "fast", list(range(COUNT)))
    s.handle(ReportPieces("slow", D, tuple(range(COUNT)), None), 0.0)
    return s


def from_parent(s: Scheduler, who: str, parent: str, now: float) -> int:
    """Everything is assigned to ``who``; one of the pieces given from ``parent``."""
    a = assign(s, who, now, n=COUNT)
    assert len(a.from_peers) == COUNT, a
    return next(p.piece for p in a.from_peers if p.parent_id == parent)


def test_straggler_is_offered_again_from_another_parent_never_from_its_own() -> None:
    cfg = SchedulerConfig(
        heartbeat_timeout=1e9, max_pieces_per_parent=COUNT, slow_penalty=2.0, piece_timeout=15.0
    )
    s = two_seeds_and_me(cfg)
    piece = from_parent(s, "me", "slow", 0.0)
    pt = s.tasks[D].peers["me"]
    assert s.handle(ReportPieceFailure("me", D, "slow", piece, "straggler"), 1.0) == Ack()
    # The assignment is released; the parent neither penalised nor counted (busy seeds
    # straggle too: a penalty would hide their rare pieces from everyone) ...
    assert piece not in pt.inflight and pt.stragglers == {piece: "slow"}
    assert not s.hosts["slow"].failures and s.hosts["slow"].penalised_until < 1.0
    assert ("me", D, piece) not in s.hosts["slow"].serving
    # ... and the piece is offered again at once, from the other holder.
    a = assign(s, "me", 1.0)
    assert [(p.piece, p.parent_id) for p in a.from_peers] == [(piece, "fast")]
    # Never from the straggling parent, even with the other holder out of the picture:
    # the host is still fetching it from there.
    s.handle(ReportPieceFailure("me", D, "fast", piece, "error"), 2.0)
    for t in (10.0, 11.0):
        s.handle(Heartbeat("fast", HostLoad(upload_slots_in_use=2 * COUNT)), t)
        b = assign(s, "me", t)
        assert b.from_peers == [] and b.from_source == [], b  # wait for the straggler
    # The straggler's copy arrives first: reported, the record is gone.
    s.handle(ReportPieces("me", D, (piece,), None), 12.0)
    assert piece not in pt.stragglers and pt.have[piece]


def test_straggler_record_ends_with_its_fetch() -> None:
    s = two_seeds_and_me()
    piece = from_parent(s, "me", "slow", 0.0)
    s.handle(ReportPieceFailure("me", D, "slow", piece, "straggler"), 1.0)
    assert not s.hosts["slow"].failures  # a straggler report does not count ...
    # ... how its fetch ends does: it timed out in the end (reported as slow), counted
    # once, and the parent may be named for that piece again (after its penalty).
    s.handle(ReportPieceFailure("me", D, "slow", piece, "slow"), 2.0)
    assert s.tasks[D].peers["me"].stragglers == {}
    failures = len(s.hosts["slow"].failures)
    assert failures == 1 and s.hosts["slow"].penalised_until == 2.0 + SchedulerConfig().slow_penalty
    # Straggler reports about pieces the host holds, or repeated, change nothing more.
    s.handle(ReportPieces("me", D, (piece,), None), 3.0)
    s.handle(ReportPieceFailure("me", D, "slow", piece, "straggler"), 3.0)
    assert s.tasks[D].peers["me"].stragglers == {}
    assert len(s.hosts["slow"].failures) == failures


def test_straggling_sole_holder_is_waited_for_until_it_times_out() -> None:
    # The only holder of a piece that straggles is often merely busy (the seed everyone
    # asks at the start of a rollout): not penalised, not benched, the host waits.  A
    # piece timeout ("slow") counts; benched after three, its pieces go to the registry.
    cfg = SchedulerConfig(
        heartbeat_timeout=1e9, slow_penalty=2.0, avoid_after_failures=3, avoid_duration=100.0
    )
    s = Scheduler(cfg)
    for h in ("slow", "me"):
        join(s, h)
    report_source(s, "slow", list(range(COUNT)))
    first = assign(s, "me", 0.0, n=3).from_peers
    assert len(first) == 2  # max_pieces_per_parent
    for p in first:
        s.handle(ReportPieceFailure("me", D, "slow", p.piece, "straggler"), 1.0)
    assert s.hosts["slow"].penalised_until < 1.0 and not s.hosts["slow"].failures
    # Serving, slowly: nothing goes to the registry; other pieces still come from it.
    a = assign(s, "me", 1.0)
    assert a.from_source == [] and {p.piece for p in a.from_peers}.isdisjoint(
        {p.piece for p in first}
    )
    # The straggling fetches time out (their reports count), then a fresh one does.
    s.handle(ReportPieceFailure("me", D, "slow", first[0].piece, "slow"), 2.0)
    s.handle(ReportPieceFailure("me", D, "slow", first[1].piece, "slow"), 2.0)
    assert len(s.hosts["slow"].failures) == 2
    t = 2.0 + 2 * cfg.slow_penalty  # the doubled penalty of the second is over
    fresh = assign(s, "me", t, n=1).from_peers
    assert fresh and fresh[0].parent_id == "slow", fresh
    s.handle(ReportPieceFailure("me", D, "slow", fresh[0].piece, "slow"), t)
    # Benched (three piece timeouts): its pieces are leased to the registry now.
    assert s.hosts["slow"].penalised_until == t + cfg.avoid_duration
    b = assign(s, "me", t + 1.0)
    assert b.from_peers == [] and b.from_source, b


# --- a parent that does not have what it announced ----------------------------------------------


def test_missing_piece_drops_the_parents_claims_and_the_hashes_only_it_vouched_for() -> None:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=1e9, max_pieces_per_parent=COUNT))
    for h in ("liar", "honest", "me", "other"):
        join(s, h)
    # The liar announces the whole blob with hashes of its own; honest really holds 0..2
    # (whose hashes the liar published first: honest's matching reports are accepted).
    lies = {i: hashlib.sha256(f"lie{i}".encode()).hexdigest() for i in range(COUNT)}
    s.handle(Announce("liar", D, SIZE, PIECE, complete=True, hashes=lies), 0.0)
    s.handle(ReportPieces("honest", D, (0, 1, 2), {i: lies[i] for i in (0, 1, 2)}, True), 0.0)
    a = assign(s, "me", 0.0, n=COUNT)
    missing = next(p.piece for p in a.from_peers if p.parent_id == "liar")
    ans = s.handle(ReportPieceFailure("me", D, "liar", missing, "missing"), 1.0)
    assert ans == Ack()
    task = s.tasks[D]
    liar = task.peers["liar"]
    assert liar.held == 0 and not liar.complete
    assert all("liar" not in task.holders[i] for i in range(COUNT))
    assert len(s.hosts["liar"].failures) == 1 and s.hosts["liar"].penalised_until > 1.0
    # Hashes others hold stay (the whole-blob check judges them); the rest are withdrawn.
    assert task.hashes[:3] == [lies[0], lies[1], lies[2]]
    assert task.hashes[3:] == [None] * (COUNT - 3)
    # Nobody is sent to the liar again, even after its penalty: the registry has the rest,
    # and the true hashes a lessee reports are accepted.
    b = assign(s, "other", 100.0, n=COUNT)
    assert {p.parent_id for p in b.from_peers} <= {"honest"}
    assert b.from_source and min(b.from_source) >= 3
    assert report_source(s, "other", b.from_source, 100.0) == Ack()
    # A later announcement makes it a holder again (and the next 404 drops it again).
    s.handle(Announce("liar", D, SIZE, PIECE, complete=True, hashes=lies), 101.0)
    assert task.peers["liar"].held == COUNT


def test_missing_from_a_parent_not_recorded_holding_changes_no_records() -> None:
    s = two_seeds_and_me()
    s.handle(LeaveTask("slow", D), 0.0)
    s.handle(StartTask("slow", D, SIZE, PIECE), 0.0)
    s.handle(ReportPieces("slow", D, (5,), None), 0.0)
    s.handle(ReportPieceFailure("me", D, "slow", 0, "missing"), 1.0)  # stale: not held
    assert s.tasks[D].peers["slow"].have[5]
    assert s.tasks[D].hashes == [H[i] for i in range(COUNT)]


def test_pieces_only_failing_parents_hold_go_to_the_registry() -> None:
    cfg = SchedulerConfig(
        heartbeat_timeout=1e9, error_penalty=5.0, refused_penalty=0.5, max_pieces_per_parent=COUNT
    )
    s = Scheduler(cfg)
    for h in ("a", "b", "me"):
        join(s, h, slots=2 * COUNT)
    report_source(s, "a", list(range(COUNT)))
    s.handle(ReportPieces("b", D, tuple(range(1, COUNT)), None), 0.0)  # b lacks piece 0
    task = s.tasks[D]
    first = assign(s, "me", 0.0, n=COUNT)
    assert ("a", 0) in {(p.parent_id, p.piece) for p in first.from_peers}
    # "a" was full (refused): penalised, not failing - piece 0 waits for it.
    s.handle(ReportPieceFailure("me", D, "a", 0, "refused"), 0.0)
    assert not needs_source(task, 0, s.hosts, 0.1, cfg)
    assert assign(s, "me", 0.1).from_source == []
    # "a" is unreachable (error): failing for 5 s - piece 0, which only "a" holds, goes
    # to the registry; piece 1, which "b" holds too, does not.
    assert [p.parent_id for p in assign(s, "me", 1.0).from_peers] == ["a"]
    s.handle(ReportPieceFailure("me", D, "a", 0, "error"), 1.0)
    assert needs_source(task, 0, s.hosts, 1.0, cfg)
    assert not needs_source(task, 1, s.hosts, 1.0, cfg)
    assert assign(s, "me", 1.0).from_source == [0]
    # Once its penalty is over it is a parent again.
    s.handle(ReportPieceFailure("me", D, None, 0), 1.0)  # the registry fetch failed
    assert not needs_source(task, 0, s.hosts, 6.5, cfg)
    assert [(p.parent_id, p.piece) for p in assign(s, "me", 6.5).from_peers] == [("a", 0)]
    # A piece with more holders than a parent sample is never checked (O(1) per piece).
    s.hosts["b"].failing_until = 100.0
    assert needs_source(task, 1, s.hosts, 1.0, cfg)
    assert not needs_source(task, 1, s.hosts, 1.0, replace(cfg, parent_candidates=1))


# --- integrity -------------------------------------------------------------------------------


def test_no_peer_offer_without_hash_and_hashless_reports_rejected() -> None:
    s = Scheduler()
    join(s, "a")
    join(s, "b")
    ans = s.handle(ReportPieces("a", D, (0, 1), None, source=True), 0.0)
    assert ans == Ack(rejected=(0, 1))
    assert assign(s, "b").from_peers == []


def test_conflicting_hash_rejected_first_wins() -> None:
    s = Scheduler(SchedulerConfig(source_fanout=2))
    join(s, "a")
    join(s, "b")
    report_source(s, "a", [0])
    ans = s.handle(ReportPieces("b", D, (0,), {0: "e" * 64}, source=True), 0.0)
    assert ans == Ack(rejected=(0,))
    assert s.tasks[D].hashes[0] == H[0]
    # b keeps its registry bytes for its whole-blob check: recorded as its own only -
    # never offered from b, never assigned to b again.
    assert s.tasks[D].peers["b"].have[0] and "b" not in s.tasks[D].holders[0]
    assert 0 not in assign(s, "b").from_source
    join(s, "c")
    assert {p.parent_id for p in assign(s, "c").from_peers if p.piece == 0} <= {"a"}
    # A peer-fetched report (no hash) of a piece the list knows is accepted as before.
    assert s.handle(ReportPieces("c", D, (0,), None), 1.0) == Ack()


def test_blob_mismatch_drops_hash_list_and_sends_everyone_to_source() -> None:
    s = Scheduler()
    for h in ("a", "b", "c"):
        join(s, h)
    report_source(s, "a", list(range(COUNT)))
    b = assign(s, "b", 1.0)
    s.handle(ReportPieces("b", D, tuple(p.piece for p in b.from_peers), None), 1.0)
    assert s.handle(BlobMismatch("c", D, epoch=0), 2.0) == Ack()
    task = s.tasks[D]
    assert task.epoch == 1 and all(h is None for h in task.hashes)
    assert all(pt.held == 0 for pt in task.peers.values())
    a = assign(s, "b", 2.0)
    assert a.from_peers == [] and a.from_source and a.epoch == 1
    # A repeat (same old epoch) is ignored; stale peer-fetched reports are rejected.
    report_source(s, "b", a.from_source, 3.0)
    assert s.handle(BlobMismatch("c", D, epoch=0), 3.0) == Ack()
    assert task.epoch == 1 and task.peers["b"].held == len(a.from_source)
    stale = s.handle(ReportPieces("c", D, (0,), {0: H[0]}, epoch=0), 3.0)
    assert stale == Ack(rejected=(0,))


def test_blob_mismatch_keeps_digest_verified_seeds() -> None:
    s = Scheduler()
    join(s, "seed")
    join(s, "x")
    seed_with(s, "seed")
    s.handle(BlobMismatch("x", D), 1.0)
    a = assign(s, "x", 1.0)
    assert a.from_peers == [] and a.from_source  # no hashes yet: back to the registry
    report_source(s, "x", a.from_source, 2.0)
    join(s, "y", 2.0)
    b = assign(s, "y", 2.0)
    assert {p.parent_id for p in b.from_peers} >= {"seed"}


# --- unknown, restarts, idempotency ------------------------------------------------------------


def test_unknown_host_and_task_answers() -> None:
    s = Scheduler()
    assert s.handle(Heartbeat("ghost"), 0.0) == Unknown("host")
    assert s.handle(Assign("ghost", D), 0.0) == Unknown("host")
    s.handle(RegisterHost("h", "h:1"), 0.0)
    assert s.handle(Assign("h", D), 0.0) == Unknown("task")
    assert s.handle(ReportPieces("h", D, (0,), {0: H[0]}, True), 0.0) == Unknown("task")
    assert s.handle(CompleteTask("h", D), 0.0) == Unknown("task")
    assert s.handle(BlobMismatch("h", D), 0.0) == Unknown("task")
    assert s.handle(ReportPieceFailure("h", D, "x", 0), 0.0) == Unknown("task")
    assert s.handle(LeaveTask("h", D), 0.0) == Ack()
    join(s, "other")
    assert s.handle(Assign("h", D), 0.0) == Unknown("task")  # task known, host not in it


def test_invalid_and_conflicting_plans_rejected() -> None:
    s = Scheduler()
    join(s, "a")
    s.handle(RegisterHost("b", "b:1"), 0.0)
    assert isinstance(s.handle(StartTask("b", D, -1, PIECE), 0.0), Rejected)
    ans = s.handle(StartTask("b", D, SIZE, PIECE * 2), 0.0)
    assert ans == Rejected("plan_conflict", ans.message, SIZE, PIECE)  # type: ignore[union-attr]
    assert isinstance(s.handle(RegisterHost("", "x"), 0.0), Rejected)


def test_restart_rebuilds_from_announcements() -> None:
    old = Scheduler()
    for h in ("seed", "half", "new"):
        join(old, h)
    seed_with(old, "seed")
    half = tuple(range(COUNT // 2))
    old.handle(ReportPieces("half", D, half, None), 1.0)

    s = Scheduler()  # restarted: knows nothing
    for h in ("seed", "half", "new"):
        assert s.handle(Heartbeat(h), 10.0) == Unknown("host")
        s.handle(RegisterHost(h, f"{h}:7000"), 10.0)
        assert s.handle(Assign(h, D), 10.0) == Unknown("task")
    s.handle(Announce("seed", D, SIZE, PIECE, complete=True, hashes=H), 10.0)
    ans = s.handle(Announce("half", D, SIZE, PIECE, half, hashes={i: H[i] for i in half}), 10.0)
    assert ans == Ack()
    s.handle(StartTask("new", D, SIZE, PIECE), 10.0)
    task, old_task = s.tasks[D], old.tasks[D]
    assert task.hashes == old_task.hashes
    for h in ("seed", "half"):
        assert task.peers[h].have == old_task.peers[h].have
    assert assign(s, "seed", 10.0).done
    a = assign(s, "new", 10.0)
    assert a.from_peers and not a.from_source
    assert all(a.piece_hashes[p.piece] == H[p.piece] for p in a.from_peers)


def test_duplicate_events_are_idempotent() -> None:
    s = Scheduler()
    for _ in range(2):
        join(s, "a")
        join(s, "b")
    run = assign(s, "a").from_source
    for _ in range(3):
        assert report_source(s, "a", run, 1.0) == Ack()
    assert s.tasks[D].peers["a"].held == len(run)
    a = assign(s, "b", 1.0, n=1)
    p = a.from_peers[0]
    for _ in range(3):
        s.handle(ReportPieceFailure("b", D, p.parent_id, p.piece, "error"), 2.0)
    assert len(s.hosts["a"].failures) == 1  # only the one matching an assignment counted
    for _ in range(2):
        s.handle(CompleteTask("a", D), 3.0)
        s.handle(RegisterHost("a", "a:7001", zone="z9"), 3.0)
    assert s.hosts["a"].addr == "a:7001"
    assert "a" in s.tasks[D].zone_holders[0]["z9"]
    assert "" not in s.tasks[D].zone_holders[0] or "a" not in s.tasks[D].zone_holders[0][""]


def test_host_expiry_on_any_event() -> None:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=5.0))
    join(s, "a")
    join(s, "b", 4.0)
    s.handle(Heartbeat("b"), 6.0)  # implicit tick: "a" silent for 6 s
    assert "a" not in s.hosts and "b" in s.hosts
    assert s.handle(Heartbeat("a"), 6.0) == Unknown("host")


def test_last_peer_leaving_forgets_the_task() -> None:
    s = Scheduler()
    join(s, "a")
    s.handle(LeaveTask("a", D), 0.0)
    assert D not in s.tasks
    assert s.handle(Assign("a", D), 0.0) == Unknown("task")


def test_a_seed_that_evicted_the_blob_is_no_longer_a_parent() -> None:
    """A daemon's cache GC evicts a blob and sends LeaveTask: the scheduler stops
    offering its pieces; with no holder left, a new node goes to the registry."""
    s = Scheduler(SchedulerConfig(max_pieces_per_parent=COUNT))
    for h in ("s1", "s2"):
        join(s, h)
    seed_with(s, "s1")
    s.handle(Announce("s2", D, SIZE, PIECE, complete=True), 0.0)
    assert s.handle(LeaveTask("s1", D), 1.0) == Ack()  # s1 evicted it
    join(s, "late", 2.0)
    a = assign(s, "late", 2.0)
    assert a.from_peers and {p.parent_id for p in a.from_peers} == {"s2"}
    assert s.handle(LeaveTask("s2", D), 3.0) == Ack()  # and then s2 too
    s.handle(LeaveTask("late", D), 3.0)
    join(s, "next", 4.0)
    a = assign(s, "next", 4.0)
    assert not a.from_peers and a.from_source


# --- property: assignments never break the rules ---------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "assign",
                "report",
                "fail",
                "bad",
                "straggler",
                "missing",
                "leave",
                "join",
                "tick",
                "mismatch",
            ]
        ),
        st.integers(0, 5),  # host
        st.integers(0, COUNT - 1),  # piece
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_assignments_respect_the_rules(script: list[tuple[str, int, int]]) -> None:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=3.0, lease_timeout=2.0), seed=7)
    now = 0.0
    alive: dict[str, float] = {}
    for k in range(3):
        join(s, f"h{k}", now, zone=f"z{k % 2}")
        alive[f"h{k}"] = now
    for op, k, piece in script:
        now += 0.5
        hid = f"h{k}"
        if op == "join":
            join(s, hid, now, zone=f"z{k % 2}")
            alive[hid] = now
            continue
        if op == "tick":
            s.tick(now)
            continue
        if op == "leave":
            s.handle(LeaveHost(hid), now)
            alive.pop(hid, None)
            continue
        if hid not in s.hosts or D not in s.tasks or hid not in s.tasks[D].peers:
            continue
        alive[hid] = now
        if op == "report":
            s.handle(ReportPieces(hid, D, (piece,), {piece: H[piece]}, True), now)
        elif op == "mismatch":
            s.handle(BlobMismatch(hid, D), now)
        elif op in ("fail", "bad", "straggler", "missing"):
            parent = f"h{(k + 1) % 6}"
            reasons: dict[str, FailureReason] = {
                "bad": "bad_hash",
                "fail": "error",
                "straggler": "straggler",
                "missing": "missing",
            }
            s.handle(ReportPieceFailure(hid, D, parent, piece, reasons[op]), now)
        else:
            a = s.handle(Assign(hid, D, 8), now)
            if not isinstance(a, Assignment):
                continue
            task = s.tasks[D]
            for src in a.from_peers:
                assert src.parent_id != hid
                assert src.parent_id != task.peers[hid].stragglers.get(src.piece)
                assert src.parent_id not in task.excluded
                assert src.parent_id in s.hosts
                assert now - alive[src.parent_id] < 3.0  # not an expired host
                assert task.hashes[src.piece] is not None
                assert a.piece_hashes[src.piece] == task.hashes[src.piece]
                assert task.peers[src.parent_id].have[src.piece]
                assert s.hosts[src.parent_id].penalised_until <= now
            for i in a.from_source:
                assert len(task.leases[i]) <= s.config.source_fanout
            if a.from_source:
                assert a.from_source == list(range(a.from_source[0], a.from_source[-1] + 1))
        # invariants of the indexes
        if D in s.tasks:
            task = s.tasks[D]
            for i in range(task.count):
                for holder in task.holders[i]:
                    assert holder in task.peers and task.peers[holder].have[i]
                    assert holder not in task.excluded and holder in s.hosts


def test_pieces_only_a_slow_parent_holds_wait_for_it() -> None:
    # On a congested link every parent misses the piece timeout now and then: a "slow"
    # parent is serving, and its pieces must not go to the registry until it is benched.
    cfg = SchedulerConfig(
        heartbeat_timeout=1e9, slow_penalty=0.5, avoid_after_failures=3, avoid_duration=100.0
    )
    s = Scheduler(cfg)
    for h in ("a", "me"):
        join(s, h, slots=2 * COUNT)
    report_source(s, "a", [0])
    task = s.tasks[D]
    assert [(p.parent_id, p.piece) for p in assign(s, "me", 0.0).from_peers] == [("a", 0)]
    s.handle(ReportPieceFailure("me", D, "a", 0, "slow"), 1.0)
    assert s.hosts["a"].penalised_until == 1.0 + cfg.slow_penalty  # counted: penalised ...
    assert not needs_source(task, 0, s.hosts, 1.1, cfg)  # ... but not failing
    assert 0 not in assign(s, "me", 1.1).from_source
    assert [(p.parent_id, p.piece) for p in assign(s, "me", 1.6).from_peers] == [("a", 0)]


def test_a_declined_piece_is_released_without_counting_against_its_parent() -> None:
    s = two_seeds_and_me()
    piece = from_parent(s, "me", "slow", 0.0)
    pt = s.tasks[D].peers["me"]
    s.handle(ReportPieceFailure("me", D, "slow", piece, "declined"), 1.0)
    assert piece not in pt.inflight  # released: offered again
    assert not s.hosts["slow"].failures and s.hosts["slow"].penalised_until < 1.0


def test_a_stray_missing_report_does_not_wipe_a_seed() -> None:
    # A 404 that matches no assignment (late, after the assignment expired; or from a
    # host that was never sent there) must not drop the seed's records.
    s = two_seeds_and_me()
    task = s.tasks[D]
    s.handle(ReportPieceFailure("me", D, "slow", 0, "missing"), 1.0)
    assert task.peers["slow"].held == COUNT
    assert all(h is not None for h in task.hashes)


def test_a_task_has_at_most_its_cap_of_pieces_leased_at_once() -> None:
    # The origin's uplink is shared by every range in flight: a few at a time, so each
    # piece is whole (and can spread between peers) soon.  A reported piece frees room.
    s = Scheduler(SchedulerConfig(source_run_pieces=2, max_source_leases_per_task=3))
    for h in ("a", "b", "c"):
        join(s, h)
    leased = [assign(s, h).from_source for h in ("a", "b", "c")]
    assert [len(r) for r in leased] == [2, 1, 0]
    assert s.tasks[D].leased_now == 3
    report_source(s, "a", leased[0][:1])
    assert len(assign(s, "c").from_source) == 1
    # A host that leaves gives its leases back.
    s.handle(LeaveHost("b"), 1.0)
    assert s.tasks[D].leased_now == 2
