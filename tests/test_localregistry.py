"""The test infrastructure itself: real registry, synthetic images, push and pull back."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

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
from bench.localregistry import LocalRegistry
from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.helpers import PushedImage, requires_registry

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
