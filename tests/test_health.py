"""``/healthz`` and ``/readyz`` of a daemon (in this trio run, with a real scheduler) and of
the scheduler, over HTTP on loopback.

``/readyz`` is 200 and ``ok`` normally; 503 when the store cannot be written — made so in
ways that stop root too (a read-only bind mount of the data directory: EROFS; a store
directory replaced by a file: ENOTDIR) — and 200 again once it can; 200 but ``degraded``,
saying so, when the scheduler is gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.health import DEGRADED_MESSAGE, probe_writable
from p2pdist.httpserver import ServerInfo
from scheduler.service import serve_scheduler


def _config(root: Path, sched: str | None) -> NodeConfig:
    return NodeConfig(
        data_dir=root / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        host_id="health",
        schedulers=(sched,) if sched else (),
    )


@asynccontextmanager
async def cluster(root: Path) -> AsyncIterator[tuple[DaemonInfo, ServerInfo, trio.CancelScope]]:
    """A scheduler (stopped by cancelling the scope yielded) and a daemon using it."""
    async with trio.open_nursery() as nursery:
        sched_scope = trio.CancelScope()

        async def run_scheduler(task_status: trio.TaskStatus[ServerInfo]) -> None:
            with sched_scope:
                await serve_scheduler("127.0.0.1", 0, task_status=task_status)

        sched = await nursery.start(run_scheduler)
        async with open_daemon(_config(root, sched.url)) as info:
            yield info, sched, sched_scope
        nursery.cancel_scope.cancel()


async def _ready(c: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    r = await c.get(f"{url}/readyz")
    return r.status_code, r.json()


async def _wait_for(c: httpx.AsyncClient, url: str, status: str, scheduler: str) -> Any:
    """Poll ``/readyz`` until its status is ``status`` and the scheduler's state
    ``scheduler`` (heartbeats come every 5 s)."""
    with trio.fail_after(20):
        while True:
            code, body = await _ready(c, url)
            if body["status"] == status and body["checks"]["scheduler"]["state"] == scheduler:
                return code, body
            await trio.sleep(0.2)


async def test_readyz_ok_on_every_listener(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (info, sched, _), httpx.AsyncClient(trust_env=False) as c:
        code, body = await _wait_for(c, info.api_url, "ok", "reachable")
        assert code == 200
        checks = body["checks"]
        assert checks["store"]["ok"] is True
        assert checks["listeners"] == {"ok": True, "peer": "up", "proxy": "up"}
        assert checks["scheduler"] == {"ok": True, "state": "reachable"}
        assert body["host_id"] == "health"
        assert info.proxy_url is not None
        for url in (info.peer_url, info.proxy_url):  # the same answer on every listener
            assert (await _ready(c, url)) == (200, body)
            assert (await c.get(f"{url}/healthz")).status_code == 200
        # The scheduler: serving.
        r = await c.get(f"{sched.url}/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert (await c.get(f"{sched.url}/healthz")).status_code == 200


async def test_readyz_degraded_but_200_when_the_scheduler_is_down(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path) as (info, _, sched_scope),
        httpx.AsyncClient(trust_env=False) as c,
    ):
        await _wait_for(c, info.api_url, "ok", "reachable")
        sched_scope.cancel()
        code, body = await _wait_for(c, info.api_url, "degraded", "unreachable")
        assert code == 200
        assert body["message"] == DEGRADED_MESSAGE
        assert body["checks"]["scheduler"] == {"ok": False, "state": "unreachable"}
        assert body["checks"]["store"]["ok"] is True
        metrics = (await c.get(f"{info.api_url}/metrics")).text
        assert "p2pdist_scheduler_reachable 0.0" in metrics


async def test_readyz_without_a_scheduler_is_ok(tmp_path: Path) -> None:
    async with open_daemon(_config(tmp_path, None)) as info, httpx.AsyncClient() as c:
        code, body = await _ready(c, info.api_url)
        assert code == 200 and body["status"] == "ok"
        assert body["checks"]["scheduler"]["state"] == "none configured"


@contextmanager
def _read_only_bind(path: Path) -> Iterator[None]:
    """``path`` re-mounted read-only onto itself: writes fail with EROFS, even as root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount --bind not permitted here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def _dir_replaced_by_file(path: Path) -> Iterator[None]:
    """The store's ``tmp`` directory replaced by a plain file (ENOTDIR, even as root)."""
    tmp = path / "tmp"
    aside = path / "tmp.aside"
    tmp.rename(aside)
    tmp.write_bytes(b"not a directory")
    try:
        yield
    finally:
        tmp.unlink()
        aside.rename(tmp)


@pytest.mark.parametrize("how", ["read-only-mount", "dir-replaced-by-file"])
async def test_readyz_503_when_the_store_is_not_writable(tmp_path: Path, how: str) -> None:
    async with cluster(tmp_path) as (info, _, _), httpx.AsyncClient(trust_env=False) as c:
        await _wait_for(c, info.api_url, "ok", "reachable")
        data = tmp_path / "data"
        broken = _read_only_bind if how == "read-only-mount" else _dir_replaced_by_file
        with broken(data):
            # The store probe is cached for up to 2 s (anyone may ask the peer port).
            with trio.fail_after(10):
                while True:
                    code, body = await _ready(c, info.api_url)
                    if code != 200:
                        break
                    await trio.sleep(0.2)
            assert code == 503, body
            assert body["status"] == "unavailable"
            assert body["checks"]["store"]["ok"] is False
            expected = "Read-only file system" if how == "read-only-mount" else "Not a directory"
            assert expected in body["checks"]["store"]["error"]
            assert "store not writable" in body["message"]
            # Alive all the same.
            assert (await c.get(f"{info.api_url}/healthz")).status_code == 200
        code, body = await _wait_for(c, info.api_url, "ok", "reachable")
        assert code == 200
        assert not [p for p in data.rglob(".readyz-*")], "probe files left behind"


def test_probe_writable_names_the_failing_directory(tmp_path: Path) -> None:
    for sub in ("blobs", "tasks", "tmp"):
        (tmp_path / sub).mkdir()
    assert probe_writable(tmp_path) is None
    (tmp_path / "tasks").rmdir()
    problem = probe_writable(tmp_path)
    assert problem is not None and str(tmp_path / "tasks") in problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "tmp"]  # nothing left
