"""The registry proxy, in-process on loopback, in front of a real docker-registry: what
dockerd, containerd and skopeo send (manifests with their Accept, blobs, ranges, HEAD),
errors as OCI bodies, ``?ns=``, auth pass-through, corruption upstream, upstream down."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from bench.image import make_image, push_blob, push_image, push_index
from bench.localregistry import LocalRegistry
from p2pdist.cli import build_parser
from p2pdist.config import RegistryConfig, load_node_config
from p2pdist.daemon import DaemonInfo
from p2pdist.digest import Digest
from p2pdist.errors import ConfigError
from p2pdist.httpserver import (
    FileChunk,
    HTTPError,
    Request,
    Response,
    content_range,
    parse_range,
    serve_http,
)
from p2pdist.registry import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    parse_www_authenticate,
)
from scheduler.service import serve_scheduler
from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.faultproxy import FaultProxy
from tests.helpers import PushedImage, blob_stored, proxy_daemon, requires_registry

if TYPE_CHECKING:  # tokenserver needs `cryptography` (the fixture skips without it)
    from tests.tokenserver import TokenRegistry

pytestmark = [pytest.mark.integration, requires_registry]

PIECE = 64 * 1024
ALL_TYPES = f"{MEDIA_OCI_INDEX}, {MEDIA_DOCKER_LIST}, {MEDIA_OCI_MANIFEST}, {MEDIA_DOCKER_MANIFEST}"


def _client(info: DaemonInfo) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=str(info.proxy_url), timeout=30, trust_env=False)


def _error_code(r: httpx.Response) -> str:
    code: str = r.json()["errors"][0]["code"]
    return code


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_ping(tmp_path: Path, registry: LocalRegistry) -> None:
    async with proxy_daemon(tmp_path, registry.url) as info, _client(info) as c:
        r = await c.get("/v2/")
        assert r.status_code == 200 and r.json() == {}
        assert r.headers["docker-distribution-api-version"] == "registry/2.0"
        assert (await c.get("/v2")).status_code == 200


async def test_manifests_by_tag_and_digest(
    tmp_path: Path, fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    image = pushed_image.image
    oci = make_image(size=32 * 1024, layers=1, seed=41, oci=True)
    push_image(pushed_image.url, "proxy/oci", "v1", oci)
    arm = make_image(size=16 * 1024, layers=1, seed=42, platform="linux/arm64")
    index_digest = push_index(pushed_image.url, "proxy/multi", "v1", [image, arm])
    async with proxy_daemon(tmp_path, fault_proxy.url) as info, _client(info) as c:
        docker = {"Accept": MEDIA_DOCKER_MANIFEST}
        r = await c.get("/v2/test/app/manifests/v1", headers=docker)
        assert r.status_code == 200
        assert r.content == image.manifest
        assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
        assert r.headers["docker-content-digest"] == image.manifest_digest
        assert r.headers["content-length"] == str(len(image.manifest))
        # the client's Accept went upstream
        assert fault_proxy.records("GET", "/manifests/v1")[-1].headers["accept"] == (
            MEDIA_DOCKER_MANIFEST
        )
        # HEAD by tag: the GET's headers, no body (dockerd resolves tags this way)
        r = await c.head("/v2/test/app/manifests/v1", headers={"Accept": ALL_TYPES})
        assert r.status_code == 200 and r.content == b""
        assert r.headers["docker-content-digest"] == image.manifest_digest
        assert r.headers["content-length"] == str(len(image.manifest))
        assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
        # by digest: verified, cached, then served without the upstream
        by_digest = f"/v2/test/app/manifests/{image.manifest_digest}"
        for method in ("GET", "GET", "HEAD"):
            r = await c.request(method, by_digest, headers={"Accept": ALL_TYPES})
            assert r.status_code == 200
            assert r.headers["docker-content-digest"] == image.manifest_digest
            assert r.headers["content-length"] == str(len(image.manifest))
            assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
            assert r.content == (image.manifest if method == "GET" else b"")
        assert fault_proxy.count(path=f"/manifests/{image.manifest_digest}") == 0  # from tag
        # an OCI manifest and an index, with the Accept that names them
        r = await c.get("/v2/proxy/oci/manifests/v1", headers={"Accept": MEDIA_OCI_MANIFEST})
        assert r.status_code == 200 and r.content == oci.manifest
        assert r.headers["content-type"] == MEDIA_OCI_MANIFEST
        r = await c.get("/v2/proxy/multi/manifests/v1", headers={"Accept": ALL_TYPES})
        assert r.status_code == 200
        assert r.headers["content-type"] == MEDIA_DOCKER_LIST
        assert r.headers["docker-content-digest"] == index_digest == _sha(r.content)
        # a client that accepts nothing the registry stores: the registry's answer
        r = await c.get("/v2/proxy/oci/manifests/v1", headers={"Accept": MEDIA_DOCKER_MANIFEST})
        assert r.status_code in (400, 404)
        assert _error_code(r) in ("MANIFEST_INVALID", "MANIFEST_UNKNOWN")


async def test_blobs_get_head_range(tmp_path: Path, pushed_image: PushedImage) -> None:
    image = pushed_image.image
    layer, digest = image.layers[0], image.layer_digests[0]
    other, other_digest = image.layers[1], image.layer_digests[1]
    async with proxy_daemon(tmp_path, pushed_image.url) as info, _client(info) as c:
        path = f"/v2/test/app/blobs/{digest}"
        r = await c.head(path)  # not on the node: the upstream's answer, no download
        assert r.status_code == 200 and r.headers["content-length"] == str(len(layer))
        assert r.headers["docker-content-digest"] == digest
        assert info.node.store.blob_path(Digest.parse(digest)) is None
        r = await c.get(path)
        assert r.status_code == 200 and r.content == layer
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-length"] == str(len(layer))
        assert r.headers["docker-content-digest"] == digest
        assert await blob_stored(info.node, Digest.parse(digest)) is not None
        # now on the node: from disk, whole or in ranges
        r = await c.get(path, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == layer[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(layer)}"
        r = await c.head(path)
        assert r.status_code == 200 and r.headers["content-length"] == str(len(layer))
        r = await c.get(path, headers={"Range": f"bytes={len(layer)}-"})
        assert r.status_code == 416
        # a range of a blob the node does not have yet: through the swarm
        r = await c.get(
            f"/v2/test/app/blobs/{other_digest}", headers={"Range": f"bytes={PIECE + 5}-"}
        )
        assert r.status_code == 206 and r.content == other[PIECE + 5 :]
        assert r.headers["content-range"] == f"bytes {PIECE + 5}-{len(other) - 1}/{len(other)}"
        assert r.headers["content-length"] == str(len(other) - PIECE - 5)


async def test_blob_streams_before_the_download_completes(tmp_path: Path) -> None:
    """An upstream that holds back everything after the first pieces: the client gets
    those pieces at once, and the rest (and the end of the body) once they arrive."""
    data = os.urandom(24 * PIECE + 3)
    digest = _sha(data)
    gate_at = 4 * PIECE
    gate = trio.Event()

    async def upstream(request: Request) -> Response:
        if request.path != f"/v2/proxy/stream/blobs/{digest}":
            raise HTTPError(404, code="BLOB_UNKNOWN")
        rng = parse_range(request.headers.get("range"), len(data))
        start, end = rng or (0, len(data))

        async def body() -> AsyncIterator[bytes]:
            if start < gate_at:
                yield data[start : min(end, gate_at)]
            await gate.wait()
            if end > gate_at:
                yield data[max(start, gate_at) : end]

        headers = [("Content-Length", str(end - start))]
        if rng is not None:
            headers.append(("Content-Range", content_range(start, end, len(data))))
        return Response(206 if rng else 200, headers, body())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_http, upstream, "127.0.0.1", 0)
        ns = {"ns": f"127.0.0.1:{server.port}"}
        async with proxy_daemon(tmp_path, None) as info, _client(info) as c:
            got = b""
            async with c.stream("GET", f"/v2/proxy/stream/blobs/{digest}", params=ns) as r:
                assert r.status_code == 200
                assert r.headers["content-length"] == str(len(data))
                chunks = r.aiter_raw()
                with trio.fail_after(10):
                    while len(got) < gate_at:
                        got += await anext(chunks)
                assert got == data[:gate_at]  # before the upstream sent the rest
                job = info.node.job(Digest.parse(digest))
                assert job is not None and not job.done.is_set()
                gate.set()
                async for chunk in chunks:
                    got += chunk
            assert got == data
        nursery.cancel_scope.cancel()


async def test_errors_are_oci_bodies(tmp_path: Path, pushed_image: PushedImage) -> None:
    async with proxy_daemon(tmp_path, pushed_image.url) as info, _client(info) as c:
        r = await c.get(f"/v2/test/app/blobs/sha256:{'1' * 64}")
        assert r.status_code == 404 and _error_code(r) == "BLOB_UNKNOWN"
        assert r.headers["content-type"] == "application/json"
        r = await c.head(f"/v2/test/app/blobs/sha256:{'1' * 64}")
        assert r.status_code == 404
        r = await c.get("/v2/test/app/manifests/nope", headers={"Accept": ALL_TYPES})
        assert r.status_code == 404 and _error_code(r) == "MANIFEST_UNKNOWN"
        r = await c.get(f"/v2/test/app/manifests/sha256:{'2' * 64}")
        assert r.status_code == 404 and _error_code(r) == "MANIFEST_UNKNOWN"
        r = await c.get("/v2/Test/App/manifests/v1")
        assert r.status_code == 400 and _error_code(r) == "NAME_INVALID"
        r = await c.get("/v2/test/app/blobs/sha256:xyz")
        assert r.status_code == 400 and _error_code(r) == "DIGEST_INVALID"
        r = await c.get("/v2/test/app/manifests/md5:abc")
        assert r.status_code == 400 and _error_code(r) == "DIGEST_INVALID"
        r = await c.get("/v2/test/app/manifests/-bad-tag")
        assert r.status_code == 400 and _error_code(r) == "TAG_INVALID"
        for method, path in [
            ("PUT", "/v2/test/app/manifests/v2"),
            ("POST", "/v2/test/app/blobs/uploads/"),
            ("PATCH", "/v2/test/app/blobs/uploads/x"),
            ("DELETE", f"/v2/test/app/blobs/{pushed_image.image.layer_digests[0]}"),
        ]:
            r = await c.request(method, path, content=b"x")
            assert r.status_code == 405 and _error_code(r) == "UNSUPPORTED", (method, path)
        r = await c.get("/v2/_catalog")
        assert r.status_code == 404 and _error_code(r) == "UNSUPPORTED"
        r = await c.get("/v2/test/app/manifests/v1", params={"ns": "bad host!"})
        assert r.status_code == 400


async def test_ns_picks_the_upstream(tmp_path: Path, pushed_image: PushedImage) -> None:
    image = pushed_image.image
    # the default upstream is dead: only ?ns= can make these work
    async with proxy_daemon(tmp_path, "http://127.0.0.1:9") as info, _client(info) as c:
        ns = {"ns": pushed_image.host}
        r = await c.get("/v2/test/app/manifests/v1", params=ns, headers={"Accept": ALL_TYPES})
        assert r.status_code == 200 and r.content == image.manifest
        r = await c.get(f"/v2/test/app/blobs/{image.config_digest}", params=ns)
        assert r.status_code == 200 and r.content == image.config
        r = await c.get("/v2/test/app/manifests/v1", headers={"Accept": ALL_TYPES})
        assert r.status_code == 503 and _error_code(r) == "UNAVAILABLE"
    async with proxy_daemon(tmp_path, None) as info, _client(info) as c:
        r = await c.get("/v2/test/app/manifests/v1")
        assert r.status_code == 404 and _error_code(r) == "NAME_UNKNOWN"


async def test_corrupt_upstream_never_reaches_the_client(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    data = os.urandom(8 * PIECE + 77)
    digest = push_blob(registry.url, "proxy/corrupt", data)
    with FaultProxy(registry.url) as bad:
        bad.flip_byte_in_blobs = True
        async with proxy_daemon(tmp_path, bad.url) as info, _client(info) as c:
            got = b""
            status = 0
            try:
                async with c.stream("GET", f"/v2/proxy/corrupt/blobs/{digest}") as r:
                    status = r.status_code
                    async for chunk in r.aiter_raw():
                        got += chunk
            except httpx.HTTPError:
                pass  # cut short after the 200 began
            else:
                # The download failed its digest check before the first byte went out:
                # an error status instead of a truncated body.
                assert status >= 500, status
            assert len(got) < len(data)  # never a complete body
            assert info.node.store.blob_path(Digest.parse(digest)) is None
            assert not (tmp_path / "data" / "blobs" / "sha256" / digest[7:]).exists()
            # nor a later request, even for a range: its last byte waits for the whole-blob
            # check, which fails, so the range is cut short (or refused).
            try:
                r = await c.get(f"/v2/proxy/corrupt/blobs/{digest}", headers={"Range": "bytes=0-9"})
            except httpx.HTTPError:
                pass
            else:
                assert r.status_code not in (200, 206) or len(r.content) < 10


async def test_cached_manifests_served_when_upstream_is_down(
    tmp_path: Path, registry: LocalRegistry, pushed_image: PushedImage
) -> None:
    image = pushed_image.image
    with FaultProxy(registry.url) as front:
        async with proxy_daemon(tmp_path, front.url) as info, _client(info) as c:
            accept = {"Accept": MEDIA_DOCKER_MANIFEST}
            by_digest = f"/v2/test/app/manifests/{image.manifest_digest}"
            assert (await c.get("/v2/test/app/manifests/v1", headers=accept)).status_code == 200
            assert (await c.get(by_digest, headers=accept)).status_code == 200
            config = f"/v2/test/app/blobs/{image.config_digest}"
            assert (await c.get(config)).content == image.config
            front.stop()  # upstream gone: connections refused
            r = await c.get(by_digest, headers=accept)
            assert r.status_code == 200 and r.content == image.manifest
            r = await c.get("/v2/test/app/manifests/v1", headers=accept)
            assert r.status_code == 200 and r.content == image.manifest
            r = await c.head("/v2/test/app/manifests/v1", headers=accept)
            assert r.status_code == 200
            assert r.headers["docker-content-digest"] == image.manifest_digest
            r = await c.get(config)
            assert r.status_code == 200 and r.content == image.config
            assert (await c.get("/v2/")).status_code == 200
            # not cached: the gateway error
            r = await c.get("/v2/test/app/manifests/other", headers=accept)
            assert r.status_code == 503 and _error_code(r) == "UNAVAILABLE"
    # a new daemon on the same data dir still has the manifest (on disk, re-verified)
    async with proxy_daemon(tmp_path, "http://127.0.0.1:9") as info, _client(info) as c:
        r = await c.get(by_digest)
        assert r.status_code == 200 and r.content == image.manifest


async def test_upstream_down_blob_from_a_peer(tmp_path: Path, registry: LocalRegistry) -> None:
    """The image on a peer, not on this node, and the registry gone: the size comes from
    the manifest this proxy served, the bytes from the peer."""
    image = make_image(size=6 * PIECE, layers=1, seed=47)
    push_image(registry.url, "proxy/peer", "v1", image)
    layer, digest = image.layers[0], image.layer_digests[0]
    accept = {"Accept": ALL_TYPES}
    with FaultProxy(registry.url) as front:
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(serve_scheduler, "127.0.0.1", 0)
            extra = {"schedulers": (sched.url,)}
            async with (
                proxy_daemon(tmp_path / "a", front.url, **extra) as a,
                proxy_daemon(tmp_path / "b", front.url, **extra) as b,
                _client(a) as ca,
                _client(b) as cb,
            ):
                r = await ca.get(f"/v2/proxy/peer/blobs/{digest}")
                assert r.status_code == 200 and r.content == layer
                r = await cb.get("/v2/proxy/peer/manifests/v1", headers=accept)
                assert r.status_code == 200
                front.stop()
                r = await cb.get(f"/v2/proxy/peer/blobs/{digest}")
                assert r.status_code == 200 and r.content == layer
                await blob_stored(b.node, Digest.parse(digest))
                stats = b.node.stats[Digest.parse(digest)]
                assert stats.from_peers == len(layer) and stats.from_source == 0
            nursery.cancel_scope.cancel()


async def test_tag_ttl_answers_from_cache(tmp_path: Path, fault_proxy: FaultProxy) -> None:
    image = make_image(size=8 * 1024, layers=1, seed=43)
    push_image(fault_proxy.upstream_url, "proxy/ttl", "v1", image)
    async with (
        proxy_daemon(tmp_path, fault_proxy.url, proxy_tag_ttl=60.0) as info,
        _client(info) as c,
    ):
        for _ in range(3):
            r = await c.get("/v2/proxy/ttl/manifests/v1", headers={"Accept": ALL_TYPES})
            assert r.status_code == 200 and r.content == image.manifest
        assert fault_proxy.count("GET", "/v2/proxy/ttl/manifests/v1") == 1


async def test_auth_passes_through(tmp_path: Path, auth_registry: LocalRegistry) -> None:
    image = make_image(size=3 * PIECE, layers=1, seed=44)
    creds = (AUTH_USER, AUTH_PASSWORD)
    push_image(auth_registry.url, "private/app", "v1", image, auth=creds)
    async with proxy_daemon(tmp_path, auth_registry.url) as info, _client(info) as c:
        # no credentials: the upstream's 401 and its challenge, for dockerd's ping too
        for path in ("/v2/", "/v2/private/app/manifests/v1"):
            r = await c.get(path, headers={"Accept": ALL_TYPES})
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].lower().startswith("basic")
            assert _error_code(r) == "UNAUTHORIZED"
        r = await c.head(f"/v2/private/app/blobs/{image.layer_digests[0]}")
        assert r.status_code == 401 and "www-authenticate" in r.headers
        r = await c.get(f"/v2/private/app/blobs/{image.layer_digests[0]}")
        assert r.status_code == 401 and "www-authenticate" in r.headers
        # wrong credentials: refused too
        r = await c.get("/v2/private/app/manifests/v1", auth=(AUTH_USER, "wrong"))
        assert r.status_code == 401
        # the user's own credentials: through
        r = await c.get("/v2/", auth=creds)
        assert r.status_code == 200
        r = await c.get("/v2/private/app/manifests/v1", auth=creds, headers={"Accept": ALL_TYPES})
        assert r.status_code == 200 and r.content == image.manifest
        r = await c.get(f"/v2/private/app/blobs/{image.layer_digests[0]}", auth=creds)
        assert r.status_code == 200 and r.content == image.layers[0]


async def test_bearer_token_dance_through_the_proxy(
    tmp_path: Path, token_registry: TokenRegistry
) -> None:
    """What docker does with Docker Hub: the ping's challenge names the token server, the
    client gets a (here anonymous) token for its scope there, and the proxy passes it on."""
    tr = token_registry
    image = make_image(size=3 * PIECE, layers=1, seed=46)
    push_image(tr.url, "proxy/tok", "v1", image, auth=lambda: tr.push_token("proxy/tok"))
    async with proxy_daemon(tmp_path, tr.url) as info, _client(info) as c:
        r = await c.get("/v2/")
        assert r.status_code == 401
        scheme, params = parse_www_authenticate(r.headers["www-authenticate"])
        assert scheme == "bearer" and params["realm"]
        r = await c.get("/v2/proxy/tok/manifests/v1", headers={"Accept": ALL_TYPES})
        assert r.status_code == 401 and "www-authenticate" in r.headers
        async with httpx.AsyncClient(verify=False, trust_env=False) as auth_client:
            t = await auth_client.get(
                params["realm"],
                params={"service": params.get("service", ""), "scope": "repository:proxy/tok:pull"},
            )
        assert t.status_code == 200, t.text
        bearer = {"Authorization": f"Bearer {t.json()['token']}", "Accept": ALL_TYPES}
        r = await c.get("/v2/proxy/tok/manifests/v1", headers=bearer)
        assert r.status_code == 200 and r.content == image.manifest
        r = await c.get(f"/v2/proxy/tok/blobs/{image.layer_digests[0]}", headers=bearer)
        assert r.status_code == 200 and r.content == image.layers[0]


async def test_proxy_credentials_are_used(tmp_path: Path, auth_registry: LocalRegistry) -> None:
    image = make_image(size=2 * PIECE, layers=1, seed=45)
    push_image(auth_registry.url, "private/own", "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    reg = RegistryConfig(host=auth_registry.host, username=AUTH_USER, password=AUTH_PASSWORD)
    async with (
        proxy_daemon(tmp_path, auth_registry.url, registries={auth_registry.host: reg}) as info,
        _client(info) as c,
    ):
        assert (await c.get("/v2/")).status_code == 200
        r = await c.get("/v2/private/own/manifests/v1", headers={"Accept": ALL_TYPES})
        assert r.status_code == 200 and r.content == image.manifest
        r = await c.get(f"/v2/private/own/blobs/{image.layer_digests[0]}")
        assert r.status_code == 200 and r.content == image.layers[0]


@pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo not installed (apt-get install skopeo)"
)
async def test_skopeo_copies_through_the_proxy(tmp_path: Path, pushed_image: PushedImage) -> None:
    image = pushed_image.image
    async with proxy_daemon(tmp_path, pushed_image.url) as info:
        assert info.proxy_url is not None
        proxy = info.proxy_url.removeprefix("http://")
        dest = tmp_path / "copy"
        result = await trio.run_process(
            [
                "skopeo",
                "copy",
                "--src-tls-verify=false",
                f"docker://{proxy}/test/app:v1",
                f"dir:{dest}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        # the layers went through the node's store
        for digest in image.layer_digests:
            assert await blob_stored(info.node, Digest.parse(digest)) is not None
    assert json.loads((dest / "manifest.json").read_bytes()) == json.loads(image.manifest)
    for digest, data in image.blobs().items():
        assert (dest / digest.removeprefix("sha256:")).read_bytes() == data


async def test_tags_list_comes_from_the_upstream(tmp_path: Path, pushed_image: PushedImage) -> None:
    async with proxy_daemon(tmp_path, pushed_image.url) as info, _client(info) as c:
        r = await c.get("/v2/test/app/tags/list")
        assert r.status_code == 200, r.text
        assert "v1" in r.json()["tags"] and r.json()["name"] == "test/app"
        r = await c.get("/v2/test/app/tags/list", params={"n": "1"})
        assert r.status_code == 200 and len(r.json()["tags"]) == 1
        r = await c.get("/v2/test/nothing-here/tags/list")
        assert r.status_code == 404 and _error_code(r) == "NAME_UNKNOWN"
        r = await c.get("/v2/Bad..Name/tags/list")
        assert r.status_code == 400 and _error_code(r) == "NAME_INVALID"
        # skopeo inspect (which lists tags) works through the proxy
        assert info.proxy_url is not None
        proxy = info.proxy_url.removeprefix("http://")
        result = await trio.run_process(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{proxy}/test/app:v1"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert "v1" in json.loads(result.stdout)["RepoTags"]


def test_proxy_config_and_flags() -> None:
    conf = load_node_config(
        None, env={"P2PDIST_PROXY_LISTEN": "off", "P2PDIST_UPSTREAM": "http://127.0.0.1:5000/"}
    )
    assert conf.proxy_listen is None and conf.upstream == "http://127.0.0.1:5000"
    assert load_node_config(None, env={}).proxy_listen == "127.0.0.1:65001"
    conf = load_node_config(None, env={}, overrides={"proxy_tag_ttl": "2.5"})
    assert conf.proxy_tag_ttl == 2.5
    with pytest.raises(ConfigError):
        load_node_config(None, env={"P2PDIST_UPSTREAM": "registry.example"})
    with pytest.raises(ConfigError):
        load_node_config(None, env={"P2PDIST_PROXY_LISTEN": "nope"})
    args = build_parser().parse_args(
        ["daemon", "--proxy-listen", "127.0.0.1:0", "--upstream", "https://r.example"]
    )
    assert args.proxy_listen == "127.0.0.1:0" and args.upstream == "https://r.example"


async def test_credentials_never_reach_logs_errors_or_files(
    tmp_path: Path, auth_registry: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon holds a registry password and a client passes its own Basic
    credentials; at DEBUG level nothing it logs, answers or writes holds either."""
    caplog.set_level(logging.DEBUG)
    image = make_image(size=2 * PIECE, layers=1, seed=48)
    push_image(auth_registry.url, "private/secret", "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    reg = RegistryConfig(host=auth_registry.host, username=AUTH_USER, password=AUTH_PASSWORD)
    client_auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    answers = []
    async with (
        proxy_daemon(tmp_path, auth_registry.url, registries={auth_registry.host: reg}) as info,
        _client(info) as c,
    ):
        headers = {"Accept": ALL_TYPES, "Authorization": f"Basic {client_auth}"}
        for path in (
            "/v2/private/secret/manifests/v1",
            f"/v2/private/secret/blobs/{image.layer_digests[0]}",
            "/v2/private/secret/manifests/nope",  # an error answer too
            f"/v2/private/nothing/blobs/sha256:{'0' * 64}",
        ):
            r = await c.get(path, headers=headers)
            answers.append(r.text if r.status_code != 200 else "")
        await blob_stored(info.node, Digest.parse(image.layer_digests[0]))
        # What operators scrape and probe: metrics and health, on the API and the proxy.
        async with httpx.AsyncClient(trust_env=False) as api:
            for url in (info.api_url, info.proxy_url):
                for path in ("/metrics", "/readyz", "/healthz"):
                    r = await api.get(f"{url}{path}")
                    if r.status_code != 404:
                        answers.append(r.text)
        assert "p2pdist_received_bytes_total" in "".join(answers)
    text = caplog.text + "".join(answers) + repr(info.node.config)
    for secret in (AUTH_PASSWORD, client_auth):
        assert secret not in text
        for f in (tmp_path / "data").rglob("*"):
            if f.is_file() and f.stat().st_size < (1 << 20):
                assert secret.encode() not in f.read_bytes(), f


async def test_stream_cut_when_a_sent_piece_is_dropped_even_if_the_blob_then_completes(
    tmp_path: Path,
) -> None:
    """Pieces 0-1 are streamed; piece 0 is then found bad on disk (un-verified), fetched
    again and the blob completes, all before the stream's next pass.  The bytes already
    sent may be the bad ones: the stream must end short, never as a whole body."""
    from p2pdist.node import Job
    from p2pdist.proxy import _stream_job
    from p2pdist.store import PieceStore

    size = 64 << 10
    data = os.urandom(4 * size)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())

    def piece(i: int) -> bytes:
        return data[i * size : (i + 1) * size]

    store = PieceStore(tmp_path / "store")
    task = store.open_task(digest, len(data), size)
    job = Job(digest)
    job.adopt(task, 0)
    for i in (0, 1):
        task.write_piece(i, piece(i), hashlib.sha256(piece(i)).hexdigest())
    stream = _stream_job(job, 0, len(data))
    first = await stream.__anext__()
    assert isinstance(first, FileChunk) and first.offset == 0 and first.length == 2 * size
    first.close()
    assert task.drop_pieces([0]) == [0]
    for i in (0, 2, 3):
        task.write_piece(i, piece(i), hashlib.sha256(piece(i)).hexdigest())
    job.path = task.commit()
    task.close()
    job.digest_ok = True
    with pytest.raises(HTTPError, match="verified data changed"):
        async for item in stream:
            if isinstance(item, FileChunk):
                item.close()
    store.close()
