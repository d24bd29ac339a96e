"""RegistryClient and UrlSource against a real docker-registry on loopback (plus the fault
proxy and token server from the test infrastructure)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.image import Image, make_image, push_image, push_index
from bench.localregistry import LocalRegistry
from p2pdist.config import RegistryConfig
from p2pdist.digest import Digest, sha256_digest
from p2pdist.errors import (
    DigestMismatch,
    InvalidReference,
    NetworkError,
    NotFound,
    Unauthorized,
    UpstreamError,
)
from p2pdist.registry import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    ImageManifest,
    Index,
    RegistryClient,
    RetryPolicy,
    parse_manifest,
)
from p2pdist.urlsource import UrlSource, make_http_client
from tests.conftest import AUTH_PASSWORD, AUTH_USER, TOKEN_PASSWORD, TOKEN_USER
from tests.faultproxy import FaultProxy
from tests.helpers import PushedImage, requires_registry
from tests.tokenserver import TokenRegistry

pytestmark = [pytest.mark.integration, requires_registry]

FAST = RetryPolicy(attempts=5, base=0.01, cap=0.05)
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")


def client_for(host: str, **kw: object) -> RegistryClient:
    cfg = kw.pop("config", None)
    assert cfg is None or isinstance(cfg, RegistryConfig)
    docker_config = kw.pop("docker_config", NO_DOCKER_CONFIG)
    assert isinstance(docker_config, Path)
    retry = kw.pop("retry", FAST)
    assert isinstance(retry, RetryPolicy)
    assert not kw
    return RegistryClient(
        cfg or RegistryConfig(host=host), docker_config=docker_config, retry=retry
    )


async def read_range(src: object, start: int, end: int | None) -> bytes:
    open_range = src.open_range  # type: ignore[attr-defined]
    async with open_range(start, end) as chunks:
        return b"".join([c async for c in chunks])


def biggest_layer(image: Image) -> tuple[Digest, bytes]:
    i = max(range(len(image.layers)), key=lambda j: len(image.layers[j]))
    return Digest.parse(image.layer_digests[i]), image.layers[i]


# -- manifests ---------------------------------------------------------------------------


async def test_manifest_by_tag_and_digest(pushed_image: PushedImage) -> None:
    img = pushed_image.image
    async with client_for(pushed_image.host) as reg:
        await reg.ping()
        by_tag = await reg.get_manifest(pushed_image.repo, pushed_image.tag)
        assert by_tag.data == img.manifest
        assert str(by_tag.digest) == img.manifest_digest
        assert by_tag.media_type == img.manifest_media_type
        by_digest = await reg.get_manifest(pushed_image.repo, img.manifest_digest)
        assert by_digest.data == img.manifest and by_digest.digest == by_tag.digest

        for ref in (pushed_image.tag, img.manifest_digest):
            desc = await reg.head_manifest(pushed_image.repo, ref)
            assert str(desc.digest) == img.manifest_digest
            assert desc.size == len(img.manifest)
            assert desc.media_type == img.manifest_media_type

        resolved = await reg.resolve_image(pushed_image.repo, pushed_image.tag)
        assert isinstance(resolved, ImageManifest)
        assert resolved.index_digest is None
        assert [str(layer.digest) for layer in resolved.layers] == img.layer_digests
        config = await reg.fetch_blob(pushed_image.repo, resolved.config.digest)
        assert config == img.config


async def test_accept_header_restricts_types(pushed_image: PushedImage) -> None:
    # docker-registry answers 404/400 when Accept excludes the stored type; the client
    # forwards exactly what it was given.
    async with client_for(pushed_image.host) as reg:
        m = await reg.get_manifest(
            pushed_image.repo, pushed_image.tag, accept=[pushed_image.image.manifest_media_type]
        )
        assert m.data == pushed_image.image.manifest


@pytest.fixture(scope="module")
def multi_platform(registry: LocalRegistry) -> Iterator[dict[str, Image]]:
    images = {
        "linux/amd64": make_image(size=4096, layers=1, seed=11, platform="linux/amd64"),
        "linux/arm64/v8": make_image(size=4096, layers=1, seed=12, platform="linux/arm64/v8"),
        "linux/arm/v7": make_image(size=4096, layers=1, seed=13, platform="linux/arm/v7"),
    }
    push_index(registry.url, "test/multi", "list", list(images.values()), oci=False)
    oci_images = {
        p: make_image(size=4096, layers=1, seed=20 + i, platform=p, oci=True)
        for i, p in enumerate(images)
    }
    push_index(registry.url, "test/multi", "oci", list(oci_images.values()), oci=True)
    yield {
        **{f"list:{k}": v for k, v in images.items()},
        **{f"oci:{k}": v for k, v in oci_images.items()},
    }


@pytest.mark.parametrize(
    "tag,index_type,manifest_type",
    [
        ("list", MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST),
        ("oci", MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST),
    ],
)
async def test_index_resolves_to_platform(
    registry: LocalRegistry,
    multi_platform: dict[str, Image],
    tag: str,
    index_type: str,
    manifest_type: str,
) -> None:
    async with client_for(registry.host) as reg:
        index = await reg.get_manifest("test/multi", tag)
        assert index.media_type == index_type
        parsed = parse_manifest(index.data, index.media_type)
        assert isinstance(parsed, Index) and len(parsed.manifests) == 3
        for platform, want in (
            ("linux/amd64", "linux/amd64"),
            ("linux/arm64", "linux/arm64/v8"),
            ("linux/arm64/v8", "linux/arm64/v8"),
            ("linux/arm", "linux/arm/v7"),
        ):
            image = multi_platform[f"{tag}:{want}"]
            got = await reg.resolve_image("test/multi", tag, platform=platform)
            assert str(got.digest) == image.manifest_digest
            assert got.media_type == manifest_type
            assert got.index_digest == index.digest
            assert [str(x.digest) for x in got.layers] == image.layer_digests
        # Default platform of the client.
        got = await reg.resolve_image("test/multi", tag)
        assert str(got.digest) == multi_platform[f"{tag}:linux/amd64"].manifest_digest
        with pytest.raises(NotFound, match="linux/s390x"):
            await reg.resolve_image("test/multi", tag, platform="linux/s390x")


async def test_not_found(pushed_image: PushedImage) -> None:
    missing = sha256_digest(b"no such blob")
    async with client_for(pushed_image.host) as reg:
        with pytest.raises(NotFound) as info:
            await reg.get_manifest(pushed_image.repo, "nope")
        assert "test/app:nope" in str(info.value) and "MANIFEST_UNKNOWN" in str(info.value)
        with pytest.raises(NotFound):
            await reg.head_manifest(pushed_image.repo, "nope")
        with pytest.raises(NotFound) as info:
            await reg.get_manifest("test/absent", str(missing))
        assert str(missing) in str(info.value)
        with pytest.raises(NotFound):
            await reg.blob_size(pushed_image.repo, missing)
        with pytest.raises(NotFound):
            await reg.fetch_blob(pushed_image.repo, missing)
        with pytest.raises(NotFound):
            await read_range(reg.blob_source(pushed_image.repo, missing), 0, 10)
        with pytest.raises(InvalidReference):
            await reg.get_manifest("Bad Repo", "v1")


# -- blobs -------------------------------------------------------------------------------


async def test_blob_ranges_in_parallel(pushed_image: PushedImage) -> None:
    digest, data = biggest_layer(pushed_image.image)
    n = 8
    bounds = [len(data) * i // n for i in range(n + 1)]
    got: dict[int, bytes] = {}
    async with client_for(pushed_image.host) as reg:
        assert await reg.blob_size(pushed_image.repo, digest) == len(data)
        src = reg.blob_source(pushed_image.repo, digest)
        info = await src.probe()
        assert info.size == len(data) and info.accepts_ranges

        async def one(i: int) -> None:
            got[i] = await read_range(src, bounds[i], bounds[i + 1])

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        assert b"".join(got[i] for i in range(n)) == data
        # Whole blob (no Range header), an open-ended tail, and an empty range.
        assert await read_range(src, 0, None) == data
        assert await read_range(src, len(data) - 100, None) == data[-100:]
        assert await read_range(src, 5, 5) == b""


async def test_blob_stream_cut_is_network_error(
    fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    digest, data = biggest_layer(pushed_image.image)
    fault_proxy.cut_blobs_after = 1000
    async with client_for(fault_proxy.host) as reg:
        src = reg.blob_source(pushed_image.repo, digest, size=len(data))
        with pytest.raises(NetworkError):
            await read_range(src, 0, 100_000)


async def test_fetch_blob_verifies_digest(
    fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    config = Digest.parse(pushed_image.image.config_digest)
    fault_proxy.flip_byte_in_blobs = True
    async with client_for(fault_proxy.host) as reg:
        with pytest.raises(DigestMismatch):
            await reg.fetch_blob(pushed_image.repo, config)


# -- retries -----------------------------------------------------------------------------


async def test_503_twice_then_success(fault_proxy: FaultProxy, pushed_image: PushedImage) -> None:
    digest, data = biggest_layer(pushed_image.image)
    proxy = fault_proxy
    async with client_for(proxy.host) as reg:
        proxy.fail_next(2, 503)
        assert await reg.blob_size(pushed_image.repo, digest) == len(data)
        assert proxy.count("HEAD", "/blobs/") == 3
        proxy.fail_next(2, 502, match="GET /v2/test/app/blobs/")
        src = reg.blob_source(pushed_image.repo, digest)
        assert await read_range(src, 10, 20) == data[10:20]
        assert proxy.count("GET", "/blobs/") == 3
        proxy.fail_next(10, 503)
        with pytest.raises(UpstreamError, match="503"):
            await reg.get_manifest(pushed_image.repo, pushed_image.tag)
        assert proxy.count("GET", "/manifests/") == FAST.attempts


async def test_429_honours_retry_after(fault_proxy: FaultProxy, pushed_image: PushedImage) -> None:
    async with client_for(fault_proxy.host) as reg:
        fault_proxy.rate_limit_next(1, retry_after=1)
        t0 = trio.current_time()
        m = await reg.get_manifest(pushed_image.repo, pushed_image.tag)
        elapsed = trio.current_time() - t0
    assert m.data == pushed_image.image.manifest
    assert elapsed >= 1.0
    assert fault_proxy.count("GET", "/manifests/") == 2


async def test_connection_refused_is_network_error() -> None:
    with FaultProxy("http://127.0.0.1:9") as proxy:
        host = proxy.host
    # The proxy is stopped: nothing listens on its port any more.
    async with client_for(host, retry=RetryPolicy(attempts=2, base=0.01)) as reg:
        with pytest.raises(NetworkError, match="after 2 attempts"):
            await reg.ping()


# -- redirects ---------------------------------------------------------------------------


async def test_redirect_to_other_host_drops_authorization(
    registry: LocalRegistry, pushed_image: PushedImage
) -> None:
    digest, data = biggest_layer(pushed_image.image)
    with FaultProxy(registry.url) as front, FaultProxy(registry.url, addr="127.0.0.2") as cdn:
        front.redirect_blobs_to = cdn.url
        cfg = RegistryConfig(host=front.host, token="static-secret-token")
        async with client_for(front.host, config=cfg) as reg:
            assert (
                await read_range(reg.blob_source(pushed_image.repo, digest), 100, 200)
                == (data[100:200])
            )
            assert (
                await reg.fetch_blob(
                    pushed_image.repo, Digest.parse(pushed_image.image.config_digest)
                )
                == pushed_image.image.config
            )
        assert front.saw_authorization("/blobs/")
        assert cdn.count("GET", "/blobs/") == 2
        assert not cdn.saw_authorization()
        assert cdn.records("GET", "/blobs/")[0].headers.get("range") == "bytes=100-199"


# -- auth --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_image(auth_registry: LocalRegistry) -> Image:
    image = make_image(size=64 << 10, layers=1, seed=31)
    push_image(auth_registry.url, "test/private", "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    return image


async def test_basic_auth(auth_registry: LocalRegistry, auth_image: Image) -> None:
    cfg = RegistryConfig(host=auth_registry.host, username=AUTH_USER, password=AUTH_PASSWORD)
    async with client_for(auth_registry.host, config=cfg) as reg:
        await reg.ping()
        m = await reg.get_manifest("test/private", "v1")
        assert m.data == auth_image.manifest
        digest = Digest.parse(auth_image.layer_digests[0])
        assert (
            await read_range(reg.blob_source("test/private", digest), 0, None)
            == (auth_image.layers[0])
        )


async def test_basic_auth_from_docker_config(
    auth_registry: LocalRegistry, auth_image: Image, tmp_path: Path
) -> None:
    auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {f"http://{auth_registry.host}": {"auth": auth}}}))
    async with client_for(auth_registry.host, docker_config=path) as reg:
        m = await reg.get_manifest("test/private", "v1")
        assert m.data == auth_image.manifest


async def test_basic_auth_wrong_password(auth_registry: LocalRegistry, auth_image: Image) -> None:
    cfg = RegistryConfig(host=auth_registry.host, username=AUTH_USER, password="wrong-pw-xyz")
    async with client_for(auth_registry.host, config=cfg) as reg:
        with pytest.raises(Unauthorized) as info:
            await reg.get_manifest("test/private", "v1")
    assert "wrong-pw-xyz" not in str(info.value)
    async with client_for(auth_registry.host) as reg:
        with pytest.raises(Unauthorized, match="no credentials"):
            await reg.ping()


@pytest.fixture(scope="module")
def tokens(token_registry: TokenRegistry) -> Iterator[tuple[TokenRegistry, Image]]:
    tr = token_registry
    image = make_image(size=256 << 10, layers=2, seed=41)
    push_image(tr.url, "test/tok", "v1", image, auth=lambda: tr.push_token("test/tok"))
    expires_in = tr.tokens.expires_in
    try:
        yield tr, image
    finally:
        tr.tokens.expires_in = expires_in


async def test_bearer_token_cached_then_refreshed(tokens: tuple[TokenRegistry, Image]) -> None:
    tr, image = tokens
    tr.tokens.expires_in = 300
    cfg = RegistryConfig(host=tr.host, username=TOKEN_USER, password=TOKEN_PASSWORD)
    before = tr.tokens.token_requests
    async with client_for(tr.host, config=cfg) as reg:
        m = await reg.get_manifest("test/tok", "v1")
        assert m.data == image.manifest
        digest = Digest.parse(image.layer_digests[0])
        src = reg.blob_source("test/tok", digest)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(read_range, src, 0, 100)
        await reg.head_manifest("test/tok", "v1")
        await reg.fetch_blob("test/tok", Digest.parse(image.config_digest))
        assert tr.tokens.token_requests - before == 1
        assert reg.token_fetches == 1

        # Expiry: a short-lived token is fetched again once it runs out.
        tr.tokens.expires_in = 2
        await reg.get_manifest("test/tok", str(m.digest))
        assert reg.token_fetches == 1  # the old 300 s token is still good
    async with client_for(tr.host, config=cfg) as reg:
        n0 = tr.tokens.token_requests
        await reg.get_manifest("test/tok", "v1")
        await reg.get_manifest("test/tok", "v1")
        assert tr.tokens.token_requests - n0 == 1
        await trio.sleep(2.1)
        await reg.get_manifest("test/tok", "v1")
        assert tr.tokens.token_requests - n0 == 2
    tr.tokens.expires_in = 300


async def test_bearer_anonymous_and_wrong_password(tokens: tuple[TokenRegistry, Image]) -> None:
    tr, image = tokens
    async with client_for(tr.host) as reg:
        m = await reg.get_manifest("test/tok", "v1")
        assert m.data == image.manifest
        assert reg.token_fetches == 1
    cfg = RegistryConfig(host=tr.host, username=TOKEN_USER, password="not-her-password")
    async with client_for(tr.host, config=cfg) as reg:
        with pytest.raises(Unauthorized) as info:
            await reg.get_manifest("test/tok", "v1")
    assert "not-her-password" not in str(info.value)


# -- plain URLs --------------------------------------------------------------------------


async def test_url_source_against_registry_blob(pushed_image: PushedImage) -> None:
    digest, data = biggest_layer(pushed_image.image)
    url = f"{pushed_image.url}/v2/{pushed_image.repo}/blobs/{digest}"
    async with make_http_client() as client:
        src = UrlSource(client, url, retry=FAST)
        info = await src.probe()
        assert (info.size, info.accepts_ranges) == (len(data), True)
        assert await read_range(src, 1000, 5000) == data[1000:5000]
        assert await read_range(src, 0, None) == data
        with pytest.raises(NotFound):
            await UrlSource(client, url[:-4] + "0000", retry=FAST).probe()


async def test_lean_range_reader_gives_up_on_a_silent_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that stops sending mid-body without closing (a connection the network
    dropped): the read times out with a NetworkError (which the caller retries), it
    does not hang."""
    from p2pdist.registry import _fastrange

    monkeypatch.setattr(_fastrange, "READ_TIMEOUT", 0.3)
    stalled = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\n"
            b"Content-Range: bytes 0-99/100\r\n\r\n" + b"x" * 40
        )
        await stalled.wait()  # never sends the rest, never closes

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        reader = _fastrange.FastRangeReader("127.0.0.1", port)
        got = 0
        with trio.fail_after(5), pytest.raises(NetworkError, match="no data for"):
            async with reader.open("/v2/x/blobs/sha256:0", 0, 100, host_header="x") as chunks:
                async for chunk in chunks:
                    got += len(chunk)
        assert got == 40
        await reader.aclose()
        stalled.set()
        nursery.cancel_scope.cancel()
