"""Shared test helpers: skip markers and the pushed-image record used by the fixtures."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from bench.image import Image

if TYPE_CHECKING:
    from p2pdist.digest import Digest
    from p2pdist.node import Node

__all__ = [
    "REGISTRY_MISSING_REASON",
    "PushedImage",
    "blob_stored",
    "requires_registry",
    "skip_without_registry",
]

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
