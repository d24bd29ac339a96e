"""``p2pdist get``: one blob, manifest or URL to a file, every byte verified on the way.

Nothing appears at the output path until the content is complete and verified: data is
assembled in the piece store (or a temp file beside the output) and moved into place with
one ``rename``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import trio

from .config import NodeConfig
from .digest import Digest
from .download import DownloadStats, FileSink, ProgressFn, download, download_blob
from .errors import (
    DigestMismatch,
    NetworkError,
    NotFound,
    P2PDistError,
    UpstreamError,
    UsageError,
)
from .progress import ProgressBar, format_bytes, format_rate
from .reference import Reference, parse_reference
from .registry import RegistryClient
from .store import PieceStore
from .urlsource import UrlSource, make_http_client

__all__ = ["GetRequest", "run_get"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GetRequest:
    target: str
    output: str
    manifest: bool = False
    digest: Digest | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    insecure: bool = False
    platform: str | None = None
    progress: bool = True
    quiet: bool = False
    daemon: str | None = None


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@contextlib.contextmanager
def _atomic_output(output: str) -> Iterator[tuple[BinaryIO, Path | None]]:
    """A file to write into that appears at ``output`` only if the block succeeds.
    ``-`` is standard output."""
    if output == "-":
        yield sys.stdout.buffer, None
        sys.stdout.buffer.flush()
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"output {output!r} is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
    except FileNotFoundError:
        raise UsageError(f"output directory {str(directory)!r} does not exist") from None
    except PermissionError:
        raise UsageError(f"cannot write to {str(directory)!r}: permission denied") from None
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp_path
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cat(path: Path) -> None:
    with open(path, "rb") as inp:
        shutil.copyfileobj(inp, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()


def _place(store: PieceStore, digest: Digest, src: Path, output: str) -> None:
    """Put a verified blob at ``output`` atomically: a hard link to the store's read-only
    copy when on the same filesystem (no second write of the bytes), else a copy."""
    if output == "-":
        _cat(src)
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"output {output!r} is a directory")
    directory = target.parent
    if not directory.is_dir():
        raise UsageError(f"output directory {str(directory)!r} does not exist")
    tmp = directory / f".{target.name}.{os.getpid()}.{id(src):x}.part"
    try:
        store.export(digest, tmp)
        os.replace(tmp, target)
    except PermissionError:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write to {str(directory)!r}: permission denied") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _say(req: GetRequest, text: str) -> None:
    if not req.quiet:
        print(text, file=sys.stderr)


def _progress(req: GetRequest, label: str) -> ProgressBar | None:
    if req.quiet or not req.progress or not sys.stderr.isatty():
        return None
    return ProgressBar(label)


def _summary(
    req: GetRequest,
    what: str,
    digest: Digest | None,
    stats: DownloadStats,
    *,
    verified: bool = True,
) -> None:
    detail = f"{format_bytes(stats.size)}"
    if stats.received:
        detail += f" in {stats.seconds:.2f}s ({format_rate(stats.rate)})"
    elif stats.reused:
        detail += " (already in the local store)"
    state = "verified" if verified else "fetched (not verified: no --digest)"
    _say(req, f"{what} {digest if digest else ''} {state}, {detail}".replace("  ", " "))


def _check_output(output: str) -> None:
    """Refuse an unusable ``-O`` before anything is downloaded."""
    if output == "-":
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"output {output!r} is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"output directory {str(target.parent)!r} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise UsageError(f"cannot write to {str(target.parent)!r}: permission denied")


async def run_get(req: GetRequest, config: NodeConfig) -> None:
    _check_output(req.output)
    if _is_url(req.target):
        await _get_url(req, config)
        return
    ref = parse_reference(req.target, default_tag=None)
    if req.manifest:
        await _get_manifest(req, config, ref)
    elif req.daemon and ref.digest is not None:
        query = {"registry": ref.api_host, "repository": ref.repository}
        await _get_via_daemon(req, ref.digest, query)
    else:
        await _get_blob(req, config, ref)


def _client(config: NodeConfig, ref: Reference, insecure: bool) -> RegistryClient:
    reg = config.registry(ref.api_host)
    if insecure:
        from dataclasses import replace

        reg = replace(reg, insecure=True)
    return RegistryClient(
        reg,
        platform=config.platform,
        docker_config=config.docker_config,
        max_connections=max(8, config.concurrency * 2),
    )


async def _get_manifest(req: GetRequest, config: NodeConfig, ref: Reference) -> None:
    if ref.tag is None and ref.digest is None:
        ref = Reference(ref.registry, ref.repository, "latest", None)
    async with _client(config, ref, req.insecure) as client:
        if req.platform:
            image = await client.resolve_image(ref.repository, ref.reference, platform=req.platform)
            data, media_type, digest = image.data, image.media_type, image.digest
        else:
            manifest = await client.get_manifest(ref.repository, ref.reference)
            data, media_type, digest = manifest.data, manifest.media_type, manifest.digest
    with _atomic_output(req.output) as (out, _):
        out.write(data)
    _say(req, f"manifest {digest} ({media_type}) verified, {len(data)} bytes")


async def _get_blob(req: GetRequest, config: NodeConfig, ref: Reference) -> None:
    if ref.digest is None:
        raise UsageError(
            f"{req.target!r} names no blob: use REGISTRY/REPO@sha256:<hex>, "
            "or add --manifest to fetch a manifest"
        )
    store = await trio.to_thread.run_sync(PieceStore, config.data_dir)
    bar = _progress(req, f"{ref.digest.hex[:12]}")
    async with _client(config, ref, req.insecure) as client:
        source = client.blob_source(ref.repository, ref.digest)
        try:
            path, stats = await download_blob(
                source,
                store,
                ref.digest,
                piece_size=config.piece_size,
                concurrency=config.concurrency,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
    await trio.to_thread.run_sync(_place, store, ref.digest, path, req.output)
    _summary(req, "blob", ref.digest, stats)


async def _get_via_daemon(req: GetRequest, digest: Digest, query: dict[str, str]) -> None:
    """Through the local daemon: it fetches through the swarm and streams the blob as its
    pieces complete in order; we hash the stream too and place the file only if it is
    the digest.  A stream cut short or failing the digest (the daemon found a poisoned
    piece-hash list and started over) is asked for once more."""
    try:
        await _get_via_daemon_once(req, digest, query)
    except (DigestMismatch, NetworkError) as exc:
        _say(req, f"retrying through the daemon: {exc}")
        await _get_via_daemon_once(req, digest, query)


async def _get_via_daemon_once(req: GetRequest, digest: Digest, query: dict[str, str]) -> None:
    assert req.daemon is not None
    params: list[tuple[str, str | int | float | bool | None]] = list(query.items())
    params += [("header", f"{k}: {v}") for k, v in req.headers.items()]
    if req.insecure:
        params.append(("insecure", "1"))
    url = f"{req.daemon.rstrip('/')}/api/v1/blobs/{digest}"
    bar = _progress(req, digest.hex[:12])
    h = digest.hasher()
    received = 0
    started = time.perf_counter()
    try:
        async with (
            httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(None, connect=5.0)) as c,
            c.stream("GET", url, params=params) as resp,
        ):
            if resp.status_code != 200:
                await resp.aread()
                raise _daemon_error(resp)
            size = int(resp.headers.get("content-length", "0"))
            with _atomic_output(req.output) as (out, _):
                async for chunk in resp.aiter_raw():
                    h.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar(received, size)
                if received != size:
                    raise NetworkError(f"daemon stream ended after {received} of {size} bytes")
                if h.hexdigest() != digest.hex:
                    raise DigestMismatch(f"blob from the daemon does not match {digest}")
    except httpx.TransportError as exc:
        raise NetworkError(f"daemon at {req.daemon}: {type(exc).__name__}: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    stats = DownloadStats(size=received, received=received, seconds=time.perf_counter() - started)
    _summary(req, "blob", digest, stats)


def _daemon_error(resp: httpx.Response) -> P2PDistError:
    try:
        message = resp.json()["errors"][0]["message"]
    except Exception:
        message = resp.text[:200]
    status = resp.status_code
    if status == 404:
        return NotFound(f"daemon: {message}", status=status)
    if status in (400, 405):
        return UsageError(f"daemon: {message}")
    return UpstreamError(f"daemon: {message}", status=status)


async def _get_url(req: GetRequest, config: NodeConfig) -> None:
    if req.daemon and req.digest is not None:
        await _get_via_daemon(req, req.digest, {"url": req.target})
        return
    async with make_http_client(
        insecure=req.insecure, max_connections=max(8, config.concurrency * 2)
    ) as http:
        source = UrlSource(http, req.target, headers=req.headers)
        bar = _progress(req, Path(httpx.URL(req.target).path).name or "download")
        try:
            if req.digest is not None:
                store = await trio.to_thread.run_sync(PieceStore, config.data_dir)
                path, stats = await download_blob(
                    source,
                    store,
                    req.digest,
                    piece_size=config.piece_size,
                    concurrency=config.concurrency,
                    progress=bar,
                )
                await trio.to_thread.run_sync(_place, store, req.digest, path, req.output)
                _summary(req, "file", req.digest, stats)
            else:
                await _get_url_unverified(req, config, source, bar)
        finally:
            if bar is not None:
                bar.close()


async def _get_url_unverified(
    req: GetRequest, config: NodeConfig, source: UrlSource, bar: ProgressFn | None
) -> None:
    """No ``--digest``: fetch into a temp file beside the output, report its sha256."""
    info = await source.probe()
    directory = Path(req.output).parent if req.output != "-" else Path(tempfile.gettempdir())
    if info.size is None:
        await _stream_unsized(req, source, bar)
        return
    from .pieces import piece_size_for

    sink = FileSink(directory, info.size, piece_size_for(info.size, config.piece_size))
    try:
        path, stats = await download(
            source, sink, info=info, concurrency=config.concurrency, progress=bar
        )
        if req.output == "-":
            await trio.to_thread.run_sync(_cat, path)
            path.unlink()
        else:
            os.chmod(path, 0o644 & ~_umask())
            os.replace(path, req.output)
    except BaseException:
        sink.discard()
        raise
    _say(req, "warning: no --digest given, so the content could not be verified")
    _summary(req, "file", sink.digest, stats, verified=False)


async def _stream_unsized(req: GetRequest, source: UrlSource, bar: ProgressFn | None) -> None:
    """An origin that announces no size (chunked): one stream into the output's temp file."""
    h = hashlib.sha256()
    received = 0
    with _atomic_output(req.output) as (out, _):
        async with source.open_range(0, None) as stream:
            async for chunk in stream:
                h.update(chunk)
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar(received, None)
    _say(req, "warning: no --digest given, so the content could not be verified")
    _say(req, f"file sha256:{h.hexdigest()}, {format_bytes(received)}")
