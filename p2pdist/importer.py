"""``p2pdist import ARCHIVE``: seed a node from an image archive, with no registry at all.

Accepted inputs:

* a ``docker save`` tar, classic layout: ``manifest.json`` (``Config``, ``RepoTags``,
  ``Layers``), the config as ``<hex>.json`` and each layer as ``<id>/layer.tar`` (symlinks
  between layer files are followed inside the archive).  There is no distribution manifest
  in it, so one is synthesised: Docker v2 schema 2, the config
  (``application/vnd.docker.container.image.v1+json``) and each layer blob with its size,
  digest and media type from its leading bytes (gzip → ``…diff.tar.gzip``, zstd →
  ``…diff.tar.zstd``, else ``…diff.tar``);
* an OCI image layout, as a directory or a tar (``index.json``, ``blobs/<alg>/<hex>``,
  ``oci-layout``), which is also what ``docker save`` writes since Docker 25 (both
  ``manifest.json`` and ``index.json``; then ``index.json`` is used).  Manifests and
  indexes are taken as they are (their digests kept); of an index, the child manifests in
  the archive are imported, the others are skipped with a note.

Verification, before anything is marked complete:

* a blob named by its digest (OCI layouts, ``blobs/sha256/<hex>``, the classic config
  ``<hex>.json``) must hash to it and have the size its descriptor says;
* a classic ``docker save`` layer is named by a v1 id, not its digest: its digest is the
  sha256 of its bytes, and its *uncompressed* content (gunzipped on the fly) must hash to
  the ``rootfs.diff_ids`` entry of the (verified) config.  A zstd layer there cannot be
  checked without a zstd decoder and is refused.

Blobs go into the node's :class:`~p2pdist.store.PieceStore` through the ordinary task path
(``open_task`` / ``write_piece`` / ``commit`` with the plan of
:func:`~p2pdist.pieces.piece_size_for`), streamed one piece at a time: ``commit`` re-checks
the whole blob and records the piece hashes, so peers can serve it like any downloaded blob.
A blob that fails is discarded (its task removed); blobs imported before the failure stay
(each is complete and verified on its own), but no manifest or tag is recorded unless every
blob of the image verified.  A blob already complete in the store is not read again.

Manifests go into the proxy's :class:`~p2pdist.proxy.ManifestCache` and tags into
:class:`~p2pdist.proxy.ImportedTags` (``data_dir/proxy/tags``), which the proxy of a daemon
on the same data dir answers from (immediately, no restart) when no upstream is configured
or the upstream does not have the tag.

Errors: structural problems (not a tar or layout, no ``manifest.json``/``index.json``, bad
JSON, a member missing, unsafe member names such as ``../x`` or absolute paths) are
:class:`~p2pdist.errors.UsageError` (exit 2); bytes that do not match their digest, size or
diff_id are :class:`~p2pdist.errors.VerificationError` (exit 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .digest import Digest, sha256_digest
from .errors import (
    InvalidDigest,
    ManifestInvalid,
    UsageError,
    VerificationError,
)
from .pieces import DEFAULT_PIECE_SIZE, piece_size_for
from .proxy import CachedManifest, ImportedTags, ManifestCache
from .reference import Reference, parse_reference
from .registry import (
    INDEX_TYPES,
    MAX_MANIFEST_SIZE,
    MEDIA_DOCKER_MANIFEST,
    ImageManifest,
    Index,
    parse_manifest,
)
from .store import BlobComplete, PieceStore

__all__ = ["ImportResult", "ImportedBlob", "import_archive"]

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
MAX_CONFIG_SIZE = 32 << 20
_READ = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_LINKS = 16


@dataclass(frozen=True, slots=True)
class ImportedBlob:
    digest: Digest
    size: int
    kind: str  # "config", "layer"
    present: bool  # already complete in the store (not read again)


@dataclass(slots=True)
class ImportResult:
    blobs: list[ImportedBlob] = field(default_factory=list)
    manifests: list[CachedManifest] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def imported_bytes(self) -> int:
        return sum(b.size for b in self.blobs if not b.present)


# -- archive access -----------------------------------------------------------------------


def _safe_name(name: str, what: str) -> str:
    """The normalised member path; UsageError if it is absolute or leaves the archive."""
    if not name or "\0" in name or "\\" in name or name.startswith("/"):
        raise UsageError(f"unsafe path {name[:100]!r} in {what}: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"unsafe path {name[:100]!r} in {what}: refused")
    return "/".join(parts)


class _Archive:
    """Read access to the files of an archive or layout, by normalised relative path."""

    what: str

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_small(self, name: str, cap: int) -> bytes:
        if not self.has(name):
            raise UsageError(f"{self.what}: {name} is missing")
        if self.size(name) > cap:
            raise UsageError(f"{self.what}: {name} is larger than {cap} bytes")
        with self.open(name) as f:
            data = f.read(cap + 1)
        if len(data) != self.size(name):
            raise VerificationError(f"{self.what}: {name} is truncated")
        return data


class _TarArchive(_Archive):
    def __init__(self, path: Path) -> None:
        self.what = str(path)
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
        except tarfile.TarError:
            # tarfile's message lists every compression it tried, one per line: leave it out.
            raise UsageError(f"{path}: not a tar archive or OCI layout") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            members = self._tar.getmembers()
        except tarfile.TarError as exc:
            self._tar.close()
            raise UsageError(f"{path}: not a valid tar archive ({exc})") from None
        try:
            for m in members:
                name = _safe_name(m.name, self.what)
                if m.issym() or m.islnk():
                    base = posixpath.dirname(name) if m.issym() else ""
                    target = m.linkname if m.islnk() else posixpath.join(base, m.linkname)
                    if m.linkname.startswith("/"):
                        raise UsageError(f"unsafe link {m.name!r} -> {m.linkname!r}: refused")
                    _safe_name(posixpath.normpath(target), self.what)
                if name:
                    self._members[name] = m
        except BaseException:
            self._tar.close()
            raise

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        for _ in range(_MAX_LINKS):
            m = self._members.get(name)
            if m is None or m.isreg():
                return m
            if m.issym():
                name = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            elif m.islnk():
                name = posixpath.normpath(m.linkname)
            else:
                return None
        return None

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self._resolve(name)
        if m is None:
            raise UsageError(f"{self.what}: {name} is missing")
        return m

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> IO[bytes]:
        f = self._tar.extractfile(self._member(name))
        if f is None:
            raise UsageError(f"{self.what}: {name} is not a regular file")
        return f

    def close(self) -> None:
        self._tar.close()


class _DirArchive(_Archive):
    def __init__(self, path: Path) -> None:
        self.what = str(path)
        self._root = path.resolve()

    def _path(self, name: str) -> Path:
        p = (self._root / _safe_name(name, self.what)).resolve()
        if not p.is_relative_to(self._root):
            raise UsageError(f"{self.what}: {name} points outside the layout: refused")
        return p

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except OSError as exc:
            raise UsageError(f"{self.what}: cannot read {name}: {exc.strerror}") from None


def _open_archive(path: Path) -> _Archive:
    if path.is_dir():
        return _DirArchive(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    return _TarArchive(path)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise UsageError(f"{what}: not valid JSON") from None


# -- blobs into the store -----------------------------------------------------------------


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise VerificationError(f"{what}: truncated ({len(data)} of {n} bytes)")
    return data


def _store_blob(
    store: PieceStore,
    archive: _Archive,
    name: str,
    digest: Digest,
    size: int,
    piece_base: int,
) -> bool:
    """Stream member ``name`` into the store as ``digest``; True if it was already there.
    Raises VerificationError (the task discarded) if the bytes are not ``digest``."""
    if store.blob_path(digest) is not None:
        return True
    got = archive.size(name)
    if got != size:
        raise VerificationError(f"blob {digest} ({name}): {got} bytes, expected {size}")
    try:
        task = store.open_task(digest, size, piece_size_for(size, piece_base))
    except BlobComplete:
        return True
    committed = False
    try:
        with archive.open(name) as f:
            for index in task.plan:
                task.write_piece(index, _read_exact(f, task.plan.length(index), name))
        task.commit()  # whole-blob check: DigestMismatch (a VerificationError) discards it
        committed = True
    finally:
        if not committed:
            task.close()
            with contextlib.suppress(Exception):
                store.remove_task(digest)
    return False


def _hash_layer(archive: _Archive, name: str) -> tuple[Digest, str, str | None]:
    """One streaming pass over a layer: (digest of its bytes, media type, sha256 of its
    uncompressed content or None for zstd)."""
    raw = hashlib.sha256()
    diff = hashlib.sha256()
    media_type: str | None = None
    inflater: Any = None
    with archive.open(name) as f:
        while block := f.read(_READ):
            raw.update(block)
            if media_type is None:
                if block.startswith(_GZIP_MAGIC):
                    media_type, inflater = (
                        DOCKER_LAYER_GZIP,
                        zlib.decompressobj(16 + zlib.MAX_WBITS),
                    )
                elif block.startswith(_ZSTD_MAGIC):
                    media_type = DOCKER_LAYER_ZSTD
                else:
                    media_type = DOCKER_LAYER_TAR
            if media_type == DOCKER_LAYER_TAR:
                diff.update(block)
            elif inflater is not None:
                try:
                    while block:
                        diff.update(inflater.decompress(block))
                        block = b""
                        if inflater.eof and inflater.unused_data:  # multi-member gzip
                            block = inflater.unused_data
                            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                except zlib.error as exc:
                    raise VerificationError(f"layer {name}: corrupt gzip data ({exc})") from None
    if inflater is not None:
        if not inflater.eof:
            raise VerificationError(f"layer {name}: truncated gzip stream")
        diff.update(inflater.flush())
    digest = Digest("sha256", raw.hexdigest())
    if media_type == DOCKER_LAYER_ZSTD:
        return digest, media_type, None
    return digest, media_type or DOCKER_LAYER_TAR, "sha256:" + diff.hexdigest()


def _named_digest(name: str) -> Digest | None:
    """The digest a member's name claims: ``blobs/<alg>/<hex>`` or ``<hex>.json``."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        try:
            return Digest.parse(f"{parts[1]}:{parts[2]}")
        except InvalidDigest:
            return None
    base = posixpath.basename(name).removesuffix(".json")
    if name.endswith(".json") and _HEX64.fullmatch(base):
        return Digest("sha256", base)
    return None


# -- the importer -------------------------------------------------------------------------


class _Importer:
    def __init__(
        self,
        archive: _Archive,
        data_dir: Path,
        piece_base: int,
        say: Callable[[str], None],
    ) -> None:
        self.archive = archive
        self.store = PieceStore(data_dir)
        self.cache = ManifestCache(data_dir / "proxy" / "manifests")
        self.tags = ImportedTags(data_dir / "proxy" / "tags")
        self.piece_base = piece_base
        self.say = say
        self.result = ImportResult()

    def blob(self, name: str, digest: Digest, size: int, kind: str) -> None:
        present = _store_blob(self.store, self.archive, name, digest, size, self.piece_base)
        self.result.blobs.append(ImportedBlob(digest, size, kind, present))
        state = "already in store" if present else "imported"
        self.say(f"{kind:<6} {digest}  {size:>12} bytes  {state}")

    def manifest(self, digest: Digest, media_type: str, data: bytes) -> CachedManifest:
        cached = self.cache.put_blocking(digest, media_type, data)
        self.result.manifests.append(cached)
        return cached

    def tag(self, ref: Reference, manifest: CachedManifest) -> None:
        assert ref.tag is not None
        self.tags.set(ref.repository, ref.tag, manifest, ref.registry)
        self.result.tags.append(f"{ref.registry}/{ref.repository}:{ref.tag}")

    # -- classic docker save ----------------------------------------------------------------

    def docker_save(self, tags: Sequence[Reference]) -> None:
        raw = self.archive.read_small("manifest.json", MAX_MANIFEST_SIZE)
        entries = _json(raw, "manifest.json")
        if not isinstance(entries, list) or not entries:
            raise UsageError("manifest.json: expected a non-empty list of images")
        if tags and len(entries) > 1:
            raise UsageError(f"--tag is ambiguous: the archive holds {len(entries)} images")
        for i, entry in enumerate(entries):
            manifest = self._docker_image(entry, f"manifest.json[{i}]")
            refs = list(tags) or _refs(_str_list(entry.get("RepoTags")), self.result.notes)
            for ref in refs:
                self.tag(ref, manifest)

    def _docker_image(self, entry: Any, what: str) -> CachedManifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise UsageError(f"{what}: no Config")
        layers = entry.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise UsageError(f"{what}: Layers is not a list of paths")
        config_name = _safe_name(entry["Config"], what)
        config = self.archive.read_small(config_name, MAX_CONFIG_SIZE)
        config_digest = sha256_digest(config)
        claimed = _named_digest(config_name)
        if claimed is not None and claimed != config_digest:
            raise VerificationError(f"config {config_name}: content hashes to {config_digest}")
        config_doc = _json(config, config_name)
        rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise VerificationError(
                f"config {config_name}: rootfs.diff_ids does not list the {len(layers)} layers"
            )
        descriptors: list[dict[str, Any]] = []
        for name, diff_id in zip(layers, diff_ids, strict=True):
            name = _safe_name(name, what)
            digest, media_type, got_diff = _hash_layer(self.archive, name)
            claimed = _named_digest(name)
            if claimed is not None and claimed != digest:
                raise VerificationError(f"layer {name}: content hashes to {digest}")
            if got_diff is None and claimed is None:
                raise VerificationError(f"layer {name}: zstd layer cannot be verified here")
            if got_diff is not None and got_diff != diff_id:
                raise VerificationError(
                    f"layer {name}: content does not match the config's diff_id {diff_id}"
                )
            size = self.archive.size(name)
            descriptors.append({"mediaType": media_type, "size": size, "digest": str(digest)})
            self.blob(name, digest, size, "layer")
        # The config last: it is small, and it was verified above.
        self.blob(config_name, config_digest, len(config), "config")
        doc = {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "size": len(config),
                "digest": str(config_digest),
            },
            "layers": descriptors,
        }
        data = json.dumps(doc, indent=3).encode()  # as docker push writes them
        return self.manifest(sha256_digest(data), MEDIA_DOCKER_MANIFEST, data)

    # -- OCI layout -----------------------------------------------------------------------

    def oci_layout(self, tags: Sequence[Reference]) -> None:
        if self.archive.has("oci-layout"):
            layout = _json(self.archive.read_small("oci-layout", 1 << 16), "oci-layout")
            version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
            if not isinstance(version, str) or not version.startswith("1."):
                raise UsageError(f"oci-layout: unsupported imageLayoutVersion {version!r}")
        index = _json(self.archive.read_small("index.json", MAX_MANIFEST_SIZE), "index.json")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not entries:
            raise UsageError("index.json: no manifests")
        if tags and len(entries) > 1:
            raise UsageError(f"--tag is ambiguous: index.json lists {len(entries)} images")
        repo_tags = self._docker_repo_tags()
        for i, entry in enumerate(entries):
            what = f"index.json manifests[{i}]"
            if not isinstance(entry, dict):
                raise UsageError(f"{what}: not an object")
            manifest, config = self._oci_manifest(entry, what)
            refs = list(tags)
            if not refs:
                names = _annotation_refs(entry.get("annotations"))
                if not names and config is not None:
                    names = repo_tags.get(config, [])
                refs = _refs(names, self.result.notes)
            for ref in refs:
                self.tag(ref, manifest)

    def _docker_repo_tags(self) -> dict[Digest, list[str]]:
        """RepoTags of a Docker ≥ 25 ``docker save`` (manifest.json next to index.json),
        by config digest."""
        out: dict[Digest, list[str]] = {}
        if not self.archive.has("manifest.json"):
            return out
        with contextlib.suppress(UsageError, VerificationError):
            raw = _json(self.archive.read_small("manifest.json", MAX_MANIFEST_SIZE), "")
            for entry in raw if isinstance(raw, list) else []:
                config = _named_digest(str(entry.get("Config", "")))
                if config is not None:
                    out.setdefault(config, []).extend(_str_list(entry.get("RepoTags")))
        return out

    def _oci_manifest(
        self, entry: dict[str, Any], what: str
    ) -> tuple[CachedManifest, Digest | None]:
        """Import the manifest (or index) ``entry`` describes and what it refers to; its
        cached form, and the config digest for an image manifest."""
        try:
            digest = Digest.parse(str(entry.get("digest")))
            size = int(entry["size"])
        except (InvalidDigest, KeyError, TypeError, ValueError):
            raise UsageError(f"{what}: invalid descriptor") from None
        media_type = str(entry.get("mediaType") or "")
        name = f"blobs/{digest.algorithm}/{digest.hex}"
        data = self.archive.read_small(name, MAX_MANIFEST_SIZE)
        if len(data) != size or not digest.matches(data):
            raise VerificationError(f"manifest {digest}: content does not match its descriptor")
        try:
            parsed = parse_manifest(data, media_type, digest=digest)
        except ManifestInvalid as exc:
            raise UsageError(f"manifest {digest}: {exc}") from None
        media_type = parsed.media_type
        config: Digest | None = None
        if isinstance(parsed, Index):
            for j, child in enumerate(parsed.manifests):
                child_name = f"blobs/{child.digest.algorithm}/{child.digest.hex}"
                if not self.archive.has(child_name):
                    self.result.notes.append(
                        f"index {digest}: manifest {child.digest} is not in the archive; skipped"
                    )
                    continue
                desc = {"digest": str(child.digest), "size": child.size}
                desc["mediaType"] = child.media_type
                self._oci_manifest(desc, f"{what} manifests[{j}]")
        else:
            assert isinstance(parsed, ImageManifest)
            for layer in parsed.layers:
                self._oci_blob(layer.digest, layer.size, "layer")
            self._oci_blob(parsed.config.digest, parsed.config.size, "config")
            config = parsed.config.digest
        assert media_type not in INDEX_TYPES or isinstance(parsed, Index)
        return self.manifest(digest, media_type, data), config

    def _oci_blob(self, digest: Digest, size: int, kind: str) -> None:
        name = f"blobs/{digest.algorithm}/{digest.hex}"
        if self.store.blob_path(digest) is None and not self.archive.has(name):
            raise UsageError(f"{self.archive.what}: {kind} blob {digest} is missing")
        self.blob(name, digest, size, kind)


def _str_list(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _annotation_refs(annotations: Any) -> list[str]:
    if not isinstance(annotations, dict):
        return []
    name = annotations.get("io.containerd.image.name")
    if isinstance(name, str) and name:
        return [name]
    ref = annotations.get("org.opencontainers.image.ref.name")
    # A bare tag ("latest") names no repository: only a full reference can be used.
    if isinstance(ref, str) and ("/" in ref or ":" in ref):
        return [ref]
    return []


def _refs(names: Sequence[str], notes: list[str]) -> list[Reference]:
    out: list[Reference] = []
    for name in names:
        try:
            ref = parse_reference(name)
        except UsageError:
            notes.append(f"ignored the archive's tag {name[:100]!r}: not a valid reference")
            continue
        if ref.tag is not None:
            out.append(ref)
    return out


def parse_tag(text: str) -> Reference:
    """``--tag REGISTRY/REPO:TAG`` (``:latest`` by default; no digest)."""
    ref = parse_reference(text)
    if ref.digest is not None or ref.tag is None:
        raise UsageError(f"--tag {text!r}: expected REGISTRY/REPO:TAG, without a digest")
    return ref


def import_archive(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    tags: Sequence[str] = (),
    piece_size: int = DEFAULT_PIECE_SIZE,
    say: Callable[[str], None] = print,
) -> ImportResult:
    """Import the ``docker save`` archive or OCI layout at ``path`` into the node whose
    data dir is ``data_dir`` (see the module docstring).  ``tags`` replace the archive's
    own tags.  ``say`` gets one line per blob.  Blocking."""
    refs = [parse_tag(t) for t in tags]
    archive = _open_archive(Path(path))
    try:
        importer = _Importer(archive, Path(data_dir), piece_size, say)
        if archive.has("index.json"):
            importer.oci_layout(refs)
        elif archive.has("manifest.json"):
            importer.docker_save(refs)
        else:
            raise UsageError(
                f"{archive.what}: neither a docker save archive (no manifest.json) "
                "nor an OCI layout (no index.json)"
            )
        return importer.result
    finally:
        archive.close()


def summary(result: ImportResult) -> Iterator[str]:
    """The human summary lines after the per-blob lines."""
    for note in result.notes:
        yield f"note: {note}"
    new = [b for b in result.blobs if not b.present]
    yield (
        f"imported {len(new)} blob(s), {result.imported_bytes} bytes"
        f" ({len(result.blobs) - len(new)} already in the store);"
        f" {len(result.manifests)} manifest(s): "
        + ", ".join(str(m.digest) for m in result.manifests)
    )
    if result.tags:
        yield "tagged " + ", ".join(result.tags)
    else:
        yield "no tag recorded (pass --tag REGISTRY/REPO:TAG); pull by digest"
