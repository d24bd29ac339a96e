"""``make demo``: a real registry, one scheduler and three daemons on loopback; a generated
image pushed to the registry; every blob fetched on all three nodes at once with
``p2pdist get --daemon``; and, per node, how many bytes came from the registry and how many
from peers."""

from __future__ import annotations

from pathlib import Path

from p2pdist.config import parse_size

from .swarmbench import run_swarm
from .tools import ensure_registry_installed

__all__ = ["run_demo"]


def run_demo(*, size: str, layers: int, nodes: int, out: str) -> int:
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
