"""``p2pdist daemon``: the node daemon.

It runs, in one trio nursery:

* the **peer server** (``--peer-listen``): verified pieces to other daemons
  (:mod:`p2pdist.peer`), zero-copy from the store, zstd when it pays, at most
  ``upload_slots`` uploads at once (more are refused with 503 and the child asks the
  scheduler for another parent);
* the **local API** (``--api-listen``, loopback by default) that ``p2pdist get --daemon``
  uses: ``GET /api/v1/blobs/<digest>?registry=HOST&repository=REPO`` (or ``?url=URL``)
  streams the blob **as its pieces complete in order** while the swarm fetches it, and
  ``GET /api/v1/blobs/<digest>/stats`` tells where its bytes came from;
* the **registry proxy** (``--proxy-listen``, loopback by default) that dockerd and
  containerd pull through (:mod:`p2pdist.proxy`);
* the link to the scheduler: registration, heartbeats, announcements, and the preheat
  jobs the scheduler orders in its answers to heartbeats (:mod:`p2pdist.preheater`);
* the cache GC (:meth:`Node.gc_forever`).

``SIGHUP`` reloads the config file (:func:`run_daemon`): the settings in
:data:`LIVE_SETTINGS` apply at once, to running transfers too; a change to any other one
is logged as needing a restart; a bad file is one error line and the running config stays.

Every listener answers ``GET /healthz`` (alive) and ``GET /readyz`` (:mod:`p2pdist.health`);
the local API also serves ``GET /metrics`` (:mod:`p2pdist.metrics`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Final, NoReturn
from urllib.parse import urlsplit

import httpx
import trio

from scheduler import Announce, HostLoad, RegisterHost

from . import __version__
from .clusterauth import check_token, token_headers
from .config import DEFAULT_PROXY_LISTEN, NodeConfig, split_hostport
from .digest import Digest
from .errors import InvalidDigest, P2PDistError, UsageError
from .health import StoreProbe, check_readiness
from .httpserver import (
    FileBody,
    HTTPError,
    Request,
    Response,
    ServerConfig,
    raise_open_file_limit,
    serve_http,
    serve_http_listeners,
)
from .logs import log_context
from .metrics import metrics_response
from .node import BlobOrigin, Node, open_node
from .peer import CompressionCache, PieceLocation, parse_piece_path
from .peerclient import PeerConnections
from .pieces import piece_size_for
from .preheater import Preheater
from .proxy import (
    RegistryProxy,
    job_size,
    leased_blob_response,
    stream_job,
    with_upstream_registry,
)
from .ratelimit import Slots
from .reference import is_valid_registry_host, is_valid_repository
from .schedclient import SchedulerClient

__all__ = [
    "LIVE_SETTINGS",
    "ConfigChanges",
    "DaemonInfo",
    "open_daemon",
    "reload_config",
    "run_daemon",
]

log = logging.getLogger("p2pdist.daemon")

_SAMPLE_BYTES = 64 << 10  # what decides whether a piece is worth compressing


#: What a config reload changes in a running daemon; anything else needs a restart.
LIVE_SETTINGS: Final = (
    "download_rate",
    "upload_rate",
    "source_rate",
    "upload_slots",
    "piece_timeout",
    "proxy_tag_ttl",
    "cache_ttl",
    "cache_quota",
    "cache_high_watermark",
    "cache_low_watermark",
    "gc_interval",
    "log_level",
)
_GC_SETTINGS: Final = {
    "cache_ttl",
    "cache_quota",
    "cache_high_watermark",
    "cache_low_watermark",
    "gc_interval",
}


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    """What :meth:`DaemonInfo.apply_config` did: settings applied live, and settings that
    changed in the file but need a restart (names only: some are secrets)."""

    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()


@dataclass
class DaemonInfo:
    host_id: str
    peer_url: str
    api_url: str
    node: Node
    uploaded: int = 0
    proxy_url: str | None = None
    """The registry proxy's base URL (None when it is off)."""
    apply_config: Callable[[NodeConfig], ConfigChanges] | None = None
    """Apply a re-read config to the running daemon (what ``SIGHUP`` does)."""


class _Daemon:
    def __init__(
        self,
        config: NodeConfig,
        node: Node,
        info: DaemonInfo,
        link: SchedulerClient | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.info = info
        self.link = link
        self.metrics = node.metrics
        self.listeners: dict[str, list[trio.SocketListener] | None] = {}
        """The peer server's and the proxy's sockets (None: off), for ``/readyz``."""
        self.store_probe = StoreProbe(config.data_dir)
        self.slots = Slots(config.upload_slots)
        self.zstd = CompressionCache()
        # Compressing reads a whole piece and holds its frame: two at a time bound that
        # memory (the other uploads wait, or go raw from the cache's verdicts).
        self.compressing = trio.CapacityLimiter(2)
        self.verify_lock = trio.Lock()
        self._last_load = (time.monotonic(), 0, 0, 0.0)
        self.verifying_recently: set[Digest] = set()
        # The registry API (``/v2/...?ns=HOST``) is served on the local API too, so that
        # ``p2pdist pull`` works with the proxy listener off.
        self.registry = RegistryProxy(node, upstream=config.upstream, tag_ttl=config.proxy_tag_ttl)
        self.metrics.watch(
            uploads=lambda: self.slots.in_use,
            downloads=node.active_downloads,
            store=self._store_size,
            scheduler=lambda: link is not None and link.reachable is True,
        )

    def _store_size(self) -> tuple[int, int]:
        blobs = self.node.store.list_blobs()
        return len(blobs), sum(size for _, size in blobs)

    # -- health -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``/healthz``: the process answers.  ``/readyz``: see :mod:`p2pdist.health`."""
        if request.path == "/healthz":
            return Response.json({"status": "ok", "host_id": self.info.host_id})
        ready = await check_readiness(
            host_id=self.info.host_id,
            probe=self.store_probe,
            listeners=self.listeners,
            scheduler=self.link.reachable if self.link is not None else None,
            scheduler_configured=self.link is not None,
        )
        return Response.json(ready.body, ready.status)

    async def proxy(self, request: Request) -> Response:
        """The registry proxy's listener: the proxy, and the health endpoints."""
        if request.path in ("/healthz", "/readyz"):
            return await self.health(request)
        return await self.registry.handle(request)

    # -- config reload ----------------------------------------------------------------------

    def apply_config(self, new: NodeConfig) -> ConfigChanges:
        """Apply the :data:`LIVE_SETTINGS` of ``new`` (a validated config) now: rate limits
        (running transfers too), upload slots, piece timeout, tag TTL, cache GC, log level.
        The other settings keep their running values; the names of those that differ are
        returned (and logged by the caller) as needing a restart."""
        new = with_upstream_registry(new)
        old = self.config
        applied = tuple(k for k in LIVE_SETTINGS if getattr(new, k) != getattr(old, k))
        restart = tuple(
            f.name
            for f in fields(NodeConfig)
            if f.name not in LIVE_SETTINGS and getattr(new, f.name) != getattr(old, f.name)
        )
        config = replace(old, **{k: getattr(new, k) for k in applied})
        self.config = self.node.config = config
        self.node.bandwidth.set_rates(
            download=config.download_rate, upload=config.upload_rate, source=config.source_rate
        )
        self.slots.limit = config.upload_slots
        self.registry.tag_ttl = config.proxy_tag_ttl
        if "log_level" in applied:
            logging.getLogger().setLevel((config.log_level or "info").upper())
        if _GC_SETTINGS.intersection(applied):
            self.node.request_gc()
        link = self.node.link
        if "upload_slots" in applied and isinstance(link, SchedulerClient):
            self.node.nursery.start_soon(link.update_host, config.upload_slots)
        return ConfigChanges(applied, restart)

    # -- peer server ----------------------------------------------------------------------

    async def peer(self, request: Request) -> Response:
        if request.path in ("/healthz", "/readyz"):
            return await self.health(request)
        check_token(request, self.config.cluster_token)
        try:
            parsed = parse_piece_path(request.path)
        except (InvalidDigest, ValueError) as exc:
            raise HTTPError(400, str(exc)) from None
        if parsed is None:
            return await self._blob(request)
        if request.method not in ("GET", "HEAD", "POST"):
            raise HTTPError(405, "method not allowed")
        digest, index = parsed
        if request.method == "POST" and request.query.get("report") == ["bad"]:
            return await self._told_bad(digest, index)
        try:
            piece_size = int(request.query.get("piece_size", [""])[0])
        except ValueError:
            raise HTTPError(400, "piece_size query parameter required") from None
        if not 1 <= piece_size <= 1 << 30:
            raise HTTPError(400, "piece_size out of range")
        await self._check_seal(digest)
        store = self.node.store
        # Leased until the piece is sent: the cache GC does not evict a blob being read.
        store.acquire(digest)
        if self.node.piece_location(digest, index, piece_size) is None:
            store.release(digest)
            raise HTTPError(404, f"piece {index} of {digest} is not verified here")
        if not self.slots.try_acquire():
            store.release(digest)
            raise HTTPError(503, "all upload slots are busy", headers=[("Retry-After", "1")])

        def done() -> None:
            self.slots.release()
            store.release(digest)

        handed_over = False
        try:
            headers = [("Content-Type", "application/octet-stream")]
            if "zstd" in (request.headers.get("accept-encoding") or "").lower():
                # Keyed by the piece's recorded sha256 too: a piece refetched after a
                # re-verification or a poisoned attempt never reuses a stale frame.
                piece_sha = self.node.piece_hash(digest, index, piece_size) or ""
                key = (f"{digest}/{piece_sha}", piece_size, index)
                frame = await trio.to_thread.run_sync(
                    partial(
                        self.zstd.get_or_compress,
                        key,
                        partial(self._read_piece, digest, index, piece_size),
                        partial(self._read_piece, digest, index, piece_size, _SAMPLE_BYTES),
                    ),
                    limiter=self.compressing,
                )
                if frame is not None:
                    self.info.uploaded += len(frame)
                    self.metrics.record_uploaded(len(frame))
                    headers.append(("Content-Encoding", "zstd"))
                    return Response(200, headers, frame)
            fd, loc = self._open_piece(digest, index, piece_size)
            self.info.uploaded += loc.length
            self.metrics.record_uploaded(loc.length)
            # The server owns (and closes) the fd: the bytes stay readable even if the
            # task is committed (its data file renamed) while they are being sent.  The
            # upload slot is held until the server is done sending them.
            body = FileBody(fd=fd, offset=loc.offset, length=loc.length, on_done=done)
            handed_over = True
            return Response(200, headers, body)
        finally:
            if not handed_over:
                done()

    async def _blob(self, request: Request) -> Response:
        """``GET /peer/v1/blobs/<digest>`` with ``Range``: a complete, verified blob (or a
        range of it), zero-copy.  Partial tasks are served piece by piece only."""
        prefix = "/peer/v1/blobs/"
        if not request.path.startswith(prefix) or "/" in request.path[len(prefix) :]:
            raise HTTPError(404, "not found")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "method not allowed")
        try:
            digest = Digest.parse(request.path[len(prefix) :])
        except InvalidDigest as exc:
            raise HTTPError(400, str(exc)) from None
        await self._check_seal(digest)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Docker-Content-Digest", str(digest)),
            ("Accept-Ranges", "bytes"),
        ]
        response = await leased_blob_response(self.node.store, digest, request, headers)
        if response is None:
            raise HTTPError(404, f"blob {digest} is not complete here", code="BLOB_UNKNOWN")
        return response

    async def _check_seal(self, digest: Digest) -> None:
        """A complete blob whose bytes may have changed since they were verified (written
        through an exported hard link) is re-hashed before we serve any of it, and
        dropped if it no longer matches (cheap when the seal holds: a stat and an xattr)."""
        if self.node.store.blob_path(digest) is None:
            return
        if await trio.to_thread.run_sync(self.node.store.checked_blob_path, digest) is None:
            log.warning("blob %s changed on disk since it was verified: removed it", digest)
            self.zstd.forget(str(digest))
            await self.node.forget_blob(digest)

    def _open_piece(self, digest: Digest, index: int, piece_size: int) -> tuple[int, PieceLocation]:
        """An open fd on the file holding a verified piece.  A partial task's data file is
        renamed into place when the task completes: then the piece is in the blob file."""
        # A task being committed: its data file is renamed to the blob's path a moment
        # before the task is closed, so after a miss look in the blob alone.  (A 404
        # tells the asker we never had the piece; the scheduler then drops every claim
        # of ours on the blob.)
        for blob_only in (False, True, True):
            loc = self.node.piece_location(digest, index, piece_size, blob_only=blob_only)
            if loc is None:
                if blob_only:
                    break
                continue
            try:
                return os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC), loc
            except FileNotFoundError:
                continue
        raise HTTPError(404, f"piece {index} of {digest} is not verified here")

    def _read_piece(
        self, digest: Digest, index: int, piece_size: int, most: int | None = None
    ) -> bytes:
        fd, loc = self._open_piece(digest, index, piece_size)
        try:
            return os.pread(fd, loc.length if most is None else min(most, loc.length), loc.offset)
        finally:
            os.close(fd)

    async def _told_bad(self, digest: Digest, index: int) -> Response:
        """A child says a piece we sent failed its sha256.  We trust nobody's word, but
        re-checking costs only CPU: re-hash what we hold and drop whatever is bad."""
        async with self.verify_lock:
            if digest in self.verifying_recently:
                return Response.json({"checked": "recently"})
            self.verifying_recently.add(digest)
            self.node.nursery.start_soon(self._forget_verified, digest)
            task = self.node.open_tasks().get(digest)
            if task is not None:
                dropped = await trio.to_thread.run_sync(task.verify_pieces)
                log.warning("re-verified %s after a bad-piece report: dropped %s", digest, dropped)
                return Response.json({"dropped": dropped})
            intact = await trio.to_thread.run_sync(self.node.store.verify_blob, digest)
            if intact is False:
                log.warning("blob %s was corrupt on disk: removed it", digest)
                self.zstd.forget(str(digest))
                await self.node.forget_blob(digest)
            return Response.json({"intact": intact})

    async def _forget_verified(self, digest: Digest) -> None:
        await trio.sleep(30)
        self.verifying_recently.discard(digest)

    # -- local API --------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        path = request.path
        if path in ("/healthz", "/readyz"):
            return await self.health(request)
        if path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, "method not allowed")
            return await metrics_response([self.metrics.registry])
        if path == "/v2" or path.startswith("/v2/"):
            return await self.registry.handle(request)
        prefix = "/api/v1/blobs/"
        if not path.startswith(prefix):
            raise HTTPError(404, "not found")
        rest = path[len(prefix) :]
        want_stats = rest.endswith("/stats")
        try:
            digest = Digest.parse(rest.removesuffix("/stats"))
        except InvalidDigest as exc:
            raise HTTPError(400, str(exc), body=None) from None
        if want_stats:
            job = self.node.job(digest)
            if job is not None:  # a download finishing (its last byte may be out already)
                with trio.move_on_after(30):
                    await job.done.wait()
            s = self.node.stats.get(digest)
            if s is None:
                raise HTTPError(404, f"no download of {digest} on record")
            return Response.json(
                {
                    "size": s.size,
                    "from_peers": s.from_peers,
                    "peer_wire": s.peer_wire,
                    "from_source": s.from_source,
                    "reused": s.reused,
                    "seconds": round(s.seconds, 3),
                    "bad_pieces": s.bad_pieces,
                    "fallback": s.fallback,
                    "stragglers": s.stragglers,
                }
            )
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "method not allowed")
        origin = _origin(request)
        job = self.node.fetch(digest, origin)
        size = await job_size(job)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(size)),
            ("Docker-Content-Digest", str(digest)),
        ]
        if request.method == "HEAD":
            return Response(200, headers, b"")
        return Response(200, headers, stream_job(self.node, job, size))

    # -- scheduler --------------------------------------------------------------------------

    async def announcements(self) -> list[Announce]:
        out: list[Announce] = []
        blobs = await trio.to_thread.run_sync(self.node.store.list_blobs)
        for digest, size in blobs:
            recorded = self.node.blob_piece_hashes(digest)
            if recorded is not None:
                piece_size, hashes = recorded[0], dict(enumerate(recorded[1]))
            else:
                piece_size, hashes = piece_size_for(size, self.config.piece_size), {}
            out.append(
                Announce(
                    self.info.host_id,
                    str(digest),
                    size,
                    piece_size,
                    complete=True,
                    hashes=hashes or None,
                )
            )
        for digest, task in self.node.open_tasks().items():
            verified = tuple(i for i in range(task.plan.count) if task.is_verified(i))
            hashes = {i: h for i, h in enumerate(task.piece_hashes()) if h is not None}
            out.append(
                Announce(
                    self.info.host_id,
                    str(digest),
                    task.plan.size,
                    task.plan.piece_size,
                    pieces=verified,
                    hashes=hashes,
                )
            )
        return out

    def load(self) -> HostLoad:
        """What the heartbeat reports: upload slots in use, bytes/s up and down since the
        last heartbeat, this process's CPU share and RSS, free disk under the data dir."""
        now = time.monotonic()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_seconds = usage.ru_utime + usage.ru_stime
        down = sum(s.from_peers + s.from_source for s in self.node.stats.values())
        last = self._last_load
        elapsed = max(1e-3, now - last[0])
        up_bps = max(0, self.info.uploaded - last[1]) / elapsed
        down_bps = max(0, down - last[2]) / elapsed
        cpu = min(1.0, max(0.0, (cpu_seconds - last[3]) / elapsed / (os.cpu_count() or 1)))
        self._last_load = (now, self.info.uploaded, down, cpu_seconds)
        try:
            free = shutil.disk_usage(self.config.data_dir).free
        except OSError:
            free = 0
        return HostLoad(
            upload_slots_in_use=self.slots.in_use,
            up_bps=up_bps,
            down_bps=down_bps,
            cpu=cpu,
            rss=_current_rss(),
            free_disk=free,
        )


def _origin(request: Request) -> BlobOrigin:
    q = request.query
    insecure = q.get("insecure", ["0"])[0] in ("1", "true")
    try:
        if "url" in q:
            url = q["url"][0]
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HTTPError(400, f"invalid url {url[:80]!r}: expected http(s)://HOST/PATH")
            headers = tuple(
                (name.strip(), value.strip())
                for name, _, value in (h.partition(":") for h in q.get("header", []))
            )
            return BlobOrigin(url=url, headers=headers, insecure=insecure)
        registry = q.get("registry", [""])[0] or None
        repository = q.get("repository", [""])[0] or None
        if registry is not None and not is_valid_registry_host(registry):
            raise HTTPError(400, f"invalid registry {registry[:80]!r}", code="NAME_INVALID")
        if repository is not None and not is_valid_repository(repository):
            raise HTTPError(400, f"invalid repository {repository[:80]!r}", code="NAME_INVALID")
        return BlobOrigin(registry=registry, repository=repository, insecure=insecure)
    except UsageError as exc:
        raise HTTPError(400, str(exc)) from None


def bound_malloc() -> bool:
    """Keep glibc from holding on to freed piece buffers: a fixed mmap threshold (it
    otherwise grows past the piece size, and freed 4 MiB buffers stay in the heap) and two
    arenas (not one per worker thread).  Measured: the daemon's peak RSS while sharing a
    1 GiB blob with 8 peers fell by about a third.  False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max, m_mmap_threshold = -8, -3
    return bool(mallopt(m_mmap_threshold, 256 << 10)) and bool(mallopt(m_arena_max, 2))


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_id(config: NodeConfig, advertise: str) -> str:
    return config.host_id or f"{socket.gethostname()}-{advertise}"


@asynccontextmanager
async def open_daemon(config: NodeConfig) -> AsyncIterator[DaemonInfo]:
    """Start a daemon (peer server, local API, scheduler link) inside the caller's
    nursery scope; it stops when the block exits.  Used by ``run_daemon`` and tests."""
    peer_host, peer_port = split_hostport(config.peer_listen, what="peer_listen")
    api_host, api_port = split_hostport(config.api_listen, what="api_listen")
    config = with_upstream_registry(config)
    async with trio.open_nursery() as nursery:
        # The node needs the link, the link needs the advertised address (after binding).
        peer_listeners = await trio.open_tcp_listeners(peer_port, host=peer_host)
        nursery.start_soon(_close_listeners_on_exit, peer_listeners)
        bound_port = peer_listeners[0].socket.getsockname()[1]
        advertise = config.advertise or ("" if peer_host in ("0.0.0.0", "::") else peer_host)
        if not advertise:
            # Listening on all addresses: advertise the address this host's name resolves
            # to (a pod's IP in Kubernetes), unless that is loopback.
            try:
                advertise = socket.gethostbyname(socket.gethostname())
            except OSError:
                advertise = ""
            if not advertise or advertise.startswith("127."):
                raise UsageError(
                    "--advertise is required when the peer server listens on all addresses"
                )
        if ":" not in advertise.strip("[]") or advertise.startswith("["):
            advertise = f"{advertise}:{bound_port}"
        host_id = _host_id(config, advertise)
        sched_http = httpx.AsyncClient(
            trust_env=False, timeout=10.0, headers=token_headers(config.cluster_token)
        )
        await nursery.start(_close_on_cancel, sched_http)
        sched_conns = PeerConnections(token_headers(config.cluster_token), max_idle=4)
        await nursery.start(_close_on_cancel, sched_conns)
        link = None
        if config.schedulers:
            daemon_ref: list[_Daemon] = []

            async def announcements() -> list[Announce]:
                return await daemon_ref[0].announcements() if daemon_ref else []

            link = SchedulerClient(
                config.schedulers,
                RegisterHost(host_id, advertise, config.zone, __version__, config.upload_slots),
                http=sched_http,
                announcements=announcements,
                lean=sched_conns,
            )
        async with open_node(config, link=link) as node:
            info = DaemonInfo(host_id, f"http://{advertise}", "", node)
            daemon = _Daemon(config, node, info, link)
            daemon.listeners["peer"] = peer_listeners
            daemon.listeners["proxy"] = None
            info.apply_config = daemon.apply_config
            with log_context(host=host_id):
                nursery.start_soon(node.gc_forever)
            if config.schedulers:
                daemon_ref.append(daemon)
            server_config = ServerConfig(keepalive_timeout=120.0)
            peer_config = replace(server_config, send_limiter=node.bandwidth.upload)
            # The servers' tasks (and the downloads they start) inherit this context:
            # every line they log names this daemon (``host`` in JSON logs).
            with log_context(host=host_id):
                await nursery.start(
                    partial(serve_http_listeners, config=peer_config), daemon.peer, peer_listeners
                )
                api = await nursery.start(
                    partial(serve_http, config=server_config), daemon.api, api_host, api_port
                )
                info.api_url = api.url
                if config.proxy_listen is not None:
                    proxy_listeners = await _proxy_listeners(config.proxy_listen)
                    if proxy_listeners:
                        daemon.listeners["proxy"] = proxy_listeners
                        served = await nursery.start(
                            partial(serve_http_listeners, config=server_config),
                            daemon.proxy,
                            proxy_listeners,
                        )
                        info.proxy_url = served.url
                if link is not None:
                    # Preheat jobs arrive in the answers to heartbeats (p2pdist.preheater).
                    preheater = Preheater(node)
                    nursery.start_soon(
                        partial(link.heartbeat_forever, daemon.load, preheat=preheater)
                    )
            log.info(
                "daemon %s: peers at %s, local API at %s, registry proxy at %s",
                host_id,
                info.peer_url,
                api.url,
                info.proxy_url or "(off)",
            )
            try:
                yield info
            finally:
                if link is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await link.leave()
                nursery.cancel_scope.cancel()


async def _proxy_listeners(listen: str) -> list[trio.SocketListener]:
    """The proxy's listeners.  The *default* address being taken (another daemon on this
    host, e.g. a test cluster) turns the proxy off with a warning; an address given
    explicitly must be free."""
    host, port = split_hostport(listen, what="proxy_listen")
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if listen != DEFAULT_PROXY_LISTEN or exc.errno != errno.EADDRINUSE:
            raise
        log.warning("registry proxy off: %s is in use (set --proxy-listen)", listen)
        return []


async def _close_listeners_on_exit(listeners: list[trio.SocketListener]) -> None:
    """Own the peer listeners from the moment they are bound: closed however the daemon
    stops (also when its start-up fails after binding)."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


async def _close_on_cancel(
    client: httpx.AsyncClient | PeerConnections,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def run_daemon(
    config: NodeConfig, reload: Callable[[], NodeConfig] | None = None
) -> NoReturn:
    """Run until SIGTERM/SIGINT; leave the swarm cleanly.  On SIGHUP, ``reload()`` (which
    re-reads the config file, the environment and the flags) and apply what can change
    live; a config it refuses is logged and the running one kept."""
    raise_open_file_limit()  # three servers of up to 1024 connections each, and the store
    bound_malloc()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with open_daemon(config) as info:
            print(
                f"p2pdist daemon {info.host_id}: peers {info.peer_url}, API {info.api_url}, "
                f"registry proxy {info.proxy_url or 'off'}",
                flush=True,
            )
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
                await reload_config(info, reload)
    raise SystemExit(0)


async def reload_config(info: DaemonInfo, reload: Callable[[], NodeConfig] | None) -> None:
    """What SIGHUP does (one log line for the outcome, one more if a restart is needed)."""
    if reload is None or info.apply_config is None:
        log.warning("config reload: no config to reload")
        return
    try:
        new = await trio.to_thread.run_sync(reload)
    except P2PDistError as exc:
        log.error("config reload failed, keeping the running config: %s", exc)
        return
    changes = info.apply_config(new)
    log.info(
        "config reloaded: %s",
        f"applied {', '.join(changes.applied)}" if changes.applied else "no live setting changed",
    )
    if changes.restart:
        log.warning(
            "config reload: %s changed: restart the daemon to apply", ", ".join(changes.restart)
        )
