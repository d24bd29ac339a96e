"""A private ``dockerd`` (and the ``containerd`` it spawns), for benchmarks and tests.

    with Dockerd.start() as d:
        d.set_mirrors(["http://127.0.0.1:5001"])   # daemon.json + SIGHUP, waits for /info
        d.docker("pull", "app:v1")                # the docker CLI against d.url
        d.ctr("images", "ls")                     # ctr against dockerd's own containerd

Everything lives in one short temporary directory (unix socket paths are limited to 108
bytes): ``data/`` (``--data-root``), ``exec/`` (``--exec-root``; dockerd's containerd
listens on ``exec/containerd/containerd.sock``), ``docker.sock``, ``daemon.json``,
``dockerd.pid``, ``dockerd.log``.  dockerd runs with ``--storage-driver=vfs
--iptables=false --bridge=none``, so it needs root but no kernel module and no network
set-up, and touches nothing outside its directory.  ``cmd_prefix`` starts it inside a
network namespace (``python -m bench rollout --client pull``: one dockerd per node).

:meth:`Dockerd.stop` kills running containers (dockerd would give each 10 s), sends
SIGTERM (SIGKILL after a grace period), then makes sure the containerd and any shim that
dockerd started are gone (processes whose command line names this directory: only ours),
unmounts anything left under the directory, and removes it.

The tests' session fixture (``tests/runtimes.py``) and ``python -m bench docker-pull`` use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["Dockerd", "DockerdError"]

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class DockerdError(RuntimeError):
    """dockerd did not start, or did not take a configuration change, in time."""


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without proxy variables (everything here is loopback)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    env.pop("DOCKER_HOST", None)
    env.pop("DOCKER_CONTEXT", None)
    env.update(extra or {})
    return env


class Dockerd:
    """One private ``dockerd`` process.  Attributes (valid once started):

    * ``root``: the temporary directory holding everything;
    * ``socket``: the Engine API's unix socket path (str); ``url``: ``unix://<socket>``;
    * ``containerd_socket``: dockerd's containerd (``ctr -a`` / containerd clients);
    * ``config_path`` (daemon.json), ``log_path``, ``pid``.

    ``cmd_prefix`` runs dockerd (and so its containerd) as ``cmd_prefix + [dockerd, ...]``,
    e.g. inside a network namespace with ``nsenter --net=/run/netns/NAME`` (not ``ip netns
    exec``: it remounts ``/sys`` and dockerd then finds no cgroups).  The prefix must exec
    dockerd (so that ``pid`` is dockerd's); the socket is a file, reachable from anywhere.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        cmd_prefix: Sequence[str] = (),
    ) -> None:
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cmd_prefix = list(cmd_prefix)
        self.root = Path(tempfile.mkdtemp(prefix="p2pd-", dir="/tmp"))
        self.socket = str(self.root / "docker.sock")
        self.url = f"unix://{self.socket}"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.containerd_socket = str(self.exec_root / "containerd" / "containerd.sock")
        self.config_path = self.root / "daemon.json"
        self.log_path = self.root / "dockerd.log"
        self.pid_path = self.root / "dockerd.pid"
        self.cli_config = self.root / "cli"  # DOCKER_CONFIG for the docker CLI
        self._proc: subprocess.Popen[bytes] | None = None
        self._containerd_pid: int | None = None

    # -- life cycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, *, mirrors: Sequence[str] = (), **kw: Any) -> Dockerd:
        """A started dockerd (stopped again, and its directory removed, if start-up fails)."""
        d = cls(**kw)
        try:
            d._start(mirrors)
        except BaseException:
            d.stop()
            raise
        return d

    def _start(self, mirrors: Sequence[str]) -> None:
        if len(self.containerd_socket) + len(".ttrpc") >= 108:
            raise DockerdError(f"{self.root} is too long a path for unix sockets")
        self.data_root.mkdir()
        self.exec_root.mkdir()
        self.cli_config.mkdir()
        self._write_config({"registry-mirrors": list(mirrors)})
        argv = [
            *self.cmd_prefix,
            "dockerd",
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pid_path),
            "--config-file",
            str(self.config_path),
            "-H",
            self.url,
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,  # a Ctrl-C in pytest does not reach it first
            )
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer"
        with self._client(timeout=2.0) as client:
            while True:
                if self._proc.poll() is not None:
                    raise DockerdError(
                        f"dockerd exited with status {self._proc.returncode} during start-up;"
                        f" its log:\n{self.log_tail()}"
                    )
                try:
                    r = client.get("/_ping")
                    if r.status_code == 200 and r.text == "OK":
                        break
                    last_error = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    last_error = repr(exc)
                if time.monotonic() > deadline:
                    raise DockerdError(
                        f"dockerd did not answer GET /_ping on {self.socket} within "
                        f"{self.startup_timeout:.0f} s ({last_error}); its log:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.1)
        self._containerd_pid = self._read_containerd_pid()
        while not os.path.exists(self.containerd_socket):
            if time.monotonic() > deadline:
                raise DockerdError(f"no containerd socket at {self.containerd_socket}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (SIGKILL after ``stop_timeout``), then make sure containerd and shims
        are gone, unmount leftovers, and remove the directory.  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # dockerd would give each running container its stop timeout (10 s) first.
            self._kill_containers()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        containerd = self._containerd_pid or self._read_containerd_pid()
        self._containerd_pid = None
        # dockerd's containerd names this directory in its command line (--config
        # exec/containerd/containerd.toml), as do shims; the pid file is a second opinion,
        # believed only while that pid still runs something of this directory.
        pids = set(self._our_processes())
        if containerd is not None and str(self.root) in " ".join(_cmdline(containerd)):
            pids.add(containerd)
        _end_processes(pids, grace=5.0)
        self._unmount_all()
        if self.root.exists():
            shutil.rmtree(self.root, onerror=_rmtree_retry)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- configuration --------------------------------------------------------------------

    def set_mirrors(self, mirrors: Sequence[str], *, timeout: float = 10.0) -> None:
        """Rewrite ``registry-mirrors`` in daemon.json, SIGHUP dockerd (it reloads them
        live), and wait until ``GET /info`` lists exactly these mirrors."""
        config = self._read_config()
        config["registry-mirrors"] = list(mirrors)
        self._write_config(config)
        if self._proc is None or self._proc.poll() is not None:
            raise DockerdError(f"dockerd is not running; its log:\n{self.log_tail()}")
        self._proc.send_signal(signal.SIGHUP)
        want = [m.rstrip("/") for m in mirrors]
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            seen = [m.rstrip("/") for m in self.info()["RegistryConfig"]["Mirrors"] or []]
            if seen == want:
                return
            if time.monotonic() > deadline:
                raise DockerdError(
                    f"dockerd did not take registry-mirrors {want} within {timeout:.0f} s "
                    f"(GET /info says {seen}); its log:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def mirrors(self) -> list[str]:
        """The registry mirrors dockerd uses now (``GET /info``, without trailing ``/``)."""
        return [m.rstrip("/") for m in self.info()["RegistryConfig"]["Mirrors"] or []]

    def _read_config(self) -> dict[str, Any]:
        loaded = json.loads(self.config_path.read_text())
        assert isinstance(loaded, dict)
        return loaded

    def _write_config(self, config: Mapping[str, Any]) -> None:
        tmp = self.config_path.with_name(".daemon.json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, self.config_path)

    # -- talking to it --------------------------------------------------------------------

    def _client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://docker",
            timeout=timeout,
            trust_env=False,
        )

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One Engine API request on the unix socket (``path`` like ``/images/json``)."""
        with self._client() as client:
            return client.request(method, path, **kw)

    def info(self) -> dict[str, Any]:
        r = self.api("GET", "/info")
        r.raise_for_status()
        info: dict[str, Any] = r.json()
        return info

    def docker_argv(self, *args: str) -> list[str]:
        return ["docker", "-H", self.url, *args]

    def ctr_argv(self, *args: str, namespace: str = "p2pdist-test") -> list[str]:
        return ["ctr", "-a", self.containerd_socket, "-n", namespace, *args]

    @property
    def cli_env(self) -> dict[str, str]:
        """The environment for ``docker``/``ctr`` (no proxy variables, private config)."""
        return _clean_env({"DOCKER_CONFIG": str(self.cli_config)})

    def docker(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this dockerd (output captured as text)."""
        return self._run(self.docker_argv(*args), timeout, check)

    def ctr(
        self, *args: str, namespace: str = "p2pdist-test", timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against dockerd's containerd, in ``namespace``."""
        return self._run(self.ctr_argv(*args, namespace=namespace), timeout, check)

    def _run(
        self, argv: list[str], timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cli_env,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise DockerdError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\ndockerd log:\n{self.log_tail()}"
            )
        return result

    def log_tail(self, max_bytes: int = 6000) -> str:
        """The last ``max_bytes`` of dockerd's (and its containerd's) output."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    # -- clean-up helpers -----------------------------------------------------------------

    def _kill_containers(self) -> None:
        """SIGKILL every running container (best effort, a few seconds at most)."""
        try:
            with self._client(timeout=5.0) as client:
                running = client.get("/containers/json").json()
                for c in running:
                    client.post(f"/containers/{c['Id']}/kill")
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            pass

    def _read_containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _our_processes(self) -> Iterator[int]:
        """Processes whose command line names this directory (dockerd's containerd, shims,
        or a dockerd that outlived its Popen)."""
        me = os.getpid()
        marker = str(self.root) + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            argv = _cmdline(int(entry))
            if any(marker in arg for arg in argv):
                yield int(entry)

    def _unmount_all(self) -> None:
        """Lazily unmount anything still mounted under the directory (deepest first)."""
        marker = str(self.root) + "/"
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        points = []
        for line in lines:
            fields = line.split()
            if len(fields) > 4:
                point = fields[4].replace("\\040", " ")
                if point.startswith(marker):
                    points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _end_processes(pids: set[int], grace: float) -> None:
    """SIGTERM each, SIGKILL those still alive after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (not a zombie, not gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _rmtree_retry(func: Any, path: str, _exc: Any) -> None:
    """rmtree's error hook: make the entry (and its parent) writable and try again once
    (vfs layers can hold read-only directories); give up quietly on what still fails."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            func(path)
