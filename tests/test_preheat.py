"""``p2pdist preheat`` end to end, and its bad input.

The integration tests run a real ``docker-registry`` (behind a FaultProxy that records
every request, so the registry's bytes can be counted), a real scheduler and three real
daemons (subprocesses, ``bench/cluster.py``), and the real command line.  The bad-input
tests run the scheduler in this event loop and the CLI in-process or as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.cluster import Cluster, DaemonProc, http_json, wait_until
from bench.image import Image, make_image, push_image
from bench.localregistry import LocalRegistry, free_port
from p2pdist.cli import main
from p2pdist.config import NodeConfig
from p2pdist.digest import Digest
from p2pdist.errors import PreheatFailed
from p2pdist.node import Node, open_node
from p2pdist.preheat import PreheatRequest, run_preheat
from p2pdist.preheater import Preheater
from scheduler import PreheatOrder, PreheatReport
from scheduler.service import serve_scheduler
from tests.faultproxy import FaultProxy
from tests.helpers import NO_DOCKER_CONFIG, PushedImage, requires_registry
from tests.test_swarm import registry_bytes

MiB = 1 << 20
PYTHON = sys.executable
TOKEN = "p2pdist-preheat-" + "5e1f" * 8


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def preheat_cmd(c: Cluster, image: str, *args: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "p2pdist",
        "preheat",
        image,
        "--scheduler",
        c.scheduler_url,
        "--interval",
        "0.3",
        *args,
    ]


def run_cli(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def holds(d: DaemonProc, image: Image) -> dict[str, bool]:
    """For each blob of ``image``: is it complete in the daemon's store, with the right
    bytes?"""
    out = {}
    for digest, data in image.blobs().items():
        path = d.blob_file(digest)
        out[digest] = path.is_file() and hashlib.sha256(path.read_bytes()).digest() == (
            hashlib.sha256(data).digest()
        )
    return out


def registry_egress(proxy: FaultProxy, image: Image) -> float:
    """Bytes of the image's blobs the registry served, in copies of the image."""
    sent = sum(registry_bytes(proxy, d, len(b)) for d, b in image.blobs().items())
    return sent / image.blobs_size


def jobs(c: Cluster) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = http_json(f"{c.scheduler_url}/api/v1/preheat")["jobs"]
    return listed


# -- end to end -----------------------------------------------------------------------------


@requires_registry
@pytest.mark.integration
def test_preheat_nodes_then_a_pull_from_peers_then_all(
    registry: LocalRegistry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image_a = make_image(size=6 * MiB, layers=3, layer_format="gzip", seed=71)
    image_b = make_image(size=4 * MiB, layers=2, layer_format="gzip", seed=72)
    push_image(registry.url, "preheat/a", "v1", image_a)
    push_image(registry.url, "preheat/b", "v1", image_b)
    ref_a, ref_b = f"{proxy.host}/preheat/a:v1", f"{proxy.host}/preheat/b:v1"
    with Cluster(tmp_path / "c", daemons=3, piece_size="1MiB") as c:
        # 1. --nodes 2: exactly two nodes hold every blob, verified; the third none.
        r = run_cli(preheat_cmd(c, ref_a, "--nodes", "2", "--timeout", "90"))
        assert r.returncode == 0, r.stderr + c.log_tails()
        print(r.stderr)
        assert "nodes done" in r.stderr and "preheated" in r.stderr
        assert r.stderr.count("\n") >= 3  # the job line, progress lines, the summary
        [job] = jobs(c)
        assert job["state"] == "done" and job["manifest"] == image_a.manifest_digest
        chosen = [n["host_id"] for n in job["nodes"]]
        assert len(chosen) == 2
        for n in job["nodes"]:
            assert n["blobs_done"] == n["blobs_total"] == len(image_a.blobs())
            assert n["bytes_done"] == n["bytes_total"] == image_a.blobs_size
        [other] = [d for d in c.daemons if d.host_id not in chosen]
        for d in c.daemons:
            held = holds(d, image_a)
            if d is other:
                assert not any(held.values()), f"{d.host_id} was not chosen but holds {held}"
            else:
                assert all(held.values()), f"{d.host_id} was chosen but holds {held}"
        warmed = registry_egress(proxy, image_a)
        assert warmed <= 1.1, f"the registry sent {warmed:.2f}x the image for two nodes"

        # 2. A later pull on the third node takes its bytes from the preheated peers.
        out = tmp_path / "layout"
        pull = [PYTHON, "-m", "p2pdist", "pull", ref_a, "--output", str(out)]
        r = run_cli([*pull, "--daemon", other.api_url, "--no-progress"])
        assert r.returncode == 0, r.stderr + c.log_tails()
        for digest, data in image_a.blobs().items():
            s = http_json(f"{other.api_url}/api/v1/blobs/{digest}/stats")
            assert s["from_source"] == 0 and s["from_peers"] == len(data), (digest, s)
        after = registry_egress(proxy, image_a)
        assert after == warmed, f"the pull asked the registry for {after - warmed:.2f}x more"
        print(f"registry egress for image A: {after:.3f}x the image (3 nodes hold it)")

        # 3. --all: every node holds every blob of another image.
        r = run_cli(preheat_cmd(c, ref_b, "--all", "--timeout", "90"))
        assert r.returncode == 0, r.stderr + c.log_tails()
        job_b = next(j for j in jobs(c) if j["image"] == ref_b)
        assert sorted(n["host_id"] for n in job_b["nodes"]) == ["n0", "n1", "n2"]
        for d in c.daemons:
            held = holds(d, image_b)
            assert all(held.values()), f"{d.host_id}: {held}"
        egress_b = registry_egress(proxy, image_b)
        print(f"registry egress for image B (--all, 3 nodes): {egress_b:.3f}x the image")
        assert egress_b <= 1.1


@requires_registry
@pytest.mark.integration
def test_a_chosen_node_that_leaves_fails_the_preheat_there(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    image = make_image(size=6 * MiB, layers=2, layer_format="gzip", seed=73)
    push_image(registry.url, "preheat/leave", "v1", image)
    c = Cluster(tmp_path / "c", daemons=3, piece_size="1MiB")
    # n2 receives at 2 Mbit/s: it cannot finish 6 MiB before it is stopped.
    c.daemons[2].argv += ["--download-rate", "2Mbit"]
    with c:
        cli = subprocess.Popen(
            preheat_cmd(c, f"{registry.host}/preheat/leave:v1", "--all", "--timeout", "90"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def n2_running() -> bool:
                listed = jobs(c)
                return bool(listed) and any(
                    n["host_id"] == "n2" and n["state"] == "running" for n in listed[0]["nodes"]
                )

            wait_until(n2_running, timeout=30, what="n2 reports the preheat running")
            c.daemons[2].stop()  # SIGTERM: the daemon leaves the swarm
            _, err = cli.communicate(timeout=90)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 4, err
        lines = [line for line in err.splitlines() if line.startswith("p2pdist: error:")]
        assert len(lines) == 1 and "failed on n2" in lines[0] and "left the swarm" in lines[0]
        assert "Traceback" not in err
        [job] = jobs(c)
        states = {n["host_id"]: n["state"] for n in job["nodes"]}
        assert states == {"n0": "done", "n1": "done", "n2": "failed"}, job
        assert job["state"] == "failed"
        for d in c.daemons[:2]:
            assert all(holds(d, image).values())


# -- the daemon's side, in this event loop ----------------------------------------------------


async def _run_order(tmp_path: Path, order: PreheatOrder) -> tuple[Node, PreheatReport]:
    config = NodeConfig(data_dir=tmp_path / "data", docker_config=NO_DOCKER_CONFIG)
    async with open_node(config) as node:
        preheater = Preheater(node)
        preheater.apply((order,))
        with trio.fail_after(60):
            await preheater.wait_changed()
        [rep] = preheater.reports()
        preheater.apply(())  # the scheduler saw the last report: the run is forgotten
        assert preheater.reports() == ()
        return node, rep


@requires_registry
async def test_a_daemon_warms_every_blob_of_the_image(
    pushed_image: PushedImage, tmp_path: Path
) -> None:
    image = pushed_image.image
    order = PreheatOrder("ph-0123456789abcdef", pushed_image.reference)
    node, rep = await _run_order(tmp_path, order)
    assert rep.state == "done", rep
    assert rep.manifest == image.manifest_digest
    assert rep.blobs_done == rep.blobs_total == len(image.blobs())
    assert rep.bytes_done == rep.bytes_total == image.blobs_size
    for digest, data in image.blobs().items():
        path = node.store.blob_path(Digest.parse(digest))
        assert path is not None and path.read_bytes() == data


@requires_registry
async def test_a_daemon_reports_what_went_wrong_with_its_exit_code(
    pushed_image: PushedImage, tmp_path: Path
) -> None:
    missing = PreheatOrder("ph-0000000000000001", f"{pushed_image.host}/test/app:no-such-tag")
    _, rep = await _run_order(tmp_path / "a", missing)
    assert rep.state == "failed" and rep.exit_code == 3, rep
    assert "not found" in rep.error.lower() or "unknown" in rep.error.lower(), rep
    # Pinned to a digest the registry does not have: not the tag's image, not done.
    pinned = PreheatOrder(
        "ph-0000000000000002", pushed_image.reference, manifest="sha256:" + "0" * 64
    )
    node, rep = await _run_order(tmp_path / "b", pinned)
    assert rep.state == "failed" and rep.exit_code == 3, rep
    assert node.store.list_blobs() == []


# -- bad input: the scheduler's API -----------------------------------------------------------


async def _post(client: httpx.AsyncClient, url: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(f"{url}/api/v1/preheat", content=content)


async def test_the_scheduler_refuses_bad_preheats_with_oci_errors() -> None:
    image = "127.0.0.1:5000/team/app:v1"
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "PREHEAT_INVALID"),
        ([image], 400, "PREHEAT_INVALID"),
        ({}, 400, "NAME_INVALID"),
        ({"image": 5}, 400, "NAME_INVALID"),
        ({"image": "Team/App:v1"}, 400, "NAME_INVALID"),
        ({"image": "127.0.0.1:5000/app:bad tag"}, 400, "NAME_INVALID"),
        ({"image": image, "nodes": 0}, 400, "PREHEAT_INVALID"),
        ({"image": image, "nodes": -3}, 400, "PREHEAT_INVALID"),
        ({"image": image, "nodes": "2"}, 400, "PREHEAT_INVALID"),
        ({"image": image, "percent": 150}, 400, "PREHEAT_INVALID"),
        ({"image": image, "percent": 0}, 400, "PREHEAT_INVALID"),
        ({"image": image, "nodes": 1, "all": True}, 400, "PREHEAT_INVALID"),
        ({"image": image, "bogus": 1}, 400, "PREHEAT_INVALID"),
        ({"image": image, "platform": "linux"}, 400, "PLATFORM_INVALID"),
        ({"image": image, "platform": 7}, 400, "PLATFORM_INVALID"),
        ({"image": image, "nodes": 2}, 409, "NOT_ENOUGH_NODES"),  # nobody registered
        ({"image": image, "all": True}, 409, "NOT_ENOUGH_NODES"),
    ]
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        async with httpx.AsyncClient(trust_env=False) as client:
            for body, status, code in cases:
                resp = await _post(client, sched.url, body)
                assert resp.status_code == status, (body, resp.text)
                assert resp.json()["errors"][0]["code"] == code, (body, resp.text)
            base = f"{sched.url}/api/v1/preheat"
            assert (await client.get(f"{base}/ph-0123456789abcdef")).status_code == 404
            for bad_id in ("ph-short", "ph-0123456789abcdef/x", "%2e%2e", "PH-0123456789ABCDEF"):
                assert (await client.get(f"{base}/{bad_id}")).status_code == 404, bad_id
            assert (await client.put(base, content=b"{}")).status_code == 405
            assert (await client.post(f"{base}/ph-0123456789abcdef")).status_code == 405
            assert (await client.get(base)).json() == {"jobs": []}
        nursery.cancel_scope.cancel()


async def test_preheat_needs_the_cluster_token_when_one_is_set() -> None:
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0, token=TOKEN))
        async with httpx.AsyncClient(trust_env=False) as client:
            resp = await _post(client, sched.url, {"image": "127.0.0.1:5000/app:v1"})
            assert resp.status_code == 401
            resp = await client.post(
                f"{sched.url}/api/v1/preheat",
                content=json.dumps({"image": "127.0.0.1:5000/app:v1"}).encode(),
                headers={"P2PDist-Token": TOKEN},
            )
            assert resp.status_code == 409  # past auth: no node is registered
        # The command line says what is wrong in one line, exit 3.
        result = await trio.run_process(
            [PYTHON, "-m", "p2pdist", "preheat", "127.0.0.1:5000/app:v1", "--scheduler", sched.url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        err = result.stderr.decode()
        assert result.returncode == 3, err
        assert err.startswith("p2pdist: error:") and "cluster token" in err
        assert err.count("\n") == 1 and TOKEN not in err
        nursery.cancel_scope.cancel()


async def test_the_command_reports_a_refused_selection_in_one_line() -> None:
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        argv = [PYTHON, "-m", "p2pdist", "preheat", "127.0.0.1:5000/app:v1"]
        result = await trio.run_process(
            [*argv, "--scheduler", sched.url, "--nodes", "3"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert err == (
            "p2pdist: error: the scheduler refused the preheat: "
            "no nodes are registered with the scheduler\n"
        )
        nursery.cancel_scope.cancel()


# -- the command when the job does not finish ---------------------------------------------------


async def _register_silent_host(url: str) -> None:
    """A host that registers and never heartbeats: it is chosen, and never does the job."""
    async with httpx.AsyncClient(trust_env=False) as client:
        event = {"type": "RegisterHost", "host_id": "silent", "addr": "127.0.0.1:9"}
        resp = await client.post(f"{url}/api/v1/events", json=event)
        assert resp.status_code == 200, resp.text


async def test_the_command_times_out_with_a_one_line_error() -> None:
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        await _register_silent_host(sched.url)
        req = PreheatRequest(
            image="127.0.0.1:5000/app:v1", scheduler=sched.url, timeout=1.0, interval=0.2
        )
        with pytest.raises(PreheatFailed, match="not finished after 1s: 0/1 nodes done") as exc:
            await run_preheat(req)
        assert "silent: pending" in str(exc.value) and exc.value.exit_code == 4
        nursery.cancel_scope.cancel()


async def test_the_command_says_when_the_scheduler_forgot_the_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    req = PreheatRequest(
        image="127.0.0.1:5000/app:v1", scheduler=f"http://127.0.0.1:{port}", interval=0.2
    )
    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def scheduler_then_restart() -> None:
            with first:
                await serve_scheduler("127.0.0.1", port)
            await trio.sleep(0.5)  # down for a moment: the command keeps asking
            await serve_scheduler("127.0.0.1", port)  # a fresh one: it knows no job

        nursery.start_soon(scheduler_then_restart)
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(10):
            while True:
                try:
                    await _register_silent_host(url)
                    break
                except httpx.HTTPError:
                    await trio.sleep(0.05)

        async def restart_once_the_job_exists() -> None:
            async with httpx.AsyncClient(trust_env=False) as client:
                with trio.fail_after(10):
                    while True:
                        if (await client.get(f"{url}/api/v1/preheat")).json()["jobs"]:
                            break
                        await trio.sleep(0.05)
            first.cancel()

        nursery.start_soon(restart_once_the_job_exists)
        with pytest.raises(PreheatFailed, match="no longer knows preheat job"):
            with trio.fail_after(20):
                await run_preheat(req)
        nursery.cancel_scope.cancel()
    assert "unreachable" in capsys.readouterr().err  # it said so, and kept asking


# -- bad input: the command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["127.0.0.1:5000/app:v1", "--nodes", "0"], "--nodes"),
        (["127.0.0.1:5000/app:v1", "--percent", "150"], "--percent"),
        (["127.0.0.1:5000/app:v1", "--percent", "0"], "--percent"),
        (["127.0.0.1:5000/app:v1", "--nodes", "2", "--all"], "not allowed with"),
        (["127.0.0.1:5000/app:v1", "--timeout", "-1"], "--timeout"),
        (["127.0.0.1:5000/app:v1", "--platform", "linux"], "--platform"),
        (["127.0.0.1:5000/App:v1"], "invalid"),
        (["127.0.0.1:5000/app:v1", "--scheduler", "ftp://x"], "scheduler URL"),
        (["127.0.0.1:5000/app:v1", "--scheduler", ""], "no scheduler"),
    ],
)
def test_bad_command_lines_are_one_line_exit_2(
    args: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("P2PDIST_SCHEDULER", "P2PDIST_SCHEDULERS", "P2PDIST_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    if "--scheduler" not in args:
        args = [*args, "--scheduler", "http://127.0.0.1:1"]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["preheat", *args]))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("p2pdist: error:") and err.count("\n") == 1, err
    assert needle in err, err


def test_an_unreachable_scheduler_is_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    code = main(["preheat", "127.0.0.1:5000/app:v1", "--scheduler", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.startswith("p2pdist: error: scheduler") and "unreachable" in err
    assert err.count("\n") == 1
