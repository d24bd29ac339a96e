"""``p2pdist pull IMAGE``: an image through the swarm into Docker (or an OCI layout).

1. The manifest is resolved (an index → the platform asked for) and checked against its
   digest — through the local daemon's registry API (``--daemon``: ``/v2/...?ns=HOST``, so
   manifests the daemon imported or cached count too) or straight from the registry.
2. The config and the layers are fetched in parallel, each checked against its digest and
   size: through the daemon (which fetches them through the swarm and streams each as its
   pieces complete in order; we hash the stream into a spool file), or standalone into
   the local piece store (parallel ranges, verified pieces, like ``p2pdist get``).
3. Only then does anything reach Docker: a ``docker save``-format tar is streamed to the
   engine (``POST /images/load``) from the verified files, the image id the engine reports
   must be the config digest, and the image is tagged.  With ``--output DIR`` an OCI image
   layout is written instead (blobs first, ``index.json`` last, each file renamed into
   place whole).

Exit codes are those of ``p2pdist get``; an engine that cannot be reached or refuses the
image is :class:`~p2pdist.errors.DockerError` (exit 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from .config import NodeConfig
from .digest import Digest, sha256_digest
from .docker import DockerEngine, docker_host
from .download import ProgressFn, download_blob
from .errors import DigestMismatch, DockerError, NetworkError, StoreError, UsageError
from .progress import LineProgress, format_bytes, format_rate
from .reference import DOCKER_HUB, Reference, parse_reference
from .registry import MEDIA_OCI_MANIFEST, Descriptor, ImageManifest, RegistryClient
from .store import PieceStore

__all__ = [
    "PullRequest",
    "PullResult",
    "docker_archive_members",
    "docker_name",
    "oci_manifest",
    "run_pull",
    "tar_stream",
    "tar_stream_size",
]

MAX_PARALLEL_BLOBS = 4
_READ = 1 << 20
_OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_REF_NAME = "org.opencontainers.image.ref.name"
_IMAGE_NAME = "io.containerd.image.name"
_DOCKER = "application/vnd.docker."
_OCI = "application/vnd.oci.image."
_OCI_TYPES = {
    _DOCKER + "container.image.v1+json": _OCI + "config.v1+json",
    _DOCKER + "image.rootfs.diff.tar.gzip": _OCI + "layer.v1.tar+gzip",
    _DOCKER + "image.rootfs.diff.tar.zstd": _OCI + "layer.v1.tar+zstd",
    _DOCKER + "image.rootfs.diff.tar": _OCI + "layer.v1.tar",
    _DOCKER + "image.rootfs.foreign.diff.tar.gzip": _OCI + "layer.nondistributable.v1.tar+gzip",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PullRequest:
    image: str
    output: str | None = None
    """An OCI image layout directory to write instead of loading into Docker."""
    platform: str | None = None
    daemon: str | None = None
    docker_host: str | None = None
    insecure: bool = False
    progress: bool = True
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class PullResult:
    reference: Reference
    manifest: ImageManifest
    size: int
    seconds: float
    image_id: str | None = None
    """The id Docker gave the image (its config digest); None with ``--output``."""


def docker_name(ref: Reference) -> str:
    """The repository name as Docker spells it: ``alpine`` for ``docker.io/library/alpine``,
    ``user/app`` for Docker Hub's ``user/app``, else ``REGISTRY/REPO``."""
    if ref.registry == DOCKER_HUB:
        return ref.repository.removeprefix("library/")
    return f"{ref.registry}/{ref.repository}"


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _unique_blobs(image: ImageManifest) -> list[Descriptor]:
    seen: set[Digest] = set()
    out: list[Descriptor] = []
    for desc in [image.config, *image.layers]:
        if desc.digest not in seen:
            seen.add(desc.digest)
            out.append(desc)
    return out


# -- the tar that `docker load` takes ----------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def docker_archive_members(
    image: ImageManifest, files: dict[Digest, Path]
) -> list[tuple[str, Path | bytes]]:
    """The members of a ``docker load`` archive: each blob as ``blobs/sha256/<hex>``,
    then ``manifest.json`` naming the config and the layers in order (no ``RepoTags``:
    the image is tagged through the API once its id has been checked)."""
    members: list[tuple[str, Path | bytes]] = [
        (_blob_name(desc.digest), files[desc.digest]) for desc in _unique_blobs(image)
    ]
    manifest = [
        {
            "Config": _blob_name(image.config.digest),
            "RepoTags": [],
            "Layers": [_blob_name(layer.digest) for layer in image.layers],
        }
    ]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    return members


def tar_stream_size(members: list[tuple[str, Path | bytes]]) -> int:
    total = 2 * tarfile.BLOCKSIZE
    for name, content in members:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        total += len(_tar_header(name, size)) + size + _padding(size)
    return total


async def tar_stream(members: list[tuple[str, Path | bytes]]) -> AsyncIterator[bytes]:
    for name, content in members:
        if isinstance(content, bytes):
            yield _tar_header(name, len(content)) + content + b"\0" * _padding(len(content))
            continue
        size = content.stat().st_size
        yield _tar_header(name, size)
        sent = 0
        async with await trio.open_file(content, "rb") as f:
            while chunk := await f.read(_READ):
                sent += len(chunk)
                if sent > size:
                    break
                yield chunk
        if sent != size:
            raise StoreError(f"{content} changed size while it was sent to Docker")
        yield b"\0" * _padding(size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


# -- fetching --------------------------------------------------------------------------


class _Fetcher:
    """Fetches every blob of an image to a verified file, in parallel."""

    def __init__(
        self,
        req: PullRequest,
        config: NodeConfig,
        client: RegistryClient,
        ref: Reference,
        spool: Path,
        progress: LineProgress | None,
    ) -> None:
        self.req = req
        self.config = config
        self.client = client
        self.ref = ref
        self.spool = spool
        self.progress = progress
        self.store: PieceStore | None = None
        self.files: dict[Digest, Path] = {}

    async def fetch_all(self, blobs: list[Descriptor]) -> dict[Digest, Path]:
        if self.req.daemon is None:
            self.store = await trio.to_thread.run_sync(PieceStore, self.config.data_dir)
        limit = trio.CapacityLimiter(MAX_PARALLEL_BLOBS)
        async with trio.open_nursery() as nursery:
            for i, desc in enumerate(blobs):
                nursery.start_soon(self._fetch_one, i, desc, limit)
        return self.files

    async def _fetch_one(self, i: int, desc: Descriptor, limit: trio.CapacityLimiter) -> None:
        async with limit:
            started = time.perf_counter()

            def bar(done: int, total: int | None) -> None:
                if self.progress is not None:
                    self.progress.update(i, done, total)

            if self.store is not None:
                source = self.client.blob_source(self.ref.repository, desc.digest, size=desc.size)
                path, stats = await download_blob(
                    source,
                    self.store,
                    desc.digest,
                    piece_size=self.config.piece_size,
                    concurrency=self.config.concurrency,
                    progress=bar,
                    size=desc.size,
                )
                reused = stats.reused > 0
            else:
                try:
                    path = await self._stream(desc, bar)
                except (DigestMismatch, NetworkError):
                    # The daemon cut the stream or found a poisoned piece-hash list and
                    # started over: ask once more.
                    path = await self._stream(desc, bar)
                reused = False
            self.files[desc.digest] = path
            if self.progress is not None:
                seconds = time.perf_counter() - started
                how = "already here" if reused else f"in {seconds:.1f}s"
                self.progress.finish(i, f"verified {format_bytes(desc.size)} ({how})")

    async def _stream(self, desc: Descriptor, bar: ProgressFn) -> Path:
        """The blob through the daemon, hashed on the way into a spool file."""
        path = self.spool / desc.digest.hex
        partial = self.spool / f".{desc.digest.hex}.partial"
        h = desc.digest.hasher()
        received = 0
        async with self.client.stream_blob(self.ref.repository, desc.digest) as (size, chunks):
            if size != desc.size:
                raise DigestMismatch(
                    f"blob {desc.digest}: the daemon says {size} bytes, the manifest {desc.size}"
                )
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                async for chunk in chunks:
                    h.update(chunk)
                    os.write(fd, chunk)
                    received += len(chunk)
                    bar(received, size)
            finally:
                os.close(fd)
        if received != desc.size:
            raise NetworkError(f"blob {desc.digest}: stream ended after {received} bytes")
        if h.hexdigest() != desc.digest.hex:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"blob {desc.digest}: the bytes do not match the digest")
        os.replace(partial, path)
        return path


# -- output ---------------------------------------------------------------------------


def _check_layout_dir(output: str) -> Path:
    path = Path(output)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--output {output!r} exists and is not a directory")
        if any(path.iterdir()) and not (path / "oci-layout").is_file():
            raise UsageError(f"--output {output!r} is neither empty nor an OCI image layout")
    elif not path.parent.is_dir():
        raise UsageError(f"--output: directory {str(path.parent)!r} does not exist")
    return path


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def oci_manifest(image: ImageManifest) -> tuple[str, bytes]:
    """The image's manifest as an OCI one: ``(media type, bytes)``.  An OCI manifest is
    kept byte for byte; a Docker v2 manifest is rewritten with the OCI media types (the
    config and layer bytes, and so their digests, are the same; the manifest's own digest
    changes, as with ``skopeo copy ... oci:``), because OCI tools only read OCI types."""
    if image.media_type == MEDIA_OCI_MANIFEST:
        return image.media_type, image.data
    doc = json.loads(image.data)

    def convert(desc: dict[str, object]) -> dict[str, object]:
        media_type = str(desc.get("mediaType", ""))
        return {**desc, "mediaType": _OCI_TYPES.get(media_type, media_type)}

    out = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": convert(doc["config"]),
        "layers": [convert(layer) for layer in doc["layers"]],
    }
    return MEDIA_OCI_MANIFEST, json.dumps(out, separators=(",", ":")).encode()


def write_layout(
    root: Path,
    ref: Reference,
    image: ImageManifest,
    files: dict[Digest, Path],
    store: PieceStore | None,
) -> None:
    """Add the image to the OCI layout at ``root``: blobs, then the manifest, then
    ``index.json`` (an entry with the same ref name is replaced)."""
    blobs = root / "blobs" / "sha256"
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").is_file():
            _write_whole(root / "oci-layout", _OCI_LAYOUT)
        for desc in _unique_blobs(image):
            target = blobs / desc.digest.hex
            src = files[desc.digest]
            if src.parent == blobs:
                continue  # spooled in place
            tmp = blobs / f".{desc.digest.hex}.{os.getpid()}.partial"
            tmp.unlink(missing_ok=True)
            if store is not None:
                store.export(desc.digest, tmp)
            else:
                os.replace(src, tmp)
            os.replace(tmp, target)
        media_type, data = oci_manifest(image)
        digest = sha256_digest(data)
        _write_whole(blobs / digest.hex, data)
        entry: dict[str, object] = {
            "mediaType": media_type,
            "digest": str(digest),
            "size": len(data),
        }
        name = ref.tag or None
        if name:
            entry["annotations"] = {
                _REF_NAME: name,
                _IMAGE_NAME: f"{ref.registry}/{ref.repository}:{name}",
            }
        index_path = root / "index.json"
        index: dict[str, object] = {"schemaVersion": 2, "manifests": []}
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_bytes())
            except ValueError:
                raise UsageError(f"{index_path} is not valid JSON") from None
        manifests = [
            m
            for m in index.get("manifests") or []  # type: ignore[attr-defined]
            if isinstance(m, dict)
            and not (name and (m.get("annotations") or {}).get(_REF_NAME) == name)
            and m.get("digest") != str(digest)
        ]
        manifests.append(entry)
        index["manifests"] = manifests
        index.setdefault("schemaVersion", 2)
        _write_whole(index_path, json.dumps(index, indent=2).encode() + b"\n")
    except PermissionError:
        raise UsageError(f"cannot write to {str(root)!r}: permission denied") from None


# -- the command ------------------------------------------------------------------------


def _client(config: NodeConfig, ref: Reference, req: PullRequest) -> RegistryClient:
    reg = config.registry(ref.api_host)
    if req.insecure:
        reg = dataclasses.replace(reg, insecure=True)
    return RegistryClient(
        reg,
        platform=config.platform,
        docker_config=config.docker_config,
        max_connections=max(8, config.concurrency * 2),
        mirror=req.daemon,
    )


@contextlib.contextmanager
def _spool_dir(layout: Path | None) -> Iterator[Path]:
    """Where blobs fetched through the daemon are written: the layout's own blob
    directory (no second copy), else a temporary directory removed afterwards."""
    if layout is not None:
        blobs = layout / "blobs" / "sha256"
        try:
            blobs.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise UsageError(f"cannot write to {str(layout)!r}: permission denied") from None
        try:
            yield blobs
        finally:  # a failed or interrupted pull leaves no half-written blob behind
            for leftover in blobs.glob(".*.partial"):
                leftover.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="p2pdist-pull-") as tmp:
        yield Path(tmp)


def _say(req: PullRequest, text: str) -> None:
    if not req.quiet:
        print(text, file=sys.stderr, flush=True)


async def run_pull(req: PullRequest, config: NodeConfig) -> PullResult:
    ref = parse_reference(req.image)
    layout = _check_layout_dir(req.output) if req.output is not None else None
    engine: DockerEngine | None = None
    async with contextlib.AsyncExitStack() as stack:
        if layout is None:
            engine = await stack.enter_async_context(DockerEngine(docker_host(req.docker_host)))
            await engine.ping()  # before any download: fail fast without Docker
        client = await stack.enter_async_context(_client(config, ref, req))
        started = time.perf_counter()
        image = await client.resolve_image(
            ref.repository, ref.reference, platform=req.platform or config.platform
        )
        blobs = _unique_blobs(image)
        total = sum(d.size for d in blobs)
        _say(
            req,
            f"{ref.registry}/{ref.repository}@{image.digest}: {len(image.layers)} layers, "
            f"{format_bytes(total)}",
        )
        labels = ["config" if d.digest == image.config.digest else d.digest.hex[:12] for d in blobs]
        progress = None
        if not req.quiet and req.progress:
            progress = LineProgress(labels)
        with _spool_dir(layout) as spool:
            fetcher = _Fetcher(req, config, client, ref, spool, progress)
            files = await fetcher.fetch_all(blobs)
            seconds = time.perf_counter() - started
            if layout is not None:
                await trio.to_thread.run_sync(
                    write_layout, layout, ref, image, files, fetcher.store
                )
                _say(
                    req,
                    f"wrote {ref.reference} to the OCI layout {layout}: "
                    f"{format_bytes(total)} verified in {seconds:.1f}s",
                )
                return PullResult(ref, image, total, seconds)
            assert engine is not None
            image_id = await _load(engine, image, files)
        if ref.tag is not None:
            await engine.tag(image_id, docker_name(ref), ref.tag)
            shown = f"{docker_name(ref)}:{ref.tag}"
        else:
            shown = f"{image_id} (untagged: pulled by digest)"
        _say(
            req,
            f"loaded {shown} into Docker: {format_bytes(total)} verified in {seconds:.1f}s "
            f"({format_rate(total / max(seconds, 1e-6))})",
        )
        return PullResult(ref, image, total, seconds, image_id)
    raise AssertionError("unreachable")


async def _load(engine: DockerEngine, image: ImageManifest, files: dict[Digest, Path]) -> str:
    members = docker_archive_members(image, files)
    size = tar_stream_size(members)
    ids = await engine.load(tar_stream(members), size)
    want = str(image.config.digest)
    # An engine that reports nothing (or something else): look for the image itself.
    if want not in ids and await engine.inspect(want) is None:
        raise DockerError(
            f"docker load did not create image {want} (it reported {ids or 'nothing'})"
        )
    return want
