"""Preheat's pure logic, no sockets: which nodes a selection picks, a job's progress from
the nodes' reports, what the heartbeat carries, and the command's progress lines."""

from __future__ import annotations

import pytest

from p2pdist.errors import UsageError
from p2pdist.preheat import PreheatRequest, format_node, format_status
from scheduler import (
    Ack,
    Candidate,
    Heartbeat,
    HostLoad,
    LeaveHost,
    NotEnoughNodes,
    PreheatError,
    PreheatOrder,
    PreheatReport,
    Preheats,
    RegisterHost,
    Scheduler,
    SchedulerConfig,
    Selection,
    StartTask,
    choose_nodes,
)
from scheduler._codec import decode_answer, decode_event, encode

IMAGE = "127.0.0.1:5000/team/app:v1"
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


# -- selection ----------------------------------------------------------------------------


def test_selection_counts() -> None:
    assert Selection("one").count(5) == 1
    assert Selection("nodes", 3).count(5) == 3
    assert Selection("nodes", 5).count(5) == 5
    assert Selection("all").count(7) == 7
    assert Selection("percent", 100).count(3) == 3
    assert Selection("percent", 50).count(3) == 2  # ceil(1.5)
    assert Selection("percent", 34).count(3) == 2  # ceil(1.02)
    assert Selection("percent", 33.4).count(3) == 2
    assert Selection("percent", 1).count(3) == 1  # at least one
    assert Selection("percent", 10).count(10) == 1  # exactly 1.0: not rounded up to 2
    assert Selection("percent", 20).count(10) == 2


@pytest.mark.parametrize(
    ("mode", "value"),
    [("nodes", 0), ("nodes", -1), ("nodes", 1.5), ("percent", 0), ("percent", 150), ("x", 1)],
)
def test_bad_selections_are_refused(mode: str, value: float) -> None:
    with pytest.raises(PreheatError):
        Selection(mode, value)  # type: ignore[arg-type]


def test_more_nodes_than_registered_is_refused_not_shrunk() -> None:
    with pytest.raises(NotEnoughNodes, match="4 nodes asked for, only 3"):
        Selection("nodes", 4).count(3)
    for sel in (Selection("one"), Selection("all"), Selection("percent", 50)):
        with pytest.raises(NotEnoughNodes, match="no nodes"):
            sel.count(0)


def test_selection_from_json() -> None:
    assert Selection.from_json({}) == Selection("one")
    assert Selection.from_json({"nodes": 2}) == Selection("nodes", 2)
    assert Selection.from_json({"percent": 12.5}) == Selection("percent", 12.5)
    assert Selection.from_json({"all": True}) == Selection("all")
    assert Selection.from_json({"all": False}) == Selection("one")
    for bad in (
        {"nodes": 2, "all": True},
        {"nodes": 2, "percent": 5},
        {"nodes": "2"},
        {"nodes": True},
        {"nodes": 2.0},
        {"nodes": 0},
        {"percent": 150},
        {"percent": float("nan")},
        {"percent": float("inf")},
        {"all": "yes"},
    ):
        with pytest.raises(PreheatError):
            Selection.from_json(bad)


def test_nodes_spread_across_zones_least_loaded_first() -> None:
    cands = [
        Candidate("a1", "a", active=0),
        Candidate("a2", "a", active=1),
        Candidate("a3", "a", active=0, busy=0.5),
        Candidate("b1", "b", active=2),
        Candidate("b2", "b", active=0, cpu=0.9),
        Candidate("c1", "c", active=5),
    ]
    # Round robin over zones (zone of the least loaded host first), least loaded within.
    assert choose_nodes(cands, 1) == ["a1"]
    assert choose_nodes(cands, 3) == ["a1", "b2", "c1"]
    assert choose_nodes(cands, 4) == ["a1", "b2", "c1", "a3"]
    assert choose_nodes(cands, 6) == ["a1", "b2", "c1", "a3", "b1", "a2"]
    assert choose_nodes(cands, 10) == choose_nodes(cands, 6)  # never more than exist
    assert choose_nodes(list(reversed(cands)), 3) == choose_nodes(cands, 3)  # deterministic


def test_ties_go_by_host_id() -> None:
    cands = [Candidate(h) for h in ("n2", "n0", "n1")]
    assert choose_nodes(cands, 2) == ["n0", "n1"]


# -- a job's progress -----------------------------------------------------------------------


def make_job(preheats: Preheats, hosts: list[str], sel: Selection, image: str = IMAGE) -> str:
    job = preheats.create("ph-1", image, "", sel, [Candidate(h) for h in hosts], 0.0)
    return job.job_id


def report(job_id: str, state: str, done: int, total: int, **kw: object) -> PreheatReport:
    return PreheatReport(job_id, state, done, total, done * 100, total * 100, **kw)  # type: ignore[arg-type]


def test_orders_go_to_chosen_nodes_until_they_finish() -> None:
    p = Preheats()
    jid = make_job(p, ["n0", "n1", "n2"], Selection("nodes", 2))
    job = p.get(jid)
    assert job is not None and list(job.nodes) == ["n0", "n1"]
    assert job.state == "running"
    assert p.orders_for("n0") == (PreheatOrder(jid, IMAGE, "", ""),)
    assert p.orders_for("n2") == ()
    p.report("n0", [report(jid, "running", 1, 4, manifest=DIGEST)], 1.0)
    status = job.to_json(1.0)
    assert status["nodes"][0]["state"] == "running"
    assert status["nodes"][0]["blobs_done"] == 1 and status["nodes"][0]["bytes_total"] == 400
    # The first resolved digest pins the job: later orders name it.
    assert job.manifest == DIGEST
    assert p.orders_for("n1") == (PreheatOrder(jid, IMAGE, "", DIGEST),)
    p.report("n0", [report(jid, "done", 4, 4, manifest=DIGEST)], 2.0)
    assert p.orders_for("n0") == ()  # done: no longer ordered
    assert job.state == "running" and p.active_count("n1") == 1 and p.active_count("n0") == 0
    p.report("n1", [report(jid, "done", 4, 4, manifest=DIGEST)], 3.0)
    assert job.state == "done"
    status = job.to_json(9.0)
    assert status["nodes_done"] == 2 and status["seconds"] == 3.0  # frozen when finished


def test_a_node_that_leaves_fails_there_and_the_job_fails() -> None:
    p = Preheats()
    jid = make_job(p, ["n0", "n1"], Selection("all"))
    job = p.get(jid)
    assert job is not None
    p.report("n0", [report(jid, "done", 2, 2)], 1.0)
    p.host_gone("n0", 2.0)  # already done there: stays done
    p.host_gone("n1", 2.0)
    assert job.nodes["n0"].state == "done"
    assert job.nodes["n1"].state == "failed" and "left the swarm" in job.nodes["n1"].error
    assert job.state == "failed"
    # Final states are final: a late report revives nothing.
    p.report("n1", [report(jid, "running", 1, 2)], 3.0)
    assert job.nodes["n1"].state == "failed"


def test_a_node_error_is_reported_with_its_exit_code() -> None:
    p = Preheats()
    jid = make_job(p, ["n0"], Selection("one"))
    p.report("n0", [PreheatReport(jid, "failed", error="manifest not found", exit_code=3)], 1.0)
    job = p.get(jid)
    assert job is not None and job.state == "failed"
    assert job.nodes["n0"].error == "manifest not found" and job.nodes["n0"].exit_code == 3


def test_a_node_resolving_another_digest_fails() -> None:
    p = Preheats()
    jid = make_job(p, ["n0", "n1"], Selection("all"))
    p.report("n0", [report(jid, "running", 0, 2, manifest=DIGEST)], 1.0)
    p.report("n1", [report(jid, "done", 2, 2, manifest=OTHER)], 2.0)
    job = p.get(jid)
    assert job is not None
    assert job.nodes["n1"].state == "failed" and "pinned" in job.nodes["n1"].error
    assert job.manifest == DIGEST


def test_an_image_by_digest_is_pinned_from_the_start() -> None:
    p = Preheats()
    jid = make_job(p, ["n0"], Selection("one"), image=f"127.0.0.1:5000/app@{DIGEST}")
    assert p.orders_for("n0")[0].manifest == DIGEST
    assert jid


def test_reports_from_strangers_and_nonsense_numbers_change_nothing_harmful() -> None:
    p = Preheats()
    jid = make_job(p, ["n0"], Selection("one"))
    p.report("n9", [report(jid, "done", 1, 1)], 1.0)  # not chosen
    p.report("n0", [report("ph-unknown", "done", 1, 1)], 1.0)  # no such job
    job = p.get(jid)
    assert job is not None and job.nodes["n0"].state == "pending"
    p.report("n0", [PreheatReport(jid, "running", 9, 2, 10**12, 5, manifest="nope")], 2.0)
    node = job.nodes["n0"]
    assert (node.blobs_done, node.bytes_done) == (2, 5)  # clamped to the totals
    assert job.manifest == ""  # not a digest: not pinned
    p.report("n0", [PreheatReport(jid, "running", -1, -1, -1, -1)], 3.0)
    assert (node.blobs_done, node.blobs_total, node.bytes_done) == (0, 0, 0)


def test_finished_jobs_are_pruned_first() -> None:
    p = Preheats(max_jobs=2)
    a = p.create("ph-a", IMAGE, "", Selection("one"), [Candidate("n0")], 0.0)
    p.report("n0", [PreheatReport("ph-a", "done")], 1.0)
    p.create("ph-b", IMAGE, "", Selection("one"), [Candidate("n0")], 2.0)
    p.create("ph-c", IMAGE, "", Selection("one"), [Candidate("n0")], 3.0)
    assert a.state == "done"
    assert [j.job_id for j in p.jobs()] == ["ph-b", "ph-c"]
    with pytest.raises(PreheatError, match="exists"):
        p.create("ph-c", IMAGE, "", Selection("one"), [Candidate("n0")], 4.0)


# -- through the Scheduler: heartbeats carry orders and reports --------------------------------


def scheduler_with(hosts: list[tuple[str, str]]) -> Scheduler:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=10.0))
    for hid, zone in hosts:
        assert s.handle(RegisterHost(hid, f"{hid}:7000", zone=zone), 0.0) == Ack()
    return s


def test_heartbeats_carry_orders_and_reports() -> None:
    s = scheduler_with([("n0", "a"), ("n1", "b"), ("n2", "a")])
    # n0 is busy downloading a blob: the least loaded go first.
    assert s.handle(StartTask("n0", DIGEST, 1 << 20, 1 << 18), 0.0) == Ack()
    job = s.start_preheat("ph-x", IMAGE, "linux/amd64", Selection("nodes", 2), 1.0)
    assert sorted(job.nodes) == ["n1", "n2"]  # one per zone, n0 (busy) skipped
    order = PreheatOrder("ph-x", IMAGE, "linux/amd64", "")
    assert s.handle(Heartbeat("n1"), 2.0) == Ack(preheat=(order,))
    assert s.handle(Heartbeat("n0"), 2.0) == Ack()
    done = PreheatReport("ph-x", "done", 3, 3, 300, 300, manifest=DIGEST)
    assert s.handle(Heartbeat("n1", HostLoad(), (done,)), 3.0) == Ack()
    assert job.nodes["n1"].state == "done"
    # n2 stops heartbeating: it expires, and its part fails.
    s.handle(Heartbeat("n1"), 12.0)
    s.tick(14.0)
    assert "n2" not in s.hosts
    assert job.nodes["n2"].state == "failed" and job.state == "failed"


def test_leave_host_fails_its_preheat_and_too_many_nodes_are_refused() -> None:
    s = scheduler_with([("n0", ""), ("n1", "")])
    with pytest.raises(NotEnoughNodes):
        s.start_preheat("ph-y", IMAGE, "", Selection("nodes", 3), 1.0)
    job = s.start_preheat("ph-y", IMAGE, "", Selection("all"), 1.0)
    assert s.handle(LeaveHost("n0"), 2.0) == Ack()
    assert job.nodes["n0"].state == "failed" and job.nodes["n1"].state == "pending"


def test_the_wire_format_round_trips() -> None:
    rep = PreheatReport("ph-1", "running", 1, 2, 3, 4, manifest=DIGEST, error="", exit_code=0)
    hb = Heartbeat("n0", HostLoad(cpu=0.5), (rep,))
    assert decode_event(encode(hb)) == hb
    ack = Ack(preheat=(PreheatOrder("ph-1", IMAGE, "linux/arm64/v8", DIGEST),))
    assert decode_answer(encode(ack)) == ack
    with pytest.raises(ValueError):
        decode_event({**encode(hb), "preheat": [{"job_id": "x", "state": "bogus"}]})


# -- the command's lines ----------------------------------------------------------------------


def test_progress_lines() -> None:
    node = {
        "host_id": "n0",
        "state": "running",
        "blobs_done": 1,
        "blobs_total": 4,
        "bytes_done": 1 << 20,
        "bytes_total": 4 << 20,
    }
    assert format_node(node) == "n0: running, 1/4 blobs, 1.0 MiB/4.0 MiB"
    failed = {"host_id": "n1", "state": "failed", "error": "left the swarm"}
    assert format_node(failed) == "n1: failed: left the swarm"
    line = format_status({"id": "ph-1", "nodes_done": 0, "nodes": [node, failed]})
    assert line.startswith("preheat ph-1: 0/2 nodes done, 1.0 MiB/4.0 MiB [n0: running")
    # Many nodes: counts per state and the failed ones, not a line per node.
    many = [{**node, "host_id": f"n{i}"} for i in range(1000)] + [failed]
    line = format_status({"id": "ph-2", "nodes_done": 0, "nodes": many})
    assert line.endswith("[failed 1, running 1000; n1: failed: left the swarm]")


@pytest.mark.parametrize(
    "kw",
    [
        {"nodes": 0},
        {"percent": 0.0},
        {"percent": 150.0},
        {"nodes": 1, "all": True},
        {"timeout": 0.0},
        {"scheduler": "ftp://x"},
    ],
)
def test_bad_requests_are_usage_errors(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"image": IMAGE, "scheduler": "http://127.0.0.1:1", **kw}
    with pytest.raises(UsageError):
        PreheatRequest(**args)  # type: ignore[arg-type]
