"""Image references: ``[REGISTRY/]REPO[:TAG][@DIGEST]``, after the distribution grammar.

``parse_reference("127.0.0.1:5000/app:v1")`` gives registry ``127.0.0.1:5000``,
repository ``app``, tag ``v1``.  A first component without ``.`` or ``:`` (and not
``localhost``) is a repository path on Docker Hub, as ``docker pull`` reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .digest import Digest
from .errors import InvalidReference

__all__ = [
    "DOCKER_HUB",
    "Reference",
    "is_valid_registry_host",
    "is_valid_repository",
    "is_valid_tag",
    "parse_reference",
]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DOMAIN_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?"
)
MAX_NAME_LENGTH = 255


def is_valid_repository(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _REPOSITORY.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def is_valid_registry_host(host: str) -> bool:
    """``registry.example``, ``127.0.0.1:5000``, ``[::1]:5000``: a host[:port] to ask."""
    if _DOMAIN.fullmatch(host) is None:
        return False
    port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host else ""
    return not (port.isdigit() and int(port) > 65535)


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str, *, default_tag: str | None = "latest") -> Reference:
    """Parse ``[REGISTRY/]REPO[:TAG][@DIGEST]``.  Raises :class:`InvalidReference`."""
    if not text or len(text) > 1024 or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid image reference {text[:80]!r}")
    rest = text
    digest: Digest | None = None
    if "@" in rest:
        rest, _, dtext = rest.partition("@")
        try:
            digest = Digest.parse(dtext)
        except Exception as exc:
            raise InvalidReference(f"invalid image reference {text[:80]!r}: {exc}") from None
    registry = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not is_valid_registry_host(first):
            raise InvalidReference(f"invalid registry host {first[:80]!r} in {text[:80]!r}")
        registry, rest = first, remainder
    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not is_valid_tag(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {text[:80]!r}")
    if registry == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    if not is_valid_repository(rest):
        raise InvalidReference(
            f"invalid repository name {rest!r} in {text[:80]!r}: lowercase letters, digits and "
            "separators (. _ __ -) in /-separated components"
        )
    if tag is None and digest is None:
        tag = default_tag
    return Reference(registry, rest, tag, digest)
