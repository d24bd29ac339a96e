"""``python -m bench docker-pull``: ``docker pull`` through the node's p2pdist registry proxy,
side by side with ``docker pull`` straight from the registry, in one run.

One private dockerd (:class:`bench.dockerd.Dockerd`), one loopback ``docker-registry``, one
scheduler and two node daemons A and B (``--upstream`` = the registry; each daemon's local
API serves the registry API, which is what dockerd's ``registry-mirrors`` points at).  Each
round pushes a fresh image (its own seed, so nothing is cached anywhere) as
``library/bench<r>:v1``, warms node A with it (untimed: through A's ``/v2/`` API, so A
fetches it from the registry into its store), then times three conditions, in an order that
rotates from round to round:

* **direct** — no mirrors; ``docker pull 127.0.0.1:<port>/library/bench<r>:v1`` (dockerd
  treats 127.0.0.0/8 registries as insecure: plain http);
* **local** — mirror = node A; ``docker pull bench<r>:v1`` (a Docker Hub name, so the mirror
  applies; with no internet the pull can only succeed through it).  The image is already in
  A's store;
* **peer** — mirror = node B, which has never seen this round's image; B fetches the blobs
  through the swarm, from A.

What each condition claims is checked, not assumed: before each pull dockerd holds no image
(``docker rmi`` + ``docker image prune`` after each), every layer is reported ``Pull
complete``, the pulled image's Id is the config digest; the registry's access log says who
fetched which blob bytes during each pull (direct: dockerd, all of them; local and peer:
nobody); A's download records do not change (local: served from A's store); B's
``/api/v1/blobs/<digest>/stats`` say where B got each blob (peer: ``from_peers`` = its size,
``from_source`` = 0).

Each condition also records when dockerd had each layer downloaded and extracted (from
``docker pull``'s own output, timestamped as it appears) and the CPU seconds that dockerd,
its containerd, the registry, both nodes and the scheduler spent during the pull: dockerd
extracts layers one after the other, starting when the first layer is downloaded, so that
moment is where a slower source shows.

Each timed pull starts after ``os.sync()`` and a pause (``--settle``): on this VM freed guest
pages go back to the host, and whatever runs right after a big delete otherwise looks faster.
Reports medians, the ratios median(local)/median(direct) and median(peer)/median(direct)
and the per-round ratios; writes ``docker-pull.json`` in ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from p2pdist.config import parse_size

from .cluster import Cluster, DaemonProc, http_json
from .dockerd import Dockerd
from .image import DOCKER_MANIFEST, make_image, push_image
from .localregistry import LocalRegistry
from .tools import ensure_registry_installed

__all__ = ["CONDITIONS", "GOALS", "run_docker_pull"]

CONDITIONS = ("direct", "local", "peer")
GOALS = {"local": 1.1, "peer": 1.3}
"""The goal for each condition's time ÷ the direct pull's (issue 4)."""

_PULL_TIMEOUT = 900.0
# docker-registry's access log (combined format): request line, status, bytes, referer, agent.
_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>/v2/\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r' "[^"]*" "(?P<agent>[^"]*)"'
)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _pid_running(marker: str) -> int | None:
    """The pid of a process whose command line mentions ``marker`` (ours: temp paths)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                return int(entry)
    return None


def refusal() -> str | None:
    """Why this benchmark cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return "bench docker-pull: needs root (it runs a private dockerd)"
    if shutil.which("dockerd") is None:
        return "bench docker-pull: dockerd not installed (apt-get install -y docker.io)"
    if shutil.which("docker") is None:
        return "bench docker-pull: the docker CLI is not installed (apt-get install -y docker.io)"
    return None


@dataclass
class _Blob:
    digest: str
    size: int
    layer: bool


@dataclass
class _Round:
    index: int
    seed: int
    repo: str
    config_digest: str
    blobs: list[_Blob]
    order: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def image_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    @property
    def layer_bytes(self) -> int:
        return sum(b.size for b in self.blobs if b.layer)

    @property
    def layer_ids(self) -> list[str]:
        """The short ids ``docker pull`` prints for the layers, in manifest order (the
        order dockerd extracts them in)."""
        return [b.digest.removeprefix("sha256:")[:12] for b in self.blobs if b.layer]


class _Bench:
    def __init__(
        self, reg: LocalRegistry, cluster: Cluster, dockerd: Dockerd, *, settle: float
    ) -> None:
        self.reg = reg
        self.cluster = cluster
        self.d = dockerd
        self.settle = settle
        self.problems: list[str] = []
        self.node_a, self.node_b = cluster.daemons[0], cluster.daemons[1]
        containerd = _pid_running(str(dockerd.exec_root / "containerd" / "containerd.toml"))
        self.pids = {
            "dockerd": dockerd.pid,
            "containerd": containerd,
            "registry": _pid_running(str(reg.config_path)),
            "node_a": self.node_a.pid,
            "node_b": self.node_b.pid,
            "scheduler": cluster.scheduler.pid,
        }

    def cpu(self) -> dict[str, float]:
        return {name: _cpu_seconds(pid) for name, pid in self.pids.items()}

    def problem(self, rnd: _Round, condition: str, text: str) -> None:
        line = f"round {rnd.index + 1} {condition}: {text}"
        self.problems.append(line)
        print(f"  ! {line}", flush=True)

    # -- the registry's access log ------------------------------------------------------

    def log_offset(self) -> int:
        return self.reg.log_path.stat().st_size

    def blob_traffic(self, since: int) -> dict[str, dict[str, int]]:
        """Blob bytes the registry sent since ``since`` (a log offset), by client
        (``docker`` or ``p2pdist``): ``{client: {"gets": n, "bytes": n}}``."""
        with open(self.reg.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out: dict[str, dict[str, int]] = {}
        for m in _ACCESS.finditer(text):
            if m["method"] != "GET" or "/blobs/" not in m["path"]:
                continue
            if m["status"] not in ("200", "206"):
                continue
            agent = m["agent"]
            who = "docker" if agent.startswith("docker/") else agent.split("/", 1)[0]
            entry = out.setdefault(who, {"gets": 0, "bytes": 0})
            entry["gets"] += 1
            entry["bytes"] += int(m["bytes"]) if m["bytes"].isdigit() else 0
        return out

    # -- nodes ----------------------------------------------------------------------------

    def node_stats(self, node: DaemonProc, blobs: list[_Blob]) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for b in blobs:
            try:
                out[b.digest] = http_json(f"{node.api_url}/api/v1/blobs/{b.digest}/stats")
            except OSError:  # 404: no download of it on record
                out[b.digest] = None
        return out

    def warm_a(self, rnd: _Round) -> None:
        """Node A fetches the image (manifest by tag, then each blob) from the registry,
        through its own ``/v2/`` API; untimed."""
        base = f"{self.node_a.api_url}/v2/{rnd.repo}"
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0), trust_env=False) as c:
            r = c.get(f"{base}/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
            r.raise_for_status()
            for b in rnd.blobs:
                got = 0
                with c.stream("GET", f"{base}/blobs/{b.digest}") as resp:
                    resp.raise_for_status()
                    for chunk in resp.iter_raw():
                        got += len(chunk)
                if got != b.size:
                    raise SystemExit(f"bench: warming node A: {b.digest}: {got} of {b.size} bytes")
        for b in rnd.blobs:
            # the stats answer once the download has finished (the blob's last byte
            # leaves as soon as its digest matched, a moment before it is in the store)
            http_json(f"{self.node_a.api_url}/api/v1/blobs/{b.digest}/stats", timeout=60)
            if not self.node_a.blob_file(b.digest).is_file():
                raise SystemExit(f"bench: warming node A: {b.digest} is not in A's store")

    # -- dockerd ----------------------------------------------------------------------------

    def images(self) -> list[str]:
        return self.d.docker("images", "-qa", "--no-trunc").stdout.split()

    def clean(self, rnd: _Round) -> None:
        self.d.docker("rmi", "-f", rnd.config_digest, check=False)
        self.d.docker("image", "prune", "-f")

    def timed_pull(self, ref: str) -> tuple[float, str, list[tuple[float, str]]]:
        """``docker pull ref``: wall-clock seconds, its output, and each output line with
        the second it appeared at."""
        os.sync()
        time.sleep(self.settle)
        lines: list[tuple[float, str]] = []
        started = time.perf_counter()
        with subprocess.Popen(
            self.d.docker_argv("pull", ref),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.d.cli_env,
        ) as proc:
            watchdog = threading.Timer(_PULL_TIMEOUT, proc.kill)
            watchdog.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append((time.perf_counter() - started, line.rstrip("\n")))
                returncode = proc.wait()
            finally:
                watchdog.cancel()
        seconds = time.perf_counter() - started
        output = "\n".join(line for _, line in lines)
        if returncode:
            raise SystemExit(
                f"bench: docker pull {ref} failed ({returncode}):\n{output}"
                f"\ndockerd log:\n{self.d.log_tail(3000)}"
            )
        return seconds, output, lines

    def run_condition(self, rnd: _Round, condition: str) -> None:
        if condition == "direct":
            mirrors, ref = [], f"{self.reg.host}/{rnd.repo}:v1"
        elif condition == "local":
            mirrors, ref = [self.node_a.api_url], f"bench{rnd.index}:v1"
        else:
            mirrors, ref = [self.node_b.api_url], f"bench{rnd.index}:v1"
        self.d.set_mirrors(mirrors)
        left = self.images()
        if left:
            self.problem(rnd, condition, f"dockerd still held images before the pull: {left}")
        a_before = self.node_stats(self.node_a, rnd.blobs)
        b_before = self.node_stats(self.node_b, rnd.blobs)
        offset = self.log_offset()
        cpu_before = self.cpu()
        seconds, output, lines = self.timed_pull(ref)
        cpu_after = self.cpu()
        rnd.seconds[condition] = seconds
        traffic = self.blob_traffic(offset)
        check: dict[str, Any] = {"ref": ref, "mirrors": mirrors, "registry_blob_traffic": traffic}
        rnd.checks[condition] = check
        check["cpu_seconds"] = {
            name: round(cpu_after[name] - cpu_before[name], 3) for name in cpu_after
        }
        # When dockerd had each layer (download complete, then extracted): the first
        # layer's download is what extraction waits for.
        timeline: dict[str, dict[str, float]] = {}
        for at, line in lines:
            short, _, event = line.partition(": ")
            if short in rnd.layer_ids and event in ("Download complete", "Pull complete"):
                key = "downloaded" if event == "Download complete" else "extracted"
                timeline.setdefault(short, {})[key] = round(at, 3)
        check["layers_timeline"] = [timeline.get(i, {}) for i in rnd.layer_ids]

        layers = sum(b.layer for b in rnd.blobs)
        complete = output.count(": Pull complete")
        cached = output.count(": Already exists")
        check["pull_complete_layers"] = complete
        if complete != layers or cached:
            self.problem(
                rnd, condition, f"{complete} of {layers} layers pulled, {cached} already there"
            )
        image_id = self.d.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
        check["image_id"] = image_id
        if image_id != rnd.config_digest:
            self.problem(rnd, condition, f"image Id {image_id} != config {rnd.config_digest}")

        by_docker = traffic.get("docker", {}).get("bytes", 0)
        total = sum(v["bytes"] for v in traffic.values())
        if condition == "direct":
            if by_docker != rnd.image_bytes:
                self.problem(
                    rnd,
                    condition,
                    f"dockerd got {by_docker} blob bytes from the registry, "
                    f"the image has {rnd.image_bytes}",
                )
        elif total:
            self.problem(rnd, condition, f"the registry sent {total} blob bytes: {traffic}")
        a_after = self.node_stats(self.node_a, rnd.blobs)
        if a_after != a_before:
            self.problem(rnd, condition, "node A downloaded something during the pull")
        if condition == "local":
            b_after = self.node_stats(self.node_b, rnd.blobs)
            if b_after != b_before:
                self.problem(rnd, condition, "node B downloaded something during the pull")
            # Nothing downloaded anywhere, the registry sent nothing, the only mirror was
            # A and there is no Docker Hub here: the blobs came from A's store.
        if condition == "peer":
            if any(v is not None for v in b_before.values()):
                self.problem(rnd, condition, "node B knew the image before the pull")
            stats = self.node_stats(self.node_b, rnd.blobs)
            check["node_b_stats"] = stats
            from_peers = sum((s or {}).get("from_peers", 0) for s in stats.values())
            from_source = sum((s or {}).get("from_source", 0) for s in stats.values())
            check["node_b_from_peers"] = from_peers
            check["node_b_from_source"] = from_source
            for b in rnd.blobs:
                s = stats[b.digest]
                if not b.layer:
                    continue
                if s is None or s["from_peers"] != b.size or s["from_source"] != 0:
                    self.problem(rnd, condition, f"layer {b.digest[:19]} on B: {s}")
        self.clean(rnd)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _first_layer_at(rnd: _Round, condition: str) -> float | None:
    """When dockerd had the first layer (in manifest order) downloaded, s into the pull."""
    timeline = rnd.checks[condition].get("layers_timeline") or [{}]
    at = timeline[0].get("downloaded")
    return float(at) if at is not None else None


def _table(rounds: list[_Round], summary: dict[str, Any]) -> str:
    head = (
        f"{'round':<7}{'order':<20}{'direct':>9}{'local':>9}{'peer':>9}"
        f"{'local/direct':>14}{'peer/direct':>13}   B: from peers / from registry"
    )
    lines = [head]
    for r in rounds:
        s = r.seconds
        peer = r.checks.get("peer", {})
        lines.append(
            f"{r.index + 1:<7}{','.join(r.order):<20}{s['direct']:>8.2f}s{s['local']:>8.2f}s"
            f"{s['peer']:>8.2f}s{s['local'] / s['direct']:>14.3f}{s['peer'] / s['direct']:>13.3f}"
            f"   {peer.get('node_b_from_peers', 0) / 1e6:.1f} MB / "
            f"{peer.get('node_b_from_source', 0) / 1e6:.1f} MB"
        )
    med = summary["median_seconds"]
    lines.append(
        f"{'median':<27}{med['direct']:>8.2f}s{med['local']:>8.2f}s{med['peer']:>8.2f}s"
        f"{summary['ratio_local_direct']:>14.3f}{summary['ratio_peer_direct']:>13.3f}"
    )
    lines.append(f"{'goal':<54}{'<= ' + str(GOALS['local']):>14}{'<= ' + str(GOALS['peer']):>13}")
    first = summary["median_first_layer_downloaded_s"]
    lines.append(
        "first layer downloaded at (median): "
        + ", ".join(f"{c} {first[c]:.2f}s" for c in CONDITIONS)
    )
    cpu = summary["median_cpu_seconds"]
    for c in CONDITIONS:
        lines.append(
            f"CPU seconds in a {c} pull (median): "
            + ", ".join(f"{name} {v:.2f}" for name, v in cpu[c].items())
        )
    return "\n".join(lines)


def run_docker_pull(
    *,
    size: str,
    layers: int,
    rounds: int,
    out: str,
    settle: float = 5.0,
    piece_size: str | None = None,
) -> int:
    reason = refusal()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    if not ensure_registry_installed():
        return 2
    if rounds < 1 or layers < 1:
        print("bench docker-pull: --rounds and --layers must be at least 1", file=sys.stderr)
        return 2
    nbytes = parse_size(size)
    done: list[_Round] = []
    with (
        tempfile.TemporaryDirectory(prefix="p2pdist-dockerpull-") as tmp,
        LocalRegistry(extra_config={"log": {"accesslog": {"disabled": False}}}) as reg,
        Cluster(
            Path(tmp),
            daemons=2,
            piece_size=piece_size,
            log_level="warning",
            daemon_args=["--upstream", reg.url],
        ) as cluster,
        Dockerd.start() as dockerd,
    ):
        bench = _Bench(reg, cluster, dockerd, settle=settle)
        insecure = dockerd.info()["RegistryConfig"].get("InsecureRegistryCIDRs")
        print(
            f"bench: registry {reg.url} (dockerd's insecure CIDRs: {insecure}), "
            f"node A {bench.node_a.api_url}, node B {bench.node_b.api_url}",
            flush=True,
        )
        for r in range(rounds):
            seed = 4100 + r
            print(
                f"round {r + 1}/{rounds}: generating a {nbytes / 2**20:.0f} MiB, "
                f"{layers}-layer image (seed {seed})",
                flush=True,
            )
            image = make_image(size=nbytes, layers=layers, layer_format="gzip", seed=seed)
            repo = f"library/bench{r}"
            push_image(reg.url, repo, "v1", image)
            blobs = [_Blob(image.config_digest, len(image.config), False)] + [
                _Blob(d, len(b), True)
                for d, b in zip(image.layer_digests, image.layers, strict=True)
            ]
            rot = r % len(CONDITIONS)
            rnd = _Round(
                index=r,
                seed=seed,
                repo=repo,
                config_digest=image.config_digest,
                blobs=blobs,
                order=[*CONDITIONS[rot:], *CONDITIONS[:rot]],
            )
            del image
            bench.warm_a(rnd)
            for condition in rnd.order:
                bench.run_condition(rnd, condition)
                print(f"  {condition:<7}{rnd.seconds[condition]:7.2f}s", flush=True)
            done.append(rnd)
        dockerd.set_mirrors([])

    med = {c: _median([r.seconds[c] for r in done]) for c in CONDITIONS}
    summary: dict[str, Any] = {
        "content_bytes": nbytes,
        "layers": layers,
        "rounds": rounds,
        "image_bytes_per_round": [r.image_bytes for r in done],
        "median_seconds": med,
        "median_mb_s": {c: done[0].image_bytes / med[c] / 1e6 for c in CONDITIONS},
        "ratio_local_direct": med["local"] / med["direct"],
        "ratio_peer_direct": med["peer"] / med["direct"],
        "goals": {"local_direct": GOALS["local"], "peer_direct": GOALS["peer"]},
        "per_round": [
            {
                "round": r.index + 1,
                "seed": r.seed,
                "order": r.order,
                "seconds": r.seconds,
                "ratio_local_direct": r.seconds["local"] / r.seconds["direct"],
                "ratio_peer_direct": r.seconds["peer"] / r.seconds["direct"],
                "node_b_from_peers": r.checks["peer"].get("node_b_from_peers"),
                "node_b_from_source": r.checks["peer"].get("node_b_from_source"),
                "checks": r.checks,
            }
            for r in done
        ],
        "median_first_layer_downloaded_s": {
            c: _median([t for r in done if (t := _first_layer_at(r, c)) is not None])
            for c in CONDITIONS
        },
        "median_cpu_seconds": {
            c: {
                name: _median([r.checks[c]["cpu_seconds"][name] for r in done])
                for name in bench.pids
            }
            for c in CONDITIONS
        },
        "problems": bench.problems,
        "piece_size": piece_size,
        "settle_seconds": settle,
        "cpus": os.cpu_count(),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "docker-pull.json").write_text(json.dumps(summary, indent=2) + "\n")
    image_mib = done[0].image_bytes / 2**20
    print(f"\ndocker pull, {image_mib:.0f} MiB image in {layers} layers, {rounds} rounds:")
    print(_table(done, summary))
    if bench.problems:
        print(f"bench: {len(bench.problems)} check(s) failed:", file=sys.stderr)
        for p in bench.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0
