"""``p2pdist import``: docker save archives and OCI layouts into the store, served by the
proxy with no registry at all."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from bench.image import Image, docker_save_tar, make_image
from p2pdist.cli import main
from p2pdist.config import NodeConfig
from p2pdist.daemon import open_daemon
from p2pdist.digest import Digest
from p2pdist.importer import import_archive
from p2pdist.proxy import ImportedTags, ManifestCache
from p2pdist.registry import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST, parse_manifest
from p2pdist.store import PieceStore

PIECE = 64 * 1024
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")


@pytest.fixture(scope="module")
def image() -> Image:
    return make_image(size=400_000, layers=3, layer_format="gzip", seed=7)


@pytest.fixture(scope="module")
def oci_image() -> Image:
    return make_image(size=200_000, layers=2, layer_format="gzip", seed=8, oci=True)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _oci_members(image: Image, annotations: dict[str, str] | None = None) -> dict[str, bytes]:
    entry: dict[str, object] = {
        "mediaType": image.manifest_media_type,
        "size": len(image.manifest),
        "digest": image.manifest_digest,
    }
    if annotations:
        entry["annotations"] = annotations
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    index["manifests"] = [entry]
    members = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps(index).encode(),
    }
    for digest, data in [(image.manifest_digest, image.manifest), *image.blobs().items()]:
        members["blobs/sha256/" + digest.removeprefix("sha256:")] = data
    return members


def _import(tmp_path: Path, archive: Path, *extra: str) -> int:
    return main(["import", str(archive), "--data-dir", str(tmp_path / "data"), *extra])


def _assert_blobs(data_dir: Path, image: Image) -> None:
    store = PieceStore(data_dir)
    for digest, data in image.blobs().items():
        path = store.blob_path(Digest.parse(digest))
        assert path is not None, digest
        assert path.read_bytes() == data
        # Committed through the piece path: peers can serve it piece by piece.
        assert store.blob_piece_hashes(Digest.parse(digest)) is not None
    assert store.list_tasks() == []


def _tag(data_dir: Path, name: str, tag: str) -> Digest | None:
    entry = ImportedTags(data_dir / "proxy" / "tags").get(name, tag)
    return None if entry is None else entry.digest


def test_docker_save_import(
    tmp_path: Path, image: Image, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(docker_save_tar(image, "registry.example:5000/demo/app:v1"))
    assert _import(tmp_path, archive) == 0
    out = capsys.readouterr().out
    assert out.count(" imported\n") == 4  # 3 layers and the config, one line each
    assert "tagged registry.example:5000/demo/app:v1" in out
    data = tmp_path / "data"
    _assert_blobs(data, image)
    # The synthesised schema2 manifest is what docker push would have written.
    digest = Digest.parse(image.manifest_digest)
    cached = ManifestCache(data / "proxy" / "manifests")._load(digest)
    assert cached is not None and cached.media_type == MEDIA_DOCKER_MANIFEST
    assert cached.data == image.manifest
    parsed = parse_manifest(cached.data, cached.media_type)
    assert [str(d.digest) for d in parsed.layers] == image.layer_digests  # type: ignore[union-attr]
    assert _tag(data, "demo/app", "v1") == digest

    # Again: nothing re-read, same result.
    assert _import(tmp_path, archive, "--tag", "other/name:latest") == 0
    out = capsys.readouterr().out
    assert out.count("already in store") == 4
    assert _tag(data, "other/name", "latest") == digest


def test_small_pieces_and_uncompressed_layers(tmp_path: Path) -> None:
    image = make_image(size=300_000, layers=2, layer_format="tar", seed=9)
    archive = tmp_path / "img.tar"
    archive.write_bytes(docker_save_tar(image))
    lines: list[str] = []
    result = import_archive(
        archive, tmp_path / "data", tags=["app:1"], piece_size=PIECE, say=lines.append
    )
    assert len(lines) == 3
    _assert_blobs(tmp_path / "data", image)
    hashes = PieceStore(tmp_path / "data").blob_piece_hashes(Digest.parse(image.layer_digests[0]))
    assert hashes is not None and hashes[0] == PIECE and len(hashes[1]) > 1
    (manifest,) = result.manifests
    assert manifest.data == image.manifest  # rootfs.diff.tar media type, as pushed
    assert result.tags == ["docker.io/library/app:1"]


async def test_daemon_serves_imported_image_without_registry(tmp_path: Path, image: Image) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(docker_save_tar(image, "demo/app:v1"))
    assert _import(tmp_path, archive) == 0
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        upstream=None,
        piece_size=PIECE,
        host_id="import-test",
        docker_config=NO_DOCKER_CONFIG,
    )
    async with (
        open_daemon(config) as info,
        httpx.AsyncClient(base_url=str(info.proxy_url), timeout=30, trust_env=False) as c,
    ):
        accept = {"Accept": MEDIA_DOCKER_MANIFEST}
        r = await c.get("/v2/demo/app/manifests/v1", headers=accept)
        assert r.status_code == 200, r.text
        assert r.content == image.manifest
        assert r.headers["docker-content-digest"] == image.manifest_digest
        assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
        r = await c.head("/v2/demo/app/manifests/v1", headers=accept)
        assert r.status_code == 200
        assert r.headers["content-length"] == str(len(image.manifest))
        # containerd names the registry (?ns=): still served from the node.
        r = await c.get("/v2/demo/app/manifests/v1?ns=docker.io", headers=accept)
        assert r.status_code == 200 and r.content == image.manifest
        r = await c.get(f"/v2/demo/app/manifests/{image.manifest_digest}")
        assert r.status_code == 200 and r.content == image.manifest
        for digest, data in image.blobs().items():
            r = await c.get(f"/v2/demo/app/blobs/{digest}")
            assert r.status_code == 200
            assert r.content == data
            assert r.headers["docker-content-digest"] == digest
        r = await c.get(
            f"/v2/demo/app/blobs/{image.layer_digests[0]}", headers={"Range": "bytes=10-99"}
        )
        assert r.status_code == 206 and r.content == image.layers[0][10:100]
        # An unknown tag is still an error.
        r = await c.get("/v2/demo/app/manifests/v2", headers=accept)
        assert r.status_code == 404


def test_oci_layout_directory(tmp_path: Path, oci_image: Image) -> None:
    layout = tmp_path / "layout"
    ref = {"io.containerd.image.name": "docker.io/library/ocitest:2.0"}
    for name, data in _oci_members(oci_image, ref).items():
        (layout / name).parent.mkdir(parents=True, exist_ok=True)
        (layout / name).write_bytes(data)
    assert _import(tmp_path, layout) == 0
    data_dir = tmp_path / "data"
    _assert_blobs(data_dir, oci_image)
    digest = Digest.parse(oci_image.manifest_digest)
    cached = ManifestCache(data_dir / "proxy" / "manifests")._load(digest)
    assert cached is not None and cached.data == oci_image.manifest
    assert cached.media_type == MEDIA_OCI_MANIFEST
    assert _tag(data_dir, "library/ocitest", "2.0") == digest


def test_oci_tar_docker25_layout(tmp_path: Path, oci_image: Image) -> None:
    """Docker ≥ 25 ``docker save``: index.json and blobs/, tags only in manifest.json."""
    members = _oci_members(oci_image)
    members["manifest.json"] = json.dumps(
        [
            {
                "Config": "blobs/sha256/" + oci_image.config_digest.removeprefix("sha256:"),
                "RepoTags": ["new/style:latest"],
                "Layers": ["blobs/" + d.replace(":", "/") for d in oci_image.layer_digests],
            }
        ]
    ).encode()
    archive = tmp_path / "oci.tar"
    archive.write_bytes(_tar(members))
    assert _import(tmp_path, archive) == 0
    _assert_blobs(tmp_path / "data", oci_image)
    assert _tag(tmp_path / "data", "new/style", "latest") == Digest.parse(oci_image.manifest_digest)


def test_tampered_layer_docker_save(
    tmp_path: Path, image: Image, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = bytearray(docker_save_tar(image, "demo/app:v1"))
    at = raw.find(image.layers[1][1000:1100]) + 50
    raw[at] ^= 0xFF
    archive = tmp_path / "bad.tar"
    archive.write_bytes(bytes(raw))
    assert _import(tmp_path, archive) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2pdist: error: ") and "\n" not in err
    store = PieceStore(tmp_path / "data")
    assert store.blob_path(Digest.parse(image.layer_digests[1])) is None
    assert store.list_tasks() == []
    assert _tag(tmp_path / "data", "demo/app", "v1") is None


def test_tampered_blob_oci(tmp_path: Path, oci_image: Image) -> None:
    members = _oci_members(oci_image, {"io.containerd.image.name": "x/y:z"})
    name = "blobs/sha256/" + oci_image.layer_digests[0].removeprefix("sha256:")
    bad = bytearray(members[name])
    bad[len(bad) // 2] ^= 1
    members[name] = bytes(bad)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar(members))
    assert _import(tmp_path, archive) == 1
    store = PieceStore(tmp_path / "data")
    assert store.blob_path(Digest.parse(oci_image.layer_digests[0])) is None
    assert store.list_tasks() == []
    assert _tag(tmp_path / "data", "x/y", "z") is None


def test_path_traversal_refused(tmp_path: Path, image: Image) -> None:
    archive = tmp_path / "evil.tar"
    members = {"../evil": b"boom", "manifest.json": b"[]"}
    archive.write_bytes(_tar(members))
    assert _import(tmp_path, archive) == 2
    assert not (tmp_path / "evil").exists()
    assert PieceStore(tmp_path / "data").list_blobs() == []


def test_symlink_escape_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("layer/layer.tar")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(info)
    archive = tmp_path / "link.tar"
    archive.write_bytes(buf.getvalue())
    assert _import(tmp_path, archive) == 2


def test_not_a_tar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "junk.bin"
    archive.write_bytes(hashlib.sha256(b"x").digest() * 1000)
    assert _import(tmp_path, archive) == 2
    assert "not a tar archive" in capsys.readouterr().err
    assert _import(tmp_path, tmp_path / "missing.tar") == 2


def test_missing_manifest_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "empty.tar"
    archive.write_bytes(_tar({"hello.txt": b"hi"}))
    assert _import(tmp_path, archive) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_bad_tag_is_usage_error(tmp_path: Path, image: Image) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(docker_save_tar(image))
    assert _import(tmp_path, archive, "--tag", "Bad Name!") == 2


def test_docker_save_symlinked_layer(tmp_path: Path, image: Image) -> None:
    """docker save writes a repeated layer once and links to it."""
    layer, diff_id = image.layers[0], image.diff_ids[0]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {"Config": config_name, "RepoTags": ["dup:1"], "Layers": ["a/layer.tar", "b/layer.tar"]}
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("a/layer.tar", layer), (config_name, config)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        tar.addfile(link)
        info = tarfile.TarInfo("manifest.json")
        raw = json.dumps(manifest).encode()
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    archive = tmp_path / "dup.tar"
    archive.write_bytes(buf.getvalue())
    result = import_archive(archive, tmp_path / "data", say=lambda _: None)
    assert [b.present for b in result.blobs] == [False, True, False]
    (m,) = result.manifests
    layers = json.loads(m.data)["layers"]
    assert [entry["digest"] for entry in layers] == [image.layer_digests[0]] * 2
    assert result.tags == ["docker.io/library/dup:1"]
