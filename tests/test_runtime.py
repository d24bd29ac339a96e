"""End to end: a real dockerd and a real containerd pull images *through* the node daemon's
registry proxy, and the bytes really came through it.

The daemon runs in-process (``open_daemon``) with its proxy on a loopback port; the images
are synthetic (fresh random layers per run, so nothing is already in dockerd, plus a layer
with the host's ``/bin/dash`` as ``/bin/sh`` so that dockerd can run what it pulled) and
pushed to a local docker-registry.  Every request the proxy answers is recorded (method, path,
``?ns=``, status, bytes sent, User-Agent), so each test asserts positively that the runtime
fetched every blob from the proxy, and that the node's store holds each layer complete.
There is no internet here, so a runtime falling back to the real registry fails anyway.

Also with real clients: a blob corrupted upstream (a :class:`FaultProxy` flipping a byte)
never reaches dockerd whole, and an upstream's ``401`` reaches skopeo with its challenge
while skopeo's own credentials go through.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from bench.image import Image, make_image, make_shell_image, push_image, push_index
from bench.localregistry import LocalRegistry
from p2pdist.daemon import DaemonInfo
from p2pdist.digest import Digest
from p2pdist.httpserver import FileBody, HTTPError, Request, Response
from p2pdist.proxy import RegistryProxy
from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.faultproxy import FaultProxy
from tests.helpers import blob_stored, proxy_daemon, requires_registry
from tests.runtimes import CTR_MISSING_REASON, DOCKER_CLI_MISSING_REASON, Dockerd

pytestmark = [pytest.mark.integration, requires_registry]

PIECE = 256 * 1024
CTR_NAMESPACE = "p2pdist-test"
PULL_TIMEOUT = 60.0
KINDS = ["docker-v2", "oci-index"]
SKOPEO_MISSING_REASON = "skopeo not installed: apt-get install skopeo"
CORRUPT_PULL_BOUND = 60.0
"""A pull of a corrupted image must fail within this many seconds."""


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
    authorized: bool = False
    """The request carried an ``Authorization`` header."""
    challenge: str | None = None
    """The ``WWW-Authenticate`` header of the answer, if any."""


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
            f"  {s.method} {s.path} ns={s.ns}{' (auth)' if s.authorized else ''} -> {s.status}"
            f" ({s.sent} B{'' if s.complete else ', incomplete'}) [{s.user_agent}]"
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
            authorized=request.headers.get("authorization") is not None,
        )
        log.served.append(entry)
        try:
            response = await original(self, request)
        except HTTPError as exc:
            entry.status = exc.status
            entry.challenge = _header(exc.headers, "www-authenticate")
            raise
        entry.status = response.status
        entry.challenge = _header(response.headers, "www-authenticate")
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


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


async def _counted(body: AsyncIterable[bytes], entry: Served) -> AsyncIterator[bytes]:
    async for chunk in body:
        entry.sent += len(chunk)
        yield chunk
    entry.complete = True


@dataclass(frozen=True)
class Pushed:
    repo: str
    image: Image
    """The linux/amd64 image (what the runtimes here pull)."""
    digest: str
    """What the tag names: the image's manifest, or the index over it."""


def push_fresh(registry: LocalRegistry, repo: str, kind: str) -> Pushed:
    """A runnable 3-layer gzip image (the shell layer, then two synthetic layers) whose
    layers no runtime has seen yet, pushed as ``repo:v1``: a Docker v2 manifest, or an OCI
    index over it (the host's platform) and an arm64 image."""
    seed = secrets.randbits(48)
    image = make_shell_image(size=3 << 20, layers=2, seed=seed, oci=kind == "oci-index")
    if kind == "docker-v2":
        return Pushed(repo, image, push_image(registry.url, repo, "v1", image))
    other = "linux/arm64" if image.platform != "linux/arm64" else "linux/amd64"
    foreign = make_image(size=64 << 10, layers=1, seed=seed + 1, oci=True, platform=other)
    return Pushed(repo, image, push_index(registry.url, repo, "v1", [image, foreign]))


def unique_name() -> str:
    return f"p2pdist-e2e-{secrets.token_hex(4)}"


async def assert_node_holds_blobs(info: DaemonInfo, image: Image, log: ProxyLog) -> None:
    """Every blob complete in the node's store (hashing to its digest), fetched from the
    registry by the node, and sent whole by the proxy."""
    for digest, data in image.blobs().items():
        path = await blob_stored(info.node, Digest.parse(digest))
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
    async with proxy_daemon(tmp_path, registry.url, piece_size=PIECE) as info:
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
            await assert_node_holds_blobs(info, image, log)
            # What came through the proxy is a working image: dockerd runs it.
            ran = await trio.to_thread.run_sync(
                partial(
                    dockerd.docker,
                    *("run", "--rm", "--network", "none", ref),
                    *("/bin/sh", "-c", "echo p2pdist-ok"),
                    timeout=PULL_TIMEOUT,
                    check=False,
                )
            )
            assert ran.returncode == 0 and ran.stdout == "p2pdist-ok\n", (
                f"docker run {ref} failed ({ran.returncode}):\n{ran.stdout}{ran.stderr}\n"
                f"dockerd log:\n{dockerd.log_tail()}"
            )
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
    async with proxy_daemon(tmp_path, None, piece_size=PIECE) as info:
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
            await assert_node_holds_blobs(info, image, log)
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


# -- a corrupted blob upstream never reaches dockerd ------------------------------------


@pytest.mark.skipif(shutil.which("docker") is None, reason=DOCKER_CLI_MISSING_REASON)
async def test_dockerd_never_gets_a_blob_corrupted_upstream(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: LocalRegistry,
    dockerd: Dockerd,
) -> None:
    """The registry's answers to blob GETs have a byte flipped on the way (a FaultProxy in
    front of it is the daemon's upstream): the pull fails, the image is not in dockerd, no
    corrupt blob is complete in the node's store, and no blob body went out whole."""
    name = unique_name()
    pushed = await trio.to_thread.run_sync(push_fresh, registry, f"library/{name}", "docker-v2")
    image = pushed.image
    ref = f"{name}:v1"
    log = record_proxy(monkeypatch)
    with FaultProxy(registry.url) as faulty:
        faulty.flip_byte_in_blobs = True
        async with proxy_daemon(tmp_path, faulty.url, piece_size=PIECE) as info:
            assert info.proxy_url is not None
            await trio.to_thread.run_sync(dockerd.set_mirrors, [info.proxy_url])
            started = time.monotonic()
            try:
                pulled = await trio.to_thread.run_sync(
                    partial(dockerd.docker, "pull", ref, timeout=CORRUPT_PULL_BOUND, check=False)
                )
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"docker pull {ref} of a corrupted image still ran after "
                    f"{CORRUPT_PULL_BOUND:.0f} s; proxy served:\n{log.summary()}\n"
                    f"dockerd log:\n{dockerd.log_tail()}"
                )
            finally:
                await trio.to_thread.run_sync(dockerd.set_mirrors, [])
            elapsed = time.monotonic() - started
            try:
                context = (
                    f"docker pull {ref} ({pulled.returncode}, {elapsed:.1f} s):\n"
                    f"{pulled.stdout}{pulled.stderr}\nproxy served:\n{log.summary()}\n"
                    f"dockerd log:\n{dockerd.log_tail()}"
                )
                assert pulled.returncode != 0, context
                inspected = await trio.to_thread.run_sync(
                    partial(dockerd.docker, "image", "inspect", ref, check=False)
                )
                assert inspected.returncode != 0, f"{ref} is in dockerd:\n{inspected.stdout}"
                # dockerd asked the proxy for the manifest, the config and layers (it fetches
                # them together; the config's failure ends the pull), and the upstream did
                # corrupt what the node fetched.
                assert served_manifest(log, f"library/{name}", image.manifest_digest), context
                blobs = image.blobs()
                asked = {
                    s.path.rsplit("/", 1)[-1]
                    for s in log.served
                    if s.method == "GET" and "/blobs/" in s.path
                }
                assert image.config_digest in asked, context
                assert asked & set(image.layer_digests), context
                corrupted = {
                    r.path.rsplit("/", 1)[-1]
                    for r in faulty.records("GET", "/blobs/")
                    if r.fault == "flip"
                }
                assert image.config_digest in corrupted, context
                assert corrupted <= set(blobs), corrupted
                for digest, data in blobs.items():
                    # Nothing corrupt is complete on the node (what is there hashes right).
                    path = info.node.store.blob_path(Digest.parse(digest))
                    if path is not None:
                        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest[7:]
                    # No answer for this blob ran to its end: the final byte waits for the
                    # whole-blob check, which the corrupted bytes fail.
                    for s in log.served:
                        if s.method == "GET" and s.path.endswith(f"/blobs/{digest}"):
                            assert not s.complete and s.sent < len(data), (digest, context)
            finally:
                await trio.to_thread.run_sync(
                    partial(dockerd.docker, "image", "rm", "--force", ref, check=False)
                )


# -- an upstream 401 reaches skopeo with its challenge; its credentials go through -------


@pytest.mark.skipif(shutil.which("skopeo") is None, reason=SKOPEO_MISSING_REASON)
async def test_skopeo_gets_the_upstream_challenge_and_pulls_with_its_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_registry: LocalRegistry
) -> None:
    repo = f"private/{unique_name()}"
    image = make_image(size=2 * PIECE, layers=2, seed=secrets.randbits(48))
    await trio.to_thread.run_sync(
        partial(push_image, auth_registry.url, repo, "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    )
    # What the registry itself challenges with (the realm it names).
    async with httpx.AsyncClient(base_url=auth_registry.url, trust_env=False) as c:
        direct = await c.get("/v2/")
    assert direct.status_code == 401
    upstream_challenge = direct.headers["www-authenticate"]
    assert upstream_challenge.lower().startswith("basic realm=")
    # No credentials from anywhere but the command line (an empty auth file).
    authfile = tmp_path / "auth.json"
    authfile.write_text('{"auths": {}}\n')
    log = record_proxy(monkeypatch)
    async with proxy_daemon(tmp_path, auth_registry.url, piece_size=PIECE) as info:
        assert info.proxy_url is not None
        ref = f"docker://{info.proxy_url.removeprefix('http://')}/{repo}:v1"
        skopeo = [
            "skopeo",
            "inspect",
            "--no-tags",
            "--tls-verify=false",
            "--authfile",
            str(authfile),
        ]

        anonymous = await trio.to_thread.run_sync(_run, [*skopeo, ref], 30.0)
        context = f"{anonymous.stdout}{anonymous.stderr}\nproxy served:\n{log.summary()}"
        assert anonymous.returncode != 0, context
        assert "unauthorized" in anonymous.stderr.lower(), context
        # skopeo was refused by the proxy with the registry's own 401 and challenge.
        refused = [s for s in log.served if s.status == 401]
        assert refused, context
        assert all(s.challenge == upstream_challenge for s in refused), context
        assert any(s.path == f"/v2/{repo}/manifests/v1" for s in refused), context
        assert not any(s.status == 200 and "/manifests/" in s.path for s in log.served)
        before = len(log.served)

        creds = f"{AUTH_USER}:{AUTH_PASSWORD}"
        with_creds = await trio.to_thread.run_sync(_run, [*skopeo, "--creds", creds, ref], 30.0)
        context = f"{with_creds.stdout}{with_creds.stderr}\nproxy served:\n{log.summary()}"
        assert with_creds.returncode == 0, context
        inspected = json.loads(with_creds.stdout)
        assert inspected["Digest"] == image.manifest_digest, context
        assert inspected["Layers"] == image.layer_digests, context
        # skopeo's credentials went through the proxy to the registry: the manifest and
        # the config blob (through the node, fetched with skopeo's Authorization).
        served = log.served[before:]
        path = f"/v2/{repo}/manifests/v1"
        assert any(s.path == path and s.status == 200 and s.authorized for s in served), context
        config = [s for s in served if s.path.endswith(f"/blobs/{image.config_digest}")]
        assert any(s.status == 200 and s.complete and s.authorized for s in config), context
        assert await blob_stored(info.node, Digest.parse(image.config_digest)) is not None
