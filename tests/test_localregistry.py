"""The test infrastructure itself: real registry, synthetic images, push and pull back."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from bench.image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    make_image,
    make_index,
    push_image,
    push_index,
    sha256,
)
from bench.localregistry import LocalRegistry, free_port
from tests.conftest import AUTH_PASSWORD, AUTH_USER, TOKEN_PASSWORD, TOKEN_USER
from tests.faultproxy import FaultProxy
from tests.helpers import PushedImage, requires_registry

if TYPE_CHECKING:
    from tests.tokenserver import TokenRegistry

ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])


def test_image_is_deterministic_and_consistent() -> None:
    a = make_image(size=1 << 20, layers=2, layer_format="gzip", seed=7)
    b = make_image(size=1 << 20, layers=2, layer_format="gzip", seed=7)
    c = make_image(size=1 << 20, layers=2, layer_format="gzip", seed=8)
    assert a.manifest_digest == b.manifest_digest
    assert a.manifest_digest != c.manifest_digest
    config = json.loads(a.config)
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["diff_ids"] == [sha256(t) for t in a.uncompressed_layers()]
    manifest = json.loads(a.manifest)
    assert manifest["config"]["digest"] == a.config_digest
    assert [layer["digest"] for layer in manifest["layers"]] == a.layer_digests
    assert [layer["size"] for layer in manifest["layers"]] == [len(x) for x in a.layers]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.layers[0]))) as tar:
        files = [m for m in tar if m.isfile()]
    assert sum(m.size for m in files) >= 512 << 10


def test_tar_layers_compress_about_3_to_1() -> None:
    image = make_image(size=4 << 20, layers=1, layer_format="tar", seed=1)
    layer = image.layers[0]
    assert image.diff_ids == [sha256(layer)]
    ratio = len(layer) / len(gzip.compress(layer, compresslevel=1))
    assert 2.3 < ratio < 4.0
    tarfile.open(fileobj=io.BytesIO(layer)).close()  # a real tar


def test_oci_and_index_media_types() -> None:
    amd = make_image(size=1024, layers=1, seed=1, oci=True)
    arm = make_image(size=1024, layers=1, seed=2, oci=True, platform="linux/arm64/v8")
    assert json.loads(amd.manifest)["mediaType"] == OCI_MANIFEST
    index, digest = make_index([amd, arm])
    doc = json.loads(index)
    assert digest == sha256(index) and doc["mediaType"] == OCI_INDEX
    assert doc["manifests"][1]["platform"] == {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8",
    }


@requires_registry
def test_pushed_image_reads_back(pushed_image: PushedImage) -> None:
    image = pushed_image.image
    with httpx.Client(base_url=pushed_image.url, trust_env=False) as client:
        resp = client.get(
            f"/v2/{pushed_image.repo}/manifests/{pushed_image.tag}", headers={"Accept": ACCEPT}
        )
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        assert sha256(resp.content) == image.manifest_digest
        for digest, data in image.blobs().items():
            blob = client.get(f"/v2/{pushed_image.repo}/blobs/{digest}")
            assert blob.status_code == 200
            assert sha256(blob.content) == digest
            assert blob.content == data
        part = client.get(
            f"/v2/{pushed_image.repo}/blobs/{image.layer_digests[0]}",
            headers={"Range": "bytes=10-19"},
        )
        assert part.status_code == 206
        assert part.content == image.layers[0][10:20]


@requires_registry
def test_index_push(registry: LocalRegistry) -> None:
    images = [
        make_image(size=4096, layers=1, seed=11, platform="linux/amd64"),
        make_image(size=4096, layers=1, seed=12, platform="linux/arm64"),
    ]
    digest = push_index(registry.url, "test/multi", "v1", images)
    resp = httpx.get(
        f"{registry.url}/v2/test/multi/manifests/v1", headers={"Accept": ACCEPT}, trust_env=False
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    assert sha256(resp.content) == digest


@requires_registry
def test_htpasswd_registry(auth_registry: LocalRegistry) -> None:
    url = f"{auth_registry.url}/v2/"
    anon = httpx.get(url, trust_env=False)
    assert anon.status_code == 401
    assert anon.headers["WWW-Authenticate"].startswith("Basic ")
    assert httpx.get(url, auth=(AUTH_USER, "wrong"), trust_env=False).status_code == 401
    assert httpx.get(url, auth=(AUTH_USER, AUTH_PASSWORD), trust_env=False).status_code == 200
    image = make_image(size=64 << 10, layers=1, seed=5)
    push_image(auth_registry.url, "test/private", "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    manifest_url = f"{auth_registry.url}/v2/test/private/manifests/v1"
    assert httpx.get(manifest_url, trust_env=False).status_code == 401
    resp = httpx.get(
        manifest_url,
        auth=(AUTH_USER, AUTH_PASSWORD),
        headers={"Accept": DOCKER_MANIFEST},
        trust_env=False,
    )
    assert resp.status_code == 200 and sha256(resp.content) == image.manifest_digest


@requires_registry
def test_registry_on_other_loopback_address_and_stops() -> None:
    reg = LocalRegistry(addr="127.0.0.2")
    with reg:
        assert reg.host.startswith("127.0.0.2:")
        assert httpx.get(f"{reg.url}/v2/", trust_env=False).status_code == 200
        root = reg.root
    assert not reg.running
    assert not root.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", trust_env=False, timeout=2)


def test_non_loopback_address_refused() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LocalRegistry(addr="10.0.0.1")


# -- FaultProxy ---------------------------------------------------------------------------


def _blob_url(base: str, pushed: PushedImage, index: int = 0) -> str:
    return f"{base}/v2/{pushed.repo}/blobs/{pushed.image.layer_digests[index]}"


@requires_registry
def test_proxy_passes_through_head_get_range(
    fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    layer = pushed_image.image.layers[0]
    url = _blob_url(fault_proxy.url, pushed_image)
    with httpx.Client(trust_env=False) as client:
        head = client.head(url)
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == len(layer)
        assert head.headers["Docker-Content-Digest"] == pushed_image.image.layer_digests[0]
        full = client.get(url)
        assert full.status_code == 200 and full.content == layer
        part = client.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes 100-199/{len(layer)}"
        assert part.content == layer[100:200]
    assert fault_proxy.count("GET", "/blobs/") == 2
    assert fault_proxy.count("HEAD") == 1
    assert fault_proxy.count() == 3


@requires_registry
def test_proxy_fail_and_rate_limit(fault_proxy: FaultProxy, pushed_image: PushedImage) -> None:
    url = _blob_url(fault_proxy.url, pushed_image)
    fault_proxy.fail_next(2, status=503)
    fault_proxy.rate_limit_next(1, retry_after=7)
    with httpx.Client(trust_env=False) as client:
        statuses = [client.get(url) for _ in range(4)]
    assert [r.status_code for r in statuses] == [503, 503, 429, 200]
    assert statuses[2].headers["Retry-After"] == "7"
    assert statuses[3].content == pushed_image.image.layers[0]
    assert fault_proxy.count("GET") == 4
    assert [r.fault for r in fault_proxy.records()] == ["fail", "fail", "rate_limit", None]


@requires_registry
def test_proxy_fail_match_only_hits_matching_requests(
    fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    fault_proxy.fail_next(1, status=500, match="/blobs/")
    with httpx.Client(base_url=fault_proxy.url, trust_env=False) as client:
        assert client.get("/v2/").status_code == 200
        assert client.get(_blob_url("", pushed_image)).status_code == 500
        assert client.get(_blob_url("", pushed_image)).status_code == 200


@requires_registry
def test_proxy_flips_a_byte_and_keeps_length(
    fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    layer = pushed_image.image.layers[1]
    fault_proxy.flip_byte_in_blobs = True
    resp = httpx.get(_blob_url(fault_proxy.url, pushed_image, 1), trust_env=False)
    assert resp.status_code == 200
    assert len(resp.content) == len(layer)
    assert sum(a != b for a, b in zip(resp.content, layer, strict=True)) == 1
    assert sha256(resp.content) != pushed_image.image.layer_digests[1]


@requires_registry
def test_proxy_cut_blob_body(fault_proxy: FaultProxy, pushed_image: PushedImage) -> None:
    fault_proxy.cut_blobs_after = 1000
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(_blob_url(fault_proxy.url, pushed_image), trust_env=False)


@requires_registry
def test_proxy_redirects_blobs_to_second_host(
    registry: LocalRegistry, pushed_image: PushedImage
) -> None:
    with (
        FaultProxy(registry.url) as front,
        FaultProxy(registry.url, addr="127.0.0.2") as cdn,
    ):
        front.redirect_blobs_to = cdn.url
        url = _blob_url(front.url, pushed_image)
        with httpx.Client(trust_env=False, follow_redirects=True) as client:
            resp = client.get(url, auth=("someone", "secret"))
        assert resp.status_code == 200 and resp.content == pushed_image.image.layers[0]
        assert cdn.host.startswith("127.0.0.2:")
        assert front.records()[0].status == 307 and front.saw_authorization()
        assert cdn.count("GET", "/blobs/") == 1
        # httpx drops Authorization on a redirect to another origin, as a client must.
        assert not cdn.saw_authorization()


@requires_registry
def test_proxy_forwards_uploads(fault_proxy: FaultProxy) -> None:
    image = make_image(size=300 << 10, layers=2, seed=21)
    push_image(fault_proxy.url, "test/viaproxy", "v1", image)
    assert fault_proxy.count("PUT", "/manifests/v1") == 1
    assert fault_proxy.count("POST", "/blobs/uploads/") == 3
    # The upload Location pointed back at the proxy (Host header was kept).
    assert fault_proxy.count("PUT", "/blobs/uploads/") == 3


def test_proxy_answers_502_when_upstream_is_down() -> None:
    port = free_port()
    with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
        resp = httpx.get(f"{proxy.url}/v2/", trust_env=False)
    assert resp.status_code == 502


# -- TokenServer --------------------------------------------------------------------------


@requires_registry
def test_token_flow_push_pull(token_registry: TokenRegistry) -> None:
    tr = token_registry
    image = make_image(size=200 << 10, layers=1, seed=31)
    push_image(tr.url, "test/tok", "v1", image, auth=lambda: tr.push_token("test/tok"))
    manifest_url = f"{tr.url}/v2/test/tok/manifests/v1"
    with httpx.Client(trust_env=False, headers={"Accept": DOCKER_MANIFEST}) as client:
        challenge = client.get(manifest_url)
        assert challenge.status_code == 401
        www = challenge.headers["WWW-Authenticate"]
        assert www.startswith(f'Bearer realm="{tr.tokens.realm}"')
        assert 'scope="repository:test/tok:pull"' in www
        before = tr.tokens.token_requests
        params = {"service": "p2pdist-test", "scope": "repository:test/tok:pull,push"}
        anon = client.get(tr.tokens.realm, params=params).json()
        assert tr.tokens.token_requests == before + 1
        assert tr.tokens.requests[-1].access == [
            {"type": "repository", "name": "test/tok", "actions": ["pull"]}
        ]
        bearer = {"Authorization": f"Bearer {anon['token']}"}
        pulled = client.get(manifest_url, headers=bearer)
        assert pulled.status_code == 200 and sha256(pulled.content) == image.manifest_digest
        assert (
            client.post(f"{tr.url}/v2/test/tok/blobs/uploads/", headers=bearer).status_code == 401
        )
        user = client.get(tr.tokens.realm, params=params, auth=(TOKEN_USER, TOKEN_PASSWORD))
        assert user.status_code == 200
        bearer = {"Authorization": f"Bearer {user.json()['token']}"}
        assert (
            client.post(f"{tr.url}/v2/test/tok/blobs/uploads/", headers=bearer).status_code == 202
        )
        bad = client.get(tr.tokens.realm, params=params, auth=(TOKEN_USER, "wrong"))
        assert bad.status_code == 401


@requires_registry
def test_token_strict_expiry() -> None:
    pytest.importorskip("cryptography", reason="token tests need the cryptography package")
    from tests.tokenserver import open_token_registry

    image = make_image(size=1024, layers=1, seed=41)
    with open_token_registry(expires_in=2, strict_expiry=True) as tr:
        push_image(tr.url, "test/exp", "v1", image, auth=lambda: tr.push_token("test/exp"))
        params = {"service": "p2pdist-test", "scope": "repository:test/exp:pull"}
        body = httpx.get(tr.tokens.realm, params=params, trust_env=False).json()
        assert body["expires_in"] == 2
        headers = {"Authorization": f"Bearer {body['token']}", "Accept": DOCKER_MANIFEST}
        url = f"{tr.url}/v2/test/exp/manifests/v1"
        assert httpx.get(url, headers=headers, trust_env=False).status_code == 200
        time.sleep(3.1)
        assert httpx.get(url, headers=headers, trust_env=False).status_code == 401
