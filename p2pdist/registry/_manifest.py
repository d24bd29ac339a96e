"""Manifests: media types, descriptors, parsing and platform selection.  Pure, no I/O.

Four manifest types are understood: Docker image manifest v2 schema 2, Docker manifest
list, OCI image manifest and OCI image index.  Docker schema 1 is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest, sha256_digest
from ..errors import InvalidDigest, ManifestInvalid, NotFound

__all__ = [
    "ALL_MANIFEST_TYPES",
    "IMAGE_MANIFEST_TYPES",
    "INDEX_TYPES",
    "MAX_MANIFEST_SIZE",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Descriptor",
    "ImageManifest",
    "Index",
    "Manifest",
    "Platform",
    "parse_manifest",
    "parse_platform",
    "select_platform",
]

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"

IMAGE_MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
ALL_MANIFEST_TYPES: tuple[str, ...] = (
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
)

MAX_MANIFEST_SIZE = 4 << 20
"""Manifests larger than this are refused (ManifestInvalid), as containerd does."""

_GENERIC_TYPES = ("", "application/json", "application/octet-stream", "text/plain")


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or another manifest."""

    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest's exact bytes as the registry served them, and their digest."""

    media_type: str
    digest: Digest
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ImageManifest(Manifest):
    """An image manifest (Docker v2 schema 2 or OCI): one config blob and its layers."""

    config: Descriptor
    layers: list[Descriptor]
    index_digest: Digest | None = None
    """The index / manifest list this manifest was selected from, if any."""

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))


@dataclass(frozen=True, slots=True)
class Index(Manifest):
    """An OCI image index or Docker manifest list: one manifest per platform."""

    manifests: list[Descriptor]


# -- platforms ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


def parse_platform(text: str) -> Platform:
    """``"linux/amd64"``, ``"linux/arm64/v8"`` → :class:`Platform`.  ValueError if malformed."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"invalid platform {text[:60]!r}: expected os/arch[/variant]")
    return Platform(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")


# The variant an architecture means when none is given (as containerd normalises them).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def _norm_variant(arch: str, variant: str) -> str:
    return variant or _DEFAULT_VARIANT.get(arch, "")


def _descriptor_platform(desc: Descriptor) -> Platform | None:
    p = desc.platform
    if not p:
        return None
    os_ = p.get("os")
    arch = p.get("architecture")
    variant = p.get("variant") or ""
    if not isinstance(os_, str) or not isinstance(arch, str) or not isinstance(variant, str):
        return None
    return Platform(os_.lower(), arch.lower(), variant.lower())


def select_platform(index: Index, platform: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``).

    Without a variant in ``platform``, an entry without a variant (or with the
    architecture's default one, ``arm64``→``v8``, ``arm``→``v7``) is preferred, then the
    first entry with matching os/arch.  With a variant, it must match (after the same
    normalisation).  Raises :class:`NotFound` when no entry matches.
    """
    try:
        want = parse_platform(platform)
    except ValueError as exc:
        raise ManifestInvalid(str(exc)) from None
    want_variant = _norm_variant(want.architecture, want.variant)
    exact: Descriptor | None = None
    fallback: Descriptor | None = None
    for desc in index.manifests:
        got = _descriptor_platform(desc)
        if got is None or got.os != want.os or got.architecture != want.architecture:
            continue
        got_variant = _norm_variant(got.architecture, got.variant)
        if got_variant == want_variant:
            exact = exact or desc
        elif not want.variant:
            fallback = fallback or desc
    chosen = exact or fallback
    if chosen is None:
        available = sorted(
            {str(p) for d in index.manifests if (p := _descriptor_platform(d)) is not None}
        )
        raise NotFound(
            f"no manifest for platform {want} in index {index.digest} "
            f"(available: {', '.join(available) or 'none'})",
            status=None,
        )
    return chosen


# -- parsing -----------------------------------------------------------------------------


def _bad(msg: str) -> ManifestInvalid:
    return ManifestInvalid(f"invalid manifest: {msg}")


def _parse_descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise _bad(f"{where} is not an object")
    media_type = obj.get("mediaType")
    digest = obj.get("digest")
    size = obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _bad(f"{where}.mediaType missing or not a string")
    if not isinstance(digest, str):
        raise _bad(f"{where}.digest missing or not a string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"{where}.size missing or not a non-negative integer")
    try:
        parsed = Digest.parse(digest)
    except InvalidDigest:
        raise _bad(f"{where}.digest {digest[:80]!r} is not a valid digest") from None
    platform = obj.get("platform")
    if platform is not None:
        if not isinstance(platform, dict):
            raise _bad(f"{where}.platform is not an object")
        for key in ("os", "architecture"):
            if not isinstance(platform.get(key), str):
                raise _bad(f"{where}.platform.{key} missing or not a string")
        if not isinstance(platform.get("variant", ""), str):
            raise _bad(f"{where}.platform.variant is not a string")
    return Descriptor(media_type, parsed, size, platform)


def _media_type_of(doc: dict[str, Any], header_type: str) -> str:
    header = header_type.split(";", 1)[0].strip().lower()
    body = doc.get("mediaType")
    if body is not None and not isinstance(body, str):
        raise _bad("mediaType is not a string")
    known = ALL_MANIFEST_TYPES
    if header in known:
        if body and body != header:
            raise _bad(f"Content-Type {header!r} disagrees with mediaType {body!r}")
        return header
    if body:
        return body
    if header not in _GENERIC_TYPES:
        return header
    # Neither says: OCI allows mediaType to be absent; infer from the shape.
    if "manifests" in doc:
        return MEDIA_OCI_INDEX
    if "config" in doc and "layers" in doc:
        return MEDIA_OCI_MANIFEST
    return ""


def parse_manifest(
    data: bytes, media_type: str = "", *, digest: Digest | None = None
) -> ImageManifest | Index:
    """Parse manifest bytes (``media_type``: the Content-Type they were served with, or "").

    ``digest`` defaults to the sha256 of ``data``; it is recorded, not checked (the
    client checks digests).  Raises :class:`ManifestInvalid` for anything malformed,
    oversized, of an unsupported type (Docker schema 1 included), or of the wrong shape.
    """
    if len(data) > MAX_MANIFEST_SIZE:
        raise _bad(f"{len(data)} bytes is over the {MAX_MANIFEST_SIZE}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nesting
        raise _bad(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise _bad("top level is not an object")
    version = doc.get("schemaVersion")
    if version != 2 or isinstance(version, bool):
        raise _bad(f"unsupported schemaVersion {version!r} (only 2 is supported)")
    mt = _media_type_of(doc, media_type)
    dg = digest if digest is not None else sha256_digest(data)
    if mt in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise _bad("manifests missing or not a list")
        descs = [_parse_descriptor(e, f"manifests[{i}]") for i, e in enumerate(entries)]
        return Index(mt, dg, bytes(data), descs)
    if mt in IMAGE_MANIFEST_TYPES:
        config = _parse_descriptor(doc.get("config"), "config")
        layers_raw = doc.get("layers")
        if not isinstance(layers_raw, list):
            raise _bad("layers missing or not a list")
        layers = [_parse_descriptor(e, f"layers[{i}]") for i, e in enumerate(layers_raw)]
        return ImageManifest(mt, dg, bytes(data), config, layers)
    raise _bad(f"unsupported media type {mt[:100]!r}")
