"""``python -m bench``: the demo and the benchmarks.

python -m bench demo                      # generated image through 3 daemons, verified
python -m bench get-vs-curl --size 1GiB   # p2pdist get vs curl, same blob, same registry
python -m bench rollout --nodes 8         # root: emulated network, registry vs p2p vs T_min
python -m bench docker-pull               # docker pull: direct vs via node (local, peer)
python -m bench memory --size 1GiB        # daemons' RSS while 9 nodes share a 1 GiB blob
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="registry, scheduler, 3 daemons: a generated image")
    demo.add_argument("--size", default="64MiB", help="image content size (default 64MiB)")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--out", default="demo-out", help="where results go")
    demo.add_argument(
        "--source",
        choices=["auto", "registry", "archive"],
        default="auto",
        help="registry: a real docker-registry; archive: p2pdist import into one node, no "
        "registry (auto: registry when docker-registry is installed)",
    )
    swarm = sub.add_parser("swarm", help="a rollout through N daemons on loopback")
    swarm.add_argument("--nodes", type=int, default=3)
    swarm.add_argument("--size", default="256MiB", help="image content size (default 256MiB)")
    swarm.add_argument("--layers", type=int, default=4)
    swarm.add_argument("--layer-format", choices=["gzip", "tar"], default="gzip")
    swarm.add_argument("--piece-size", default="4MiB")
    swarm.add_argument("--out", default="bench-out", help="directory for swarm.json")
    cmp = sub.add_parser("get-vs-curl", help="p2pdist get against curl, side by side")
    cmp.add_argument("--size", default="1GiB", help="blob size (default 1GiB)")
    cmp.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    cmp.add_argument("--concurrency", type=int, default=None)
    cmp.add_argument("--piece-size", default=None)
    cmp.add_argument("--out", default="bench-out", help="directory for result.json")
    cmp.add_argument(
        "--settle", type=float, default=5.0, help="pause before each timed run, s (default 5)"
    )
    dpull = sub.add_parser(
        "docker-pull",
        help="docker pull through the node's proxy (image local, on a peer) vs direct",
    )
    dpull.add_argument("--size", default="256MiB", help="image content size (default 256MiB)")
    dpull.add_argument("--layers", type=int, default=4)
    dpull.add_argument("--rounds", type=int, default=3, help="rounds, fresh image each (3)")
    dpull.add_argument("--piece-size", default=None, help="the daemons' (default: theirs)")
    dpull.add_argument("--out", default="bench-out", help="directory for docker-pull.json")
    dpull.add_argument(
        "--settle", type=float, default=5.0, help="pause before each timed pull, s (default 5)"
    )
    roll = sub.add_parser(
        "rollout",
        help="N nodes pull one image at once, vs T_min (root: network namespaces; "
        "otherwise p2p on loopback)",
    )
    roll.add_argument("--nodes", type=int, default=8)
    roll.add_argument("--node-mbit", type=float, default=100.0, help="each node link (100)")
    roll.add_argument("--origin-mbit", type=float, default=100.0, help="registry link (100)")
    roll.add_argument("--image-size", default="256MiB", help="image content size (256MiB)")
    roll.add_argument("--layers", type=int, default=4)
    roll.add_argument("--layer-format", choices=["gzip", "tar"], default="gzip")
    roll.add_argument("--piece-size", default=None, help="default: p2pdist's own")
    roll.add_argument("--mode", choices=["registry", "p2p", "both"], default="both")
    roll.add_argument(
        "--client",
        choices=["get", "pull"],
        default="get",
        help="get: p2pdist pull --output (default); pull: into a dockerd per node",
    )
    roll.add_argument(
        "--network",
        choices=["auto", "netns", "loopback"],
        default="auto",
        help="netns: namespaces shaped by tc (root); loopback: the daemons' own rate limits "
        "(p2p mode only); auto: netns as root, else loopback",
    )
    roll.add_argument("--out", default="rollout-out", help="result.json, report.md, charts")
    roll.add_argument("--seed", type=int, default=1)
    roll.add_argument(
        "--queue-ms", type=float, default=20.0, help="tbf queue of each link, in ms (20)"
    )
    roll.add_argument(
        "--tcp-cc", default="reno", help="TCP congestion control in the namespaces ('host')"
    )
    roll.add_argument(
        "--registry-concurrency",
        type=int,
        default=1,
        help="registry mode: range requests per blob (1: one stream a layer, like docker)",
    )
    roll.add_argument(
        "--cleanup", action="store_true", help="only remove namespaces left by dead runs"
    )
    mem = sub.add_parser(
        "memory",
        help="every daemon's RSS while node 0 downloads a blob and 8 peers fetch it from it",
    )
    mem.add_argument("--size", default="1GiB", help="blob size (default 1GiB)")
    mem.add_argument("--nodes", type=int, default=9, help="daemons, node 0 included (9)")
    mem.add_argument("--piece-size", default=None, help="the daemons' (default: theirs)")
    mem.add_argument(
        "--content",
        choices=["random", "text"],
        default="random",
        help="random: incompressible (gzip layers); text: pieces go zstd-compressed",
    )
    mem.add_argument("--interval", type=float, default=0.1, help="RSS sampling period, s")
    mem.add_argument("--out", default="bench-out/memory", help="directory for result.json")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(
            size=args.size, layers=args.layers, nodes=args.nodes, out=args.out, source=args.source
        )
    if args.command == "swarm":
        from p2pdist.config import parse_size

        from .swarmbench import run_swarm
        from .tools import ensure_registry_installed

        if not ensure_registry_installed():
            return 2
        run_swarm(
            nodes=args.nodes,
            size=parse_size(args.size),
            layers=args.layers,
            layer_format=args.layer_format,
            piece_size=args.piece_size,
            out=Path(args.out),
        )
        return 0
    if args.command == "get-vs-curl":
        from .getbench import run_get_vs_curl

        return run_get_vs_curl(
            size=args.size,
            rounds=args.rounds,
            concurrency=args.concurrency,
            piece_size=args.piece_size,
            out=args.out,
            settle=args.settle,
        )
    if args.command == "docker-pull":
        from .dockerpull import run_docker_pull

        return run_docker_pull(
            size=args.size,
            layers=args.layers,
            rounds=args.rounds,
            out=args.out,
            settle=args.settle,
            piece_size=args.piece_size,
        )
    if args.command == "memory":
        from p2pdist.config import parse_size

        from .memory import LIMIT, run_memory
        from .tools import ensure_registry_installed

        if not ensure_registry_installed():
            return 2
        result = run_memory(
            size=parse_size(args.size),
            nodes=args.nodes,
            piece_size=args.piece_size,
            content=args.content,
            interval=args.interval,
            out=Path(args.out),
        )
        return 0 if result.max_hwm <= LIMIT else 1
    if args.command == "rollout":
        from .rollout import rollout_cli

        return rollout_cli(
            nodes=args.nodes,
            node_mbit=args.node_mbit,
            origin_mbit=args.origin_mbit,
            image_size=args.image_size,
            layers=args.layers,
            layer_format=args.layer_format,
            piece_size=args.piece_size,
            mode=args.mode,
            client=args.client,
            network=args.network,
            out=args.out,
            seed=args.seed,
            queue_ms=args.queue_ms,
            tcp_cc=args.tcp_cc,
            registry_concurrency=args.registry_concurrency,
            cleanup=args.cleanup,
            argv=sys.argv[1:] if argv is None else argv,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
