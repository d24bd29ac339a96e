"""A rollout on one machine's loopback: a real registry, a scheduler and N daemons; every
node gets every blob of a generated image at the same moment through its daemon.

Reports, per node, the bytes that came from the registry and from peers (and, for the
latter, the bytes on the wire: smaller when zstd paid), and the registry's total ÷ the
image size — 1.0 means each byte left the registry once.  ``make demo`` runs this with 3
nodes; ``python -m bench swarm`` with the flags you give."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .cluster import Cluster
from .image import make_image, push_image
from .localregistry import LocalRegistry

__all__ = ["SwarmResult", "run_swarm"]


@dataclass
class SwarmResult:
    nodes: int
    image_bytes: int
    seconds: float
    registry_bytes: int
    per_node: list[dict[str, Any]]

    @property
    def registry_ratio(self) -> float:
        return self.registry_bytes / self.image_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "image_bytes": self.image_bytes,
            "seconds": round(self.seconds, 3),
            "registry_bytes": self.registry_bytes,
            "registry_ratio": round(self.registry_ratio, 4),
            "per_node": self.per_node,
        }


def run_swarm(
    *,
    nodes: int,
    size: int,
    layers: int,
    layer_format: str,
    piece_size: str,
    out: Path,
    say: bool = True,
) -> SwarmResult:
    def echo(text: str) -> None:
        if say:
            print(text, flush=True)

    fmt: Literal["gzip", "tar"] = "tar" if layer_format == "tar" else "gzip"
    echo(f"swarm: generating a {layers}-layer {fmt} image of {size / 2**20:.0f} MiB")
    image = make_image(size=size, layers=layers, layer_format=fmt, seed=7)
    blobs = [image.config_digest, *image.layer_digests]
    sizes = {d: len(b) for d, b in image.blobs().items()}
    image_bytes = sum(sizes.values())
    out.mkdir(parents=True, exist_ok=True)
    with (
        LocalRegistry() as reg,
        tempfile.TemporaryDirectory(prefix="p2pdist-swarm-") as tmp,
        Cluster(Path(tmp), daemons=nodes, piece_size=piece_size, log_level="warning") as cluster,
    ):
        echo(f"swarm: registry {reg.url}, scheduler {cluster.scheduler_url}, {nodes} daemons")
        push_image(reg.url, "demo/app", "latest", image)
        started = time.perf_counter()
        for n, digest in enumerate(blobs):
            outs = [out / f"node{i}-blob{n}" for i in range(nodes)]
            t0 = time.perf_counter()
            gets = [cluster.get(i, f"{reg.host}/demo/app@{digest}", outs[i]) for i in range(nodes)]
            codes = [g.wait(timeout=600) for g in gets]
            seconds = time.perf_counter() - t0
            if any(codes):
                raise SystemExit(f"swarm: a get failed: exit codes {codes}")
            for path in outs:
                got = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
                if got != digest:
                    raise SystemExit(f"swarm: {path} is not {digest}")
                path.unlink()
            echo(
                f"  {digest[:19]}… {sizes[digest] / 2**20:7.1f} MiB on {nodes} nodes "
                f"in {seconds:.2f}s, every copy verified"
            )
        seconds = time.perf_counter() - started
        per_node: list[dict[str, Any]] = []
        registry_bytes = 0
        for i in range(nodes):
            totals = {"from_source": 0, "from_peers": 0, "peer_wire": 0}
            for digest in blobs:
                st = cluster.stats(i, digest)
                for key in totals:
                    totals[key] += int(st[key])
            registry_bytes += totals["from_source"]
            per_node.append({"node": i, **totals})
    result = SwarmResult(nodes, image_bytes, seconds, registry_bytes, per_node)
    (out / "swarm.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    mib = 2**20
    for row in per_node:
        wire = ""
        if row["from_peers"] and row["peer_wire"] < row["from_peers"]:
            wire = f" ({row['peer_wire'] / mib:.1f} MiB on the wire with zstd)"
        echo(
            f"  node{row['node']}: {row['from_source'] / mib:7.1f} MiB from the registry, "
            f"{row['from_peers'] / mib:7.1f} MiB from peers{wire}"
        )
    echo(
        f"swarm: registry sent {registry_bytes / mib:.1f} MiB for a {image_bytes / mib:.1f} MiB "
        f"image on {nodes} nodes = {result.registry_ratio:.2f}x the image "
        f"(direct pulls: {nodes}.00x); {seconds:.2f}s in all"
    )
    return result
