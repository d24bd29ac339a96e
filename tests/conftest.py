"""Session fixtures around real ``docker-registry`` processes on loopback ports.

Every fixture skips (with the apt-get hint) when docker-registry is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from bench.image import make_image, push_image
from bench.localregistry import LocalRegistry
from tests.faultproxy import FaultProxy
from tests.helpers import PushedImage, skip_without_registry
from tests.runtimes import dockerd  # noqa: F401  (the session fixture)

if TYPE_CHECKING:  # tokenserver needs `cryptography`; imported lazily in the fixture
    from tests.tokenserver import TokenRegistry

AUTH_USER = "p2pdist"
AUTH_PASSWORD = "p2pdist-secret"
TOKEN_USER = "p2pdist"
TOKEN_PASSWORD = "p2pdist-token-secret"


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


@pytest.fixture(scope="session")
def token_registry() -> Iterator[TokenRegistry]:
    """A registry with Bearer token auth and its token server (``.registry``, ``.tokens``).

    ``TOKEN_USER``/``TOKEN_PASSWORD`` get pull+push; anonymous callers get pull only.
    ``tokens.expires_in``/``strict_expiry`` are shared session state: restore them if changed.
    """
    skip_without_registry()
    pytest.importorskip("cryptography", reason="token tests need the cryptography package")
    from tests.tokenserver import open_token_registry

    with open_token_registry(users={TOKEN_USER: TOKEN_PASSWORD}) as tr:
        yield tr


@pytest.fixture
def fault_proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    """A fresh FaultProxy (no faults set) in front of the anonymous ``registry``."""
    with FaultProxy(registry.url) as proxy:
        yield proxy
