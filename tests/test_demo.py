"""``make demo`` without a registry: ``p2pdist import`` seeds one node, and the others
pull the image through their daemons, from that node and from each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.demo import run_seed_demo

pytestmark = pytest.mark.integration

MIB = 1 << 20


def test_archive_demo_spreads_an_imported_image_with_no_registry(tmp_path: Path) -> None:
    # The import cuts blobs at the default piece size (4 MiB) and the cluster's daemons
    # at 1 MiB: they adopt the swarm's plan (PlanConflict) rather than go around it.
    result = run_seed_demo(size=8 * MIB, layers=2, nodes=3, out=tmp_path / "out")
    assert [row["node"] for row in result["per_node"]] == [1, 2]
    for row in result["per_node"]:
        # every byte from peers: node0's store, announced after the import, and each other
        assert row["from_peers"] == result["image_bytes"], row
        assert row["from_source"] == 0, row
    for node in (1, 2):
        assert (tmp_path / "out" / f"node{node}" / "index.json").is_file()
