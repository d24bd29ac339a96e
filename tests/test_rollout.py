"""``python -m bench rollout``: the figures, the chart and the report from fake results (no
sockets), then — as root with ip, tc and docker-registry — the emulated network's shaping,
a small real rollout in both modes, the same with ``--client pull`` (a dockerd per node),
and the clean-up after an interrupt."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench import netns
from bench.image import make_image
from bench.localregistry import LocalRegistry
from bench.rollout import (
    chart_files,
    client_refusal,
    completion_svg,
    docker_image_problem,
    percentile,
    registry_bound,
    render_report,
    rollout_cli,
    summarize_times,
    t_min,
    verify_layout,
)
from tests.helpers import REGISTRY_MISSING_REASON, registry_installed

MIB = 1 << 20
MBIT = 1e6 / 8  # bytes/s per Mbit/s

# -- the lower bound and the statistics ---------------------------------------------------


def test_t_min_is_the_largest_of_the_three_terms() -> None:
    F = 256 * MIB
    # 8 nodes at 100 Mbit/s, origin 100 Mbit/s: origin and node download tie at F/u.
    bound, _ = t_min(F, 8, 100 * MBIT, 100 * MBIT)
    assert bound == pytest.approx(F / (100 * MBIT))
    assert bound == pytest.approx(21.47, abs=0.01)
    # A slow origin sets it.
    bound, binding = t_min(F, 8, 100 * MBIT, 10 * MBIT)
    assert (bound, binding) == (pytest.approx(F / (10 * MBIT)), "origin")
    # 16 nodes at 50 Mbit/s, origin 100: every node must take in F at 50 Mbit/s.
    bound, binding = t_min(F, 16, 50 * MBIT, 100 * MBIT)
    assert (bound, binding) == (pytest.approx(F / (50 * MBIT)), "node_download")
    # With symmetric node links the upload-capacity term never exceeds F/d_node ...
    for n in (1, 2, 8, 100, 10_000):
        cap = n * F / (100 * MBIT + n * 50 * MBIT)
        assert cap <= F / (50 * MBIT) + 1e-9
        assert t_min(F, n, 50 * MBIT, 100 * MBIT)[0] >= cap
    with pytest.raises(ValueError):
        t_min(F, 0, MBIT, MBIT)


def test_registry_bound_is_n_copies_through_the_origin() -> None:
    F = 16 * MIB
    assert registry_bound(F, 3, 200 * MBIT, 200 * MBIT) == pytest.approx(3 * F / (200 * MBIT))
    # A single node is limited by its own link, whichever is slower.
    assert registry_bound(F, 1, 10 * MBIT, 100 * MBIT) == pytest.approx(F / (10 * MBIT))


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]
    assert percentile(values, 50) == pytest.approx(4.5)
    assert percentile(values, 95) == pytest.approx(7.65)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 8.0
    assert percentile([3.0], 95) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_times_gives_ratios_and_counts_failures() -> None:
    s = summarize_times([10.0, 12.0, None, 11.0], bound=10.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["seconds"]["p50"] == 11.0
    assert s["seconds"]["max"] == 12.0
    assert s["ratio_to_t_min"]["max"] == 1.2
    assert s["ratio_to_t_min"]["p50"] == 1.1
    assert s["ratio_to_t_min"]["p95"] == pytest.approx(1.19)
    none = summarize_times([None, None], bound=1.0)
    assert none["completed"] == 0 and none["seconds"] is None


# -- the chart and the report -------------------------------------------------------------


def _fake_result() -> dict[str, Any]:
    def node(i: int, seconds: float | None, from_registry: int, from_peers: int) -> dict[str, Any]:
        return {
            "node": i,
            "address": f"10.77.1.{i + 1}",
            "seconds": seconds,
            "exit_code": 0 if seconds is not None else 1,
            "verified": seconds is not None,
            "problem": None if seconds is not None else "exit status 1",
            "start_delay_s": 0.001,
            "rx_bytes": from_registry + from_peers,
            "tx_bytes": 1000,
            "from_registry": from_registry,
            "from_peers": from_peers,
            "peer_wire_bytes": from_peers,
        }

    F = 100 * MIB

    def mode(name: str, times: list[float | None], egress: int) -> dict[str, Any]:
        per = [
            node(i, t, F if name == "registry" else F // 4, 0 if name == "registry" else F // 4 * 3)
            for i, t in enumerate(times)
        ]
        return {
            "mode": name,
            "ok": None not in times,
            "times": summarize_times(times, 10.0),
            "registry_egress_bytes": egress,
            "registry_egress_ratio": egress / F,
            "registry_egress_payload_ratio": (egress - 2000) / F,
            "network_counters": {"origin_tcp_out_segs": 1000, "origin_tcp_retrans_segs": 10},
            "cpu_busy": 0.5,
            "client_cpu_seconds": 1.0,
            "daemon_cpu_seconds": 2.0 if name == "p2p" else None,
            "scheduler_cpu_seconds": 0.1 if name == "p2p" else None,
            "registry_cpu_seconds": 0.3,
            "per_node": per,
            "problems": [] if None not in times else ["n3: exit status 1: boom <&>"],
        }

    return {
        "command": "python -m bench rollout --nodes 4",
        "wall_seconds": 99.0,
        "params": {
            "nodes": 4,
            "node_mbit": 100.0,
            "origin_mbit": 100.0,
            "image_size": F,
            "layers": 4,
            "layer_format": "gzip",
            "piece_size": None,
            "mode": "both",
            "client": "get",
            "seed": 1,
        },
        "image": {"bytes": F},
        "bounds": {
            "t_min_seconds": 10.0,
            "binding": "origin",
            "terms": {"origin": 10.0, "node_download": 10.0, "upload_capacity": 8.0},
            "registry_bound_seconds": 40.0,
        },
        "network": {"link_check": {"origin_to_n0_mbit": 95.7}},
        "host": {"cpus": 2},
        "modes": {
            "registry": mode("registry", [40.0, 41.0, 43.0, 43.0], 4 * F + 5000),
            "p2p": mode("p2p", [11.0, 11.5, 12.0, None], F + 3000),
        },
    }


def test_completion_svg_is_a_step_chart_with_t_min() -> None:
    svg = completion_svg(
        {"registry": [4.0, 2.0, 3.0], "p2p": [1.0, None, 1.5]},
        nodes=3,
        t_min_s=1.0,
        title="nodes <complete> & more",
    )
    root = ET.fromstring(svg)  # well-formed XML, the title escaped
    ns = "{http://www.w3.org/2000/svg}"
    paths = root.findall(f"{ns}path")
    assert len(paths) == 2
    # registry: three steps up, in time order, then flat to the right edge
    assert paths[0].attrib["d"].count("V") == 3
    assert paths[1].attrib["d"].count("V") == 2  # one node failed
    assert len(root.findall(f"{ns}circle")) == 5
    texts = ["".join(t.itertext()) for t in root.iter(f"{ns}text")]
    assert "nodes <complete> & more" in texts
    assert "T_min 1.0 s" in texts
    assert any("registry (slowest 4.00× T_min)" in t for t in texts)
    assert any("p2p (slowest 1.50× T_min), 1 failed" in t for t in texts)
    dashed = [e for e in root.iter(f"{ns}line") if e.attrib.get("stroke-dasharray")]
    assert len(dashed) == 1


def test_report_has_a_table_per_mode_and_the_charts() -> None:
    result = _fake_result()
    charts = chart_files(result)
    assert sorted(charts) == ["completion-p2p.svg", "completion-registry.svg", "completion.svg"]
    for svg in charts.values():
        ET.fromstring(svg)
    report = render_report(result)
    assert "**T_min = 10.00 s** (set by origin" in report
    assert "| registry | 4/4 | 42.00 s |" in report
    assert "| 4.20×" in report and "**4.30×**" in report  # registry p50, max
    assert "| p2p | 3/4 | 11.50 s |" in report and "**1.20×**" in report
    assert "| 4.00× |" in report  # registry egress ÷ F
    assert "| n3 | – | – | 1 | NO: exit status 1 |" in report
    assert "- n3: exit status 1: boom <&>" in report
    assert "![p2p: nodes complete over time](completion-p2p.svg)" in report
    assert "retransmitted 10 of 1000 segments (1.0 %)" in report
    assert "`python -m bench rollout --nodes 4`" in report


def test_verify_layout_checks_every_blob(tmp_path: Path) -> None:
    import hashlib

    image = make_image(size=200_000, layers=2, seed=5)
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest, data in image.blobs().items():
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    mdigest = "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    (blobs / mdigest.removeprefix("sha256:")).write_bytes(image.manifest)
    (tmp_path / "index.json").write_text(json.dumps({"manifests": [{"digest": mdigest}]}))
    assert verify_layout(tmp_path, image) is None
    layer = blobs / image.layer_digests[1].removeprefix("sha256:")
    data = bytearray(layer.read_bytes())
    data[100] ^= 1
    layer.write_bytes(bytes(data))
    problem = verify_layout(tmp_path, image)
    assert problem is not None and "do not match" in problem
    layer.unlink()
    problem = verify_layout(tmp_path, image)
    assert problem is not None and "unreadable" in problem
    assert verify_layout(tmp_path / "nowhere", image) is not None


# -- refusing -------------------------------------------------------------------------------


def test_client_pull_is_refused_clearly_without_dockerd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "dockerd" else "/x")
    rc = rollout_cli(
        nodes=2,
        node_mbit=100,
        origin_mbit=100,
        image_size="1MiB",
        layers=1,
        layer_format="gzip",
        piece_size=None,
        mode="both",
        client="pull",
        out=str(tmp_path / "out"),
        seed=1,
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--client pull" in err[0]
    assert "missing dockerd" in err[0] and "docker.io" in err[0]
    assert not (tmp_path / "out").exists()  # refused before doing anything
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in (client_refusal("pull") or "")
    assert client_refusal("get") is None
    assert "not one of get, pull" in (client_refusal("ctr") or "")
    # with root and dockerd, but on loopback: no namespace to run a dockerd in
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: "/x")
    rc = rollout_cli(
        nodes=2,
        node_mbit=100,
        origin_mbit=100,
        image_size="1MiB",
        layers=1,
        layer_format="gzip",
        piece_size=None,
        mode="p2p",
        client="pull",
        network="loopback",
        out=str(tmp_path / "out"),
        seed=1,
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not with --network loopback" in err[0]
    assert not (tmp_path / "out").exists()


def test_docker_image_problem_checks_id_tag_and_layers() -> None:
    image = make_image(size=64 * 1024, layers=2, layer_format="gzip", seed=3)
    name = "10.77.0.2:5000/bench/rollout:v1"
    good = {"Id": image.config_digest, "RepoTags": [name], "RootFS": {"Layers": image.diff_ids}}
    assert docker_image_problem(good, image, name) is None
    other = make_image(size=64 * 1024, layers=2, layer_format="gzip", seed=4)
    wrong_id = {**good, "Id": other.config_digest}
    assert "want " + image.config_digest in (docker_image_problem(wrong_id, image, name) or "")
    untagged = {**good, "RepoTags": []}
    assert "not tagged" in (docker_image_problem(untagged, image, name) or "")
    short = {**good, "RootFS": {"Layers": image.diff_ids[:1]}}
    assert "1 layers" in (docker_image_problem(short, image, name) or "")
    assert docker_image_problem("dockerd has no image x", image, name) == "dockerd has no image x"


def test_preflight_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in (netns.preflight() or "")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/x")
    reason = netns.preflight() or ""
    assert "missing tc" in reason and "iproute2" in reason


def test_not_root_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    rc = rollout_cli(
        nodes=2,
        node_mbit=100,
        origin_mbit=100,
        image_size="1MiB",
        layers=1,
        layer_format="gzip",
        piece_size=None,
        mode="both",
        client="get",
        out=str(tmp_path / "out"),
        seed=1,
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs root" in err[0]
    assert not (tmp_path / "out").exists()  # refused before doing anything


def test_a_failed_setup_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import bench.rollout

    def boom(**kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("daemon n5 exited early: ImportError")

    monkeypatch.setattr(bench.rollout, "run_rollout", boom)
    rc = rollout_cli(
        nodes=2,
        node_mbit=100,
        origin_mbit=100,
        image_size="1MiB",
        layers=1,
        layer_format="gzip",
        piece_size=None,
        mode="both",
        client="get",
        out=str(tmp_path / "out"),
        seed=1,
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed: daemon n5 exited early" in err[0]


def test_local_registry_outside_loopback_needs_a_namespace_prefix_and_port() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LocalRegistry(addr="10.77.0.2", port=5000)
    with pytest.raises(ValueError, match="port="):
        LocalRegistry(addr="10.77.0.2", cmd_prefix=["ip", "netns", "exec", "x"])


def test_tbf_burst_fits_a_gso_frame() -> None:
    assert netns.tbf_params(10)[1] == 64 * 1024
    assert netns.tbf_params(100) == ("100mbit", 64 * 1024, "20ms")
    assert netns.tbf_params(10_000)[1] == 1_250_000  # 1 ms at 10 Gbit/s


# -- as root: the emulated network and real rollouts ---------------------------------------

_REASON = netns.preflight()
root_net = pytest.mark.skipif(_REASON is not None, reason=f"emulated network: {_REASON}")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _bench(argv: list[str], timeout: float) -> tuple[int, str, int]:
    """``python -m bench ARGV`` to the end: its exit status, its output and its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output, proc.pid


def _bench_until_go(argv: list[str], log: Path, timeout: float) -> subprocess.Popen[bytes]:
    """``python -m bench ARGV`` started, output to ``log``, returned once its clients were
    released (and a second more): a run to interrupt."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench", *argv],
            cwd=REPO_ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    try:
        while b"; go (" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    time.sleep(1.0)
    return proc


def _leftovers(pid: int) -> tuple[list[str], list[str], list[int]]:
    """Namespaces, host links and processes left by the rollout run as ``pid``."""
    prefix = f"{netns.PREFIX}{pid}-"
    spaces = [n for n in netns.our_namespaces() if n.startswith(prefix)]
    links = netns.leftover_links()
    marker = f"p2pdist-rollout-{pid}-".encode()
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    procs.append(int(entry.name))
            except OSError:
                pass
    return spaces, links, procs


@pytest.mark.integration
@root_net
def test_tbf_shapes_each_link_in_both_directions() -> None:
    with netns.EmulatedNetwork(nodes=2, node_mbit=50, origin_mbit=100) as net:
        n0, n1 = net.node_hosts
        names = net.namespaces()
        assert all(netns.NetNS(n).exists() for n in names)
        one_second_at_50 = int(50 * MBIT)
        up = netns.measure_throughput(n0, n1, nbytes=one_second_at_50) / 1e6
        down = netns.measure_throughput(net.origin, n0, nbytes=one_second_at_50) / 1e6
        origin_up = netns.measure_throughput(net.origin, net.scheduler, nbytes=int(100 * MBIT))
        # payload of one TCP stream: ≈ 95.7 % of the frame rate at MTU 1500
        assert 0.85 * 50 < up <= 1.01 * 50
        assert 0.85 * 50 < down <= 1.01 * 50
        assert 0.85 * 100 < origin_up / 1e6 <= 1.01 * 100
        qdisc = net.origin.ns.tc("qdisc", "show", "dev", "eth0")
        assert "tbf" in qdisc and "100Mbit" in qdisc
    assert not any(netns.NetNS(n).exists() for n in names)
    assert netns.leftover_links() == []


@pytest.mark.integration
@root_net
def test_small_rollout_in_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "rollout", "--nodes", "3", "--node-mbit", "200",
        "--origin-mbit", "200", "--image-size", "16MiB", "--layers", "4", "--mode", "both",
        "--piece-size", "1MiB", "--out", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    rc, output, pid = _bench(argv, timeout=120)
    seconds = time.monotonic() - started
    assert rc == 0, output
    assert seconds < 60, output
    result = json.loads((out / "result.json").read_text())
    F = result["image"]["bytes"]
    assert F >= 16 * MIB
    assert result["ok"] is True
    for mode in ("registry", "p2p"):
        mr = result["modes"][mode]
        assert [n["verified"] for n in mr["per_node"]] == [True] * 3, mr["problems"]
        assert all(n["seconds"] and n["seconds"] > 0 for n in mr["per_node"])
        assert all(n["rx_bytes"] >= F for n in mr["per_node"])  # every byte crossed its link
        assert mr["times"]["ratio_to_t_min"]["max"] >= 1.0  # nothing beats the bound
    reg, p2p = result["modes"]["registry"], result["modes"]["p2p"]
    assert reg["registry_egress_bytes"] >= 0.9 * 3 * F
    assert p2p["registry_egress_bytes"] <= 1.3 * F
    assert p2p["from_registry_total"] >= F
    assert p2p["from_peers_total"] > 0
    for name in ("report.md", "completion.svg", "completion-p2p.svg", "completion-registry.svg"):
        assert (out / name).is_file()
    assert (out / "logs" / "p2p" / "n0-daemon.log").is_file()
    assert _leftovers(pid) == ([], [], [])


_PULL_REASON = _REASON or client_refusal("pull")
root_pull = pytest.mark.skipif(
    _PULL_REASON is not None, reason=f"--client pull (a dockerd per node): {_PULL_REASON}"
)


def _dockerd_roots(logs: Path) -> list[str]:
    """The private dockerds' directories, from their logs the harness kept."""
    roots = []
    for log in sorted(logs.glob("*/n*-dockerd.log")):
        m = re.search(r"API listen on (\S+)/docker\.sock", log.read_text(errors="replace"))
        assert m, f"{log}: no 'API listen on'"
        roots.append(m.group(1))
    return roots


def _processes_naming(paths: list[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(p + "/" in cmdline for p in paths):
                found.append(int(entry.name))
    return found


@pytest.mark.integration
@root_pull
def test_small_rollout_with_client_pull_loads_every_nodes_dockerd(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "rollout", "--nodes", "2", "--node-mbit", "200",
        "--origin-mbit", "200", "--image-size", "8MiB", "--layers", "2", "--mode", "both",
        "--client", "pull", "--piece-size", "1MiB", "--out", str(out),
    ]  # fmt: skip
    rc, output, pid = _bench(argv, timeout=180)
    assert rc == 0, output
    result = json.loads((out / "result.json").read_text())
    image = make_image(size=8 * MIB, layers=2, layer_format="gzip", seed=1)
    assert result["image"]["manifest_digest"] == image.manifest_digest
    F = result["image"]["bytes"]
    assert result["ok"] is True
    assert result["params"]["client"] == "pull"
    for mode in ("registry", "p2p"):
        mr = result["modes"][mode]
        assert mr["client"] == "pull"
        nodes = mr["per_node"]
        # each node's dockerd had REPO:TAG as the image whose id is the config digest
        assert [n["verified"] for n in nodes] == [True, True], mr["problems"]
        assert [n["docker_image_id"] for n in nodes] == [image.config_digest] * 2
        assert all(n["seconds"] and n["seconds"] > 0 for n in nodes)
        assert all(n["rx_bytes"] >= F for n in nodes)
        assert all(n["docker_load_s"] is not None for n in nodes)
        assert mr["dockerd_cpu_seconds"] > 0
    reg, p2p = result["modes"]["registry"], result["modes"]["p2p"]
    assert reg["registry_egress_bytes"] >= 0.9 * 2 * F
    assert p2p["registry_egress_bytes"] < reg["registry_egress_bytes"]
    assert p2p["from_peers_total"] > 0
    assert "dockerd" in (out / "report.md").read_text()
    # every dockerd stopped and its directory removed; nothing else left either
    roots = _dockerd_roots(out / "logs")
    assert len(roots) == 4  # two nodes, two modes
    assert _processes_naming(roots) == []
    assert not any(Path(r).exists() for r in roots)
    assert _leftovers(pid) == ([], [], [])


@pytest.mark.integration
@root_pull
def test_interrupted_client_pull_rollout_stops_every_dockerd(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "rollout", "--nodes", "2", "--node-mbit", "20",
        "--origin-mbit", "20", "--image-size", "24MiB", "--layers", "2", "--mode", "registry",
        "--client", "pull", "--out", str(out),
    ]  # fmt: skip
    log = tmp_path / "log"
    proc = _bench_until_go(argv, log, timeout=90)
    try:
        spaces, _, _ = _leftovers(proc.pid)
        inside = {pid for ns in spaces for pid in netns.NetNS(ns).pids()}
        names = set()
        for pid in inside:
            with contextlib.suppress(OSError):  # gone meanwhile
                names.add(Path(f"/proc/{pid}/comm").read_text().strip())
        assert "dockerd" in names, names  # running inside the nodes' namespaces
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, log.read_text()
    roots = _dockerd_roots(out / "logs")
    assert len(roots) == 2
    assert _processes_naming(roots) == []
    assert not any(Path(r).exists() for r in roots)
    assert _leftovers(proc.pid) == ([], [], [])


@pytest.mark.integration
@pytest.mark.skipif(not registry_installed(), reason=REGISTRY_MISSING_REASON)
def test_small_p2p_rollout_on_loopback_without_namespaces(tmp_path: Path) -> None:
    """The mode that needs no root: nodes on 127.B.1.x limited by their daemons' own
    rates, the registry behind a counting relay at the origin rate."""
    out = tmp_path / "out"
    argv = [
        "rollout", "--network", "loopback", "--mode", "p2p",
        "--nodes", "3", "--node-mbit", "200", "--origin-mbit", "200", "--image-size", "16MiB",
        "--layers", "4", "--piece-size", "1MiB", "--out", str(out),
    ]  # fmt: skip
    rc, output, _ = _bench(argv, timeout=120)
    assert rc == 0, output
    result = json.loads((out / "result.json").read_text())
    F = result["image"]["bytes"]
    assert result["ok"] is True and result["params"]["network"] == "loopback"
    p2p = result["modes"]["p2p"]
    assert [n["verified"] for n in p2p["per_node"]] == [True] * 3, p2p["problems"]
    for n in p2p["per_node"]:
        assert n["from_registry"] + n["from_peers"] >= F
        assert n["rx_bytes"] is None  # no interface of its own to count on
    # The relay counted one copy (and a little HTTP), not three; the limits paced the
    # transfer (a node cannot take F in faster than its download rate allows).
    assert F <= p2p["registry_egress_bytes"] <= 1.3 * F
    assert p2p["from_peers_total"] > 0
    assert p2p["times"]["ratio_to_t_min"]["max"] >= 0.9
    assert (out / "report.md").is_file()


@pytest.mark.integration
@root_net
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_rollout_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    # Slow links, so that the registry-mode pull is still running when the signal comes.
    argv = [
        "rollout", "--nodes", "2", "--node-mbit", "20",
        "--origin-mbit", "20", "--image-size", "24MiB", "--layers", "2", "--mode", "both",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    log = tmp_path / "log"
    proc = _bench_until_go(argv, log, timeout=60)
    try:
        spaces, _, procs = _leftovers(proc.pid)
        assert len(spaces) == 5 and procs  # bridge, origin, scheduler, 2 nodes; clients
        proc.send_signal(sig)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, log.read_text()
    assert "interrupted" in log.read_text()
    assert _leftovers(proc.pid) == ([], [], [])
