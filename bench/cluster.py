"""A real p2pdist cluster for integration tests: one scheduler and N node daemons, each
its own subprocess on free loopback ports, logs captured to files.

    with Cluster(tmp_path, daemons=3, piece_size="1MiB") as cluster:
        gets = [cluster.get(i, f"{proxy.host}/repo@{digest}", tmp_path / f"out{i}")
                for i in range(3)]
        assert [g.wait(60) for g in gets] == [0, 0, 0]
        cluster.stats(0, digest)            # the daemon's /api/v1/blobs/<digest>/stats
        cluster.kill_daemon(1)              # SIGKILL
        cluster.restart_scheduler()         # SIGKILL, then a new one on the same port

Readiness is each process's ``/healthz`` (and, for daemons, the scheduler counting them
as registered).  Every process is stopped when the block exits, however it exits:
SIGTERM, then SIGKILL after a grace period.  When the block exits with an exception the
tail of every log is printed (pytest shows it with the failure).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.localregistry import free_port

__all__ = ["Cluster", "DaemonProc", "Proc", "http_json", "wait_until"]

PYTHON = sys.executable
HOST = "127.0.0.1"

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:  # last resort if a test process dies without its finally
    for p in list(_LIVE):
        with contextlib.suppress(OSError):
            p.kill()


atexit.register(_kill_leftovers)


def wait_until(
    cond: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``cond`` until it returns something truthy (returned), or fail after
    ``timeout`` seconds with ``what`` in the message."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout}s (last error: {last_exc!r})")
        time.sleep(interval)


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Proc:
    """One subprocess with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to pytest is not theirs to handle
            )
        _LIVE.add(self.popen)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the process to go (SIGKILL after 5 s otherwise)."""
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        _LIVE.discard(p)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        _LIVE.discard(p)

    def log_tail(self, max_bytes: int = 6000) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class DaemonProc(Proc):
    host_id: str = ""
    data_dir: Path = field(default_factory=Path)
    peer_port: int = 0
    api_port: int = 0

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def peer_addr(self) -> str:
        return f"{HOST}:{self.peer_port}"

    def blob_file(self, digest: str) -> Path:
        alg, _, hexd = digest.partition(":")
        return self.data_dir / "blobs" / alg / hexd


class GetProc(Proc):
    """A ``p2pdist get`` run; ``wait`` returns its exit code."""

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"{self.name} still running after {timeout}s; log:\n{self.log_tail()}"
            ) from None
        _LIVE.discard(self.popen)
        return rc


class Cluster:
    """A scheduler and ``daemons`` node daemons (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        daemons: int = 3,
        piece_size: str | None = "1MiB",
        log_level: str = "info",
        daemon_args: Sequence[str] = (),
        per_daemon_args: Mapping[int, Sequence[str]] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        """``daemon_args`` go to every daemon, ``per_daemon_args[i]`` to daemon ``i`` only
        (after them: they win where a flag is given twice)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        self.scheduler_port = free_port(HOST)
        self.scheduler = Proc(
            "scheduler",
            [
                PYTHON,
                "-m",
                "p2pdist",
                "scheduler",
                "--listen",
                f"{HOST}:{self.scheduler_port}",
                "--log-level",
                log_level,
            ],
            self.root / "scheduler.log",
        )
        self.daemons: list[DaemonProc] = []
        for i in range(daemons):
            host_id = f"n{i}"
            data_dir = self.root / f"{host_id}-data"
            peer_port, api_port = free_port(HOST), free_port(HOST)
            argv = [
                PYTHON,
                "-m",
                "p2pdist",
                "daemon",
                "--data-dir",
                str(data_dir),
                "--scheduler",
                self.scheduler_url,
                "--peer-listen",
                f"{HOST}:{peer_port}",
                "--api-listen",
                f"{HOST}:{api_port}",
                "--host-id",
                host_id,
                "--log-level",
                log_level,
                "--proxy-listen",
                "off",
                *(["--piece-size", piece_size] if piece_size else []),
                *daemon_args,
                *(per_daemon_args or {}).get(i, ()),
            ]
            self.daemons.append(
                DaemonProc(
                    host_id,
                    argv,
                    self.root / f"{host_id}.log",
                    host_id=host_id,
                    data_dir=data_dir,
                    peer_port=peer_port,
                    api_port=api_port,
                )
            )
        self.gets: list[GetProc] = []

    @property
    def scheduler_url(self) -> str:
        return f"http://{HOST}:{self.scheduler_port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.start_scheduler()
        for d in self.daemons:
            d.start()
        for d in self.daemons:
            self.wait_daemon(d)
        self.wait_registered(len(self.daemons))

    def start_scheduler(self) -> None:
        self.scheduler.start()
        wait_until(
            lambda: self._check_alive(self.scheduler) and _healthy(self.scheduler_url),
            timeout=self.ready_timeout,
            what="scheduler /healthz",
        )

    def kill_scheduler(self, sig: int = signal.SIGKILL) -> None:
        self.scheduler.kill(sig)

    def restart_scheduler(self) -> None:
        """SIGKILL the scheduler and start a fresh one (it knows nothing) on its port."""
        self.kill_scheduler()
        self.start_scheduler()

    def wait_daemon(self, d: DaemonProc) -> None:
        wait_until(
            lambda: (
                self._check_alive(d) and _healthy(d.api_url) and _healthy(f"http://{d.peer_addr}")
            ),
            timeout=self.ready_timeout,
            what=f"daemon {d.name} /healthz",
        )

    def scheduler_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(f"{self.scheduler_url}/api/v1/stats", timeout=2)
        return stats

    def wait_registered(
        self, hosts: int, *, tasks: int | None = None, timeout: float = 20.0
    ) -> None:
        """Until the scheduler counts ``hosts`` hosts (and ``tasks`` tasks, if given)."""

        def ok() -> bool:
            s = self.scheduler_stats()
            return bool(s["hosts"] >= hosts and (tasks is None or s["tasks"] >= tasks))

        wait_until(ok, timeout=timeout, what=f"scheduler knows {hosts} hosts, {tasks} tasks")

    def kill_daemon(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.daemons[i].kill(sig)

    def _check_alive(self, p: Proc) -> bool:
        if not p.running:
            raise RuntimeError(f"{p.name} exited early:\n{p.log_tail()}")
        return True

    def close(self) -> None:
        procs: list[Proc] = [*self.gets, *self.daemons, self.scheduler]
        for p in procs:  # SIGTERM everything first, so that they stop in parallel
            if p.running:
                assert p.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    p.popen.terminate()
        for p in procs:
            p.stop(grace=5.0)

    def log_tails(self, max_bytes: int = 4000) -> str:
        parts = []
        for p in [self.scheduler, *self.daemons, *self.gets]:
            parts.append(f"----- {p.name} ({p.log_path}) -----\n{p.log_tail(max_bytes)}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            print(self.log_tails(), file=sys.stderr)
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                print(self.log_tails(), file=sys.stderr)
        finally:
            self.close()

    # -- clients --------------------------------------------------------------------------

    def get(
        self, i: int, target: str, output: Path, *, extra: Sequence[str] = (), start: bool = True
    ) -> GetProc:
        """``p2pdist get TARGET -O OUTPUT --daemon <daemon i>`` as a subprocess."""
        d = self.daemons[i]
        n = len(self.gets)
        g = GetProc(
            f"get{n}-{d.name}",
            [
                PYTHON,
                "-m",
                "p2pdist",
                "get",
                target,
                "-O",
                str(output),
                "--daemon",
                d.api_url,
                "--no-progress",
                *extra,
            ],
            self.root / f"get{n}-{d.name}.log",
        )
        self.gets.append(g)
        if start:
            g.start()
        return g

    def stats(self, i: int, digest: str) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(f"{self.daemons[i].api_url}/api/v1/blobs/{digest}/stats")
        return stats
