"""Shared test helpers: skip markers and the pushed-image record used by the fixtures."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from bench.image import Image

__all__ = ["REGISTRY_MISSING_REASON", "PushedImage", "requires_registry", "skip_without_registry"]

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
