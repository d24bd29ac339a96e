"""End to end: a real dockerd and a real containerd pull images *through* the node daemon's
registry proxy, and the bytes really came through it.

The daemon runs in-process (``open_daemon``) with its proxy on a loopback port; the images
are synthetic (fresh random layers per run, so nothing is already in dockerd) and pushed to
a local docker-registry.  Every request the proxy answers is recorded (method, path,
``?ns=``, status, bytes sent, User-Agent), so each test asserts positively that the runtime
fetched every blob from the proxy, and that the node's store holds each layer complete.
There is no internet here, so a runtime falling back to the real registry fails anyway.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.image import Image, make_image, push_image, push_index
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.httpserver import FileBody, HTTPError, Request, Response
from p2pdist.proxy import RegistryProxy
from tests.helpers import requires_registry
from tests.runtimes import CTR_MISSING_REASON, DOCKER_CLI_MISSING_REASON, Dockerd

pytestmark = [pytest.mark.integration, requires_registry]

PIECE = 256 * 1024
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")
CTR_NAMESPACE = "p2pdist-test"
PULL_TIMEOUT = 60.0
KINDS = ["docker-v2", "oci-index"]


# -- what the proxy served --------------------------------------------------------------


@dataclass
class Served:
    method: str
    path: str
    ns: str | None
    user_agent: str
    status: int = 0
    sent: int = 0
    """Body bytes handed to the server (streamed bodies: counted as they go)."""
    complete: bool = False
    """The whole body was produced (a stream ran to its end)."""


@dataclass
class ProxyLog:
    served: list[Served] = field(default_factory=list)

    def blob_gets(self, digest: str) -> list[Served]:
        return [
            s
            for s in self.served
            if s.method == "GET" and s.path.endswith(f"/blobs/{digest}") and s.status in (200, 206)
        ]

    def blob_bytes(self, digest: str) -> int:
        """Bytes of ``digest`` the proxy sent in complete responses (200 or 206)."""
        return sum(s.sent for s in self.blob_gets(digest) if s.complete)

    def summary(self) -> str:
        return "\n".join(
            f"  {s.method} {s.path} ns={s.ns} -> {s.status} ({s.sent} B"
            f"{'' if s.complete else ', incomplete'}) [{s.user_agent}]"
            for s in self.served
        )


def record_proxy(monkeypatch: pytest.MonkeyPatch) -> ProxyLog:
    """Record every request a RegistryProxy (created after this call) answers."""
    log = ProxyLog()
    original = RegistryProxy.handle

    async def handle(self: RegistryProxy, request: Request) -> Response:
        ns = request.query.get("ns")
        entry = Served(
            request.method,
            request.path,
            ns[0] if ns else None,
            request.headers.get("user-agent") or "",
        )
        log.served.append(entry)
        try:
            response = await original(self, request)
        except HTTPError as exc:
            entry.status = exc.status
            raise
        entry.status = response.status
        body = response.body
        if isinstance(body, bytes):
            entry.sent, entry.complete = len(body), True
        elif isinstance(body, FileBody):  # a complete blob from the store (sendfile)
            entry.sent, entry.complete = body.length or 0, body.length is not None
        else:
            response.body = _counted(body, entry)
        return response

    monkeypatch.setattr(RegistryProxy, "handle", handle)
    return log


async def _counted(body: AsyncIterable[bytes], entry: Served) -> AsyncIterator[bytes]:
    async for chunk in body:
        entry.sent += len(chunk)
        yield chunk
    entry.complete = True


@asynccontextmanager
async def proxy_daemon(tmp_path: Path, upstream: str | None) -> AsyncIterator[DaemonInfo]:
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        upstream=upstream,
        piece_size=PIECE,
        host_id=f"runtime-{tmp_path.name}",
        docker_config=NO_DOCKER_CONFIG,
    )
    async with open_daemon(config) as info:
        assert info.proxy_url is not None
        yield info


@dataclass(frozen=True)
class Pushed:
    repo: str
    image: Image
    """The linux/amd64 image (what the runtimes here pull)."""
    digest: str
    """What the tag names: the image's manifest, or the index over it."""


def push_fresh(registry: LocalRegistry, repo: str, kind: str) -> Pushed:
    """A 3-layer gzip image whose layers no runtime has seen yet, pushed as ``repo:v1``:
    a Docker v2 manifest, or an OCI index over an amd64 and an arm64 image."""
    seed = secrets.randbits(48)
    image = make_image(size=3 << 20, layers=3, seed=seed, oci=kind == "oci-index")
    if kind == "docker-v2":
        return Pushed(repo, image, push_image(registry.url, repo, "v1", image))
    arm = make_image(size=64 << 10, layers=1, seed=seed + 1, oci=True, platform="linux/arm64")
    return Pushed(repo, image, push_index(registry.url, repo, "v1", [image, arm]))


def unique_name() -> str:
    return f"p2pdist-e2e-{secrets.token_hex(4)}"


def assert_node_holds_blobs(info: DaemonInfo, image: Image, log: ProxyLog) -> None:
    """Every blob complete in the node's store (hashing to its digest), fetched from the
    registry by the node, and sent whole by the proxy."""
    for digest, data in image.blobs().items():
        path = info.node.store.blob_path(Digest.parse(digest))
        assert path is not None, f"{digest} is not complete in the node's store"
        on_disk = path.read_bytes()
        assert len(on_disk) == len(data) and hashlib.sha256(on_disk).hexdigest() == digest[7:]
        stats = info.node.stats.get(Digest.parse(digest))
        assert stats is not None and stats.from_source == len(data), (digest, stats)
        assert log.blob_bytes(digest) >= len(data), (
            f"the proxy did not send all of {digest} ({len(data)} B):\n{log.summary()}"
        )


def served_manifest(log: ProxyLog, repo: str, digest: str) -> bool:
    """The proxy answered the tag (HEAD or GET) and sent the image manifest by digest."""
    tag = [s for s in log.served if s.path == f"/v2/{repo}/manifests/v1" and s.status == 200]
    path = f"/v2/{repo}/manifests/{digest}"
    by_digest = [s for s in log.served if s.method == "GET" and s.path == path and s.complete]
    return bool(tag) and any(s.status == 200 and s.sent > 0 for s in by_digest)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


# -- dockerd: registry-mirrors ----------------------------------------------------------


@pytest.mark.skipif(shutil.which("docker") is None, reason=DOCKER_CLI_MISSING_REASON)
@pytest.mark.parametrize("kind", KINDS)
async def test_dockerd_pulls_through_the_mirror(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: LocalRegistry,
    dockerd: Dockerd,
) -> None:
    name = unique_name()
    # registry-mirrors only apply to Docker Hub images: docker.io/library/<name>.
    pushed = await trio.to_thread.run_sync(push_fresh, registry, f"library/{name}", kind)
    image = pushed.image
    ref = f"{name}:v1"
    log = record_proxy(monkeypatch)
    async with proxy_daemon(tmp_path, registry.url) as info:
        assert info.proxy_url is not None
        await trio.to_thread.run_sync(dockerd.set_mirrors, [info.proxy_url])
        try:
            pulled = await trio.to_thread.run_sync(
                partial(dockerd.docker, "pull", ref, timeout=PULL_TIMEOUT, check=False)
            )
            assert pulled.returncode == 0, (
                f"docker pull {ref} failed:\n{pulled.stdout}{pulled.stderr}\n"
                f"proxy served:\n{log.summary()}\ndockerd log:\n{dockerd.log_tail()}"
            )
            inspected = await trio.to_thread.run_sync(
                partial(dockerd.docker, "image", "inspect", ref)
            )
        finally:
            await trio.to_thread.run_sync(dockerd.set_mirrors, [])
        try:
            [found] = json.loads(inspected.stdout)
            assert found["Id"] == image.config_digest
            assert found["RootFS"]["Layers"] == image.diff_ids
            assert found["RepoDigests"] == [f"{name}@{pushed.digest}"]
            # dockerd itself asked the proxy for the manifest and every blob...
            assert all(s.user_agent.startswith("docker/") for s in log.served), log.summary()
            assert served_manifest(log, f"library/{name}", image.manifest_digest), log.summary()
            # ...and every blob (config and layers) whole; the node fetched each from the
            # registry and holds it complete.
            assert_node_holds_blobs(info, image, log)
        finally:
            await trio.to_thread.run_sync(
                partial(dockerd.docker, "image", "rm", "--force", ref, check=False)
            )


# -- containerd: hosts.toml and ?ns= ----------------------------------------------------


@pytest.mark.skipif(shutil.which("ctr") is None, reason=CTR_MISSING_REASON)
@pytest.mark.parametrize("kind", KINDS)
async def test_containerd_pulls_through_hosts_toml(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: LocalRegistry,
    dockerd: Dockerd,
) -> None:
    repo = f"p2pdist/{unique_name()}"
    pushed = await trio.to_thread.run_sync(push_fresh, registry, repo, kind)
    image = pushed.image
    ref = f"{registry.host}/{repo}:v1"
    certs = tmp_path / "certs.d"
    log = record_proxy(monkeypatch)
    # No default upstream: only containerd's ?ns=<registry> can route these requests.
    async with proxy_daemon(tmp_path, None) as info:
        assert info.proxy_url is not None
        setup = await trio.to_thread.run_sync(
            _run,
            [
                sys.executable,
                "-m",
                "p2pdist",
                "setup",
                "containerd",
                "--registry",
                registry.host,
                "--proxy",
                info.proxy_url,
                "--write",
                "--path",
                str(certs),
            ],
            30.0,
        )
        assert setup.returncode == 0, setup.stderr
        assert (certs / registry.host / "hosts.toml").is_file()
        try:
            pulled = await trio.to_thread.run_sync(
                partial(
                    dockerd.ctr,
                    "images",
                    "pull",
                    "--hosts-dir",
                    str(certs),
                    "--snapshotter",
                    "native",  # unpack: containerd checks every layer's diff_id
                    ref,
                    namespace=CTR_NAMESPACE,
                    timeout=PULL_TIMEOUT,
                    check=False,
                )
            )
            assert pulled.returncode == 0, (
                f"ctr images pull {ref} failed:\n{pulled.stdout}{pulled.stderr}\n"
                f"proxy served:\n{log.summary()}"
            )
            ctr = partial(dockerd.ctr, namespace=CTR_NAMESPACE)
            images = (await trio.to_thread.run_sync(ctr, "images", "ls")).stdout
            [line] = [ln for ln in images.splitlines() if ln.startswith(ref + " ")]
            assert pushed.digest in line.split(), images
            content = (await trio.to_thread.run_sync(ctr, "content", "ls", "--quiet")).stdout
            want = {pushed.digest, image.manifest_digest, *image.blobs()}
            assert want <= set(content.split()), content
            # Everything was asked of the proxy with ?ns=<registry>, by containerd...
            assert log.served, "containerd never asked the proxy"
            assert all(s.ns == registry.host for s in log.served), log.summary()
            assert all(s.user_agent.startswith("containerd/") for s in log.served), log.summary()
            assert served_manifest(log, repo, image.manifest_digest), log.summary()
            # ...and every blob (config and layers) whole; the node fetched each from the
            # registry and holds it complete.
            assert_node_holds_blobs(info, image, log)
        finally:
            await trio.to_thread.run_sync(_ctr_cleanup, dockerd, ref)


def _ctr_cleanup(dockerd: Dockerd, ref: str) -> None:
    """Remove the test image, its content and snapshots, and the namespace."""
    ctr = partial(dockerd.ctr, namespace=CTR_NAMESPACE, check=False)
    ctr("images", "rm", "--sync", ref)
    left = ctr("content", "ls", "--quiet").stdout.split()
    if left:
        ctr("content", "rm", *left)
    ctr("namespaces", "rm", CTR_NAMESPACE)
