"""The container image, built and run with a real dockerd.

No base image can be pulled here, so the base is made (``debootstrap`` of a minimal
Debian bookworm with python3 and python3-venv, ``docker import``) and the repo's
``Dockerfile`` is built on it offline (:mod:`tests.imagebuild`).  Then a scheduler
container and a daemon container run from the image in the host's network namespace on
loopback ports (the private dockerd has no bridge), the daemon with the memory and CPU
limits of the Kubernetes DaemonSet, a read-only root filesystem and the cluster token from
a file, as in ``deploy/kubernetes``; a real ``docker-registry`` is the upstream.  Both
containers must turn ``healthy`` (the image's ``HEALTHCHECK``), answer ``/readyz``, and a
``p2pdist get --daemon`` of a blob through them must arrive byte-exact, the scheduler
having seen the daemon and the task.

Environment knobs, for measuring (README, "Container image and Kubernetes"):

* ``P2PDIST_IMAGE_TEST_BLOB`` — the blob's size (default 16MiB);
* ``P2PDIST_IMAGE_TEST_LIMITS=off`` — run the daemon without the DaemonSet's limits;
* ``P2PDIST_IMAGE_TEST_REPORT=FILE`` — write what was measured (build times, the
  daemon's peak RSS, its cgroup's peak memory and CPU) to FILE as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.image import push_blob
from bench.localregistry import LocalRegistry, free_port
from p2pdist.config import parse_size
from tests.helpers import requires_registry
from tests.imagebuild import DEBOOTSTRAP_MISSING_REASON, BuildTimes, build_image
from tests.runtimes import DOCKER_CLI_MISSING_REASON, Dockerd

yaml = pytest.importorskip(
    "yaml", reason="PyYAML comes with the test extra: pip install -e .[test]"
)

pytestmark = [pytest.mark.integration, requires_registry]

REPO = Path(__file__).resolve().parent.parent
TAG = "p2pdist:test"
BLOB_SIZE = parse_size(os.environ.get("P2PDIST_IMAGE_TEST_BLOB", "16MiB"))
LIMITS = os.environ.get("P2PDIST_IMAGE_TEST_LIMITS", "on") != "off"
REPORT = os.environ.get("P2PDIST_IMAGE_TEST_REPORT")
MEASURED: dict[str, Any] = {}


def _daemon_limits() -> tuple[int, float | None]:
    """The DaemonSet's memory limit (bytes) and CPU limit (cores; None: unlimited)."""
    docs = yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    (ds,) = [d for d in docs if d and d["kind"] == "DaemonSet"]
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "daemon"]
    limits = c["resources"]["limits"]
    cpu = limits.get("cpu")
    cores = None if cpu is None else float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return _quantity(limits["memory"]), cores


def _quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 1000**2, "G": 1000**3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


@pytest.fixture(scope="module")
def image(dockerd: Dockerd) -> Iterator[str]:
    if shutil.which("debootstrap") is None:
        pytest.skip(DEBOOTSTRAP_MISSING_REASON)
    if shutil.which("docker") is None:
        pytest.skip(DOCKER_CLI_MISSING_REASON)
    times: BuildTimes = build_image(dockerd, TAG)
    MEASURED["build_seconds"] = asdict(times)
    yield TAG
    if REPORT:
        Path(REPORT).write_text(json.dumps(MEASURED, indent=2) + "\n")
    dockerd.docker("rmi", "--force", TAG, check=False)


def _inspect(d: Dockerd, what: str, name: str) -> Any:
    out = d.docker(what, "inspect", name).stdout
    return json.loads(out)[0]


def test_image_is_small_runs_as_non_root_and_declares_its_health(
    dockerd: Dockerd, image: str
) -> None:
    info = _inspect(dockerd, "image", image)
    base = _inspect(dockerd, "image", "p2pdist-base:test")
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["p2pdist"] and config["Cmd"] == ["daemon"]
    assert config["Healthcheck"]["Test"] == ["CMD", "p2pdist", "health"]
    assert set(config["ExposedPorts"]) == {"65001/tcp", "65002/tcp", "65003/tcp", "65004/tcp"}
    # What p2pdist adds to the base (its venv and the user): small.
    added = info["Size"] - base["Size"]
    MEASURED["image_bytes"] = info["Size"]
    MEASURED["added_to_base_bytes"] = added
    assert added < 40 << 20, f"the image adds {added / 2**20:.1f} MiB to its base"
    # Its user, and no pip or build context left in it (one container: each costs a copy
    # of the image's files on the vfs driver).
    probe = dockerd.docker(
        "run",
        "--rm",
        "--entrypoint",
        "python3",
        image,
        "-c",
        "import importlib.util as u, os, pwd; "
        "print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name, "
        "u.find_spec('pip') is None, os.path.exists('/src'))",
    ).stdout
    assert probe.split() == ["10001", "10001", "p2pdist", "True", "False"]


class _CgroupSampler:
    """Samples a container's cgroup (v1 or v2) every 100 ms: peak memory and the busiest
    second of CPU."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, int]] = []  # (time, cpu seconds, memory bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.memory_file, self.cpu_file, self.cpu_scale = self._files()

    def _files(self) -> tuple[Path | None, Path | None, float]:
        paths: dict[str, str] = {}
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                paths[c] = path
        root = Path("/sys/fs/cgroup")
        if "memory" in paths:  # v1
            mem = root / "memory" / paths["memory"].lstrip("/") / "memory.usage_in_bytes"
            cpu = root / "cpuacct" / paths["cpuacct"].lstrip("/") / "cpuacct.usage"
            return mem, cpu, 1e-9
        unified = root / paths.get("", "/").lstrip("/")
        return unified / "memory.current", unified / "cpu.stat", 1e-6

    def _read(self) -> tuple[float, int]:
        assert self.cpu_file is not None and self.memory_file is not None
        text = self.cpu_file.read_text()
        if self.cpu_file.name == "cpu.stat":
            usage = next(int(line.split()[1]) for line in text.splitlines() if "usage_usec" in line)
        else:
            usage = int(text)
        return usage * self.cpu_scale, int(self.memory_file.read_text())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                cpu, mem = self._read()
            except (OSError, ValueError, StopIteration):
                return
            self.samples.append((time.monotonic(), cpu, mem))
            self._stop.wait(0.1)

    def __enter__(self) -> _CgroupSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, float]:
        s = self.samples
        if len(s) < 2:
            return {}
        busiest = 0.0
        j = 0
        for i in range(len(s)):
            while s[i][0] - s[j][0] > 1.0:
                j += 1
            if s[i][0] - s[j][0] >= 0.5:
                busiest = max(busiest, (s[i][1] - s[j][1]) / (s[i][0] - s[j][0]))
        return {
            "cgroup_peak_memory_bytes": max(m for _, _, m in s),
            "cpu_seconds": s[-1][1] - s[0][1],
            "wall_seconds": s[-1][0] - s[0][0],
            "busiest_second_cores": busiest,
        }


def _wait_healthy(d: Dockerd, name: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = _inspect(d, "container", name)["State"]
        if not state["Running"]:
            break
        if state.get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(0.5)
    logs = d.docker("logs", name, check=False)
    raise AssertionError(
        f"container {name} not healthy: {json.dumps(state.get('Health'))[:1500]}\n"
        f"running={state.get('Running')} exit={state.get('ExitCode')}\n"
        f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
    )


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_scheduler_and_daemon_containers_serve_a_blob_byte_exact(
    dockerd: Dockerd, image: str, registry: LocalRegistry, tmp_path: Path
) -> None:
    blob = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, "test/deploy", blob)
    sched_port, peer_port, api_port, proxy_port = (free_port() for _ in range(4))
    token = secrets.token_hex(32)
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text(token + "\n")
    os.chmod(token_dir / "token", 0o444)
    suffix = secrets.token_hex(4)
    sched, daemon = f"p2pdist-sched-{suffix}", f"p2pdist-daemon-{suffix}"
    common = [
        "--detach",
        "--network",
        "host",
        "--read-only",
        "--volume",
        f"{token_dir}:/etc/p2pdist/token:ro",
        "--env",
        "P2PDIST_CLUSTER_TOKEN_FILE=/etc/p2pdist/token/token",
        "--health-interval",
        "1s",
        "--health-start-period",
        "30s",
    ]
    memory, cpus = _daemon_limits()
    limits = ["--memory", str(memory), "--memory-swap", str(memory)] if LIMITS else []
    if LIMITS and cpus is not None:
        limits += ["--cpus", str(cpus)]
    MEASURED.update(
        blob_bytes=BLOB_SIZE, limits={"memory": memory, "cpus": cpus} if LIMITS else None
    )
    try:
        dockerd.docker(
            "run",
            "--name",
            sched,
            *common,
            "--health-cmd",
            f"p2pdist health --url http://127.0.0.1:{sched_port}/healthz",
            image,
            "scheduler",
            "--listen",
            f"127.0.0.1:{sched_port}",
        )
        dockerd.docker(
            "run",
            "--name",
            daemon,
            *common,
            *limits,
            # Settings by environment, so that the image's own HEALTHCHECK (`p2pdist
            # health`, reading the same environment) finds the local API.
            "--env",
            f"P2PDIST_SCHEDULERS=http://127.0.0.1:{sched_port}",
            "--env",
            f"P2PDIST_PEER_LISTEN=127.0.0.1:{peer_port}",
            "--env",
            f"P2PDIST_API_LISTEN=127.0.0.1:{api_port}",
            "--env",
            f"P2PDIST_PROXY_LISTEN=127.0.0.1:{proxy_port}",
            "--env",
            "P2PDIST_ADVERTISE=127.0.0.1",
            "--env",
            f"P2PDIST_HOST_ID=container-{suffix}",
            image,
        )
        _wait_healthy(dockerd, sched)
        _wait_healthy(dockerd, daemon)
        with httpx.Client(trust_env=False, timeout=10) as client:
            for url in (
                f"http://127.0.0.1:{sched_port}/readyz",
                f"http://127.0.0.1:{api_port}/readyz",
                f"http://127.0.0.1:{peer_port}/readyz",
            ):
                assert client.get(url).status_code == 200, url
            # The cluster token is in force: the scheduler refuses an event without it.
            r = client.post(f"http://127.0.0.1:{sched_port}/api/v1/events", json={})
            assert r.status_code == 401
        pid = _inspect(dockerd, "container", daemon)["State"]["Pid"]
        out = tmp_path / "blob"
        with _CgroupSampler(pid) as sampler:
            get = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "p2pdist",
                    "get",
                    "--daemon",
                    f"http://127.0.0.1:{api_port}",
                    f"{registry.host}/test/deploy@{digest}",
                    "-O",
                    str(out),
                    "--no-progress",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
                check=False,
            )
        logs = dockerd.docker("logs", daemon, check=False)
        assert get.returncode == 0, f"{get.stderr}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
        MEASURED.update(
            sampler.summary(),
            daemon_peak_rss_bytes=_vm_hwm(pid),
            scheduler_peak_rss_bytes=_vm_hwm(_inspect(dockerd, "container", sched)["State"]["Pid"]),
        )
        state = _inspect(dockerd, "container", daemon)["State"]
        assert state["Running"] and not state["OOMKilled"]
        if LIMITS:
            assert MEASURED["daemon_peak_rss_bytes"] < memory
        # Through the swarm: the scheduler saw the daemon and the task.
        with httpx.Client(trust_env=False, timeout=10) as client:
            stats = client.get(f"http://127.0.0.1:{sched_port}/api/v1/stats").json()
        assert stats["hosts"] >= 1 and stats["tasks"] >= 1, stats
        # Secrets never reach the logs; nothing crashed.
        for name in (sched, daemon):
            logs = dockerd.docker("logs", name, check=False)
            text = logs.stdout + logs.stderr
            assert token not in text and "traceback" not in text.lower()
        # PID 1 in each container is p2pdist itself, and it leaves on SIGTERM (what
        # `docker stop` and Kubernetes send) with status 0, not at the SIGKILL after it.
        for name in (daemon, sched):
            dockerd.docker("stop", "--time", "30", name, timeout=90)
            state = _inspect(dockerd, "container", name)["State"]
            assert (state["Running"], state["ExitCode"], state["OOMKilled"]) == (False, 0, False)
        print(f"\nmeasured: {json.dumps(MEASURED)}")
    finally:
        dockerd.docker("rm", "--force", "--volumes", sched, daemon, check=False)
