"""The registry pull-through proxy: container runtimes pull through the node's swarm.

The daemon serves it on ``--proxy-listen`` (default ``127.0.0.1:65001``).  It speaks the
pull side of the OCI distribution API, so dockerd (``registry-mirrors``) and containerd
(``hosts.toml``) use it as if it were the registry:

* ``GET /v2/`` — ``200 {}``, or the upstream's ``401`` challenge (see *Auth*);
* ``GET``/``HEAD /v2/<name>/manifests/<tag|digest>`` — forwarded with the client's
  ``Accept`` (docker-registry answers ``400 MANIFEST_INVALID`` when it lacks the stored
  type).  By digest, the bytes must hash to it; they are then kept (memory and disk,
  digest-keyed, re-verified when read back) so a repeat never leaves the node.  By tag,
  resolved upstream on every request (or within ``proxy_tag_ttl`` seconds), and answered
  from the cache when the upstream is unreachable or failing;
* ``GET``/``HEAD /v2/<name>/blobs/<digest>`` — through the node's swarm
  (:meth:`Node.fetch`): **streamed as pieces complete in order**, the blob's final byte
  only after the whole blob matched its digest (:func:`stream_job`, shared with the
  daemon's local API), so a client never receives a complete body that failed the check.
  A blob already complete on the node is sent from disk (``sendfile``).  ``Range`` → 206.
  ``HEAD`` of a blob the node lacks asks the upstream (no download);
* every success carries ``Content-Type``, ``Content-Length`` and ``Docker-Content-Digest``;
  failures are OCI error bodies (``BLOB_UNKNOWN``/``MANIFEST_UNKNOWN`` 404,
  ``NAME_INVALID``/``DIGEST_INVALID``/``TAG_INVALID`` 400, ``UNAUTHORIZED`` 401,
  ``DENIED`` 403, ``UNSUPPORTED`` 405 for writes, ``TOOMANYREQUESTS`` 429, ``UNAVAILABLE``
  502/503 when the upstream fails or cannot be reached).

**Imported tags** (``p2pdist import``, air-gapped seeding): a tag recorded in
:class:`ImportedTags` is answered from the node when the request has no upstream (no
``--upstream`` and no ``?ns=``) or the upstream does not know the tag or cannot be asked
(404, 429, 502, 503); the manifest comes from the :class:`ManifestCache` and the blobs from
the store, so such an image is served with no registry at all.

**Upstream.**  containerd's ``?ns=<host>`` picks the registry per request (``docker.io`` →
``registry-1.docker.io``); without it, ``--upstream URL``.  Each host's URL, TLS settings
and credentials come from ``[registries."HOST"]`` (loopback hosts speak plain http).

**Auth.**  When the proxy holds credentials for the upstream (config, environment or
``~/.docker/config.json``), it uses them and ignores the client's.  Otherwise the
client's ``Authorization`` is passed upstream unchanged and the upstream's ``401`` (with
its ``WWW-Authenticate`` challenges) is passed back — also for ``GET /v2/``, where dockerd
learns the challenge — so each user pulls with their own rights.  A blob the node does not
have is first ``HEAD``-ed upstream with the client's credentials (its size, and the
access check); the swarm then fetches it with the client's ``Authorization`` (for a
bearer token, only while that token is valid), or anonymously when the client sent none.

**What is served without asking the upstream.**  Content-addressed data the node already
holds — complete blobs and manifests by digest — is served to any client of the proxy
without an upstream access check: digests are not secrets, and the node's peer port
serves the same blobs to any peer anyway (see the README on private images).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import quote

import httpx
import trio

from .config import NodeConfig, RegistryConfig
from .digest import Digest, sha256_digest
from .errors import InvalidDigest, ManifestInvalid, NetworkError, StoreFull, UpstreamError
from .httpserver import (
    FileBody,
    FileChunk,
    HTTPError,
    Request,
    Response,
    content_range,
    file_response,
    parse_range,
)
from .node import BlobOrigin, Job, Node
from .reference import DOCKER_HUB, DOCKER_HUB_API, is_valid_repository, is_valid_tag
from .registry import (
    ALL_MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    ImageManifest,
    RegistryClient,
    RetryPolicy,
    parse_manifest,
    resolve_credentials,
)
from .registry._http import open_response, read_capped
from .store import PieceStore

__all__ = [
    "API_VERSION_HEADER",
    "CachedManifest",
    "ImportedTags",
    "ManifestCache",
    "RegistryProxy",
    "job_size",
    "leased_blob_response",
    "stream_job",
    "upstream_host",
    "with_upstream_registry",
]

log = logging.getLogger("p2pdist.proxy")

_cache_hit: contextvars.ContextVar[bool] = contextvars.ContextVar("proxy_hit", default=False)
"""Set while a request is answered from the node's store or manifest cache (metrics)."""

API_VERSION_HEADER: Final = ("Docker-Distribution-API-Version", "registry/2.0")
_STREAM_POLL: Final = 0.25
_MAX_ERROR_BODY: Final = 64 << 10
_PING_TIMEOUT: Final = 5.0
_PATH = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)")
_TAGS_PATH = re.compile(r"/v2/(?P<name>.+)/tags/list")
_MAX_TAGS_BODY: Final = 4 << 20
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
_GENERIC_TYPES: Final = ("", "application/json", "application/octet-stream", "text/plain")
_PASSED_HEADERS: Final = ("www-authenticate", "retry-after")


# -- serving a Job over HTTP (shared with the daemon's local API) -------------------------


def job_error(error: BaseException) -> HTTPError:
    """The answer for a download that failed: 404 when the upstream has no such blob (or
    will not say), 507 when this node's disk is full, else 502."""
    if isinstance(error, StoreFull):
        return HTTPError(507, f"this node cannot store the blob: {error}", code="UNAVAILABLE")
    status = 404 if getattr(error, "exit_code", 0) == 3 else 502
    return HTTPError(status, str(error))


async def job_size(job: Job) -> int:
    """The blob's size as soon as the job knows it (HTTPError if the job failed first:
    404 for not found / unauthorized upstream, else 502)."""
    while job.plan is None:
        if job.done.is_set():
            if job.error is not None:
                raise job_error(job.error)
            break
        await job.changed.wait()
    if job.plan is None:
        raise HTTPError(500, "download finished without a size")
    return job.plan.size


async def stream_job(
    node: Node, job: Job, size: int, start: int = 0, end: int | None = None
) -> AsyncIterator[bytes | FileChunk]:
    """Bytes ``[start, end)`` of the job's blob in order, each stretch as soon as its
    pieces are verified, sent from the file with ``sendfile`` (:class:`FileChunk`); the
    range's final byte only after the whole blob matched its digest.  If the download
    fails the stream stops short (HTTPError), so the client sees a truncated body (or,
    before the first byte, an error status)."""
    # The blob is not evicted while it is being streamed (the cache GC waits for us).
    node.store.acquire(job.digest)
    try:
        async for item in _stream_job(job, start, size if end is None else end):
            yield item
    finally:
        node.store.release(job.digest)


async def _stream_job(job: Job, start: int, stop: int) -> AsyncIterator[bytes | FileChunk]:
    sent = start
    attempt = job.attempt
    changes = job.changes
    while sent < stop:
        if job.attempt != attempt and sent > start:
            # The swarm's bytes failed the whole-blob check and the download started
            # over: what was already sent cannot be trusted.  Cut the stream.
            raise HTTPError(502, f"blob {job.digest} failed its digest check; retry")
        if job.changes != changes:
            if sent > start:
                # Pieces we may have sent were un-verified (bad on disk) or the task was
                # replaced: the bytes sent may not be the blob's.  Cut the stream.
                raise HTTPError(502, f"blob {job.digest}: verified data changed; retry")
            changes = job.changes
        changed = job.changed
        opened = job.open_verified(beyond=sent)
        if opened is not None:
            fd, ready = opened
            if job.attempt != attempt:
                # The download started over as we opened it: nothing sent yet, so
                # follow the new attempt; else the check above cuts the stream.
                os.close(fd)
                if sent == start:
                    attempt = job.attempt
                continue
            if job.path is None and not job.digest_ok:
                # The last byte asked for waits for the whole-blob digest check: a client
                # never gets a complete body (or range) of a blob that then fails it.
                ready = min(ready, stop - 1)
            upto = min(ready, stop)
            if upto > sent:
                yield FileChunk(fd, sent, upto - sent)  # the server sends and closes it
                sent = upto
                continue
            os.close(fd)
        if job.done.is_set():
            if job.error is not None:
                raise job_error(job.error)
            if job.verified_prefix() <= sent or opened is None:
                # Finished, but the bytes are not there (the blob was removed meanwhile,
                # found corrupt): cut the stream rather than look again forever.
                raise HTTPError(502, "blob data went away")
            continue
        # The job wakes us when it changes; the registry-only download path reports bytes
        # as they arrive, before their piece is stored and verified, so also look again
        # now and then: a stalled upstream must not hold back bytes already verified.
        with trio.move_on_after(_STREAM_POLL):
            await changed.wait()


async def leased_blob_response(
    store: PieceStore, digest: Digest, request: Request, headers: list[tuple[str, str]]
) -> Response | None:
    """The complete blob (or the ``Range`` asked for) from the store, zero-copy, with a
    lease on it until the body is sent or abandoned (the cache GC leaves it alone); None
    if the store does not have it (also: evicted just now)."""
    store.acquire(digest)
    handed_over = False
    try:
        path = await trio.to_thread.run_sync(store.checked_blob_path, digest)
        if path is None:
            return None
        try:
            response = file_response(path, request.headers.get("range"), headers)
        except FileNotFoundError:
            return None
        assert isinstance(response.body, FileBody)
        response.body = replace(response.body, on_done=partial(store.release, digest))
        handed_over = True
        return response
    finally:
        if not handed_over:
            store.release(digest)


# -- upstream configuration -----------------------------------------------------------------


def upstream_host(url: str) -> str:
    """``https://registry-1.docker.io`` → ``registry-1.docker.io``; ``http://127.0.0.1:5000``
    → ``127.0.0.1:5000``: the host key of ``[registries]`` and of the registry clients."""
    return url.split("://", 1)[-1].rstrip("/")


def with_upstream_registry(config: NodeConfig) -> NodeConfig:
    """``config`` with a ``[registries]`` entry making ``upstream``'s scheme stick (e.g. a
    plain-http registry on a non-loopback host); unchanged when the default already fits."""
    if not config.upstream:
        return config
    host = upstream_host(config.upstream)
    reg = config.registries.get(host) or RegistryConfig(host=host)
    if reg.base_url == config.upstream.rstrip("/"):
        return config
    registries = {**config.registries, host: replace(reg, url=config.upstream)}
    return replace(config, registries=registries)


# -- manifest cache -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedManifest:
    digest: Digest
    media_type: str
    data: bytes


class ManifestCache:
    """Manifests by digest, verified: the most recent ``max_entries`` in memory, all on disk
    under ``root/<algorithm>/<hex>`` (the media type, a newline, the bytes; written
    atomically).  What is read back from disk is re-hashed; a file that no longer matches
    is removed.  Only bytes that hash to their digest are ever put in."""

    def __init__(self, root: Path, *, max_entries: int = 4096) -> None:
        self.root = root
        self._memory: OrderedDict[Digest, CachedManifest] = OrderedDict()
        self._max = max_entries

    def _path(self, digest: Digest) -> Path:
        return self.root / digest.algorithm / digest.hex

    def _remember(self, manifest: CachedManifest) -> None:
        self._memory[manifest.digest] = manifest
        self._memory.move_to_end(manifest.digest)
        while len(self._memory) > self._max:
            self._memory.popitem(last=False)

    async def get(self, digest: Digest) -> CachedManifest | None:
        found = self._memory.get(digest)
        if found is not None:
            self._memory.move_to_end(digest)
            return found
        found = await trio.to_thread.run_sync(self._load, digest)
        if found is not None:
            self._remember(found)
        return found

    def put_blocking(self, digest: Digest, media_type: str, data: bytes) -> CachedManifest:
        """:meth:`put` to disk only, from a thread or another process (``p2pdist import``)."""
        if not digest.matches(data) or "\n" in media_type:
            raise ValueError(f"refusing to cache bytes that do not match {digest}")
        manifest = CachedManifest(digest, media_type, data)
        self._save(manifest)
        return manifest

    async def put(self, digest: Digest, media_type: str, data: bytes) -> CachedManifest:
        if not digest.matches(data) or "\n" in media_type:
            raise ValueError(f"refusing to cache bytes that do not match {digest}")
        manifest = CachedManifest(digest, media_type, data)
        self._remember(manifest)
        try:
            await trio.to_thread.run_sync(self._save, manifest)
        except OSError as exc:  # the memory copy still serves; the disk is a bonus
            log.warning("cannot write manifest %s to %s: %s", digest, self.root, exc)
        return manifest

    def _load(self, digest: Digest) -> CachedManifest | None:
        path = self._path(digest)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        media_type, sep, data = raw.partition(b"\n")
        if not sep or not digest.matches(data):
            log.warning("cached manifest %s is corrupt: removed it", digest)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return CachedManifest(digest, media_type.decode("utf-8", "replace"), data)

    def _save(self, manifest: CachedManifest) -> None:
        path = self._path(manifest.digest)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(manifest.media_type.encode() + b"\n" + manifest.data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@dataclass(frozen=True, slots=True)
class _TagEntry:
    digest: Digest
    media_type: str
    size: int
    at: float


class ImportedTags:
    """Tags recorded by ``p2pdist import``: one JSON file per tag,
    ``root/<repository>/_tags/<tag>`` = ``{"digest", "media_type", "size", "registry"}``,
    written atomically (``_tags`` cannot be a repository component, so no repository's
    files collide with another's).  Keyed by repository path only: a client naming any
    registry (or none, as dockerd's ``registry-mirrors`` does) gets the imported tag.  The
    manifest's bytes live in the :class:`ManifestCache` (verified there)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str, tag: str) -> Path:
        if not is_valid_repository(name) or not is_valid_tag(tag):
            raise ValueError(f"invalid repository or tag {name[:80]!r}:{tag[:80]!r}")
        return self.root / name / "_tags" / tag

    def get(self, name: str, tag: str) -> _TagEntry | None:
        try:
            raw = json.loads(self._path(name, tag).read_bytes())
            digest = Digest.parse(str(raw["digest"]))
            media_type, size = str(raw["media_type"]), int(raw["size"])
        except (OSError, ValueError, KeyError, TypeError, InvalidDigest):
            return None
        return _TagEntry(digest, media_type, size, 0.0)

    def set(self, name: str, tag: str, manifest: CachedManifest, registry: str = "") -> Path:
        path = self._path(name, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "digest": str(manifest.digest),
            "media_type": manifest.media_type,
            "size": len(manifest.data),
            "registry": registry,
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(doc) + "\n")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path


# -- the proxy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Upstream:
    host: str
    name: str
    client: RegistryClient
    own_credentials: bool
    """The proxy authenticates with its own credentials (the client's are not sent)."""
    authorization: str | None
    """The client's Authorization, passed through (only without own credentials)."""

    @property
    def what(self) -> str:
        return f"{self.host}/{self.name}" if self.name else self.host


class RegistryProxy:
    """The proxy's request handler (``serve_http(proxy.handle, ...)``) over a node."""

    def __init__(
        self,
        node: Node,
        *,
        upstream: str | None = None,
        tag_ttl: float = 0.0,
        cache_dir: Path | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.node = node
        self.default_host = upstream_host(upstream) if upstream else None
        self.tag_ttl = tag_ttl
        self.manifests = ManifestCache(cache_dir or node.config.data_dir / "proxy" / "manifests")
        self.imported = ImportedTags(node.config.data_dir / "proxy" / "tags")
        # Quick retries only: the runtime behind us retries too, and a 429 goes straight
        # back to it (with its Retry-After).
        self.retry = retry or RetryPolicy(attempts=3, base=0.1, cap=1.0, max_retry_after=0.0)
        self._tags: dict[tuple[str, str, str], _TagEntry] = {}
        self._sizes: dict[Digest, int] = {}
        """Blob sizes from the image manifests served: what a blob GET falls back on when
        the upstream cannot be asked (its bytes may still come from peers)."""
        self._own_credentials: dict[str, bool] = {}

    async def handle(self, request: Request) -> Response:
        token = _cache_hit.set(False)
        status: int | None = None  # None: cancelled (the client went away)
        try:
            response = await self._route(request)
            status = response.status
        except HTTPError as exc:
            status = exc.status
            exc.headers.append(API_VERSION_HEADER)
            raise
        except Exception:
            status = 500  # what the server answers to a handler's bug
            raise
        finally:
            if status is not None and request.path.startswith("/v2"):
                self.node.metrics.record_proxy(status, _cache_hit.get())
            _cache_hit.reset(token)
        response.headers.append(API_VERSION_HEADER)
        return response

    async def _route(self, request: Request) -> Response:
        path = request.path
        if path in ("/healthz", "/readyz"):
            return Response.json({"status": "ok"})
        if path != "/v2" and not path.startswith("/v2/"):
            raise HTTPError(404, "not found", code="NOT_FOUND")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(
                405,
                f"{request.method} is not supported: this is a pull-only registry mirror",
                code="UNSUPPORTED",
                headers=[("Allow", "GET, HEAD")],
            )
        if path in ("/v2", "/v2/"):
            return await self._ping(request)
        tags = _TAGS_PATH.fullmatch(path)
        if tags is not None:
            return await self._tags_list(request, tags["name"])
        m = _PATH.fullmatch(path)
        if m is None:
            raise HTTPError(404, "not supported by the p2pdist proxy", code="UNSUPPORTED")
        name, kind, ref = m["name"], m["kind"], m["ref"]
        if not is_valid_repository(name):
            raise HTTPError(400, f"invalid repository name {name[:80]!r}", code="NAME_INVALID")
        if kind == "blobs":
            return await self._blob(request, name, _parse_digest(ref))
        if ":" in ref:
            return await self._manifest(request, name, _parse_digest(ref), None)
        if not is_valid_tag(ref):
            raise HTTPError(400, f"invalid tag {ref[:80]!r}", code="TAG_INVALID")
        return await self._manifest(request, name, None, ref)

    # -- upstream ------------------------------------------------------------------------

    def _registry_host(self, request: Request) -> str:
        ns = request.query.get("ns")
        if ns:
            host = ns[0].strip()
            if _HOST.fullmatch(host) is None:
                raise HTTPError(400, f"invalid ns {host[:80]!r}", code="NAME_INVALID")
            return DOCKER_HUB_API if host == DOCKER_HUB else host
        if self.default_host is None:
            raise HTTPError(
                404,
                "no upstream registry: pass ?ns=HOST or start the daemon with --upstream",
                code="NAME_UNKNOWN",
            )
        return self.default_host

    async def _upstream(self, request: Request, name: str) -> _Upstream:
        host = self._registry_host(request)
        client = await self.node.registry_client(host)
        own = self._own_credentials.get(host)
        if own is None:
            config = self.node.config
            own = not resolve_credentials(config.registry(host), config.docker_config).empty
            self._own_credentials[host] = own
        authorization = None if own else request.headers.get("authorization")
        return _Upstream(host, name, client, own, authorization)

    async def _open(
        self, up: _Upstream, method: str, path: str, headers: Mapping[str, str]
    ) -> httpx.Response:
        """An open upstream response (the caller closes it).  Raises HTTPError for an
        unreachable or failing upstream."""
        try:
            if up.own_credentials:
                # The registry client's own auth: the proxy's credentials, Basic or tokens.
                return await up.client._open(
                    method, path, repo=up.name, headers=dict(headers), what=up.what
                )
            authorization = up.authorization

            async def auth() -> str | None:
                return authorization

            return await open_response(
                up.client.http,
                method,
                up.client.base_url + path,
                headers=headers,
                retry=self.retry,
                what=up.what,
                auth=auth,
            )
        except (NetworkError, UpstreamError) as exc:
            raise _gateway_error(exc) from None

    async def _refuse(self, up: _Upstream, response: httpx.Response, code404: str) -> HTTPError:
        """The upstream's non-200 answer as ours: its status (4xx), its OCI error body and
        its ``WWW-Authenticate``/``Retry-After``; 5xx and oddities become 502."""
        status = response.status_code
        body: bytes | None = None
        if response.request.method != "HEAD":
            with contextlib.suppress(NetworkError):
                raw = await read_capped(response, _MAX_ERROR_BODY, up.what)
                if raw is not None and _is_oci_error(raw):
                    body = raw
        headers = [
            (name.title(), value)
            for name in _PASSED_HEADERS
            for value in response.headers.get_list(name)
        ]
        code = {401: "UNAUTHORIZED", 403: "DENIED", 404: code404, 429: "TOOMANYREQUESTS"}.get(
            status
        )
        if not 400 <= status < 500:
            status, body, code = 502, None, "UNAVAILABLE"
        return HTTPError(
            status,
            f"upstream {up.what}: HTTP {response.status_code}",
            body=body,
            headers=headers,
            code=code,
        )

    # -- /v2/ ----------------------------------------------------------------------------

    async def _tags_list(self, request: Request, name: str) -> Response:
        """``GET /v2/<name>/tags/list[?n=&last=]`` from the upstream, as it answers (tools
        such as skopeo ask; runtimes do not).  Imported images have no list: 404."""
        if not is_valid_repository(name):
            raise HTTPError(400, f"invalid repository name {name[:80]!r}", code="NAME_INVALID")
        up = await self._upstream(request, name)
        params = [
            (key, request.query[key][0])
            for key in ("n", "last")
            if request.query.get(key) and len(request.query[key][0]) <= 256
        ]
        query = "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params) if params else ""
        response = await self._open(
            up, "GET", f"/v2/{name}/tags/list{query}", {"Accept": "application/json"}
        )
        try:
            if response.status_code != 200:
                raise await self._refuse(up, response, "NAME_UNKNOWN")
            try:
                body = await read_capped(response, _MAX_TAGS_BODY, f"tags of {up.what}")
            except NetworkError as exc:
                raise _gateway_error(exc) from None
            link = response.headers.get("link")
        finally:
            await response.aclose()
        if body is None:
            raise HTTPError(502, f"tags of {up.what}: larger than {_MAX_TAGS_BODY} bytes")
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if link and link.startswith("</v2/"):
            headers.append(("Link", link))
        if request.method == "HEAD":
            return Response(200, headers, b"")
        return Response(200, headers, body)

    async def _ping(self, request: Request) -> Response:
        ok = Response.json({})
        if self.default_host is None and not request.query.get("ns"):
            return ok
        up = await self._upstream(request, "")
        if up.own_credentials:
            return ok
        # dockerd learns the registry's auth challenge from this ping: pass it on.
        with trio.move_on_after(_PING_TIMEOUT):
            try:
                response = await self._open(up, "GET", "/v2/", {})
            except HTTPError:
                return ok  # upstream down: what the node holds can still be served
            try:
                if response.status_code == 401:
                    raise await self._refuse(up, response, "UNAUTHORIZED")
            finally:
                await response.aclose()
        return ok

    # -- manifests -------------------------------------------------------------------------

    async def _manifest(
        self, request: Request, name: str, digest: Digest | None, tag: str | None
    ) -> Response:
        head = request.method == "HEAD"
        if digest is not None:
            cached = await self.manifests.get(digest)
            if cached is not None:
                _cache_hit.set(True)
                self._note_sizes(cached.media_type, cached.data)
                return _manifest_response(cached.digest, cached.media_type, cached.data, head)
        accept = request.headers.get("accept") or ", ".join(ALL_MANIFEST_TYPES)
        try:
            up = await self._upstream(request, name)
        except HTTPError:  # no upstream for this request
            found = None if tag is None else await self._imported(name, tag, accept, head)
            if found is None:
                raise
            return found
        key = (up.host, name, tag or "")
        if tag is not None and self.tag_ttl > 0:
            entry = self._tags.get(key)
            if entry is not None and trio.current_time() - entry.at < self.tag_ttl:
                found = await self._from_tag_entry(entry, accept, head)
                if found is not None:
                    return found
        try:
            return await self._manifest_upstream(up, digest, tag, accept, head)
        except HTTPError as exc:
            if tag is None or exc.status not in (404, 429, 502, 503):
                raise
            entry = self._tags.get(key) if exc.status != 404 else None
            found = None if entry is None else await self._from_tag_entry(entry, accept, head)
            if found is None:
                found = await self._imported(name, tag, accept, head)
            if found is None:
                raise
            log.warning("%s:%s: upstream failing (%s); answered from cache", up.what, tag, exc)
            return found

    async def _imported(self, name: str, tag: str, accept: str, head: bool) -> Response | None:
        """The tag as ``p2pdist import`` recorded it, or None."""
        entry = await trio.to_thread.run_sync(self.imported.get, name, tag)
        return None if entry is None else await self._from_tag_entry(entry, accept, head)

    async def _from_tag_entry(self, entry: _TagEntry, accept: str, head: bool) -> Response | None:
        if not _accepts(accept, entry.media_type):
            return None
        if head:
            _cache_hit.set(True)
            return _manifest_head(entry.digest, entry.media_type, entry.size)
        cached = await self.manifests.get(entry.digest)
        if cached is None:
            return None
        _cache_hit.set(True)
        self._note_sizes(cached.media_type, cached.data)
        return _manifest_response(cached.digest, cached.media_type, cached.data, head=False)

    async def _manifest_upstream(
        self, up: _Upstream, digest: Digest | None, tag: str | None, accept: str, head: bool
    ) -> Response:
        ref = str(digest) if digest is not None else tag
        path = f"/v2/{up.name}/manifests/{ref}"
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        what = f"manifest {up.what}:{ref}"
        if head:
            response = await self._open(up, "HEAD", path, headers)
            try:
                if response.status_code != 200:
                    raise await self._refuse(up, response, "MANIFEST_UNKNOWN")
                claimed = _header_digest(response, what)
                length = response.headers.get("content-length", "")
                media_type = _media_type(response)
            finally:
                await response.aclose()
            if digest is not None and claimed is not None and claimed != digest:
                raise HTTPError(502, f"{what}: upstream says its digest is {claimed}")
            found = claimed or digest
            if found is not None and length.isdigit() and media_type not in _GENERIC_TYPES:
                if tag is not None:
                    self._remember_tag(up, tag, found, media_type, int(length))
                return _manifest_head(found, media_type, int(length))
            # The upstream left something out: GET it (and keep it).
        response = await self._open(up, "GET", path, headers)
        try:
            if response.status_code != 200:
                raise await self._refuse(up, response, "MANIFEST_UNKNOWN")
            claimed = _header_digest(response, what)
            media_type = _media_type(response)
            try:
                data = await read_capped(response, MAX_MANIFEST_SIZE, what)
            except NetworkError as exc:
                raise _gateway_error(exc) from None
        finally:
            await response.aclose()
        if data is None:
            raise HTTPError(502, f"{what}: larger than {MAX_MANIFEST_SIZE} bytes")
        if digest is not None:
            if not digest.matches(data):
                raise HTTPError(502, f"{what}: upstream content does not match its digest")
            found = digest
        else:
            found = sha256_digest(data)
            if claimed is not None:
                if not claimed.matches(data):
                    raise HTTPError(
                        502, f"{what}: content does not match Docker-Content-Digest {claimed}"
                    )
                found = claimed
        media_type = _sniff_media_type(data, media_type)
        await self.manifests.put(found, media_type, data)
        self._note_sizes(media_type, data)
        if tag is not None:
            self._remember_tag(up, tag, found, media_type, len(data))
        return _manifest_response(found, media_type, data, head)

    def _remember_tag(
        self, up: _Upstream, tag: str, digest: Digest, media_type: str, size: int
    ) -> None:
        self._tags[(up.host, up.name, tag)] = _TagEntry(
            digest, media_type, size, trio.current_time()
        )

    def _note_sizes(self, media_type: str, data: bytes) -> None:
        try:
            parsed = parse_manifest(data, media_type)
        except ManifestInvalid:
            return
        if isinstance(parsed, ImageManifest):
            if len(self._sizes) > 100_000:
                self._sizes.clear()
            for desc in (parsed.config, *parsed.layers):
                self._sizes[desc.digest] = desc.size

    # -- blobs -----------------------------------------------------------------------------

    async def _blob(self, request: Request, name: str, digest: Digest) -> Response:
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Docker-Content-Digest", str(digest)),
            ("Accept-Ranges", "bytes"),
        ]
        local = await self._local_blob(request, digest, headers)
        if local is not None:
            return local
        job = self.node.job(digest)
        if job is None or (job.done.is_set() and job.error is not None):
            # Not on the node: the upstream says whether this client may have it, and
            # its size (so the download does not ask again).
            up = await self._upstream(request, name)
            try:
                size = await self._blob_size_upstream(up, digest)
            except HTTPError as exc:
                known = self._sizes.get(digest)
                if known is None or exc.status not in (429, 502, 503):
                    raise
                # The upstream cannot be asked; a manifest we served names the size, and
                # the swarm may have the bytes.
                log.warning("blob %s: upstream failing (%s); trying the swarm", digest, exc)
                size = known
            if request.method == "HEAD":
                return Response(200, [*headers, ("Content-Length", str(size))], b"")
            job = self.node.fetch(digest, self._origin(up, digest), size=size)
        else:
            size = await job_size(job)
        if request.method == "HEAD":
            return Response(200, [*headers, ("Content-Length", str(size))], b"")
        rng = parse_range(request.headers.get("range"), size)
        if rng is None:
            headers.append(("Content-Length", str(size)))
            return Response(200, headers, stream_job(self.node, job, size))
        start, end = rng
        headers += [
            ("Content-Length", str(end - start)),
            ("Content-Range", content_range(*rng, size)),
        ]
        return Response(206, headers, stream_job(self.node, job, size, start, end))

    async def _local_blob(
        self, request: Request, digest: Digest, headers: list[tuple[str, str]]
    ) -> Response | None:
        """The complete blob from the store (zero-copy), or None if the node lacks it."""
        response = await leased_blob_response(self.node.store, digest, request, headers)
        if response is not None:
            _cache_hit.set(True)
        return response

    async def _blob_size_upstream(self, up: _Upstream, digest: Digest) -> int:
        response = await self._open(
            up, "HEAD", f"/v2/{up.name}/blobs/{digest}", {"Accept-Encoding": "identity"}
        )
        try:
            if response.status_code != 200:
                raise await self._refuse(up, response, "BLOB_UNKNOWN")
            length = response.headers.get("content-length", "")
        finally:
            await response.aclose()
        if not length.isdigit():
            raise HTTPError(502, f"blob {digest} in {up.what}: upstream sent no size")
        return int(length)

    def _origin(self, up: _Upstream, digest: Digest) -> BlobOrigin:
        if up.authorization is None:
            return BlobOrigin(registry=up.host, repository=up.name)
        # The client's own rights: the swarm fetches from the registry with its header.
        insecure = self.node.config.registry(up.host).insecure
        url = f"{up.client.base_url}/v2/{up.name}/blobs/{digest}"
        return BlobOrigin(
            url=url, headers=(("Authorization", up.authorization),), insecure=insecure
        )


# -- helpers --------------------------------------------------------------------------------


def _parse_digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise HTTPError(400, str(exc), code="DIGEST_INVALID") from None


def _gateway_error(exc: NetworkError | UpstreamError) -> HTTPError:
    if isinstance(exc, UpstreamError) and exc.status == 429:
        return HTTPError(429, str(exc), code="TOOMANYREQUESTS", headers=[("Retry-After", "10")])
    status = 503 if isinstance(exc, NetworkError) else 502
    return HTTPError(status, f"upstream registry: {exc}", code="UNAVAILABLE")


def _is_oci_error(raw: bytes) -> bool:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("errors"), list)


def _media_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


def _sniff_media_type(data: bytes, header: str) -> str:
    if header not in _GENERIC_TYPES:
        return header
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return header or "application/octet-stream"
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(mt, str) and mt and "\n" not in mt:
        return mt
    return header or "application/json"


def _header_digest(response: httpx.Response, what: str) -> Digest | None:
    value = response.headers.get("docker-content-digest")
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except InvalidDigest:
        raise HTTPError(502, f"{what}: invalid Docker-Content-Digest from upstream") from None


def _accepts(accept: str, media_type: str) -> bool:
    """Whether an ``Accept`` header admits ``media_type`` (``*/*`` and ``type/*`` too)."""
    kind = media_type.split("/", 1)[0]
    for part in accept.split(","):
        mt = part.split(";", 1)[0].strip().lower()
        if mt in (media_type, "*/*", f"{kind}/*"):
            return True
    return False


def _manifest_head(digest: Digest, media_type: str, size: int) -> Response:
    return Response(
        200,
        [
            ("Content-Type", media_type),
            ("Content-Length", str(size)),
            ("Docker-Content-Digest", str(digest)),
        ],
        b"",
    )


def _manifest_response(digest: Digest, media_type: str, data: bytes, head: bool) -> Response:
    if head:
        return _manifest_head(digest, media_type, len(data))
    return Response(
        200, [("Content-Type", media_type), ("Docker-Content-Digest", str(digest))], data
    )
