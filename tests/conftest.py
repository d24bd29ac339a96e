"""Session fixtures around real ``docker-registry`` processes on loopback ports.

Every fixture skips (with the apt-get hint) when docker-registry is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.image import make_image, push_image
from bench.localregistry import LocalRegistry
from tests.helpers import PushedImage, skip_without_registry

AUTH_USER = "p2pdist"
AUTH_PASSWORD = "p2pdist-secret"


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    """An anonymous registry (push and pull without credentials)."""
    skip_without_registry()
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="session")
def pushed_image(registry: LocalRegistry) -> PushedImage:
    """A 3-layer, ~6 MiB gzip image pushed to ``registry`` as ``test/app:v1``."""
    image = make_image(size=6 << 20, layers=3, layer_format="gzip", seed=1)
    push_image(registry.url, "test/app", "v1", image)
    return PushedImage(registry.url, registry.host, "test/app", "v1", image)


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[LocalRegistry]:
    """A registry with htpasswd Basic auth: user ``AUTH_USER``, password ``AUTH_PASSWORD``
    (also on the object: ``reg.htpasswd == {AUTH_USER: AUTH_PASSWORD}``)."""
    skip_without_registry()
    with LocalRegistry(htpasswd={AUTH_USER: AUTH_PASSWORD}) as reg:
        yield reg
