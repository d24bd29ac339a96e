"""``make demo``: one scheduler and N daemons on loopback, and a generated image spread
through them, every byte verified.

Two sources, picked automatically (``--source auto``):

* ``registry`` (Debian's ``docker-registry`` is installed): the image is pushed to a real
  registry and every node fetches every blob at once with ``p2pdist get --daemon``; the
  registry should send each byte about once (:mod:`bench.swarmbench`).
* ``archive`` (no registry: the demo needs only Python): the image is written as a
  ``docker save`` archive and seeded into node 0 with ``p2pdist import``; node 0's daemon
  then answers the registry API for it, and every other node runs ``p2pdist pull
  <node0>/demo/app:latest --daemon <its daemon> --output DIR`` at the same moment — the
  layers spread through the swarm, from node 0 and from each other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pdist.config import parse_size

from .cluster import PYTHON, Cluster, http_json, wait_until
from .image import docker_save_tar, make_image
from .swarmbench import run_swarm
from .tools import ensure_registry_installed

__all__ = ["run_demo", "run_seed_demo"]

MIB = 2**20


def run_demo(*, size: str, layers: int, nodes: int, out: str, source: str = "auto") -> int:
    if source == "auto":
        source = "registry" if shutil.which("docker-registry") else "archive"
    if source == "archive":
        run_seed_demo(size=parse_size(size), layers=layers, nodes=nodes, out=Path(out))
        return 0
    if not ensure_registry_installed():
        return 2
    run_swarm(
        nodes=nodes,
        size=parse_size(size),
        layers=layers,
        layer_format="gzip",
        piece_size="1MiB",
        out=Path(out),
    )
    return 0


def _run(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"demo: {what} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout + done.stderr


def run_seed_demo(*, size: int, layers: int, nodes: int, out: Path) -> dict[str, Any]:
    if nodes < 2:
        raise SystemExit("demo: the archive demo needs at least 2 nodes")
    print(f"demo: generating a {layers}-layer image of {size / MIB:.0f} MiB", flush=True)
    image = make_image(size=size, layers=layers, layer_format="gzip", seed=7)
    blobs = image.blobs()
    image_bytes = sum(len(b) for b in blobs.values())
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="p2pdist-demo-") as tmp,
        Cluster(Path(tmp), daemons=nodes, piece_size="1MiB", log_level="warning") as cluster,
    ):
        archive = Path(tmp) / "demo-app.tar"
        archive.write_bytes(docker_save_tar(image, "demo/app:latest"))
        seed = cluster.daemons[0]
        print(f"demo: scheduler {cluster.scheduler_url}, {nodes} daemons; no registry", flush=True)
        print(f"demo: p2pdist import {archive.name} into node0 (every blob verified)")
        text = _run(
            [PYTHON, "-m", "p2pdist", "import", str(archive), "--data-dir", str(seed.data_dir)],
            "p2pdist import",
        )
        for line in text.strip().splitlines():
            print(f"  {line}")
        # node0 announces what appeared in its store at its next heartbeat
        wait_until(
            lambda: http_json(f"{cluster.scheduler_url}/api/v1/stats")["tasks"] >= len(blobs),
            timeout=30,
            what="node0's announcement of the imported blobs",
        )
        name = f"{seed.api_url.removeprefix('http://')}/demo/app:latest"
        print(f"demo: nodes 1-{nodes - 1} pull {name} through their daemons at once")
        started = time.perf_counter()
        procs = []
        for i, d in enumerate(cluster.daemons[1:], start=1):
            layout = out / f"node{i}"
            shutil.rmtree(layout, ignore_errors=True)
            argv = [PYTHON, "-m", "p2pdist", "pull", name, "--daemon", d.api_url]
            argv += ["--output", str(layout), "--no-progress"]
            procs.append(subprocess.Popen(argv, stderr=subprocess.PIPE, text=True))
        for i, p in enumerate(procs, start=1):
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"demo: pull on node{i} failed: {err.strip()}")
        seconds = time.perf_counter() - started
        per_node = []
        for i in range(1, nodes):
            layout_blobs = out / f"node{i}" / "blobs" / "sha256"
            for digest in blobs:
                hexd = digest.removeprefix("sha256:")
                got = hashlib.sha256((layout_blobs / hexd).read_bytes()).hexdigest()
                if got != hexd:
                    raise SystemExit(f"demo: node{i}'s copy of {digest} is corrupt")
            totals = {"from_source": 0, "from_peers": 0}
            for digest in blobs:
                st = cluster.stats(i, digest)
                for key in totals:
                    totals[key] += int(st[key])
            per_node.append({"node": i, **totals})
    for row in per_node:
        layout = out / f"node{row['node']}"
        print(
            f"  node{row['node']}: {row['from_peers'] / MIB:6.1f} MiB from peers, "
            f"{row['from_source'] / MIB:6.1f} MiB from node0's registry API; "
            f"OCI layout in {layout}"
        )
    result = {
        "source": "archive",
        "nodes": nodes,
        "image_bytes": image_bytes,
        "seconds": round(seconds, 3),
        "per_node": per_node,
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"demo: {nodes - 1} nodes pulled the {image_bytes / MIB:.1f} MiB image in {seconds:.2f}s, "
        "every blob verified; no registry involved"
    )
    return result
