"""A scheduler and N node daemons as real processes on loopback: what ``make demo`` and
``python -m bench swarm`` run.  A sync context manager; every process is stopped on exit
(SIGTERM, then SIGKILL), also when the block fails."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .localregistry import free_port

__all__ = ["Cluster", "NodeProc"]


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    peer_port: int
    api_port: int
    proc: subprocess.Popen[bytes]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: process exited ({proc.returncode}): {log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not become healthy in {timeout}s")


class Cluster:
    """``with Cluster(3) as c: c.get(0, ref, out)``."""

    def __init__(
        self,
        nodes: int,
        *,
        piece_size: str = "4MiB",
        root: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.count = nodes
        self.piece_size = piece_size
        self.extra = extra
        self._tmp = tempfile.TemporaryDirectory(prefix="p2pdist-cluster-") if root is None else None
        self.root: Path = Path(self._tmp.name) if self._tmp is not None else Path(str(root))
        self.nodes: list[NodeProc] = []
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.scheduler_url = ""

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "p2pdist", *args], stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            out.close()

    def start(self) -> None:
        port = free_port()
        self.scheduler_url = f"http://127.0.0.1:{port}"
        log = self.root / "scheduler.log"
        self.scheduler = self._spawn(
            ["scheduler", "--listen", f"127.0.0.1:{port}", "--log-level", "warning"], log
        )
        _wait_healthy(self.scheduler_url, self.scheduler, log, 15)
        for i in range(self.count):
            name = f"node{i}"
            peer, api = free_port(), free_port()
            data = self.root / name
            log = self.root / f"{name}.log"
            proc = self._spawn(
                [
                    "daemon",
                    "--data-dir",
                    str(data),
                    "--scheduler",
                    self.scheduler_url,
                    "--peer-listen",
                    f"127.0.0.1:{peer}",
                    "--api-listen",
                    f"127.0.0.1:{api}",
                    "--host-id",
                    name,
                    "--piece-size",
                    self.piece_size,
                    "--log-level",
                    "warning",
                    *self.extra,
                ],
                log,
            )
            self.nodes.append(NodeProc(name, data, peer, api, proc))
        for node in self.nodes:
            _wait_healthy(node.api_url, node.proc, self.root / f"{node.name}.log", 15)

    def get_cmd(self, i: int, target: str, out: str | Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "p2pdist",
            "get",
            target,
            "-O",
            str(out),
            "--daemon",
            self.nodes[i].api_url,
            "--no-progress",
            "-q",
        ]

    def get_all(self, target: str, outs: list[Path]) -> tuple[list[int], float]:
        """Start a get on every node at the same moment; (exit codes, seconds)."""
        started = time.perf_counter()
        procs = [subprocess.Popen(self.get_cmd(i, target, outs[i])) for i in range(self.count)]
        codes = [p.wait() for p in procs]
        return codes, time.perf_counter() - started

    def stats(self, i: int, digest: str) -> dict[str, Any]:
        url = f"{self.nodes[i].api_url}/api/v1/blobs/{digest}/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
            return data

    def stop(self) -> None:
        procs = [n.proc for n in self.nodes] + ([self.scheduler] if self.scheduler else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
