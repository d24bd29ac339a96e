"""``python -m bench memory``: how much memory a daemon holds while it downloads a large
blob and serves it to its peers (issue 6: RSS <= 128 MiB for 1 GiB and 8 peers).

A real ``docker-registry``, a scheduler and 9 daemons (separate processes, on loopback).
A blob of ``--size`` bytes is pushed to the registry; then node 0 starts ``p2pdist get
--daemon`` of it and, a moment later, the 8 other nodes do too: node 0 fetches from the
registry what the scheduler leases it and serves the pieces it holds to the others while
it still downloads, as every node does.  Every daemon's resident set (``VmRSS`` in
``/proc/<pid>/status``) is sampled every ``--interval`` seconds from before the first
request until the last copy is verified; the kernel's own high-water mark (``VmHWM``) is
read at the end as a check on the sampling.  Reported: node 0's peak, the peak over all
daemons, each node's idle RSS and where its bytes came from; ``result.json`` holds it all
(and the samples).  ``--content text`` makes the blob compressible, so that pieces travel
zstd-compressed (the peer server's compression cache then holds frames).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .cluster import Cluster, DaemonProc
from .localregistry import LocalRegistry

__all__ = ["MemoryResult", "read_rss", "run_memory"]

MIB = 1 << 20
LIMIT = 128 * MIB
CHUNK = 4 * MIB
REPO = "bench/memory"


def _chunks(size: int, seed: int, content: str) -> Iterator[bytes]:
    """The blob, ``CHUNK`` at a time, the same every time for the same arguments."""
    rnd = random.Random(f"p2pdist-memory:{seed}")
    left = size
    while left > 0:
        n = min(CHUNK, left)
        if content == "text":  # hex of random bytes: zstd saves about half
            data = rnd.randbytes((n + 1) // 2).hex().encode()[:n]
        else:
            data = rnd.randbytes(n)
        left -= n
        yield data


def _push_streaming(registry_url: str, size: int, seed: int, content: str) -> str:
    """Upload the blob without holding it in memory: one pass for the digest, one for the
    monolithic ``PUT``."""
    h = hashlib.sha256()
    for chunk in _chunks(size, seed, content):
        h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    with httpx.Client(base_url=registry_url, timeout=600, trust_env=False) as c:
        if c.head(f"/v2/{REPO}/blobs/{digest}").status_code == 200:
            return digest
        start = c.post(f"/v2/{REPO}/blobs/uploads/", headers={"Content-Length": "0"})
        if start.status_code != 202 or "location" not in start.headers:
            raise RuntimeError(f"upload start: HTTP {start.status_code}: {start.text[:200]}")
        url = c.base_url.join(start.headers["location"]).copy_merge_params({"digest": digest})
        put = c.put(
            url,
            content=_chunks(size, seed, content),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        if put.status_code != 201:
            raise RuntimeError(f"upload: HTTP {put.status_code}: {put.text[:200]}")
    return digest


def read_rss(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process in bytes (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class _Sampler:
    """Samples every daemon's RSS in a thread until stopped."""

    pids: list[int]
    interval: float
    started: float = field(default_factory=time.monotonic)
    samples: list[list[tuple[float, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.samples = [[] for _ in self.pids]
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.started
            for i, pid in enumerate(self.pids):
                self.samples[i].append((now, read_rss(pid)[0]))
            self._stop.wait(self.interval)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, i: int) -> int:
        return max((rss for _, rss in self.samples[i]), default=0)


@dataclass
class MemoryResult:
    size: int
    nodes: int
    content: str
    piece_size: str | None
    seconds: float
    per_node: list[dict[str, Any]]
    samples: list[list[tuple[float, int]]]

    @property
    def node0_peak(self) -> int:
        return int(self.per_node[0]["peak_rss"])

    @property
    def max_peak(self) -> int:
        return max(int(n["peak_rss"]) for n in self.per_node)

    @property
    def max_hwm(self) -> int:
        return max(int(n["vm_hwm"]) for n in self.per_node)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "nodes": self.nodes,
            "content": self.content,
            "piece_size": self.piece_size,
            "seconds": round(self.seconds, 2),
            "limit_bytes": LIMIT,
            "node0_peak_rss": self.node0_peak,
            "max_peak_rss": self.max_peak,
            "max_vm_hwm": self.max_hwm,
            "within_limit": self.max_hwm <= LIMIT,
            "per_node": self.per_node,
            # one sample a second is plenty for a chart
            "samples": [
                [(round(t, 2), rss) for k, (t, rss) in enumerate(series) if k % 10 == 0]
                for series in self.samples
            ],
        }


def _start_get(d: DaemonProc, target: str, log: Path) -> subprocess.Popen[bytes]:
    """``p2pdist get --daemon`` to stdout, thrown away (no 1 GiB file per node)."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pdist",
                "get",
                target,
                "-O",
                "-",
                "--daemon",
                d.api_url,
                "--no-progress",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def run_memory(
    *,
    size: int,
    nodes: int = 9,
    piece_size: str | None = None,
    content: str = "random",
    interval: float = 0.1,
    out: Path,
    say: bool = True,
    daemon_args: Sequence[str] = (),
) -> MemoryResult:
    def echo(text: str) -> None:
        if say:
            print(text, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with (
        LocalRegistry() as reg,
        tempfile.TemporaryDirectory(prefix="p2pdist-memory-") as tmp,
    ):
        echo(f"memory: pushing a {size / MIB:.0f} MiB {content} blob to {reg.url}")
        digest = _push_streaming(reg.url, size, seed=1, content=content)
        with Cluster(
            Path(tmp),
            daemons=nodes,
            piece_size=piece_size,
            log_level="warning",
            daemon_args=daemon_args,
        ) as cluster:
            pids = [d.pid for d in cluster.daemons]
            assert all(pid is not None for pid in pids)
            idle = [read_rss(pid)[0] for pid in pids if pid is not None]
            echo(
                f"memory: {nodes} daemons up, idle RSS {min(idle) / MIB:.0f}-"
                f"{max(idle) / MIB:.0f} MiB; node 0 starts, then {nodes - 1} peers"
            )
            target = f"{reg.host}/{REPO}@{digest}"
            logs = Path(tmp)
            with _Sampler([p for p in pids if p is not None], interval) as sampler:
                started = time.monotonic()
                gets = [_start_get(cluster.daemons[0], target, logs / "get0.log")]
                time.sleep(1.0)
                gets += [
                    _start_get(d, target, logs / f"get{i}.log")
                    for i, d in enumerate(cluster.daemons[1:], start=1)
                ]
                codes = [g.wait(1800) for g in gets]
                seconds = time.monotonic() - started
                time.sleep(0.5)  # a last sample or five after the end
            if any(codes):
                tails = "\n".join(
                    (logs / f"get{i}.log").read_text(errors="replace")[-500:]
                    for i, c in enumerate(codes)
                    if c
                )
                raise SystemExit(f"memory: a get failed: exit codes {codes}\n{tails}")
            per_node = []
            for i, d in enumerate(cluster.daemons):
                assert d.pid is not None
                st = cluster.stats(i, digest)
                per_node.append(
                    {
                        "node": i,
                        "idle_rss": idle[i],
                        "peak_rss": sampler.peak(i),
                        "vm_hwm": read_rss(d.pid)[1],
                        "from_source": int(st["from_source"]),
                        "from_peers": int(st["from_peers"]),
                        "peer_wire": int(st["peer_wire"]),
                    }
                )
    result = MemoryResult(size, nodes, content, piece_size, seconds, per_node, sampler.samples)
    (out / "result.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    for row in per_node:
        echo(
            f"  node{row['node']}: idle {row['idle_rss'] / MIB:5.1f} MiB, peak "
            f"{row['peak_rss'] / MIB:5.1f} MiB (VmHWM {row['vm_hwm'] / MIB:5.1f}); "
            f"{row['from_source'] / MIB:6.0f} MiB from the registry, "
            f"{row['from_peers'] / MIB:6.0f} MiB from peers"
        )
    verdict = "within" if result.max_hwm <= LIMIT else "OVER"
    echo(
        f"memory: {size / MIB:.0f} MiB to {nodes} nodes in {seconds:.1f}s; node 0 peak RSS "
        f"{result.node0_peak / MIB:.1f} MiB, max over all daemons {result.max_peak / MIB:.1f} MiB "
        f"(VmHWM {result.max_hwm / MIB:.1f} MiB): {verdict} the {LIMIT // MIB} MiB bound; "
        f"{out / 'result.json'}"
    )
    return result
