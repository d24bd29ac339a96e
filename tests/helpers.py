"""Shared test helpers: skip markers and the pushed-image record used by the fixtures."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from bench.image import Image
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon

if TYPE_CHECKING:
    from p2pdist.digest import Digest
    from p2pdist.node import Node

__all__ = [
    "REGISTRY_MISSING_REASON",
    "PushedImage",
    "blob_stored",
    "proxy_daemon",
    "requires_registry",
    "skip_without_registry",
    "tmpfs",
]

#: No ~/.docker/config.json for daemons under test: credentials only from what a test gives.
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")

REGISTRY_MISSING_REASON = "docker-registry not installed: apt-get install docker-registry"


def registry_installed() -> bool:
    return shutil.which("docker-registry") is not None


#: Mark a test (or module: ``pytestmark = requires_registry``) that needs docker-registry.
requires_registry = pytest.mark.skipif(not registry_installed(), reason=REGISTRY_MISSING_REASON)


def skip_without_registry() -> None:
    """Skip the calling test or fixture when docker-registry is not installed."""
    if not registry_installed():
        pytest.skip(REGISTRY_MISSING_REASON)


@dataclass(frozen=True, slots=True)
class PushedImage:
    """An image pushed to a registry: ``url``/``host`` of the registry, ``repo``, ``tag``."""

    url: str
    host: str
    repo: str
    tag: str
    image: Image

    @property
    def digest(self) -> str:
        return self.image.manifest_digest

    @property
    def reference(self) -> str:
        """``host/repo:tag`` as docker/skopeo would spell it."""
        return f"{self.host}/{self.repo}:{self.tag}"


async def blob_stored(node: Node, digest: Digest) -> Path | None:
    """The blob's path in the node's store once its download (if one is running) has
    finished.  A streamed blob's last byte leaves as soon as its digest matched, a moment
    before the blob is synced and moved into the store."""
    job = node.job(digest)
    if job is not None:
        with trio.fail_after(10):
            await job.done.wait()
    return node.store.blob_path(digest)


@asynccontextmanager
async def proxy_daemon(
    tmp_path: Path, upstream: str | None, *, piece_size: int = 64 * 1024, **kw: object
) -> AsyncIterator[DaemonInfo]:
    """A daemon in this event loop with its registry proxy on an ephemeral loopback port
    (``info.proxy_url``), no scheduler, its store under ``tmp_path/data``."""
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        upstream=upstream,
        piece_size=piece_size,
        host_id=f"proxy-{tmp_path.name}",
        docker_config=NO_DOCKER_CONFIG,
        **kw,  # type: ignore[arg-type]
    )
    async with open_daemon(config) as info:
        assert info.proxy_url is not None
        yield info


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (a small disk to fill)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
